"""What sharing weights across a consumer group does to forecast quality (a print-out).

    python -m tests.bench_sharing [--fleets appliances,parking,hourly,daily] [--workers 4]
                                  [--every 256,4096] [--seeds 0,1,2] [--last 0.2] [--ideal]
                                  [--move 0.5]

Each shared fleet is replayed prequentially (every reading, in file order, as
tests/bench_quality.py) three ways:

* **one worker**: one learner sees every sensor (what a single process does today);
* **N workers, not sharing**: the sensors split over N learners the way Kafka's default
  partitioner splits keys over N partitions (murmur2 of the sensor id), each training its own
  weights on its 1/N of the fleet (what a consumer group did before sharing);
* **N workers, sharing**: the same split, and every ``--every`` readings of the whole stream
  each worker takes a checkpoint that is durable at once, and the real ``ModelSharing`` of
  serving/sharing.py publishes and averages exactly as in the worker (whole weights weighted
  by readings trained, what was learned since publishing kept on top). Only the transport is
  in process here: a loopback that hands each published record to every other worker's inbox
  in publish order, instead of the Kafka model topic (tests/serving/test_sharing_workers.py
  runs the same code between real workers on the real broker);
* with ``--ideal``, **N workers sharing perfectly** (``OneWeightSet``): one set of weights and
  one optimizer that every worker's update goes to as it happens, none stale; each worker
  updates when and on what its own learner would (its partition's windows). A reference for
  the rules that combine separately trained weights (they share late), not a bound on them.

With ``--move F`` the group is rebalanced once, after the share F of each fleet: every
partition moves to the next worker, its sensors' state handed over as the worker does
(serving/durability.py), each worker's weights staying where they were, and only the readings
after the move are scored (one worker holds every partition: nothing moves for it). That is
what sharing is for: without it, every sensor is then advanced by weights that never saw it.

With several ``--seeds`` (the model's initial weights, ``LearnerConfig.seed``) every row is
repeated per seed, and a ``mean`` row gives each change as the mean +- standard deviation of
the paired changes (same seed, same fleet): whether a difference outlasts the initialization.

relMAE = mean over sensors of MAE / persistence MAE (``streamer.tools.replay.score``), over
every reading, or with ``--last`` over the latest share of them (where the arrangements stand
once they have learned). Target
(issue 15): sharing within 2 % of one worker, and at least as good as not sharing.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from functools import partial
from pathlib import Path

import numpy as np
import torch
from kafka.partitioner.default import murmur2

from streamer.core import Batch, Learner, LearnerConfig, snapshot
from streamer.core.batch import StepResult, UpdateStats
from streamer.core.learner import (
    MAX_WINDOWS_PER_UPDATE,
    MIN_READY_MAX,
    MIN_READY_PER_SENSORS,
    RAMP_UPDATES,
)
from streamer.kafka.model_topic import ModelRecord
from streamer.serving.sharing import ModelSharing
from streamer.tools.readings_csv import iter_chunks
from streamer.tools.replay import ReplayOutputs, score
from tests.bench_fleets import FLEETS, SHARED, read_fleet
from tests.conftest import unscraped_metrics

BATCH = 256  # readings of the whole stream per round of micro-batches


class Loopback:
    """The model topic's interface, in process: a publish reaches every other worker."""

    def __init__(self, bus: list[Loopback]):
        self.bus, self.inbox, self.failures, self.published = bus, deque(), 0, 0
        self.weights_published = 0
        self.caught_up = True  # no history
        bus.append(self)

    def start(self) -> None:
        pass

    def publish(self, key: bytes, value: bytes | None, headers) -> None:
        self.published += 1
        self.weights_published += value is not None
        for other in self.bus:
            if other is not self:
                now = time.time()  # arrived now, in publish order (no offsets needed)
                other.inbox.append(ModelRecord(key, value, list(headers), now, None, now))

    def received(self) -> list[ModelRecord]:
        out = list(self.inbox)
        self.inbox.clear()
        return out

    def close(self) -> None:
        pass


def partition_of(sensor_ids: list[str], n: int) -> np.ndarray:
    """Kafka's default partitioner: murmur2 of the key, positive, modulo the partitions."""
    return np.array([(murmur2(s.encode()) & 0x7FFFFFFF) % n for s in sensor_ids])


class OneWeightSet(Learner):
    """N workers sharing perfectly: one set of weights and one optimizer that every worker's
    update goes to as it happens, none stale. ``step_as(i, batch)`` is worker i's step on its
    partition's readings, with worker i's own count of readings between updates, its own
    update-size ramp (``Learner._min_ready`` counted on its updates and its sensors), and
    updates that train its partition's queued windows only: when each update runs and which
    windows it trains are exactly those of worker i's own learner (they depend on the stream,
    not on the weights); only the weights they start from are the whole group's."""

    def __init__(self, config: LearnerConfig, partition: dict[str, int], workers: int):
        super().__init__(config)
        self.partition = partition
        self.accepted, self.attempts, self.worker = [0] * workers, [0] * workers, 0

    def step_as(self, worker: int, batch: Batch) -> StepResult:
        self.worker, self.accepted_total = worker, self.accepted[worker]
        result = self.step(batch)
        self.accepted[worker] = self.accepted_total
        return result

    def _slot_partitions(self) -> np.ndarray:
        slot_part = np.full(self.table.capacity, -1)
        for sensor, slot in self.table.items():
            slot_part[slot] = self.partition[sensor]
        return slot_part

    def _min_ready(self) -> int:
        warm = min(self.config.min_update_windows, 1 + self.attempts[self.worker] // RAMP_UPDATES)
        mine = self._slot_partitions() == self.worker
        live = int(np.count_nonzero((self.stats.count > 0) & mine))
        return max(warm, min(MIN_READY_MAX, live // MIN_READY_PER_SENSORS))

    def _train(self, min_ready: int | None = None) -> UpdateStats | None:
        queued = self._slot_partitions()[self.state.queue.slots]
        mine = np.flatnonzero(queued == self.worker)
        if not len(mine) or len(mine) < (self._min_ready() if min_ready is None else min_ready):
            return None
        # This worker's windows first (oldest first), then take exactly them.
        self.state._queue.keep(np.concatenate([mine, np.flatnonzero(queued != self.worker)]))
        self.attempts[self.worker] += 1
        with torch.enable_grad():
            return self.trainer.update(
                self.state.take_queued(min(len(mine), MAX_WINDOWS_PER_UPDATE)))


def run(readings: Batch, config: LearnerConfig, workers: int, every: int | None,
        last: float = 1.0, ideal: bool = False, move: float | None = None) -> float:
    """relMAE of ``workers`` learners over the fleet, sharing every ``every`` readings, scored
    on the ``last`` share of the readings (1: all of them); ``ideal``: one ``OneWeightSet``
    standing for ``workers`` sharing perfectly; ``move``: after that share of the readings
    every partition moves to the next worker (``hand_over``), and only readings after it are
    scored."""
    if ideal and move is not None:
        raise ValueError("one weight set (ideal) has nothing to hand over (move)")
    part = partition_of(readings.sensor_ids, workers)
    owner = list(range(workers))  # the worker holding each partition
    # The move comes just before the readings ``--last 1-F`` would score (the same readings).
    move_at = None if move is None else len(readings) - round((1 - move) * len(readings))
    start = len(readings) - round(last * len(readings))
    if ideal:
        ids = sorted(set(readings.sensor_ids))
        group = OneWeightSet(config, dict(zip(ids, partition_of(ids, workers).tolist())), workers)
        learners, steps, every = [], [partial(group.step_as, i) for i in range(workers)], None
    else:
        learners = [Learner(config) for _ in range(workers)]
        steps = [learner.step for learner in learners]
    bus: list[Loopback] = []
    sharing = [ModelSharing(learner, Loopback(bus), f"w{i}", "bench", 0.0, float("inf"),
                            unscraped_metrics())
               for i, learner in enumerate(learners)] if every else []
    outputs = ReplayOutputs.empty(len(readings), config.n_features)
    fed, since_share, offset = [0] * workers, 0, 0
    for chunk in _cut_at(iter_chunks(readings, BATCH), move_at):
        if move_at is not None and offset >= move_at:
            if len(learners) > 1:  # one worker holds every partition: nothing moves
                owner = hand_over(learners, readings.sensor_ids[:offset], part[:offset], owner)
            start, move_at = max(start, offset), None  # scored from the move on
        rows = np.arange(offset, offset + len(chunk))
        for p, i in enumerate(owner):
            mine = np.flatnonzero(part[rows] == p)
            if len(mine):
                result = steps[i](chunk.take(mine))
                for name in ("status", "forecasts"):
                    getattr(outputs, name)[rows[mine]] = getattr(result, name)
                fed[i] += int((result.status == 0).sum())
        offset += len(chunk)
        since_share += len(chunk)
        if sharing and since_share >= every:
            for i, s in enumerate(sharing):  # a checkpoint each, durable at once
                s.checkpoint_taken()
                s.checkpoint_durable(learners[i].weights(), fed[i])
                fed[i] = 0
            for _ in range(2):  # publish (and average with what came first), then the rest
                for s in sharing:
                    s.tick()
            since_share = 0
    return score(readings.sensor_ids[start:], readings.values[start:], outputs.forecasts[start:],
                 outputs.status[start:]).rel_mae


def _cut_at(chunks, at: int | None):
    """The chunks, the one that spans reading ``at`` cut in two there."""
    offset = 0
    for chunk in chunks:
        k = -1 if at is None else at - offset
        if 0 < k < len(chunk):
            yield chunk.take(np.arange(k))
            yield chunk.take(np.arange(k, len(chunk)))
        else:
            yield chunk
        offset += len(chunk)


def hand_over(learners: list[Learner], seen_ids: list[str], seen_part: np.ndarray,
              owner: list[int]) -> list[int]:
    """Every partition moves to the next worker, as in the worker's hand-over
    (serving/durability.py): the new owner imports its sensors' state from the old owner's
    snapshot, the old owner drops them; the weights stay where they were. The new owners."""
    moved = [(p, owner[p], owner[(p + 1) % len(owner)]) for p in range(len(owner))]
    snapshots = [learner.snapshot() for learner in learners]
    ids = {p: sorted({s for s, q in zip(seen_ids, seen_part) if q == p}) for p, _, _ in moved}
    exported = {p: snapshot.sensors_of(snapshots[old], ids[p]) for p, old, _ in moved}
    for p, old, _ in moved:
        learners[old].drop_sensors(ids[p])
    for p, _, new in moved:
        learners[new].import_sensors(exported[p])
    return [new for _, _, new in moved]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED.resolve())
    parser.add_argument("--fleets", default=",".join(FLEETS))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--every", default="256,4096", help="readings between sharing rounds")
    parser.add_argument("--seeds", default="0", help="model seeds (LearnerConfig.seed): with "
                        "several, a row per seed and their mean, and each paired difference's "
                        "mean +- standard deviation over the seeds")
    parser.add_argument("--limit", type=int, default=None, help="first N readings per fleet")
    parser.add_argument("--last", type=float, default=1.0, help="score only this share of "
                        "each fleet's readings, the latest (0.2: how each arrangement forecasts "
                        "once it has learned)")
    parser.add_argument("--ideal", action="store_true", help="add a column: N workers "
                        "sharing perfectly (OneWeightSet: every update on one weight set)")
    parser.add_argument("--move", type=float, default=None, help="after this share of each "
                        "fleet every partition moves to the next worker (its sensors' state "
                        "handed over, the weights staying), and only later readings are scored")
    args = parser.parse_args()
    if args.move is not None and args.ideal:
        parser.error("--move and --ideal together: one weight set has nothing to hand over")
    torch.set_num_threads(1)
    every = [int(x) for x in args.every.split(",") if x]
    seeds = [int(x) for x in args.seeds.split(",") if x]
    n = args.workers
    heads = [f"{n} sharing every {e:,}" for e in every] + [f"{n} ideal"] * args.ideal
    head = " | ".join(f"{h} (vs one; vs not sharing)" for h in heads)
    print(f"| fleet | seed | readings | one worker | {n} not sharing | {head} |")
    print("| --- | --- | ---: | ---: | ---: |" + " ---: |" * len(heads), flush=True)
    for name in args.fleets.split(","):
        readings = read_fleet(name, args.data)
        if args.limit:
            readings = readings.take(np.arange(min(args.limit, len(readings))))
        rows = []  # per seed: one, apart, then sharing at each interval
        for seed in seeds:
            config = LearnerConfig(device="cpu", seed=seed)
            rows.append([run(readings, config, 1, None, args.last, move=args.move),
                         run(readings, config, n, None, args.last, move=args.move)]
                        + [run(readings, config, n, e, args.last, move=args.move)
                           for e in every]
                        + ([run(readings, config, n, None, args.last, ideal=True)]
                           if args.ideal else []))
            print(_row(name, str(seed), len(readings), rows[-1]), flush=True)
        if len(seeds) > 1:
            print(_row(name, "mean", len(readings), list(np.mean(rows, axis=0)), rows),
                  flush=True)
    return 0


def _row(fleet: str, seed: str, count: int, scores: list[float],
         per_seed: list[list[float]] | None = None) -> str:
    """A table row; with ``per_seed``, each change is the mean +- sd of the paired changes."""
    one, apart, *shared = scores
    cells = []
    for k, value in enumerate(shared, start=2):
        if per_seed is None:
            cells.append(f"{value:.4f} ({(value / one - 1) * 100:+.1f} %; "
                         f"{(value / apart - 1) * 100:+.1f} %)")
            continue
        rows = np.asarray(per_seed)
        vs_one, vs_apart = (rows[:, k] / rows[:, 0] - 1) * 100, (rows[:, k] / rows[:, 1] - 1) * 100
        cells.append(f"{value:.4f} ({vs_one.mean():+.1f} +- {vs_one.std(ddof=1):.1f} %; "
                     f"{vs_apart.mean():+.1f} +- {vs_apart.std(ddof=1):.1f} %)")
    return f"| {fleet} | {seed} | {count:,} | {one:.4f} | {apart:.4f} | {' | '.join(cells)} |"


if __name__ == "__main__":
    raise SystemExit(main())
