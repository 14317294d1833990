"""Per-sensor expert aggregation: each sensor forecasts with the experts that do best on it.

One model serves the whole fleet, so on some sensors (spiky on/off loads, quantized
mostly-flat series, random walks, strong weekly cycles) its forecast is not the best one
available. For every reading a few *experts* forecast the next one:

- the LSTM's predicted change, shrunk by each factor in ``LSTM_SHRINKS`` (``0`` is persistence;
  ``1.25`` undoes the shrinkage an MSE-trained model shows on trending sensors);
- the sensor's seasonal profiles (memory.py) at the next reading's time, of the day and of the
  week, each as a forecast of the value and as the profile's change from now added to the last
  value (which keeps the current level);
- its local linear (AR) model's predicted change;
- its cycle (memory.py): the last value plus the change that the changes one and two cycles
  (of readings) before the next agree on;
- its pull to the level (memory.py): the last value plus the change its deviation from its
  running mean has been followed by (a noisy sensor's next reading is nearer its level).

Every slot keeps an exponentially weighted mean absolute error of each expert, in units of its
typical change, and forecasts with the exponentially weighted average of the experts (Hedge /
EWA): weight ``exp(-eta * (E_k - min E))``, the errors taken relative to persistence's own
(``relative_errors``: scale-free even while the typical change is far from the changes, as
after a change of units). With ``eta = inf`` this is follow the leader. The guarantee
(tests/core/test_memory.py pins it on a mixed fleet): the aggregate's loss tracks the best
expert's within ``ln(K) / eta`` per reading in these units (0.09 at the defaults: 0.12 of
persistence's running error), so after warm-up no sensor does much worse than its best single
expert, persistence included.

It also decides, per sensor, whether a spike (a reading far from both the level and the last
value, e.g. a -9999 sentinel) is a one-off: if, after earlier spikes, "back to the value
before the spike" beat "stay at the spike", the forecast made at a spike is that value.
"""

from __future__ import annotations

import numpy as np

from streamer.core.compiled import kernel
from streamer.core.memory import Recalled

LSTM_SHRINKS = np.array([1.0, 1.25, 0.75, 0.5, 0.25, 0.0])
EXPERTS = ("lstm", "lstm x1.25", "lstm x0.75", "lstm x0.5", "lstm x0.25", "persistence",
           "seasonal day", "seasonal week", "seasonal day change", "seasonal week change",
           "local linear", "cycle", "level pull")
N_EXPERTS = len(EXPERTS)
PERSISTENCE = EXPERTS.index("persistence")
REVERT_ALPHA = 0.25  # weight of the latest spike in deciding whether this sensor's spikes revert
# Where a reading is more than ``clip`` spreads (the normalizer's: the level's standard
# deviation, at least its change scale) from the level before it, the level is in question (a
# shift or a spike) and every expert's forecast is kept within this many spreads of the
# reading. The weights come from errors capped at ``clip`` change scales, so an expert that is
# wildly off keeps a small weight; unbounded, its forecast then moved the aggregate by that
# weight times its miss. After a level shift (a counter reset from 5e6 to 45) the day and week
# profiles, whose level had not followed yet, forecast 5e6 for a few readings and the
# aggregate 3.5e6, 6.4e5, 4.0e4. Not on every reading: after a weekend of zeros the spread has
# decayed to a fraction of a weekday load's, and Monday morning's day-ago and week-ago
# readings, which are right, were cut to a tenth of the load.
REACH = 12.0
# Hedge compares the experts' running errors in units of persistence's own (times the typical
# value of that, in change scales): scale-free even where the change scale is far from the
# changes. After a unit change (W to kW) the scale stays 1,000x the new changes for hundreds of
# readings, every running error drops to ~0.01 of a scale, the weights went flat and the LSTM
# (its change 1,000x too large) held a third of them: 16-224x persistence's error 50-200
# readings after the change on the bundled sample's sensors (1.05-2.3x relative).
# On the fleets (default replays, relMAE in change scales -> relative): appliances 0.7317 ->
# 0.7278, hourly 0.7217 -> 0.7208, daily 0.8312 -> 0.8306, parking 0.64595 -> 0.64597, and the
# synthetic fleets 0.1-0.3 % better; 0.6 and 0.8 instead of 0.7 are each worse on some fleet,
# and so are plain etas of 22 and 40 (docs/benchmarks/quality.md).
NAIVE_TYPICAL = 0.7
# Persistence's running error is floored at this many change scales where it is divided by (a
# sensor persistence forecast exactly for long): here, and for the width of an interval in
# persistence MAEs (learner.py).
MIN_NAIVE_ERROR = 1e-3


def expert_reach(values: np.ndarray, prev_level: np.ndarray, prev_spread: np.ndarray,
                 spread: np.ndarray, has_prev: np.ndarray, clip: float) -> np.ndarray:
    """(M, F) how far from each value its experts may forecast: ``REACH`` spreads where the
    reading is more than ``clip`` of the spreads before it from the level before it, else
    unbounded (inf)."""
    with np.errstate(over="ignore", invalid="ignore"):  # near the range limit: no bound
        far = has_prev[:, None] & (np.abs(values - prev_level) > clip * prev_spread)
        return np.where(far, REACH * spread, np.inf)


def within_reach(forecasts: np.ndarray, values: np.ndarray, reach: np.ndarray) -> np.ndarray:
    """``forecasts`` (M, F, ...) of the readings after ``values`` (M, F), each kept within
    ``reach`` (M, F, from ``expert_reach``) of the value."""
    extra = (None,) * (forecasts.ndim - values.ndim)
    here, bound = values[(..., *extra)], reach[(..., *extra)]
    with np.errstate(over="ignore", invalid="ignore"):  # near the range limit: no bound
        return np.clip(forecasts, here - bound, here + bound)


def expert_forecasts(values: np.ndarray, lstm_change: np.ndarray, recalled: Recalled,
                     scale: np.ndarray, reach: np.ndarray, clip: float) -> np.ndarray:
    """(M, F, K) every expert's forecast of the next reading (order of ``EXPERTS``), within
    reach of the value (``within_reach``).

    "seasonal day" is the day profile at the next reading's time; "seasonal day change" is the
    last value plus the profile's change from now to then (it keeps the current level). A
    profile with nothing at that time (NaN) forecasts persistence.
    """
    lstm = values[..., None] + lstm_change[..., None] * LSTM_SHRINKS  # (M, F, 6)
    level = recalled.seasonal.transpose(0, 2, 1)  # (M, F, 2) day, week
    change = values[..., None] + level - recalled.seasonal_now.transpose(0, 2, 1)
    seasonal = np.concatenate([level, change], axis=-1)  # (M, F, 4)
    seasonal = np.where(np.isnan(seasonal), values[..., None], seasonal)
    linear = values + scale * np.clip(recalled.ar_change, -clip, clip)  # (M, F)
    cycle = values + scale * np.clip(recalled.cycle_change, -clip, clip)
    pull = values + scale * np.clip(recalled.pull_change, -clip, clip)
    experts = np.concatenate([lstm, seasonal, linear[..., None], cycle[..., None],
                              pull[..., None]], axis=-1)
    return within_reach(experts, values, reach)


def weigh_experts(
    err_state: np.ndarray, revert_state: np.ndarray, slots: np.ndarray, errors: np.ndarray,
    scored: np.ndarray, n_scored: np.ndarray, alpha: float, eta: float,
    revert_gain: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Advance each slot's running errors through a chunk (arrival order); the experts' weights.

    ``err_state`` (C, F, K) and ``revert_state`` (C, F) are updated in place. ``errors``
    (M, F, K) holds each reading's absolute error of every expert's forecast made for it,
    ``scored`` (M,) whether it counts (the forecast made for it came from a warm model),
    ``n_scored`` (M,) how many scored readings the slot has had including this one.
    ``revert_gain`` (M, F) is NaN except on readings just after a spike, where it is +1 if
    the value before the spike forecast this reading better than the spike did, -1 if worse.

    Returns, per reading, (M, F, K) the weights, (M, F) whether to revert a spike, as decided
    after that reading (they apply to the forecast made at it), and (M, F, K) the running
    errors after it. The compiled loop walks
    the readings in order, so the result does not depend on how the stream is cut.
    """
    weight = np.where(scored, np.maximum(alpha, 1.0 / np.maximum(n_scored, 1)), 0.0)  # (M,)
    after = np.empty_like(errors)  # (M, F, K) running errors after each reading
    revert = np.empty(revert_gain.shape, dtype=bool)
    _advance_errors(slots.astype(np.int64), errors, weight, revert_gain, err_state,
                    revert_state, after, revert)
    return hedge_weights(relative_errors(after), eta), revert, after


def relative_errors(errors: np.ndarray) -> np.ndarray:
    """(..., K) running errors in change scales -> in units of persistence's running error
    (times NAIVE_TYPICAL, what that is in change scales on a typical sensor)."""
    naive = errors[..., PERSISTENCE : PERSISTENCE + 1]
    return errors * (NAIVE_TYPICAL / np.maximum(naive, MIN_NAIVE_ERROR))


@kernel
def _advance_errors(slots, errors, weight, revert_gain, err_state, revert_state, after,
                    revert):  # pragma: no cover - compiled
    """The per-reading recurrence of ``weigh_experts`` (state updated in place)."""
    f, k = errors.shape[1], errors.shape[2]
    for i in range(len(slots)):
        s, a = slots[i], weight[i]
        for j in range(f):
            for e in range(k):
                err_state[s, j, e] += a * (errors[i, j, e] - err_state[s, j, e])
                after[i, j, e] = err_state[s, j, e]
            gain = revert_gain[i, j]
            if not np.isnan(gain):  # just after a spike
                revert_state[s, j] += REVERT_ALPHA * (gain - revert_state[s, j])
            revert[i, j] = revert_state[s, j] > 0


def hedge_weights(errors: np.ndarray, eta: float) -> np.ndarray:
    """(..., K) weights ``exp(-eta (E_k - min E))``, normalized; one-hot on the first minimum
    (exact ties go to the first expert, the LSTM's own forecast) when ``eta`` is infinite."""
    if np.isinf(eta):
        return (np.arange(errors.shape[-1]) == errors.argmin(axis=-1)[..., None]).astype(float)
    w = np.exp(-eta * (errors - errors.min(axis=-1, keepdims=True)))
    return w / w.sum(axis=-1, keepdims=True)
