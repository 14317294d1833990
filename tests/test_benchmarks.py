"""The benchmark scripts keep running: smoke runs of each, their figures are not judged here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout_s: float) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _row(out: str, first_cell: str) -> list[str]:
    rows = [line for line in out.splitlines() if line.startswith(f"| {first_cell} |")]
    assert rows, f"no table row for {first_cell!r} in:\n{out[-2000:]}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def _number(cell: str) -> float:
    return float(re.sub(r"[^0-9.]", "", cell.split()[0]))


def test_core_benchmark_quick_run_reports_step_and_update_figures() -> None:
    out = _run("tests/bench_core.py", "--quick", "--threads", "1", "--device", "cpu",
               timeout_s=120)
    row = _row(out, "cpu")
    assert _number(row[3]) > 0 and _number(row[4]) > 0  # step readings/s, without and with training
    assert "update / raw LSTM" in out


def test_intervals_benchmark_quick_run_compares_streamer_with_both_baselines() -> None:
    out = _run("-m", "tests.bench_intervals", "--quick", timeout_s=240)
    rows = {method: _row(out, f"sample | {method}") for method in
            ("streamer", "no integrator", "running quantile")}
    for cells in rows.values():
        assert 0.5 < _number(cells[2]) <= 1.0 and _number(cells[5]) > 0  # coverage, Winkler
    assert "readings/s without intervals" in out
    assert "| white | never paused |" in out and "| AR(1) | 10000 |" in out
    back = _row(out, "random walk | 100")  # first readings back after an outage: flagged
    assert 0.0 <= _number(back[2]) <= 1.0 and 0.0 <= _number(back[3]) <= 1.0


def test_sharing_benchmark_quick_run_averages_its_seeds() -> None:
    out = _run("-m", "tests.bench_sharing", "--fleets", "sample", "--limit", "3000",
               "--seeds", "0,1", "--every", "512", "--ideal", timeout_s=240)
    seeds = [_row(out, f"sample | {seed}") for seed in ("0", "1", "mean")]
    for cells in seeds:  # relMAE of one worker, of 4 not sharing, of 4 sharing, of the ideal
        assert all(0.1 < _number(cells[k]) < 2.0 for k in (3, 4, 5, 6))
    for k in (3, 4, 5, 6):
        assert _number(seeds[2][k]) == pytest.approx(
            (_number(seeds[0][k]) + _number(seeds[1][k])) / 2, abs=1e-4)
    assert "+-" in seeds[2][5]  # the paired change's spread over the seeds
    moved = _run("-m", "tests.bench_sharing", "--fleets", "sample", "--limit", "3000",
                 "--every", "512", "--move", "0.5", timeout_s=240)
    assert all(0.1 < _number(cell) < 2.0 for cell in _row(moved, "sample | 0")[3:6])


def test_chaos_script_quick_run_loses_nothing_on_either_client() -> None:
    out = _run("-m", "tests.chaos_kills", "--kills", "3", "--steps", "300", timeout_s=400)
    for client in ("kafka-python", "confluent"):
        (line,) = [x for x in out.splitlines() if x.startswith(f"{client}: ")]
        assert line.startswith(f"{client}: OK") and "missing 0" in line, line


def test_horizon_benchmark_quick_run_scores_every_step_the_rollout_and_the_cost() -> None:
    out = _run("-m", "tests.bench_horizon", "--quick", timeout_s=240)
    # The summary: fleet, H, below, mean vs best, coverage, coverage across gaps (none here).
    row = _row(out, "sample")
    assert row[1] == "12" and 0.3 < _number(row[3]) < 1.5 and 0.5 < _number(row[4]) <= 1.0
    assert len(row) == 6 and row[5] == "nan"
    assert "feedback rollout's MAE" in out and "readings/s at H = 1" in out


def test_kinds_benchmark_quick_run_compares_every_kind_with_the_simple_forecasters() -> None:
    out = _run("-m", "tests.bench_kinds", "--sensors", "1", "--readings", "400", "--skip",
               "100", timeout_s=300)
    for kind in ("white noise", "random walk", "clean daily cycle"):
        row = _row(out, kind)
        assert len(row) == 7 and all(_number(cell) > 0 for cell in row[1:]), row


def test_level_shift_benchmark_quick_run_prints_both_runs_of_four_sensors() -> None:
    out = _run("-m", "tests.bench_level_shift", "--fleets", "sample", timeout_s=240)
    rows = [line for line in out.splitlines() if line.startswith("| sample |")]
    assert [row.split("|")[3].strip() for row in rows] == ["as it is", "shifted"] * 4, out
    assert all(np.isfinite(_number(row.split("|")[4])) for row in rows), out


@pytest.mark.broker
@pytest.mark.timeout(450)  # its script may take 400 s; pyproject's 300 s would cut it first
def test_e2e_benchmark_quick_run_drains_the_backlog_through_streamer_and_ceiling(broker) -> None:
    # ``broker`` only proves the local broker is installed; the script starts its own.
    out = _run("tests/bench_e2e.py", "--quick", "--sensors", "100", timeout_s=400)
    for client in ("kafka-python", "confluent"):  # both backends in one run
        row = _row(out, f"{client} | 100")
        assert _number(row[2]) > 0 and _number(row[3]) > 0  # streamer, ceiling readings/s
        assert "timed out" not in row[4]  # both drained the whole backlog
        assert _number(row[6]) > 0  # the pipelined ceiling drained it too
    assert "bench threads all stopped: True" in out


@pytest.mark.broker
def test_checkpoint_benchmark_quick_run_times_all_three_modes_and_the_live_worker(broker) -> None:
    out = _run("-m", "tests.bench_checkpoint", "--sensors", "300", "--seconds", "11",
               "--rounds", "1", "--live-sensors", "300", "--live-rate", "200",
               "--live-seconds", "12", timeout_s=280)
    rows = {mode: _row(out, f"300 | {mode}") for mode in ("none", "async", "sync")}
    assert _number(rows["none"][2]) > 0 and rows["none"][6] == "0"  # readings/s, checkpoints
    for mode in ("async", "sync"):
        assert _number(rows[mode][6]) >= 1 and _number(rows[mode][10]) > 0  # taken, bytes/sensor
        assert _number(rows[mode][4]) > 0  # serving-thread CPU per reading
    live = _row(out, "checkpoints every 10 s")
    assert _number(live[4]) > 0 and _number(live[6]) >= 1  # p99 ms; checkpoints taken
    assert _number(_row(out, "checkpoints off")[6]) == 0
    ceiling = _row(out, "IO ceiling (no model)")
    assert _number(ceiling[4]) > 0 and ceiling[7] == "-"  # p99 ms; no checkpoint stall


def test_the_ideal_sharing_updates_when_and_on_what_each_worker_would_on_one_weight_set() -> None:
    from streamer.core import Learner, LearnerConfig
    from streamer.tools.readings_csv import iter_chunks
    from tests.bench_fleets import read_fleet
    from tests.bench_sharing import OneWeightSet, partition_of

    readings = read_fleet("sample", Path()).take(np.arange(8000))
    ids = sorted(set(readings.sensor_ids))
    partition = dict(zip(ids, partition_of(ids, 4).tolist()))
    # Short windows and frequent triggers: over a hundred updates per worker, so that the ramp
    # makes them wait for more windows than one trigger finds.
    config = LearnerConfig(device="cpu", train_every=8, tbptt_steps=2)
    group, workers = OneWeightSet(config, partition, 4), [Learner(config) for _ in range(4)]

    def recording(learner: Learner, log: list[tuple[int, ...]]) -> None:
        update = learner.trainer.update

        def record(windows):
            sensor = {slot: s for s, slot in learner.table.items()}
            log.append(tuple(sorted(partition[sensor[s]] for s in windows.slots.tolist())))
            return update(windows)

        learner.trainer.update = record

    ideal: list[tuple[int, ...]] = []
    apart: list[list[tuple[int, ...]]] = [[] for _ in workers]
    recording(group, ideal)
    for worker, log in zip(workers, apart):
        recording(worker, log)
    part = partition_of(readings.sensor_ids, 4)
    offset = 0
    for chunk in iter_chunks(readings, 256):
        for i, worker in enumerate(workers):
            mine = np.flatnonzero(part[offset:offset + len(chunk)] == i)
            group.step_as(i, chunk.take(mine))
            worker.step(chunk.take(mine))
        offset += len(chunk)
    # Every update of the ideal is one worker's, with that worker's windows, in its order.
    for i, log in enumerate(apart):
        assert log and [u for u in ideal if u[0] == i] == log
    assert sorted(ideal) == sorted(u for log in apart for u in log)


def test_a_benchmark_rebalance_hands_each_partitions_sensor_state_to_the_next_worker() -> None:
    from streamer.core import Learner, LearnerConfig, snapshot
    from tests.bench_fleets import read_fleet
    from tests.bench_sharing import hand_over, partition_of

    readings = read_fleet("sample", Path()).take(np.arange(3000))
    part = partition_of(readings.sensor_ids, 4)
    learners = [Learner(LearnerConfig(device="cpu")) for _ in range(4)]
    for i, learner in enumerate(learners):
        learner.step(readings.take(np.flatnonzero(part == i)))
    before = [learner.snapshot() for learner in learners]
    weights = [learner.weights() for learner in learners]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # trained

    owner = hand_over(learners, readings.sensor_ids, part, [0, 1, 2, 3])

    assert owner == [1, 2, 3, 0]
    for p, new in enumerate(owner):
        ids = sorted({s for s, q in zip(readings.sensor_ids, part) if q == p})
        assert sorted(s for s, _ in learners[new].table.items()) == ids
        held = snapshot.sensors_of(learners[new].snapshot(), ids)
        sent = snapshot.sensors_of(before[p], ids)
        assert held["ids"] == sent["ids"]
        for kind in (*snapshot.PER_SENSOR_PARTS, "slot_tensors"):
            for name, rows in sent[kind].items():
                torch.testing.assert_close(held[kind][name], rows, rtol=0, atol=0,
                                           equal_nan=True, msg=f"{kind}.{name}")
        assert torch.equal(held["seen"], sent["seen"]) and torch.equal(held["short"], sent["short"])
        assert all(torch.equal(learners[new].weights()[k], weights[new][k])
                   for k in weights[new])  # the weights stay with their worker


def test_with_equal_untrained_weights_a_benchmark_rebalance_changes_no_forecast() -> None:
    # Four workers that never train hold the same weights, so moving every partition to the
    # next worker must leave every forecast as it was: the hand-over and the routing after it
    # lose nothing of a sensor's state.
    from streamer.core import LearnerConfig
    from tests.bench_fleets import read_fleet
    from tests.bench_sharing import run

    readings = read_fleet("sample", Path()).take(np.arange(3072))  # halfway: a chunk boundary
    config = LearnerConfig(device="cpu", train_every=10**9)
    assert run(readings, config, 4, None, move=0.5) == run(readings, config, 4, None, last=0.5)
