"""Multi-step forecasts: the next H readings of every sensor, with intervals, from one state.

Step 1 is the one-step forecast (the LSTM and its experts, experts.py) with its interval
(intervals.py), exactly as with no horizon. Steps 2..H are made at each reading by experts that
start from it and need no further pass of the LSTM, so producing them changes no live state
(h, c, statistics, memories) and costs a few array operations per reading:

- "step one": the step-1 forecast, held (what the LSTM and its experts expect next);
- "persistence": the reading itself (h-step persistence);
- "seasonal day" / "seasonal week": the sensor's day and week profiles (memory.py) at step k's
  expected time ``ts + k x typical gap``;
- "seasonal day change" / "seasonal week change": the step-1 forecast plus the profile's change
  from step 1's time to step k's (a cycle's shape at today's level);
- "local linear": the step-1 forecast plus the sensor's AR model on its changes (memory.py),
  rolled forward from the step-1 change;
- "day before" / "week before": the sensor's last reading in the same 15 minutes of the day /
  hour of the week as step k's time (seasonal naive; memory.py keeps them with a horizon);
- "cycle": the reading plus the sensor's cycle counted in readings (memory.py): the change
  over the same k readings one and two cycles before (a heartbeat's or a duty cycle's next k
  changes);
- "level pull": the reading pulled toward its level as the pull to the level (memory.py)
  would pull it k times over (a noisy sensor: the level; an oscillation around a set point: a
  decaying one).

Each sensor weighs them per step with Hedge (as experts.py does for step 1) on running errors
scored at steps 2, 4, 8, ... and H (``scored_steps``); a step between two scored ones mixes
their weights by its log distance to each. A forecast made for a scored step is kept until its
reading arrives (one pending forecast per scored step, so a sensor's state grows with log2 H,
not H; the next is made 0 or 1 readings later, pseudo-randomly, so that every phase of a
periodic pattern is sampled), then every expert's error and the aggregate's are scored:
errors in change scales / sqrt(k), so the steps' errors are comparable (a random walk's k-step
error grows as sqrt(k)); the weights compare them relative to persistence's at the same step,
as at step 1 (experts.relative_errors).
Why these experts and not a feedback rollout of the LSTM: docs/benchmarks/horizon.md.

**Intervals per step.** Per scored step, the aggregate's running MAE in that unit and two
quantiles of its residual in units of that MAE, tracked online from the pending forecast's own
bounds (quantile tracking: the P term of intervals.py). Step k's interval is its forecast plus
those quantiles x MAE x sqrt(k) x the change scale now (mixed between scored steps like the
weights); like step 1's, it always holds the forecast. A step whose reading is expected late
(``late``: a sensor that never reports at night, forecast from the evening) gets, where wider,
the interval of the step as many typical gaps on as that reading is expected (H at most): the
calibrated spread of the time it has to move, not a random walk's (which covered the car
park's mornings 0.94-0.98 of the time and the other readings 0.73-0.88). It is tracked
from those published bounds like any other. On the car-park fleet at H = 12, the intervals of
steps 2-8 that span the night covered the morning's reading 0.55-0.85 of the time and the
others 0.92-0.93; now 0.77-0.88 and 0.90-0.92, Winkler 5-11 % lower at steps 2-9
(docs/benchmarks/horizon.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from streamer.core.compiled import kernel
from streamer.core.experts import MIN_NAIVE_ERROR, NAIVE_TYPICAL, within_reach
from streamer.core.intervals import published_bounds
from streamer.core.memory import AR_DEVIATION, AR_ORDER, Recalled

HORIZON_EXPERTS = ("step one", "persistence", "seasonal day", "seasonal week",
                   "seasonal day change", "seasonal week change", "local linear", "day before",
                   "week before", "cycle", "level pull")
N_HORIZON_EXPERTS = len(HORIZON_EXPERTS)
PERSISTENCE_AHEAD = HORIZON_EXPERTS.index("persistence")
# Quantile tracking step (x the interval's width), per scored forecast; a step 2^g forecast is
# scored once every 2^g readings, so its step is larger to adapt about as fast in readings.
TRACK_LR = 0.02
MAX_TRACK_LR = 0.2
MIN_WIDTH = 0.05
# Weight of the newest scored forecast in the running errors, x sqrt(k) (capped), for the same
# reason; early on an equal-weight mean (1 / n).
MAX_ALPHA = 0.2
# The next forecast kept for a scored step is made 0 .. DITHER - 1 readings (pseudo-random)
# after the last was scored.
DITHER = 2


def scored_steps(horizon: int) -> np.ndarray:
    """The steps whose forecasts are scored online: 2, 4, 8, ... below ``horizon``, and
    ``horizon`` itself."""
    if horizon < 2:
        return np.zeros(0, dtype=np.int64)
    powers = 2 ** np.arange(1, int(math.log2(horizon)) + 1)
    return np.unique(np.append(powers, horizon)).astype(np.int64)


@dataclass
class HorizonForecast:
    """The next H readings' forecasts made at each reading of a chunk (step 1 first)."""

    forecast: np.ndarray  # (M, H, F)
    lower: np.ndarray  # (M, H, F)
    upper: np.ndarray  # (M, H, F)
    # Absolute error of the aggregate forecast made k readings before this reading, in change
    # scales (mean over features), for each scored step k (scored_steps); NaN where none was
    # scored.
    step_error: np.ndarray  # (M, P)


def horizon_experts(values: np.ndarray, step_one: np.ndarray, scale: np.ndarray,
                    reach: np.ndarray, recalled: Recalled, clip: float) -> np.ndarray:
    """(M, F, H, K) every horizon expert's forecast of each of the next H readings (order of
    ``HORIZON_EXPERTS``; step 1 is the first of H), within reach of the value (experts.py's
    ``within_reach``)."""
    m, f = values.shape
    h = recalled.seasonal_ahead.shape[2]
    held = np.broadcast_to(step_one[..., None], (m, f, h))
    here = np.broadcast_to(values[..., None], (m, f, h))
    profile = recalled.seasonal_ahead.transpose(0, 3, 2, 1)  # (M, F, H, 2) day, week
    level = np.where(np.isnan(profile), held[..., None], profile)
    change = step_one[..., None, None] + profile - profile[:, :, :1, :]
    change = np.where(np.isnan(change), held[..., None], change)
    # The AR model rolled forward from the step-1 change (change scales, clipped like its own).
    x = np.concatenate([np.clip((step_one - values) / scale, -clip, clip)[..., None],
                        recalled.ar_x[..., : AR_ORDER - 1]], axis=-1).astype(np.float64)
    w = recalled.ar_w[..., :AR_ORDER].astype(np.float64)
    linear = np.empty((m, f, h))
    total = np.zeros((m, f))
    linear[..., 0] = step_one
    for k in range(1, h):
        nxt = np.clip((w * x).sum(axis=-1), -clip, clip)
        total += nxt
        linear[..., k] = step_one + scale * total
        x = np.concatenate([nxt[..., None], x[..., :-1]], axis=-1)
    # The pull to the level rolled forward from the reading, its deviation moving with each
    # step's change (the level held): an AR(1) around the level, k steps on.
    pull_w = recalled.ar_w[..., AR_DEVIATION].astype(np.float64)
    deviation = recalled.ar_x[..., AR_DEVIATION].astype(np.float64)
    pull = np.empty((m, f, h))
    moved = np.zeros((m, f))
    for k in range(h):
        nxt = np.clip(pull_w * (deviation + moved), -clip, clip)
        moved += nxt
        pull[..., k] = values + scale * moved
    naive = recalled.naive_ahead.transpose(0, 3, 2, 1)  # (M, F, H, 2) day, week
    naive = np.where(np.isnan(naive), held[..., None], naive)
    # The cycle counted in readings (memory.py): the change over the same readings a cycle ago.
    cycle = here + scale[..., None] * recalled.cycle_ahead.transpose(0, 2, 1)
    experts = np.stack([held, here, level[..., 0], level[..., 1], change[..., 0],
                        change[..., 1], linear, naive[..., 0], naive[..., 1], cycle, pull],
                       axis=-1)
    # An expert that overflowed (a sensor near 1e300) forecasts the held step 1 instead.
    experts = np.where(np.isfinite(experts), experts, held[..., None])
    return within_reach(experts, values, reach)


class HorizonState:
    """Per-slot weights, pending forecasts and interval state of steps 2..H (host memory)."""

    _ALL = ("err", "count", "mae", "q_lo", "q_hi", "pending", "pending_scale", "due")

    def __init__(self, capacity: int, n_features: int, horizon: int, coverage: float):
        """``horizon`` as LearnerConfig validates it (1 .. MAX_HORIZON)."""
        self.n_features, self.horizon, self.alpha = n_features, horizon, 1.0 - coverage
        self.steps = scored_steps(horizon)
        self.z = NormalDist().inv_cdf(1.0 - self.alpha / 2)
        self.due = np.zeros((0, len(self.steps)), dtype=np.int64)
        self.grow(capacity)

    def _allocate(self, capacity: int) -> dict[str, np.ndarray]:
        f, p, k = self.n_features, len(self.steps), N_HORIZON_EXPERTS
        return {
            "err": np.zeros((capacity, f, p, k), np.float32),  # experts' running errors
            "count": np.zeros((capacity, p), np.float32),  # forecasts scored
            "mae": np.zeros((capacity, f, p), np.float32),  # the aggregate's running MAE
            "q_lo": np.zeros((capacity, f, p), np.float32),
            "q_hi": np.zeros((capacity, f, p), np.float32),
            # Experts, aggregate, lower and upper bound of the forecast awaiting its reading.
            "pending": np.zeros((capacity, f, p, k + 3), np.float64),
            "pending_scale": np.ones((capacity, f, p), np.float64),
            # > 0: the number of the reading the pending forecast is for; <= 0: none pending,
            # the next one is made at reading number -due or later.
            "due": np.zeros((capacity, p), np.int64),
        }

    def grow(self, capacity: int) -> None:
        """Enlarge to ``capacity`` slots, keeping every existing value; new slots start fresh."""
        old = len(self.due)
        for name, values in self._allocate(capacity).items():
            if old:
                values[:old] = getattr(self, name)
            setattr(self, name, values)
        self.reset(np.arange(old, capacity))

    def reset(self, slots: np.ndarray) -> None:
        """Forget ``slots``: equal weights, the prior interval, nothing pending."""
        self.err[slots], self.count[slots], self.due[slots] = 0.0, 0.0, 0
        self.mae[slots] = 1.0  # a random walk's: about one change scale x sqrt(k)
        self.q_lo[slots], self.q_hi[slots] = -self.z, self.z

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self._ALL}

    def load_arrays(self, arrays: dict[str, np.ndarray], steps: np.ndarray) -> None:
        """Load arrays saved with scored ``steps`` (see ``adopt``)."""
        capacity = len(arrays["due"])
        self.due = np.zeros((0, len(self.steps)), dtype=np.int64)
        self.grow(capacity)
        self.adopt(np.arange(capacity), arrays, steps)

    def adopt(self, slots: np.ndarray, arrays: dict[str, np.ndarray], steps: np.ndarray) -> None:
        """Set ``slots`` (fresh ones) from rows saved with scored ``steps``: the state of each
        step scored on both sides moves over; a step only scored here starts fresh (a horizon
        changed between a snapshot and a restart, or between two workers)."""
        steps = np.asarray(steps, dtype=np.int64).reshape(-1)
        for p, k in enumerate(self.steps.tolist()):
            found = np.flatnonzero(steps == k)
            if not len(found):
                continue
            q = int(found[0])
            for name in self._ALL:
                mine, saved = getattr(self, name), np.asarray(arrays[name])
                axis = 1 if mine.ndim == 2 else 2  # the step axis: (C, P) or (C, F, P, ...)
                if saved.shape[:axis] != (len(slots), *mine.shape[1:axis]):
                    raise ValueError(f"horizon array {name!r} has shape {saved.shape}")
                index = (slice(None),) * axis
                mine[(slots, *index[1:], p)] = saved[(*index, q)]

    def forecast(self, slots: np.ndarray, number: np.ndarray, values: np.ndarray,
                 warm: np.ndarray, outlier: np.ndarray, scale: np.ndarray, experts: np.ndarray,
                 step_one: np.ndarray,
                 lower: np.ndarray, upper: np.ndarray, eta: float, alpha: float,
                 clip: float, late: np.ndarray) -> HorizonForecast:
        """Score the forecasts due at each reading, learn, and forecast its next H readings.

        Arrival order. ``number`` (M,) is each reading's number in its slot (1 for the first),
        ``warm`` (M,) whether the sensor is past warm-up after it, ``outlier`` (M,) whether it
        is a spike (a sentinel: its pending forecasts are dropped, not learned from), ``scale``
        (M, F) the change
        scale now, ``experts`` (M, F, H, K) from ``horizon_experts``, ``step_one`` (M, F) the
        step-1 forecast and ``lower`` / ``upper`` (M, F) its interval; ``eta`` and ``alpha``
        the Hedge rate and running-error weight of step 1's experts, ``clip`` the cap on one
        error (change scales); ``late`` (M, H) how many typical gaps later than k gaps after
        the reading step k's reading is expected (learner.py, ``_ahead_lateness``).
        """
        m, f = values.shape
        h = self.horizon
        out = HorizonForecast(np.empty((m, h, f)), np.empty((m, h, f)), np.empty((m, h, f)),
                              np.full((m, len(self.steps)), np.nan))
        _advance(np.asarray(slots, dtype=np.int64), np.asarray(number, dtype=np.int64), values,
                 np.asarray(warm, dtype=np.bool_), np.asarray(outlier, dtype=np.bool_), scale,
                 experts, step_one, lower, upper, np.asarray(late, dtype=np.float64),
                 self.steps.astype(np.int64), float(eta), float(alpha), float(clip),
                 0.5 * self.alpha, self.err, self.count, self.mae, self.q_lo, self.q_hi,
                 self.pending, self.pending_scale, self.due,
                 out.forecast, out.lower, out.upper, out.step_error)
        return out


@kernel
def _capped(error, clip):  # pragma: no cover - compiled
    """An error capped at ``clip``; a non-finite one (overflow) counts as ``clip``."""
    return min(error, clip) if math.isfinite(error) else clip


@kernel
def _dither(n, k):  # pragma: no cover - compiled
    """A pseudo-random number in [0, k) drawn from reading number ``n`` (splitmix64's mixer:
    the same on every run and however the stream is cut)."""
    x = np.uint64(n) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(31))
    return np.int64(x % np.uint64(k))


@kernel
def _advance(slots, number, values, warm, outlier, scale, experts, step_one, lower1, upper1,
             late, steps, eta, alpha,
             clip, half, err, count, mae, q_lo, q_hi, pending, pending_scale, due,
             forecast, lower, upper, step_error):  # pragma: no cover - compiled
    """The per-reading recurrence of ``HorizonState.forecast`` (state updated in place)."""
    f, h, k_all = values.shape[1], experts.shape[2], experts.shape[3]
    n_steps = len(steps)
    weights = np.empty((n_steps, k_all))
    # One feature's running MAE and quantiles per step (mixed between scored steps).
    span, span_lo, span_hi = np.zeros(h), np.zeros(h), np.zeros(h)
    for i in range(len(slots)):
        s = slots[i]
        # 1. Score the forecasts made for this reading (2, 4, ... readings ago) and learn.
        for p in range(n_steps):
            if due[s, p] != number[i]:
                continue
            # The next one is made 0 or 1 readings from now (pseudo-random): a forecast made at
            # every k-th reading only would see one phase of any k-periodic pattern (on the
            # appliances sample, step 2's relMAE was 0.90 that way, 0.77 dithered). A wider
            # dither (0..k-1) scores fewer forecasts: parking's step 12 went 0.94 -> 1.02
            # against week-ago naive.
            due[s, p] = -(number[i] + _dither(number[i], DITHER))
            if outlier[i]:  # a sentinel teaches nothing about k-step errors
                continue
            root = math.sqrt(steps[p])
            count[s, p] += 1.0
            a = max(min(alpha * root, MAX_ALPHA), 1.0 / count[s, p])
            lr = min(TRACK_LR * root, MAX_TRACK_LR)
            total = 0.0
            for j in range(f):
                v, unit = values[i, j], pending_scale[s, j, p] * root
                for e in range(k_all):
                    e_err = _capped(abs(v - pending[s, j, p, e]) / unit, clip)
                    err[s, j, p, e] += a * (e_err - err[s, j, p, e])
                miss = _capped(abs(v - pending[s, j, p, k_all]) / unit, clip)
                total += miss * root
                mae[s, j, p] += a * (miss - mae[s, j, p])
                w = max(q_hi[s, j, p] - q_lo[s, j, p], MIN_WIDTH)
                below, above = v < pending[s, j, p, k_all + 1], v > pending[s, j, p, k_all + 2]
                q_hi[s, j, p] += lr * w * (above - half)
                q_lo[s, j, p] -= lr * w * (below - half)
            step_error[i, p] = total / f
        # 2. This reading's forecasts of the next h readings: step 1 as given, then each step
        # with the weights of the largest scored step at or below it.
        for j in range(f):
            forecast[i, 0, j], lower[i, 0, j], upper[i, 0, j] = (
                step_one[i, j], lower1[i, j], upper1[i, j])
            for p in range(n_steps):
                best = err[s, j, p, 0]
                for e in range(1, k_all):
                    best = min(best, err[s, j, p, e])
                # Compared in units of persistence's own running error (experts.py's
                # relative_errors), as at step 1.
                unit = NAIVE_TYPICAL / max(err[s, j, p, PERSISTENCE_AHEAD], MIN_NAIVE_ERROR)
                norm = 0.0
                for e in range(k_all):
                    if math.isinf(eta):
                        weights[p, e] = 1.0 if err[s, j, p, e] == best and norm == 0.0 else 0.0
                    else:
                        weights[p, e] = math.exp(-eta * unit * (err[s, j, p, e] - best))
                    norm += weights[p, e]
                for e in range(k_all):
                    weights[p, e] /= norm
            p = 0
            for step in range(1, h):
                k = step + 1
                if p + 1 < n_steps and steps[p + 1] <= k:
                    p += 1
                # Between two scored steps, their weights and intervals mixed by log distance.
                q = min(p + 1, n_steps - 1)
                mix = 0.0
                if q > p:
                    mix = math.log(k / steps[p]) / math.log(steps[q] / steps[p])
                value = 0.0
                for e in range(k_all):
                    value += ((1.0 - mix) * weights[p, e] + mix * weights[q, e]) * experts[
                        i, j, step, e]
                forecast[i, step, j] = value
                span[step] = (1.0 - mix) * mae[s, j, p] + mix * mae[s, j, q]
                span_lo[step] = (1.0 - mix) * q_lo[s, j, p] + mix * q_lo[s, j, q]
                span_hi[step] = (1.0 - mix) * q_hi[s, j, p] + mix * q_hi[s, j, q]
            for step in range(1, h):
                # Its reading expected late (a sensor that never reports at night): the
                # interval, as calibrated, of the step that many typical gaps on (H at most),
                # where wider.
                at = min(int(math.floor(step + 1 + late[i, step] + 0.5)), h) - 1
                own = math.sqrt(step + 1) * span[step]
                if not math.sqrt(at + 1) * span[at] > own or not own > 0.0:
                    at = step
                lower[i, step, j], upper[i, step, j] = published_bounds(
                    forecast[i, step, j], min(span_lo[at], 0.0), max(span_hi[at], 0.0),
                    scale[i, j] * math.sqrt(at + 1) * span[at])
        # 3. Keep the forecasts of steps 2, 4, ... until their readings come (one each).
        if not warm[i]:
            continue
        for p in range(n_steps):
            if due[s, p] > 0 or number[i] < -due[s, p]:  # pending, or not yet
                continue
            step = steps[p] - 1
            for j in range(f):
                for e in range(k_all):
                    pending[s, j, p, e] = experts[i, j, step, e]
                pending[s, j, p, k_all] = forecast[i, step, j]
                pending[s, j, p, k_all + 1] = lower[i, step, j]
                pending[s, j, p, k_all + 2] = upper[i, step, j]
                pending_scale[s, j, p] = scale[i, j]
            due[s, p] = number[i] + steps[p]
