"""TBPTT windows tile each sensor's readings without a gap, and queue for updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamer.core import Batch, Learner, LearnerConfig
from streamer.core.normalizer import SensorStats
from streamer.core.windows import STAGGER_GROUP, WindowBatch, WindowQueue
from tests.core.conftest import chunks, sine_fleet

K = 4
NO_TRAINING = dict(hidden_size=8, tbptt_steps=K, train_every=10**9, warmup_readings=2,
                   initial_capacity=4, device="cpu")


def _untrained_learner() -> Learner:
    learner = Learner(LearnerConfig(**NO_TRAINING))
    with torch.no_grad():  # a non-zero head, so the state matters to the forecasts
        learner.model.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    return learner


def test_windows_follow_each_other_so_every_reading_is_trained_on():
    stream = sine_fleet(3, 5 * K + 2, seed=4, log10_scale=(0, 0))
    learner = _untrained_learner()
    for part in chunks(stream, 5):
        learner.step(part)
    queue = learner.state.queue
    # Readings 0..5K+1 of each sensor: windows 0..4 full (the reading after each k-th gives
    # its last target), window 5 has 2 inputs and waits.
    assert sorted(queue.slots.tolist()) == sorted([0, 1, 2] * 5)
    assert learner.state.seen[:3].tolist() == [2, 2, 2]
    for slot in range(3):
        mine = np.flatnonzero(queue.slots == slot)
        windows = queue.take(mine)
        # The sensor's readings encoded alone: step j of the tiling holds reading j's inputs
        # and, as its target, the change to reading j + 1; readings 0..5K-1 in order.
        cfg = learner.config
        alone = SensorStats(1, 1, cfg.norm_alpha, cfg.warmup_readings, cfg.clip_z)
        mine_in_stream = np.flatnonzero(np.asarray(stream.sensor_ids) == f"s{slot}")
        enc = alone.encode(np.zeros(len(mine_in_stream), dtype=np.int64),
                           stream.ts[mine_in_stream], stream.values[mine_in_stream])
        n_enc = enc.features.shape[1]
        inputs = windows.inputs.reshape(5 * K, -1)[:, :n_enc]
        np.testing.assert_allclose(inputs.numpy(), enc.features[: 5 * K], rtol=1e-6)
        np.testing.assert_allclose(windows.targets.reshape(-1).numpy(),
                                   enc.targets[1 : 5 * K + 1, 0], rtol=1e-6)
        np.testing.assert_array_equal(windows.mask.reshape(-1).numpy(),
                                      enc.target_valid[1 : 5 * K + 1])
        # Window w + 1 starts from the state window w ended in (weights unchanged here).
        for w in range(4):
            _, (h, c) = learner.model(windows.inputs[w : w + 1],
                                      (windows.h0[:, w : w + 1], windows.c0[:, w : w + 1]))
            torch.testing.assert_close(h, windows.h0[:, w + 1 : w + 2], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c, windows.c0[:, w + 1 : w + 2], rtol=1e-5, atol=1e-6)


def test_queued_windows_do_not_depend_on_how_the_stream_is_cut():
    stream = sine_fleet(5, 4 * K + 3, seed=6, log10_scale=(0, 0))
    one, many = _untrained_learner(), _untrained_learner()
    for part in chunks(stream, 1):
        one.step(part)
    many.step(stream)
    a, b = one.state.queue, many.state.queue  # in the order of the readings that filled them
    assert a.slots.tolist() == b.slots.tolist() == [0, 1, 2, 3, 4] * 4
    for name in ("inputs", "targets", "mask", "h0", "c0"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6)


def _windows_filled_per_sweep(n: int, sweeps: int) -> list[int]:
    learner = _untrained_learner()
    filled = []
    for sweep in chunks(sine_fleet(n, sweeps, seed=7, log10_scale=(0, 0)), n):
        before = learner.state.queue.slots.size
        learner.step(sweep)
        filled.append(learner.state.queue.slots.size - before)
    return filled


def test_a_large_fleet_started_together_fills_its_windows_spread_over_k_sweeps():
    # One reading per sensor per sweep: unstaggered, all windows would fill in the same sweep
    # every K sweeps (at 100k sensors: one sweep carrying every update).
    n = STAGGER_GROUP * K
    filled = _windows_filled_per_sweep(n, 6 * K)
    assert filled[0] == 0 and sum(filled) > 4 * n
    assert max(filled[K:]) == min(filled[K:]) == n // K  # after the first K sweeps: every sweep
    # A fleet smaller than a stagger group fills its few windows together (nothing to spread).
    small = _windows_filled_per_sweep(STAGGER_GROUP // 2, 3 * K)
    assert small == [STAGGER_GROUP // 2 if s % K == 0 and s else 0 for s in range(3 * K)]


def test_a_short_first_window_trains_exactly_as_a_window_of_its_own_length():
    learner = _untrained_learner()
    slot = 2 * STAGGER_GROUP  # its first window: K - 2 steps, then 2 masked
    learner.step(sine_fleet(slot + 1, K, seed=8, log10_scale=(0, 0)))
    queue = learner.state.queue
    short = queue.take(np.flatnonzero(queue.slots == slot))
    assert len(short) == 1 and not short.mask[0, K - 2 :].any()
    trimmed = WindowBatch(short.slots, short.inputs[:, : K - 2], short.targets[:, : K - 2],
                          short.mask[:, : K - 2], short.h0, short.c0)
    grads = []
    for window in (short, trimmed):
        learner.model.zero_grad()
        loss, _, steps = learner.trainer.backward(window)
        grads.append((float(loss.detach()), int(steps),
                      [p.grad.clone() for p in learner.model.parameters()]))
    assert grads[0][:2] == pytest.approx(grads[1][:2], rel=1e-6)
    for a, b in zip(grads[0][2], grads[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_queue_order_is_the_order_of_the_readings_that_filled_the_windows():
    # s0's 5th and 9th readings fill its first two windows, then s1's 5th fills its first:
    # queued s0, s0, s1 however the stream is cut (in one micro-batch both first windows are
    # closed by the LSTM call over the readings' second part, s0's second by the third).
    ids = ["s0"] * 9 + ["s1"] * 5
    ts = 1.7e9 + 600.0 * np.r_[np.arange(9), np.arange(5)]
    stream = Batch.from_arrays(ids, ts, np.sin(np.arange(14.0)))
    one, many = _untrained_learner(), _untrained_learner()
    for part in chunks(stream, 1):
        one.step(part)
    many.step(stream)
    assert one.state.queue.slots.tolist() == many.state.queue.slots.tolist() == [0, 0, 1]


def test_an_update_trains_the_oldest_queued_windows_and_removes_them():
    learner = _untrained_learner()
    learner.step(sine_fleet(3, 3 * K + 1, seed=5))
    assert len(learner.state.queue) == 9
    stats = learner.train_now()
    assert stats.slots == 9 and len(learner.state.queue) == 0 and learner.updates == 1


def test_evicting_a_sensor_drops_its_queued_windows():
    learner = _untrained_learner()
    learner.step(sine_fleet(3, 2 * K + 1, seed=5))
    learner.release(np.array([1]))
    assert sorted(learner.state.queue.slots.tolist()) == [0, 0, 2, 2]


def _windows(slots: list[int]) -> WindowBatch:
    n = len(slots)
    value = torch.tensor(slots, dtype=torch.float32)
    return WindowBatch(np.array(slots), value[:, None, None].expand(n, 2, 3).clone(),
                       torch.zeros(n, 2, 1), torch.ones(n, 2, 1),
                       value[None, :, None].repeat(1, 1, 4), torch.zeros(1, n, 4))


def test_queue_keeps_at_most_its_limit_dropping_the_oldest():
    queue = WindowQueue(1, 4, 2, 3, 1, torch.device("cpu"), limit=3)
    queue.push(_windows([1, 2]))
    queue.push(_windows([3, 4]))
    assert queue.view().slots.tolist() == [2, 3, 4]
    assert queue.view().inputs[:, 0, 0].tolist() == [2.0, 3.0, 4.0]
    assert queue.view().h0[0, :, 0].tolist() == [2.0, 3.0, 4.0]
    queue.push(_windows([5, 6, 7, 8]))
    assert queue.view().slots.tolist() == [6, 7, 8]
    taken = queue.take(2)
    assert taken.slots.tolist() == [6, 7] and queue.view().slots.tolist() == [8]


def test_updates_wait_for_one_more_window_every_16_updates_up_to_min_update_windows():
    cfg = LearnerConfig(**{**NO_TRAINING, "train_every": 1, "min_update_windows": 3})
    learner = Learner(cfg)
    updates = []
    for part in chunks(sine_fleet(1, 4 * (16 + 2 * 16 + 3 * 4) + 1, seed=3), 7):
        updates += learner.step(part).updates
    assert [u.slots for u in updates] == [1] * 16 + [2] * 16 + [3] * 4
