"""The checkpoint store: atomic, verified, pruned, and falling back past damaged files."""

from __future__ import annotations

import dataclasses
import errno
import gc
import hashlib
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from streamer.core import Batch, Learner, LearnerConfig
from streamer.core import snapshot as snap
from streamer.core.experts import EXPERTS
from streamer.core.horizon import HORIZON_EXPERTS
from streamer.core.intervals import (
    BUCKET_SHIFT,
    LATE_SHIFT,
    MAX_PROFILE_WEIGHT,
    MAX_SPREAD,
    MAX_SPREAD_WEIGHT,
    SPREAD_STEPS,
    TAIL_LOG_STEP,
    WEIGHT_STEPS,
    level_weights,
)
from streamer.serving.checkpoint import ORPHAN_AGE_S, CheckpointStore, _HashingWriter
from streamer.serving.checkpoint_writer import WRITER_NICENESS, CheckpointWriter
from tests.conftest import unscraped_metrics
from tests.core.conftest import sine_fleet

CFG = LearnerConfig(hidden_size=8, tbptt_steps=4, train_every=10, initial_capacity=4,
                    warmup_readings=2, device="cpu")
TP = ("readings", 0)


def _learner(steps: int) -> Learner:
    learner = Learner(CFG)
    learner.step(sine_fleet(5, steps, seed=1))
    return learner


def _files(directory) -> set[str]:
    """The checkpoint files (not the workers' lock files: _WorkerLock)."""
    return {p.name for p in directory.iterdir() if not p.name.endswith(".lock")}


def _save(store: CheckpointStore, learner: Learner, offset: int):
    return store.save(learner.snapshot(), {TP: offset}, {TP: ["s0", "s1", "s2", "s3", "s4"]})


class _SlowWriter(CheckpointWriter):
    """Writes half a second after it was begun: what the serving thread does meanwhile (or the
    clock) is after the state the checkpoint holds."""

    def _write(self, *args):
        time.sleep(0.5)
        return super()._write(*args)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["table"] == b["table"] and a["counters"] == b["counters"]
    for group in ("model", "stats", "memory", "slot_tensors", "queue"):
        for name, tensor in a[group].items():
            torch.testing.assert_close(tensor, b[group][name], rtol=0, atol=0, equal_nan=True,
                                       msg=f"{group}.{name}")  # profiles hold NaN: never filled
    assert torch.equal(a["seen"], b["seen"])


def test_restored_state_equals_the_checkpoint_bitwise(tmp_path):
    store = CheckpointStore(tmp_path, "w1", CFG.fingerprint())
    learner = _learner(20)
    _save(store, learner, 100)
    found = store.latest()
    assert found.offsets == {TP: 100} and found.sensors[TP] == ["s0", "s1", "s2", "s3", "s4"]
    restored = Learner.restore(found.state, CFG)
    _assert_same_state(learner.snapshot(), restored.snapshot())


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    store = CheckpointStore(tmp_path, "w1", CFG.fingerprint(), keep=2)
    learner = _learner(4)
    for offset in (10, 20, 30):
        _save(store, learner, offset)
    assert sorted(_files(tmp_path)) == [
        "w1-0000000002.ckpt", "w1-0000000002.json", "w1-0000000003.ckpt", "w1-0000000003.json"]
    assert CheckpointStore(tmp_path, "w1", CFG.fingerprint()).latest().offsets == {TP: 30}


@pytest.mark.parametrize("damage", ["truncate", "flip_one_byte"])
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_used(tmp_path, caplog, damage):
    store = CheckpointStore(tmp_path, "w1", CFG.fingerprint())
    _save(store, _learner(4), 10)
    newest = _save(store, _learner(8), 20).path
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0x01
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR):
        found = store.latest()
    assert found.offsets == {TP: 10}
    assert "w1-0000000002.json unusable" in caplog.text and "checksum mismatch" in caplog.text


def test_a_worker_prefers_its_own_checkpoint_and_reads_each_unusable_one_once(tmp_path, caplog):
    # Start-up looked for its own, then for anyone's, and read (and reported) its own
    # unusable checkpoints twice.
    CheckpointStore(tmp_path, "w2", CFG.fingerprint()).save(  # newer, but another worker's
        _learner(4).snapshot(), {TP: 30}, {TP: []}, created=time.time() + 3600)
    mine = CheckpointStore(tmp_path, "w1", CFG.fingerprint())
    _save(mine, _learner(4), 10)
    damaged = _save(mine, _learner(4), 20).path
    damaged.write_bytes(damaged.read_bytes()[:100])
    with caplog.at_level(logging.ERROR):
        assert mine.latest(prefer="w1").offsets == {TP: 10}
        assert mine.latest(prefer="w9").offsets == {TP: 30}  # none of its own: the newest
    assert caplog.text.count("w1-0000000002.json unusable") == 1
    (tmp_path / "w1-0000000001.ckpt").write_bytes(b"")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert mine.latest(prefer="w1").offsets == {TP: 30}  # none of its own usable: anyone's
    assert caplog.text.count("w1-0000000001.json unusable") == 1
    assert caplog.text.count("w1-0000000002.json unusable") == 1


def test_a_damaged_manifest_is_reported_once_and_the_previous_checkpoint_used(tmp_path, caplog):
    # It was skipped without a word, where a damaged data file is reported.
    store = CheckpointStore(tmp_path, "w1", CFG.fingerprint())
    _save(store, _learner(4), 10)
    _save(store, _learner(8), 20).path.with_suffix(".json").write_text("{not json")
    with caplog.at_level(logging.ERROR):
        assert store.latest().offsets == {TP: 10}
        assert store.latest().offsets == {TP: 10}
    assert caplog.text.count("checkpoint manifest w1-0000000002.json unreadable") == 1


@pytest.mark.parametrize(("field", "value", "said"), [
    ("offsets", {"t:0": "abc"}, "offsets: t:0: 'abc' is not an offset"),
    ("offsets", {"t:0": None}, "offsets: t:0: None is not an offset"),
    ("offsets", {"t:0": -5}, "offsets: t:0: -5 is not an offset"),
    ("offsets", {"t:0": 1.5}, "offsets: t:0: 1.5 is not an offset"),
    ("offsets", {"t:0": True}, "offsets: t:0: True is not an offset"),
    ("offsets", {"t": 3}, "offsets: 't' is not topic:partition"),
    ("offsets", 7, "offsets: an object of topic:partition to offset, not 7"),
    ("offsets", None, "offsets: an object of topic:partition to offset, not None"),
    ("created", "yesterday", "created: 'yesterday' is not a created"),
    ("seq", "2", "seq: '2' is not a seq"),
    ("topic_ids", ["x"], "topic_ids: not an object of topic:partition to id"),
])
def test_a_manifest_with_a_field_of_the_wrong_kind_is_skipped_saying_which(
        tmp_path, caplog, field, value, said):
    # An offset of "abc" or null crashed every start-up with a traceback, and one of -5 was
    # restored and crashed the seek at the next assignment (operator pass): damaged or
    # hand-edited, a manifest is skipped as a damaged data file is, whoever wrote it.
    mine = CheckpointStore(tmp_path, "w1", CFG.fingerprint())
    _save(mine, _learner(4), 10)
    peer = CheckpointStore(tmp_path, "w7", CFG.fingerprint())  # the group's newest
    other = (TP[0], TP[1] + 1)  # (were it TP, the peer's would supersede and delete ours)
    manifest = peer.save(_learner(4).snapshot(), {other: 30}, {other: []},
                         created=time.time() + 60).path.with_suffix(".json")
    edited = json.loads(manifest.read_text())
    edited[field] = value
    manifest.write_text(json.dumps(edited))
    with caplog.at_level(logging.ERROR):
        assert mine.latest(prefer="w8").offsets == {TP: 10}  # a new worker id: anyone's newest
        assert mine.latest_for(TP).offsets == {TP: 10}
        assert mine.latest_for(other) is None
        _save(mine, _learner(4), 20)  # ...and pruning reads it too
    assert f"checkpoint manifest w7-0000000001.json unreadable, skipped: ValueError: {said}" in (
        caplog.text), caplog.text
    assert caplog.text.count("w7-0000000001.json") == 1  # (once)
    assert manifest.exists()  # left for an operator to look at, as a damaged one is


def test_a_checkpoint_from_another_model_shape_is_refused_with_the_reason(tmp_path, caplog):
    CheckpointStore(tmp_path, "w1", "0123456789abcdef").save(
        _learner(4).snapshot(), {TP: 5}, {TP: []})
    with caplog.at_level(logging.WARNING):
        assert CheckpointStore(tmp_path, "w1", CFG.fingerprint()).latest() is None
    # A setting changed, nothing is damaged: a warning, not an error.
    (record,) = caplog.records
    assert record.levelno == logging.WARNING, record
    assert "of another model configuration" in record.getMessage()
    assert "model shape settings changed" in record.getMessage()


def test_a_checkpoint_of_an_older_snapshot_format_is_refused_with_the_reason(tmp_path, caplog):
    old = _learner(4).snapshot()
    old["format"] = "streamer.learner/3"  # windows with gaps, no queue
    CheckpointStore(tmp_path, "w1", CFG.fingerprint()).save(old, {TP: 5}, {TP: []})
    with caplog.at_level(logging.ERROR):
        assert CheckpointStore(tmp_path, "w1", CFG.fingerprint()).latest() is None
    assert (f"learner snapshot format 'streamer.learner/3' is not {snap.FORMAT!r} "
            "(written by another streamer version)") in caplog.text


def test_a_checkpoint_from_before_intervals_resumes_with_fresh_calibration(tmp_path):
    learner = _learner(4)
    old = learner.snapshot()
    del old["calibration"], old["horizon"]
    old["format"] = "streamer.learner/4"
    CheckpointStore(tmp_path, "w1", CFG.fingerprint()).save(old, {TP: 5}, {TP: []})
    found = CheckpointStore(tmp_path, "w1", CFG.fingerprint()).latest()
    restored = Learner.restore(found.state, CFG)
    for p, q in zip(restored.model.parameters(), learner.model.parameters()):
        assert torch.equal(p, q)  # the weights carry over
    fresh = Learner(CFG).calibration
    np.testing.assert_array_equal(restored.calibration.q_hi[:4], fresh.q_hi[:4])
    np.testing.assert_array_equal(restored.stats.count, learner.stats.count)


def test_a_checkpoint_from_before_horizons_resumes_with_a_horizon_from_scratch(tmp_path):
    learner = _learner(4)
    old = learner.snapshot()
    del old["horizon"]
    for name in ("recent", "timing"):
        del old["memory"][name]
    old["format"] = "streamer.learner/5"
    CheckpointStore(tmp_path, "w1", CFG.fingerprint()).save(old, {TP: 5}, {TP: []})
    found = CheckpointStore(tmp_path, "w1", CFG.fingerprint()).latest()
    ahead = dataclasses.replace(CFG, horizon=6)
    restored = Learner.restore(found.state, ahead)
    np.testing.assert_array_equal(restored.calibration.q_hi, learner.calibration.q_hi)
    assert restored.horizon.due.shape == (len(learner.stats.count), 3)  # steps 2, 4, 6
    assert not restored.horizon.due.any() and np.isnan(restored.memory.recent).all()
    batch = sine_fleet(4, 3, seed=5)
    result = restored.step(Batch.from_arrays(batch.sensor_ids, batch.ts + 1e6, batch.values))
    assert np.isfinite(result.horizon.forecast).all()


def test_a_checkpoint_from_before_staggered_windows_resumes_its_windows_at_full_length(tmp_path):
    learner = _learner(4)
    old = learner.snapshot()
    del old["short"]
    old["format"] = "streamer.learner/6"
    CheckpointStore(tmp_path, "w1", CFG.fingerprint()).save(old, {TP: 5}, {TP: []})
    found = CheckpointStore(tmp_path, "w1", CFG.fingerprint()).latest()
    restored = Learner.restore(found.state, CFG)
    occupied = restored.table.occupied
    free = np.setdiff1d(np.arange(restored.capacity), occupied)
    assert len(occupied) and len(free)
    assert not restored.state.short[occupied].any()  # windows being filled keep k steps
    np.testing.assert_array_equal(restored.state.short[free], restored.state.stagger(free))
    np.testing.assert_array_equal(restored.state.seen, learner.state.seen)


def test_a_checkpoint_from_before_outlier_runs_resumes_with_none(tmp_path):
    learner = _learner(4)
    old = learner.snapshot()
    del old["stats"]["outlier_run"]
    old["format"] = "streamer.learner/7"
    CheckpointStore(tmp_path, "w1", CFG.fingerprint()).save(old, {TP: 5}, {TP: []})
    found = CheckpointStore(tmp_path, "w1", CFG.fingerprint()).latest()
    restored = Learner.restore(found.state, CFG)
    assert not restored.stats.outlier_run.any()
    np.testing.assert_array_equal(restored.stats.change_rms, learner.stats.change_rms)
    np.testing.assert_array_equal(restored.calibration.q_hi, learner.calibration.q_hi)


def _without_the_level_pull(old: dict) -> dict:
    """``old`` as format 16 kept it: twelve experts, ten horizon experts, an AR model of three
    changes and no pull to the level (format 17 added those, each the last of its kind)."""
    for name in ("guard_err", "last_experts"):
        old["stats"][name] = old["stats"][name][..., :-1].clone()
    for name in ("ar_x", "ar_w"):
        old["memory"][name] = old["memory"][name][..., :-1].clone()
    k = len(HORIZON_EXPERTS)
    horizon = old["horizon"]
    horizon["err"] = horizon["err"][..., :-1].clone()
    horizon["pending"] = torch.cat([horizon["pending"][..., : k - 1],
                                    horizon["pending"][..., k:]], -1)
    old["format"] = "streamer.learner/16"
    return old


def _resumed_from(tmp_path, old: dict):
    CheckpointStore(tmp_path, "w1", CFG.fingerprint()).save(old, {TP: 5}, {TP: []})
    return Learner.restore(CheckpointStore(tmp_path, "w1", CFG.fingerprint()).latest().state, CFG)


def test_a_checkpoint_with_the_spread_in_float32_resumes_with_it_in_steps(tmp_path):
    learner = _learner(4)
    learner.calibration.repeat_run[1] = 7  # a sensor repeating its value
    old = learner.snapshot()
    steps = old["calibration"]["spread"].numpy().astype(np.float64)
    old["calibration"]["spread"] = torch.from_numpy(
        (steps * MAX_SPREAD / SPREAD_STEPS).astype(np.float32))
    old["calibration"]["repeat_run"] = old["calibration"]["repeat_run"][:, 0].clone()
    old["format"] = "streamer.learner/8"
    restored = _resumed_from(tmp_path, old)
    assert restored.calibration.spread.any()
    np.testing.assert_array_equal(restored.calibration.spread, learner.calibration.spread)
    np.testing.assert_array_equal(restored.calibration.repeat_run, learner.calibration.repeat_run)


def test_a_checkpoint_with_repeat_runs_per_sensor_and_per_feature_resumes_with_those_per_feature(
        tmp_path):
    learner = _learner(4)
    learner.calibration.repeat_run[1] = 7
    old = learner.snapshot()
    runs = old["calibration"]["repeat_run"]
    old["calibration"]["flat_run"] = runs.to(torch.uint8)
    old["calibration"]["repeat_run"] = runs.min(dim=1).values
    old["format"] = "streamer.learner/9"
    restored = _resumed_from(tmp_path, old)
    assert "flat_run" not in restored.snapshot()["calibration"]
    np.testing.assert_array_equal(restored.calibration.repeat_run, learner.calibration.repeat_run)


def test_a_checkpoint_with_fixed_width_weights_resumes_with_them_and_its_tail_moments(tmp_path):
    learner = _learner(4)
    old = learner.snapshot()
    calibration = old["calibration"]
    for name in ("tail", "tail_sq"):  # one tail of float32 moments, as format 10 stored it
        moments = 2.0 ** (calibration[name][:, :, 1].numpy() / TAIL_LOG_STEP)
        calibration[name] = torch.from_numpy(moments.astype(np.float32))
    shares = torch.from_numpy((learner.calibration.repeat / WEIGHT_STEPS).astype(np.float32))
    calibration["repeat"], calibration["repeat_again"] = shares[:, 0], shares[:, 1]
    del calibration["spread_weight"], calibration["profile_weight"], calibration["level_weight"]
    # ... eleven experts and no cycles (format 11 added those): all of format 10 at once.
    _without_the_level_pull(old)
    for name in ("guard_err", "last_experts"):
        old["stats"][name] = old["stats"][name][..., :-1].clone()
    for name in ("cycle", "cycle_err", "cycle_n"):
        del old["memory"][name]
    old["format"] = "streamer.learner/10"
    resumed = _resumed_from(tmp_path, old)
    restored = resumed.calibration
    for side in (0, 1):  # both from the one tail
        np.testing.assert_array_equal(restored.tail[:, :, side], learner.calibration.tail[:, :, 1])
        np.testing.assert_array_equal(restored.tail_sq[:, :, side],
                                      learner.calibration.tail_sq[:, :, 1])
    np.testing.assert_array_equal(restored.repeat, learner.calibration.repeat)
    # The weights every sensor's width had until format 11: the experts' spread 2, profile 1.
    assert (restored.spread_weight * MAX_SPREAD_WEIGHT / WEIGHT_STEPS == 2.0).all()
    assert (restored.profile_weight * MAX_PROFILE_WEIGHT / WEIGHT_STEPS == 1.0).all()
    assert resumed.stats.guard_err.shape == learner.stats.guard_err.shape
    assert not resumed.memory.cycle_n.any()
    batch = sine_fleet(4, 3, seed=5)  # and it goes on
    later = resumed.step(Batch.from_arrays(batch.sensor_ids, batch.ts + 1e6, batch.values))
    assert np.isfinite(later.forecasts).all() and np.isfinite(later.upper).all()


def test_a_checkpoint_with_one_tail_resumes_with_it_on_both_sides_and_its_repeat_shares(tmp_path):
    learner = _learner(40)
    old = learner.snapshot()
    calibration = old["calibration"]
    pooled = calibration["tail"][:, :, 1].clone(), calibration["tail_sq"][:, :, 1].clone()
    calibration["tail"], calibration["tail_sq"] = pooled  # format 15: one tail, (C, F)
    codes = learner.calibration.repeat.copy()
    shares = torch.from_numpy((codes / WEIGHT_STEPS).astype(np.float32))
    calibration["repeat"], calibration["repeat_again"] = shares[:, 0], shares[:, 1]
    # A next reading expected 8 typical gaps later, over a run count of 1, as format 15 kept it.
    late = (3 << LATE_SHIFT) | (1 << BUCKET_SHIFT) | 2
    calibration["last_bucket"] = torch.full_like(calibration["last_bucket"], late)
    old["format"] = "streamer.learner/15"
    resumed = _resumed_from(tmp_path, old)
    restored = resumed.calibration
    for side in (0, 1):
        np.testing.assert_array_equal(restored.tail[:, :, side], pooled[0].numpy())
        np.testing.assert_array_equal(restored.tail_sq[:, :, side], pooled[1].numpy())
    np.testing.assert_array_equal(restored.repeat, codes)
    # Format 15's late codes above the run count are kept, not read as a run count of 5 to 14.
    assert (restored.last_bucket == late).all()
    assert "repeat_again" not in resumed.snapshot()["calibration"]
    batch = sine_fleet(5, 3, seed=5)  # and it goes on
    later = resumed.step(Batch.from_arrays(batch.sensor_ids, batch.ts + 1e6, batch.values))
    assert np.isfinite(later.forecasts).all() and np.isfinite(later.upper).all()


def test_a_checkpoint_from_before_cycles_resumes_with_none_seen_and_the_cycle_expert_at_persistence(
        tmp_path):
    learner = _learner(4)
    old = _without_the_level_pull(learner.snapshot())
    for name in ("guard_err", "last_experts"):  # eleven experts, as format 11 had
        old["stats"][name] = old["stats"][name][..., :-1].clone()
    for name in ("cycle", "cycle_err", "cycle_n"):
        del old["memory"][name]
    old["format"] = "streamer.learner/11"
    restored = _resumed_from(tmp_path, old)
    persistence = EXPERTS.index("persistence")
    for name in ("guard_err", "last_experts"):  # the cycle and the level pull: persistence's
        kept = getattr(learner.stats, name)
        np.testing.assert_array_equal(getattr(restored.stats, name)[..., :-2], kept[..., :-2])
        for added in (-2, -1):
            np.testing.assert_array_equal(getattr(restored.stats, name)[..., added],
                                          kept[..., persistence])
    assert not restored.memory.cycle_n.any() and not restored.memory.cycle.any()
    np.testing.assert_array_equal(restored.memory.profile, learner.memory.profile)


def test_a_checkpoint_from_before_the_horizons_cycle_resumes_with_it_at_persistence(tmp_path):
    ahead = dataclasses.replace(CFG, horizon=6)
    learner = Learner(ahead)
    learner.step(sine_fleet(4, 300, seed=3))
    old = _without_the_level_pull(learner.snapshot())
    k = len(HORIZON_EXPERTS)
    horizon = old["horizon"]
    horizon["err"] = horizon["err"][..., :-1].clone()  # nine experts, as format 12 had
    horizon["pending"] = torch.cat([horizon["pending"][..., : k - 2],
                                    horizon["pending"][..., k - 1 :]], -1)
    old["format"] = "streamer.learner/12"
    CheckpointStore(tmp_path, "w1", ahead.fingerprint()).save(old, {TP: 5}, {TP: []})
    state = CheckpointStore(tmp_path, "w1", ahead.fingerprint()).latest().state
    restored = Learner.restore(state, ahead).horizon
    persistence = HORIZON_EXPERTS.index("persistence")
    np.testing.assert_array_equal(restored.err[..., :-2], learner.horizon.err[..., :-2])
    np.testing.assert_array_equal(restored.pending[..., k:], learner.horizon.pending[..., k:])
    for added in (k - 2, k - 1):  # the cycle and the level pull
        np.testing.assert_array_equal(restored.err[..., added],
                                      learner.horizon.err[..., persistence])
        np.testing.assert_array_equal(restored.pending[..., added],
                                      learner.horizon.pending[..., persistence])


def test_a_checkpoint_from_before_the_pull_to_the_level_resumes_with_none_learned(tmp_path):
    ahead = dataclasses.replace(CFG, horizon=6)
    learner = Learner(ahead)
    learner.step(sine_fleet(4, 300, seed=3))
    old = _without_the_level_pull(learner.snapshot())
    CheckpointStore(tmp_path, "w1", ahead.fingerprint()).save(old, {TP: 5}, {TP: []})
    state = CheckpointStore(tmp_path, "w1", ahead.fingerprint()).latest().state
    restored = Learner.restore(state, ahead)
    k = len(HORIZON_EXPERTS)
    # Everything else carried over; no pull learned (weight 0: its forecast is persistence's,
    # as its experts' records start).
    np.testing.assert_array_equal(restored.memory.ar_w[..., :-1], learner.memory.ar_w[..., :-1])
    np.testing.assert_array_equal(restored.memory.ar_x[..., :-1], learner.memory.ar_x[..., :-1])
    assert not restored.memory.ar_w[..., -1].any() and not restored.memory.ar_x[..., -1].any()
    persistence, ahead_persistence = EXPERTS.index("persistence"), HORIZON_EXPERTS.index(
        "persistence")
    for name in ("guard_err", "last_experts"):
        kept = getattr(learner.stats, name)
        np.testing.assert_array_equal(getattr(restored.stats, name)[..., :-1], kept[..., :-1])
        np.testing.assert_array_equal(getattr(restored.stats, name)[..., -1],
                                      kept[..., persistence])
    np.testing.assert_array_equal(restored.horizon.err[..., :-1], learner.horizon.err[..., :-1])
    np.testing.assert_array_equal(restored.horizon.err[..., -1],
                                  learner.horizon.err[..., ahead_persistence])
    np.testing.assert_array_equal(restored.horizon.pending[..., k - 1],
                                  learner.horizon.pending[..., ahead_persistence])
    batch = sine_fleet(4, 3, seed=5)  # and it goes on
    later = restored.step(Batch.from_arrays(batch.sensor_ids, batch.ts + 1e6, batch.values))
    assert np.isfinite(later.forecasts).all() and np.isfinite(later.horizon.forecast).all()


def test_a_checkpoint_from_before_the_levels_weight_resumes_with_it_at_0(tmp_path):
    learner = _learner(4)
    old = learner.snapshot()
    del old["calibration"]["level_weight"]  # as format 13 had
    old["format"] = "streamer.learner/13"
    resumed = _resumed_from(tmp_path, old)
    restored = resumed.calibration
    assert restored.level_weight.shape == learner.calibration.level_weight.shape
    assert restored.level_weight.dtype == np.uint16
    assert (level_weights(restored.level_weight) == 0.0).all()  # the width of before
    for name, kept in learner.calibration.arrays().items():
        if name != "level_weight":
            np.testing.assert_array_equal(getattr(restored, name), kept)
    batch = sine_fleet(4, 3, seed=5)  # and it goes on
    later = resumed.step(Batch.from_arrays(batch.sensor_ids, batch.ts + 1e6, batch.values))
    assert np.isfinite(later.forecasts).all() and np.isfinite(later.upper).all()


def test_a_checkpoint_from_before_the_expected_lateness_keeps_its_buckets_and_recovery_runs(
        tmp_path):
    learner = _learner(4)
    old = learner.snapshot()
    # Format 14 counted fast-growing readings up to 31 in the 5 bits above the bucket.
    old["calibration"]["last_bucket"] = torch.tensor([5 | 20 << 3, 2 | 1 << 3, 7, 0] + [0] * (
        len(old["calibration"]["last_bucket"]) - 4), dtype=torch.uint8)
    old["format"] = "streamer.learner/14"
    restored = _resumed_from(tmp_path, old).calibration
    # The bucket kept, a run past RECOVERY_RUN saturated there, no lateness expected.
    assert restored.last_bucket[:4].tolist() == [5 | 3 << 3, 2 | 1 << 3, 7, 0]


def test_partition_state_moves_between_learners_through_a_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, "w1", CFG.fingerprint())
    source = _learner(20)
    _save(store, source, 100)
    # Compared without updates: windows queued for an update stay with the old owner (training
    # data, not sensor state), so an update would fall at different readings on each side.
    serve_only = dataclasses.replace(CFG, train_every=10**9)
    source = Learner.restore(source.snapshot(), serve_only)
    target = Learner(serve_only)
    target.step(sine_fleet(2, 3, seed=9))  # holds other sensors already: s0, s1 get replaced
    found = store.latest_for(TP)
    target.import_sensors(snap.sensors_of(found.state, found.sensors[TP]))
    later = sine_fleet(5, 22, seed=1).take(np.arange(100, 110))
    # Same weights, same per-sensor state: the moved sensors forecast as at the source (float32
    # LSTM over a batch of another size: equal to rounding).
    target.model.load_state_dict(source.model.state_dict())
    expected, got = source.step(later), target.step(later)
    np.testing.assert_allclose(got.forecasts, expected.forecasts, rtol=1e-7, atol=1e-9)
    # ... with the same intervals and anomaly scores: the calibration moved with them.
    np.testing.assert_allclose(got.lower, expected.lower, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got.upper, expected.upper, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got.anomaly_score, expected.anomaly_score, atol=1e-6)


def test_sensors_exported_in_another_format_are_refused_before_any_state_changes():
    # An export that skipped snap.upgrade (twelve experts, as format 16 had) would leave the
    # moved sensors with half their state; refused whole, the sensors held here untouched.
    source, target = _learner(20), _learner(20)
    exported = snap.sensors_of(source.snapshot(), ["s0", "s1"])
    exported["stats"]["guard_err"] = exported["stats"]["guard_err"][..., :-1].clone()
    before = target.snapshot()
    with pytest.raises(ValueError, match=r"stats\.guard_err of shape \(2, 1, 12\)"):
        target.import_sensors(exported)
    after = target.snapshot()
    for part in ("stats", "memory", "calibration"):
        for name, kept in before[part].items():
            np.testing.assert_array_equal(after[part][name], kept, err_msg=f"{part}.{name}")
    assert after["table"] == before["table"]


def test_a_background_checkpoint_holds_the_state_when_it_was_begun(tmp_path):
    store = CheckpointStore(tmp_path, "w1", CFG.fingerprint())
    writer = _SlowWriter(store)
    learner = _learner(20)
    expected = learner.snapshot()
    writer.begin(learner, {TP: 7}, {TP: ["s0"]})
    assert writer.in_flight
    # Serving goes on meanwhile: the next two readings of every sensor, all applied.
    assert (learner.step(sine_fleet(5, 22, seed=1).take(np.arange(100, 110))).status == 0).all()
    with pytest.raises(AssertionError):
        _assert_same_state(expected, learner.snapshot())  # the live state has moved on
    written = writer.finished(wait=True)
    assert written.error is None and written.offsets == {TP: 7} and not writer.in_flight
    assert writer.finished(wait=True) is None  # taken once
    found = store.latest()
    assert found.path.stem == written.saved.path.stem and found.offsets == {TP: 7}
    _assert_same_state(expected, found.state)
    # The next one reuses the first one's buffers, now that its write has ended.
    writer.begin(learner, {TP: 8}, {TP: ["s0"]})
    assert writer.finished(wait=True).error is None
    _assert_same_state(learner.snapshot(), store.latest().state)
    writer.close()


def test_a_second_checkpoint_cannot_begin_while_one_is_in_flight(tmp_path):
    writer = CheckpointWriter(CheckpointStore(tmp_path, "w1", CFG.fingerprint()))
    learner = _learner(5)
    writer.begin(learner, {TP: 1}, {TP: []})
    with pytest.raises(RuntimeError, match="in flight"):
        writer.begin(learner, {TP: 2}, {TP: []})
    writer.finished(wait=True)
    writer.close()


def test_a_background_write_that_fails_is_reported_with_its_error(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", "w1", CFG.fingerprint())
    writer = CheckpointWriter(store)
    shutil.rmtree(tmp_path / "ckpt")  # the volume went away, a file where it was
    (tmp_path / "ckpt").write_text("")
    writer.begin(_learner(5), {TP: 3}, {TP: []})
    written = writer.finished(wait=True)
    assert isinstance(written.error, OSError) and written.saved is None
    assert written.offsets == {TP: 3}
    writer.close()


def test_a_write_failing_in_serialization_is_reported_and_leaves_no_file(tmp_path):
    store = CheckpointStore(tmp_path, "w1", CFG.fingerprint())
    learner = _learner(5)
    # (pickle says so with an AttributeError for a local lambda, a PicklingError otherwise)
    with pytest.raises((AttributeError, pickle.PicklingError), match="Can't pickle"):
        store.save({**learner.snapshot(), "oops": lambda: None}, {TP: 1}, {TP: []})
    assert _files(tmp_path) == set()  # no temporary file left

    class Unsaveable(CheckpointWriter):
        def _write(self, state, *rest):
            return super()._write({**state, "oops": lambda: None}, *rest)

    writer = Unsaveable(store)
    writer.begin(learner, {TP: 2}, {TP: []})
    written = writer.finished(wait=True)
    assert written.error is not None and written.saved is None and written.offsets == {TP: 2}
    writer.close()


def test_a_checkpoint_is_dated_when_its_state_was_copied_not_when_it_became_durable(tmp_path):
    store = CheckpointStore(tmp_path, "w1", CFG.fingerprint())
    writer = _SlowWriter(store)
    learner = _learner(5)
    before = time.time()
    writer.begin(learner, {TP: 3}, {TP: []})
    after = time.time()  # the copy is taken; the write is 0.5 s behind it
    assert writer.finished(wait=True).error is None
    created = store.latest().created
    assert before <= created <= after and time.time() - created >= 0.5
    _save(store, _learner(5), 4)
    assert store.latest().created > created
    assert store.latest_for(TP, newer_than=created).offsets == {TP: 4}
    writer.close()


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread priority is Linux only")
def test_the_background_writer_runs_below_the_serving_threads_priority(tmp_path):
    writer = CheckpointWriter(CheckpointStore(tmp_path, "w", LearnerConfig().fingerprint()))
    try:
        def own_priority() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        here = own_priority()
        assert writer._pool.submit(own_priority).result() == min(here + WRITER_NICENESS, 19)
        assert own_priority() == here  # the serving thread's own is untouched
    finally:
        writer.close()


def test_the_manifest_checksum_is_the_data_files_sha256(tmp_path):
    store = CheckpointStore(tmp_path, "w", LearnerConfig().fingerprint())
    learner = Learner(LearnerConfig(initial_capacity=8))
    saved = store.save(learner.snapshot(), {("in", 0): 5}, {("in", 0): []})
    manifest = json.loads(saved.path.with_suffix(".json").read_text())
    data = saved.path.read_bytes()
    assert manifest["size"] == len(data) == saved.size_bytes
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()




def test_a_gone_workers_checkpoint_is_deleted_once_newer_ones_hold_all_its_partitions(tmp_path):
    learner, other = _learner(12), ("readings", 1)
    gone = CheckpointStore(tmp_path, "pod-a", "fp")
    gone.save(learner.snapshot(), {TP: 5, other: 7}, {TP: ["s0"], other: ["s1"]}, created=100.0)
    alive = CheckpointStore(tmp_path, "pod-b", "fp")
    alive.save(learner.snapshot(), {TP: 9}, {TP: ["s0"]}, created=200.0)
    assert "pod-a-0000000001.json" in _files(tmp_path)  # partition 1 is only in pod-a's
    alive.save(learner.snapshot(), {TP: 9, other: 8}, {TP: ["s0"], other: ["s1"]},
               created=300.0)
    assert not {"pod-a-0000000001.json", "pod-a-0000000001.ckpt"} & _files(tmp_path)
    assert alive.latest_for(other).worker == "pod-b"


_TAKE_IN_ANOTHER_PROCESS = """
import sys
from streamer.serving.checkpoint import CheckpointStore, WorkerIdInUse
try:
    CheckpointStore(sys.argv[1], sys.argv[2], "fp")
except WorkerIdInUse as exc:
    print("refused:", exc)
else:
    print("taken")
"""


def _taken_by_another_process(directory, worker: str) -> str:
    return subprocess.run([sys.executable, "-c", _TAKE_IN_ANOTHER_PROCESS, str(directory),
                           worker], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def test_a_second_process_writing_as_the_same_worker_in_the_same_directory_is_refused(tmp_path):
    # Each numbered its files from its own count: they overwrote and pruned each other's
    # checkpoints (two workers on one host, whose name is their default id).
    store = CheckpointStore(tmp_path, "vm", "fp")
    assert _taken_by_another_process(tmp_path, "vm") == (
        f"refused: another running worker writes its checkpoints in {str(tmp_path)!r} as 'vm'")
    assert _taken_by_another_process(tmp_path, "vm-2") == "taken"  # another id: its own
    assert _taken_by_another_process(tmp_path / "elsewhere", "vm") == "taken"
    CheckpointStore(tmp_path, "vm", "fp")  # this process's own again (a restart in process)
    del store
    gc.collect()  # every store of this process for it gone: the lock with them
    assert _taken_by_another_process(tmp_path, "vm") == "taken"


def test_a_checkpoint_directory_deleted_while_running_is_made_again_and_locked_again(
        tmp_path, caplog):
    # Every checkpoint failed ("No such file or directory") until an operator made it again,
    # and the lock file was gone for good: a second worker with this id was not refused.
    directory = tmp_path / "ck"
    store = CheckpointStore(directory, "vm", CFG.fingerprint())
    _save(store, _learner(4), 10)
    shutil.rmtree(directory)
    assert _taken_by_another_process(directory, "vm") == "taken"  # (no lock: nothing refused)
    shutil.rmtree(directory)
    with caplog.at_level(logging.WARNING):
        _save(store, _learner(4), 20)
    assert f"checkpoint directory {directory} is gone: making it again" in caplog.text
    assert store.latest().offsets == {TP: 20}
    assert _taken_by_another_process(directory, "vm").startswith("refused: ")


def test_a_checkpoint_that_finds_no_room_says_so_and_where(tmp_path):
    # torch's own words for it: "[enforce fail at inline_container.cc:672] . unexpected pos
    # 394496 vs 394384", every interval (operator pass, a full tmpfs).
    store = CheckpointStore(tmp_path, "w1", CFG.fingerprint())
    learner = _learner(4)
    size = _save(store, learner, 10).size_bytes
    limit = size // 3  # a disk with room for a third of it, as the file grows
    real_write = _HashingWriter.write

    def write(self, data):
        if self.size + memoryview(data).nbytes > limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    room = shutil.disk_usage(tmp_path)._replace(free=limit)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_HashingWriter, "write", write)
        patch.setattr(shutil, "disk_usage", lambda _: room)
        with pytest.raises(OSError) as raised:  # (torch's writer swallows the OSError)
            _save(store, learner, 20)
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value).startswith(
        f"[Errno 28] no room for a checkpoint in {tmp_path}: {limit:,} bytes free, and this "
        f"checkpoint is at least "), raised.value
    assert store.latest().offsets == {TP: 10}  # and nothing of it left behind
    assert sorted(_files(tmp_path)) == ["w1-0000000001.ckpt", "w1-0000000001.json"]


def test_a_checkpoint_on_a_full_file_system_says_there_is_no_room(tmp_path):
    # The same on a real one: a tmpfs with room for a third of a checkpoint (root only).
    small = tmp_path / "small"
    small.mkdir()
    size = _save(CheckpointStore(tmp_path, "w0", CFG.fingerprint()), _learner(4), 1).size_bytes
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 3}", "tmpfs",
                              str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    def attempt() -> str:  # (returns no frame that holds the store and its lock file open)
        try:
            _save(CheckpointStore(small, "w1", CFG.fingerprint()), _learner(4), 20)
        except OSError as exc:
            return str(exc)
        return "saved"

    try:
        said = attempt()
        gc.collect()
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert said.startswith(f"[Errno 28] no room for a checkpoint in {small}: "), said


def test_a_gone_workers_lock_file_is_deleted_with_its_last_checkpoint_once_old(tmp_path):
    learner = _learner(12)
    gone = CheckpointStore(tmp_path, "pod-a", "fp")
    gone.save(learner.snapshot(), {TP: 5}, {TP: ["s0"]}, created=100.0)
    del gone
    gc.collect()  # (its process gone)
    old = time.time() - ORPHAN_AGE_S - 60
    os.utime(tmp_path / ".pod-a.lock", (old, old))
    alive = CheckpointStore(tmp_path, "pod-b", "fp")
    alive.save(learner.snapshot(), {TP: 9}, {TP: ["s0"]}, created=200.0)
    assert not (tmp_path / ".pod-a.lock").exists()
    assert (tmp_path / ".pod-b.lock").exists()
    # ...but not one a live process holds (its id back, before its first checkpoint)
    back = CheckpointStore(tmp_path, "pod-c", "fp")
    os.utime(tmp_path / ".pod-c.lock", (old, old))
    alive.save(learner.snapshot(), {TP: 10}, {TP: ["s0"]}, created=300.0)
    assert (tmp_path / ".pod-c.lock").exists() and back.worker == "pod-c"


def test_a_lock_file_that_cannot_be_opened_stays_and_fails_no_checkpoint(tmp_path):
    (tmp_path / ".pod-x.lock").mkdir()  # (or another user's file: os.open refuses it)
    old = time.time() - ORPHAN_AGE_S - 60
    os.utime(tmp_path / ".pod-x.lock", (old, old))
    store = CheckpointStore(tmp_path, "pod-b", "fp")
    store.save(_learner(4).snapshot(), {TP: 9}, {TP: ["s0"]})
    assert store.latest().offsets == {TP: 9} and (tmp_path / ".pod-x.lock").is_dir()


@pytest.mark.parametrize("damage", ["truncate", "flip_one_byte"])
def test_a_newer_checkpoint_with_a_damaged_data_file_does_not_supersede_an_older_one(
        tmp_path, damage):
    learner = _learner(12)
    alive = CheckpointStore(tmp_path, "pod-b", "fp")
    saved = alive.save(learner.snapshot(), {TP: 9}, {TP: ["s0"]}, created=200.0)
    if damage == "truncate":
        os.truncate(saved.path, 10)
    else:
        data = bytearray(saved.path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        saved.path.write_bytes(bytes(data))
    CheckpointStore(tmp_path, "pod-a", "fp").save(learner.snapshot(), {TP: 5}, {TP: ["s0"]},
                                                  created=100.0)
    CheckpointStore(tmp_path, "pod-c", "fp").save(learner.snapshot(), {("x", 0): 1},
                                                  {("x", 0): []}, created=300.0)
    assert "pod-a-0000000001.json" in _files(tmp_path)
    assert alive.latest_for(TP).worker == "pod-a"  # the fallback is still there


def test_a_live_workers_older_checkpoints_stay_while_it_holds_their_partitions(tmp_path):
    learner = _learner(12)
    alive = CheckpointStore(tmp_path, "pod-b", "fp")
    for created in (100.0, 200.0, 300.0):
        alive.save(learner.snapshot(), {TP: int(created)}, {TP: ["s0"]}, created=created)
    CheckpointStore(tmp_path, "pod-a", "fp").save(learner.snapshot(), {("x", 0): 1},
                                                  {("x", 0): []}, created=400.0)
    # pod-b's own newer checkpoints do not supersede its older ones: its fallbacks stay
    assert {f"pod-b-000000000{k}.json" for k in (1, 2, 3)} <= _files(tmp_path)


def test_a_handed_over_partition_keeps_its_checkpoint_until_its_new_owner_writes_one(tmp_path):
    # pod-a hands partition 0 over (its revoke checkpoint, offset committed), then checkpoints
    # partition 1 only; pod-b took partition 0's state into memory and has had no reading of it
    # since, so it wrote nothing. If pod-b crashes now, its restart must still find partition
    # 0's state at the committed offset: pod-a's count-based pruning may not delete it.
    learner, other = _learner(12), ("readings", 1)
    old = CheckpointStore(tmp_path, "pod-a", "fp", keep=2)
    old.save(learner.snapshot(), {TP: 10, other: 7}, {TP: ["s0"], other: ["s1"]}, created=100.0)
    for k in range(4):
        old.save(learner.snapshot(), {other: 8 + k}, {other: ["s1"]}, created=200.0 + k)
    handed_over = CheckpointStore(tmp_path, "pod-b", "fp").latest_for(TP)
    assert handed_over is not None and handed_over.offsets[TP] == 10
    assert handed_over.sensors[TP] == ["s0"]
    assert len([f for f in _files(tmp_path) if f.startswith("pod-a") and f.endswith(".json")]) \
        == 3  # keep=2, and the one partition 0 still needs
    # Once pod-b has written partition 0's state, pod-a's next prune lets the old one go.
    CheckpointStore(tmp_path, "pod-b", "fp").save(learner.snapshot(), {TP: 10}, {TP: ["s0"]},
                                                  created=300.0)
    old.save(learner.snapshot(), {other: 20}, {other: ["s1"]}, created=301.0)
    assert "pod-a-0000000001.json" not in _files(tmp_path)
    assert CheckpointStore(tmp_path, "pod-c", "fp").latest_for(TP).worker == "pod-b"


def test_adopting_many_partitions_of_one_checkpoint_reads_and_verifies_it_once(
        tmp_path, monkeypatch):
    from streamer.config import CheckpointSettings
    from streamer.serving.durability import Durability
    from streamer.serving.ledger import PartitionLedger

    learner, tps = _learner(12), [("readings", p) for p in range(4)]
    CheckpointStore(tmp_path, "pod-a", CFG.fingerprint()).save(
        learner.snapshot(), {tp: 5 + tp[1] for tp in tps},
        {tp: [f"s{tp[1]}"] for tp in tps}, created=100.0)
    reads = []
    read = CheckpointStore._read
    monkeypatch.setattr(CheckpointStore, "_read",
                        lambda self, path: (reads.append(path), read(self, path))[1])
    adopter = Learner(CFG)
    durability = Durability(adopter, PartitionLedger(0.0), CheckpointSettings(dir=tmp_path),
                            "pod-b", unscraped_metrics())
    assert durability.adopt(tps) == {tp: 5 + tp[1] for tp in tps}
    assert len(reads) == 1
    assert sorted(adopter.table.to_plain()["ids"][:4]) == ["s0", "s1", "s2", "s3"]
    durability.close()


def test_adopting_partitions_no_checkpoint_holds_says_where_they_are_read_from(
        tmp_path, caplog):
    # Workers of one group with checkpoint directories of their own: a partition moving to
    # another worker began afresh there without a word.
    from streamer.config import CheckpointSettings
    from streamer.serving.durability import Durability
    from streamer.serving.ledger import PartitionLedger

    held, unheld = ("readings", 0), [("readings", 1), ("readings", 2)]
    learner = _learner(4)
    CheckpointStore(tmp_path, "pod-a", CFG.fingerprint()).save(
        learner.snapshot(), {held: 7}, {held: ["s0"]}, created=100.0)
    durability = Durability(Learner(CFG), PartitionLedger(0.0),
                            CheckpointSettings(dir=tmp_path), "pod-b", unscraped_metrics())
    with caplog.at_level(logging.INFO, logger="streamer.worker"):
        assert durability.adopt([held, *unheld]) == {held: 7}
    said = [r.getMessage() for r in caplog.records if "no checkpoint holds" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("readings[1], readings[2]: no checkpoint")
    durability.close()


def test_a_checkpoint_lists_only_the_sensors_the_learner_still_holds(tmp_path):
    # Ids that churn with an idle TTL: the learner evicts them, and the partition's list of
    # sensors (checkpointed, copied at every hand-over) shrank with it instead of growing
    # for ever.
    from streamer.config import CheckpointSettings
    from streamer.serving.durability import Durability
    from streamer.serving.ledger import PartitionLedger

    learner = Learner(dataclasses.replace(CFG, sensor_ttl_seconds=60.0))
    ledger = PartitionLedger(0.0)
    durability = Durability(learner, ledger, CheckpointSettings(dir=tmp_path), "pod-a",
                            unscraped_metrics())
    ids = [f"churn-{i}" for i in range(40)]
    for i, sensor_id in enumerate(ids):  # one reading each, 10 minutes apart
        learner.step(Batch([sensor_id], np.array([1.7e9 + 600.0 * i]), np.ones((1, 1)),
                           np.ones(1, dtype=np.int64)))
        ledger.advance({TP: i + 1}, [(TP, sensor_id)])
        ledger.acknowledged({TP: i + 1}, 1, time.time())
    assert len(learner.table) < len(ids)  # evicted meanwhile
    durability.begin()
    assert durability.written(wait=True) == {TP: len(ids)}
    held = sorted(sensor_id for sensor_id, _ in learner.table.items())
    assert ledger.sensors([TP]) == {TP: held}
    restored = CheckpointStore(tmp_path, "pod-b", CFG.fingerprint())
    assert restored.latest_for(TP).sensors == {TP: held}  # what the next owner adopts
    durability.close()


def _files_around_a_failing_save(tmp_path, monkeypatch, name: str, failing) -> tuple[set, set]:
    """The directory's files before and after a second save that fails in ``failing``, put
    in the place of ``streamer.serving.checkpoint.<name>``."""
    from streamer.serving import checkpoint

    store = CheckpointStore(tmp_path, "w1", CFG.fingerprint())
    _save(store, _learner(4), 10)
    before = _files(tmp_path)
    monkeypatch.setattr(checkpoint, name, failing)
    with pytest.raises(OSError):
        _save(store, _learner(4), 20)
    return before, _files(tmp_path)


def test_a_save_failing_at_its_manifest_leaves_no_file_behind(tmp_path, monkeypatch):
    # A full disk: the data file fits, its manifest does not. Nothing would ever name or
    # delete that data file (hundreds of MB), and the disk would stay full.
    from streamer.serving.checkpoint import _write_atomic

    def full_disk(path, data):
        with open(path.with_name(f".{path.name}.tmp"), "wb") as handle:
            handle.write(data[:10])
        raise OSError(28, "No space left on device")

    before, after = _files_around_a_failing_save(tmp_path, monkeypatch, "_write_atomic",
                                                 full_disk)
    assert {f for f in after if not f.startswith(".")} == before
    # And a manifest write that fails leaves no temporary file either.
    (tmp_path / "x.json").mkdir()  # written, but cannot be renamed over a directory
    with pytest.raises(OSError):
        _write_atomic(tmp_path / "x.json", b"{}")
    assert not (tmp_path / ".x.json.tmp").exists()


def test_our_checkpoints_of_a_configuration_we_left_go_by_count_whatever_they_hold(tmp_path):
    # After a change of model shape no checkpoint of ours will ever supersede the old ones'
    # partitions: kept as "the newest holding them", each would stay forever.
    learner, other = _learner(12), ("readings", 1)
    old = CheckpointStore(tmp_path, "w1", "fp-before", keep=2)
    for k in range(3):
        old.save(learner.snapshot(), {TP: k}, {TP: ["s0"]}, created=100.0 + k)
    new = CheckpointStore(tmp_path, "w1", "fp-after", keep=2)
    for k in range(3):
        new.save(learner.snapshot(), {other: k}, {other: ["s1"]}, created=200.0 + k)
    assert sorted(f for f in _files(tmp_path) if f.endswith(".json")) == [
        "w1-0000000005.json", "w1-0000000006.json"]


def test_a_manifest_renamed_but_not_made_durable_is_removed_with_its_data(tmp_path, monkeypatch):
    from streamer.serving.checkpoint import _publish

    def rename_then_fail(tmp, path):
        _publish(tmp, path)
        if path.suffix == ".json":
            raise OSError(5, "Input/output error")  # the directory's fsync

    before, after = _files_around_a_failing_save(tmp_path, monkeypatch, "_publish",
                                                 rename_then_fail)
    assert after == before


def test_partitions_read_in_one_assignment_keep_one_snapshot_in_memory(tmp_path):
    learner, other = _learner(12), ("readings", 1)
    CheckpointStore(tmp_path, "a", CFG.fingerprint()).save(learner.snapshot(), {TP: 1},
                                                          {TP: ["s0"]}, created=100.0)
    CheckpointStore(tmp_path, "b", CFG.fingerprint()).save(learner.snapshot(), {other: 2},
                                                          {other: ["s1"]}, created=200.0)
    store, read = CheckpointStore(tmp_path, "c", CFG.fingerprint()), {}
    assert store.latest_for(TP, read=read).worker == "a"
    assert store.latest_for(other, read=read).worker == "b"
    assert [c.worker for c in read.values() if c is not None] == ["b"]


def test_a_checkpoint_of_another_configuration_is_never_superseded_by_ours(tmp_path):
    learner = _learner(12)
    CheckpointStore(tmp_path, "old-pod", "fp-before").save(learner.snapshot(), {TP: 5},
                                                           {TP: ["s0"]}, created=100.0)
    CheckpointStore(tmp_path, "new-pod", "fp-after").save(learner.snapshot(), {TP: 9},
                                                          {TP: ["s0"]}, created=200.0)
    assert "old-pod-0000000001.json" in _files(tmp_path)  # a rollback can still restore it
    assert CheckpointStore(tmp_path, "x", "fp-before").latest().worker == "old-pod"


def test_a_checkpoint_keeps_the_topic_id_each_offset_is_in(tmp_path):
    learner, other = _learner(12), ("in", 1)
    store = CheckpointStore(tmp_path, "pod-a", "fp")
    store.save(learner.snapshot(), {TP: 5, other: 7}, {TP: [], other: []},
               topic_ids={TP: "id-1", ("gone", 0): "id-9"})
    assert store.latest().topic_ids == {TP: "id-1"}  # (other: not known, so not said)
    manifest = json.loads((tmp_path / "pod-a-0000000001.json").read_text())
    del manifest["topic_ids"]  # as written before topic ids were kept
    (tmp_path / "pod-a-0000000001.json").write_text(json.dumps(manifest))
    assert CheckpointStore(tmp_path, "pod-b", "fp").latest().topic_ids == {}


def test_our_own_data_file_left_by_a_crash_while_deleting_it_is_deleted_when_old(tmp_path):
    learner, store = _learner(12), CheckpointStore(tmp_path, "pod-a", "fp", keep=1)
    store.save(learner.snapshot(), {TP: 1}, {TP: []})
    store.save(learner.snapshot(), {TP: 2}, {TP: []})  # pruning deleted 1, manifest first:
    (tmp_path / "pod-a-0000000001.ckpt").write_bytes(b"x")  # a crash there left its data
    (tmp_path / "pod-a-0000000000.ckpt").write_bytes(b"x")  # (a recent one: kept for now)
    old = time.time() - 2 * 3600
    os.utime(tmp_path / "pod-a-0000000001.ckpt", (old, old))
    store = CheckpointStore(tmp_path, "pod-a", "fp", keep=1)  # restarted after the crash
    store.save(learner.snapshot(), {TP: 3}, {TP: []})
    assert _files(tmp_path) == {"pod-a-0000000000.ckpt", "pod-a-0000000003.ckpt",
                                "pod-a-0000000003.json"}
    assert store.latest().offsets == {TP: 3}


def test_another_workers_orphaned_data_file_is_deleted_only_when_old(tmp_path):
    learner = _learner(12)
    for name in ("pod-a-0000000004.ckpt", ".pod-a-0000000005.json.tmp",
                 "pod-b-0000000009.ckpt", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    old = time.time() - 2 * 3600
    for name in ("pod-a-0000000004.ckpt", ".pod-a-0000000005.json.tmp", "notes.txt"):
        os.utime(tmp_path / name, (old, old))
    # an old data file whose manifest exists but cannot be parsed is not an orphan
    (tmp_path / "pod-d-0000000001.ckpt").write_bytes(b"x")
    (tmp_path / "pod-d-0000000001.json").write_text("{not json")
    for name in ("pod-d-0000000001.ckpt", "pod-d-0000000001.json"):
        os.utime(tmp_path / name, (old, old))
    CheckpointStore(tmp_path, "pod-c", "fp").save(learner.snapshot(), {TP: 1}, {TP: []})
    left = _files(tmp_path)
    assert {"pod-b-0000000009.ckpt", "notes.txt"} <= left  # too recent; not a checkpoint's
    assert {"pod-d-0000000001.ckpt", "pod-d-0000000001.json"} <= left
    assert not {"pod-a-0000000004.ckpt", ".pod-a-0000000005.json.tmp"} & left
    assert {"pod-c-0000000001.json", "pod-c-0000000001.ckpt"} <= left

