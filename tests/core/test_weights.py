"""Weights as bytes and averages: never unpickled, checked against the model, order-stable."""

from __future__ import annotations

import copy
import io
import pickle
import zipfile

import numpy as np
import pytest
import torch

from streamer.core import Batch, Learner
from streamer.core import weights as w
from streamer.core.config import LearnerConfig


def _weights(seed: int, hidden: int = 8) -> w.Weights:
    learner = Learner(LearnerConfig(hidden_size=hidden, seed=seed, initial_capacity=4))
    return {k: t + 0.01 * seed for k, t in learner.weights().items()}


def test_weights_round_trip_through_bytes_bitwise():
    a = _weights(1)
    back = w.loads(w.dumps(a), like=a)
    assert set(back) == set(a) and all(torch.equal(back[k], a[k]) for k in a)


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


@pytest.mark.parametrize("payload", [
    b"", b"garbage", pickle.dumps({"lstm.weight_ih_l0": _Boom()}),
], ids=["empty", "text", "pickle-that-executes"])
def test_garbage_or_a_pickle_is_refused_never_executed(payload):
    with pytest.raises(w.WeightsError):
        w.loads(payload, like=_weights(0))


def test_weights_of_another_shape_or_non_finite_are_refused():
    ours = _weights(0, hidden=8)
    with pytest.raises(w.WeightsError, match="names differ|shape"):
        w.loads(w.dumps(_weights(0, hidden=16)), like=ours)
    bad = dict(ours)
    name = next(iter(bad))
    bad[name] = bad[name].clone().fill_(float("nan"))
    with pytest.raises(w.WeightsError, match="non-finite"):
        w.loads(w.dumps(bad), like=ours)
    buffer = io.BytesIO()
    torch.save([1, 2, 3], buffer)
    with pytest.raises(w.WeightsError):
        w.loads(buffer.getvalue(), like=ours)


def test_a_compressed_record_is_refused_before_it_is_unpacked():
    # (a deflated record of 973 KB unpacked to 954 MB before any check; dumps stores entries)
    ours = _weights(0)
    deflated = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(w.dumps(ours))) as stored, \
            zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as packed:
        for entry in stored.infolist():
            packed.writestr(entry.filename, stored.read(entry))
    with pytest.raises(w.WeightsError, match="compressed"):
        w.loads(deflated.getvalue(), like=ours)
    buffer = io.BytesIO()
    torch.save(ours, buffer, _use_new_zipfile_serialization=False)  # the legacy format
    with pytest.raises(w.WeightsError):
        w.loads(buffer.getvalue(), like=ours)


def test_a_peers_tensors_that_require_grad_are_loaded_as_plain_values():
    ours = _weights(0)
    tracked = {k: t.clone().requires_grad_(True) for k, t in ours.items()}
    buffer = io.BytesIO()
    torch.save(tracked, buffer)
    back = w.loads(buffer.getvalue(), like=ours)
    assert not any(t.requires_grad for t in back.values())
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_weighted_average_weighs_by_readings_and_falls_back_to_equal_weights():
    a, b = _weights(1), _weights(2)
    avg = w.weighted_average([(a, 3.0), (b, 1.0)])
    for k in a:
        torch.testing.assert_close(avg[k], 0.75 * a[k] + 0.25 * b[k])
    equal = w.weighted_average([(a, 0.0), (b, 0.0)])
    for k in a:
        torch.testing.assert_close(equal[k], 0.5 * a[k] + 0.5 * b[k])


def test_rebased_keeps_what_was_learned_since_the_base_and_is_exact_without_it():
    base, target = _weights(1), _weights(2)
    current = {k: t + 0.5 for k, t in base.items()}
    moved = w.rebased(current, base, target)
    for k in base:
        torch.testing.assert_close(moved[k], target[k] + 0.5)
    same = w.rebased(base, base, target)  # nothing learned: exactly the target
    assert all(torch.equal(same[k], target[k]) for k in target)
    assert w.distance(target, target) == 0.0 and w.distance(base, target) > 0


def test_sparse_or_meta_tensors_of_the_right_shape_are_refused():
    ours = _weights(0)
    name = next(iter(ours))
    for odd in (ours[name].to_sparse(), torch.empty(ours[name].shape, device="meta")):
        with pytest.raises(w.WeightsError):
            w.loads(w.dumps({**ours, name: odd}) if odd.device.type != "meta"
                    else _saved({**ours, name: odd}), like=ours)


def _saved(weights) -> bytes:
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    return buffer.getvalue()


def test_set_weights_replaces_the_weights_and_keeps_the_optimizers_moments():
    learner = Learner(LearnerConfig(hidden_size=8, initial_capacity=4, train_every=1,
                                    min_update_windows=1, tbptt_steps=2))
    fleet = Batch.from_arrays(["a", "b"] * 40, np.repeat(np.arange(40.0), 2) * 60,
                              np.sin(np.arange(80.0))[:, None])
    learner.step(fleet)
    assert learner.updates > 0
    before = copy.deepcopy(learner.trainer.optimizer.state_dict()["state"])  # not references
    other = _weights(3)
    learner.set_weights(other)
    assert all(torch.equal(learner.weights()[k], other[k]) for k in other)
    after = learner.trainer.optimizer.state_dict()["state"]
    assert before.keys() == after.keys() and all(
        torch.equal(before[i][m], after[i][m]) for i in before for m in before[i])
