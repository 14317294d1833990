"""Offline backtest: the same learner over a CSV, prequential errors against persistence."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from streamer.core import Batch, Learner, LearnerConfig, Reason, StepResult
from streamer.readings_csv import iter_chunks


@dataclass(frozen=True)
class SensorScore:
    """Prequential one-step-ahead errors of one sensor, in its own units."""

    sensor_id: str
    scored: int  # forecasts that met their next reading
    mae: float
    persistence_mae: float
    rel_mae: float  # mae / persistence_mae (nan when persistence is exact)


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
    sensors: list[SensorScore] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def worst(self, n: int) -> list[SensorScore]:
        finite = [s for s in self.sensors if np.isfinite(s.rel_mae)]
        return sorted(finite, key=lambda s: s.rel_mae, reverse=True)[:n]


def replay(
    readings: Batch,
    config: LearnerConfig,
    batch_size: int = 2048,
    on_step: Callable[[StepResult], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, ReplayReport]:
    """Run the learner over ``readings`` in order; (forecasts (N, F), status (N,), report)."""
    learner = Learner(config)
    forecasts = np.full((len(readings), config.n_features), np.nan)
    status = np.zeros(len(readings), dtype=np.int8)
    updates = 0
    started = time.perf_counter()
    offset = 0
    for chunk in iter_chunks(readings, batch_size):
        result = learner.step(chunk)
        forecasts[offset : offset + len(chunk)] = result.forecasts
        status[offset : offset + len(chunk)] = result.status
        updates += len(result.updates)
        offset += len(chunk)
        if on_step is not None:
            on_step(result)
    seconds = time.perf_counter() - started
    report = score(readings.sensor_ids, readings.values, forecasts, status)
    report.updates, report.seconds = updates, seconds
    report.readings_per_second = len(readings) / seconds if seconds > 0 else float("inf")
    return forecasts, status, report


def score(sensor_ids, values: np.ndarray, forecasts: np.ndarray,
          status: np.ndarray) -> ReplayReport:
    """Prequential MAE per sensor: each forecast against that sensor's next accepted reading."""
    ok = np.flatnonzero(status == 0)
    ids = np.asarray(sensor_ids, dtype=object)[ok]
    order = ok[np.argsort(ids, kind="stable")]  # accepted readings grouped by sensor, in order
    grouped_ids = np.asarray(sensor_ids, dtype=object)[order]
    same = grouped_ids[1:] == grouped_ids[:-1]  # pair (i, i+1) belongs to one sensor
    nxt, cur = order[1:][same], order[:-1][same]
    model_err = np.abs(values[nxt] - forecasts[cur]).mean(axis=1)
    naive_err = np.abs(values[nxt] - values[cur]).mean(axis=1)
    pair_ids = grouped_ids[:-1][same]
    sensors = []
    names, starts = np.unique(pair_ids, return_index=True) if len(pair_ids) else ([], [])
    bounds = list(starts) + [len(pair_ids)]
    for i, name in enumerate(names):
        m, p = model_err[bounds[i] : bounds[i + 1]], naive_err[bounds[i] : bounds[i + 1]]
        mae, pmae = float(m.mean()), float(p.mean())
        sensors.append(SensorScore(str(name), len(m), mae, pmae,
                                   mae / pmae if pmae > 0 else float("nan")))
    rel = [s.rel_mae for s in sensors if np.isfinite(s.rel_mae)]
    rejected = {Reason(r).label: int(n) for r, n in zip(*np.unique(status[status != 0],
                                                                    return_counts=True))}
    return ReplayReport(
        readings=len(status), accepted=len(ok), rejected=rejected, updates=0, seconds=0.0,
        readings_per_second=0.0,
        rel_mae=float(np.mean(rel)) if rel else float("nan"),
        mae=float(np.mean([s.mae for s in sensors])) if sensors else float("nan"),
        persistence_mae=float(np.mean([s.persistence_mae for s in sensors])) if sensors
        else float("nan"),
        sensors=sensors,
    )


def write_forecasts(path: str | Path, readings: Batch, forecasts: np.ndarray,
                    status: np.ndarray) -> None:
    """`sensor_id,ts,forecast` (the forecast made at ts for the next reading), accepted only."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        f = forecasts.shape[1]
        writer.writerow(["sensor_id", "ts", "forecast"] if f == 1
                        else ["sensor_id", "ts", *[f"forecast_{j}" for j in range(f)]])
        for i in np.flatnonzero(status == 0).tolist():
            writer.writerow([readings.sensor_ids[i], repr(float(readings.ts[i])),
                             *[repr(float(x)) for x in forecasts[i]]])


def format_report(report: ReplayReport, top: int = 10) -> str:
    """A human-readable summary: overall figures and the per-sensor table (worst first)."""
    lines = [
        f"readings {report.readings:,}  accepted {report.accepted:,}  "
        f"rejected {sum(report.rejected.values()):,} {report.rejected or ''}".rstrip(),
        f"updates {report.updates:,}  time {report.seconds:.2f} s  "
        f"throughput {report.readings_per_second:,.0f} readings/s",
        f"relMAE {report.rel_mae:.4f} (mean over {len(report.sensors)} sensors of MAE / "
        f"persistence MAE; < 1 beats persistence)",
        "",
        f"{'sensor':<24} {'scored':>8} {'MAE':>12} {'persist MAE':>12} {'relMAE':>8}",
    ]
    ranked = sorted(report.sensors, key=lambda s: -s.rel_mae if np.isfinite(s.rel_mae) else 0)
    for s in ranked[: top if top > 0 else None]:
        lines.append(f"{s.sensor_id[:24]:<24} {s.scored:>8} {s.mae:>12.5g} "
                     f"{s.persistence_mae:>12.5g} {s.rel_mae:>8.4f}")
    if 0 < top < len(ranked):
        lines.append(f"... {len(ranked) - top} more sensors (use --top 0 for all)")
    return "\n".join(lines)
