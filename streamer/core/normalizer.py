"""Per-sensor online normalization, and the model's input features built from it.

The model works in normalized units and predicts the *change* to the next reading, scaled by
the sensor's typical change. An untrained model (zero head) therefore forecasts persistence,
and a sensor in units of 1e-3 shares one model with a sensor in units of 1e6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streamer.core.compiled import kernel
from streamer.core.experts import N_EXPERTS

N_CALENDAR = 4  # sin/cos of time of day, sin/cos of day of week
SECONDS_PER_DAY = 86_400.0
GAP_CLIP = 3.0  # |log(dt / typical dt)| is clipped here: a 20x gap looks like any long gap
# Floors of a sensor's change scale: a share of its level's magnitude, where float64 still
# resolves a change by hundreds of ulps, and an absolute one below any unit a reading comes in.
# Not higher: a sensor in units of 1e-15 (farads, amperes) or read on an offset of 5e9 with
# changes of 1 (a northing in mm, a large counter) had its scale set by the floor, every change
# looked like none, and it was forecast worse than persistence. Not a share of the level's spread
# either (it was 1e-3 of it): after a level shift (a counter reset from 5e6 to 20) the spread
# grows to millions while the mean follows, and decays for thousands of readings; the change
# scale went with it from 0.05 to 2,000, every expert's error looked like none, and the
# forecasts of a sensor changing by 0.1 a reading were off by 10 (250x persistence's error) for
# a day. On the shared fleets it hardly bound (their relMAE moved by < 2e-4).
SCALE_FLOOR_REL, SCALE_FLOOR_ABS = 1e-13, 1e-30
# The largest magnitude a reading may have. Differences of two such readings, the spreads
# (updated with hypot, never squared) and forecasts of up to ~10 scales beyond them all stay
# finite in float64; a reading beyond it is rejected as VALUE_OUT_OF_RANGE.
MAX_ABS_VALUE = 1e300
# Timestamps (epoch seconds) beyond this (~year 5100) are rejected alike: the gap between two
# finite timestamps must stay finite for the typical-gap statistics and the seasonal buckets.
MAX_ABS_TS = 1e11
# Past warm-up, changes beyond clip scales are winsorized there (one sentinel cannot inflate the
# scale), so the scale grows by at most x1.16 a reading (clip 6, alpha 0.01). A sensor coming
# back from a flat stretch, whose scale had shrunk to its floor, then took ~100 readings to get
# its scale back, every change meanwhile an outlier clipped at the model's input limit. The
# limit now doubles at each outlier after ESCALATE_AFTER in a row (a sentinel and its return
# make two) and halves back at each reading within it: the scale is out of the flat stretch's
# 1e-12 in ~10-16 readings, then at the running average's own pace (0.15-0.3 of its usual value 20
# readings after a week-long pause, 0.5-0.6 after 50).
ESCALATE_AFTER, MAX_ESCALATION = 2, 40  # doublings at most


def within_range(ts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(N,) whether a reading's timestamp and every value are within what the model holds
    (MAX_ABS_TS, MAX_ABS_VALUE); never for a NaN or an infinity."""
    return (np.abs(ts) <= MAX_ABS_TS) & (np.abs(values) <= MAX_ABS_VALUE).all(axis=1)


def input_size(n_features: int) -> int:
    """Model input width: level z-score and change z-score per feature, calendar, gap (from
    here), then the day and week seasonal forecasts relative to the last value (memory.py)."""
    return 4 * n_features + N_CALENDAR + 1


def calendar_features(ts: np.ndarray) -> np.ndarray:
    """(N,) epoch seconds -> (N, 4) sin/cos of time of day and of day of week (UTC)."""
    days = ts / SECONDS_PER_DAY
    tod = 2.0 * np.pi * (days % 1.0)
    dow = 2.0 * np.pi * (((days + 3.0) % 7.0) / 7.0)  # 1970-01-01 was a Thursday; Monday = 0
    return np.stack([np.sin(tod), np.cos(tod), np.sin(dow), np.cos(dow)], axis=1)


@dataclass
class Encoded:
    """One chunk of readings, normalized; every array is aligned with the chunk's readings."""

    features: np.ndarray  # (M, D) float32 model inputs
    targets: np.ndarray  # (M, F) float32 normalized change from the previous reading
    target_valid: np.ndarray  # (M,) bool: the previous reading exists and was past warm-up
    scale: np.ndarray  # (M, F) float64 change scale after this reading (forecast units)
    prev_scale: np.ndarray  # (M, F) float64 change scale at the previous reading
    prev_value: np.ndarray  # (M, F) float64 previous reading (this reading where none)
    warm: np.ndarray  # (M,) bool: past warm-up after this reading, so the model forecasts
    outlier: np.ndarray  # (M, F) bool: far from both the level and the last value (a spike)
    has_prev: np.ndarray  # (M,) bool: the sensor had a reading before this one
    spread: np.ndarray  # (M, F) float64 the level's spread after it (z-score denominator)
    level: np.ndarray  # (M, F) float64 the level (running mean) after it
    # The level and its spread after the sensor's previous reading: the same floats its
    # ``level`` and ``spread`` were then (the mean before this one; undefined without one).
    prev_level: np.ndarray  # (M, F) float64
    prev_spread: np.ndarray  # (M, F) float64
    sd: np.ndarray  # (M, F) float64 the level's standard deviation after it (not floored)
    prev_sd: np.ndarray  # (M, F) float64 the same after the sensor's previous reading
    next_gap: np.ndarray  # (M,) float64 typical seconds between readings (0 while unknown)
    since: np.ndarray  # (M,) float64 seconds since the sensor's previous reading (0 if none)
    # (M,) float64 ``since`` over the typical gap as it was before this reading (1 while the
    # sensor has had fewer than two gaps): how late the reading came, in readings
    late: np.ndarray


class SensorStats:
    """Running statistics per slot (host memory, float64): level, change, interval, last values.

    Each statistic is exponentially weighted with weight ``max(alpha, 1/n)``: the first
    ``1/alpha`` readings are averaged equally (Welford), later ones forget old data. With
    ``alpha == 0`` it is Welford throughout.
    """

    def __init__(self, capacity: int, n_features: int, alpha: float, warmup: int, clip: float,
                 robust: bool = True):
        self.n_features, self.alpha, self.warmup, self.clip = n_features, alpha, warmup, clip
        self.robust = robust
        self.count = np.zeros(0, dtype=np.int64)
        self.grow(capacity)

    # Spreads are kept as standard deviations, not variances, and updated with hypot: the
    # square of a reading near the largest accepted magnitude (MAX_ABS_VALUE) would overflow.
    _PER_FEATURE = ("mean", "sd", "change_rms", "last_value", "last_scale", "last_forecast",
                    "last_experts", "last_outlier", "before_last_value", "revert_score",
                    "guard_err", "outlier_run")
    _PER_SLOT = ("count", "last_ts", "log_dt")

    def grow(self, capacity: int) -> None:
        """Enlarge to ``capacity`` slots, keeping every existing value."""
        old = len(self.count)
        fresh = SensorStats.__new__(SensorStats)
        fresh._allocate(capacity, self.n_features)
        if old:
            for name in self._PER_FEATURE + self._PER_SLOT:
                getattr(fresh, name)[:old] = getattr(self, name)
        for name in self._PER_FEATURE + self._PER_SLOT:
            setattr(self, name, getattr(fresh, name))

    def _allocate(self, capacity: int, n_features: int) -> None:
        for name in self._PER_FEATURE:
            setattr(self, name, np.zeros((capacity, n_features), dtype=np.float64))
        # Each expert's last forecast and running error (see experts.py): (C, F, K).
        self.last_experts = np.zeros((capacity, n_features, N_EXPERTS), dtype=np.float64)
        self.guard_err = np.zeros((capacity, n_features, N_EXPERTS), dtype=np.float64)
        self.outlier_run = np.zeros((capacity, n_features), dtype=np.uint8)  # ESCALATE_AFTER
        self.last_scale[:] = 1.0
        self.count = np.zeros(capacity, dtype=np.int64)
        self.last_ts = np.full(capacity, -np.inf, dtype=np.float64)
        self.log_dt = np.zeros(capacity, dtype=np.float64)

    def reset(self, slots: np.ndarray) -> None:
        """Forget everything about ``slots`` (eviction, reuse)."""
        for name in self._PER_FEATURE:
            getattr(self, name)[slots] = 0.0
        self.last_scale[slots] = 1.0
        self.count[slots] = 0
        self.last_ts[slots] = -np.inf
        self.log_dt[slots] = 0.0

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self._PER_FEATURE + self._PER_SLOT}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for name in self._PER_FEATURE + self._PER_SLOT:
            setattr(self, name, np.array(arrays[name], dtype=getattr(self, name).dtype))

    def encode(self, slots: np.ndarray, ts: np.ndarray, values: np.ndarray) -> Encoded:
        """Advance the statistics through a chunk (arrival order) and return the model's inputs.

        A sensor's statistics are a sequential recurrence: the compiled loop walks the readings
        in order, each updating its own slot (compiled.py).
        """
        m, f, clip = len(slots), self.n_features, self.clip
        features = np.zeros((m, 2 * f + N_CALENDAR + 1), dtype=np.float64)
        features[:, 2 * f : 2 * f + N_CALENDAR] = calendar_features(ts)
        out = Encoded(
            features=features,
            targets=np.zeros((m, f), dtype=np.float64),
            target_valid=np.zeros(m, dtype=bool),
            scale=np.empty((m, f), dtype=np.float64),
            prev_scale=np.empty((m, f), dtype=np.float64),
            prev_value=np.empty((m, f), dtype=np.float64),
            warm=np.empty(m, dtype=bool),
            outlier=np.zeros((m, f), dtype=bool),
            has_prev=np.empty(m, dtype=bool),
            spread=np.empty((m, f), dtype=np.float64),
            level=np.empty((m, f), dtype=np.float64),
            prev_level=np.empty((m, f), dtype=np.float64),
            prev_spread=np.empty((m, f), dtype=np.float64),
            sd=np.empty((m, f), dtype=np.float64),
            prev_sd=np.empty((m, f), dtype=np.float64),
            next_gap=np.zeros(m, dtype=np.float64),
            since=np.zeros(m, dtype=np.float64),
            late=np.ones(m, dtype=np.float64),
        )
        _encode(
            slots.astype(np.int64), ts, values, self.alpha, self.warmup, clip, self.robust,
            self.count, self.mean, self.sd, self.change_rms, self.last_value, self.last_scale,
            self.last_ts, self.log_dt, self.outlier_run,
            features, out.targets, out.target_valid, out.scale, out.prev_scale, out.prev_value,
            out.warm, out.outlier, out.has_prev, out.spread, out.level, out.prev_level,
            out.prev_spread, out.sd, out.prev_sd, out.next_gap, out.since, out.late,
        )
        np.clip(features[:, : 2 * f], -clip, clip, out=features[:, : 2 * f])
        np.clip(features[:, -1], -GAP_CLIP, GAP_CLIP, out=features[:, -1])
        out.features = features.astype(np.float32)
        out.targets = np.clip(out.targets, -clip, clip).astype(np.float32)
        return out


@kernel
def _encode(slots, ts, values, alpha, warmup, clip, robust_stats,
            count, mean, sd, change_rms, last_value, last_scale, last_ts, log_dt, outlier_run,
            features, targets, target_valid, scale, prev_scale, prev_value, warm, outlier,
            has_prev, spread, level, prev_level, prev_spread, sd_out, prev_sd, next_gap,
            since, late):  # pragma: no cover - compiled
    """The per-reading recurrence of ``SensorStats.encode``: state arrays updated in place,
    outputs written per reading (features unclipped)."""
    f = values.shape[1]
    for i in range(len(slots)):
        s, t = slots[i], ts[i]
        n = count[s]  # readings seen before this one
        prev = n > 0
        has_prev[i] = prev
        target_valid[i] = n >= warmup
        warm[i] = n + 1 >= warmup
        a = max(alpha, 1.0 / (n + 1))
        a_prev = max(alpha, 1.0 / max(n, 1))  # weight among n changes
        # Past warm-up the statistics see outliers winsorized at +-clip scales, so one sentinel
        # (-9999) cannot inflate the scales for hundreds of readings; a real regime change still
        # gets through, geometrically fast (x(1 + a clip^2) per step, and faster after a run of
        # outliers: ESCALATE_AFTER).
        robust = robust_stats and n >= warmup
        for j in range(f):
            v = values[i, j]
            last, last_sc = last_value[s, j], last_scale[s, j]
            widen = 2.0 ** max(int(outlier_run[s, j]) - ESCALATE_AFTER + 1, 0)
            change = v - last if prev else 0.0
            prev_value[i, j] = last if prev else v
            prev_scale[i, j] = last_sc
            targets[i, j] = change / last_sc  # clipped by the caller, like the features
            m_old, sd_old = mean[s, j], sd[s, j]
            sp_old = max(sd_old, last_sc)  # the spread the previous reading had (``spread``)
            prev_level[i, j], prev_spread[i, j], prev_sd[i, j] = m_old, sp_old, sd_old
            diff = v - m_old
            lim = clip * sp_old * widen
            diff_w = min(max(diff, -lim), lim) if robust else diff
            far = abs(diff) > lim
            m_new = m_old + a * diff_w
            # sd^2 = (1 - a) (sd_old^2 + a diff^2), without squaring a possibly huge number.
            sd_new = math.sqrt(1.0 - a) * math.hypot(sd_old, math.sqrt(a) * diff_w)
            lim = clip * last_sc * widen
            change_w = min(max(change, -lim), lim) if robust else change
            outlier[i, j] = robust and far and abs(change) > lim
            # See ESCALATE_AFTER; counted no further than the widest limit, so that a long run
            # of outliers (a sensor flapping to -9999 and back) is undone as quickly.
            run = int(outlier_run[s, j])
            outlier_run[s, j] = (min(run + 1, ESCALATE_AFTER - 1 + MAX_ESCALATION)
                                 if robust and abs(change) > lim else max(run - 1, 0))
            rms = change_rms[s, j]
            if prev:  # rms^2 = (1 - w) rms_old^2 + w change^2, as above
                rms = math.hypot(math.sqrt(1.0 - a_prev) * rms, math.sqrt(a_prev) * change_w)
            # The change scale has floors so a flat stretch cannot shrink it to zero: a relative
            # share of its magnitude and an absolute minimum (see SCALE_FLOOR_REL).
            sc = max(rms, SCALE_FLOOR_REL * abs(m_new), SCALE_FLOOR_ABS)
            sp = max(sd_new, sc)
            spread[i, j], scale[i, j], level[i, j], sd_out[i, j] = sp, sc, m_new, sd_new
            features[i, j] = (v - m_new) / sp
            features[i, f + j] = change / sc
            mean[s, j], sd[s, j], change_rms[s, j] = m_new, sd_new, rms
            last_value[s, j], last_scale[s, j] = v, sc
        gap = 0.0
        if n >= 1:
            log_gap = math.log(max(t - last_ts[s], 1e-9))
            if n >= 2:
                gap = log_gap - log_dt[s]
                late[i] = math.exp(min(gap, 700.0))
            log_dt[s] = (1.0 - a_prev) * log_dt[s] + a_prev * log_gap
            next_gap[i] = math.exp(log_dt[s])
            since[i] = t - last_ts[s]
        else:
            next_gap[i], since[i] = 0.0, 0.0
        features[i, features.shape[1] - 1] = gap
        count[s] = n + 1
        last_ts[s] = t
