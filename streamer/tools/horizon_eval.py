"""Multi-step forecasts offline: per-step errors against h-step persistence and seasonal naive,
and per-step interval coverage (``streamer replay --horizon``, tests/bench_horizon.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamer.core.batch import HorizonResult

DAY, WEEK = 86_400.0, 604_800.0
GAP_FACTOR = 3.0  # a gap longer than this many of the sensor's typical (median) gaps


@dataclass(frozen=True)
class StepScore:
    """Step k's forecasts over a fleet: relMAE (mean over sensors of MAE / the baseline's MAE
    on the same readings) against each baseline, and the interval's coverage."""

    step: int
    pairs: int  # (forecast, reading) pairs scored
    vs_persistence: float  # the reading the forecast was made at
    # The reading nearest to one day / one week before the time the step's reading is expected
    # (the forecast's target_ts: the same question), among those known at the origin.
    vs_day: float
    vs_week: float
    vs_seasonal: float  # against each sensor's better of the two
    # The same, told the actual time of the reading (which no forecaster knows in advance for
    # a sensor with gaps): shown for reference.
    vs_seasonal_actual_time: float
    coverage: float  # share of readings (per feature) inside the step's interval
    nonfinite: int = 0  # forecasts that were not finite numbers (left out above; a defect)
    # The same for the readings whose k steps span a gap of over GAP_FACTOR typical gaps (a
    # night of a sensor read by day, an outage) and how many pairs those are; NaN if none.
    coverage_across_gaps: float = float("nan")
    pairs_across_gaps: int = 0

    @property
    def vs_better(self) -> float:
        """relMAE against the best of the three baselines over the fleet (persistence, day and
        week seasonal naive, each one method for every sensor)."""
        return max(self.vs_persistence, self.vs_day, self.vs_week)


def score_steps(sensor_ids: Sequence[str], ts: np.ndarray, values: np.ndarray,
                status: np.ndarray, horizon: HorizonResult) -> list[StepScore]:
    """Score every forecast step against the reading it was for: the k-th next accepted
    reading of its sensor. Pairs count once the target is a week past the sensor's first
    reading, so both seasonal naives exist; a seasonal naive only uses readings known when
    the forecast was made."""
    n_cols = 10
    accepted = np.flatnonzero(status == 0)
    _, sensor_of = np.unique(np.asarray(sensor_ids, dtype=object)[accepted], return_inverse=True)
    order = np.argsort(sensor_of, kind="stable")  # each sensor's readings, in arrival order
    bounds = np.flatnonzero(np.diff(sensor_of[order])) + 1
    h = horizon.forecast.shape[1]
    sums = {k: [] for k in range(1, h + 1)}  # per step: per sensor (n, errors x 4, inside)
    nonfinite = np.zeros(h + 1, dtype=np.int64)
    for part in np.split(order, bounds) if len(order) else []:  # none accepted: no sensor
        rows = accepted[part]
        t, y = ts[rows], values[rows]
        gaps = np.diff(t)
        big = gaps > GAP_FACTOR * np.median(gaps) if len(gaps) else gaps > 0
        spanned = np.concatenate([[0], np.cumsum(big)])  # big gaps before each reading
        for k in range(1, h + 1):
            origin = np.arange(len(rows) - k)
            target = origin + k
            keep = t[target] - WEEK >= t[0]
            origin, target = origin[keep], target[keep]
            f = horizon.forecast[rows[origin], k - 1]
            ok = np.isfinite(f).all(axis=1)
            nonfinite[k] += int((~ok).sum())
            origin, target, f = origin[ok], target[ok], f[ok]
            if not len(origin):
                continue
            truth = y[target]
            expected = horizon.target_ts[rows[origin], k - 1]
            expected = np.where(np.isfinite(expected), expected, t[target])
            errors = [np.abs(f - truth).mean(axis=1), np.abs(y[origin] - truth).mean(axis=1)]
            for when in (expected, t[target]):
                for period in (DAY, WEEK):
                    past = _nearest_known(t, when - period, origin)
                    errors.append(np.abs(y[past] - truth).mean(axis=1))
            lo = horizon.lower[rows[origin], k - 1]
            hi = horizon.upper[rows[origin], k - 1]
            inside = ((truth >= lo) & (truth <= hi)).mean(axis=1)
            across = spanned[target] > spanned[origin]
            sums[k].append((len(origin), *(e.mean() for e in errors), inside.sum(),
                            across.sum(), inside[across].sum()))
    scores = []
    for k in range(1, h + 1):
        per = np.array(sums[k], dtype=np.float64).reshape(-1, n_cols)
        n, model, persist, day, week, day_actual, week_actual, inside, n_gap, in_gap = per.T
        scores.append(StepScore(
            step=k, pairs=int(n.sum()), vs_persistence=_rel(model, persist),
            vs_day=_rel(model, day), vs_week=_rel(model, week),
            vs_seasonal=_rel(model, np.minimum(day, week)),
            vs_seasonal_actual_time=_rel(model, np.minimum(day_actual, week_actual)),
            coverage=float(inside.sum() / n.sum()) if n.sum() else float("nan"),
            nonfinite=int(nonfinite[k]),
            coverage_across_gaps=float(in_gap.sum() / n_gap.sum()) if n_gap.sum() else float(
                "nan"),
            pairs_across_gaps=int(n_gap.sum()),
        ))
    return scores


def _nearest_known(t: np.ndarray, when: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Index of the reading nearest in time to ``when`` among those up to ``origin``."""
    after = np.minimum(np.searchsorted(t, when), origin)
    before = np.maximum(after - 1, 0)
    return np.where(np.abs(t[before] - when) <= np.abs(t[after] - when), before, after)


def _rel(model: np.ndarray, baseline: np.ndarray) -> float:
    ok = baseline > 0
    return float(np.mean(model[ok] / baseline[ok])) if ok.any() else float("nan")


def format_steps(scores: list[StepScore]) -> str:
    lines = [f"{'step':>4} {'pairs':>9} {'vs persist':>10} {'vs day':>7} {'vs week':>7} "
             f"{'vs seasonal':>11} {'(actual time)':>13} {'coverage':>8} "
             f"{'across gaps':>11} {'(pairs)':>9}"]
    for s in scores:
        lines.append(f"{s.step:>4} {s.pairs:>9,} {s.vs_persistence:>10.3f} {s.vs_day:>7.3f} "
                     f"{s.vs_week:>7.3f} {s.vs_seasonal:>11.3f} {s.vs_seasonal_actual_time:>13.3f} "
                     f"{s.coverage:>8.3f} {s.coverage_across_gaps:>11.3f} "
                     f"{s.pairs_across_gaps:>9,}")
    bad = sum(s.nonfinite for s in scores)
    if bad:
        lines.append(f"{bad:,} forecasts were not finite numbers (left out above)")
    return "\n".join(lines)

