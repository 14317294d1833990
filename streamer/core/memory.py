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

Memory per sensor and feature: (96 + 168 + 2 x 3) float32 + 2 float64 = 1,096 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamer.core.grouping import rank_rows

DAY, WEEK = 86_400.0, 604_800.0
DAY_BUCKETS = 96  # 15 minutes
WEEK_BUCKETS = 168  # 1 hour
AR_ORDER = 3
AR_STEP = 0.05  # NLMS step size (stable for any step in (0, 2))
_AR_EPS = 1.0  # NLMS regularizer, in squared change-scale units
# Deviations are stored clipped to this many spreads: a bucket filled while the spread was tiny
# (a flat start) cannot forecast thousands of spreads away once it has grown.
Z_LIMIT = 6.0
# Weight of the newest reading in a profile's level. By measurement over the shared fleets
# (docs/benchmarks/quality.md): 0.05 vs 0.1 parking 0.687 / 0.692, daily 0.842 / 0.846.
LEVEL_ALPHA = 0.05


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


class SensorMemory:
    """Seasonal profiles and AR state per slot (host memory)."""

    _ARRAYS = ("profile", "level", "ar_x", "ar_w")

    def __init__(self, capacity: int, n_features: int, seasonal_alpha: float):
        self.n_features, self.seasonal_alpha = n_features, seasonal_alpha
        self.profile = self._empty(0)["profile"]
        self.grow(capacity)

    def _empty(self, capacity: int) -> dict[str, np.ndarray]:
        f, nan = self.n_features, np.nan
        return {
            # (C, F, day buckets + week buckets) z-scores; NaN: never filled.
            "profile": np.full((capacity, f, DAY_BUCKETS + WEEK_BUCKETS), nan, np.float32),
            "level": np.full((capacity, 2, f), nan, np.float64),  # day and week profile levels
            "ar_x": np.zeros((capacity, f, AR_ORDER), np.float32),  # newest change first
            "ar_w": np.zeros((capacity, f, AR_ORDER), np.float32),
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
        for name in self._ARRAYS:
            setattr(self, name, np.array(arrays[name], dtype=getattr(self, name).dtype))

    def advance(
        self, slots: np.ndarray, pos: np.ndarray, n_pos: int, ts: np.ndarray,
        values: np.ndarray, spread: np.ndarray, next_gap: np.ndarray, changes: np.ndarray,
        has_change: np.ndarray, outlier: np.ndarray,
    ) -> Recalled:
        """Learn from a chunk of readings and recall, after each, what to expect next.

        ``spread`` (M, F) is each sensor's spread after the reading, ``next_gap`` (M,) its
        typical gap (0 while unknown), ``changes`` (M, F) the reading's change from the previous
        one in change-scale units and ``has_change`` (M,) whether there was a previous one. A
        spike (``outlier`` (M, F), a sentinel such as -9999) is kept out of the profiles. The
        loop runs over ranks, vectorized over slots, so the result does not depend on chunking.
        """
        m, f = values.shape
        seasonal, now = np.empty((m, 2, f)), np.empty((m, 2, f))
        ar_change = np.empty((m, f))
        here, nxt = buckets(ts), buckets(ts + next_gap)  # (M, 2)
        y, sp = values[:, None, :], spread[:, None, :]  # (M, 1, F)
        keep = outlier[:, None, :]
        alpha = np.float32(self.seasonal_alpha)
        for r in rank_rows(pos, n_pos):  # readings of one rank: distinct slots
            s = slots[r]
            cell = (s[:, None], slice(None), here[r])  # -> (m, 2, F)
            old, old_level = self.profile[cell], self.level[s]  # (m, 2, F)
            empty = np.isnan(old)
            deseasonalized = y[r] - sp[r] * np.where(empty, 0.0, old)
            level = np.where(np.isnan(old_level), deseasonalized,
                             old_level + LEVEL_ALPHA * (deseasonalized - old_level))
            dev = np.minimum(np.maximum((y[r] - level) / sp[r], -Z_LIMIT), Z_LIMIT)
            new = np.where(empty, dev, old + alpha * (dev - old))
            self.profile[cell] = np.where(keep[r], old, new)
            level = self.level[s] = np.where(keep[r], old_level, level)
            seasonal[r] = level + sp[r] * self.profile[s[:, None], :, nxt[r]]
            now[r] = level + sp[r] * self.profile[cell]

            x, w = self.ar_x[s], self.ar_w[s]  # (m, F, p)
            c = changes[r].astype(np.float32)  # (m, F)
            step = AR_STEP * (c - (w * x).sum(axis=-1)) / (_AR_EPS + (x * x).sum(axis=-1))
            learn = has_change[r][:, None, None]
            w = self.ar_w[s] = np.where(learn, w + step[..., None] * x, w)
            x = self.ar_x[s] = np.where(learn, np.concatenate([c[..., None], x[..., :-1]], -1), x)
            ar_change[r] = (w * x).sum(axis=-1)
        return Recalled(seasonal, now, ar_change)
