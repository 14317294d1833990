"""Per-sensor memory around the shared LSTM: seasonal profiles by time, and a local AR model.

**Seasonal profiles, keyed by absolute time** (additive Holt-Winters with time buckets). Each
sensor has a day profile (one day in ``DAY_BUCKETS`` buckets) and a week profile (one week in
``WEEK_BUCKETS`` buckets). Each profile keeps, per bucket, an exponentially weighted mean of the
sensor's deviation from the profile's own deseasonalized level, in units of the sensor's spread
(a z-score, so float32 holds any sensor); the level follows ``reading - profile`` with weight
``LEVEL_ALPHA``. A profile is filled by the sensor's own readings at their own times, so its
cycle's phase is its own (any time zone), gaps and missing days leave buckets untouched, and
jitter within a bucket does not matter. The seasonal forecast of the next reading, expected at
``ts + typical gap``, is ``level + spread * profile[bucket of that time]``: with weight 1 this
is "the value one day / one week before" moved to today's level; smaller weights average over
past cycles. A bucket never filled has no forecast (NaN).

**Local linear model.** Per sensor and feature, an AR model of order ``AR_ORDER`` on its recent
changes in units of its typical change, learned online by normalized LMS (Widrow-Hoff): it
captures slope continuation (interpolated series) and short autocorrelation that a global model
shares poorly across sensors. Its weights start at zero (persistence).

**Pull to the level.** Per sensor and feature, one more weight learned the same way: the next
change as a multiple of the reading's deviation from its level (the normalizer's running mean),
in change scales, clipped at the model's input limit: an AR(1) around the level (an
error-correction term). A reading of a noisy sensor is mostly noise, and the best forecast of
the next is nearer the level than the reading (white noise: the level itself, at 0.71 of
persistence's error where the AR model on changes, which can only average the last four
readings, stays at 0.79); a controlled process (a thermostat, a pressure regulator) oscillates
back to its set point; on a random walk the weight stays near 0. It is an expert of its own
(experts.py), not an input of the AR model: there it added its noise to the slopes an
interpolated series continues almost exactly (appliances' weather series 4-8 % worse).

**Cycles counted in readings.** Per sensor and feature, its last ``CYCLE_KEPT`` changes (in
units of its typical change) and, for every lag ``k`` of 2 to ``CYCLE_LAGS`` readings, a running
mean absolute error of "the next change is the change ``k`` readings before it". The lag with
the least is the sensor's cycle, and the cycle forecast of the next change is what the changes
one and two cycles before it agree on (``_cycle_ahead``). A heartbeat, a pump's duty cycle or a
machine's work cycle repeats every so many readings whatever the clock says, which the day and
week profiles cannot see: on the labelled ECG series of the ``aeon`` package (a beat every
20 readings) the forecast's error falls from 0.84 to 0.10 of persistence's, and a car park read
half-hourly in the daytime (~18 readings a day) is forecast 11 % better
(docs/benchmarks/quality.md). The cycle says
nothing until the sensor has had ``CYCLE_KNOWN`` changes, and forecasts no change before.

Memory per sensor and feature: (96 + 168 + 2 x 4 + 48 + 23) float32 + 2 float64 = 1,388 bytes,
and 4 bytes per sensor (how many changes it has had).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streamer.core.compiled import kernel

DAY, WEEK = 86_400.0, 604_800.0
DAY_BUCKETS = 96  # 15 minutes
WEEK_BUCKETS = 168  # 1 hour
AR_ORDER = 3
# After the AR model's AR_ORDER changes, ``ar_x`` and ``ar_w`` hold the pull to the level: the
# reading's deviation from its level and that deviation's weight.
AR_DEVIATION = AR_ORDER
AR_INPUTS = AR_ORDER + 1
AR_STEP = 0.05  # NLMS step size (stable for any step in (0, 2))
_AR_EPS = 1.0  # NLMS regularizer, in squared change-scale units
# Deviations are stored clipped to this many spreads: a bucket filled while the spread was tiny
# (a flat start) cannot forecast thousands of spreads away once it has grown.
Z_LIMIT = 6.0
# Weight of the newest reading in a profile's level. By measurement over the shared fleets
# (docs/benchmarks/quality.md): 0.05 vs 0.1 parking 0.687 / 0.692, daily 0.842 / 0.846.
LEVEL_ALPHA = 0.05
# Step of the tracked median of a sensor's log gaps (a horizon's step between readings ahead):
# STEP_START / n after n gaps, at least STEP_RATE (a car park first read at 16:30, whose first
# gap is the night, is stepped right within a day, not in twelve); over the first EARLY_GAPS
# also at least 1/n of the distance to the newest log gap, so a first gap far from all later
# ones is outvoted as in their geometric mean (a first gap of 1 ms before readings every 10
# minutes left the expected times wrong for 342 readings; later on, the same term would let a
# car park's nights pull the estimate: parking's horizon relMAE 0.821 -> 0.824 with it always).
STEP_RATE, STEP_START, EARLY_GAPS = 0.02, 2.0, 8
# The longest cycle found, in readings (a day of hourly readings; 20 for the ECG), and the
# weight of the newest error in each lag's running error (at least 1/n for its first n).
CYCLE_LAGS, CYCLE_ALPHA = 24, 0.02
CYCLE_KEPT = 2 * CYCLE_LAGS  # changes kept: two of the longest cycles
# The cycle says nothing before this many changes: every lag then has had at least 2 cycles'
# worth of errors, and two of the longest cycles are kept.
CYCLE_KNOWN = 3 * CYCLE_LAGS  # (at most 2 x CYCLE_KEPT, where a wrapped count restarts)
# The count of changes wraps back by a multiple of CYCLE_KEPT before it would overflow (so the
# ring's positions stay in order).
CYCLE_WRAP = 2**31 - 1 - (2**31 - 1) % CYCLE_KEPT - CYCLE_KEPT


def buckets(ts: np.ndarray) -> np.ndarray:
    """(N,) epoch seconds -> (N, 2) the time-of-day bucket and, after the day profile's
    buckets, the time-of-week bucket: indices into a sensor's combined profile."""
    day = (np.mod(ts, DAY) * (DAY_BUCKETS / DAY)).astype(np.int64) % DAY_BUCKETS
    week = (np.mod(ts, WEEK) * (WEEK_BUCKETS / WEEK)).astype(np.int64) % WEEK_BUCKETS
    return np.stack([day, DAY_BUCKETS + week], axis=1)


@dataclass
class Recalled:
    """What the memory says about the next reading after each reading of a chunk."""

    seasonal: np.ndarray  # (M, 2, F) day and week profile forecasts; NaN where empty
    seasonal_now: np.ndarray  # (M, 2, F) the same profiles at this reading's own time
    ar_change: np.ndarray  # (M, F) AR forecast of the next change, change-scale units
    cycle_change: np.ndarray  # (M, F) the cycle's forecast of the next change; 0: none
    # With a horizon of H > 1 steps (horizon.py), else empty: when the next H readings are
    # expected (NaN while the typical gap is unknown), the day and week profile forecasts at
    # those times, and the AR model after the reading.
    ahead_ts: np.ndarray  # (M, H)
    seasonal_ahead: np.ndarray  # (M, 2, H, F); NaN where empty
    naive_ahead: np.ndarray  # (M, 2, H, F) the last reading one day / week before; NaN: none
    ar_w: np.ndarray  # (M, F, AR_INPUTS) weights
    ar_x: np.ndarray  # (M, F, AR_INPUTS) recent changes, newest first, then the deviation
    cycle_ahead: np.ndarray  # (M, H, F) the cycle's total change to each of the next H; 0: none
    # (M,) when the next reading is expected at the typical gap the caller gives, past the hours
    # the sensor never reports in once it has been read for a day (``_expected_times``; NaN
    # while the gap is unknown)
    next_ts: np.ndarray
    pull_change: np.ndarray  # (M, F) the pull to the level's forecast of the next change


class SensorMemory:
    """Seasonal profiles and AR state per slot (host memory).

    With a horizon (``recent=True``) each slot also keeps its last reading in each bucket of
    the day and of the week: "the value one day / one week before" the time of any step ahead
    (2,112 bytes per feature), and its timing: the median of its log gaps between readings
    (tracked, so a night's gap in a car park's day does not stretch the step between the
    readings ahead), how many gaps it has seen, and when it was first read (24 bytes).
    """

    _ARRAYS = ("profile", "level", "ar_x", "ar_w", "recent", "timing", "cycle", "cycle_err",
               "cycle_n")
    # Kept only with a horizon: their shapes differ between learners with and without one, and
    # a snapshot or hand-over between the two starts them empty.
    HORIZON_ONLY = ("recent", "timing")

    def __init__(self, capacity: int, n_features: int, seasonal_alpha: float,
                 recent: bool = False):
        self.n_features, self.seasonal_alpha = n_features, seasonal_alpha
        self.n_recent = DAY_BUCKETS + WEEK_BUCKETS if recent else 0
        self.profile = self._empty(0)["profile"]
        self.grow(capacity)

    def _empty(self, capacity: int) -> dict[str, np.ndarray]:
        f, nan = self.n_features, np.nan
        return {
            # (C, F, day buckets + week buckets) z-scores; NaN: never filled.
            "profile": np.full((capacity, f, DAY_BUCKETS + WEEK_BUCKETS), nan, np.float32),
            "level": np.full((capacity, 2, f), nan, np.float64),  # day and week profile levels
            # The last AR_ORDER changes, newest first, then the deviation (AR_DEVIATION).
            "ar_x": np.zeros((capacity, f, AR_INPUTS), np.float32),
            "ar_w": np.zeros((capacity, f, AR_INPUTS), np.float32),
            # The last reading in each bucket (NaN: never filled).
            "recent": np.full((capacity, f, self.n_recent), nan, np.float64),
            # Median log gap (NaN: none yet), gaps seen, first reading's time (NaN: none).
            "timing": np.full((capacity, 3 if self.n_recent else 0), nan, np.float64),
            # The last CYCLE_KEPT changes (change n at n % CYCLE_KEPT), the running error of
            # each lag 2..CYCLE_LAGS, and how many changes the slot has had.
            "cycle": np.zeros((capacity, f, CYCLE_KEPT), np.float32),
            "cycle_err": np.zeros((capacity, f, CYCLE_LAGS - 1), np.float32),
            "cycle_n": np.zeros(capacity, np.int32),
        }

    def grow(self, capacity: int) -> None:
        """Enlarge to ``capacity`` slots, keeping every existing value."""
        old = len(self.profile)
        for name, fresh in self._empty(capacity).items():
            if old:
                fresh[:old] = getattr(self, name)
            setattr(self, name, fresh)

    def reset(self, slots: np.ndarray) -> None:
        """Forget everything about ``slots`` (eviction, reuse)."""
        for name, empty in self._empty(1).items():
            getattr(self, name)[slots] = empty[0]

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self._ARRAYS}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Load saved arrays; the last readings per bucket start empty when the snapshot was
        taken with a different horizon setting (or before they existed), and so do the cycles
        in a snapshot from before them."""
        capacity = len(arrays["profile"])
        for name in self._ARRAYS:
            mine = getattr(self, name)
            saved = arrays.get(name)
            if name in (*self.HORIZON_ONLY, "cycle", "cycle_err", "cycle_n") and (
                    saved is None or saved.shape[1:] != mine.shape[1:]):
                fill = np.nan if name in self.HORIZON_ONLY else 0
                saved = np.full((capacity, *mine.shape[1:]), fill, dtype=mine.dtype)
            setattr(self, name, np.array(saved, dtype=mine.dtype))

    def advance(
        self, slots: np.ndarray, ts: np.ndarray, values: np.ndarray, spread: np.ndarray,
        next_gap: np.ndarray, changes: np.ndarray, has_change: np.ndarray, outlier: np.ndarray,
        horizon: int = 1, since: np.ndarray | None = None,
        day_seen: np.ndarray | None = None, deviation: np.ndarray | None = None,
        after_outlier: np.ndarray | None = None,
    ) -> Recalled:
        """Learn from a chunk of readings (arrival order) and recall, after each, what to
        expect next.

        ``spread`` (M, F) is each sensor's spread after the reading, ``next_gap`` (M,) its
        typical gap (0 while unknown), ``changes`` (M, F) the reading's change from the previous
        one in change-scale units and ``has_change`` (M,) whether there was a previous one. A
        spike (``outlier`` (M, F), a sentinel such as -9999) is kept out of the profiles. With
        ``horizon`` H > 1 (and ``since`` (M,), seconds since each sensor's previous reading, 0
        for its first) it also says when each of the next H readings is expected (see
        ``_expected_times``), recalls the profiles at those times, and the AR model after each
        reading. ``next_ts`` is when the next reading is expected at ``next_gap``, past the
        hours the sensor never reports in where ``day_seen`` (M,) says it has been read for a
        day (None: for none). ``deviation`` (M, F) is each reading's distance from its level in
        change scales, the pull to the level's input (None: 0, no pull), and ``after_outlier``
        (M, F) whether the reading before was a spike (None: none was). The compiled loop walks
        the readings in order, so the result does not depend on chunking.
        """
        m, f = values.shape
        h = horizon if horizon > 1 else 0
        p = AR_INPUTS if h else 0
        out = Recalled(np.empty((m, 2, f)), np.empty((m, 2, f)), np.empty((m, f)),
                       np.empty((m, f)), np.empty((m, h)), np.empty((m, 2, h, f)),
                       np.empty((m, 2, h, f)), np.empty((m, f, p), np.float32),
                       np.empty((m, f, p), np.float32), np.empty((m, h, f)), np.empty(m),
                       np.empty((m, f)))
        _advance(
            slots.astype(np.int64), ts, np.zeros(m) if since is None else since, buckets(ts),
            buckets(ts + next_gap), next_gap,
            np.zeros(m, dtype=np.bool_) if day_seen is None else day_seen, values,
            spread, changes, np.zeros((m, f)) if deviation is None else deviation, has_change,
            outlier, np.zeros((m, f), np.bool_) if after_outlier is None else after_outlier,
            np.float32(self.seasonal_alpha),
            self.profile, self.level, self.ar_x, self.ar_w,
            self.recent, self.timing, self.cycle, self.cycle_err, self.cycle_n,
            out.seasonal, out.seasonal_now, out.ar_change, out.cycle_change, out.ahead_ts,
            out.seasonal_ahead, out.naive_ahead, out.ar_w, out.ar_x, out.cycle_ahead,
            out.next_ts, out.pull_change,
        )
        return out


@kernel
def _bucket_pair(t):  # pragma: no cover - compiled
    """``buckets`` of one time: (time-of-day bucket, combined-profile index of its week one)."""
    day = int((t - math.floor(t / DAY) * DAY) * (DAY_BUCKETS / DAY)) % DAY_BUCKETS
    week = int((t - math.floor(t / WEEK) * WEEK) * (WEEK_BUCKETS / WEEK)) % WEEK_BUCKETS
    return day, DAY_BUCKETS + week


@kernel
def _reported_near(profile, s, t, reach):  # pragma: no cover - compiled
    """Whether slot ``s`` has ever reported within ``reach`` seconds of ``t``'s time of day
    (its day profile has a bucket filled there)."""
    first, _week = _bucket_pair(t - reach)
    last, _week = _bucket_pair(t + reach)
    # A span of a whole day or more (a sensor read every two days or less often) holds every
    # bucket, where the count of buckets from first to last would wrap back to a few.
    span = DAY_BUCKETS if 2.0 * reach >= DAY - DAY / DAY_BUCKETS else \
        (last - first) % DAY_BUCKETS + 1
    for n in range(span):
        if not np.isnan(profile[s, 0, (first + n) % DAY_BUCKETS]):
            return True
    return False


@kernel
def _expected_times(profile, s, t, gap, skip, out):  # pragma: no cover - compiled
    """When slot ``s``'s next ``len(out)`` readings are expected after one at ``t``: one typical
    ``gap`` apart, and with ``skip`` past the times of day at which the sensor has never
    reported (nothing within a quarter of a gap in its day profile: a car park closed at night
    is next read in the morning, at the first quarter of an hour it has ever reported in). NaN
    while the gap is unknown."""
    width = DAY / DAY_BUCKETS
    for k in range(len(out)):
        if gap <= 0.0:
            out[k] = np.nan
            continue
        t += gap
        if skip and not _reported_near(profile, s, t, 0.25 * gap):
            day, _week = _bucket_pair(t)
            start = math.floor(t / width) * width
            for n in range(1, DAY_BUCKETS + 1):
                if not np.isnan(profile[s, 0, (day + n) % DAY_BUCKETS]):
                    t = start + n * width
                    break
        out[k] = t


@kernel
def _learn_cycle(cycle, cycle_err, cycle_n, s, j, c, has_change, outlier):  # pragma: no cover
    """Learn slot ``s``'s change ``c`` (if ``has_change``) into feature ``j``'s cycle state;
    returns the number of the slot's next change (its count is advanced after every feature).

    Its forecasts (``_cycle_ahead``) are what the changes one and two cycles before agree on
    (for k steps ahead, their totals over the same k readings): the smaller of the two if they
    have the same sign, else none (minmod). A change seen once, a level shift or the step into
    a spike, is not forecast again a cycle later (with the last cycle alone repeated, a sensor
    with a clean cycle of 48 readings shifted by 3 amplitudes was flagged again a cycle after
    the shift). The change into a spike (``outlier``) is kept as no change and scores no lag."""
    n = cycle_n[s]  # this change's number (the slot's count is advanced after every feature)
    if has_change:
        if outlier:
            c = 0.0
        for k in range(2, CYCLE_LAGS + 1):
            if n >= k and not outlier:
                seen = n - k + 1  # how many errors lag k has had, this one included
                a = max(CYCLE_ALPHA, 1.0 / seen)
                miss = abs(c - cycle[s, j, (n - k) % CYCLE_KEPT])
                cycle_err[s, j, k - 2] += np.float32(a * (miss - cycle_err[s, j, k - 2]))
        cycle[s, j, n % CYCLE_KEPT] = c
        n += 1
    return n


@kernel
def _cycle_period(cycle_err, s, j):  # pragma: no cover - compiled
    """The lag (2..CYCLE_LAGS) whose "same change as then" has erred least."""
    best = 0
    for k in range(1, CYCLE_LAGS - 1):
        if cycle_err[s, j, k] < cycle_err[s, j, best]:
            best = k
    return best + 2


@kernel
def _minmod(last, before):  # pragma: no cover - compiled
    """What two changes agree on: the smaller if they have the same sign, else none."""
    last, before = np.float64(last), np.float64(before)
    if last * before <= 0.0:
        return 0.0
    return last if abs(last) < abs(before) else before


@kernel
def _cycle_ahead(cycle, cycle_err, s, j, n, out):  # pragma: no cover - compiled
    """The cycle's forecast of the total change over each of the next ``len(out)`` readings
    (change scales) after a slot's ``n``-th change: what the total changes over the same
    readings one and two cycles before agree on (minmod; the first is the next change's
    forecast); beyond one cycle, a whole cycle's forecast plus the rest's again (a cycle
    shorter than the horizon repeats). Totals, not a sum of each change's minmod: a total
    telescopes to the difference of two readings (exactly while the change scale holds; a
    spike's change counts as 0), so within one cycle its noise does not grow with the step
    (summed change by change, a 24-reading beat's step-12 error was 0.070 per sqrt(step)
    change scales, now 0.058); beyond one cycle the whole cycle's forecast, and its error, is
    repeated. A large change seen once (a level shift) caps or zeroes every step whose readings
    include it, one and two cycles later. 0 while the cycle is unknown."""
    h = len(out)
    if n < CYCLE_KNOWN:
        for k in range(h):
            out[k] = 0.0
        return
    period = _cycle_period(cycle_err, s, j)
    last = before = 0.0  # the total change over the same readings one and two cycles before
    for k in range(h):
        if k < period:
            last += cycle[s, j, (n - period + k) % CYCLE_KEPT]
            before += cycle[s, j, (n - 2 * period + k) % CYCLE_KEPT]
            out[k] = _minmod(last, before)
        else:  # a whole cycle ahead, then the rest of it again
            out[k] = out[period - 1] + out[k - period]


@kernel
def _advance(slots, ts, since, here, nxt, next_gap, day_seen, values, spread, changes, deviation,
             has_change, outlier, after_outlier, alpha,
             profile, level, ar_x, ar_w, recent, timing, cycle, cycle_err, cycle_n, seasonal,
             seasonal_now, ar_change, cycle_change, ahead_ts, seasonal_ahead, naive_ahead,
             ar_w_out, ar_x_out, cycle_ahead, next_ts, pull_change):  # pragma: no cover
    """The per-reading recurrence of ``SensorMemory.advance`` (state updated in place)."""
    f, p = values.shape[1], ar_x.shape[2] - 1  # the changes; ar_x[..., p] is the deviation
    h = ahead_ts.shape[1]
    next_change = np.zeros(1)  # the cycle's forecast of one change ahead, without a horizon
    one = np.zeros(1)
    for i in range(len(slots)):
        s = slots[i]
        for j in range(f):
            y, sp = values[i, j], spread[i, j]
            for k in range(2):  # the day profile, then the week profile
                b = here[i, k]
                old = np.float64(profile[s, j, b])
                old_level = level[s, k, j]
                empty = np.isnan(old)
                deseasonalized = y - (0.0 if empty else sp * old)
                if np.isnan(old_level):
                    new_level = deseasonalized
                else:
                    new_level = old_level + LEVEL_ALPHA * (deseasonalized - old_level)
                if not outlier[i, j]:
                    dev = min(max((y - new_level) / sp, -Z_LIMIT), Z_LIMIT)
                    profile[s, j, b] = dev if empty else old + alpha * (dev - old)
                    level[s, k, j] = new_level
                lv = level[s, k, j]
                seasonal[i, k, j] = lv + sp * np.float64(profile[s, j, nxt[i, k]])
                seasonal_now[i, k, j] = lv + sp * np.float64(profile[s, j, b])

            # The AR model and the pull to the level are float32 throughout, like their state.
            # The change into a spike (a sentinel) and the one after it (its return, or the
            # first at a new level) are no dynamics: neither is learned, and both are kept as no
            # change, as the cycle keeps the first. Whether a sensor's spikes come back is the
            # experts' spike rule's to learn (experts.py); fed to the AR model, the jump and
            # its return had it forecast a jump again (4 change scales off, a false alarm).
            c = changes[i, j]
            quiet = outlier[i, j] or after_outlier[i, j]
            if has_change[i]:
                if not quiet:
                    fit, energy = np.float32(0.0), np.float32(0.0)
                    for q in range(p):
                        fit += ar_w[s, j, q] * ar_x[s, j, q]
                        energy += ar_x[s, j, q] * ar_x[s, j, q]
                    step = np.float32(AR_STEP) * (c - fit) / (np.float32(_AR_EPS) + energy)
                    for q in range(p):
                        ar_w[s, j, q] += step * ar_x[s, j, q]
                    d = ar_x[s, j, p]
                    ar_w[s, j, p] += np.float32(AR_STEP) * (c - ar_w[s, j, p] * d) * d / (
                        np.float32(_AR_EPS) + d * d)
                for q in range(p - 1, 0, -1):
                    ar_x[s, j, q] = ar_x[s, j, q - 1]
                ar_x[s, j, 0] = 0.0 if quiet else c
            ar_x[s, j, p] = 0.0 if outlier[i, j] else deviation[i, j]
            forecast = np.float32(0.0)
            for q in range(p):
                forecast += ar_w[s, j, q] * ar_x[s, j, q]
            ar_change[i, j] = forecast
            pull_change[i, j] = ar_w[s, j, p] * ar_x[s, j, p]  # the next change, pulled
            for q in range(ar_w_out.shape[2]):
                ar_w_out[i, j, q], ar_x_out[i, j, q] = ar_w[s, j, q], ar_x[s, j, q]
            n = _learn_cycle(cycle, cycle_err, cycle_n, s, j, c, has_change[i], outlier[i, j])
            ahead = cycle_ahead[i, :, j] if h else next_change
            _cycle_ahead(cycle, cycle_err, s, j, n, ahead)
            cycle_change[i, j] = ahead[0]  # the next change: the first step's total
        if has_change[i]:
            n = cycle_n[s] + 1
            cycle_n[s] = n if n < CYCLE_WRAP else n - CYCLE_WRAP + 2 * CYCLE_KEPT
        _expected_times(profile, s, ts[i], next_gap[i], day_seen[i], one)
        next_ts[i] = one[0]
        if h == 0:
            continue
        if np.isnan(timing[s, 2]):
            timing[s, 1], timing[s, 2] = 0.0, ts[i]
        if since[i] > 0.0:
            lg = math.log(since[i])
            timing[s, 1] += 1.0
            if np.isnan(timing[s, 0]):
                timing[s, 0] = lg
            else:  # the median, tracked (Robbins-Monro on the sign), never overshooting: a
                # sensor read every day to the second is stepped by exactly a day
                n_gaps = timing[s, 1]
                far = abs(lg - timing[s, 0]) if n_gaps <= EARLY_GAPS else 0.0
                rate = max(STEP_RATE, (STEP_START + far) / n_gaps)
                if abs(lg - timing[s, 0]) <= rate:
                    timing[s, 0] = lg
                else:
                    timing[s, 0] += rate if lg > timing[s, 0] else -rate
        # Before the look-ups: the reading itself is "a week before" step 7 of a daily sensor.
        for j in range(f):
            if not outlier[i, j]:  # a sentinel is nobody's "value a day before"
                for k in range(2):
                    recent[s, j, here[i, k]] = values[i, j]
        gap = 0.0 if np.isnan(timing[s, 0]) else math.exp(timing[s, 0])
        # Which hours a sensor never reports in is known after a day of it, not before.
        _expected_times(profile, s, ts[i], gap, ts[i] - timing[s, 2] >= DAY, ahead_ts[i])
        for step in range(h):
            t = ahead_ts[i, step]
            if np.isnan(t):
                t = ts[i]
            buckets_at = _bucket_pair(t)
            for j in range(f):
                for k in range(2):
                    seasonal_ahead[i, k, step, j] = level[s, k, j] + spread[i, j] * np.float64(
                        profile[s, j, buckets_at[k]])
                    naive_ahead[i, k, step, j] = recent[s, j, buckets_at[k]]
