"""Per-sensor online normalization, and the model's input features built from it.

The model works in normalized units and predicts the *change* to the next reading, scaled by
the sensor's typical change. An untrained model (zero head) therefore forecasts persistence,
and a sensor in units of 1e-3 shares one model with a sensor in units of 1e6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamer.core.experts import N_EXPERTS
from streamer.core.grouping import rank_rows

N_CALENDAR = 4  # sin/cos of time of day, sin/cos of day of week
SECONDS_PER_DAY = 86_400.0
GAP_CLIP = 3.0  # |log(dt / typical dt)| is clipped here: a 20x gap looks like any long gap
_TINY = 1e-12
# The largest magnitude a reading may have. Differences of two such readings, the spreads
# (updated with hypot, never squared) and forecasts of up to ~10 scales beyond them all stay
# finite in float64; a reading beyond it is rejected as VALUE_OUT_OF_RANGE.
MAX_ABS_VALUE = 1e300
# Timestamps (epoch seconds) beyond this (~year 5100) are rejected alike: the gap between two
# finite timestamps must stay finite for the typical-gap statistics and the seasonal buckets.
MAX_ABS_TS = 1e11


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
    next_gap: np.ndarray  # (M,) float64 typical seconds between readings (0 while unknown)


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
                    "guard_err")
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

    def encode(
        self, slots: np.ndarray, pos: np.ndarray, n_pos: int, ts: np.ndarray, values: np.ndarray
    ) -> Encoded:
        """Advance the statistics through a chunk and return the model's inputs.

        ``slots`` (M,) and ``pos`` (M,) give each reading's slot and its rank among that slot's
        readings in the chunk. The loop runs over ranks (``n_pos`` of them), each iteration
        vectorized over all slots, because a sensor's statistics are a sequential recurrence.
        """
        m, f, clip = len(slots), self.n_features, self.clip
        count_before = self.count[slots] + pos  # readings each sensor had before this one
        features = np.zeros((m, 2 * f + N_CALENDAR + 1), dtype=np.float64)
        features[:, 2 * f : 2 * f + N_CALENDAR] = calendar_features(ts)
        targets = np.zeros((m, f), dtype=np.float64)
        target_valid = np.zeros(m, dtype=bool)
        scale = np.empty((m, f), dtype=np.float64)
        prev_scale = np.empty((m, f), dtype=np.float64)
        prev_value = np.empty((m, f), dtype=np.float64)
        warm = np.empty(m, dtype=bool)
        outlier = np.zeros((m, f), dtype=bool)
        spread = np.empty((m, f), dtype=np.float64)
        next_gap = np.zeros(m, dtype=np.float64)
        for r in rank_rows(pos, n_pos):  # readings of one rank: distinct slots
            s, v, t = slots[r], values[r], ts[r]
            n = self.count[s]  # readings seen before this one
            has_prev = (n > 0)[:, None]
            last_value, last_scale = self.last_value[s], self.last_scale[s]
            change = np.where(has_prev, v - last_value, 0.0)
            prev_value[r] = np.where(has_prev, last_value, v)
            prev_scale[r] = last_scale
            targets[r] = change / last_scale  # clipped after the loop, like the features
            target_valid[r] = n >= self.warmup

            a = np.maximum(self.alpha, 1.0 / (n + 1))[:, None]
            mean = self.mean[s]
            diff = v - mean
            # Past warm-up, the statistics see outliers winsorized at +-clip scales, so one
            # sentinel (-9999) cannot inflate the scales for hundreds of readings; a real
            # regime change still gets through, geometrically fast (x(1 + a clip^2) per step).
            robust = (n >= self.warmup)[:, None] & self.robust
            sd_old = self.sd[s]
            lim = clip * np.maximum(sd_old, last_scale)
            # min/max, not np.clip: a tenth of the cost per call on arrays this small.
            diff_w = np.where(robust, np.minimum(np.maximum(diff, -lim), lim), diff)
            far = np.abs(diff) > lim
            mean = mean + a * diff_w
            # sd^2 = (1 - a) (sd_old^2 + a diff^2), without squaring a possibly huge number.
            sd = np.sqrt(1.0 - a) * np.hypot(sd_old, np.sqrt(a) * diff_w)
            lim = clip * last_scale
            change_w = np.where(robust, np.minimum(np.maximum(change, -lim), lim), change)
            outlier[r] = robust & far & (np.abs(change) > lim)
            a_prev = np.maximum(self.alpha, 1.0 / np.maximum(n, 1))  # weight among n changes
            w = a_prev[:, None]
            change_rms = np.where(  # rms^2 = (1 - w) rms_old^2 + w change^2, as above
                has_prev, np.hypot(np.sqrt(1 - w) * self.change_rms[s], np.sqrt(w) * change_w),
                self.change_rms[s],
            )
            log_dt = np.log(np.maximum(t - self.last_ts[s], 1e-9))
            gap = np.where(n >= 2, log_dt - self.log_dt[s], 0.0)
            self.log_dt[s] = np.where(n >= 1, (1 - a_prev) * self.log_dt[s] + a_prev * log_dt,
                                      self.log_dt[s])
            next_gap[r] = np.where(n >= 1, np.exp(self.log_dt[s]), 0.0)
            # The change scale has floors so a flat stretch cannot shrink it to zero: a share of
            # the level's spread, a relative share of its magnitude, and an absolute minimum.
            sc = np.maximum(np.maximum(change_rms, 1e-3 * sd),
                            np.maximum(1e-9 * np.abs(mean), _TINY))
            spread[r] = np.maximum(sd, sc)
            features[r, :f] = (v - mean) / spread[r]
            features[r, f : 2 * f] = change / sc
            features[r, -1] = gap
            scale[r] = sc

            warm[r] = n + 1 >= self.warmup
            self.count[s] = n + 1
            self.mean[s], self.sd[s], self.change_rms[s] = mean, sd, change_rms
            self.last_value[s], self.last_scale[s], self.last_ts[s] = v, sc, t
        np.clip(features[:, : 2 * f], -clip, clip, out=features[:, : 2 * f])
        np.clip(features[:, -1], -GAP_CLIP, GAP_CLIP, out=features[:, -1])
        targets = np.clip(targets, -clip, clip).astype(np.float32)
        return Encoded(
            features.astype(np.float32), targets, target_valid, scale, prev_scale, prev_value,
            warm, outlier, count_before > 0, spread, next_gap,
        )

