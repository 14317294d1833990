"""Forecast quality against baselines (a print-out, not a test): python -m tests.bench_quality

Prequential (test-then-train, every reading, in file order) one-step-ahead forecasts on the
sample file ``appliances.csv.gz`` and on the two synthetic fleets (``seasonal_fleet(0)``,
``make_fleet(0)``), for:

* **streamer**: ``streamer.replay.replay`` with the default ``LearnerConfig`` on the CPU;
* **persistence**: the sensor's last value (relMAE 1.0 by definition; scored like the rest);
* **seasonal naive**: the sensor's value one day before the next reading's timestamp
  (``ts_next - 86400``) when it had a reading there, else persistence;
* **River SNARIMAX(2,1,1)** on per-sensor z-scores (running Welford mean/std, one model per
  sensor; ``learn_one(z)`` then ``forecast(horizon=1)``, de-normalized), twice: with a plain
  ``LinearRegression`` as its regressor, and with River's default ``StandardScaler() |
  LinearRegression()``. The default diverges (SGD blow-up) on most appliances sensors: the
  scaler's early variance estimates are tiny, so its scaled features are huge. On z-scored input
  the scaler adds nothing; without it the figure is close to the dataset README's 0.831. Skipped
  with a message when ``river`` is not installed (``pip install -e .[bench]``).

Every model is scored by ``streamer.replay.score`` on the same readings (those the learner
accepted), so relMAE = mean over sensors of MAE_model / MAE_persistence, each forecast made at
reading t scored against the sensor's reading t+1. A full run on 2 shared CPU cores takes
30-80 s; ``--river-limit N`` runs River on the first N readings per sensor only and scores it on
those readings only (its row then says so).
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
from streamer.readings_csv import read_csv
from streamer.replay import ReplayReport, replay, score
from tests.synthetic_fleet import make_fleet, seasonal_fleet

try:  # the `bench` extra; imported here so its import time stays out of the timings
    import river
    from river import linear_model, preprocessing
    from river.time_series import SNARIMAX
except ImportError:
    river = None

DAY = 86_400.0
DIVERGED = 100.0  # a sensor's relMAE above this: the model blew up rather than forecast badly
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (REPO / ".." / "shared" / "datasets" / "appliances.csv.gz").resolve()


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


def seasonal_naive_forecasts(batch: Batch) -> np.ndarray:
    """(N, F) the sensor's value at (next reading's ts - 1 day) if it had one, else persistence."""
    forecasts = batch.values.copy()
    for rows in by_sensor(batch.sensor_ids):
        ts = batch.ts[rows]  # (n,) increasing: the file is sorted by ts
        back = ts[1:] - DAY  # (n-1,) one day before each next reading
        at = np.searchsorted(ts, back)
        hit = at < len(ts)
        hit[hit] = ts[at[hit]] == back[hit]
        forecasts[rows[:-1][hit]] = batch.values[rows[at[hit]]]
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


def evaluate(name: str, batch: Batch, river_limit: int | None, with_river: bool) -> list[Row]:
    """All models on one dataset, scored on the readings the learner accepted."""
    n = len(batch)
    print(f"\n{name}: {n:,} readings, {len(set(batch.sensor_ids))} sensors, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    config = LearnerConfig(device="cpu")
    _, status, report = replay(batch, config)
    rejected = sum(report.rejected.values())
    print(f"  streamer done: {report.seconds:.1f} s, rejected {rejected:,} {report.rejected or ''}",
          flush=True)
    rows = [row("streamer (LearnerConfig defaults, cpu)", report, report.readings_per_second,
                f"replay(), batch 2048, {report.updates:,} updates")]

    def scored(forecasts: np.ndarray, mask: np.ndarray | None = None) -> ReplayReport:
        if mask is None:
            return score(batch.sensor_ids, batch.values, forecasts, status)
        ids = np.asarray(batch.sensor_ids, dtype=object)[mask]
        return score(ids, batch.values[mask], forecasts[mask], status[mask])

    f, rate = timed(lambda: persistence_forecasts(batch), n)
    rows.append(row("persistence (last value)", scored(f), rate, "vectorized numpy (a copy)"))
    f, rate = timed(lambda: seasonal_naive_forecasts(batch), n)
    rows.append(row("seasonal naive (value at next ts - 1 day)", scored(f), rate,
                    "vectorized numpy"))
    if with_river:
        ran = first_readings(batch, river_limit)
        for scaler, label in ((False, "LinearRegression"),
                              (True, "default regressor (StandardScaler, LinearRegression)")):
            started = time.perf_counter()
            f, fallbacks = snarimax_forecasts(batch, ran, scaler)
            seconds = time.perf_counter() - started
            report = scored(f, ran)
            rest = [s.rel_mae for s in report.sensors if s.rel_mae <= DIVERGED]
            diverged = len(report.sensors) - len(rest)
            notes = ["Python loop"]
            if diverged:
                notes.append(f"{diverged} of {len(report.sensors)} sensors diverged "
                             f"(relMAE > {DIVERGED:g}); relMAE of the rest "
                             f"{np.mean(rest) if rest else float('nan'):.3f}")
            if fallbacks:
                notes.append(f"{fallbacks} non-finite forecasts -> persistence")
            if not ran.all():
                notes.append(f"first {river_limit:,} readings per sensor only "
                             f"({int(ran.sum()):,} of {n:,})")
            rows.append(row(f"River SNARIMAX(2,1,1), z-scored, {label}", report,
                            int(ran.sum()) / seconds, "; ".join(notes)))
            print(f"  River ({label}) done: {seconds:.1f} s", flush=True)
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
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="appliances.csv.gz")
    parser.add_argument("--river-limit", type=int, default=None,
                        help="run River on the first N readings per sensor only (default: all)")
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

    datasets: list[tuple[str, Callable[[], Batch]]] = [
        (f"appliances ({args.data.name})", lambda: read_csv(args.data)),
        ("seasonal_fleet(0)", lambda: fleet_batch(seasonal_fleet(0))),
        ("make_fleet(0)", lambda: fleet_batch(make_fleet(0))),
    ]
    tables = []
    started = time.perf_counter()
    for name, load in datasets:
        batch = load()
        load_before = os.getloadavg()[0]
        rows = evaluate(name, batch, args.river_limit, river_version is not None)
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
