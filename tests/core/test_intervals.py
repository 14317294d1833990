"""Prediction intervals hold their coverage online per sensor; surprising readings are flagged."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.core import Batch, Learner, LearnerConfig, Reason
from streamer.core.intervals import (
    LOG_STEP,
    MAX_LEVEL_Z,
    MAX_PROFILE_WEIGHT,
    MAX_SPREAD_WEIGHT,
    SPREAD_WEIGHT,
    WEIGHT_STEPS,
    Calibration,
    level_weights,
    weight_codes,
)
from streamer.core.snapshot import dumps, loads
from streamer.tools.replay import backtest
from tests.bench_intervals import paused_sensor
from tests.core.conftest import daytime_fleet

WARMUP = 200  # readings per sensor before coverage is measured (the benchmark's warm-up)


def _fleet(kind: str, n_sensors: int = 12, n_steps: int = 1500, seed: int = 0) -> Batch:
    """AR(1) sensors on different scales with noise of one ``kind``, interleaved by time."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_steps)
    series = []
    for s in range(n_sensors):
        if kind == "gaussian":
            noise = rng.normal(size=n_steps)
        elif kind == "heavy":
            noise = rng.standard_t(3, size=n_steps)
        elif kind == "heteroscedastic":  # calm and busy stretches, 4x apart
            noise = rng.normal(size=n_steps) * np.where((t // 250) % 2 == 0, 1.0, 4.0)
        elif kind == "level_shift":  # the level moves by 20 noise sd for good, mid-way
            noise = rng.normal(size=n_steps)
        else:
            raise ValueError(kind)
        x = np.zeros(n_steps)
        for i in range(1, n_steps):
            x[i] = 0.8 * x[i - 1] + noise[i]
        if kind == "level_shift":
            x += np.where(t >= n_steps // 2, 20.0, 0.0)
        series.append(10.0 ** (s % 4 - 1) * (x + 5 * s))
    values = np.stack(series, axis=1).reshape(-1)
    ids = [f"s{s}" for _ in t for s in range(n_sensors)]
    ts = np.repeat(1.7e9 + 60.0 * t, n_sensors)
    return Batch.from_arrays(ids, ts, values)


def _coverage(batch: Batch, coverage: float, n_features: int = 1) -> float:
    config = LearnerConfig(device="cpu", coverage=coverage, n_features=n_features)
    outputs, _ = backtest(batch, config, batch_size=500)
    ids = np.asarray(batch.sensor_ids)
    index_in_sensor = np.zeros(len(ids), dtype=int)
    for name in np.unique(ids):
        rows = np.flatnonzero(ids == name)
        index_in_sensor[rows] = np.arange(len(rows))
    counted = (outputs.inside >= 0) & (index_in_sensor >= WARMUP)
    return float(outputs.inside[counted].mean() / n_features)  # features inside, per reading


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "heteroscedastic", "level_shift"])
@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_fleet_coverage_is_within_two_points_of_the_target(kind, coverage):
    assert _coverage(_fleet(kind), coverage) == pytest.approx(coverage, abs=0.02)


def test_each_feature_of_a_multi_feature_sensor_holds_the_coverage():
    one = _fleet("gaussian", seed=1)
    two = _fleet("heavy", seed=2)
    values = np.stack([one.values[:, 0], two.values[:, 0]], axis=1)
    batch = Batch.from_arrays(one.sensor_ids, one.ts, values)
    assert _coverage(batch, 0.9, n_features=2) == pytest.approx(0.9, abs=0.02)


def _one_sensor(values: np.ndarray, config: LearnerConfig | None = None):
    batch = Batch.from_arrays(["x"] * len(values), 1.7e9 + 60.0 * np.arange(len(values)), values)
    outputs, _ = backtest(batch, config or LearnerConfig(device="cpu"), batch_size=64)
    return outputs


def test_interval_widens_within_50_readings_of_a_noise_increase_and_shrinks_after():
    rng = np.random.default_rng(3)
    sd = np.r_[np.full(800, 1.0), np.full(400, 5.0), np.full(800, 1.0)]
    out = _one_sensor(np.cumsum(rng.normal(size=len(sd)) * 0.2) + rng.normal(size=len(sd)) * sd)
    width = (out.upper - out.lower)[:, 0]
    before, during = width[700:800].mean(), width[850:1200].mean()
    assert width[800:850].max() > 2.5 * before  # widened within 50 readings
    assert during > 3 * before
    assert width[1900:2000].mean() < 0.5 * during  # and narrowed again


def _winkler(values: np.ndarray, out, alpha: float = 0.1) -> np.ndarray:
    """Each reading's Winkler score against the interval made with the forecast before it."""
    y, low, high = values[1:], out.lower[:-1, 0], out.upper[:-1, 0]
    return (high - low) + 2 / alpha * (np.maximum(low - y, 0) + np.maximum(y - high, 0))


def test_intervals_are_back_to_normal_width_soon_after_a_week_long_flat_stretch():
    # A machine off for a week (10,000 readings of exactly 20) comes back: its change scale
    # had shrunk with the flat stretch and takes ~100 readings to grow back, and the error
    # profile must not learn that lag as the hour's error (a bucket grew to 150x, the
    # intervals stayed 2.5x too wide over the next 3,000 readings).
    paused, _ = paused_sensor("white", 10_000, seed=4)  # 1,000 readings, flat, 3,000 more
    never, _ = paused_sensor("white", 0, seed=4)  # the same readings, never paused
    late = slice(1000, 3000)  # of the readings after the pause
    score = _winkler(paused, _one_sensor(paused))[-3000:][late].mean()
    usual = _winkler(never, _one_sensor(never))[-3000:][late].mean()
    assert score < 1.25 * usual


@pytest.mark.parametrize("with_temperature", [False, True])
def test_a_machine_off_16_hours_a_day_has_its_on_readings_covered_at_the_target(
        with_temperature):
    # Off (exactly 0) 16 hours a day: if the interval learned from those readings, its
    # quantiles and profile shrank and its integrator wound down all night, and the day's
    # readings were covered 0.72-0.79 of the time. Each feature on its own: with a second
    # feature (a temperature that always varies) the power's flat hours still teach nothing.
    rng = np.random.default_rng(8)
    t = np.arange(7 * 1440)
    on = (t % 1440) < 480
    power = np.where(on, 50 + 3 * np.sin(t / 30) + rng.normal(size=len(t)), 0.0)
    values = power[:, None]
    if with_temperature:
        values = np.column_stack([power, 20 + np.sin(t / 200) + 0.1 * rng.normal(size=len(t))])
    config = LearnerConfig(device="cpu", n_features=values.shape[1])
    out = _one_sensor(values, config)
    inside = (power[1:] >= out.lower[:-1, 0]) & (power[1:] <= out.upper[:-1, 0])
    later = np.arange(1, len(t)) >= 2 * 1440
    assert inside[later & on[1:]].mean() == pytest.approx(0.9, abs=0.03)


def _sine(n: int, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 100 + 10 * np.sin(2 * np.pi * t / 48) + rng.normal(size=n) * 0.3


def test_interval_width_is_reported_in_persistence_maes():
    # A Gaussian random walk: persistence is the best forecast, its MAE is sqrt(2/pi) sd, and
    # a 90 % interval is +-1.645 sd wide: 2 x 1.645 / 0.798 = 4.12 persistence MAEs.
    steps = np.random.default_rng(11).normal(size=3000) * 7.0
    out = _one_sensor(1e3 + np.cumsum(steps))
    assert np.nanmean(out.interval_width[500:]) == pytest.approx(4.12, rel=0.15)


def test_a_daily_sensor_learns_which_days_of_the_week_its_errors_are_large():
    # Noise 5x larger on Saturdays and Sundays: a daily sensor's interval follows the weekday
    # (its readings are all at one time of day, so the hours cannot tell them apart).
    rng = np.random.default_rng(12)
    days = np.arange(1500)
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday; Monday 0
    noise = rng.normal(size=len(days)) * np.where(weekday >= 5, 5.0, 1.0)
    batch = Batch.from_arrays(["d"] * len(days), 86_400.0 * days + 43_200.0, 100.0 + noise)
    out, _ = backtest(batch, LearnerConfig(device="cpu"), batch_size=64)
    width = (out.upper - out.lower)[:, 0]
    late = days >= 700
    # The interval made on Friday and Saturday is for a weekend reading.
    weekend_next = np.isin(weekday, [4, 5])
    assert width[late & weekend_next].mean() > 2.5 * width[late & ~weekend_next].mean()


def test_a_spike_is_flagged_and_the_readings_around_it_are_not():
    values = _sine(1500)
    values[1000] += 40
    out = _one_sensor(values)
    assert out.anomaly[1000] and out.anomaly_score[1000] > 0.999
    assert not out.anomaly[990:1000].any()
    assert not out.anomaly[1010:1100].any()


def test_the_readings_just_after_a_spike_inside_their_interval_are_not_flagged():
    # (a spike's surprise once lingered in the short-run average and flagged 2.5 of the next 9
    # readings, inside their interval, per spike of 15 sd on N(0, 1))
    for seed in range(4):
        values = np.random.default_rng(100 + seed).normal(size=3000)
        values[[1000, 1800, 2600]] += 15.0
        out = _one_sensor(values)
        for at in (1000, 1800, 2600):
            after = slice(at + 1, at + 10)
            assert out.anomaly[at] and not (out.anomaly[after] & (out.inside[after] == 1)).any()


@pytest.mark.parametrize("height", [100.0, 1e3, -1e6])
def test_a_one_off_spike_is_one_anomaly_and_its_return_is_not_a_second(height):
    # The first spike a sensor shows (a reading over clip_z of its level's spreads from its
    # level, and from its last value): the forecast made at it follows it (whether this
    # sensor's spikes revert is not known yet), and its interval was around the spike alone, so
    # the normal reading after it was flagged too (two alerts per one-point glitch). The
    # interval made at a spike spans the value before it as well.
    for seed in range(4):
        values = _sine(1500, seed)
        before = values[999]
        values[1000] = before + height
        out = _one_sensor(values)
        # (the path under test: the forecast followed the spike, it was not reverted)
        assert abs(out.forecasts[1000, 0] - values[1000]) < abs(out.forecasts[1000, 0] - before)
        assert out.anomaly[1000] and not out.anomaly[1001:1100].any(), seed
        assert out.lower[1000, 0] <= before <= out.upper[1000, 0]
        assert out.inside[1001] == 1


def _stepped(batch: Batch, size: int, restore_after: int | None = None) -> dict[str, np.ndarray]:
    """The learner's intervals and scores over ``batch`` in chunks of ``size``, restored from
    a snapshot (dumps, loads) after ``restore_after`` readings (a chunk boundary). No update:
    when the weights change depends on the cut, and the forecasts with it."""
    config = LearnerConfig(device="cpu", train_every=10**9)
    learner, parts, done = Learner(config), [], 0
    for i in range(0, len(batch), size):
        r = learner.step(batch.take(np.arange(i, min(i + size, len(batch)))))
        parts.append((r.lower, r.upper, r.expected_lower, r.expected_upper, r.anomaly_score))
        done += len(r.forecasts)
        if done == restore_after:
            learner = Learner.restore(loads(dumps(learner.snapshot())), config)
    names = ("lower", "upper", "expected_lower", "expected_upper", "score")
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}


def test_a_spikes_next_reading_is_scored_against_its_span_however_the_stream_is_cut():
    values = _sine(1100, 1)
    values[1000] = values[999] + 1e3  # the last reading of a chunk of 7 (994-1000)
    batch = Batch.from_arrays(["x"] * 1100, 1.7e9 + 60.0 * np.arange(1100), values)
    whole, cut, restored = _stepped(batch, 500), _stepped(batch, 7), _stepped(batch, 7, 1001)
    for name in whole:
        np.testing.assert_array_equal(whole[name], cut[name], err_msg=name)
        np.testing.assert_array_equal(whole[name], restored[name], err_msg=name)
    assert whole["lower"][1000, 0] <= values[999]  # spans the value before the spike
    assert whole["expected_lower"][1001, 0] == whole["lower"][1000, 0]
    assert whole["expected_upper"][1001, 0] == whole["upper"][1000, 0]


def test_a_reading_between_a_spike_and_the_value_before_it_is_inside_and_not_flagged():
    values = _sine(1200, 2)
    values[1000] = values[999] + 1e3
    values[1001] = values[999] + 500.0  # inside the interval users got: no flag on its value
    out = _one_sensor(values)
    assert out.inside[1001] == 1 and not out.anomaly[1001]


def test_a_spike_in_one_feature_spans_that_features_interval_only():
    n = 1500
    values = np.stack([_sine(n, 3), 50 + _sine(n, 4) / 10], axis=1)
    before = values[999].copy()
    values[1000, 0] += 1e3
    out = _one_sensor(values, LearnerConfig(device="cpu", n_features=2))
    assert out.anomaly[1000] and not out.anomaly[1001:1100].any()
    assert out.lower[1000, 0] <= before[0] and out.inside[1001] == 2
    assert out.upper[1000, 1] - out.lower[1000, 1] < 5.0  # feature 1: no spike, no span


def test_a_level_shift_is_flagged_at_the_shift_and_its_next_reading_is_inside():
    for seed in range(4):
        values = _sine(1500, seed)
        values[1000:] += 500.0  # for good
        out = _one_sensor(values)
        assert out.anomaly[1000] and out.inside[1001] == 1


def _outage(kind: str, seed: int, missed: int = 100, n: int = 1500) -> tuple[np.ndarray, Batch]:
    """A sensor read every minute that misses ``missed`` readings after its 1,200th; the
    readings it sent, and where it is back (index 1200)."""
    rng = np.random.default_rng(seed)
    e = rng.normal(size=n + missed)
    if kind == "random walk":
        x = np.cumsum(e)
    else:  # a slow AR(1)
        x = np.zeros(n + missed)
        for i in range(1, n + missed):
            x[i] = 0.95 * x[i - 1] + e[i]
    keep = np.r_[0:1200, 1200 + missed : n + missed]
    ts = 1.7e9 + 60.0 * np.arange(n + missed)
    return x[keep] + 50, Batch.from_arrays(["x"] * n, ts[keep], x[keep] + 50)


@pytest.mark.parametrize("kind", ["random walk", "AR(1)"])
def test_a_sensor_back_from_an_outage_is_not_flagged_for_how_far_it_drifted_meanwhile(kind):
    # (scored against the interval made for a reading one minute later, the first reading
    # after 100 missed ones was flagged for 7 of these 8 random walks and 5 of 8 AR(1)s)
    flagged = []
    for seed in range(8):
        values, batch = _outage(kind, seed)
        out, _ = backtest(batch, LearnerConfig(device="cpu"), batch_size=64)
        flagged.append(bool(out.anomaly[1200]))
        assert out.inside[1200] in (0, 1)  # scored all the same
    assert not any(flagged)


def test_the_interval_across_a_nightly_gap_covers_the_mornings_reading():
    # (the evening's interval was made for a reading half an hour later, and covered the
    # morning's 0.48 of the time, the other readings' 0.92: all of them paid for the mornings)
    batch = daytime_fleet()
    out, _ = backtest(batch, LearnerConfig(device="cpu"), batch_size=256)
    ids = np.asarray(batch.sensor_ids)
    mornings, others = [], []
    for name in np.unique(ids):
        rows = np.flatnonzero(ids == name)
        t, y = batch.ts[rows], batch.values[rows, 0]
        inside = (y[1:] >= out.lower[rows[:-1], 0]) & (y[1:] <= out.upper[rows[:-1], 0])
        night = np.diff(t) > 3 * 1800
        counted = t[1:] > t[0] + 10 * 86400  # its hours known (after a day), then warmed up
        mornings.append(inside[night & counted])
        others.append(inside[~night & counted])
    assert np.concatenate(mornings).mean() > 0.85
    assert np.concatenate(others).mean() == pytest.approx(0.9, abs=0.02)


def test_a_daytime_fleets_intervals_and_scores_do_not_depend_on_how_its_stream_is_cut():
    batch = daytime_fleet(n_sensors=3, days=6)
    # No update: when the weights change depends on the cut, and the forecasts with it.
    serve_only = LearnerConfig(device="cpu", train_every=10**9)
    outs = [backtest(batch, serve_only, batch_size=n)[0] for n in (7, 500)]
    for name in ("lower", "upper", "inside", "anomaly_score"):
        np.testing.assert_array_equal(getattr(outs[0], name), getattr(outs[1], name))
    # ... where the evenings' intervals were widened for the mornings' readings.
    ids, width = np.asarray(batch.sensor_ids), (outs[0].upper - outs[0].lower)[:, 0]
    evenings, days = [], []
    for name in np.unique(ids):
        rows = np.flatnonzero(ids == name)[:-1]
        late = (np.diff(batch.ts[ids == name]) > 3 * 1800) & (batch.ts[rows] > 1.7e9 + 3 * 86400)
        evenings.append(width[rows][late])
        days.append(width[rows][~late])
    assert np.concatenate(evenings).mean() > 2 * np.median(np.concatenate(days))


def test_a_sentinel_after_an_outage_is_still_flagged():
    for seed in range(4):
        values, batch = _outage("AR(1)", seed)
        values[1200] = -9999.0
        out, _ = backtest(Batch.from_arrays(batch.sensor_ids, batch.ts, values),
                          LearnerConfig(device="cpu"), batch_size=64)
        assert out.anomaly[1200]


@pytest.mark.parametrize("apart", [10, 20, 50])
def test_a_second_spike_soon_after_a_first_is_flagged_too(apart):
    # (the first one's excess once fattened the tail's fit so much that the second, as large,
    # was not flagged at all within 20 readings)
    hits = []
    for seed in range(4):
        values = np.random.default_rng(100 + seed).normal(size=3000)
        for at in (1000, 1800, 2600):
            values[[at, at + apart]] += 15.0
        out = _one_sensor(values)
        hits += [bool(out.anomaly[at + apart]) for at in (1000, 1800, 2600)]
    assert all(hits)


def _flags_per_1000(errors: np.ndarray) -> float:
    """Flags per 1,000 at 0.999 of readings ``errors[t]`` change scales off a forecast of 0,
    one a minute (after the first 1,000)."""
    n = len(errors)
    col, prev = errors[:, None], np.r_[0.0, errors[:-1]][:, None]
    zeros, ones = np.zeros((n, 1)), np.ones((n, 1))
    cal = Calibration(1, 1, coverage=0.9, threshold=0.999, learn_after=0)
    out = cal.calibrate(np.zeros(n, dtype=np.int64), 1.7e9 + 60.0 * np.arange(n),
                        np.full(n, 60.0), col, prev, zeros, ones, np.arange(n) > 0,
                        np.arange(n), zeros, ones, zeros, zeros, zeros)
    return 1000 * out.anomaly[1000:].mean()


@pytest.mark.parametrize("kind", ["normal", "lognormal", "exponential"])
def test_a_skewed_sensors_ordinary_readings_are_flagged_about_as_rarely_as_a_symmetric_ones(kind):
    # iid readings hold no anomaly: ~1 flag per 1,000 at 0.999. With one tail fitted to both
    # sides' excesses, the long upper tail of a count, load or flow was flagged 4.4-6 times per
    # 1,000 (the lower excesses, short, thinned its fit); now each side has its own.
    rng = np.random.default_rng(0)
    errors = {"normal": lambda: rng.normal(size=40_000),
              "lognormal": lambda: rng.lognormal(size=40_000) - 1.0,
              "exponential": lambda: rng.exponential(size=40_000) - 0.7}[kind]()
    assert _flags_per_1000(errors) < 2.5


@pytest.mark.parametrize("kind", ["0/1", "Poisson(0.5)", "Poisson(3)"])
def test_a_discrete_sensors_ordinary_repeats_are_not_a_surprising_run(kind):
    # iid 0/1 readings repeat half the time, and runs of 6-9 equal readings are ordinary. The
    # run's probability is the stuck test's to judge; averaged into the short-run surprise too,
    # each run counted twice: 7.6 flags per 1,000 at 0.999 (Poisson(0.5): 10.5, (3): 3.8).
    rng = np.random.default_rng(0)
    errors = {"0/1": lambda: rng.integers(0, 2, size=40_000) - 0.5,
              "Poisson(0.5)": lambda: rng.poisson(0.5, size=40_000) - 0.5,
              "Poisson(3)": lambda: rng.poisson(3.0, size=40_000) - 3.0}[kind]()
    assert _flags_per_1000(errors.astype(np.float64)) < 3.0


def test_a_stuck_sensor_is_flagged_within_five_readings():
    values = _sine(1500)
    values[1000:1040] = values[1000]
    out = _one_sensor(values)
    assert out.anomaly[1001:1006].any()


@pytest.mark.parametrize("threshold", [0.999, 0.999999])
def test_a_sensor_that_never_repeats_a_value_is_flagged_when_it_does(threshold):
    # A noisy random walk: persistence forecasts it well, so a stuck reading is inside its
    # interval; only its repeating the value gives it away, however strict the threshold (its
    # share of repeats, kept in steps of 1.5e-5, has fallen to 0, a probability of 1e-12).
    rng = np.random.default_rng(8)
    values = 50 + np.cumsum(rng.normal(size=3000))
    values[2500:2520] = values[2500]
    out = _one_sensor(values, LearnerConfig(device="cpu", anomaly_threshold=threshold))
    assert out.inside[2501] == 1 and out.anomaly[2501]
    assert out.anomaly_score[2501] < 1.0


def test_a_sensor_that_often_sits_at_zero_is_not_flagged_for_it():
    # On/off like a light: 0 for stretches of 20 to 80 readings, then a few readings on.
    rng = np.random.default_rng(4)
    values = []
    while len(values) < 3000:
        values += [0.0] * int(rng.integers(20, 80)) + list(rng.choice([10.0, 20.0, 30.0], 5))
    out = _one_sensor(np.array(values[:3000]))
    zeros = np.flatnonzero(np.array(values[:3000]) == 0.0)
    zeros = zeros[zeros > 1000]
    assert out.anomaly[zeros].mean() < 0.002


# A sensor whose level really moved stops being flagged within this many readings, with the
# default (learn from every reading) and when flagged readings are held back for 8 readings.
LEVEL_SHIFT_FLAGGED_AT_MOST = 20


@pytest.mark.parametrize("learn_after", [0, 8])
def test_a_level_shift_is_flagged_then_becomes_the_new_normal(learn_after):
    values = _sine(2000)
    values[1000:] += 30
    out = _one_sensor(values, LearnerConfig(device="cpu", anomaly_learn_after=learn_after))
    assert out.anomaly[1000]
    # Its run of flags ends within the bound (later flags would be unrelated ones).
    assert not out.anomaly[1000 + LEVEL_SHIFT_FLAGGED_AT_MOST : 1100].any()


def test_rejected_readings_are_never_scored_and_the_next_one_is_scored_as_usual():
    values = _sine(400)
    learner = Learner(LearnerConfig(device="cpu"))
    ts = 1.7e9 + 60.0 * np.arange(400)
    learner.step(Batch.from_arrays(["x"] * 300, ts[:300], values[:300]))
    bad = Batch.from_arrays(["x", "x", "x"], ts[300:303], np.array([np.nan, 1e305, values[302]]))
    result = learner.step(bad)
    assert list(result.status) == [Reason.NON_FINITE, Reason.VALUE_OUT_OF_RANGE, 0]
    assert list(result.anomaly_score[:2]) == [0.0, 0.0] and not result.anomaly[:2].any()
    assert list(result.inside[:2]) == [-1, -1] and np.isnan(result.lower[:2]).all()
    assert result.inside[2] in (0, 1) and np.isfinite(result.lower[2:]).all()
    assert result.lower[2, 0] <= result.forecasts[2, 0] <= result.upper[2, 0]


def test_intervals_of_a_sensor_alternating_between_plus_and_minus_1e300_stay_finite():
    values = np.where(np.arange(600) % 2 == 0, 1e300, -1e300)
    values[:300] = np.linspace(0.0, 1.0, 300)  # calm first, then the extreme
    out = _one_sensor(values)
    assert np.isfinite(out.lower).all() and np.isfinite(out.upper).all()
    assert (out.lower <= out.forecasts).all() and (out.forecasts <= out.upper).all()
    assert np.isfinite(out.anomaly_score).all()


def test_calibration_state_is_at_most_64_bytes_per_feature_per_sensor():
    for f in (1, 3):
        learner = Learner(LearnerConfig(device="cpu", n_features=f, initial_capacity=100))
        total = sum(a.nbytes for a in learner.calibration.arrays().values())
        assert total / 100 <= 64 * f


@pytest.mark.parametrize("fleet", ["every minute", "daytime only"])
def test_each_reading_is_scored_against_exactly_the_interval_its_previous_forecast_carried(
        fleet):
    # (daytime only: the evening's interval is widened for the morning's reading)
    batch = (_fleet("heteroscedastic", n_sensors=5, n_steps=400, seed=6)
             if fleet == "every minute" else daytime_fleet(n_sensors=3, days=6))
    learner = Learner(LearnerConfig(device="cpu"))
    emitted: dict[str, tuple] = {}
    checked = 0
    for start in range(0, len(batch), 37):  # micro-batches that split sensors' readings
        part = batch.take(np.arange(start, min(start + 37, len(batch))))
        result = learner.step(part)
        for i, sensor in enumerate(part.sensor_ids):
            if result.inside[i] >= 0:
                assert (result.expected_lower[i, 0], result.expected_upper[i, 0]) == \
                    emitted[sensor]
                checked += 1
            emitted[sensor] = (result.lower[i, 0], result.upper[i, 0])
    assert checked > 0.9 * len(batch)


@pytest.mark.parametrize("level", [42.0, -3.0, 1e300, 1e-5, 1e-13, -1e-300])
@pytest.mark.parametrize("every", [60.0, 600.0])
def test_a_sensor_constant_since_installed_scores_within_0_and_1_and_is_never_flagged(
        level, every):
    # Its interval narrows to a few ulps around a forecast an ulp or two off: readings inside
    # the published bounds sat past the edge in residual units (scores up to 2.7), then exactly
    # at it (21-80 flags in a row at 60 s); with no habit of varying it is not "stuck" (it had
    # ~360 flags for that); and readings at its forecast for hours must not make an ordinary
    # one look like a surprising run (56-80 flags for 1e-13 and 1e-300).
    n = 4000
    batch = Batch.from_arrays(["a"] * n, 1.6e9 + every * np.arange(n), np.full(n, level))
    out = Learner(LearnerConfig(device="cpu")).step(batch)
    assert (out.anomaly_score >= 0).all() and (out.anomaly_score <= 1).all()
    assert out.anomaly.sum() == 0


def _feed(cal: Calibration, value: float, forecast_before: float, forecast: float,
          scale_before: float, scale: float, n_scored: int = 5000, spread: float = 0.0,
          slot: int = 0, ts: float = 1.7e9, late: float = 1.0, reach: float = 0.0):
    """One scored reading of ``slot`` (one feature), read a minute after the one before
    (``late`` typical gaps after it)."""
    def one(x):
        return np.array([[x]], dtype=np.float64)

    return cal.calibrate(np.array([slot]), np.array([ts]), np.array([60.0]), one(value),
                         one(forecast_before), one(forecast_before), one(scale_before),
                         np.array([True]), np.array([n_scored]), one(forecast), one(scale),
                         one(spread), one(0.0), one(0.0), np.array([late]), one(reach))


def test_a_late_reading_changes_its_own_score_only_not_any_interval_nor_what_is_learned():
    rng = np.random.default_rng(21)
    on_time, late = (Calibration(1, 1, coverage=0.9, threshold=0.999, learn_after=0)
                     for _ in range(2))
    for i in range(400):
        value = float(rng.normal()) * (1.0 if i != 300 else 6.0)
        gap = 30.0 if i == 300 else 1.0  # reading 300 comes 30 typical gaps late
        a = _feed(on_time, value, 0.0, 0.0, 1.0, 1.0, n_scored=i + 1, ts=1.7e9 + 60 * i)
        b = _feed(late, value, 0.0, 0.0, 1.0, 1.0, n_scored=i + 1, ts=1.7e9 + 60 * i,
                  late=gap, reach=10.0)
        for name in ("lower", "upper", "expected_lower", "expected_upper", "inside"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        if i == 300:
            assert a.inside[0] == 0 and a.anomaly[0]  # 6 sd: flagged on time
            assert b.score[0] < a.score[0] and not b.anomaly[0]  # not after 30 minutes
    # Besides the short-run surprise, only the tail (which sets scores, not bounds) learned
    # otherwise: a flagged reading's excess counts no further out than a flag's.
    for name, values in on_time.arrays().items():
        if name not in ("short", "long_mean", "long_var", "tail", "tail_sq"):
            np.testing.assert_array_equal(values, late.arrays()[name], err_msg=name)


def test_a_reading_within_a_few_ulps_of_its_forecast_is_inside_an_interval_narrowed_to_a_point():
    cal = Calibration(1, 1, coverage=0.9, threshold=0.999, learn_after=0)
    cal.q_lo[:], cal.q_hi[:] = 0.0, 0.0  # quantiles shrunk onto the forecast
    value = -3.0
    forecast = np.nextafter(np.nextafter(value, 0.0), 0.0)  # two ulps off
    out = _feed(cal, value, forecast, forecast, 1e-12, 1e-12)
    assert out.inside[0] == 1 and out.expected_lower[0, 0] < value < out.expected_upper[0, 0]
    assert out.lower[0, 0] < value < out.upper[0, 0]


def test_readings_well_inside_after_hours_at_the_forecast_are_not_a_surprising_run():
    # Hours of readings exactly at the forecast leave the long-run surprise near 0; readings a
    # third of the way to the interval's edge (p ~ 0.7) must not then look like a surprising run.
    cal = Calibration(1, 1, coverage=0.9, threshold=0.999, learn_after=0)
    cal.q_lo[:], cal.q_hi[:] = -1.0, 1.0
    cal.long_mean[:], cal.short[:] = 0.004, 0.0
    flags = [_feed(cal, 100.0 + 0.35 * k, 100.0 + 0.35 * (k - 1), 100.0 + 0.35 * k, 1.0, 1.0)
             .anomaly[0] for k in range(1, 21)]
    assert not any(flags)


def test_the_error_profile_does_not_learn_while_the_change_scale_recovers():
    # The scale grows by 20 % at each reading (a sensor back from a flat stretch) and every
    # error is 50 scales: the first two readings count, from the third in a row on none does.
    cal = Calibration(1, 1, coverage=0.9, threshold=0.999, learn_after=0)
    profiles, scale = [], 1e-6
    for k in range(6):
        _feed(cal, 50.0 * scale * (k + 1), 50.0 * scale * k, 50.0 * scale * (k + 1), scale,
              1.2 * scale)
        profiles.append(cal.profile.copy())
        scale *= 1.2
    assert not np.array_equal(profiles[0], profiles[1])
    assert all(np.array_equal(profiles[1], p) for p in profiles[2:])


def _stream(cal: Calibration, errors: np.ndarray, spreads: np.ndarray, gap: float,
            levels: np.ndarray | None = None) -> None:
    """Readings of slot 0 (one feature) ``gap`` seconds apart, each ``errors[t]`` scales off the
    forecast made at the one before, forecasts made with the experts' spread ``spreads[t]`` at
    ``levels[t]`` level spreads from the sensor's level (0 if not given)."""
    n = len(errors)
    col = errors[:, None].astype(np.float64)
    prev = np.r_[0.0, errors[:-1]][:, None]
    zeros, ones = np.zeros((n, 1)), np.ones((n, 1))
    z = (np.zeros(n) if levels is None else levels)[:, None]
    z_before = np.r_[0.0, z[:-1, 0]][:, None]
    for i in range(n):  # one reading per call, as a sensor's readings arrive
        rows = slice(i, i + 1)
        cal.calibrate(np.array([0]), np.array([1.7e9 + gap * i]), np.array([gap]), col[rows],
                      prev[rows], zeros[rows], ones[rows], np.array([i > 0]),
                      np.array([i]), zeros[rows], ones[rows], spreads[rows, None], z[rows],
                      z_before[rows])


def _learned_spread_weight(errors_follow_spread: float) -> float:
    rng = np.random.default_rng(11)
    spreads = rng.choice([0.0, 1.5], size=4000)
    d_before = np.r_[0.0, spreads[:-1]]  # the spread the forecast a reading is scored on had
    errors = rng.normal(size=4000) * (1.0 + errors_follow_spread * d_before)
    cal = Calibration(1, 1, coverage=0.9, threshold=0.999, learn_after=0)
    _stream(cal, errors, spreads, gap=60.0)
    return float(cal.spread_weight[0, 0]) * MAX_SPREAD_WEIGHT / WEIGHT_STEPS


def test_the_experts_spread_weighs_in_the_width_as_much_as_it_foretells_the_errors():
    assert _learned_spread_weight(0.0) < 0.3  # from 1: errors that ignore it, width that does
    assert _learned_spread_weight(2.0) > 1.5  # errors 4x larger when the experts disagree


def _learned_level_weight(errors_follow_level: float, seed: int = 13) -> float:
    """Forecasts made anywhere within the clip of the level spreads from the sensor's level;
    their errors exp(c z) times larger there (c = ``errors_follow_level``): a count, a load, a
    flow errs more when high (c > 0), a reading near a saturation less."""
    rng = np.random.default_rng(seed)
    levels = rng.uniform(-MAX_LEVEL_Z, MAX_LEVEL_Z, size=4000)
    z_before = np.r_[0.0, levels[:-1]]
    errors = rng.normal(size=4000) * np.exp(errors_follow_level * z_before)
    cal = Calibration(1, 1, coverage=0.9, threshold=0.999, learn_after=0)
    _stream(cal, errors, np.zeros(4000), gap=60.0, levels=levels)
    return float(level_weights(cal.level_weight)[0, 0])


@pytest.mark.parametrize("c", [-0.3, 0.0, 0.3])
def test_the_width_follows_the_forecasts_place_in_the_sensors_range_as_much_as_the_errors_do(c):
    # From 0, within 4,000 readings.
    assert abs(_learned_level_weight(c) - c) < 0.15


def _profile_weight_after(errors_follow_profile: float, seed: int = 12) -> float:
    """A daily sensor's profile says Mondays and Tuesdays err 4x more than other days; its
    errors (three years of them) are that much larger on those days, or not."""
    n = 3 * 365
    ts = 1.7e9 + 86_400.0 * np.arange(n)
    weekday_before = np.r_[0, (np.floor(ts / 86_400.0) + 3) % 7][:n]  # the forecast's day
    errors = np.random.default_rng(seed).normal(size=n)
    errors *= np.where(weekday_before < 2, errors_follow_profile, 1.0)
    cal = Calibration(1, 1, coverage=0.9, threshold=0.999, learn_after=0)
    cal.profile[0, 0, :] = -LOG_STEP  # log2 of 0.5 ...
    cal.profile[0, 0, :2] = LOG_STEP  # ... and 2 (Monday, Tuesday)
    _stream(cal, errors, np.zeros(n), gap=86_400.0)
    return float(cal.profile_weight[0, 0]) * MAX_PROFILE_WEIGHT / WEIGHT_STEPS


def test_a_daily_sensor_stops_following_an_error_profile_its_errors_no_longer_have():
    # The weekly buckets relearn slowly (a reading each a week); the profile's weight in the
    # width fades meanwhile, so the width stops swinging by the weekday for nothing. One whose
    # errors do follow the profile keeps it (from 1; seeds 0-4: 0.49-0.58 against 0.86-1.09).
    assert _profile_weight_after(1.0) < 0.7
    assert _profile_weight_after(4.0) > 0.8


@pytest.mark.parametrize("spread", [6.0, 1.0])
def test_the_width_weights_do_not_learn_while_the_change_scale_recovers(spread):
    # A sensor back from a flat stretch: its scale grows 20 % a reading and every reading
    # misses by 50 scales. Misses would drive b up (from 1 to 4 within 9 readings, when the
    # experts' spread, in those shrunken scales, sat at its clip); from the third reading in a
    # row of fast growth on, the weights hold. At a steady scale the same misses do move them.
    cal = Calibration(1, 1, coverage=0.9, threshold=0.999, learn_after=0)
    weights, scale = [], 1e-6
    for k in range(6):
        _feed(cal, 50.0 * scale * (k + 1), 50.0 * scale * k, 50.0 * scale * (k + 1), scale,
              1.2 * scale, n_scored=k + 1, spread=spread)
        weights.append((cal.spread_weight.copy(), cal.profile_weight.copy()))
        scale *= 1.2
    assert all(np.array_equal(w[0], weights[1][0]) for w in weights[2:])
    steady = Calibration(1, 1, coverage=0.9, threshold=0.999, learn_after=0)
    before = steady.spread_weight.copy()
    for k in range(1, 6):
        _feed(steady, 50.0 * k, 50.0 * (k - 1), 50.0 * k, 1.0, 1.0, n_scored=k + 1,
              spread=min(spread, 5.0))
    assert (steady.spread_weight > before).all()


def test_a_sensor_learns_the_same_interval_state_whichever_slot_it_holds():
    # A hand-over puts a sensor in another worker's slot; its interval weights, rounded to
    # uint16 codes with a reproducible dither, must round as they would have where it was.
    rng = np.random.default_rng(3)
    alone = Calibration(1, 1, coverage=0.9, threshold=0.999, learn_after=0)
    third = Calibration(3, 1, coverage=0.9, threshold=0.999, learn_after=0)
    forecast = 0.0
    for k in range(1, 400):
        value = forecast + rng.standard_t(3)
        nxt = 0.9 * value
        spread = float(rng.uniform(0.0, 3.0))
        args = (value, forecast, nxt, 1.0, 1.0, k, spread)
        a = _feed(alone, *args, ts=1.7e9 + 600.0 * k)
        b = _feed(third, *args, slot=2, ts=1.7e9 + 600.0 * k)
        for out in ("lower", "upper", "score", "anomaly", "inside"):
            assert np.array_equal(getattr(a, out), getattr(b, out)), (k, out)
        forecast = nxt
    for name, values in alone.arrays().items():
        assert np.array_equal(values[0], third.arrays()[name][2]), name
    assert alone.spread_weight[0, 0] != weight_codes(SPREAD_WEIGHT, MAX_SPREAD_WEIGHT, ())
