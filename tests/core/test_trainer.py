"""Truncated BPTT, global-norm clipping and non-finite protection of one update."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from streamer.core import Batch, Learner, LearnerConfig
from streamer.core.windows import WindowBatch
from tests.core.conftest import sine_fleet


@pytest.fixture
def ready_learner() -> Learner:
    """A learner with one full window queued per sensor, which has not yet trained."""
    cfg = LearnerConfig(hidden_size=6, tbptt_steps=5, train_every=10**9, warmup_readings=2,
                        initial_capacity=8, device="cpu", max_grad_norm=1e-3)
    learner = Learner(cfg)
    with torch.no_grad():  # non-zero head so the LSTM weights get gradient too
        learner.model.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    learner.step(sine_fleet(4, 9, seed=3, log10_scale=(0, 0)))
    return learner


def reference_loss(model, window) -> torch.Tensor:
    """The same update's loss, written out from the LSTM equations, from the stored h0/c0."""
    lstm = model.lstm
    w_ih, w_hh, b_ih, b_hh = lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0
    h, c = window.h0[0], window.c0[0]  # (n, H): constants, nothing before the window start
    preds = []
    for t in range(window.inputs.shape[1]):
        x = window.inputs[:, t]
        i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        preds.append(model.head(torch.cat([h, x], dim=1)))
    pred = torch.stack(preds, dim=1)
    return ((pred - window.targets) ** 2 * window.mask).sum() / window.mask.sum()


def test_update_gradient_equals_hand_written_tbptt_reference(ready_learner):
    window = ready_learner.state.queue
    assert window.slots.tolist() == [0, 1, 2, 3]
    assert window.h0.grad_fn is None and not window.h0.requires_grad
    model, trainer = ready_learner.model, ready_learner.trainer
    loss, left_out, steps = trainer.backward(window)
    assert int(left_out) == 0 and int(steps) == 4 * 5 - 4
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    trainer.optimizer.zero_grad()
    ref = reference_loss(model, window)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert window.h0.grad is None  # no gradient reached the window-start state


def test_window_start_state_is_a_constant_so_earlier_history_does_not_matter(ready_learner):
    window, model, trainer = ready_learner.state.queue, ready_learner.model, ready_learner.trainer
    assert window.h0.grad_fn is None and window.c0.grad_fn is None  # no graph behind them
    loss, _, _ = trainer.backward(window)
    grads = [p.grad.clone() for p in model.parameters()]
    # The same windows starting from plain copies of their start state, with no history at all:
    # the very same loss and gradient, so nothing flowed past the window start.
    trainer.optimizer.zero_grad()
    plain = WindowBatch(window.slots, window.inputs.clone(), window.targets.clone(),
                        window.mask.clone(), window.h0.detach().clone(),
                        window.c0.detach().clone())
    again, _, _ = trainer.backward(plain)
    assert torch.equal(loss, again)
    for before, p in zip(grads, model.parameters(), strict=True):
        assert torch.equal(before, p.grad)
    assert any(g.abs().sum() > 0 for g in grads)
    assert not ready_learner.state.h0.requires_grad and ready_learner.state.h0.grad is None


def test_clipping_scales_the_gradient_to_max_norm_keeping_its_direction(ready_learner):
    window = ready_learner.state.queue
    trainer, params = ready_learner.trainer, list(ready_learner.model.parameters())
    trainer.backward(window)
    raw = [p.grad.clone() for p in params]
    raw_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in raw))
    reported = float(trainer.clip())
    assert reported == pytest.approx(raw_norm, rel=1e-5) and raw_norm > 1e-3
    applied = torch.cat([p.grad.flatten() for p in params])
    assert float(applied.norm()) == pytest.approx(1e-3, rel=1e-4)
    direction = torch.cat([g.flatten() for g in raw])
    cosine = torch.nn.functional.cosine_similarity(applied, direction, dim=0)
    assert float(cosine) == pytest.approx(1.0, abs=1e-6)


def test_update_reports_torchs_pre_clip_norm_and_clip_event(ready_learner):
    probe = copy.deepcopy(ready_learner)
    probe.trainer.backward(probe.state.queue)
    expected = float(torch.nn.utils.clip_grad_norm_(probe.model.parameters(), 1e-3))
    stats = ready_learner.train_now()
    assert stats.grad_norm == pytest.approx(expected, rel=1e-6)
    assert stats.clipped and not stats.skipped
    assert stats.slots == 4 and stats.steps == 4 * 5 - 4  # first target of each is in warm-up
    assert ready_learner.updates == 1 and len(ready_learner.state.queue) == 0


def test_window_holding_a_non_finite_number_is_left_out_while_the_others_train(ready_learner):
    ready_learner.state.queue.targets[1, 2, 0] = float("nan")
    ready_learner.state.queue.inputs[2, 0, 0] = float("inf")
    probe = copy.deepcopy(ready_learner)
    clean = probe.state.queue.take(np.array([0, 3]))
    reference_loss(probe.model, clean).backward()

    loss, left_out, steps = ready_learner.trainer.backward(
        ready_learner.state.queue)

    assert int(left_out) == 2 and int(steps) == 2 * (5 - 1)
    assert math.isfinite(float(loss.detach()))
    for (name, p), ref in zip(ready_learner.model.named_parameters(), probe.model.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_update_with_left_out_windows_applies_and_reports_them(ready_learner):
    ready_learner.state.queue.h0[0, 3, 0] = float("nan")
    before = {k: v.clone() for k, v in ready_learner.model.state_dict().items()}
    stats = ready_learner.train_now()
    assert not stats.skipped and stats.windows_left_out == 1 and stats.slots == 4
    assert ready_learner.updates == 1
    assert any(not torch.equal(v, before[k]) for k, v in ready_learner.model.state_dict().items())


def test_update_with_every_window_left_out_is_skipped_and_changes_nothing(ready_learner):
    ready_learner.state.queue.inputs[:4, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in ready_learner.model.state_dict().items()}
    stats = ready_learner.train_now()
    assert stats.skipped and stats.windows_left_out == 4
    for name, value in ready_learner.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert ready_learner.updates == 0 and not ready_learner.trainer.optimizer.state


def test_an_update_whose_every_target_is_in_warm_up_is_skipped_and_changes_nothing(
        ready_learner):
    assert not ready_learner.train_now().skipped  # Adam now has momentum to step on
    # Windows whose every target is masked, as are the first windows of new sensors within
    # their warm-up: nothing to learn from.
    fresh = sine_fleet(4, ready_learner.config.tbptt_steps + 1, seed=5, log10_scale=(0, 0))
    ready_learner.step(Batch.from_arrays([f"new-{s}" for s in fresh.sensor_ids], fresh.ts + 1e5,
                                         fresh.values))
    ready_learner.state.queue.mask[:] = 0.0
    before = {k: v.clone() for k, v in ready_learner.model.state_dict().items()}
    stats = ready_learner.train_now()
    assert stats.skipped and stats.steps == 0
    for name, value in ready_learner.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert ready_learner.updates == 1


def test_non_finite_loss_leaves_every_weight_bitwise_unchanged(ready_learner):
    with torch.no_grad():  # weights so large that every forecast, hence the loss, overflows
        ready_learner.model.head.bias.fill_(3e38)
    before = {k: v.clone() for k, v in ready_learner.model.state_dict().items()}
    stats = ready_learner.train_now()
    assert stats.skipped and not math.isfinite(stats.loss)
    for name, value in ready_learner.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert ready_learner.updates == 0 and not ready_learner.trainer.optimizer.state
    assert all(p.grad is None for p in ready_learner.model.parameters())


def test_learner_keeps_serving_after_a_skipped_update(ready_learner):
    with torch.no_grad():
        ready_learner.model.head.bias.fill_(3e38)
    assert ready_learner.train_now().skipped
    later = sine_fleet(4, 12, seed=3, log10_scale=(0, 0)).take(np.arange(36, 48))
    result = ready_learner.step(later)
    assert (result.status == 0).all() and np.isfinite(result.forecasts).all()
