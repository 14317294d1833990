"""Crash recovery and partition hand-over, with the real worker and the real local broker."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import torch

from streamer.serving.checkpoint import CheckpointStore
from tests.serving.conftest import forecasts_by_source, reading, wait_for

CRASH_POINTS = [  # (failpoint, how many passes before the crash)
    ("after_step", 3),  # during a micro-batch: stepped, nothing produced
    ("in_update", 4),  # during a truncated-BPTT update: after backward, before the step
    # during a checkpoint write, in the background thread while the loop goes on: the data
    # file written but not synced or renamed, then a manifest half written
    ("checkpoint_data_unsynced", 1),
    ("checkpoint_half_written", 1),
    ("checkpoint_before_manifest", 2),  # data durable, manifest not yet written
    ("after_produce", 5),  # forecasts acknowledged, offsets not committed
]


def _stream(n_sensors: int, n_steps: int, t0: float = 1.7e9, step0: int = 0):
    return [reading(f"s{s}", t0 + 60.0 * t, math.sin(t / 4 + s) * (s + 1) + 0.01 * t)
            for t in range(step0, step0 + n_steps) for s in range(n_sensors)]


def _final_weights(directory: Path, worker: str) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob(f"{worker}-*.json"))
    manifest = json.loads(files[-1].read_text())
    state = torch.load(directory / manifest["data"], weights_only=True)
    return state["model"]


def _applied_everything(worker, directory: Path, end: int) -> bool:
    """Whether ``worker`` (one input partition) has applied every reading up to ``end``: its
    consumer is at the log end, or, before it has a batch to report, the newest readable
    checkpoint it restored from is there already (nothing left to read)."""
    _, text = worker.get("/metrics")
    lags = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("streamer_consumer_lag_records{")]
    if lags:
        return all(lag == 0 for lag in lags)
    for manifest in sorted(directory.glob("*.json"), reverse=True):
        try:  # a manifest a crash left half written is skipped, as the restore skips it
            offsets = json.loads(manifest.read_text())["offsets"]
        except (ValueError, KeyError):
            continue
        return bool(offsets) and all(int(o) >= end for o in offsets.values())
    return False


def test_kill_9_at_six_points_then_restart_matches_an_uninterrupted_run(
        topic_factory, group_id, worker_factory, produce_raw, consume_raw, tmp_path):
    data = _stream(8, 100)
    common = dict(STREAMER_KAFKA__MAX_POLL_RECORDS="37",
                  STREAMER_CHECKPOINT__INTERVAL_READINGS="60",
                  STREAMER_CHECKPOINT__INTERVAL_SECONDS="3600")
    runs = {}
    for name in ("steady", "crashy"):
        inp, out, dlq = topic_factory(1), topic_factory(1), topic_factory(1)
        produce_raw(inp, data)
        runs[name] = (inp, out, dlq, tmp_path / name)

    inp, out, dlq, ckpt = runs["steady"]
    steady = worker_factory(inp, out, dlq, group_id + "-steady", name="steady",
                            STREAMER_CHECKPOINT__DIR=str(ckpt), **common).start()
    wait_for(lambda: steady.metric("streamer_forecasts_produced_total") >= len(data), 60,
             "the uninterrupted run", steady.log)
    steady.signal(signal.SIGTERM)
    assert steady.wait(10) == 0
    expected = {k: v[0]["value"] for k, v in forecasts_by_source(
        consume_raw(out, len(data), timeout_s=10)).items()}

    inp, out, dlq, ckpt = runs["crashy"]
    for point, count in CRASH_POINTS:
        victim = worker_factory(inp, out, dlq, group_id, name="crashy",
                                STREAMER_CHECKPOINT__DIR=str(ckpt),
                                STREAMER_FAILPOINTS=f"{point}:{count}", **common).start()
        assert victim.wait(60) == -signal.SIGKILL, f"{point} never reached\n{victim.log()}"
    last = worker_factory(inp, out, dlq, group_id, name="crashy",
                          STREAMER_CHECKPOINT__DIR=str(ckpt), **common).start()
    got = {}

    def all_forecast() -> bool:
        got.update(forecasts_by_source(consume_raw(out, 10**6, timeout_s=1)))
        return len(got) >= len(data)

    # Every reading forecast is not enough: the victims may have forecast them all, with the
    # last ones not checkpointed yet. Stop the last worker only once it has applied them too
    # (else it stops with its restored, older weights, or is signalled while still starting).
    wait_for(lambda: all_forecast() and _applied_everything(last, ckpt, len(data)), 90,
             "every reading to be forecast and applied", last.log)
    last.signal(signal.SIGTERM)
    assert last.wait(10) == 0
    assert set(got) == set(expected)
    assert consume_raw(dlq, 1, timeout_s=1) == []  # no reading was applied twice
    # The forecast that survived (the last one emitted for a source) equals the steady run's.
    final = np.array([got[k][-1]["value"] for k in sorted(expected)])
    np.testing.assert_allclose(final, [expected[k] for k in sorted(expected)], atol=1e-4)
    steady_w = _final_weights(runs["steady"][3], "steady")
    crashy_w = _final_weights(ckpt, "crashy")
    for name, tensor in steady_w.items():
        torch.testing.assert_close(crashy_w[name], tensor, atol=1e-4, rtol=0)
    restarts = sum(1 for k in got if len(got[k]) > 1)
    assert restarts > 0  # crashes did make the worker re-emit some forecasts


def test_partitions_move_between_two_workers_with_their_sensors_state(
        topic_factory, group_id, worker_factory, produce_raw, consume_raw, tmp_path):
    inp, out, dlq = topic_factory(4), topic_factory(4), topic_factory(1)
    shared = dict(STREAMER_CHECKPOINT__DIR=str(tmp_path / "shared"),
                  STREAMER_TRAINING__WARMUP_READINGS="3")
    a = worker_factory(inp, out, dlq, group_id, name="a", **shared).start()
    b = worker_factory(inp, out, dlq, group_id, name="b", **shared).start()
    a.wait_ready(), b.wait_ready()
    n_sensors, sent, new_sensors = 24, {}, 0

    def phase(step0: int, live: list) -> None:
        records = _stream(n_sensors, 15, step0=step0)
        sent.update(zip(produce_raw(inp, records), records))
        wait_for(lambda: sum(w.metric("streamer_forecasts_produced_total") for w in live)
                 + phase.done >= len(sent), 60, "forecasts", lambda: a.log() + b.log())

    phase.done = 0
    wait_for(lambda: "assigned" in a.log() and "assigned" in b.log(), 30, "both assigned")
    phase(0, [a, b])
    assert b.metric("streamer_sensors_active") > 0 and a.metric("streamer_sensors_active") > 0
    new_sensors += b.metric("streamer_new_sensors_total")
    phase.done += b.metric("streamer_forecasts_produced_total")
    b.signal(signal.SIGTERM)  # b leaves: a takes all four partitions, with b's sensors
    assert b.wait(10) == 0
    phase(15, [a])
    b = worker_factory(inp, out, dlq, group_id, name="b", **shared).start()  # b returns
    wait_for(lambda: "restored" in b.log(), 30, "b to adopt partitions", b.log)
    phase(30, [a, b])
    new_sensors += a.metric("streamer_new_sensors_total") + b.metric("streamer_new_sensors_total")

    got = forecasts_by_source(consume_raw(out, 10**6, timeout_s=2))
    assert set(sent) <= set(got), f"{len(set(sent) - set(got))} readings without a forecast"
    assert consume_raw(dlq, 1, timeout_s=1) == []  # no reading applied twice
    # A sensor whose state did not move with its partition would be created again from scratch
    # by its new owner (a new slot, a new warm-up): every sensor was created exactly once.
    assert new_sensors == n_sensors
    assert CheckpointStore(tmp_path / "shared", "check", "x").has_any()
