"""The change scale: back soon after a flat stretch, still deaf to a one-off sentinel."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.core import Batch, Learner, LearnerConfig
from streamer.core.normalizer import SensorStats

CFG = LearnerConfig(device="cpu")


def _scales(values: np.ndarray) -> np.ndarray:
    """The change scale after each reading of one sensor read every minute."""
    stats = SensorStats(1, 1, CFG.norm_alpha, CFG.warmup_readings, CFG.clip_z)
    ts = 1.7e9 + 60.0 * np.arange(len(values))
    return stats.encode(np.zeros(len(values), dtype=np.int64), ts, values[:, None]).scale[:, 0]


def test_the_change_scale_grows_back_within_tens_of_readings_of_a_week_long_flat_stretch():
    # Flat for a week, the scale shrank to ~1e-12 of its value before; winsorized at 6
    # scales it grew back by x1.16 a reading, ~130 readings with every change an outlier
    # clipped at the model's input limit. Now the limit widens with the run of outliers, and
    # what is left is the running average's own pace (weight 0.01 a reading).
    rng = np.random.default_rng(0)
    noise = 20 + rng.normal(size=1000)
    scale = _scales(np.concatenate([noise, np.full(10_000, 20.0), 20 + rng.normal(size=200)]))
    before, flat = scale[999], scale[10_999]
    assert flat < 1e-6 * before
    back = scale[11_000:]
    assert back[20] > 0.1 * before and back[50] > 0.4 * before
    assert back.max() < 1.5 * before  # and does not overshoot


def test_a_one_off_sentinel_still_moves_the_change_scale_by_at_most_two_winsorized_steps():
    rng = np.random.default_rng(1)
    values = 20 + rng.normal(size=600)
    for at, hold in ((300, 1), (450, 3)):  # -9999 for one reading, then for three
        values[at : at + hold] = -9999.0
    scale = _scales(values)
    growth = (1 - CFG.norm_alpha + CFG.norm_alpha * CFG.clip_z**2) ** 0.5  # x1.16
    assert scale[305] < growth**2 * scale[299] * 1.01
    assert scale[455] < growth**2 * scale[449] * 1.01


@pytest.mark.parametrize(("unit", "offset"), [(1e-15, 0.0), (1.0, 5e9), (1e-9, 1e-3)])
def test_a_sensor_in_tiny_units_or_on_a_huge_offset_is_forecast_as_in_units_of_one(unit, offset):
    # (the scale's floors once set the change scale of such sensors: every change looked like
    # none, and their forecasts were worse than persistence)
    n = 1500
    noise = np.random.default_rng(0).standard_normal(n)
    base = np.sin(np.arange(n) / 8.0) + 0.05 * noise
    ts = 1.7e9 + 60.0 * np.arange(n)
    config = LearnerConfig(hidden_size=8, initial_capacity=4, train_every=10**9)
    reference = Learner(config).step(Batch.from_arrays(["s"] * n, ts, base)).forecasts[:, 0]
    shifted = Learner(config).step(Batch.from_arrays(["s"] * n, ts, offset + unit * base))
    np.testing.assert_allclose((shifted.forecasts[:, 0] - offset) / unit, reference,
                               atol=1e-3, rtol=0)


def test_a_readings_lateness_is_its_gap_in_typical_gaps_before_it():
    stats = SensorStats(1, 1, CFG.norm_alpha, CFG.warmup_readings, CFG.clip_z)
    ts = 1.7e9 + np.r_[60.0 * np.arange(50), 60.0 * 49 + 600.0, 60.0 * 49 + 660.0]
    enc = stats.encode(np.zeros(len(ts), dtype=np.int64), ts, np.ones((len(ts), 1)))
    assert enc.late[:2].tolist() == [1.0, 1.0]  # no typical gap yet
    assert enc.late[2:50] == pytest.approx(1.0)
    assert enc.late[50] == pytest.approx(10.0)  # ten minutes after the one before
    assert 0.9 < enc.late[51] < 1.0  # the typical gap grew a little with the long one


def test_the_change_scale_stays_that_of_the_changes_after_a_level_shift():
    # A counter reset from 5e6 to 20: the level's spread grows to millions while its mean
    # follows. The change scale was at least 1e-3 of that spread, so it went from 0.05 to
    # ~2,000 and every forecast's error looked like none for thousands of readings.
    rng = np.random.default_rng(2)
    walk = 20 + np.cumsum(0.05 * rng.normal(size=3000))
    walk[:1000] += 5e6
    scale = _scales(walk)
    before = scale[999]
    assert scale[1000:].max() < 2.0 * before, scale[1000:].max() / before
