"""Intervals and anomaly flags against baselines (a print-out, not a test):
python -m tests.bench_intervals

On the four shared fleets (../shared/datasets), streamer's default learner is replayed once
(prequential, every reading in file order, batches of 2,048); every method below bounds the
same forecasts, so only the intervals differ:

* **streamer**: the interval each forecast carries (conformal PID: quantile tracking of the
  normalized residuals plus the integrator, streamer/core/intervals.py);
* **no integrator**: the same calibration with the integrator's gain at 0, run in the same
  replay on the same inputs (a shadow of the learner's own);
* **running quantile**: per sensor, the empirical alpha/2 and 1 - alpha/2 quantiles of all its
  raw residuals so far, added to the forecast (what River's conformal ``RegressionJackknife``
  gives with its running quantiles).

Figures per fleet, each reading scored against the interval made before it, after a warm-up of
200 readings per sensor: fleet coverage (target 0.90), the 5th percentile of per-sensor
coverage, mean width and mean Winkler (interval) score, both in units of the sensor's
persistence MAE and averaged over sensors; flags per 1,000 readings at the default threshold
and two stricter ones (read off the same scores: with the default ``learn_after`` of 0 a flag
changes nothing downstream).

Anomalies: the labelled series shipped in the PyPI package ``aeon`` 1.6.0 (``pip install -e
.[bench]``; the CSVs are read from the installed package, aeon is never imported) streamed
through the learner in batches of 64: per labelled window whether any reading in it was flagged,
and false flags per 1,000 normal readings (after the first 200), at the default threshold and
two stricter ones. Cost: replay readings per CPU second with intervals and scores against a
replay whose calibration is a no-op, best of ``--runs`` (3) each, interleaved (more for a short
fleet: each variant replays for at least 5 CPU seconds in all).

After a pause: one synthetic sensor read every minute (white noise, or an AR(1) at 0.9) reads
exactly the same value for a while (a machine switched off) and then varies again; Winkler
score (in the series' own units) and coverage over the 1,000 readings after it comes back and
the 2,000 after those, against the same sensor never paused (``--quick``: one pause length).

After an outage: 20 synthetic sensors read every minute (white noise, an AR(1) at 0.9, a
random walk) miss 10, 100 or 1,000 readings; the share of their first readings back that is
flagged, as streamer scores them and as a twin calibration fed the same inputs scores them if
every reading came on time (what streamer did before it knew lateness), and flags per 1,000
of the 1,000 readings after. Then per fleet the same for the readings that came more than 3 of
their sensor's median gaps after the one before (a car park's first of the morning, a series
back from missing hours), against the other readings' flags.
"""

from __future__ import annotations

import bisect
import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import torch

from streamer.core import Batch, Learner, LearnerConfig
from streamer.core.intervals import Calibrated, Calibration
from streamer.tools.readings_csv import iter_chunks
from tests.bench_fleets import fleet_arguments, read_fleet

WARMUP = 200
PAUSES = (1_000, 3_000, 10_000, 30_000)  # flat readings before the sensor varies again
AEON_SERIES = ("KDD-TSAD_135/135_UCR_Anomaly_InternalBleeding16_TEST.csv",
               "UnitTest/ecg-diff-count-3_TEST.csv")
THRESHOLDS = (0.999, 0.9999, 0.99999)
OUTAGE_SENSORS = 20  # sensors per kind and outage length
LATE = 3.0  # a fleet's reading counts as late beyond this many of its sensor's median gaps
MIN_COST_SECONDS = 5.0


class _Shadow:
    """The learner's calibration, with a second one fed the same inputs alongside."""

    def __init__(self, real: Calibration, shadow: Calibration):
        self.real, self.shadow, self.outputs = real, shadow, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def grow(self, capacity: int) -> None:
        self.real.grow(capacity)
        self.shadow.grow(capacity)

    def reset(self, slots: np.ndarray) -> None:
        self.real.reset(slots)
        self.shadow.reset(slots)

    def calibrate(self, *args) -> Calibrated:
        self.outputs.append(self.shadow.calibrate(*args))
        return self.real.calibrate(*args)


class _NoIntervals(_Shadow):
    """A calibration that does nothing: the cost baseline."""

    def calibrate(self, slots, ts, gap, values, *args) -> Calibrated:
        m, f = values.shape
        empty = np.full((m, f), np.nan)
        return Calibrated(empty, empty, np.zeros(m), np.zeros(m, dtype=bool),
                          np.full(m, -1, dtype=np.int8), empty, empty)


class _OnTime(_Shadow):
    """The learner's calibration, with a twin that scores every reading as if it came on time
    (how late each came, and how far the sensor reaches, left out; the rest as given)."""

    def calibrate(self, *args) -> Calibrated:
        on_time = (None,) * LATENESS_ARGS
        self.outputs.append(self.shadow.calibrate(*args[:LATENESS_ARG], *on_time,
                                                  *args[LATENESS_ARG + LATENESS_ARGS:]))
        return self.real.calibrate(*args)


# Calibration.calibrate's arguments from ``late`` on: late, reach, next_late, next_reach.
LATENESS_ARG, LATENESS_ARGS = 14, 4


def run(batch: Batch, config: LearnerConfig, batch_size: int = 2048, shadow: bool = False,
        intervals: bool = True, on_time: bool = False) -> tuple[dict, dict | None, float]:
    """Replay; per-reading arrays of streamer (and of the no-integrator shadow, or of the
    on-time twin with ``on_time``) and seconds."""
    learner = Learner(config)
    c = learner.calibration
    if shadow or on_time or not intervals:
        twin = Calibration(len(c.flag_run), c.n_features, config.coverage, config.anomaly_threshold,
                           config.anomaly_learn_after, gain=c.gain if on_time else 0.0)
        kind = _OnTime if on_time else _Shadow if intervals else _NoIntervals
        learner.calibration = kind(c, twin)
    keep = ("forecasts", "lower", "upper", "anomaly_score", "anomaly", "inside", "expected",
            "status")
    parts: dict[str, list] = {k: [] for k in keep}
    started = time.process_time()  # CPU seconds: less disturbed by other load than wall time
    for chunk in iter_chunks(batch, batch_size):
        result = learner.step(chunk)
        for k in keep:
            parts[k].append(getattr(result, k))
    seconds = time.process_time() - started
    out = {k: np.concatenate(v) for k, v in parts.items()}
    twin_out = None
    if shadow or on_time:
        # The shadow saw the accepted readings in the learner's order: map them back.
        cal = learner.calibration.outputs
        accepted = np.flatnonzero(out["status"] == 0)
        twin_out = {"lower": np.full_like(out["lower"], np.nan),
                    "upper": np.full_like(out["upper"], np.nan)}
        twin_out["lower"][accepted] = np.concatenate([o.lower for o in cal])
        twin_out["upper"][accepted] = np.concatenate([o.upper for o in cal])
        twin_out["anomaly"] = np.zeros_like(out["anomaly"])
        twin_out["anomaly"][accepted] = np.concatenate([o.anomaly for o in cal])
    return out, twin_out, seconds


def _pairs(ids: np.ndarray, status: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cur, nxt, k): consecutive accepted readings of one sensor; k = nxt's index in it."""
    ok = np.flatnonzero(status == 0)
    order = ok[np.argsort(ids[ok], kind="stable")]
    same = ids[order][1:] == ids[order][:-1]
    cur, nxt = order[:-1][same], order[1:][same]
    k = np.zeros(len(order), dtype=np.int64)
    starts = np.r_[0, np.flatnonzero(~same) + 1]
    for a, b in zip(starts, np.r_[starts[1:], len(order)]):
        k[a:b] = np.arange(b - a)
    return cur, nxt, k[1:][same]


def interval_figures(batch: Batch, status: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                     alpha: float, scores: np.ndarray | None = None) -> dict:
    ids = np.asarray(batch.sensor_ids, dtype=object)
    cur, nxt, k = _pairs(ids, status)
    y, lo, hi = batch.values[nxt, 0], lower[cur, 0], upper[cur, 0]
    naive = np.abs(y - batch.values[cur, 0])
    counted = k >= WARMUP
    inside = (y >= lo) & (y <= hi)
    winkler = (hi - lo) + (2 / alpha) * (np.maximum(lo - y, 0) + np.maximum(y - hi, 0))
    names = ids[nxt]
    cover, wink, width = [], [], []
    for name in np.unique(names[counted]):
        rows = counted & (names == name)
        unit = naive[rows].mean()
        if unit > 0:
            cover.append(inside[rows].mean())
            wink.append(winkler[rows].mean() / unit)
            width.append((hi - lo)[rows].mean() / unit)
    flags = [1000 * (scores[nxt][counted] >= t).mean() if scores is not None else np.nan
             for t in THRESHOLDS]
    return {"coverage": inside[counted].mean(), "p5": np.percentile(cover, 5),
            "width": np.mean(width), "winkler": np.mean(wink), "flags": flags}


def running_quantile(batch: Batch, status: np.ndarray, forecasts: np.ndarray,
                     alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per sensor, forecast + the empirical quantiles of its raw residuals so far."""
    lower, upper = np.full_like(forecasts, np.nan), np.full_like(forecasts, np.nan)
    seen: dict[str, list[float]] = {}
    last: dict[str, float] = {}
    for i in np.flatnonzero(status == 0).tolist():
        sid, f = batch.sensor_ids[i], forecasts[i, 0]
        past = seen.setdefault(sid, [])
        if sid in last:
            bisect.insort(past, batch.values[i, 0] - last[sid])
        last[sid] = f
        n = len(past)
        if n >= 2:
            lower[i, 0] = f + past[int(np.floor(alpha / 2 * (n - 1)))]
            upper[i, 0] = f + past[int(np.ceil((1 - alpha / 2) * (n - 1)))]
        else:
            lower[i, 0] = upper[i, 0] = f
    return lower, upper


def aeon_series() -> list[tuple[str, Batch, np.ndarray]]:
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    found = []
    for rel in AEON_SERIES:
        data = np.genfromtxt(root / rel, delimiter=",", skip_header=1)
        name = Path(rel).stem
        batch = Batch.from_arrays([name] * len(data), data[:, 0], data[:, 1])
        found.append((name, batch, data[:, 2] > 0))
    return found


def windows(labels: np.ndarray) -> list[tuple[int, int]]:
    idx = np.flatnonzero(labels)
    if not len(idx):
        return []
    cuts = np.flatnonzero(np.diff(idx) > 1)
    return list(zip(np.r_[idx[0], idx[cuts + 1]], np.r_[idx[cuts], idx[-1]]))


def paused_sensor(kind: str, n_flat: int, seed: int) -> tuple[np.ndarray, int]:
    """1,000 readings, ``n_flat`` of exactly the level, 3,000 more; and where they resume."""
    rng = np.random.default_rng(seed)

    def noise(n: int) -> np.ndarray:
        e = rng.normal(size=n)
        if kind == "white":
            return 20 + e
        x = np.zeros(n)
        for i in range(1, n):
            x[i] = 0.9 * x[i - 1] + e[i]
        return 20 + 3 * x

    before, after = noise(1000), noise(3000)
    return np.concatenate([before, np.full(n_flat, 20.0), after]), 1000 + n_flat


def after_a_pause(config: LearnerConfig, pauses: tuple[int, ...]) -> None:
    alpha = 1 - config.coverage
    print("\n| sensor | flat readings | Winkler, first 1,000 after | coverage | "
          "Winkler, next 2,000 | coverage |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed, kind in enumerate(("white", "AR(1)")):
        for n_flat in (0, *pauses):
            values, back = paused_sensor(kind, n_flat, seed)
            batch = Batch.from_arrays(["s"] * len(values), 1.7e9 + 60.0 * np.arange(len(values)),
                                      values)
            out, _, _ = run(batch, config)
            made = slice(back - 1, -1)  # each reading's interval: made at the reading before
            y, lo, hi = values[back:], out["lower"][made, 0], out["upper"][made, 0]
            score = (hi - lo) + 2 / alpha * (np.maximum(lo - y, 0) + np.maximum(y - hi, 0))
            inside = (y >= lo) & (y <= hi)
            cells = [f"{score[a:b].mean():.2f} | {inside[a:b].mean():.3f}"
                     for a, b in ((0, 1000), (1000, 3000))]
            print(f"| {kind} | {n_flat or 'never paused'} | " + " | ".join(cells) + " |",
                  flush=True)


def outage_sensor(kind: str, missed: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(times, values): a sensor read every minute for 3,000 readings, then silent for
    ``missed`` readings, then read 1,000 more times (its first one back is index 3,000)."""
    rng = np.random.default_rng(seed)
    n = 4000 + missed
    e = rng.normal(size=n)
    if kind == "white":
        x = e
    elif kind == "random walk":
        x = np.cumsum(e)
    else:
        x = np.zeros(n)
        for i in range(1, n):
            x[i] = 0.9 * x[i - 1] + e[i]
    keep = np.r_[0:3000, 3000 + missed : n]
    return 1.7e9 + 60.0 * keep, 20 + x[keep]


def _late_rows(batch: Batch, out: dict, twin: dict, late: float) -> tuple[np.ndarray, ...]:
    """Per scored reading past warm-up: came more than ``late`` of its sensor's median gaps
    after the one before; flagged; flagged when scored as if on time."""
    ids = np.asarray(batch.sensor_ids, dtype=object)
    cur, nxt, k = _pairs(ids, out["status"])
    dt = batch.ts[nxt] - batch.ts[cur]
    median = {name: np.median(dt[ids[nxt] == name]) for name in np.unique(ids[nxt])}
    ratio = dt / np.array([median[name] for name in ids[nxt]])
    counted = k >= WARMUP
    return ((ratio > late)[counted], out["anomaly"][nxt][counted],
            twin["anomaly"][nxt][counted])


def after_an_outage(config: LearnerConfig, fleets: list[tuple[str, Batch]],
                    quick: bool = False) -> None:
    """Flags on readings that came late, scored as streamer does and as if on time (``quick``:
    random walks missing 100 readings only, 5 of them)."""
    print("\n| sensors | missed readings | first back flagged | flagged if scored on time | "
          "flags / 1k, next 1,000 | if on time |")
    print("| --- | --- | --- | --- | --- | --- |")
    kinds, outages = (("random walk",), (100,)) if quick else (("white", "AR(1)", "random walk"),
                                                               (10, 100, 1000))
    for kind in kinds:
        for missed in outages:
            made = [outage_sensor(kind, missed, seed)
                    for seed in range(5 if quick else OUTAGE_SENSORS)]
            ids = [f"s{s}" for s, (t, _) in enumerate(made) for _ in t]
            ts = np.concatenate([t for t, _ in made])
            order = np.argsort(ts, kind="stable")
            batch = Batch.from_arrays(list(np.asarray(ids)[order]), ts[order],
                                      np.concatenate([v for _, v in made])[order])
            out, twin, _ = run(batch, config, on_time=True)
            back = made[0][0][3000]  # every sensor is back at the same minute
            first, after = batch.ts == back, batch.ts > back
            print(f"| {kind} | {missed:,} | {out['anomaly'][first].mean():.2f} | "
                  f"{twin['anomaly'][first].mean():.2f} | "
                  f"{1000 * out['anomaly'][after].mean():.1f} | "
                  f"{1000 * twin['anomaly'][after].mean():.1f} |", flush=True)
    print(f"\n| fleet | readings over {LATE}x the sensor's median gap after the one before | "
          "flagged | if scored on time | flags / 1k of the others | if on time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, batch in fleets:
        out, twin, _ = run(batch, config, on_time=True)
        late, flagged, on_time = _late_rows(batch, out, twin, LATE)
        if late.any():
            print(f"| {name} | {late.sum():,} | {flagged[late].mean():.3f} | "
                  f"{on_time[late].mean():.3f} | {1000 * flagged[~late].mean():.1f} | "
                  f"{1000 * on_time[~late].mean():.1f} |", flush=True)
        else:
            print(f"| {name} | 0 | | | {1000 * flagged.mean():.1f} | "
                  f"{1000 * on_time.mean():.1f} |", flush=True)


def main() -> None:
    args = fleet_arguments(__doc__)
    torch.set_num_threads(1)
    config = LearnerConfig(device="cpu")
    alpha = 1 - config.coverage
    print(f"coverage target {config.coverage}, anomaly threshold {config.anomaly_threshold}, "
          f"warm-up {WARMUP} readings per sensor; width and Winkler in persistence-MAE units\n")
    print("| fleet | method | coverage | p5 sensor coverage | width | Winkler | "
          + " | ".join(f"flags / 1k at {t}" for t in THRESHOLDS) + " |")
    print("| --- | --- | --- | --- | --- | --- |" + " --- |" * len(THRESHOLDS))
    costs = []
    for name in args.fleets.split(","):
        batch = read_fleet(name, args.data)
        out, twin, first = run(batch, config, shadow=True)
        rows = [("streamer", out["lower"], out["upper"], out["anomaly_score"]),
                ("no integrator", twin["lower"], twin["upper"], None),
                ("running quantile",
                 *running_quantile(batch, out["status"], out["forecasts"], alpha), None)]
        for method, lo, hi, flags in rows:
            e = interval_figures(batch, out["status"], lo, hi, alpha, flags)
            flags = " | ".join("" if np.isnan(x) else f"{x:.1f}" for x in e["flags"])
            print(f"| {name} | {method} | {e['coverage']:.3f} | {e['p5']:.3f} | "
                  f"{e['width']:.2f} | {e['winkler']:.3f} | {flags} |", flush=True)
        with_i, without = [], []
        # A short fleet's replay takes under a second: repeat it until each variant has had
        # about MIN_COST_SECONDS, or one scheduler hiccup decides the comparison.
        for _ in range(max(args.runs, math.ceil(MIN_COST_SECONDS / max(first, 1e-3)))):
            with_i.append(run(batch, config)[2])
            without.append(run(batch, config, intervals=False)[2])
        costs.append((name, len(batch) / min(without), len(batch) / min(with_i)))
    print("\n| fleet | readings/s without intervals | with | change |")
    print("| --- | --- | --- | --- |")
    for name, a, b in costs:
        print(f"| {name} | {a:,.0f} | {b:,.0f} | {100 * (b / a - 1):+.1f} % |")
    after_a_pause(config, PAUSES[2:3] if args.quick else PAUSES)
    after_an_outage(config, [(name, read_fleet(name, args.data))
                             for name in args.fleets.split(",")], args.quick)
    series = aeon_series()
    if not series:
        print("\naeon is not installed (pip install -e .[bench]): no labelled series")
        return
    print("\n| series | readings | labelled windows | " + " | ".join(
        f"flagged at {t} | false / 1k at {t}" for t in THRESHOLDS)
        + " | every window flagged up to | false / 1k there |")
    print("| --- | --- | --- |" + " --- | --- |" * (len(THRESHOLDS) + 1))
    for name, batch, labels in series:
        out, _, _ = run(batch, config, batch_size=64)
        normal = ~labels
        normal[:WARMUP] = False
        cells = []
        for t in THRESHOLDS:
            flagged = out["anomaly_score"] >= t
            hit = sum(bool(flagged[a : b + 1].any()) for a, b in windows(labels))
            cells += [f"{hit}/{len(windows(labels))}", f"{1000 * flagged[normal].mean():.1f}"]
        # The trade-off a user tunes: the highest threshold at which every window is flagged
        # (the least of the windows' top scores) and what it costs in false flags.
        every = min(out["anomaly_score"][a : b + 1].max() for a, b in windows(labels))
        cells += [f"{every:.6f}", f"{1000 * (out['anomaly_score'][normal] >= every).mean():.1f}"]
        print(f"| {name} | {len(batch):,} | {len(windows(labels))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
