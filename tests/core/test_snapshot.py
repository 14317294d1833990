"""Snapshots restore a learner that continues exactly; incompatible or unsafe ones are refused."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

from streamer.core import Batch, Learner, LearnerConfig
from streamer.core.snapshot import IncompatibleSnapshot, dumps, loads
from tests.core.conftest import chunks, sine_fleet


def test_restored_learner_continues_with_identical_forecasts_and_weights(small_config):
    stream = sine_fleet(6, 40, seed=12)
    first, second = stream.take(np.arange(120)), stream.take(np.arange(120, len(stream)))
    original = Learner(small_config)
    original.step(first)
    assert original.updates > 0
    copy = Learner.restore(loads(dumps(original.snapshot())), small_config)
    for part in chunks(second, 13):
        a, b = original.step(part), copy.step(part)
        np.testing.assert_array_equal(a.forecasts, b.forecasts)
        # The interval and anomaly calibration continues too.
        np.testing.assert_array_equal(a.lower, b.lower)
        np.testing.assert_array_equal(a.upper, b.upper)
        np.testing.assert_array_equal(a.anomaly_score, b.anomaly_score)
        assert [u.loss for u in a.updates] == [u.loss for u in b.updates]
    assert original.updates == copy.updates > 1
    for p, q in zip(original.model.parameters(), copy.model.parameters()):
        assert torch.equal(p, q)


def test_a_restored_learner_keeps_its_event_clock_and_evicts_as_the_original(small_config):
    # TTL 30 minutes; s0 falls silent; "ahead" is dated 25 minutes ahead of the others.
    cfg = LearnerConfig(**{**small_config.to_dict(), "sensor_ttl_seconds": 1800.0})
    ids = [s for _ in range(60) for s in ["ahead", "s0", "s1", "s2"]]
    ts = np.repeat(1.7e9 + 60.0 * np.arange(60), 4) + np.tile([1500.0, 0, 0, 0], 60)
    keep = ~((np.array(ids) == "s0") & (ts > 1.7e9 + 600))
    stream = Batch.from_arrays([i for i, k in zip(ids, keep) if k], ts[keep], np.ones(keep.sum()))
    original = Learner(cfg)
    original.step(stream.take(np.arange(30)))
    copy = Learner.restore(loads(dumps(original.snapshot())), cfg)
    assert copy.clock.to_plain() == original.clock.to_plain()
    rest = stream.take(np.arange(30, len(stream)))
    evicted = [(original.step(p).evicted_sensors, copy.step(p).evicted_sensors)
               for p in chunks(rest, 7)]
    assert [a for a, _ in evicted] == [b for _, b in evicted] and sum(a for a, _ in evicted) == 1


def test_snapshot_into_a_different_hidden_size_is_refused_naming_the_field(small_config):
    state = loads(dumps(Learner(small_config).snapshot()))
    other = LearnerConfig(**{**small_config.to_dict(), "hidden_size": 16})
    with pytest.raises(IncompatibleSnapshot, match="hidden_size: snapshot 8 vs config 16"):
        Learner.restore(state, other)


def test_snapshot_with_more_sensors_than_max_sensors_is_refused(small_config):
    learner = Learner(small_config)
    learner.step(sine_fleet(10, 2))
    smaller = LearnerConfig(**{**small_config.to_dict(), "max_sensors": 8, "initial_capacity": 4})
    with pytest.raises(IncompatibleSnapshot, match="max_sensors is 8"):
        Learner.restore(learner.snapshot(), smaller)


def test_operational_settings_may_change_across_a_restore(small_config):
    learner = Learner(small_config)
    learner.step(sine_fleet(3, 10))
    relaxed = LearnerConfig(**{**small_config.to_dict(), "lr": 1e-4, "train_every": 50})
    restored = Learner.restore(loads(dumps(learner.snapshot())), relaxed)
    assert restored.n_sensors == 3
    assert [g["lr"] for g in restored.trainer.optimizer.param_groups] == [1e-4]  # the new one


def test_training_a_learner_restored_from_a_snapshot_leaves_the_snapshot_unchanged(small_config):
    stream = sine_fleet(4, 60, seed=2)
    first, second = stream.take(np.arange(120)), stream.take(np.arange(120, len(stream)))
    learner = Learner(small_config)
    learner.step(first)
    snapshot = learner.snapshot()
    before = dumps(snapshot)
    twins = [Learner.restore(snapshot, small_config) for _ in range(2)]
    for part in chunks(second, 20):
        for twin in twins:
            twin.step(part)
    assert twins[0].trainer.applied > 0
    assert dumps(snapshot) == before
    assert all(torch.equal(p, q) for p, q in zip(twins[0].model.parameters(),
                                                 twins[1].model.parameters()))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_loading_never_unpickles_arbitrary_objects():
    buffer = io.BytesIO()
    torch.save({"format": "streamer.learner/1", "payload": _Evil()}, buffer)
    with pytest.raises(pickle.UnpicklingError):
        loads(buffer.getvalue())


def test_loading_into_a_used_learner_replaces_all_its_state(small_config):
    stream = sine_fleet(6, 40, seed=3)
    first, second = stream.take(np.arange(120)), stream.take(np.arange(120, len(stream)))
    original = Learner(small_config)
    original.step(first)
    used = Learner(small_config)
    used.step(sine_fleet(9, 30, seed=4))  # other sensors, other weights, a grown table
    used.load(loads(dumps(original.snapshot())))
    assert used.n_sensors == original.n_sensors
    for part in chunks(second, 11):
        a, b = original.step(part), used.step(part)
        np.testing.assert_array_equal(a.forecasts, b.forecasts)
        np.testing.assert_array_equal(a.upper, b.upper)
    for p, q in zip(original.model.parameters(), used.model.parameters()):
        assert torch.equal(p, q)


def _leaves(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{path}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{path}/{i}")
    else:
        yield path, tree


def _same(a, b):
    pairs = list(zip(_leaves(a), _leaves(b), strict=True))
    for (pa, x), (pb, y) in pairs:
        assert pa == pb
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, pa
            assert x.numpy().tobytes() == y.numpy().tobytes(), pa  # bitwise, NaN included
        else:
            assert x == y or (x != x and y != y), pa


def test_a_snapshot_into_an_earlier_ones_buffers_equals_a_fresh_one_and_is_a_copy(small_config):
    learner = Learner(small_config)
    stream = sine_fleet(5, 30, seed=8)
    learner.step(stream.take(np.arange(60)))
    earlier = learner.snapshot()
    buffers = {id(t) for _, t in _leaves(earlier) if isinstance(t, torch.Tensor)}
    learner.step(stream.take(np.arange(60, 120)))
    learner.step(sine_fleet(40, 2, seed=9))  # new sensors: the table grows, shapes change
    reused = learner.snapshot(reuse=earlier)
    _same(reused, learner.snapshot())
    # Buffers of unchanged shape were written into; the copy shares nothing with the learner.
    assert {id(t) for _, t in _leaves(reused) if isinstance(t, torch.Tensor)} & buffers
    live = {t.data_ptr() for t in learner.state.tensors().values()}
    live |= {p.data_ptr() for p in learner.model.parameters()}
    assert not live & {t.data_ptr() for _, t in _leaves(reused) if isinstance(t, torch.Tensor)}
    frozen = learner.snapshot()
    learner.step(stream.take(np.arange(120, 150)))
    with pytest.raises(AssertionError):
        _same(frozen, learner.snapshot())
