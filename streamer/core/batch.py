"""The learner's input (a micro-batch of readings) and its outputs, as plain arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np


@dataclass(frozen=True)
class Batch:
    """N readings in arrival order.

    ``values`` is (N, F) float64; a reading that carried fewer or more than F numbers has its
    true count in ``n_values`` (it will be rejected as WRONG_FEATURE_COUNT); missing cells are NaN.
    """

    sensor_ids: Sequence[str]  # (N,)
    ts: np.ndarray  # (N,) float64, epoch seconds
    values: np.ndarray  # (N, F) float64
    n_values: np.ndarray  # (N,) int64, how many numbers each reading carried

    def __len__(self) -> int:
        return len(self.sensor_ids)

    @classmethod
    def from_arrays(cls, sensor_ids: Sequence[str], ts: np.ndarray, values: np.ndarray) -> Batch:
        """Build from well-formed arrays; ``values`` may be (N,) for one feature."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim == 1:
            values = values[:, None]
        ts = np.asarray(ts, dtype=np.float64)
        n_values = np.full(len(sensor_ids), values.shape[1], dtype=np.int64)
        return cls(list(sensor_ids), ts, values, n_values)

    @classmethod
    def from_records(
        cls, records: Sequence[tuple[str, float, Sequence[float]]], n_features: int
    ) -> Batch:
        """Build from (sensor_id, ts, values) tuples whose value lists may have any length."""
        n = len(records)
        counts = [len(r[2]) for r in records]
        n_values = np.array(counts, dtype=np.int64).reshape(n)
        if counts.count(n_features) == n:  # the usual case: one array call, no per-row writes
            values = np.array([r[2] for r in records], dtype=np.float64).reshape(n, n_features)
        else:
            values = np.full((n, n_features), np.nan, dtype=np.float64)
            for i, (_, _, vals) in enumerate(records):
                k = min(len(vals), n_features)
                values[i, :k] = vals[:k]
        ts = np.array([r[1] for r in records], dtype=np.float64)
        return cls([r[0] for r in records], ts, values, n_values)

    def take(self, index: np.ndarray) -> Batch:
        """The readings at ``index``, in that order."""
        return Batch(
            [self.sensor_ids[i] for i in index.tolist()],
            self.ts[index],
            self.values[index],
            self.n_values[index],
        )


@dataclass(frozen=True)
class UpdateStats:
    """What one truncated-BPTT update did."""

    update_index: int  # 1-based count of updates attempted, skipped ones included
    loss: float  # masked MSE in normalized units (nan when non-finite)
    grad_norm: float  # total global norm before clipping, as clip_grad_norm_ returned it
    clipped: bool  # grad_norm exceeded max_grad_norm
    skipped: bool  # non-finite loss or norm, or nothing to learn from: weights untouched
    slots: int  # windows trained (n_ready)
    steps: int  # (slot, step) pairs that contributed to the loss
    duration_seconds: float
    windows_left_out: int = 0  # windows holding a non-finite number, excluded from the update


@dataclass
class HorizonResult:
    """The next H readings' forecasts made at each reading (step 1 is ``forecasts``)."""

    forecast: np.ndarray  # (N, H, F) float64; NaN where rejected
    lower: np.ndarray  # (N, H, F)
    upper: np.ndarray  # (N, H, F)
    # When each step's reading is expected: one typical gap after another, skipping hours of
    # the day the sensor never reports in (memory.py; NaN before its second reading).
    target_ts: np.ndarray  # (N, H)
    # Absolute error, in change scales, of the forecast made k readings before this reading for
    # each scored step k (``steps``: 2, 4, 8, ... and H; mean over features); NaN where none
    # was scored.
    step_error: np.ndarray  # (N, P)
    steps: np.ndarray  # (P,) int64

    def take(self, rows: np.ndarray) -> HorizonResult:
        """These rows only (an index array: copies)."""
        return HorizonResult(self.forecast[rows], self.lower[rows], self.upper[rows],
                             self.target_ts[rows], self.step_error[rows], self.steps)

    @classmethod
    def concat(cls, parts: Sequence[HorizonResult]) -> HorizonResult:
        """The rows of ``parts``, one after another."""
        return cls(*(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("forecast", "lower", "upper", "target_ts", "step_error")),
                   parts[0].steps)

    @classmethod
    def empty(cls, n: int, n_features: int, horizon: int, steps: np.ndarray) -> HorizonResult:
        nan = np.full((n, horizon, n_features), np.nan)
        return cls(nan, nan.copy(), nan.copy(), np.full((n, horizon), np.nan),
                   np.full((n, len(steps)), np.nan), np.asarray(steps, dtype=np.int64))


@dataclass
class StepResult:
    """Outputs of one ``Learner.step`` call, aligned with the input batch."""

    status: np.ndarray  # (N,) int8 Reason values; 0 = accepted
    forecasts: np.ndarray  # (N, F) float64 next-reading forecasts; NaN where rejected
    update_count: np.ndarray  # (N,) int64 weight updates applied when the forecast was made
    # Prequential errors in normalized units of the forecast made for this reading earlier,
    # and of persistence; NaN where the sensor had no scored forecast yet.
    model_error: np.ndarray  # (N,) float64, mean over features
    persistence_error: np.ndarray  # (N,) float64
    # The interval around each forecast (NaN where rejected), and how surprising each reading
    # was given the forecast and interval made before it (intervals.py).
    lower: np.ndarray  # (N, F) float64
    upper: np.ndarray  # (N, F) float64
    anomaly_score: np.ndarray  # (N,) float64 in [0, 1]; 0 where unscored or rejected
    anomaly: np.ndarray  # (N,) bool: the score reached the threshold
    inside: np.ndarray  # (N,) int8: how many features fell inside the interval made before
    # the reading (each feature has its own, at the same coverage); -1 unscored
    interval_width: np.ndarray  # (N,) float64 mean width, in the sensor's persistence MAEs
    # What was expected of each reading: the forecast made at its sensor's previous reading and
    # that forecast's interval (NaN where unscored): the anomaly topic's events carry them.
    expected: np.ndarray  # (N, F) float64
    expected_lower: np.ndarray  # (N, F) float64
    expected_upper: np.ndarray  # (N, F) float64
    horizon: HorizonResult | None = None  # with a horizon of more than one step
    updates: list[UpdateStats] = field(default_factory=list)
    new_sensors: int = 0
    evicted_sensors: int = 0
    # Sensors restarted because their clock came back from more than a day ahead (of the fleet
    # and of now).
    restarted_sensors: int = 0

    @classmethod
    def concat(cls, parts: Sequence[StepResult]) -> StepResult:
        """The results of consecutive micro-batches as one: rows one after another, updates
        in order, counts added up."""
        first = parts[0]
        joined = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
                  for f in fields(cls) if isinstance(getattr(first, f.name), np.ndarray)}
        return replace(
            first, **joined,
            horizon=(None if first.horizon is None
                     else HorizonResult.concat([p.horizon for p in parts])),  # type: ignore[misc]
            updates=[u for p in parts for u in p.updates],
            new_sensors=sum(p.new_sensors for p in parts),
            evicted_sensors=sum(p.evicted_sensors for p in parts),
            restarted_sensors=sum(p.restarted_sensors for p in parts),
        )

    @classmethod
    def empty(cls, n: int, n_features: int) -> StepResult:
        """Outputs for ``n`` readings, as if every one were rejected (filled in by the step)."""
        return cls(
            status=np.zeros(n, dtype=np.int8),
            forecasts=np.full((n, n_features), np.nan),
            update_count=np.zeros(n, dtype=np.int64),
            model_error=np.full(n, np.nan),
            persistence_error=np.full(n, np.nan),
            lower=np.full((n, n_features), np.nan),
            upper=np.full((n, n_features), np.nan),
            anomaly_score=np.zeros(n),
            anomaly=np.zeros(n, dtype=bool),
            inside=np.full(n, -1, dtype=np.int8),
            interval_width=np.full(n, np.nan),
            expected=np.full((n, n_features), np.nan),
            expected_lower=np.full((n, n_features), np.nan),
            expected_upper=np.full((n, n_features), np.nan),
        )
