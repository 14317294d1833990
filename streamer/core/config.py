"""Plain, frozen configuration of the learner (the core never sees pydantic)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass

# Bounds one update's memory and time in a 100k-sensor fleet, and the queue of full windows.
MAX_WINDOWS_PER_UPDATE = 8192
# anomaly_learn_after is kept per sensor in one byte.
MAX_LEARN_AFTER = 255
# Steps a forecast may look ahead (horizon.py).
MAX_HORIZON = 256
# The torch devices a config may name (core/device.py resolves them; the settings check them).
DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
_DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def is_device_name(name: str) -> bool:
    return bool(_DEVICE_NAME.match(name))


@dataclass(frozen=True)
class LearnerConfig:
    """Everything that shapes the learner's tensors and its online training."""

    n_features: int = 1
    hidden_size: int = 32
    num_layers: int = 1
    # Truncated BPTT: a slot's window is ready once it holds this many (input, target) steps.
    tbptt_steps: int = 32
    # One update runs after every `train_every` accepted readings (a count, never a clock).
    # Small, so a window is trained on soon after it fills: readings that arrive between a
    # full window and the update are never trained on (64 vs 256: synthetic fleet relMAE
    # 0.87 -> 0.83, appliances unchanged). Triggers with no full window cost nothing.
    train_every: int = 64
    # An update waits until this many full windows are queued: one at first, one more every 16
    # updates up to this (and one per 16 sensors in a large fleet, at most 64). Windows queue
    # without dropping readings, so waiting costs no data, only delay and optimizer steps; it
    # bounds the updates per reading, which is what makes a small fleet replay as fast per
    # reading as a large one. By measurement over the shared fleets (docs/benchmarks/quality.md,
    # relMAE parking / daily / hourly, hourly updates): a fixed 8: 0.754 / 0.839 / 0.719, 1,402;
    # a fixed 16: 0.762 / 0.844 / 0.724, 725; ramp to 32: 0.728 / 0.837 / 0.728, 609.
    min_update_windows: int = 32
    # 5e-3 by measurement: appliances relMAE 0.783 (3e-3: 0.775), seasonal synthetic fleet
    # 0.777 (3e-3: 0.810), mixed synthetic fleet 0.822 (3e-3: 0.830). See docs/benchmarks.
    lr: float = 5e-3
    max_grad_norm: float = 1.0
    # Slot table.
    initial_capacity: int = 1024
    max_sensors: int = 100_000
    sensor_ttl_seconds: float | None = None
    max_sensor_id_length: int = 256
    # Normalization: exponentially weighted mean/variance with this weight; 0 means Welford
    # (equal weights). Early readings use max(alpha, 1/n) so the first estimates are unbiased.
    norm_alpha: float = 0.01
    # A new sensor's forecast is persistence (its last value) until it has this many readings.
    warmup_readings: int = 8
    # Inputs and targets in normalized units are clipped to +-clip so outliers cannot dominate.
    clip_z: float = 6.0
    # Past warm-up the normalizer's statistics see readings winsorized at +-clip_z scales.
    robust_stats: bool = True
    # Per-sensor experts (experts.py): weight of their running errors; 0 turns them off (the
    # LSTM's own forecast is used as it is).
    guard_alpha: float = 0.02
    # Hedge learning rate of the experts' weights (inf: follow the leader). 30 by measurement
    # over all shared and synthetic fleets (docs/benchmarks/quality.md): vs inf, daily 0.830 vs
    # 0.842, parking 0.679 vs 0.687, appliances equal; 10 lets on/off sensors lose (1.07).
    expert_eta: float = 30.0
    # Weight of the newest reading in a seasonal profile bucket (memory.py); 1 keeps only the
    # latest cycle ("the value a day / a week before").
    seasonal_alpha: float = 0.5
    # Intervals (intervals.py): the share of next readings each forecast's [lower, upper] is
    # meant to hold, calibrated online per sensor.
    coverage: float = 0.9
    # Forecast the next `horizon` readings of a sensor at each reading (horizon.py); 1: the
    # next one only, exactly as without the feature.
    horizon: int = 1
    # A reading whose anomaly score (1 - its tail probability) is at least this is flagged.
    anomaly_threshold: float = 0.999
    # Flagged readings do not move a sensor's calibration until it has been flagged this many
    # readings in a row (then it is the new normal): 0 learns from every reading. 0 by
    # measurement (docs/benchmarks/intervals.md): with 8, coverage on the shared fleets fell to
    # 0.86-0.88 (the flagged readings are exactly the misses the quantiles need to see).
    anomaly_learn_after: int = 0
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("n_features", "hidden_size", "num_layers", "tbptt_steps", "train_every",
                    "min_update_windows",
                    "initial_capacity", "max_sensors", "max_sensor_id_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_update_windows > MAX_WINDOWS_PER_UPDATE:
            raise ValueError(f"min_update_windows must be <= {MAX_WINDOWS_PER_UPDATE} (the most "
                             f"windows one update trains), got {self.min_update_windows}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0.0 <= self.norm_alpha < 1.0:
            raise ValueError(f"norm_alpha must be in [0, 1), got {self.norm_alpha}")
        if self.warmup_readings < 1:
            raise ValueError(f"warmup_readings must be >= 1, got {self.warmup_readings}")
        if not 0.0 <= self.guard_alpha < 1.0:
            raise ValueError(f"guard_alpha must be in [0, 1), got {self.guard_alpha}")
        if not self.expert_eta > 0:
            raise ValueError(f"expert_eta must be > 0, got {self.expert_eta}")
        if not 0.0 < self.seasonal_alpha <= 1.0:
            raise ValueError(f"seasonal_alpha must be in (0, 1], got {self.seasonal_alpha}")
        if not 1 <= self.horizon <= MAX_HORIZON:
            raise ValueError(f"horizon must be in [1, {MAX_HORIZON}], got {self.horizon}")
        if not 0.0 < self.coverage < 1.0:
            raise ValueError(f"coverage must be in (0, 1), got {self.coverage}")
        if not 0.0 < self.anomaly_threshold < 1.0:
            raise ValueError(f"anomaly_threshold must be in (0, 1), got {self.anomaly_threshold}")
        if not 0 <= self.anomaly_learn_after <= MAX_LEARN_AFTER:
            raise ValueError(f"anomaly_learn_after must be in [0, {MAX_LEARN_AFTER}], got "
                             f"{self.anomaly_learn_after}")
        if not self.anomaly_threshold > self.coverage:
            raise ValueError(f"anomaly_threshold ({self.anomaly_threshold}) must be above "
                             f"coverage ({self.coverage}): a reading inside its interval can "
                             "score up to the coverage")
        if not self.clip_z > 0:
            raise ValueError(f"clip_z must be > 0, got {self.clip_z}")
        if self.sensor_ttl_seconds is not None and not self.sensor_ttl_seconds > 0:
            raise ValueError(f"sensor_ttl_seconds must be > 0, got {self.sensor_ttl_seconds}")
        if self.initial_capacity > self.max_sensors:
            raise ValueError(
                f"initial_capacity ({self.initial_capacity}) must not exceed "
                f"max_sensors ({self.max_sensors})"
            )

    # Fields whose change makes a snapshot's tensors meaningless for this learner.
    SHAPE_FIELDS = ("n_features", "hidden_size", "num_layers", "tbptt_steps", "clip_z")

    def fingerprint(self) -> str:
        """A short hash of the fields that a snapshot must agree on."""
        shape = {name: getattr(self, name) for name in self.SHAPE_FIELDS}
        shape["input_layout"] = INPUT_LAYOUT_VERSION
        blob = json.dumps(shape, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Bump when the model's input features change meaning, so old snapshots are refused.
# 2: seasonal inputs, per-sensor memory and experts.
INPUT_LAYOUT_VERSION = 2
