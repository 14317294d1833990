"""Every Prometheus metric the worker exports, declared once against an injected registry.

Labels are bounded by construction: rejection reasons, topic/partition of the consumer's own
assignment, device, inside/outside an interval. A sensor id is never a label; per-sensor state
is summarised as counts (sensors flagged as anomalous in the last few minutes among them).
"""

from __future__ import annotations

import math
import platform
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.process_collector import ProcessCollector

from streamer import __version__
from streamer.core.batch import HorizonResult, StepResult, UpdateStats
from streamer.core.config import LearnerConfig
from streamer.core.rejections import REJECTION_REASONS, Reason
from streamer.kafka.client import PartitionId

# Readings per poll: 1 .. ~10k.
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# Reading timestamp (or broker append time) to forecast produced: milliseconds .. tens of seconds.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
# Four buckets per decade from 1e-3 to 1e3 so histogram_quantile resolves p50/p99 near the clip
# threshold; the threshold itself is added as a bucket bound so "fraction clipped" is exact.
GRAD_NORM_BUCKETS = tuple(float(f"{10.0 ** (k / 4):.3g}") for k in range(-12, 13))
# Normalized-units MSE: 1e-4 .. 1e2, two per decade.
LOSS_BUCKETS = tuple(float(f"{10.0 ** (k / 2):.3g}") for k in range(-8, 5))
SLOT_BUCKETS = tuple(float(2**k) for k in range(0, 15))  # 1 .. 16384 windows
STEP_BUCKETS = tuple(float(4**k) for k in range(0, 12))  # 1 .. ~4M (slot, step) pairs
UPDATE_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
CHECKPOINT_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Interval width in the sensor's persistence MAEs: 0.25 .. 32, two per octave.
INTERVAL_WIDTH_BUCKETS = tuple(float(f"{2.0 ** (k / 2):.3g}") for k in range(-4, 11))
# streamer_sensors_flagged counts sensors with a flagged reading in this many seconds.
FLAGGED_WINDOW_S = 300.0


def _with_bound(buckets: Iterable[float], bound: float) -> tuple[float, ...]:
    """``buckets`` plus ``bound`` (if finite and positive), sorted and de-duplicated."""
    bounds = set(buckets)
    if math.isfinite(bound) and bound > 0:
        bounds.add(float(bound))
    return tuple(sorted(bounds))


def horizon_metric_steps(horizon: int) -> list[int]:
    """The steps the per-step error metrics are labelled by: 1, 2, 4, 8, ... up to ``horizon``
    (a label set bounded by log2 of the largest horizon, 256)."""
    return [2**p for p in range(horizon.bit_length()) if 2**p <= horizon]


def observe_many(histogram: Histogram, amounts: np.ndarray) -> None:
    """``histogram.observe(a)`` for every ``a``, touching each bucket once instead of per value.

    prometheus_client has no bulk observe, and one call per forecast was ~4 % of the worker
    thread. This adds to the same bucket counters and sum that ``observe`` does (a value goes
    to the first bucket whose bound is >= it), so the exposition is the same; a client
    version without those internals gets the plain loop.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for amount in amounts.tolist():
            histogram.observe(amount)
        return
    if amounts.size == 0:
        return
    counts = np.bincount(np.searchsorted(bounds, amounts, side="left"), minlength=len(bounds))
    for bucket, count in zip(buckets, counts.tolist()):
        if count:
            bucket.inc(count)
    total.inc(float(amounts.sum()))


def _device_kind(device: str) -> str:
    """``cuda`` for ``cuda:1``, ``cpu`` for ``cpu``: the part before any index."""
    return device.split(":", 1)[0]


class Metrics:
    """The worker's metrics; pass a fresh ``CollectorRegistry`` per test."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_grad_norm: float,
        device: str,
        coverage_target: float,
        horizon: int = 1,
        max_sensors: int = LearnerConfig.max_sensors,
    ) -> None:
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm!r}")
        if not 0 < coverage_target < 1:
            raise ValueError(f"coverage_target must be in (0, 1), got {coverage_target!r}")
        if max_sensors < 1:
            raise ValueError(f"max_sensors must be >= 1, got {max_sensors!r}")
        if not device:
            raise ValueError("device must be a non-empty string such as 'cpu' or 'cuda:0'")
        self.registry = registry
        r = registry

        # Throughput and latency.
        self.readings_consumed = Counter(
            "streamer_readings_consumed", "Readings polled from the input topic, counted once "
            "the outputs of their micro-batch are acknowledged.", registry=r
        )
        self.forecasts_produced = Counter(
            "streamer_forecasts_produced", "Forecasts emitted for accepted readings.", registry=r
        )
        self.dlq_records = Counter(
            "streamer_dlq_records", "Readings sent to the dead-letter topic.", ["reason"],
            registry=r,
        )
        for reason in REJECTION_REASONS:  # so rate() exists at 0 before the first rejection
            self.dlq_records.labels(reason=reason.label)
        self.batch_size = Histogram(
            "streamer_batch_size_readings", "Readings per polled micro-batch.",
            buckets=BATCH_SIZE_BUCKETS, registry=r,
        )
        self.latency = Histogram(
            "streamer_reading_to_forecast_latency_seconds",
            "Time from a reading's timestamp to its forecast being produced.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.consumer_lag = Gauge(
            "streamer_consumer_lag_records", "Records behind the log end, per assigned partition.",
            ["topic", "partition"], registry=r,
        )
        self._lag_keys: set[tuple[str, str]] = set()
        self.broker_errors = Counter(
            "streamer_broker_errors", "Kafka client errors (poll, produce, commit).", registry=r
        )
        self.undecodable_batches = Counter(
            "streamer_undecodable_batches",
            "Fetched record batches that could not be decoded (codec, corruption, CRC).",
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "streamer_assigned_partitions",
            "Input partitions assigned to this worker (0: idle in its group, e.g. more workers "
            "than the topic has partitions).",
            registry=r,
        )
        self.stalled_partitions = Gauge(
            "streamer_stalled_partitions",
            "Assigned partitions held at a batch that could not be decoded.", registry=r,
        )
        self.input_topic_missing = Gauge(
            "streamer_input_topic_missing",
            "1 while the input topic does not exist (or these credentials may not describe "
            "it): the worker waits for it and forecasts nothing.", registry=r,
        )

        # Training.
        self.updates = Counter(
            "streamer_updates", "Truncated-BPTT updates attempted, skipped ones included.",
            registry=r,
        )
        self.updates_skipped = Counter(
            "streamer_updates_skipped",
            "Updates skipped because the loss or gradient norm was non-finite, or every window "
            "held a non-finite number.", registry=r,
        )
        self.update_windows_left_out = Counter(
            "streamer_update_windows_left_out",
            "TBPTT windows left out of an update because they held a non-finite number.",
            registry=r,
        )
        self.clip_events = Counter(
            "streamer_clip_events", "Updates whose gradient norm exceeded the clip threshold.",
            registry=r,
        )
        self.update_loss = Histogram(
            "streamer_update_loss", "Masked MSE of each applied update (normalized units).",
            buckets=LOSS_BUCKETS, registry=r,
        )
        self.grad_norm = Histogram(
            "streamer_grad_norm", "Global gradient norm before clipping, per applied update.",
            buckets=_with_bound(GRAD_NORM_BUCKETS, max_grad_norm), registry=r,
        )
        self.update_loss_last = Gauge(
            "streamer_update_loss_last", "Loss of the most recent applied update.", registry=r
        )
        self.grad_norm_last = Gauge(
            "streamer_grad_norm_last", "Pre-clip gradient norm of the most recent applied update.",
            registry=r,
        )
        self.grad_norm_clip_threshold = Gauge(
            "streamer_grad_norm_clip_threshold", "Configured max_grad_norm.", registry=r
        )
        self.grad_norm_clip_threshold.set(max_grad_norm)
        self.update_slots = Histogram(
            "streamer_update_slots", "Sensor windows trained per update.",
            buckets=SLOT_BUCKETS, registry=r,
        )
        self.update_steps = Histogram(
            "streamer_update_steps", "(slot, step) pairs contributing to each update's loss.",
            buckets=STEP_BUCKETS, registry=r,
        )
        self.update_duration = Histogram(
            "streamer_update_duration_seconds", "Wall time of one update.",
            buckets=UPDATE_DURATION_BUCKETS, registry=r,
        )

        # Forecast quality: sums, so skill over any window is 1 - rate(model) / rate(persistence).
        self.model_abs_error = Counter(
            "streamer_model_abs_error", "Sum of the model's absolute forecast errors "
            "(normalized units) over scored readings.", registry=r,
        )
        self.persistence_abs_error = Counter(
            "streamer_persistence_abs_error", "Sum of the persistence baseline's absolute errors "
            "(normalized units) over the same scored readings.", registry=r,
        )
        self.scored_readings = Counter(
            "streamer_scored_readings", "Readings with both a model and a persistence error.",
            registry=r,
        )
        # With a horizon: the mean error k readings ahead over any window is
        # rate(abs_error{step=k}) / rate(scored{step=k}); steps 1, 2, 4, 8, ... up to it.
        self.horizon_abs_error = Counter(
            "streamer_horizon_abs_error", "Sum of the absolute errors (normalized units) of "
            "forecasts made `step` readings before the reading they were for.",
            ["step"], registry=r,
        )
        self.horizon_scored = Counter(
            "streamer_horizon_scored", "Forecasts scored `step` readings after they were made.",
            ["step"], registry=r,
        )
        for k in horizon_metric_steps(horizon):  # every step's series exists from the start
            self.horizon_abs_error.labels(step=str(k))
            self.horizon_scored.labels(step=str(k))

        # Intervals and anomalies: coverage over any window is inside / (inside + outside).
        self.interval_readings = Counter(
            "streamer_interval_readings",
            "Scored values (one per feature of a reading) inside or outside the interval of the "
            "forecast made before them.",
            ["position"], registry=r,
        )
        self._inside = self.interval_readings.labels(position="inside")
        self._outside = self.interval_readings.labels(position="outside")
        self.interval_width = Histogram(
            "streamer_interval_width",
            "Mean width of the interval around the forecast made at each scored reading, in "
            "units of the sensor's running persistence MAE (the typical error of 'no change').",
            buckets=INTERVAL_WIDTH_BUCKETS, registry=r,
        )
        self.interval_coverage_target = Gauge(
            "streamer_interval_coverage_target",
            "Configured share of next readings each forecast's interval is meant to hold.",
            registry=r,
        )
        self.interval_coverage_target.set(coverage_target)
        self.anomalies = Counter(
            "streamer_anomalies", "Readings flagged as anomalies.", registry=r
        )
        self.sensors_flagged = Gauge(
            "streamer_sensors_flagged",
            f"Distinct sensors with a reading flagged in the last {FLAGGED_WINDOW_S:g} seconds.",
            registry=r,
        )
        # Sensor id -> wall time it was last flagged, oldest first; a count, never a label.
        self._flagged_at: OrderedDict[str, float] = OrderedDict()

        # Capacity.
        self.sensors_active = Gauge(
            "streamer_sensors_active", "Sensors holding a slot.", registry=r
        )
        self.sensor_slots_capacity = Gauge(
            "streamer_sensor_slots_capacity", "Slots in the sensor table.", registry=r
        )
        self.sensors_limit = Gauge(
            "streamer_sensors_limit",
            "Most sensors held at once (sensors.max_sensors); readings of further new sensors "
            "are dead-lettered as table_full.", registry=r,
        )
        self.sensors_limit.set(max_sensors)
        self.sensor_evictions = Counter(
            "streamer_sensor_evictions", "Sensors evicted from the slot table.", registry=r
        )
        self.sensor_restarts = Counter(
            "streamer_sensor_restarts",
            "Sensors whose state was restarted because their clock came back from more than a "
            "day ahead of the fleet and of now (a glitched timestamp, a clock set days ahead).",
            registry=r,
        )
        self.new_sensors = Counter(
            "streamer_new_sensors", "Sensors given a slot for the first time.", registry=r
        )

        # Checkpoints.
        self.checkpoint_last_success = Gauge(
            "streamer_checkpoint_last_success_timestamp_seconds",
            "Unix time of the last successful checkpoint.", registry=r,
        )
        self.checkpoint_interval = Gauge(
            "streamer_checkpoint_interval_seconds",
            "checkpoint.interval_seconds: how often a checkpoint is taken while readings come "
            "(0: by readings alone, checkpoint.interval_readings).", registry=r,
        )
        self.checkpoint_duration = Histogram(
            "streamer_checkpoint_duration_seconds", "Wall time to write a checkpoint.",
            buckets=CHECKPOINT_DURATION_BUCKETS, registry=r,
        )
        self.checkpoint_copy = Histogram(
            "streamer_checkpoint_copy_seconds",
            "Serving-thread time per checkpoint: copying the learner (the write runs in the "
            "background).", buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.checkpoint_size = Gauge(
            "streamer_checkpoint_size_bytes", "Size of the last checkpoint written.", registry=r
        )
        self.checkpoint_failures = Counter(
            "streamer_checkpoint_failures", "Checkpoint writes that failed.", registry=r
        )

        # Weights shared by the consumer group (serving/sharing.py).
        self.model_peers = Gauge(
            "streamer_model_peers",
            "Workers of the group whose fresh, compatible weights this worker averages with.",
            registry=r,
        )
        self.model_sync_interval = Gauge(
            "streamer_model_sync_interval_seconds",
            "sharing.interval_seconds: how often weights are published and averaged (0: off).",
            registry=r,
        )
        self.model_last_published = Gauge(
            "streamer_model_last_publish_timestamp_seconds",
            "Unix time this worker last published its durable weights.", registry=r,
        )
        self.model_last_averaged = Gauge(
            "streamer_model_last_average_timestamp_seconds",
            "Unix time this worker last averaged its weights with its peers'.", registry=r,
        )
        self.model_distance = Gauge(
            "streamer_model_distance_to_average",
            "L2 distance of this worker's weights to the group's average, before the last "
            "averaging step.", registry=r,
        )
        self.model_sync_failures = Counter(
            "streamer_model_sync_failures",
            "Errors reading or publishing the model topic (each followed by a reconnect).",
            registry=r,
        )
        self.model_ignored = Counter(
            "streamer_model_records_ignored",
            "Model-topic records not averaged in, by reason (incompatible, garbage, "
            "other_group).", ["reason"], registry=r,
        )
        for reason in ("incompatible", "garbage", "other_group"):
            self.model_ignored.labels(reason=reason)

        # Process, device, build.
        self.ready = Gauge("streamer_ready", "1 when the worker is ready to serve.", registry=r)
        kind = _device_kind(device)
        self.device_info = Info("streamer_device", "Device the model runs on.", registry=r)
        self.device_info.info({"device": device, "kind": kind})
        self.device_memory_allocated = Gauge(
            "streamer_device_memory_allocated_bytes",
            "Accelerator memory held by tensors (0 on CPU).", registry=r,
        )
        if kind == "cuda":
            self.device_memory_allocated.set_function(_cuda_memory_reader(device))
        self.build_info = Info("streamer_build", "Versions this worker runs.", registry=r)
        self.build_info.info(
            {"version": __version__, "python": platform.python_version(), "torch": _torch_version()}
        )
        ProcessCollector(registry=r)

    # -- the core's results ---------------------------------------------------------------

    def observe_step(self, result: StepResult) -> None:
        """Count one ``Learner.step``: forecasts, rejections, quality sums, interval coverage
        and width, anomalies, sensors, updates.

        Rejections in ``result.status`` are counted here; use ``observe_dlq`` only for readings
        rejected before the learner (by the codec), or they would be counted twice. Updates in
        ``result.updates`` are observed here too; the sensors of flagged readings are not (the
        result has no sensor ids): pass them to ``observe_flagged``.
        """
        status = np.asarray(result.status)
        self.forecasts_produced.inc(int(np.count_nonzero(status == Reason.ACCEPTED)))
        codes, counts = np.unique(status[status != Reason.ACCEPTED], return_counts=True)
        for code, count in zip(codes.tolist(), counts.tolist(), strict=True):
            self.observe_dlq(Reason(code), count)

        model = np.asarray(result.model_error, dtype=np.float64)
        persistence = np.asarray(result.persistence_error, dtype=np.float64)
        scored = np.isfinite(model) & np.isfinite(persistence)
        n_scored = int(np.count_nonzero(scored))
        if n_scored:
            self.model_abs_error.inc(float(np.nansum(np.abs(model[scored]))))
            self.persistence_abs_error.inc(float(np.nansum(np.abs(persistence[scored]))))
            self.scored_readings.inc(n_scored)

        self._observe_horizon(result.horizon, model)

        inside = np.asarray(result.inside)  # features inside, per reading; -1 unscored
        tested = inside >= 0
        n_inside = int(inside[tested].sum())
        n_outside = int(tested.sum()) * result.forecasts.shape[1] - n_inside
        if n_inside:
            self._inside.inc(n_inside)
        if n_outside:
            self._outside.inc(n_outside)
        width = np.asarray(result.interval_width, dtype=np.float64)[tested]
        observe_many(self.interval_width, width[np.isfinite(width)])
        n_anomalies = int(np.count_nonzero(result.anomaly))
        if n_anomalies:
            self.anomalies.inc(n_anomalies)

        if result.new_sensors:
            self.new_sensors.inc(result.new_sensors)
        if result.evicted_sensors:
            self.sensor_evictions.inc(result.evicted_sensors)
        if result.restarted_sensors:
            self.sensor_restarts.inc(result.restarted_sensors)
        for stats in result.updates:
            self.observe_update(stats)

    def _observe_horizon(self, horizon: HorizonResult | None, step_one: np.ndarray) -> None:
        """Per-step error sums; step 1 is the forecast's own error (with no horizon, the only
        step)."""
        columns = [(1, step_one)]
        if horizon is not None:
            labelled = set(horizon_metric_steps(horizon.forecast.shape[1]))
            columns += [(int(k), horizon.step_error[:, p])
                        for p, k in enumerate(horizon.steps.tolist()) if k in labelled]
        for k, errors in columns:
            errors = errors[np.isfinite(errors)]
            if len(errors):
                self.horizon_abs_error.labels(step=str(k)).inc(float(errors.sum()))
                self.horizon_scored.labels(step=str(k)).inc(len(errors))

    def observe_flagged(self, sensor_ids: Sequence[str], now: float) -> None:
        """Record the sensors of this batch's flagged readings at wall time ``now`` and publish
        how many distinct sensors were flagged in the last ``FLAGGED_WINDOW_S`` seconds.

        Call it every batch, with an empty list too, so sensors age out of the gauge.
        """
        flagged_at = self._flagged_at
        for sensor_id in sensor_ids:
            flagged_at.pop(sensor_id, None)  # re-inserted last: the dict stays oldest first
            flagged_at[sensor_id] = now
        cutoff = now - FLAGGED_WINDOW_S
        while flagged_at and next(iter(flagged_at.values())) <= cutoff:
            flagged_at.popitem(last=False)
        self.sensors_flagged.set(len(flagged_at))

    def observe_update(self, stats: UpdateStats) -> None:
        """Record one update; a skipped (non-finite) one only counts, never poisons histograms."""
        self.updates.inc()
        self.update_duration.observe(stats.duration_seconds)
        if stats.windows_left_out:
            self.update_windows_left_out.inc(stats.windows_left_out)
        finite = math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)
        if stats.skipped and finite and stats.steps == 0 \
                and stats.windows_left_out < stats.slots:
            return  # every target masked (warm-up windows): neither a failure nor a loss
        if stats.skipped or not finite:
            self.updates_skipped.inc()
            return
        if stats.clipped:
            self.clip_events.inc()
        self.update_loss.observe(stats.loss)
        self.grad_norm.observe(stats.grad_norm)
        self.update_loss_last.set(stats.loss)
        self.grad_norm_last.set(stats.grad_norm)
        self.update_slots.observe(stats.slots)
        self.update_steps.observe(stats.steps)

    def observe_dlq(self, reason: Reason, n: int = 1) -> None:
        """Count ``n`` readings sent to the dead-letter topic for ``reason``."""
        if reason is Reason.ACCEPTED:
            raise ValueError("Reason.ACCEPTED is not a rejection reason")
        self.dlq_records.labels(reason=Reason(reason).label).inc(n)

    # -- the worker loop ------------------------------------------------------------------

    def observe_batch(self, size: int, latencies_seconds: np.ndarray) -> None:
        """Count a micro-batch of ``size`` readings whose outputs were acknowledged, and each
        forecast's latency."""
        self.readings_consumed.inc(size)
        self.batch_size.observe(size)
        latencies = np.asarray(latencies_seconds, dtype=np.float64).ravel()
        observe_many(self.latency, latencies[np.isfinite(latencies)])

    def set_sensors(self, active: int, capacity: int) -> None:
        """Publish the slot table's occupancy."""
        self.sensors_active.set(active)
        self.sensor_slots_capacity.set(capacity)

    def set_lag(self, lag: Mapping[PartitionId, int]) -> None:
        """Replace the lag series with ``{(topic, partition): records behind}``.

        Partitions no longer assigned disappear, so a rebalance leaves no stale series behind.
        """
        keys = {(topic, str(partition)): value for (topic, partition), value in lag.items()}
        for topic, partition in self._lag_keys - keys.keys():
            self.consumer_lag.remove(topic, partition)
        for (topic, partition), value in keys.items():
            self.consumer_lag.labels(topic=topic, partition=partition).set(value)
        self._lag_keys = set(keys)

    def forget_lag(self, partitions: Iterable[PartitionId]) -> None:
        """Drop the lag series of ``partitions`` (revoked): their new owner reports them now."""
        for topic, partition in partitions:
            key = (topic, str(partition))
            if key in self._lag_keys:
                self.consumer_lag.remove(*key)
                self._lag_keys.discard(key)

    def observe_checkpoint(self, duration_s: float, size_bytes: int, timestamp: float) -> None:
        """Record a successful checkpoint written at unix time ``timestamp``."""
        self.checkpoint_duration.observe(duration_s)
        self.checkpoint_size.set(size_bytes)
        self.checkpoint_last_success.set(timestamp)

    def observe_checkpoint_copy(self, seconds: float) -> None:
        """Record the serving thread's stall for one checkpoint (the learner's copy)."""
        self.checkpoint_copy.observe(seconds)

    def set_checkpoint_interval(self, seconds: float | None) -> None:
        self.checkpoint_interval.set(seconds or 0.0)

    def set_model_sync_interval(self, seconds: float) -> None:
        self.model_sync_interval.set(seconds)

    def set_model_peers(self, peers: int) -> None:
        self.model_peers.set(peers)

    def observe_model_published(self, timestamp: float) -> None:
        self.model_last_published.set(timestamp)

    def observe_model_averaged(self, distance: float, timestamp: float) -> None:
        self.model_distance.set(distance)
        self.model_last_averaged.set(timestamp)

    def observe_model_sync_failures(self, count: int) -> None:
        self.model_sync_failures.inc(count)

    def observe_model_ignored(self, reason: str) -> None:
        self.model_ignored.labels(reason=reason).inc()

    def observe_checkpoint_failure(self) -> None:
        """Count a checkpoint write that failed."""
        self.checkpoint_failures.inc()

    def observe_undecodable_batch(self) -> None:
        """Count a fetched batch that could not be decoded."""
        self.undecodable_batches.inc()

    def set_assigned_partitions(self, n: int) -> None:
        """Publish how many input partitions this worker holds."""
        self.assigned_partitions.set(n)

    def set_stalled_partitions(self, n: int) -> None:
        """Publish how many assigned partitions are held at an undecodable batch."""
        self.stalled_partitions.set(n)

    def set_input_topic_missing(self, missing: bool) -> None:
        """Publish whether the input topic was missing at the latest look."""
        self.input_topic_missing.set(1.0 if missing else 0.0)

    def observe_broker_error(self) -> None:
        """Count a Kafka client error."""
        self.broker_errors.inc()

    def set_ready(self, ready: bool) -> None:
        """Publish readiness as 0/1."""
        self.ready.set(1 if ready else 0)


def _torch_version() -> str:
    """The installed torch version, or ``none`` where torch is absent."""
    try:
        import torch
    except ImportError:
        return "none"
    return str(torch.__version__)


def _cuda_memory_reader(device: str) -> Callable[[], float]:
    """A callable reading ``torch.cuda.memory_allocated`` at scrape time (no device sync)."""
    import torch

    def read() -> float:
        return float(torch.cuda.memory_allocated(device))

    return read
