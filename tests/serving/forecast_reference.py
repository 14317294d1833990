"""The forecast JSON written plainly, one json.dumps per record: the reference that
``streamer.serving.codec.encode_forecasts`` (the hot path's string formatting) must equal
byte for byte."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from streamer.core.batch import HorizonResult


def _finite_or_none(number: float) -> float | None:
    return number if math.isfinite(number) else None


def encode_forecast(
    sensor_id: str,
    ts: float,
    forecast_values: Sequence[float] | np.ndarray,
    partition: int,
    offset: int,
    update_count: int,
    n_features: int,
    *,
    lower: Sequence[float] | np.ndarray,
    upper: Sequence[float] | np.ndarray,
    anomaly_score: float,
    anomaly: bool,
    horizon: HorizonResult | None = None,
) -> bytes:
    """The forecast that follows the reading at (partition, offset), as UTF-8 JSON.

    ``lower`` / ``upper`` bound the forecast's prediction interval; ``anomaly_score`` and
    ``anomaly`` are those of the reading at (partition, offset), given the forecast made
    before it. With ``horizon`` (one row: the next H readings' forecasts made at this reading,
    step 1 being the top-level forecast) a ``"horizon"`` list follows: ``{"step": k, "ts": expected
    time, "value" (or "values"), "lower", "upper"}`` per step. A non-finite number is written
    as ``null``: the output stays valid JSON.
    """
    numbers = [_finite_or_none(float(number)) for number in forecast_values]
    low = [_finite_or_none(float(number)) for number in lower]
    high = [_finite_or_none(float(number)) for number in upper]
    if not len(numbers) == len(low) == len(high) == n_features:
        raise ValueError(f"expected {n_features} forecast values and bounds, got "
                         f"{len(numbers)}, {len(low)} and {len(high)}")
    body: dict[str, Any] = {"sensor_id": sensor_id, "ts": float(ts)}
    if n_features == 1:
        body.update(value=numbers[0], lower=low[0], upper=high[0])
    else:
        body.update(values=numbers, lower=low, upper=high)
    body["anomaly_score"] = _finite_or_none(float(anomaly_score))
    body["anomaly"] = bool(anomaly)
    body["partition"] = int(partition)
    body["offset"] = int(offset)
    body["model_updates"] = int(update_count)
    if horizon is not None:
        key = "value" if n_features == 1 else "values"
        steps = []
        for k in range(horizon.target_ts.shape[1]):
            numbers = [_finite_or_none(float(x)) for x in horizon.forecast[0, k]]
            low = [_finite_or_none(float(x)) for x in horizon.lower[0, k]]
            high = [_finite_or_none(float(x)) for x in horizon.upper[0, k]]
            one = n_features == 1
            steps.append({"step": k + 1, "ts": _finite_or_none(float(horizon.target_ts[0, k])),
                          key: numbers[0] if one else numbers, "lower": low[0] if one else low,
                          "upper": high[0] if one else high})
        body["horizon"] = steps
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
