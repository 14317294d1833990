"""Prediction intervals and anomaly scores, calibrated online per sensor.

**Intervals.** Every forecast carries ``[lower, upper]`` meant to hold the next reading with
probability ``coverage`` (1 - alpha). They are built on the sensor's normalized residuals

    r = (reading - forecast made before it)
        / (change scale * error profile ** g * (1 + b * d) * exp(k * z))

The change scale is the sensor's typical change (normalizer.py: the unit its errors are scored
in), so a noisier period widens the interval at once. The error profile is the sensor's mean
absolute error in that unit for forecasts made at each of ``N_BUCKETS`` times of day (UTC), or
on each day of the week for a sensor read about daily or less often, kept online: errors are
larger at some hours (a car park filling in the morning, a building's load at opening time, the
forecast made at the last reading before a nightly gap), and a width that follows the hour is
narrower at the quiet ones and still covers the busy ones (Winkler
score on the car-park fleet 6.5 -> 4.8, docs/benchmarks/intervals.md). The bucket is that of
the reading the forecast is made at, not of the (unknown) time of the next one. ``d`` is how
much the sensor's experts (experts.py) disagree about the next reading: their weighted spread
around the forecast, in change scales. When the LSTM, the seasonal profiles and persistence
point different ways the forecast is less sure, and the interval says so (Winkler a further
1-5 % lower on every shared fleet). ``z`` is where the forecast lies in the sensor's range:
its distance from the sensor's level (the normalizer's running mean) in level spreads, within
+-1.5. Counts, loads and flows err more when they are high, a reading near a saturation less:
on the shared fleets k settles at 0.2-0.9 for a building's appliances' power and lights,
hourly PM2.5, road occupancy, wind power, bike rentals and traffic, -0.2..+0.2 for most
temperatures, -0.25 for outdoor humidity; Winkler against the running quantile 0.8-3 points
better on every shared fleet.

How much each of the three shapes the width, ``b`` for the disagreement, ``g`` for the
profile (as ``mean * (bucket / mean) ** g``: the profile's hours at their full contrast at
1, flat at 0) and ``k`` for the place in the range (from 0: no effect until the errors show
one), is learned per sensor and feature by online gradient descent on the interval
(Winkler) score of each scored reading: for the interval scaled by ``e**eps`` that score's
derivative at 0, per unit of width, is ``G = 1 - (hi [missed above] - lo [missed below]) /
(alpha/2 (hi - lo))``, positive (narrower is better) when the reading fell inside, strongly
negative when it missed, zero on average when the misses do not depend on the shape; each
weight then steps against ``G`` times the derivative of the log width in it. A sensor whose
errors do not grow with the experts' disagreement (daily births: correlation -0.03) or do not
follow the hours (a daily sensor's weekday buckets, outdoor temperatures) no longer gets a
width that moves without reason, which cost it misses at the same mean width; one whose
errors do keeps or raises it (Winkler 0.5-2.4 % lower on every shared fleet,
docs/benchmarks/intervals.md).

Per sensor and feature two online quantiles of ``r`` are tracked, one per tail (alpha/2 each,
so an asymmetric error distribution gets an asymmetric interval), by conformal PID control
(Angelopoulos, Candès, Tibshirani, "Conformal PID control for time series prediction", 2023):

- quantile tracking (the P term): ``q += lr * w * (miss - alpha/2)`` after every scored
  reading, ``w`` the current width in these units: O(1), no stored window; whatever the data,
  the sum of those steps telescopes to the change of ``q``, which is bounded, so each tail's
  long-run miss rate (weighted by the width at each step) is alpha/2;
- an integrator of the coverage error (the I term): ``S += miss - alpha`` over both tails, and
  the bounds used are ``q -+ gain * w * tanh(S log t / (t c))`` after ``t`` scored readings
  (the paper's saturation, with tanh for its tan so that it stays finite): a sensor whose
  misses run above alpha for a while gets wider intervals until its coverage is back on
  target, which the quantiles alone, taking small steps, do only slowly.

**Anomaly score.** For each reading, how surprising it is given the forecast made before it,
as ``1 - p`` with ``p`` a two-sided tail probability of its residual against the sensor's own
residual distribution: inside the interval ``p`` falls linearly from 1 at its centre to alpha
at its edge; beyond it, ``p = alpha * P(excess)`` under a generalized Pareto tail fitted to
the running moments of the excesses over the bound (peaks over threshold, as SPOT: Siffer et
al., "Anomaly detection in streams with extreme value theory", KDD 2017), one tail per side:
a count, a load or a flow has a long upper tail and a short lower one (pooled, the lower
excesses thinned the fit of the upper ones: 5.4 false flags per 1,000 on iid lognormal
readings at 0.999, 1.8 per side; docs/benchmarks/intervals.md). A stuck sensor is
scored too: the same reading ``k`` times in a row has probability ``P(repeat) * P(repeat after
a repeat) ** (k - 1)``, both running shares of this sensor's own readings (once it has varied
since it was first scored: one constant since then has no habit to be stuck against). As in
the anomaly likelihood of Numenta's HTM detector, the short-run surprise also counts:
``-ln p`` averaged over the last few readings, against that average's own long-run mean and
spread for this sensor, gives a second tail probability (a sustained run of misses that no
single reading shows); the average of positive, skewed surprises is treated as
Gamma-distributed with those moments (Wilson-Hilferty's cube-root normal approximation), not
as normal. The score is ``1 - min`` of the two; a reading scoring at least the threshold is
flagged.

**A late reading** (a sensor back from an outage, a car park's first reading of the morning)
is ``late`` typical gaps after the one before: its error has had ``late`` readings' worth of
change to grow. Its interval's unit ``u`` (value units) is widened by ``sqrt(1 + (late - 1)
c^2 / u^2)``, ``c`` the change scale (the spread of a random walk after ``late`` steps), but to
no more than ``u`` or how far any reading of the sensor lies from that forecast, whichever is
more: ``hypot(forecast - level, level sd)`` (``late_reach``, as they were when the forecast was
made). White noise is not widened (its unit is that far already); a random walk or a slow
AR(1) is, as far as its own range, so a reading beyond it (a -9999 after an outage) is still
flagged (and no interval is widened more than MAX_LATE_WIDENING times). Two cases:

- the next reading is *expected* late: a sensor that never reports at night (known once it
  has been read for about a day, its readings times its typical gap: its day profile,
  memory.py) is next read in the morning. The
  interval published with the evening's forecast is widened for that many gaps (rounded to a
  power of 2, up to 128, and kept in 3 bits of ``last_bucket``, so that the reading is scored
  against exactly that interval), and the calibration learns in the widened unit. Measured on
  the car-park fleet: the evening's interval covered the morning's reading 0.65 of the time
  and every other reading 0.913 (all of them paid for the mornings), now 0.86 and 0.901;
  Winkler 4.32 -> 3.86. The other readings' narrower intervals cost flags: 4.4 -> 5.9 per
  1,000 of them, 5.7 -> 5.6 over all readings with the mornings' 27 per 1,000 gone (below).
  With a horizon, steps 2..H are widened by their own calibration (horizon.py);
- it comes later than expected (an outage): it is *scored* against the published interval
  widened for the time it had (its ``p``; whether it counts as inside and what the
  calibration learns are as published). A random walk's first reading after 100 missed ones
  was flagged 90 % of the time, none now; the shared fleets' readings after a gap of over 3
  typical ones were flagged 2.7 % (parking), 13.8 % (hourly) and 4.5 % (daily) of the time,
  now 0, 0.4 and 0 % (docs/benchmarks/intervals.md).

**A spike** (a reading over ``clip_z`` of its level's spreads from the level and from the
reading before it, normalizer.py) whose forecast follows it (experts.py reverts only the
spikes of a sensor whose spikes have reverted before) may be a one-off: the interval published
with it spans the interval around that forecast and the same around the value before the
spike, whose part is widened as for a reading one gap late (that value is two readings old
when the next one comes). The next reading is inside or not as that span says, and its
residual, score and error are taken from the part whose value it is nearer; inside the span its
``p`` is at least what its place in the whole span gives (a reading inside the interval users
got is not flagged for its value). A first glitch's
return was flagged as a second anomaly (a sine with one reading 1,000 off: flags at the spike
and the two readings after it; now at the spike only); a level shift is flagged where it
happens as before. On the shared fleets coverage, Winkler and flags per 1,000 are unchanged
within 0.001 (docs/benchmarks/intervals.md). No state of its own: the spike's code in the
sensor statistics' ``last_outlier`` (2: not reverted; learner.py) and the value before it.

With several features each has its own interval at the coverage, and the least
likely one counts, Bonferroni-corrected (times the number of features).

With ``learn_after`` > 0, flagged readings do not move the calibration (a spike then does not
widen later intervals) until a sensor has been flagged that many readings in a row: then it is
the new normal and is learned from, so a level shift stops being flagged within a bounded
number of readings. The default learns from every reading: on the shared fleets holding the
flagged readings back cost coverage (they are exactly the misses the quantiles must see). The
model itself trains on every reading (its targets are winsorized at clip_z). The forecast
always lies inside its own interval, and the bounds are always finite.

State: per slot and feature 3 float32, 4 uint16 and ``N_BUCKETS`` + 5 int16 (46 bytes); per
slot 3 float32, 2 uint16 and 2 uint8 (18 bytes): 64 bytes per sensor at one feature. The place
in the range needs no state of its own: the normalizer gives the level and its spread as they
were at the previous reading (the same floats), so ``z`` is computed again when a reading is
scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from streamer.core.compiled import kernel
from streamer.core.config import MAX_LEARN_AFTER
from streamer.core.normalizer import SECONDS_PER_DAY

# Quantile tracking step, as a share of the interval's width (its own scale, as the paper's
# step is a share of the scores' range). Every constant below was chosen on all four shared
# fleets at once (docs/benchmarks/intervals.md has the sweeps). 0.02 until the width's shape
# was learned per sensor (below); with it 0.01 is 0.1-0.7 % better on every fleet.
TRACK_LR = 0.01
# The integrator: its weight (in widths), and the average coverage error over the sensor's
# history (scaled by log t, as the paper's saturation function) at which it is 3/4 saturated.
# The paper's form, not a leaky one: on the car-park fleet, whose error pattern drifts with the
# weeks, a leaky integrator (95 % per reading) left coverage at 0.889; this one at 0.897.
I_GAIN, I_SATURATION = 0.5, 0.1
# Weight of the experts' disagreement in the width (b), learned per sensor and feature in
# [0, MAX_SPREAD_WEIGHT], and of the error profile's contrast (g) in [0, MAX_PROFILE_WEIGHT]:
# where a new sensor starts, and the steps of the gradient descent (see the module docstring).
# A fixed b of 2 was best or within 1 % of it on each shared fleet (0.5 / 1 / 2 / 4 / 8).
# Learned from b = 1, g = 1 with these steps (and TRACK_LR 0.01): Winkler -2.1 / -0.5 / -2.4 /
# -1.5 % (appliances / parking / hourly / daily). Swept: b's step 0.03-0.3 (0.1 best on
# daily and parking), its start 0-2 (0 best on daily, 2 on parking), g's step 0.001-0.03 (0.03
# let one sensor's g wander from 0 to 1 within 200 readings: the score's derivative is +1 or
# about -9 per reading, so a large step is a noisy one; docs/benchmarks/intervals.md).
SPREAD_WEIGHT, MAX_SPREAD_WEIGHT, SPREAD_WEIGHT_LR = 1.0, 8.0, 0.1
PROFILE_WEIGHT, MAX_PROFILE_WEIGHT, PROFILE_WEIGHT_LR = 1.0, 2.0, 0.003
# And of where the forecast lies in the sensor's range (k): the width is times exp(k z), z the
# forecast's distance from the sensor's level (running mean) in level spreads, clipped to
# +-MAX_LEVEL_Z; k in [-MAX_LEVEL_WEIGHT, MAX_LEVEL_WEIGHT], from 0. Counts, loads and flows
# err more when they are high (k > 0), a sensor near a saturation less. Winkler against the
# running quantile -12.3 / -24.4 / -12.5 / -9.2 % -> -13.1 / -25.2 / -15.5 / -10.8 %
# (appliances / parking / hourly / daily). Swept (docs/benchmarks/intervals.md): the step
# 0.001-0.03 (0.0015-0.003 within 0.1 point of each other on every fleet; 0.03 cost up to 7
# points), the clip of z 1-3 and the largest k 0.3-2 (every pair tried whose largest factor
# exp(MAX_LEVEL_WEIGHT * MAX_LEVEL_Z) is e^0.75-e^2.25 within 0.55 point of the best on each
# fleet, this one within 0.2; e^3 cost hourly 1.4 points, e^5 more), z of the reading instead
# of the forecast's (daily 0.5 point worse).
LEVEL_WEIGHT, MAX_LEVEL_WEIGHT, LEVEL_WEIGHT_LR, MAX_LEVEL_Z = 0.0, 1.0, 0.002, 1.5
# All three are stored in uint16 steps of their range / WEIGHT_STEPS, a multiple of 8 so that
# the starts (and format 10's b = 2) are exact codes.
WEIGHT_STEPS = 65_528
MAX_SPREAD = 6.0  # in change scales, like the model's inputs
SPREAD_STEPS = 65_535  # it is stored in uint16 steps of MAX_SPREAD / SPREAD_STEPS (1e-4)
MIN_WIDTH = 0.05  # the width (in change scales) that sets the step when the interval is ~0
# The quantiles stay within +-this (in the units above): a sensor that misses without end (a
# reading near 1e300 after a flat stretch) cannot grow them past float32, and bounds stay
# finite (they are clipped to +-MAX_BOUND in value units as well).
MAX_QUANTILE, MAX_BOUND = 1e4, 1e308
# Each bound is at least this many float64 ulps of the forecast away from it. An interval that
# has narrowed to a few ulps around a forecast itself an ulp or two off (a constant sensor, as
# it was before FLAT_RUN) had its readings sit exactly at the edge, each one a coverage-level
# surprise, and a run of them was flagged (21-80 flags in a row for a constant -3.0, 1e-5 or
# 1e300 read every minute); readings within a few ulps of the forecast are now well inside.
# At 1e-15 of the value it changes no interval of a sensor that varies.
MIN_ULPS = 8.0
# Error profile: 8 buckets of 3 hours (24 cover the car-park fleet better, 0.899 vs 0.890
# before the integrator, but do not fit the memory budget); weight of the newest error in its
# bucket (a slow one: weighing a bucket's first errors more cost 3-14 % of Winkler score on
# appliances, whose first errors in a bucket are often exactly 0); a bucket is never below
# this share of the profile's mean (a sensor exact all night keeps a width); an error counts
# at most this many times its bucket's value (a spike moves it a little).
N_BUCKETS = 8
# A sensor whose typical gap is at least this (seconds) keys its profile by day of the week
# instead (7 of the 8 buckets): on the daily fleet Winkler 5.35 -> 5.31, p5 coverage 0.887 ->
# 0.894 (weekend and Monday errors differ from midweek ones); other fleets are sub-daily.
WEEKLY_GAP = 0.5 * SECONDS_PER_DAY
PROFILE_ALPHA, PROFILE_FLOOR, PROFILE_CAP = 0.015, 0.2, 20.0
# A sensor coming back from a flat stretch: its change scale (normalizer.py) had shrunk with it
# and takes a few readings to grow back (~10 since the normalizer widens its winsorizing after
# a run of outliers; ~130 before), and for those readings its errors are many scales: the
# profile's bucket learning them grew to 150 (normally ~0.5), intervals 3x too wide for days
# after a 2-week pause. While the scale grows by more than this at RECOVERY_RUN readings in a
# row the profile does not learn (one large change, a spike or the morning after a night's
# gap, still counts). Winkler over the 1,000 readings after a pause of 10,000 readings of a
# white-noise sensor: 4.79 with this, 5.14 without (never paused: 4.61); before the
# normalizer's faster recovery 12.6 with, 129 without (docs/benchmarks/intervals.md).
RECOVERY_GROWTH, RECOVERY_RUN = 1.1, 3
# A feature reading the same value FLAT_RUN times in a row and on (a machine switched off):
# those readings are inside any interval and say nothing about the errors it will make once it
# varies again, so the feature's interval state (quantiles, integrator, tail, profile) does
# not learn from them; each feature on its own (a machine's power may sit at 0 while its
# temperature varies). Learning from them shrank the quantiles and the profile and wound the
# integrator down by 0.1 a reading for as long as the machine was off: the interval then
# under-covered for 1,000 readings after it came back, and an on/off machine (8 h on a day)
# covered its on-readings 0.72-0.79 (now 0.89-0.90). The shared fleets: unchanged but
# appliances' coverage 0.898 -> 0.900 (its sensors sit flat for hours).
FLAT_RUN = 30
# ``last_bucket`` holds the bucket (low 3 bits), above them for how many readings in a row the
# scale has grown fast (2 bits, saturating at RECOVERY_RUN: all that is asked of it) and above
# those the code of how late the next reading was expected (3 bits, ``_late_code``): one uint8
# for all three keeps the memory budget.
BUCKET_SHIFT, MAX_FAST_RUN, LATE_SHIFT = 3, RECOVERY_RUN, 5
MAX_LATE_CODE = 7  # a next reading expected 2**7 = 128 typical gaps later or more
assert N_BUCKETS <= 1 << BUCKET_SHIFT and MAX_FAST_RUN < 1 << (LATE_SHIFT - BUCKET_SHIFT)
assert MAX_LATE_CODE < 1 << (8 - LATE_SHIFT)  # the three fields share one uint8
# Buckets are stored as log2 in int16 steps of 1/2048 octave (0.03 %, +-16 octaves); the tail's
# moments in steps of 1/1024 octave (0.07 %, +-32 octaves: a second moment of excesses up to
# 2**16 residual units; below 2**-32 is 0 for the tail's fit).
LOG_STEP, TAIL_LOG_STEP = 2048.0, 1024.0
MAX_EXCESS = 20.0  # an exceedance counts at most this many widths in the tail's moments
# Weight of the newest exceedance in its side's running moments: about the last 65 (one in ~20
# readings falls beyond a side's bound, so ~1,300 readings). The fit reads P = 1e-3 / alpha
# (1 %) of the excesses off them: from the last ~20 (0.1) its noise alone, through the
# convexity of the tail, flagged iid N(0, 1) readings 0.87 times per 1,000 instead of ~0.5
# (0.40 at 0.03; ECG windows flagged up to a threshold of 0.999999 instead of 0.9998, at 0.1
# false flags per 1,000; docs/benchmarks/intervals.md).
TAIL_ALPHA = 0.03
# A flagged reading's exceedance enters the tail's moments no further out than
# the excess the tail gave a flag's probability: a spike of 15 sd counted as 20 widths took the
# second moment from 2.3 to 6.7 times the first's square, the shape to its cap, and the next
# spike of 15 sd within 20 readings was not flagged at all (22 % at 50 readings; now 100 %).
# (A flag of one of f features needs f times less tail probability, Bonferroni; the bound is
# one feature's, so with several a flagged exceedance counts a little below the flag's excess:
# measured with 2 features, the second spike is flagged at 10 readings 1.00, against 0.92 with
# the Bonferroni bound.)
# Measured (tests/core/test_intervals.py; the shared fleets): coverage unchanged on all four,
# flags per 1,000 readings on N(0, 1) 1.74 either way, parking 5.2 -> 5.7 with the surprise cap
# below (repeats that were masked).
MAX_SHAPE = 0.45  # the tail's shape is kept below 1/2, where its variance is finite
# Short-run surprise: weight of the newest reading (~1 / readings), and of the long-run
# statistics it is compared with (max(this, 1/(n + LONG_PRIOR)): about equal weights at first).
SHORT_ALPHA, LONG_ALPHA = 0.2, 0.002
# If p were uniform (a calibrated residual distribution), -ln p would be Exp(1): mean 1, and
# its short-run average would have this variance. That is the prior (worth LONG_PRIOR readings)
# and the floor of the spread the average is compared with: a sensor whose surprise never
# varies must not turn one ordinary miss into an anomaly.
SHORT_VAR = SHORT_ALPHA / (2.0 - SHORT_ALPHA)
LONG_PRIOR = 50
# ... and the floor of the mean it is compared with (a quarter of the calibrated 1). A sensor
# whose readings all fell at its forecast for hours has a long-run surprise near 0; when its
# interval then narrowed, readings a third of the way to the edge (p ~ 0.7, as ordinary as
# readings get) were flagged as a surprising run: 56-80 flags in a row for a constant 1e-13
# or 1e-300. No sensor of the shared fleets has its mean this low (their flags are unchanged).
MIN_SURPRISE_MEAN = 0.25
MAX_SURPRISE = 30.0  # -ln p is capped here (p = 1e-13): one reading cannot swamp the average
# Repeated readings: the share of readings equal to the one before, and of those after a repeat
# (priors, and the weight of the newest reading). A sensor that never repeats a value and then
# does is flagged at once; one that sits at 0 for hours at night is not. Both are kept in
# uint16 steps of 1 / WEIGHT_STEPS, rounded with a dither (unbiased: a step of 1 % of a share
# of 0.001 still counts on average), which pays for the second tail within 64 bytes.
REPEAT_PRIOR, REPEAT_AGAIN_PRIOR, REPEAT_ALPHA = 0.1, 0.5, 0.01
MIN_STUCK_P = 1e-12
MAX_RUN = MAX_LEARN_AFTER  # flagged-in-a-row counts saturate here (a uint8)
MAX_REPEATS = 32_767
MAX_LATE_WIDENING = 1e6  # a late reading's interval is at most this many times as wide
UNSCORED = -1  # `inside` of a reading whose previous forecast was not scored


def tail_codes(moments: np.ndarray) -> np.ndarray:
    """Tail moments (>= 0) as stored: int16 log2 steps of 1/TAIL_LOG_STEP octave."""
    steps = np.round(np.log2(np.maximum(moments.astype(np.float64), 2.0**-32)) * TAIL_LOG_STEP)
    return np.clip(steps, -32767, 32767).astype(np.int16)


def weight_codes(value: float, maximum: float, shape: tuple[int, ...]) -> np.ndarray:
    """A weight of the width in [0, maximum] for every slot and feature, as stored (uint16
    steps)."""
    return np.full(shape, round(min(max(value, 0.0), maximum) * WEIGHT_STEPS / maximum),
                   dtype=np.uint16)


def level_weight_codes(value: float, shape: tuple[int, ...]) -> np.ndarray:
    """The level's weight of the width (k) for every slot and feature, as stored: uint16 steps
    of its range from -MAX_LEVEL_WEIGHT."""
    return weight_codes(value + MAX_LEVEL_WEIGHT, 2.0 * MAX_LEVEL_WEIGHT, shape)


def level_weights(codes: np.ndarray) -> np.ndarray:
    """The level's weights k of the width, from their stored codes."""
    return codes.astype(np.float64) * (2.0 * MAX_LEVEL_WEIGHT / WEIGHT_STEPS) - MAX_LEVEL_WEIGHT


def level_position(forecast: np.ndarray, level: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """How far each forecast lies from its sensor's level, in level spreads (``spread`` is
    positive), clipped to +-MAX_LEVEL_Z: the ``z`` of the width's factor exp(k z) (module
    docstring)."""
    with np.errstate(over="ignore", invalid="ignore"):
        z = (forecast - level) / spread
    return np.clip(np.nan_to_num(z, nan=0.0), -MAX_LEVEL_Z, MAX_LEVEL_Z)


def late_reach(forecast: np.ndarray, level: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """How far from ``forecast`` a reading of a sensor at ``level`` with standard deviation
    ``sd`` (all as they were when the forecast was made) typically lies however late it comes:
    the root mean square of (reading - forecast) = (reading - level) + (level - forecast),
    the bound of a late reading's widening (``_late_widening``)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.hypot(forecast - level, sd)


@dataclass
class Calibrated:
    """One chunk's intervals and scores, aligned with its readings."""

    lower: np.ndarray  # (M, F) float64 bounds of the interval around each reading's forecast
    upper: np.ndarray  # (M, F)
    score: np.ndarray  # (M,) float64 anomaly score of the reading in [0, 1]; 0 if unscored
    anomaly: np.ndarray  # (M,) bool: score >= threshold
    inside: np.ndarray  # (M,) int8: how many of the F features fell inside; -1 unscored
    # The interval the reading was scored against (around the forecast made before it); NaN
    # where unscored.
    expected_lower: np.ndarray  # (M, F)
    expected_upper: np.ndarray  # (M, F)


class Calibration:
    """Per-slot interval and anomaly state (host memory); see the module docstring."""

    _PER_FEATURE = ("q_lo", "q_hi", "integral")  # (C, F) float32
    _PER_SLOT = ("short", "long_mean", "long_var")  # (C,) float32
    _ALL = (*_PER_FEATURE, *_PER_SLOT, "repeat", "tail", "tail_sq", "spread", "spread_weight",
            "profile_weight", "level_weight", "repeat_run", "profile", "flag_run", "last_bucket")

    def __init__(self, capacity: int, n_features: int, coverage: float, threshold: float,
                 learn_after: int, gain: float = I_GAIN):
        if not 0 <= learn_after <= MAX_RUN:
            raise ValueError(f"learn_after must be in [0, {MAX_RUN}], got {learn_after}")
        self.n_features, self.alpha = n_features, 1.0 - coverage
        self.threshold, self.learn_after, self.gain = threshold, learn_after, gain
        # Before any data: the bounds of a standard normal residual, a tail of a third of that.
        self.z = NormalDist().inv_cdf(1.0 - self.alpha / 2)
        self.flag_run = np.zeros(0, dtype=np.uint8)
        self.grow(capacity)

    def _allocate(self, capacity: int) -> dict[str, np.ndarray]:
        f = self.n_features
        arrays = {name: np.zeros((capacity, f), dtype=np.float32) for name in self._PER_FEATURE}
        arrays |= {name: np.zeros(capacity, dtype=np.float32) for name in self._PER_SLOT}
        # The repeat shares, of all readings (0) and after a repeat (1), in uint16 steps of
        # 1 / WEIGHT_STEPS (rounded with a dither).
        arrays["repeat"] = np.zeros((capacity, 2), dtype=np.uint16)
        # The tails' running moments, below (0) and above (1), as int16 log2 (TAIL_LOG_STEP).
        arrays["tail"] = np.zeros((capacity, f, 2), dtype=np.int16)
        arrays["tail_sq"] = np.zeros((capacity, f, 2), dtype=np.int16)
        arrays["spread"] = np.zeros((capacity, f), dtype=np.uint16)  # SPREAD_STEPS
        arrays["spread_weight"] = np.zeros((capacity, f), dtype=np.uint16)  # WEIGHT_STEPS
        arrays["profile_weight"] = np.zeros((capacity, f), dtype=np.uint16)
        arrays["level_weight"] = np.zeros((capacity, f), dtype=np.uint16)  # from -its maximum
        # Per feature, how many readings in a row were equal to the one before (MAX_REPEATS);
        # the least of them is the sensor's run of readings equal in every feature.
        arrays["repeat_run"] = np.zeros((capacity, f), dtype=np.int16)
        arrays["profile"] = np.zeros((capacity, f, N_BUCKETS), dtype=np.int16)
        arrays["flag_run"] = np.zeros(capacity, dtype=np.uint8)
        arrays["last_bucket"] = np.zeros(capacity, dtype=np.uint8)
        return arrays

    def grow(self, capacity: int) -> None:
        """Enlarge to ``capacity`` slots, keeping every existing value; new slots start fresh."""
        old = len(self.flag_run)
        fresh = self._allocate(capacity)
        for name, values in fresh.items():
            if old:
                values[:old] = getattr(self, name)
            setattr(self, name, values)
        self.reset(np.arange(old, capacity))

    def reset(self, slots: np.ndarray) -> None:
        """Forget ``slots`` (eviction, reuse): the prior interval, no surprise history."""
        self.q_lo[slots], self.q_hi[slots] = -self.z, self.z
        self.integral[slots], self.spread[slots], self.repeat_run[slots] = 0.0, 0, 0
        # An exponential tail of a third of the bounds: mean m, second moment 2 m^2.
        self.tail[slots] = _log_code(self.z / 3.0)
        self.tail_sq[slots] = _log_code(2.0 * (self.z / 3.0) ** 2)
        self.spread_weight[slots] = weight_codes(SPREAD_WEIGHT, MAX_SPREAD_WEIGHT, ())
        self.profile_weight[slots] = weight_codes(PROFILE_WEIGHT, MAX_PROFILE_WEIGHT, ())
        self.level_weight[slots] = level_weight_codes(LEVEL_WEIGHT, ())
        self.short[slots], self.long_mean[slots], self.long_var[slots] = 1.0, 1.0, SHORT_VAR
        self.repeat[slots, 0] = weight_codes(REPEAT_PRIOR, 1.0, ())
        self.repeat[slots, 1] = weight_codes(REPEAT_AGAIN_PRIOR, 1.0, ())
        self.profile[slots] = 0  # log2 1: errors of about one typical change at every hour
        self.flag_run[slots], self.last_bucket[slots] = 0, 0

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self._ALL}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for name in self._ALL:
            setattr(self, name, np.array(arrays[name], dtype=getattr(self, name).dtype))

    def calibrate(self, slots: np.ndarray, ts: np.ndarray, gap: np.ndarray, values: np.ndarray,
                  prev_value: np.ndarray, prev_forecast: np.ndarray, prev_scale: np.ndarray,
                  scored: np.ndarray, n_scored: np.ndarray, forecast: np.ndarray,
                  scale: np.ndarray, spread: np.ndarray, level_z: np.ndarray,
                  prev_level_z: np.ndarray, late: np.ndarray | None = None,
                  reach: np.ndarray | None = None, next_late: np.ndarray | None = None,
                  next_reach: np.ndarray | None = None, prev_alt: np.ndarray | None = None,
                  alt: np.ndarray | None = None) -> Calibrated:
        """Score each reading against the interval made before it, learn, and bound its forecast.

        Arrival order. ``ts`` (M,) is each reading's time, ``gap`` (M,) the slot's typical
        seconds between readings (0 while unknown); ``prev_value`` (M, F) is the slot's
        previous reading, ``prev_forecast`` / ``prev_scale`` (M, F) the forecast made then and
        the change scale then, ``scored`` (M,) whether that forecast counts (the previous
        reading was past warm-up), ``n_scored`` (M,) how many scored readings the slot has had
        including this one, ``forecast`` / ``scale`` / ``spread`` (M, F) the forecast made at
        this reading, the scale now and the experts' weighted spread around that forecast;
        ``level_z`` / ``prev_level_z`` (M, F) where that forecast and the one before it lie in
        the sensor's range (``level_position``, computed from the same floats then and now);
        ``late`` (M,) how many typical gaps after the one before each reading came (1 when on
        time or unknown) and ``reach`` (M, F) ``late_reach`` of the forecast before it: a late
        reading is scored against a wider interval (module docstring; None: none is late);
        ``next_late`` (M,) how many typical gaps after each reading the next one is expected
        and ``next_reach`` (M, F) ``late_reach`` of the forecast made at it: the interval
        published is widened for a next reading expected late (None, either: for none);
        ``alt`` (M, F) the other value the next reading may well be near (the value before a
        spike that may revert), NaN where none: the interval published spans the interval
        around the forecast and the same around ``alt``, and ``prev_alt`` (M, F) is the
        ``alt`` of the forecast before each reading, so that it is scored against exactly that
        interval (None, either: NaN).
        """
        m, f = values.shape
        if next_late is None or next_reach is None:  # both or neither: the code kept must
            next_late, next_reach = np.ones(m), np.zeros((m, f))  # be the one published
        none = np.full((m, f), np.nan)
        out = Calibrated(lower=np.empty((m, f)), upper=np.empty((m, f)), score=np.zeros(m),
                         anomaly=np.zeros(m, dtype=bool), inside=np.empty(m, dtype=np.int8),
                         expected_lower=np.full((m, f), np.nan),
                         expected_upper=np.full((m, f), np.nan))
        _calibrate(
            np.asarray(slots, dtype=np.int64), ts, gap, values, prev_value, prev_forecast,
            prev_scale, np.asarray(scored, dtype=np.bool_),
            np.asarray(n_scored, dtype=np.int64), forecast, scale, spread,
            level_z, prev_level_z, np.ones(m) if late is None else late,
            np.zeros((m, f)) if reach is None else reach,
            next_late, next_reach, none if prev_alt is None else prev_alt,
            none if alt is None else alt,
            self.alpha, self.threshold, self.learn_after, self.gain,
            self.q_lo, self.q_hi, self.integral, self.tail, self.tail_sq, self.spread,
            self.spread_weight, self.profile_weight, self.level_weight, self.repeat_run,
            self.profile, self.short, self.long_mean, self.long_var, self.repeat,
            self.flag_run, self.last_bucket,
            out.lower, out.upper, out.score, out.anomaly, out.inside,
            out.expected_lower, out.expected_upper,
        )
        return out


@kernel
def _bounds(q_lo, q_hi, integral, gain, n):  # pragma: no cover - compiled
    """The interval (low, high) in residual units after ``n`` scored readings, and its width
    before the I term."""
    w = max(q_hi - q_lo, MIN_WIDTH)
    t = max(n, 0) + 2.0
    widen = gain * w * math.tanh(integral * math.log(t) / (t * I_SATURATION))
    # The forecast is always inside its own interval (what users read it as), even when the
    # residuals lean to one side so far that both quantiles have the same sign.
    return min(q_lo - widen, 0.0), max(q_hi + widen, 0.0), w


@kernel
def published_bounds(forecast, lo, hi, unit):  # pragma: no cover - compiled
    """The bounds users get for residual-unit bounds ``lo`` <= 0 <= ``hi``: in value units,
    at least MIN_ULPS ulps from the forecast, finite."""
    pad = MIN_ULPS * 2.0**-52 * abs(forecast)
    low = max(min(forecast + lo * unit, forecast - pad), -MAX_BOUND)
    high = min(max(forecast + hi * unit, forecast + pad), MAX_BOUND)
    return low, high


@kernel
def _bucket(t, gap):  # pragma: no cover - compiled
    """The error-profile bucket of epoch seconds ``t`` for a sensor read every ``gap`` seconds:
    its time of day (UTC), or its day of the week (Monday 0) for a sensor read at most about
    twice a day, whose readings cannot tell the hours apart."""
    days = math.floor(t / SECONDS_PER_DAY)
    if gap >= WEEKLY_GAP:
        return int((days + 3) % 7)  # 1970-01-01 was a Thursday
    day = t - days * SECONDS_PER_DAY
    return min(int(day * N_BUCKETS / SECONDS_PER_DAY), N_BUCKETS - 1)


@kernel
def _profile_unit(profile, profile_weight, s, j, b, mean):  # pragma: no cover - compiled
    """The error profile's factor at bucket ``b``: its ``mean`` (``_profile_mean``) times the
    bucket's contrast to it (floored at a share of the mean) to the power g."""
    g = (MAX_PROFILE_WEIGHT / WEIGHT_STEPS) * profile_weight[s, j]
    return mean * (_profile_floored(profile, s, j, b, mean) / mean) ** g


@kernel
def _profile_mean(profile, s, j):  # pragma: no cover - compiled
    mean = 0.0
    for k in range(N_BUCKETS):
        mean += 2.0 ** (profile[s, j, k] / LOG_STEP)
    return mean / N_BUCKETS


@kernel
def _profile_floored(profile, s, j, b, mean):  # pragma: no cover - compiled
    """Bucket ``b`` of the profile, at least PROFILE_FLOOR x its mean (a sensor exact all night
    keeps a width)."""
    return max(2.0 ** (profile[s, j, b] / LOG_STEP), PROFILE_FLOOR * mean)


@kernel
def _log_code(x):  # pragma: no cover - compiled
    """``x`` >= 0 as int16 log2 steps of 1/TAIL_LOG_STEP octave (2**-32 and below: the least)."""
    step = round(math.log2(max(x, 2.0 ** -32)) * TAIL_LOG_STEP)
    return min(max(step, -32767), 32767)


@kernel
def _log_value(code):  # pragma: no cover - compiled
    return 2.0 ** (code / TAIL_LOG_STEP)


@kernel
def _unit(profile, spread, weights, s, j, b, scale, mean, z):  # pragma: no cover - compiled
    """The residual unit of a forecast made in bucket ``b`` at change scale ``scale``, the
    profile's mean ``mean``, at ``z`` in the sensor's range: computed the same way (same
    floats) when the interval is emitted and when it is scored. ``weights`` is
    (spread_weight, profile_weight, level_weight)."""
    return _unit_of(profile, weights, s, j, b, scale, mean,
                    _spread_unit(spread, weights[0], s, j), _level_unit(weights[2], s, j, z))


@kernel
def _unit_of(profile, weights, s, j, b, scale, mean, spread_unit,
             level_unit):  # pragma: no cover - compiled
    """``_unit`` from its spread and level factors, already computed."""
    return scale * spread_unit * _profile_unit(profile, weights[1], s, j, b, mean) * level_unit


@kernel
def _level_unit(level_weight, s, j, z):  # pragma: no cover - compiled
    """exp(k z) for the level's weight k stored for slot ``s``, feature ``j``."""
    return math.exp(_level_k(level_weight, s, j) * z)


@kernel
def _level_k(level_weight, s, j):  # pragma: no cover - compiled
    return (2.0 * MAX_LEVEL_WEIGHT / WEIGHT_STEPS) * level_weight[s, j] - MAX_LEVEL_WEIGHT


@kernel
def _spread_unit(spread, spread_weight, s, j):  # pragma: no cover - compiled
    """1 + b x the experts' spread stored for slot ``s``, feature ``j``."""
    return 1.0 + _spread_b(spread_weight, s, j) * _spread_d(spread, s, j)


@kernel
def _spread_b(spread_weight, s, j):  # pragma: no cover - compiled
    return (MAX_SPREAD_WEIGHT / WEIGHT_STEPS) * spread_weight[s, j]


@kernel
def _spread_d(spread, s, j):  # pragma: no cover - compiled
    return (MAX_SPREAD / SPREAD_STEPS) * spread[s, j]


@kernel
def _weight_code(value, maximum, dither):  # pragma: no cover - compiled
    """``value`` clipped to [0, maximum] in uint16 steps of maximum / WEIGHT_STEPS, rounded up
    with probability its fraction of a step (``dither`` uniform in [0, 1)): unbiased, so steps
    smaller than half a code still add up (rounded to nearest, a reading inside, +1 x step, was
    lost where a miss, about -9 x step, was not, and a weight drifted for no reason)."""
    code = math.floor(min(max(value, 0.0), maximum) * WEIGHT_STEPS / maximum + dither)
    return min(code, WEIGHT_STEPS)


@kernel
def _share(code):  # pragma: no cover - compiled
    """A share in [0, 1] from its stored uint16 code (``_weight_code`` with maximum 1)."""
    return code / WEIGHT_STEPS


@kernel
def _level_weight_code(k, dither):  # pragma: no cover - compiled
    """The level's weight ``k`` as stored: ``_weight_code`` of its range from -MAX_LEVEL_WEIGHT
    (``level_weight_codes``, rounded with ``dither``)."""
    return _weight_code(k + MAX_LEVEL_WEIGHT, 2.0 * MAX_LEVEL_WEIGHT, dither)


@kernel
def _dither(j, n, salt):  # pragma: no cover - compiled
    """A uniform number in [0, 1) from feature ``j``, the sensor's scored-reading count ``n``
    and ``salt``: reproducible, and the same whichever slot the sensor holds (a replay, a
    restore and a hand-over to another worker round every weight the same way)."""
    h = ((n & 0xFFFFFFFF) * 2654435761 + j * 9973 + salt * 69069) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return (h ^ (h >> 16)) / 4294967296.0


@kernel
def _learn_weights(spread, weights, profile, s, j, n, bucket, mean, z, lo, hi, missed_lo,
                   missed_hi, half):  # pragma: no cover - compiled
    """One step of gradient descent on the interval score for the width's three weights (b,
    g, k), for the interval ``lo`` <= 0 <= ``hi`` (residual units) a reading was scored
    against, the slot's ``n``-th, made at ``z`` in the sensor's range."""
    missed = (hi * missed_hi - lo * missed_lo) / half
    grad = 1.0 - missed / max(hi - lo, MIN_WIDTH)  # d score / d log width, per width
    spread_weight, profile_weight, level_weight = weights
    d = _spread_d(spread, s, j)
    b = _spread_b(spread_weight, s, j)
    spread_weight[s, j] = _weight_code(b - SPREAD_WEIGHT_LR * grad * d / (1.0 + b * d),
                                       MAX_SPREAD_WEIGHT, _dither(j, n, 1))
    contrast = math.log(_profile_floored(profile, s, j, bucket, mean) / mean)
    g = (MAX_PROFILE_WEIGHT / WEIGHT_STEPS) * profile_weight[s, j]
    profile_weight[s, j] = _weight_code(g - PROFILE_WEIGHT_LR * grad * contrast,
                                        MAX_PROFILE_WEIGHT, _dither(j, n, 2))
    k = _level_k(level_weight, s, j)
    level_weight[s, j] = _level_weight_code(k - LEVEL_WEIGHT_LR * grad * z, _dither(j, n, 3))


@kernel
def _learn_profile(profile, s, j, b, error):  # pragma: no cover - compiled
    """Move bucket ``b`` towards ``error`` (capped), stored back as int16 log2 steps."""
    now = 2.0 ** (profile[s, j, b] / LOG_STEP)
    now += PROFILE_ALPHA * (min(error, PROFILE_CAP * max(now, MIN_WIDTH)) - now)
    step = round(math.log2(max(now, 2.0 ** -15)) * LOG_STEP)
    profile[s, j, b] = min(max(step, -32767), 32767)


@kernel
def _gamma_tail(x, mean, var):  # pragma: no cover - compiled
    """P(X >= x) for X ~ Gamma with this mean and variance (Wilson-Hilferty: (X / mean)^(1/3)
    is about normal with mean 1 - 1/(9k) and variance 1/(9k), k = mean^2 / var, at least 1:
    below it the approximation fails and would call a typical value surprising)."""
    mean = max(mean, MIN_SURPRISE_MEAN)
    nine_k = max(9.0 * mean * mean / var, 9.0)  # shape >= 1: the approximation's range
    z = ((max(x, 0.0) / mean) ** (1.0 / 3.0) - (1.0 - 1.0 / nine_k)) * math.sqrt(nine_k)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


@kernel
def _tail_fit(mean, mean_sq):  # pragma: no cover - compiled
    """(shape, scale) of a generalized Pareto tail fitted to the running moments of the
    exceedances (method of moments: Hosking and Wallis, 1987), shape clipped to
    [0, MAX_SHAPE]: exponential at 0, heavier above."""
    mean = max(mean, 1e-6)
    ratio = mean * mean / max(mean_sq - mean * mean, 1e-12)  # m^2 / v
    shape = min(max(0.5 * (1.0 - ratio), 0.0), MAX_SHAPE)
    return shape, mean * (1.0 - shape)  # the mean excess of a GPD is sigma / (1 - shape)


@kernel
def _tail_probability(excess, mean, mean_sq):  # pragma: no cover - compiled
    """P(X > excess | X > 0) under the tail ``_tail_fit`` fits."""
    shape, sigma = _tail_fit(mean, mean_sq)
    if shape < 1e-6:
        return math.exp(-excess / sigma)
    return (1.0 + shape * excess / sigma) ** (-1.0 / shape)


@kernel
def _tail_quantile(prob, mean, mean_sq):  # pragma: no cover - compiled
    """The excess whose ``_tail_probability`` is ``prob`` (0 < prob <= 1)."""
    shape, sigma = _tail_fit(mean, mean_sq)
    if shape < 1e-6:
        return -sigma * math.log(prob)
    return sigma / shape * (prob ** (-shape) - 1.0)


@kernel
def _spanning(forecast, alt, v, lo, hi, unit, scale, reach):  # pragma: no cover - compiled
    """``published_bounds`` of ``forecast``, spanning those of ``alt`` too where it is not NaN
    (two values the next reading may well be near: a spike's, and the one before it, which
    is then two readings old: its part is widened as for a reading one gap late), and of the
    two, the one reading ``v`` is nearer and the unit of its part: its residual's."""
    low, high = published_bounds(forecast, lo, hi, unit)
    if math.isnan(alt):
        return low, high, forecast, unit
    alt_unit = unit * _late_widening(unit, 2.0, scale, reach)
    low_a, high_a = published_bounds(alt, lo, hi, alt_unit)
    if abs(v - alt) < abs(v - forecast):
        return min(low, low_a), max(high, high_a), alt, alt_unit
    return min(low, low_a), max(high, high_a), forecast, unit


@kernel
def _reading_p(v, r, lo, hi, w, low, high, alpha, tail, tail_sq):  # pragma: no cover - compiled
    """The two-sided tail probability of reading ``v``, residual ``r`` against the interval
    ``lo`` <= 0 <= ``hi`` (residual units; width ``w`` before the I term), ``low`` / ``high``
    in value units (the floats that decide inside)."""
    if v < low or v > high:
        excess = min(max((lo - r) if v < low else (r - hi), 0.0), MAX_EXCESS * w)
        return alpha * _tail_probability(excess, _log_value(tail), _log_value(tail_sq))
    # How far from the centre towards the edge (at most 1 whatever the rounding).
    centre = 0.5 * low + 0.5 * high
    edge = (high - centre) if v >= centre else (centre - low)
    frac = min(abs(v - centre) / edge, 1.0) if edge > 0 else 0.0
    return 1.0 - (1.0 - alpha) * frac


@kernel
def _late_code(late):  # pragma: no cover - compiled
    """How late a reading is expected, as stored: log2 of ``late`` typical gaps, rounded, in
    0..MAX_LATE_CODE (0: on time, or unknown)."""
    if not late > 1.4142135623730951:  # (below 2**0.5 it rounds to 0)
        return 0
    return min(int(round(math.log2(min(late, 2.0 ** 30)))), MAX_LATE_CODE)


@kernel
def _late_widening(unit, late, scale, reach):  # pragma: no cover - compiled
    """How much wider than ``unit`` (value units) the interval of a reading ``late`` typical
    gaps after the one before is (module docstring; at most MAX_LATE_WIDENING)."""
    if not late > 1.0 or not unit > 0.0:
        return 1.0
    a, c = scale / unit, reach / unit
    grown = 1.0 + (late - 1.0) * a * a
    return min(math.sqrt(max(min(grown, c * c), 1.0)), MAX_LATE_WIDENING)


@kernel
def _calibrate(slots, ts, gap, values, prev_value, prev_forecast, prev_scale, scored,
               n_scored, forecast, scale, spread_now, level_z, prev_level_z, late, reach,
               next_late, next_reach, prev_alt, alt, alpha, threshold,
               learn_after, gain, q_lo, q_hi, integral, tail, tail_sq, spread, spread_weight,
               profile_weight, level_weight, repeat_run, profile, short,
               long_mean, long_var,
               repeat, flag_run, last_bucket,
               lower, upper, score, anomaly, inside, expected_lower,
               expected_upper):  # pragma: no cover - compiled
    """The per-reading recurrence of ``Calibration.calibrate`` (state updated in place)."""
    f = values.shape[1]
    half = 0.5 * alpha
    weights = (spread_weight, profile_weight, level_weight)
    miss_lo = np.zeros(f, dtype=np.bool_)
    miss_hi = np.zeros(f, dtype=np.bool_)
    resid = np.zeros(f)
    near = np.zeros(f)  # the value each feature's residual is taken from (``_spanning``)
    # What each feature's scored interval was made with: the profile's mean and the unit's
    # spread and level factors (computed once, for the unit and for learning the profile).
    mean_then = np.zeros(f)
    spread_then = np.zeros(f)
    level_then = np.zeros(f)
    widen_then = np.ones(f)  # and how much it was widened for a next reading expected late
    for i in range(len(slots)):
        s = slots[i]
        fast = False  # the change scale grew fast at this reading (see RECOVERY_GROWTH)
        for j in range(f):
            fast = fast or scale[i, j] > RECOVERY_GROWTH * prev_scale[i, j]
        fast_run = min(((last_bucket[s] >> BUCKET_SHIFT) & 3) + 1, MAX_FAST_RUN) if fast else 0
        bucket_then = last_bucket[s] & ((1 << BUCKET_SHIFT) - 1)
        late_then = 2.0 ** (last_bucket[s] >> LATE_SHIFT)  # how late this one was expected
        if scored[i]:
            # The interval this reading is scored against is exactly the one emitted with the
            # forecast before it: nothing it depends on has moved since, and ``then`` is the
            # scored-reading count it was made at.
            then = n_scored[i] - 1
            p_inst, n_in, same = 1.0, 0, True
            for j in range(f):
                mean_then[j] = _profile_mean(profile, s, j)
                spread_then[j] = _spread_unit(spread, spread_weight, s, j)
                level_then[j] = _level_unit(level_weight, s, j, prev_level_z[i, j])
                unit = _unit_of(profile, weights, s, j, bucket_then, prev_scale[i, j],
                                mean_then[j], spread_then[j], level_then[j])
                expected = _late_widening(unit, late_then, prev_scale[i, j], reach[i, j])
                widen_then[j] = expected
                lo, hi, w = _bounds(q_lo[s, j], q_hi[s, j], integral[s, j], gain, then)
                low, high, near[j], near_unit = _spanning(
                    prev_forecast[i, j], prev_alt[i, j], values[i, j], lo, hi,
                    unit * expected, prev_scale[i, j], reach[i, j])
                resid[j] = (values[i, j] - near[j]) / near_unit
                expected_lower[i, j], expected_upper[i, j] = low, high
                # Inside or not as the published bounds say (the same floats users compare).
                miss_lo[j], miss_hi[j] = values[i, j] < low, values[i, j] > high
                n_in += not (miss_lo[j] or miss_hi[j])
                # Scored against that interval, widened for a reading that came late; where it
                # spans two values, against the part around the one the reading is nearer (a
                # spike's return near the value before it is as usual as any reading there),
                # and as no less likely than where it lies in the whole span (inside the
                # interval users got, a reading is not flagged for its value).
                widen = _late_widening(unit, late[i], prev_scale[i, j], reach[i, j])
                if widen > expected:
                    low, high, _, near_unit = _spanning(
                        prev_forecast[i, j], prev_alt[i, j], values[i, j], lo, hi,
                        unit * widen, prev_scale[i, j], reach[i, j])
                r = (values[i, j] - near[j]) / near_unit
                part_low, part_high = published_bounds(near[j], lo, hi, near_unit)
                side = 1 if values[i, j] >= 0.5 * part_low + 0.5 * part_high else 0
                p = _reading_p(values[i, j], r, lo, hi, w, part_low, part_high, alpha,
                               tail[s, j, side], tail_sq[s, j, side])
                if low <= values[i, j] <= high:
                    p = max(p, _reading_p(values[i, j], r, lo, hi, w, low, high, alpha,
                                          tail[s, j, side], tail_sq[s, j, side]))
                p_inst = min(p_inst, f * p)  # the least likely feature, Bonferroni-corrected
                same = same and values[i, j] == prev_value[i, j]
            run_before = repeat_run[s, 0]  # readings in a row equal in every feature
            for j in range(1, f):
                run_before = min(run_before, repeat_run[s, j])
            k = run_before + 1
            p_reading = p_inst  # how unlikely the reading's value is, apart from repeating
            # Stuck: k equal readings in a row, against this sensor's habits; not while every
            # reading it has been scored on equals the one before (it has no habit of varying
            # to compare with: a door sensor closed since it was installed got ~360 flags).
            if same and k < n_scored[i]:
                # (A share that rounded to 0 is small, not impossible: no repeat scores 1.)
                stuck = _share(repeat[s, 0]) * _share(repeat[s, 1]) ** (k - 1)
                p_inst = min(p_inst, max(stuck, MIN_STUCK_P))
            # Short-run surprise against its own long-run distribution (HTM's likelihood). One
            # reading adds at most a flag's worth (-ln(1 - threshold)): a spike's surprise of up
            # to 30 decayed by only 0.8 a reading and flagged the next 1-3 readings, inside
            # their interval (2.2 per spike on N(0, 1); 0.1 now), while a run of readings each
            # a little unlikely still adds up. The value's surprise only: a run of repeats
            # already has its own probability, the whole run's, and averaging that in as well
            # counted each run twice (iid 0/1 readings were flagged 7.6 times per 1,000 at
            # 0.999, Poisson(0.5) counts 10.5; now 1.1 and 2.6; docs/benchmarks/intervals.md).
            surprise = min(-math.log(max(p_reading, 1e-300)), MAX_SURPRISE,
                           -math.log(1.0 - threshold))
            run = short[s] + SHORT_ALPHA * (surprise - short[s])
            p_run = _gamma_tail(run, long_mean[s], max(long_var[s], SHORT_VAR))
            score[i] = 1.0 - min(p_inst, p_run)
            flagged = score[i] >= threshold
            anomaly[i] = flagged
            inside[i] = n_in
            learn = not flagged or flag_run[s] >= learn_after
            recovering = fast_run >= RECOVERY_RUN
            flag_run[s] = min(flag_run[s] + 1, MAX_RUN) if flagged else 0
            if learn:
                for j in range(f):
                    if repeat_run[s, j] + 2 >= FLAT_RUN and values[i, j] == prev_value[i, j]:
                        continue  # the FLAT_RUN-th equal reading in a row, or later
                    lo, hi, w = _bounds(q_lo[s, j], q_hi[s, j], integral[s, j], gain, then)
                    step = TRACK_LR * w
                    q_hi[s, j] = min(q_hi[s, j] + step * (miss_hi[j] - half), MAX_QUANTILE)
                    q_lo[s, j] = max(q_lo[s, j] - step * (miss_lo[j] - half), -MAX_QUANTILE)
                    missed = miss_hi[j] or miss_lo[j]
                    integral[s, j] += missed - alpha
                    # The unit the interval was made with, before its weights learn.
                    made_with = spread_then[j] * level_then[j] * widen_then[j]
                    # Not while the change scale grows back (the experts' spread, in scales,
                    # is then clipped at MAX_SPREAD and every miss would drive b up: from 1.2
                    # to 4 within 9 readings of a sensor's return from a flat stretch).
                    if not recovering and spread[s, j] < SPREAD_STEPS:
                        _learn_weights(spread, weights, profile, s, j, then, bucket_then,
                                       mean_then[j], prev_level_z[i, j], lo, hi, miss_lo[j],
                                       miss_hi[j], half)
                    if miss_lo[j] or miss_hi[j]:  # the tail: running moments of the excess
                        r = resid[j]
                        excess = min(max((lo - r) if miss_lo[j] else (r - hi), 0.0),
                                     MAX_EXCESS * w)
                        side = 1 if miss_hi[j] else 0
                        m1 = _log_value(tail[s, j, side])
                        m2 = _log_value(tail_sq[s, j, side])
                        if flagged:  # counted no further out than a flag (at TAIL_ALPHA)
                            excess = min(excess, _tail_quantile((1.0 - threshold) / alpha, m1,
                                                                m2))
                        tail[s, j, side] = _log_code(m1 + TAIL_ALPHA * (excess - m1))
                        tail_sq[s, j, side] = _log_code(m2 + TAIL_ALPHA * (excess * excess
                                                                          - m2))
                    if not recovering:
                        error = abs(values[i, j] - near[j]) / (prev_scale[i, j] * made_with)
                        _learn_profile(profile, s, j, bucket_then, error)
                short[s] = run
                a = max(LONG_ALPHA, 1.0 / (n_scored[i] + LONG_PRIOR))
                d = run - long_mean[s]
                long_mean[s] += a * d
                long_var[s] = (1.0 - a) * (long_var[s] + a * d * d)
                again = 1 if run_before > 0 else 0
                now = _share(repeat[s, again])
                repeat[s, again] = _weight_code(now + REPEAT_ALPHA * (same - now), 1.0,
                                                _dither(again, n_scored[i], 4))
            for j in range(f):
                repeated = values[i, j] == prev_value[i, j]
                repeat_run[s, j] = min(repeat_run[s, j] + 1, MAX_REPEATS) if repeated else 0
        else:
            inside[i] = UNSCORED
        # The interval around this reading's forecast, for the sensor's next reading.
        b = _bucket(ts[i], gap[i])
        code = _late_code(next_late[i])
        last_bucket[s] = b | (fast_run << BUCKET_SHIFT) | (code << LATE_SHIFT)
        for j in range(f):
            lo, hi, w = _bounds(q_lo[s, j], q_hi[s, j], integral[s, j], gain, n_scored[i])
            spread[s, j] = round(min(spread_now[i, j], MAX_SPREAD) * SPREAD_STEPS / MAX_SPREAD)
            unit = _unit(profile, spread, weights, s, j, b, scale[i, j],
                         _profile_mean(profile, s, j), level_z[i, j])
            unit *= _late_widening(unit, 2.0 ** code, scale[i, j], next_reach[i, j])
            lower[i, j], upper[i, j], _, _ = _spanning(forecast[i, j], alt[i, j], forecast[i, j],
                                                       lo, hi, unit, scale[i, j],
                                                       next_reach[i, j])
