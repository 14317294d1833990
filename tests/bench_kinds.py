"""Sensor kinds against simple forecasters (a print-out, not a test): python -m tests.bench_kinds

The shared fleets are four; users' fleets hold other kinds of sensor. Each kind here is a
textbook process with a known best forecaster: noise around a level (the running mean is best),
counts, autoregressions around a set point, random walks (persistence is best), ramps,
quantized and sawtooth readings, spikes, a clean daily cycle. ``--sensors`` sensors of each
kind, every 10 minutes for ``--readings`` readings, are replayed as one fleet by the default
learner; every simple forecaster runs over the same readings in the same script:

- persistence (the unit: relMAE = MAE / persistence's MAE);
- the running mean of every reading so far;
- simple exponential smoothing (weight 0.3 on the newest reading);
- drift (the last reading plus the mean change so far).

Scored on each sensor's readings after the first ``--skip`` (warm-up), the mean over a kind's
sensors; ``best simple`` is the best of the four per kind (persistence's is 1), and the last
column the streamer's relMAE over it (< 1: ahead of every simple forecaster). ``--seeds``
repeats with other data and prints the mean over the seeds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from streamer.core import Batch, LearnerConfig
from streamer.tools.replay import replay

GAP = 600.0
START = 1.7e9
SIMPLE = ("running mean", "smoothing 0.3", "drift")


def _ar1(rng: np.random.Generator, n: int, phi: float, sd: float = 1.0) -> np.ndarray:
    x, noise = np.zeros(n), rng.normal(0.0, sd, n)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + noise[t]
    return x


def kinds(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """One sensor's readings of every kind (the order of the table)."""
    step = np.arange(n)
    day = 2.0 * np.pi * (START + GAP * step) / 86_400.0
    volatility = np.exp(_ar1(rng, n, 0.99, 0.1))
    return {
        "white noise": 20.0 + rng.normal(0.0, 1.0, n),
        "counts (mean 2)": rng.poisson(2.0, n).astype(float),
        "sparse counts (mean 0.1)": rng.poisson(0.1, n).astype(float),
        "AR(1) 0.5": 10.0 + _ar1(rng, n, 0.5),
        "AR(1) -0.5": 10.0 + _ar1(rng, n, -0.5),
        "AR(1) 0.9": 10.0 + _ar1(rng, n, 0.9),
        "random walk": np.cumsum(rng.normal(0.0, 1.0, n)),
        "random walk, volatility clusters": np.cumsum(rng.normal(0.0, 0.01, n) * volatility),
        "ramp + noise": 0.01 * step + rng.normal(0.0, 0.05, n),
        "quantized daily temperature": np.round(20.0 + 3.0 * np.sin(day)
                                                + _ar1(rng, n, 0.98, 0.1)),
        "sawtooth counter": np.mod(np.cumsum(rng.uniform(0.0, 2.0, n)), 144.0),
        "oscillation (7.3 readings)": 5.0 * np.sin(step * 2.0 * np.pi / 7.3)
        + rng.normal(0.0, 0.5, n),
        "spikes on noise": 5.0 + rng.normal(0.0, 0.1, n)
        + (rng.random(n) < 0.02) * rng.normal(0.0, 10.0, n),
        "clean daily cycle": 10.0 + 5.0 * np.sin(day) + rng.normal(0.0, 0.1, n),
    }


def simple_forecasts(x: np.ndarray) -> dict[str, np.ndarray]:
    """Each simple forecaster's forecast made at every reading of ``x`` for the next one."""
    count = np.arange(1, len(x) + 1)
    smoothed = np.empty(len(x))
    smoothed[0] = x[0]
    for t in range(1, len(x)):
        smoothed[t] = 0.7 * smoothed[t - 1] + 0.3 * x[t]
    mean_change = np.concatenate([[0.0], (x[1:] - x[0]) / count[:-1]])
    return {"running mean": np.cumsum(x) / count, "smoothing 0.3": smoothed,
            "drift": x + mean_change}


def rel_mae(forecast: np.ndarray, x: np.ndarray, skip: int) -> float:
    """MAE of the forecasts made at readings ``skip``.. over persistence's on the same."""
    miss = np.abs(forecast[skip:-1] - x[skip + 1 :]).sum()
    return float(miss / np.abs(np.diff(x[skip:])).sum())


def run(seed: int, sensors: int, n: int, skip: int) -> dict[str, dict[str, float]]:
    """relMAE per kind (mean over its sensors) of the streamer and of each simple forecaster."""
    rng = np.random.default_rng(seed)
    series = [kinds(rng, n) for _ in range(sensors)]
    names = list(series[0])
    ids = [f"{name}#{i}" for i in range(sensors) for name in names]
    values = np.stack([series[i][name] for i in range(sensors) for name in names], axis=1)
    ts = START + GAP * np.arange(n)
    batch = Batch.from_arrays(np.tile(ids, n).tolist(), np.repeat(ts, len(ids)), values.ravel())
    forecasts, status, _ = replay(batch, LearnerConfig())
    assert (status == 0).all()
    mine = forecasts[:, 0].reshape(n, len(ids))
    out: dict[str, dict[str, float]] = {name: {} for name in names}
    for name in names:
        cols = [ids.index(f"{name}#{i}") for i in range(sensors)]
        out[name]["streamer"] = float(np.mean([rel_mae(mine[:, c], values[:, c], skip)
                                               for c in cols]))
        simple = [simple_forecasts(values[:, c]) for c in cols]
        for method in SIMPLE:
            out[name][method] = float(np.mean([rel_mae(s[method], values[:, c], skip)
                                               for s, c in zip(simple, cols)]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated data seeds")
    parser.add_argument("--sensors", type=int, default=3, help="sensors of each kind")
    parser.add_argument("--readings", type=int, default=4000, help="readings per sensor")
    parser.add_argument("--skip", type=int, default=200, help="warm-up readings not scored")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    runs = [run(seed, args.sensors, args.readings, args.skip) for seed in seeds]
    print(f"seeds {args.seeds}, {args.sensors} sensors of each kind, {args.readings:,} readings "
          f"each ({time.perf_counter() - started:.0f} s)\n")
    print("| kind | streamer | " + " | ".join(SIMPLE) + " | best simple | streamer / best |")
    print("| --- | ---: | " + " | ".join("---:" for _ in SIMPLE) + " | ---: | ---: |")
    for name in runs[0]:
        mean = {m: float(np.mean([r[name][m] for r in runs])) for m in ("streamer", *SIMPLE)}
        best = min(1.0, *(mean[m] for m in SIMPLE))  # persistence's is 1
        print(f"| {name} | {mean['streamer']:.3f} | "
              + " | ".join(f"{mean[m]:.3f}" for m in SIMPLE)
              + f" | {best:.3f} | {mean['streamer'] / best:.3f} |", flush=True)


if __name__ == "__main__":
    main()
