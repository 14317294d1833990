"""Offline backtest: the same learner over a CSV, prequential errors against persistence, and
how well its intervals covered and which readings it flagged."""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from streamer.core import Batch, Learner, LearnerConfig, Reason, StepResult
from streamer.core.batch import HorizonResult
from streamer.core.horizon import scored_steps
from streamer.tools.readings_csv import iter_chunks

NAN = float("nan")


@dataclass(frozen=True)
class SensorScore:
    """Prequential one-step-ahead errors of one sensor, in its own units, and its intervals."""

    sensor_id: str
    scored: int  # forecasts that met their next reading
    mae: float
    persistence_mae: float
    rel_mae: float  # mae / persistence_mae (nan when persistence is exact)
    # Readings scored against the interval made before them (past warm-up), the share of them
    # inside it (per feature), and those intervals' mean and median width in the sensor's
    # persistence MAEs; nan when there are none or no intervals were given.
    interval_scored: int = 0
    coverage: float = NAN
    interval_width: float = NAN
    interval_width_median: float = NAN
    anomalies: int = 0  # readings flagged
    anomalies_per_1000: float = NAN  # per 1,000 interval-scored readings


@dataclass
class ReplayReport:
    readings: int
    accepted: int
    rejected: dict[str, int]
    updates: int
    seconds: float
    readings_per_second: float
    rel_mae: float  # mean over sensors of MAE_model / MAE_persistence
    mae: float  # mean over sensors
    persistence_mae: float
    # Intervals and flags over all sensors' interval-scored readings pooled (not a mean over
    # sensors): coverage is the share of every scored reading, whatever its sensor. The
    # median width is the one to read: a sensor that rarely changes has a persistence MAE near
    # 0 and a width of thousands of those, which can swamp the mean.
    target_coverage: float = NAN
    interval_scored: int = 0
    coverage: float = NAN
    interval_width: float = NAN
    interval_width_median: float = NAN
    anomalies: int = 0
    anomalies_per_1000: float = NAN
    sensors: list[SensorScore] = field(default_factory=list)

    def worst(self, n: int) -> list[SensorScore]:
        finite = [s for s in self.sensors if np.isfinite(s.rel_mae)]
        return sorted(finite, key=lambda s: s.rel_mae, reverse=True)[:n]


@dataclass(frozen=True)
class ReplayOutputs:
    """What the learner said about each reading of a replay (the StepResult fields of the same
    names, N readings, F features, in file order)."""

    status: np.ndarray  # (N,) int8 Reason values; 0 = accepted
    forecasts: np.ndarray  # (N, F) forecast made at the reading for its sensor's next one
    lower: np.ndarray  # (N, F) that forecast's interval
    upper: np.ndarray  # (N, F)
    anomaly_score: np.ndarray  # (N,) in [0, 1], of this reading against the forecast before it
    anomaly: np.ndarray  # (N,) bool, flagged
    inside: np.ndarray  # (N,) int8: features inside the interval made before it; -1 unscored
    interval_width: np.ndarray  # (N,) mean width of this reading's interval, in persistence MAEs
    horizon: HorizonResult | None = None  # the next H readings' forecasts, with a horizon

    @classmethod
    def empty(cls, n: int, n_features: int, horizon: int = 1) -> ReplayOutputs:
        """Outputs for ``n`` readings, as if every one were rejected."""
        result = StepResult.empty(n, n_features)
        arrays = {f.name: getattr(result, f.name) for f in fields(cls) if f.name != "horizon"}
        ahead = (HorizonResult.empty(n, n_features, horizon, scored_steps(horizon))
                 if horizon > 1 else None)
        return cls(**arrays, horizon=ahead)

    def fill(self, start: int, result: StepResult) -> None:
        """Copy one step's outputs into rows ``start:start + len(result.status)``."""
        stop = start + len(result.status)
        for f in fields(self):
            if f.name != "horizon":
                getattr(self, f.name)[start:stop] = getattr(result, f.name)
        if self.horizon is not None and result.horizon is not None:
            for f in fields(self.horizon):
                if f.name != "steps":
                    getattr(self.horizon, f.name)[start:stop] = getattr(result.horizon, f.name)


def json_safe(value):
    """``value`` with every non-finite float as None: JSON has no NaN (a figure not known yet,
    such as the skill of a sensor with one reading), and strict parsers refuse the token."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def backtest(
    readings: Batch,
    config: LearnerConfig,
    batch_size: int = 2048,
    on_step: Callable[[StepResult], None] | None = None,
) -> tuple[ReplayOutputs, ReplayReport]:
    """Run the learner over ``readings`` in order; what it said of each reading, and the report."""
    learner = Learner(config)
    outputs = ReplayOutputs.empty(len(readings), config.n_features, config.horizon)
    updates = 0
    started = time.perf_counter()
    offset = 0
    for chunk in iter_chunks(readings, batch_size):
        result = learner.step(chunk)
        outputs.fill(offset, result)
        updates += len(result.updates)
        offset += len(chunk)
        if on_step is not None:
            on_step(result)
    seconds = time.perf_counter() - started
    report = score(readings.sensor_ids, readings.values, outputs.forecasts, outputs.status,
                   inside=outputs.inside, interval_width=outputs.interval_width,
                   anomaly=outputs.anomaly)
    report.updates, report.seconds = updates, seconds
    report.readings_per_second = len(readings) / seconds if seconds > 0 else float("inf")
    report.target_coverage = config.coverage
    return outputs, report


def replay(
    readings: Batch,
    config: LearnerConfig,
    batch_size: int = 2048,
    on_step: Callable[[StepResult], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, ReplayReport]:
    """``backtest`` for callers that need only (forecasts (N, F), status (N,), report)."""
    outputs, report = backtest(readings, config, batch_size, on_step)
    return outputs.forecasts, outputs.status, report


def score(sensor_ids: Sequence[str], values: np.ndarray, forecasts: np.ndarray,
          status: np.ndarray, inside: np.ndarray | None = None,
          interval_width: np.ndarray | None = None,
          anomaly: np.ndarray | None = None) -> ReplayReport:
    """Prequential MAE per sensor: each forecast against that sensor's next accepted reading.

    With ``inside``, ``interval_width`` and ``anomaly`` (ReplayOutputs) also the coverage and
    width of the intervals each interval-scored reading met, and the readings flagged; without
    them (a baseline model) those stay nan and 0.
    """
    ok = np.flatnonzero(status == 0)
    ids = np.asarray(sensor_ids, dtype=object)[ok]
    order = ok[np.argsort(ids, kind="stable")]  # accepted readings grouped by sensor, in order
    grouped_ids = np.asarray(sensor_ids, dtype=object)[order]
    same = grouped_ids[1:] == grouped_ids[:-1]  # pair (i, i+1) belongs to one sensor
    nxt, cur = order[1:][same], order[:-1][same]
    model_err = np.abs(values[nxt] - forecasts[cur]).mean(axis=1)
    naive_err = np.abs(values[nxt] - values[cur]).mean(axis=1)
    # Reading nxt was scored against the interval made at cur: its coverage and width go
    # together. A sensor's first reading has no interval before it, so every scored one pairs.
    with_intervals = inside is not None and interval_width is not None and anomaly is not None
    if with_intervals:
        tested = inside[nxt] >= 0
        covered = np.maximum(inside[nxt], 0) / values.shape[1]  # share of features inside
        width = interval_width[cur]
        flagged = anomaly[nxt]
    pair_ids = grouped_ids[:-1][same]
    sensors = []
    names, starts = np.unique(pair_ids, return_index=True) if len(pair_ids) else ([], [])
    bounds = list(starts) + [len(pair_ids)]
    for i, name in enumerate(names):
        part = slice(bounds[i], bounds[i + 1])
        m, p = model_err[part], naive_err[part]
        mae, pmae = float(m.mean()), float(p.mean())
        intervals = (_interval_figures(tested[part], covered[part], width[part], flagged[part])
                     if with_intervals else {})
        sensors.append(SensorScore(str(name), len(m), mae, pmae,
                                   mae / pmae if pmae > 0 else NAN, **intervals))
    rel = [s.rel_mae for s in sensors if np.isfinite(s.rel_mae)]
    rejected = {Reason(r).label: int(n) for r, n in zip(*np.unique(status[status != 0],
                                                                    return_counts=True))}
    return ReplayReport(
        readings=len(status), accepted=len(ok), rejected=rejected, updates=0, seconds=0.0,
        readings_per_second=0.0,
        rel_mae=float(np.mean(rel)) if rel else NAN,
        mae=float(np.mean([s.mae for s in sensors])) if sensors else NAN,
        persistence_mae=float(np.mean([s.persistence_mae for s in sensors])) if sensors
        else NAN,
        **(_interval_figures(tested, covered, width, flagged) if with_intervals else {}),
        sensors=sensors,
    )


def _interval_figures(tested: np.ndarray, covered: np.ndarray, width: np.ndarray,
                      flagged: np.ndarray) -> dict[str, float | int]:
    """Coverage, mean and median width and flags over the pairs whose next reading was
    interval-scored. The width is taken over the finite ones (coverage counts every pair): a
    flat sensor that jumps by 1e295 has an interval too wide for a float in its own units,
    which made the fleet's mean inf; each is divided before they are added, so near-overflow
    ones cannot."""
    n, flags = int(tested.sum()), int(flagged.sum())
    widths = width[tested]
    widths = widths[np.isfinite(widths)]
    return {
        "interval_scored": n,
        "coverage": float(covered[tested].mean()) if n else NAN,
        "interval_width": float(np.sum(widths / len(widths))) if len(widths) else NAN,
        "interval_width_median": float(np.median(widths)) if len(widths) else NAN,
        "anomalies": flags,
        "anomalies_per_1000": 1000.0 * flags / n if n else NAN,
    }


def _per_feature(n_features: int, *names: str) -> list[str]:
    """Column names: one per name, or one per name and feature (``forecast_0``, ...)."""
    if n_features == 1:
        return list(names)
    return [f"{name}_{j}" for name in names for j in range(n_features)]


def forecasts_header(n_features: int) -> list[str]:
    """The columns of ``write_forecasts``: one per feature for forecast, lower and upper."""
    return ["sensor_id", "ts", *_per_feature(n_features, "forecast", "lower", "upper"),
            "anomaly_score", "anomaly"]


def horizon_header(n_features: int) -> list[str]:
    """The columns of ``write_horizon``."""
    return ["sensor_id", "ts", "step", "target_ts",
            *_per_feature(n_features, "forecast", "lower", "upper")]


def write_forecasts(path: str | Path, readings: Batch, outputs: ReplayOutputs) -> None:
    """One row per accepted reading: the forecast made at ts for the next reading and its
    interval, then the anomaly score and flag (0/1) of the reading at ts itself."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(forecasts_header(outputs.forecasts.shape[1]))
        for i in np.flatnonzero(outputs.status == 0).tolist():
            writer.writerow([readings.sensor_ids[i], repr(float(readings.ts[i])),
                             *[repr(float(x)) for x in outputs.forecasts[i]],
                             *[repr(float(x)) for x in outputs.lower[i]],
                             *[repr(float(x)) for x in outputs.upper[i]],
                             repr(float(outputs.anomaly_score[i])), int(outputs.anomaly[i])])


def write_horizon(path: str | Path, readings: Batch, outputs: ReplayOutputs) -> None:
    """Long format, one row per accepted reading and step k: the forecast made at ts for the
    sensor's k-th next reading, expected at target_ts (empty while the sensor's typical gap is
    unknown), and its interval."""
    horizon = outputs.horizon
    if horizon is None:
        raise ValueError("these outputs have no horizon (the learner's horizon was 1)")
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(horizon_header(outputs.forecasts.shape[1]))
        for i in np.flatnonzero(outputs.status == 0).tolist():
            head = [readings.sensor_ids[i], repr(float(readings.ts[i]))]
            for k, target in enumerate(horizon.target_ts[i].tolist()):
                writer.writerow([*head, k + 1, repr(target) if np.isfinite(target) else "",
                                 *[repr(float(x)) for x in horizon.forecast[i, k]],
                                 *[repr(float(x)) for x in horizon.lower[i, k]],
                                 *[repr(float(x)) for x in horizon.upper[i, k]]])


def _rated(sensors: list[SensorScore]) -> str:
    """"N sensors", or "N of M sensors (K never changed)": a sensor whose readings never
    changed has no persistence error to compare with, and no relMAE."""
    rated = sum(np.isfinite(s.rel_mae) for s in sensors)
    if rated == len(sensors):
        return f"{rated} sensors"
    return f"{rated} of {len(sensors)} sensors ({len(sensors) - rated} never changed)"


def format_report(report: ReplayReport, top: int = 10) -> str:
    """A human-readable summary: overall figures and the per-sensor table (worst first)."""
    lines = [
        f"readings {report.readings:,}  accepted {report.accepted:,}  "
        f"rejected {sum(report.rejected.values()):,} {report.rejected or ''}".rstrip(),
        f"updates {report.updates:,}  time {report.seconds:.2f} s  "
        f"throughput {report.readings_per_second:,.0f} readings/s",
        f"relMAE {report.rel_mae:.4f} (mean over {_rated(report.sensors)} of MAE / "
        f"persistence MAE; < 1 beats persistence)",
        f"intervals: coverage {report.coverage:.3f} (target {report.target_coverage:.3f}) of "
        f"{report.interval_scored:,} scored readings, width {report.interval_width_median:.3g} "
        f"persistence MAEs (median; mean {report.interval_width:.3g})",
        f"anomalies: {report.anomalies:,} flagged ({report.anomalies_per_1000:.2f} per 1,000 "
        f"scored readings)",
        "",
        f"{'sensor':<24} {'scored':>8} {'MAE':>12} {'persist MAE':>12} {'relMAE':>8} "
        f"{'coverage':>8} {'width p50':>9} {'flags':>6}",
    ]
    ranked = sorted(report.sensors, key=lambda s: -s.rel_mae if np.isfinite(s.rel_mae) else 0)
    for s in ranked[: top if top > 0 else None]:
        lines.append(f"{s.sensor_id[:24]:<24} {s.scored:>8} {s.mae:>12.5g} "
                     f"{s.persistence_mae:>12.5g} {s.rel_mae:>8.4f} {s.coverage:>8.3f} "
                     f"{s.interval_width_median:>9.3g} {s.anomalies:>6}")
    if 0 < top < len(ranked):
        lines.append(f"... {len(ranked) - top} more sensors (use --top 0 for all)")
    return "\n".join(lines)
