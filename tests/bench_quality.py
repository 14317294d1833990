"""Forecast quality against baselines (a print-out, not a test): python -m tests.bench_quality

Prequential (test-then-train, every reading, in file order) one-step-ahead forecasts on the four
shared fleets (``appliances``, ``parking``, ``hourly``, ``daily`` from ../shared/datasets) and
on three synthetic ones (``seasonal_fleet(0)``, ``make_fleet(0)``, ``weekday_fleet(0)``), for:

* **streamer**: ``streamer.tools.replay.replay`` with the default ``LearnerConfig`` on the CPU, one
  torch thread; replayed ``--speed-runs`` times (3), its readings/s the best run's (the
  forecasts are identical each time);
* **persistence**: the sensor's last value (relMAE 1.0 by definition; scored like the rest);
* **seasonal naive, day / week**: the sensor's reading nearest to one day / one week before the
  next reading's time (within half its median gap), else persistence;
* **River SNARIMAX(2,1,1)** on per-sensor z-scores (running Welford mean/std, one model per
  sensor, a plain ``LinearRegression`` regressor: River's default ``StandardScaler |
  LinearRegression`` diverges on z-scored input); de-normalized;
* **River HoltWinters** (additive; alpha 0.3, beta 0.01, gamma 0.2), one per sensor, with a
  season of one day in readings (its median gap) for sub-daily sensors and 7 for daily ones;
  persistence until it has a full season.

River rows are skipped with a message when ``river`` is not installed (``pip install -e
.[bench]``). Every model is scored by ``streamer.tools.replay.score`` on the same readings
(those the learner accepted): relMAE = mean over sensors of MAE_model / MAE_persistence, each
forecast made at reading t scored against the sensor's reading t+1. ``--river-limit N`` runs
River on the first N readings per sensor only (its row then says so). A full run takes about 6
minutes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamer.core import Batch, LearnerConfig
from streamer.tools.readings_csv import read_csv
from streamer.tools.replay import ReplayReport, replay, score
from tests.synthetic_fleet import make_fleet, seasonal_fleet, weekday_fleet

try:  # the `bench` extra; imported here so its import time stays out of the timings
    import river
    from river import linear_model, preprocessing
    from river.time_series import SNARIMAX, HoltWinters
except ImportError:
    river = None

DAY = 86_400.0
WEEK = 7 * DAY
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
DIVERGED = 100.0  # a sensor's relMAE above this: the model blew up rather than forecast badly


@dataclass(frozen=True)
class Row:
    """One table row: a model's scores on one dataset."""

    model: str
    rel_mae: float
    median_rel_mae: float
    worst_sensor: str
    worst_rel_mae: float
    readings_per_second: float
    note: str = ""


def by_sensor(sensor_ids) -> list[np.ndarray]:
    """Row indices of each sensor's readings, in file order."""
    ids = np.asarray(sensor_ids, dtype=object)
    order = np.argsort(ids, kind="stable")
    _, starts = np.unique(ids[order], return_index=True)
    return np.split(order, starts[1:])


def persistence_forecasts(batch: Batch) -> np.ndarray:
    """(N, F) the forecast of the next reading is the current one."""
    return batch.values.copy()


def seasonal_naive_forecasts(batch: Batch, back: float = DAY) -> np.ndarray:
    """(N, F) time-based seasonal naive: the sensor's reading nearest to (next reading's ts -
    ``back``), if one lies within half its median gap of that time and before the forecast,
    else persistence. Robust to jitter and gaps, like the learner's own seasonal memory."""
    forecasts = batch.values.copy()
    for rows in by_sensor(batch.sensor_ids):
        ts = batch.ts[rows]  # (n,) increasing: the file is sorted by ts
        if len(ts) < 3:
            continue
        tolerance = 0.5 * np.median(np.diff(ts))
        want = ts[1:] - back  # (n-1,) one period before each next reading
        at = np.clip(np.searchsorted(ts, want), 1, len(ts) - 1)
        nearest = np.where(np.abs(ts[at - 1] - want) <= np.abs(ts[at] - want), at - 1, at)
        ok = (np.abs(ts[nearest] - want) <= tolerance) & (nearest <= np.arange(len(ts) - 1))
        forecasts[rows[:-1][ok]] = batch.values[rows[nearest[ok]]]
    return forecasts


def first_readings(batch: Batch, limit: int | None) -> np.ndarray:
    """(N,) bool: each sensor's first ``limit`` readings (all when ``limit`` is None)."""
    chosen = np.ones(len(batch), dtype=bool)
    if limit is not None:
        chosen[:] = False
        for rows in by_sensor(batch.sensor_ids):
            chosen[rows[:limit]] = True
    return chosen


def snarimax_forecasts(batch: Batch, ran: np.ndarray, scaler: bool) -> tuple[np.ndarray, int]:
    """(N, F) River SNARIMAX(2,1,1) forecasts on per-sensor z-scores for the readings in ``ran``
    (NaN elsewhere), and how many non-finite forecasts fell back to persistence.

    Per reading, in file order: update the sensor's running mean/std with y, ``learn_one`` its
    z-score, ``forecast(horizon=1)`` and de-normalize with the same statistics.
    """
    def model() -> SNARIMAX:
        regressor = linear_model.LinearRegression()
        if scaler:
            regressor = preprocessing.StandardScaler() | regressor  # River's default
        return SNARIMAX(p=2, d=1, q=1, regressor=regressor)

    index = np.flatnonzero(ran)
    ids = np.asarray(batch.sensor_ids, dtype=object)[index].tolist()
    values = batch.values[index, 0].tolist()  # one feature: the files and fleets here have one
    out: list[float] = []
    state: dict[str, list] = {}  # sensor -> [model, n, mean, m2]
    fallbacks = 0
    for sensor, y in zip(ids, values):
        s = state.get(sensor)
        if s is None:
            s = state[sensor] = [model(), 0, 0.0, 0.0]
        s[1] += 1
        delta = y - s[2]
        s[2] += delta / s[1]
        s[3] += delta * (y - s[2])
        std = (s[3] / s[1]) ** 0.5 if s[1] > 1 else 0.0
        std = std if std > 0 else 1.0  # a constant start: shift only
        s[0].learn_one((y - s[2]) / std)
        f = s[0].forecast(horizon=1)[0] * std + s[2]
        if not np.isfinite(f):
            f, fallbacks = y, fallbacks + 1
        out.append(f)
    forecasts = np.full(len(batch), np.nan)
    forecasts[index] = out
    return forecasts[:, None], fallbacks


def holt_winters_forecasts(batch: Batch, ran: np.ndarray) -> np.ndarray:
    """(N, F) River HoltWinters forecasts for the readings in ``ran`` (NaN elsewhere)."""
    forecasts = np.full(len(batch), np.nan)
    for rows in by_sensor(batch.sensor_ids):
        rows = rows[ran[rows]]
        if len(rows) < 2:
            forecasts[rows] = batch.values[rows, 0]
            continue
        gap = float(np.median(np.diff(batch.ts[rows])))
        season = 7 if gap >= DAY / 2 else max(2, round(DAY / gap))
        model = HoltWinters(alpha=0.3, beta=0.01, gamma=0.2, seasonality=season)
        out = []
        for y in batch.values[rows, 0].tolist():
            model.learn_one(y)
            try:
                f = model.forecast(horizon=1)[0]
            except IndexError:  # fewer than a season of readings so far
                f = y
            out.append(f if np.isfinite(f) else y)
        forecasts[rows] = out
    return forecasts[:, None]


def timed(fn: Callable[[], np.ndarray], n: int) -> tuple[np.ndarray, float]:
    """fn()'s result and readings/s over n readings."""
    started = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - started
    return out, n / seconds if seconds > 0 else float("inf")


def row(model: str, report: ReplayReport, rate: float, note: str = "") -> Row:
    worst = report.worst(1)
    rel = [s.rel_mae for s in report.sensors if np.isfinite(s.rel_mae)]
    median = float(np.median(rel)) if rel else float("nan")
    return Row(model, report.rel_mae, median, worst[0].sensor_id if worst else "-",
               worst[0].rel_mae if worst else float("nan"), rate, note)


def evaluate(name: str, batch: Batch, river_limit: int | None, with_river: bool,
             speed_runs: int) -> list[Row]:
    """All models on one dataset, scored on the readings the learner accepted."""
    n = len(batch)
    print(f"\n{name}: {n:,} readings, {len(set(batch.sensor_ids))} sensors, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    # The forecasts are deterministic; only the time varies with the machine's other work.
    runs = [replay(batch, LearnerConfig(device="cpu")) for _ in range(speed_runs)]
    _, status, report = runs[0]
    rates = [r[2].readings_per_second for r in runs]
    rejected = sum(report.rejected.values())
    print(f"  streamer done: {report.seconds:.1f} s, rejected {rejected:,} {report.rejected or ''}"
          f", readings/s {' '.join(f'{r:,.0f}' for r in rates)}", flush=True)
    rows = [row("streamer (defaults, cpu)", report, max(rates),
                f"replay(), batch 2048, {report.updates:,} updates; readings/s best of "
                f"{speed_runs} (worst {min(rates):,.0f})")]

    def scored(forecasts: np.ndarray, mask: np.ndarray | None = None) -> ReplayReport:
        if mask is None:
            return score(batch.sensor_ids, batch.values, forecasts, status)
        ids = np.asarray(batch.sensor_ids, dtype=object)[mask]
        return score(ids, batch.values[mask], forecasts[mask], status[mask])

    f, rate = timed(lambda: persistence_forecasts(batch), n)
    rows.append(row("persistence (last value)", scored(f), rate, "vectorized numpy (a copy)"))
    for label, back in (("day", DAY), ("week", WEEK)):
        f, rate = timed(lambda back=back: seasonal_naive_forecasts(batch, back), n)
        rows.append(row(f"seasonal naive, {label} (nearest reading)", scored(f), rate,
                        "vectorized numpy"))
    if with_river:
        ran = first_readings(batch, river_limit)
        limited = (f"first {river_limit:,} readings per sensor only ({int(ran.sum()):,} of {n:,})"
                   if not ran.all() else "")
        started = time.perf_counter()
        f, fallbacks = snarimax_forecasts(batch, ran, scaler=False)
        seconds = time.perf_counter() - started
        report = scored(f, ran)
        rest = [s.rel_mae for s in report.sensors if s.rel_mae <= DIVERGED]
        notes = ["Python loop"]
        if len(rest) < len(report.sensors):
            notes.append(f"{len(report.sensors) - len(rest)} sensors diverged "
                         f"(relMAE > {DIVERGED:g}); the rest {np.mean(rest):.3f}")
        if fallbacks:
            notes.append(f"{fallbacks} non-finite forecasts -> persistence")
        rows.append(row("River SNARIMAX(2,1,1), z-scored", report, int(ran.sum()) / seconds,
                        "; ".join(notes + [limited] if limited else notes)))
        started = time.perf_counter()
        f = holt_winters_forecasts(batch, ran)
        seconds = time.perf_counter() - started
        rows.append(row("River HoltWinters (additive, season = 1 day or 7)", scored(f, ran),
                        int(ran.sum()) / seconds, "; ".join(["Python loop", limited])
                        if limited else "Python loop"))
        print(f"  River done: {time.perf_counter() - started:.1f} s", flush=True)
    best = min(rows[1:], key=lambda r: r.rel_mae)
    print(f"  streamer {rows[0].rel_mae:.4f} vs best baseline {best.model} {best.rel_mae:.4f}: "
          f"{(1 - rows[0].rel_mae / best.rel_mae) * 100:+.1f} % below", flush=True)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| model | relMAE | median sensor | worst sensor (relMAE) | readings/s | note |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.model} | {r.rel_mae:.4g} | {r.median_rel_mae:.4g} "
                     f"| {r.worst_sensor} ({r.worst_rel_mae:.4g}) "
                     f"| {r.readings_per_second:,.0f} | {r.note} |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fleet_batch(fleet: tuple[list[str], np.ndarray, np.ndarray]) -> Batch:
    ids, ts, values = fleet
    return Batch.from_arrays(ids, ts, values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED.resolve(),
                        help="the folder of the shared fleets")
    parser.add_argument("--river-limit", type=int, default=None,
                        help="run River on the first N readings per sensor only (default: all)")
    parser.add_argument("--speed-runs", type=int, default=3,
                        help="replay each fleet this many times; streamer's readings/s is the "
                        "best (a shared machine's other jobs only ever slow a run down)")
    args = parser.parse_args()

    river_version = river.__version__ if river is not None else None
    load_start = os.getloadavg()
    print(f"# Forecast quality, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy "
          f"{np.__version__}, river {river_version or 'not installed'}")
    print("load average at start (1/5/15 min): " + " ".join(f"{x:.2f}" for x in load_start))
    if river_version is None:
        print("River is not installed (pip install river): its rows are skipped.")

    torch.set_num_threads(1)
    shared = [(f"{name}.csv.gz", lambda name=name: read_csv(args.data / f"{name}.csv.gz"))
              for name in ("appliances", "parking", "hourly", "daily")]
    datasets: list[tuple[str, Callable[[], Batch]]] = [
        *shared,
        ("seasonal_fleet(0)", lambda: fleet_batch(seasonal_fleet(0))),
        ("make_fleet(0)", lambda: fleet_batch(make_fleet(0))),
        ("weekday_fleet(0)", lambda: fleet_batch(weekday_fleet(0))),
    ]
    tables = []
    started = time.perf_counter()
    for name, load in datasets:
        batch = load()
        load_before = os.getloadavg()[0]
        rows = evaluate(name, batch, args.river_limit, river_version is not None,
                        args.speed_runs)
        tables.append(f"### {name}: {len(batch):,} readings, {len(set(batch.sensor_ids))} "
                      f"sensors (1-min load average {load_before:.2f} -> "
                      f"{os.getloadavg()[0]:.2f})\n\n{table(rows)}")
    print()
    print("\n\n".join(tables))
    load_end = os.getloadavg()
    print(f"\nload average at end (1/5/15 min): {' '.join(f'{x:.2f}' for x in load_end)}; "
          f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
