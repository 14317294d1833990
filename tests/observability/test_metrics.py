"""Metrics: exact values after each observe_*, bounded labels, valid exposition."""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from streamer.core.batch import HorizonResult, StepResult, UpdateStats
from streamer.core.rejections import REJECTION_REASONS, Reason
from streamer.observability.metrics import FLAGGED_WINDOW_S, LATENCY_BUCKETS, Metrics, observe_many

NAN = math.nan


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry, max_grad_norm=1.0, device="cpu", coverage_target=0.9)


def stats(**overrides: object) -> UpdateStats:
    """An applied, unclipped update with overridable fields."""
    fields: dict[str, object] = dict(
        update_index=1, loss=0.25, grad_norm=0.5, clipped=False, skipped=False,
        slots=8, steps=96, duration_seconds=0.02,
    )
    fields.update(overrides)
    return UpdateStats(**fields)  # type: ignore[arg-type]


def step_result(
    status: list[int],
    model_error: list[float],
    persistence_error: list[float],
    **overrides: object,
) -> StepResult:
    """One feature; fields not given are as ``StepResult.empty`` leaves them (unscored)."""
    n = len(status)
    return dataclasses.replace(
        StepResult.empty(n, 1),
        status=np.array(status, dtype=np.int8),
        forecasts=np.zeros((n, 1)),
        model_error=np.array(model_error, dtype=np.float64),
        persistence_error=np.array(persistence_error, dtype=np.float64),
        **overrides,  # type: ignore[arg-type]
    )


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_every_dlq_reason_exists_at_zero_before_any_rejection(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    for reason in REJECTION_REASONS:
        assert value(registry, "streamer_dlq_records_total", reason=reason.label) == 0.0
    assert value(registry, "streamer_dlq_records_total", reason="accepted") is None


def test_observe_step_counts_forecasts_rejections_and_sensors(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    result = step_result(
        status=[0, 0, Reason.NON_FINITE, Reason.TABLE_FULL, Reason.NON_FINITE, 0],
        model_error=[NAN] * 6,
        persistence_error=[NAN] * 6,
        new_sensors=3,
        evicted_sensors=2,
    )
    metrics.observe_step(result)
    assert value(registry, "streamer_forecasts_produced_total") == 3.0
    assert value(registry, "streamer_dlq_records_total", reason="non_finite") == 2.0
    assert value(registry, "streamer_dlq_records_total", reason="table_full") == 1.0
    assert value(registry, "streamer_dlq_records_total", reason="not_json") == 0.0
    assert value(registry, "streamer_new_sensors_total") == 3.0
    assert value(registry, "streamer_sensor_evictions_total") == 2.0
    assert value(registry, "streamer_scored_readings_total") == 0.0


def test_quality_sums_only_readings_where_both_errors_are_finite(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    result = step_result(
        status=[0, 0, 0, 0, 0],
        model_error=[0.5, 0.25, NAN, 1.0, 2.0],
        persistence_error=[1.0, 0.75, 3.0, NAN, 2.0],
    )
    metrics.observe_step(result)
    metrics.observe_step(result)
    # Scored: readings 0, 1, 4; twice.
    assert value(registry, "streamer_scored_readings_total") == 6.0
    assert value(registry, "streamer_model_abs_error_total") == 2 * (0.5 + 0.25 + 2.0)
    assert value(registry, "streamer_persistence_abs_error_total") == 2 * (1.0 + 0.75 + 2.0)


def test_horizon_errors_are_summed_per_power_of_two_step_only(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    horizon = HorizonResult.empty(3, 1, 12, np.array([2, 4, 8, 12]))
    horizon.step_error[:] = [[0.5, NAN, 2.0, 7.0], [1.5, 1.0, NAN, 9.0], [NAN, NAN, NAN, NAN]]
    result = step_result(status=[0, 0, 0], model_error=[0.25, NAN, 0.5],
                         persistence_error=[1.0, NAN, 1.0], horizon=horizon)
    metrics.observe_step(result)
    error, scored = "streamer_horizon_abs_error_total", "streamer_horizon_scored_total"
    assert value(registry, error, step="1") == 0.75 and value(registry, scored, step="1") == 2
    assert value(registry, error, step="2") == 2.0 and value(registry, scored, step="2") == 2
    assert value(registry, error, step="4") == 1.0 and value(registry, scored, step="4") == 1
    assert value(registry, error, step="8") == 2.0 and value(registry, scored, step="8") == 1
    assert value(registry, scored, step="12") is None  # not a power of two: no label


def test_without_a_horizon_step_one_is_the_only_horizon_series(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.observe_step(step_result(status=[0, 0], model_error=[0.5, 1.0],
                                     persistence_error=[1.0, 1.0]))
    error, scored = "streamer_horizon_abs_error_total", "streamer_horizon_scored_total"
    assert value(registry, error, step="1") == 1.5 and value(registry, scored, step="1") == 2
    assert value(registry, scored, step="2") is None


def test_interval_readings_count_inside_and_outside_but_not_unscored(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    assert value(registry, "streamer_interval_readings_total", position="inside") == 0.0
    assert value(registry, "streamer_interval_readings_total", position="outside") == 0.0
    result = step_result(
        status=[0, 0, 0, 0, Reason.NON_FINITE, 0],
        model_error=[0.1, 0.2, 3.0, NAN, NAN, 0.3],
        persistence_error=[0.2, 0.2, 1.0, NAN, NAN, 0.3],
        inside=np.array([1, 1, 0, -1, -1, 1], dtype=np.int8),
        interval_width=np.array([0.3, 1.0, 5.0, 40.0, NAN, 1.5]),
    )
    metrics.observe_step(result)
    metrics.observe_step(result)
    assert value(registry, "streamer_interval_readings_total", position="inside") == 6.0
    assert value(registry, "streamer_interval_readings_total", position="outside") == 2.0
    assert value(registry, "streamer_interval_readings_total", position="unscored") is None


def test_interval_width_is_observed_per_scored_reading(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    # The warming-up sensor's 40-change interval (inside = -1) is left out.
    metrics.observe_step(step_result(
        status=[0, 0, 0, 0], model_error=[NAN] * 4, persistence_error=[NAN] * 4,
        inside=np.array([1, 0, 1, -1], dtype=np.int8),
        interval_width=np.array([0.3, 5.0, 1.0, 40.0]),
    ))
    width = "streamer_interval_width"
    assert value(registry, f"{width}_count") == 3.0
    assert value(registry, f"{width}_sum") == pytest.approx(6.3)
    assert value(registry, f"{width}_bucket", le="0.25") == 0.0
    assert value(registry, f"{width}_bucket", le="0.354") == 1.0
    assert value(registry, f"{width}_bucket", le="1.0") == 2.0
    assert value(registry, f"{width}_bucket", le="4.0") == 2.0
    assert value(registry, f"{width}_bucket", le="5.66") == 3.0
    assert value(registry, f"{width}_bucket", le="+Inf") == 3.0


def test_anomalies_count_flagged_readings(registry: CollectorRegistry, metrics: Metrics) -> None:
    assert value(registry, "streamer_anomalies_total") == 0.0
    metrics.observe_step(step_result(
        status=[0, 0, 0], model_error=[NAN] * 3, persistence_error=[NAN] * 3,
        anomaly_score=np.array([0.999, 0.2, 0.9995]),
        anomaly=np.array([True, False, True]),
    ))
    assert value(registry, "streamer_anomalies_total") == 2.0


def test_coverage_target_is_published(registry: CollectorRegistry) -> None:
    Metrics(registry, max_grad_norm=1.0, device="cpu", coverage_target=0.8)
    assert value(registry, "streamer_interval_coverage_target") == 0.8


def test_coverage_target_defaults_to_the_learner_default(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    from streamer.core.config import LearnerConfig

    assert value(registry, "streamer_interval_coverage_target") == LearnerConfig().coverage


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.1, NAN])
def test_coverage_target_outside_zero_one_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="coverage_target"):
        Metrics(CollectorRegistry(), max_grad_norm=1.0, device="cpu", coverage_target=bad)


def test_flagged_sensors_are_counted_once_and_age_out_after_the_window(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    flagged = "streamer_sensors_flagged"
    t0 = 1_700_000_000.0
    metrics.observe_flagged(["a", "b", "a"], now=t0)
    assert value(registry, flagged) == 2.0
    metrics.observe_flagged(["c"], now=t0 + 100)
    assert value(registry, flagged) == 3.0
    # Flagged again at +200: "a" stays for a full window from then.
    metrics.observe_flagged(["a"], now=t0 + 200)
    metrics.observe_flagged([], now=t0 + FLAGGED_WINDOW_S - 1)
    assert value(registry, flagged) == 3.0
    metrics.observe_flagged([], now=t0 + FLAGGED_WINDOW_S)
    assert value(registry, flagged) == 2.0  # "b" aged out
    metrics.observe_flagged([], now=t0 + 100 + FLAGGED_WINDOW_S)
    assert value(registry, flagged) == 1.0  # "c" aged out
    metrics.observe_flagged([], now=t0 + 200 + FLAGGED_WINDOW_S)
    assert value(registry, flagged) == 0.0


def test_observe_step_observes_the_updates_it_carries(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    result = step_result([0], [NAN], [NAN], updates=[stats(), stats(update_index=2, loss=0.5)])
    metrics.observe_step(result)
    assert value(registry, "streamer_updates_total") == 2.0
    assert value(registry, "streamer_update_loss_count") == 2.0
    assert value(registry, "streamer_update_loss_sum") == 0.75
    assert value(registry, "streamer_update_loss_last") == 0.5


def test_applied_update_fills_training_metrics(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.observe_update(stats(loss=0.25, grad_norm=3.0, clipped=True, slots=8, steps=96))
    assert value(registry, "streamer_updates_total") == 1.0
    assert value(registry, "streamer_updates_skipped_total") == 0.0
    assert value(registry, "streamer_clip_events_total") == 1.0
    assert value(registry, "streamer_update_loss_last") == 0.25
    assert value(registry, "streamer_grad_norm_last") == 3.0
    assert value(registry, "streamer_grad_norm_sum") == 3.0
    assert value(registry, "streamer_grad_norm_bucket", le="1.0") == 0.0
    assert value(registry, "streamer_grad_norm_bucket", le="3.16") == 1.0
    assert value(registry, "streamer_update_slots_sum") == 8.0
    assert value(registry, "streamer_update_steps_sum") == 96.0
    assert value(registry, "streamer_update_duration_seconds_sum") == 0.02


def test_windows_left_out_of_an_applied_update_are_counted(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.observe_update(stats(windows_left_out=3))
    metrics.observe_update(stats())
    assert value(registry, "streamer_update_windows_left_out_total") == 3.0
    assert value(registry, "streamer_updates_skipped_total") == 0.0


def test_undecodable_batches_and_stalled_partitions(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    assert value(registry, "streamer_undecodable_batches_total") == 0.0
    metrics.observe_undecodable_batch()
    metrics.set_stalled_partitions(2)
    assert value(registry, "streamer_undecodable_batches_total") == 1.0
    assert value(registry, "streamer_stalled_partitions") == 2.0


def test_a_missing_input_topic_is_one_and_zero_once_it_exists(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    assert value(registry, "streamer_input_topic_missing") == 0.0
    metrics.set_input_topic_missing(True)
    assert value(registry, "streamer_input_topic_missing") == 1.0
    metrics.set_input_topic_missing(False)
    assert value(registry, "streamer_input_topic_missing") == 0.0


def test_skipped_update_counts_without_poisoning_histograms(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.observe_update(stats(loss=0.25, grad_norm=0.5))
    metrics.observe_update(stats(loss=NAN, grad_norm=math.inf, skipped=True, clipped=True))
    assert value(registry, "streamer_updates_total") == 2.0
    assert value(registry, "streamer_updates_skipped_total") == 1.0
    assert value(registry, "streamer_clip_events_total") == 0.0
    assert value(registry, "streamer_update_loss_sum") == 0.25
    assert value(registry, "streamer_grad_norm_sum") == 0.5
    assert value(registry, "streamer_grad_norm_last") == 0.5
    assert value(registry, "streamer_update_duration_seconds_count") == 2.0


def test_an_update_with_no_target_to_learn_from_is_neither_a_failure_nor_a_loss(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.observe_update(stats(loss=0.0, grad_norm=0.0, skipped=True, slots=4, steps=0))
    assert value(registry, "streamer_updates_total") == 1.0
    assert value(registry, "streamer_updates_skipped_total") == 0.0  # (pages as non-finite)
    assert value(registry, "streamer_update_loss_count") == 0.0
    metrics.observe_update(stats(loss=NAN, grad_norm=0.0, skipped=True, slots=4, steps=0))
    assert value(registry, "streamer_updates_skipped_total") == 1.0


def test_clip_threshold_is_published_and_is_a_bucket_bound(registry: CollectorRegistry) -> None:
    Metrics(registry, max_grad_norm=0.7, device="cpu", coverage_target=0.9)
    assert value(registry, "streamer_grad_norm_clip_threshold") == 0.7
    assert value(registry, "streamer_grad_norm_bucket", le="0.7") == 0.0


@pytest.mark.parametrize("bad", [0.0, -1.0, NAN])
def test_non_positive_clip_threshold_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="max_grad_norm"):
        Metrics(CollectorRegistry(), max_grad_norm=bad, device="cpu", coverage_target=0.9)


def test_observe_dlq_counts_by_reason_and_refuses_accepted(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.observe_dlq(Reason.NOT_JSON)
    metrics.observe_dlq(Reason.NOT_JSON, 4)
    assert value(registry, "streamer_dlq_records_total", reason="not_json") == 5.0
    with pytest.raises(ValueError, match="ACCEPTED"):
        metrics.observe_dlq(Reason.ACCEPTED)


def test_observe_batch_counts_readings_and_latencies(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.observe_batch(4, np.array([0.004, 0.02, 0.3, NAN]))
    assert value(registry, "streamer_readings_consumed_total") == 4.0
    assert value(registry, "streamer_batch_size_readings_sum") == 4.0
    assert value(registry, "streamer_batch_size_readings_count") == 1.0
    latency = "streamer_reading_to_forecast_latency_seconds"
    assert value(registry, f"{latency}_count") == 3.0
    assert value(registry, f"{latency}_bucket", le="0.005") == 1.0
    assert value(registry, f"{latency}_bucket", le="0.025") == 2.0
    assert value(registry, f"{latency}_bucket", le="0.5") == 3.0


def test_records_without_a_timestamp_add_no_latency(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    # kafka-python gives -1 and librdkafka 0 for a record with no timestamp: not 56 years.
    from streamer.serving.processor import latency_seconds

    now_ms = time.time() * 1000.0
    metrics.observe_batch(3, latency_seconds(np.array([-1.0, 0.0, now_ms - 50.0])))
    latency = "streamer_reading_to_forecast_latency_seconds"
    assert value(registry, f"{latency}_count") == 1.0
    assert value(registry, f"{latency}_sum") < 60.0


def test_observe_many_exposes_exactly_what_one_observe_per_value_does() -> None:
    rng = np.random.default_rng(0)
    # Values on and around every bound (a value equal to a bound belongs to that bucket),
    # beyond the last finite bound, zero and negative.
    bounds = np.array(LATENCY_BUCKETS)
    amounts = np.concatenate([bounds, np.nextafter(bounds, 0), np.nextafter(bounds, 1e9),
                              rng.exponential(0.3, 500), [0.0, -0.5, 120.0]])
    one_by_one, bulk = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=one_by_one)
    h2 = Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=bulk)
    for amount in amounts.tolist():
        h1.observe(amount)

    observe_many(h2, amounts)
    observe_many(h2, np.array([]))

    for le in [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]:
        assert value(bulk, "h_bucket", le=le) == value(one_by_one, "h_bucket", le=le), le
    assert value(bulk, "h_count") == value(one_by_one, "h_count") == len(amounts)
    assert value(bulk, "h_sum") == pytest.approx(value(one_by_one, "h_sum"), rel=1e-12)


def test_set_lag_replaces_the_partition_set_on_rebalance(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    lag = "streamer_consumer_lag_records"
    metrics.set_lag({("sensor-readings", 0): 10, ("sensor-readings", 1): 20})
    assert value(registry, lag, topic="sensor-readings", partition="1") == 20.0
    metrics.set_lag({("sensor-readings", 1): 5, ("sensor-readings", 2): 7})
    assert value(registry, lag, topic="sensor-readings", partition="0") is None
    assert value(registry, lag, topic="sensor-readings", partition="1") == 5.0
    assert value(registry, lag, topic="sensor-readings", partition="2") == 7.0
    metrics.set_lag({})
    assert value(registry, lag, topic="sensor-readings", partition="2") is None


def test_forget_lag_drops_the_series_of_revoked_partitions_only(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    lag = "streamer_consumer_lag_records"
    metrics.set_lag({("sensor-readings", 0): 10, ("sensor-readings", 1): 20})
    metrics.forget_lag([("sensor-readings", 1), ("sensor-readings", 5)])  # 5: never reported
    assert value(registry, lag, topic="sensor-readings", partition="0") == 10.0
    assert value(registry, lag, topic="sensor-readings", partition="1") is None
    metrics.set_lag({("sensor-readings", 0): 4})  # the next refresh keeps working
    assert value(registry, lag, topic="sensor-readings", partition="0") == 4.0


def test_sensors_checkpoint_ready_and_broker_errors(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.set_sensors(active=37, capacity=64)
    metrics.observe_checkpoint(duration_s=0.4, size_bytes=123_456, timestamp=1_700_000_000.0)
    metrics.observe_checkpoint_failure()
    metrics.observe_broker_error()
    metrics.set_ready(True)
    assert value(registry, "streamer_sensors_active") == 37.0
    assert value(registry, "streamer_sensor_slots_capacity") == 64.0
    assert value(registry, "streamer_checkpoint_last_success_timestamp_seconds") == 1.7e9
    assert value(registry, "streamer_checkpoint_size_bytes") == 123_456.0
    assert value(registry, "streamer_checkpoint_duration_seconds_sum") == 0.4
    assert value(registry, "streamer_checkpoint_failures_total") == 1.0
    assert value(registry, "streamer_broker_errors_total") == 1.0
    assert value(registry, "streamer_ready") == 1.0
    metrics.set_ready(False)
    assert value(registry, "streamer_ready") == 0.0
    metrics.set_checkpoint_interval(10.0)  # what the checkpoint alerts scale with
    assert value(registry, "streamer_checkpoint_interval_seconds") == 10.0
    metrics.set_checkpoint_interval(None)  # by readings alone
    assert value(registry, "streamer_checkpoint_interval_seconds") == 0.0


def test_the_sensor_limit_is_one_series_of_the_configured_max_sensors(
    registry: CollectorRegistry,
) -> None:
    Metrics(registry, max_grad_norm=1.0, device="cpu", coverage_target=0.9, max_sensors=5_000)
    (family,) = [f for f in registry.collect() if f.name == "streamer_sensors_limit"]
    assert [(s.labels, s.value) for s in family.samples] == [({}, 5_000.0)]
    with pytest.raises(ValueError, match="max_sensors must be >= 1, got 0"):
        Metrics(CollectorRegistry(), max_grad_norm=1.0, device="cpu", coverage_target=0.9,
                max_sensors=0)


def test_device_and_build_info(registry: CollectorRegistry) -> None:
    import torch

    Metrics(registry, max_grad_norm=1.0, device="cpu", coverage_target=0.9)
    assert value(registry, "streamer_device_info", device="cpu", kind="cpu") == 1.0
    assert value(registry, "streamer_device_memory_allocated_bytes") == 0.0
    build = [
        s for m in registry.collect() if m.name == "streamer_build" for s in m.samples
    ]
    assert len(build) == 1
    assert build[0].labels["torch"] == torch.__version__
    assert set(build[0].labels) == {"version", "python", "torch"}


def test_process_metrics_are_on_the_injected_registry(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    rss = value(registry, "process_resident_memory_bytes")
    if rss is None:
        pytest.skip("no /proc on this platform")
    assert rss > 0


def test_no_metric_is_labelled_by_sensor(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.set_lag({("sensor-readings", 0): 1})
    metrics.observe_step(step_result(
        status=[0, 0], model_error=[0.1, 9.0], persistence_error=[0.2, 1.0],
        inside=np.array([1, 0], dtype=np.int8), interval_width=np.array([1.0, 2.0]),
        anomaly=np.array([False, True]),
    ))
    metrics.observe_flagged(["sensor-7"], now=1_700_000_000.0)
    samples = [s for family in registry.collect() for s in family.samples]
    labels = {label for s in samples for label in s.labels}
    assert not {label for label in labels if "sensor" in label.lower()}
    assert labels <= {"reason", "topic", "partition", "device", "kind", "version", "python",
                      "torch", "le", "position", "step"}
    assert "sensor-7" not in {v for s in samples for v in s.labels.values()}
    # Steps ahead are a bounded set, even at the largest horizon: 1, 2, 4, ..., 256.
    widest = Metrics(CollectorRegistry(), max_grad_norm=1.0, device="cpu", coverage_target=0.9,
                     horizon=256)
    steps = {s.labels["step"] for family in widest.registry.collect() for s in family.samples
             if "step" in s.labels}
    assert steps == {str(2**p) for p in range(9)}


def test_every_streamer_metric_uses_prometheus_naming(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    for family in registry.collect():
        if family.name.startswith("process_"):
            continue
        assert family.name.startswith("streamer_"), family.name
        if family.type == "counter":
            assert {s.name for s in family.samples} <= {
                f"{family.name}_total", f"{family.name}_created"
            }


def test_exposition_passes_promtool_check_metrics(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    metrics.observe_step(step_result(
        [0, 1], [0.1, NAN], [0.2, NAN], updates=[stats()],
        inside=np.array([0, -1], dtype=np.int8), interval_width=np.array([1.2, NAN]),
        anomaly=np.array([True, False]),
    ))
    metrics.observe_flagged(["s"], now=1_700_000_000.0)
    metrics.observe_batch(2, np.array([0.01, 0.02]))
    metrics.set_lag({("sensor-readings", 3): 9})
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=generate_latest(registry),
        capture_output=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert proc.stdout.decode() + proc.stderr.decode() == ""


def test_device_memory_reads_cuda_allocations_at_scrape_time(registry: CollectorRegistry) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    Metrics(registry, max_grad_norm=1.0, device="cuda:0", coverage_target=0.9)
    assert value(registry, "streamer_device_info", device="cuda:0", kind="cuda") == 1.0
    before = value(registry, "streamer_device_memory_allocated_bytes")
    block = torch.empty(1 << 20, dtype=torch.float32, device="cuda:0")  # 4 MiB
    after = value(registry, "streamer_device_memory_allocated_bytes")
    assert after is not None and before is not None
    assert after - before >= block.numel() * 4
