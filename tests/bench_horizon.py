"""Multi-step forecasts against baselines (a print-out, not a test):
python -m tests.bench_horizon

On the four shared fleets (../shared/datasets), streamer's default learner with a horizon of 12
readings (7 on the daily fleet) is replayed once (prequential, every reading in file order,
batches of 2,048). Each step k's forecast is scored against the sensor's k-th next reading
(streamer/tools/horizon_eval.py), once the target is a week past the sensor's first reading, against
three baselines on the same (forecast, reading) pairs, each one method for every sensor:

* **persistence**: the reading the forecast was made at (h-step persistence);
* **day** / **week**: time-based seasonal naive, the sensor's reading nearest in time to one
  day / one week before the time the step's reading is expected (the forecast's target_ts),
  among the readings known when the forecast was made.

relMAE = mean over sensors of MAE / the baseline's MAE (below 1 beats it). Also shown: against
each sensor's better seasonal naive of the two ("seasonal"), the same told the actual time of
the reading ("actual time", which no forecaster has for a sensor with gaps), and the coverage
of each step's interval (target 0.9), over all its readings and over those whose k steps span
a gap of over 3 typical gaps (a night, an outage). Targets (issue 14): below every baseline
at every step on every fleet, and on average over the steps at least 10 % below the best
baseline (max of the three relMAEs per step).

Method: the horizon's experts (streamer/core/horizon.py) against a feedback rollout of the
LSTM: at sampled points of the replay, a copy of the whole learner is fed its own step-1
forecast as the next reading (at the same expected time) H - 1 times, training off; both
forecasts from the same readings, scored on the same targets (relMAE of the rollout over the
horizon's, per step).

Cost: replay readings per CPU second with the horizon against a horizon of 1, best of
``--runs`` each, interleaved.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import numpy as np
import torch

from streamer.core import Batch, Learner, LearnerConfig
from streamer.tools.horizon_eval import format_steps, score_steps
from streamer.tools.readings_csv import iter_chunks
from streamer.tools.replay import backtest
from tests.bench_fleets import fleet_arguments, read_fleet

MIN_COST_SECONDS = 5.0
ROLLOUT_POINTS = 12  # replay positions at which every sensor's horizon is rolled out


def horizon_of(name: str) -> int:
    return 7 if name == "daily" else 12


def cpu_seconds(batch: Batch, config: LearnerConfig) -> float:
    started = time.process_time()
    backtest(batch, config)
    return time.process_time() - started


def rollout_comparison(batch: Batch, config: LearnerConfig) -> np.ndarray:
    """(H,) relMAE of a feedback rollout over the horizon's experts, per step, at
    ``ROLLOUT_POINTS`` positions of the replay (every sensor's last reading before each)."""
    h = config.horizon
    learner = Learner(config)
    chunks = list(iter_chunks(batch, 2048))
    points = set(np.linspace(len(chunks) // 4, len(chunks) - 2, ROLLOUT_POINTS).astype(int))
    ids = np.asarray(batch.sensor_ids)
    errors = []  # (sensor, step, rollout error, horizon error)
    offset = 0
    for c, chunk in enumerate(chunks):
        result = learner.step(chunk)
        offset += len(chunk)
        if c not in points or result.horizon is None:
            continue
        last = {}  # each sensor's last accepted reading in this chunk
        for i in np.flatnonzero(result.status == 0).tolist():
            last[chunk.sensor_ids[i]] = i
        sensors, rows = list(last), np.array(list(last.values()))
        ours = result.horizon.forecast[rows]  # (S, H, F)
        when = result.horizon.target_ts[rows]  # (S, H)
        if not np.isfinite(when).all():
            continue
        twin = copy.deepcopy(learner)
        twin.config = dataclasses.replace(twin.config, train_every=10**12)  # serve only
        rolled = [result.forecasts[rows]]
        for k in range(1, h):
            fed = twin.step(Batch.from_arrays(sensors, when[:, k - 1], rolled[-1]))
            rolled.append(np.where(fed.status[:, None] == 0, fed.forecasts, np.nan))
        rolled = np.stack(rolled, axis=1)  # (S, H, F)
        for s, sensor in enumerate(sensors):
            future = np.flatnonzero(ids[offset:] == sensor)[:h] + offset
            for k, row in enumerate(future.tolist()):
                truth = batch.values[row]
                errors.append((s, k, np.abs(rolled[s, k] - truth).mean(),
                               np.abs(ours[s, k] - truth).mean()))
    table = np.array(errors).reshape(-1, 4)
    out = np.full(h, np.nan)
    for k in range(h):
        part = table[table[:, 1] == k]
        ok = np.isfinite(part[:, 2])
        if ok.any():
            out[k] = part[ok, 2].sum() / part[ok, 3].sum()
    return out


def main() -> None:
    args = fleet_arguments(__doc__)
    torch.set_num_threads(1)
    summary, costs, rollouts = [], [], []
    for name in args.fleets.split(","):
        batch = read_fleet(name, args.data)
        config = LearnerConfig(device="cpu", horizon=horizon_of(name))
        outputs, _ = backtest(batch, config)
        steps = score_steps(batch.sensor_ids, batch.ts, batch.values, outputs.status,
                            outputs.horizon)
        print(f"## {name}: horizon {config.horizon}\n\n{format_steps(steps)}\n", flush=True)
        below = all(max(s.vs_persistence, s.vs_day, s.vs_week, s.vs_seasonal) < 1
                    for s in steps)
        average = float(np.mean([s.vs_better for s in steps]))
        coverage = float(np.mean([s.coverage for s in steps]))
        across = float(np.nanmean([s.coverage_across_gaps for s in steps])
                       if any(s.pairs_across_gaps for s in steps) else np.nan)
        summary.append((name, config.horizon, below, average, coverage, across))
        rollouts.append((name, rollout_comparison(batch, config)))
        one = dataclasses.replace(config, horizon=1)
        first = cpu_seconds(batch, config)
        with_h, without = [first], [cpu_seconds(batch, one)]
        for _ in range(max(args.runs, math.ceil(MIN_COST_SECONDS / max(first, 1e-3))) - 1):
            with_h.append(cpu_seconds(batch, config))
            without.append(cpu_seconds(batch, one))
        costs.append((name, len(batch) / min(without), len(batch) / min(with_h)))
    print("| fleet | H | below every baseline at every step | mean relMAE vs the best baseline "
          "(target <= 0.90) | mean step coverage | across gaps |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, h, below, average, coverage, across in summary:
        print(f"| {name} | {h} | {'yes' if below else 'NO'} | {average:.3f} | {coverage:.3f} "
              f"| {across:.3f} |")
    print("\n| fleet | feedback rollout's MAE / the horizon's, steps 2..H |")
    print("| --- | --- |")
    for name, ratio in rollouts:
        print(f"| {name} | " + " ".join(f"{x:.2f}" for x in ratio[1:]) + " |")
    print("\n| fleet | readings/s at H = 1 | at H | ratio (target >= 0.5) |")
    print("| --- | --- | --- | --- |")
    for name, a, b in costs:
        print(f"| {name} | {a:,.0f} | {b:,.0f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
