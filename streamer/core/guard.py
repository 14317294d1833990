"""A per-sensor safety net: shrink the model's predicted change where it loses to persistence.

The model is shared by the whole fleet, so on some sensors (spiky on/off loads, quantized
mostly-flat series, random walks) its predicted change hurts more than it helps. For every slot
the guard keeps an exponentially weighted mean absolute error of a few *shrunk* forecasts,
``last + w * change`` for ``w`` in ``SHRINKS`` (``w = 0`` is persistence), and forecasts with
the ``w`` that has done best so far on that sensor: "follow the leader" over a tiny expert
set. It is cheap, vectorized over slots and scale-free (errors are in change-scale units), and
it can only track the best of its experts, so no sensor ends up much worse than persistence.

It also decides, per sensor, whether a spike (a reading far from both the level and the last
value, e.g. a -9999 sentinel) is a one-off: if, after earlier spikes, "back to the value
before the spike" beat "stay at the spike", the forecast made at a spike is that value.
"""

from __future__ import annotations

import numpy as np

from streamer.core.grouping import rank_rows

# Candidate shrink factors of the predicted change. 1.25 lets the guard undo the shrinkage an
# MSE-trained model shows on trending sensors. Exact ties (an untrained model predicts no
# change, so every candidate scores the same) go to the first entry: the model's own forecast.
SHRINKS = np.array([1.0, 1.25, 0.75, 0.5, 0.25, 0.0])
REVERT_ALPHA = 0.25  # weight of the latest spike in deciding whether this sensor's spikes revert


def choose_shrink(
    err_state: np.ndarray, revert_state: np.ndarray, slots: np.ndarray, pos: np.ndarray,
    n_pos: int, errors: np.ndarray, scored: np.ndarray, n_scored: np.ndarray, alpha: float,
    revert_gain: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Advance each slot's running errors through a chunk; the shrink to forecast with.

    ``err_state`` (C, F, K) and ``revert_state`` (C, F) are updated in place. ``errors``
    (M, F, K) holds each reading's absolute error of every candidate forecast made for it,
    ``scored`` (M,) whether it counts (the forecast made for it came from a warm model),
    ``n_scored`` (M,) how many scored readings the slot has had including this one.
    ``revert_gain`` (M, F) is NaN except on readings just after a spike, where it is +1 if
    the value before the spike forecast this reading better than the spike did, -1 if worse.

    Returns, per reading, (M, F) the shrink factor and (M, F) whether to revert a spike, as
    decided after that reading: they apply to the forecast made at it. The loop runs over
    ranks, vectorized over slots, so the result does not depend on how the stream is cut.
    """
    a = np.where(scored, np.maximum(alpha, 1.0 / np.maximum(n_scored, 1)), 0.0)[:, None, None]
    after_spike = ~np.isnan(revert_gain)  # (M, F)
    after = np.empty_like(errors)  # (M, F, K) running errors after each reading
    revert = np.empty(revert_gain.shape, dtype=bool)
    for r in rank_rows(pos, n_pos):  # readings of one rank: distinct slots
        s = slots[r]
        e = err_state[s]
        e += a[r] * (errors[r] - e)
        err_state[s] = e
        after[r] = e
        score = revert_state[s]
        score = np.where(after_spike[r], score + REVERT_ALPHA * (revert_gain[r] - score), score)
        revert_state[s] = score
        revert[r] = score > 0
    return SHRINKS[after.argmin(axis=-1)], revert
