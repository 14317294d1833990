"""Snapshots restore a learner that continues exactly; incompatible or unsafe ones are refused."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

from streamer.core import Learner, LearnerConfig
from streamer.core.snapshot import IncompatibleSnapshot, dumps, loads, restore, snapshot
from tests.core.conftest import chunks, sine_fleet


def test_restored_learner_continues_with_identical_forecasts_and_weights(small_config):
    stream = sine_fleet(6, 40, seed=12)
    first, second = stream.take(np.arange(120)), stream.take(np.arange(120, len(stream)))
    original = Learner(small_config)
    original.step(first)
    assert original.updates > 0
    copy = restore(loads(dumps(snapshot(original))), small_config)
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


def test_snapshot_into_a_different_hidden_size_is_refused_naming_the_field(small_config):
    state = loads(dumps(snapshot(Learner(small_config))))
    other = LearnerConfig(**{**small_config.to_dict(), "hidden_size": 16})
    with pytest.raises(IncompatibleSnapshot, match="hidden_size: snapshot 8 vs config 16"):
        restore(state, other)


def test_snapshot_with_more_sensors_than_max_sensors_is_refused(small_config):
    learner = Learner(small_config)
    learner.step(sine_fleet(10, 2))
    smaller = LearnerConfig(**{**small_config.to_dict(), "max_sensors": 8, "initial_capacity": 4})
    with pytest.raises(IncompatibleSnapshot, match="max_sensors is 8"):
        restore(snapshot(learner), smaller)


def test_operational_settings_may_change_across_a_restore(small_config):
    learner = Learner(small_config)
    learner.step(sine_fleet(3, 10))
    relaxed = LearnerConfig(**{**small_config.to_dict(), "lr": 1e-4, "train_every": 50})
    assert restore(snapshot(learner), relaxed).n_sensors == 3


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_loading_never_unpickles_arbitrary_objects():
    buffer = io.BytesIO()
    torch.save({"format": "streamer.learner/1", "payload": _Evil()}, buffer)
    with pytest.raises(pickle.UnpicklingError):
        loads(buffer.getvalue())

