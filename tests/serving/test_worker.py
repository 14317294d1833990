"""The worker against the real local broker: contract, DLQ, crashes, signals, broker loss."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import kafka.errors as kerr
import pytest
import torch
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from streamer.config import ConfigError, Settings, load_settings
from streamer.core import Learner, LearnerConfig
from streamer.kafka import ConsumerSettings, KafkaConnection, ProducerSettings, open_client
from streamer.kafka.admin import delete_topics, ensure_topics
from streamer.kafka.broker import LocalBroker, free_port
from streamer.kafka.errors import (
    BrokerUnavailable,
    KafkaClientError,
    TopicCreationRefused,
    TopicMissing,
    convert,
)
from streamer.observability.logs import KAFKA_LIBRARIES
from streamer.observability.metrics import Metrics
from streamer.serving import signals
from streamer.serving import worker as worker_module
from streamer.serving.checkpoint import CheckpointStore
from streamer.serving.codec import DLQ_REASON, DLQ_SOURCE_OFFSET, DLQ_SOURCE_PARTITION
from tests.conftest import TEST_CONSUMER_TIMEOUTS
from tests.kafka.test_admin import partition_counts
from tests.serving.conftest import (
    consume_from,
    forecasts_by_source,
    produce_to,
    reading,
    wait_for,
)


def _stream(n_sensors: int, n_steps: int, first_sensor: int = 0, t0: float = 1.7e9):
    return [reading(f"sensor-{s}", t0 + 60.0 * t, math.sin(t / 5 + s) * (s + 1))
            for t in range(n_steps) for s in range(first_sensor, first_sensor + n_sensors)]


def _topics(topic_factory, partitions: int = 3):
    return topic_factory(partitions), topic_factory(partitions), topic_factory(1)


def test_every_valid_reading_gets_exactly_one_forecast_with_its_source(
        topic_factory, group_id, worker_factory, produce_raw, consume_raw):
    inp, out, dlq = _topics(topic_factory)
    worker = worker_factory(inp, out, dlq, group_id, STREAMER_SENSORS__MAX_SENSORS="5000").start()
    worker.wait_ready()
    first = _stream(10, 20)
    placed = produce_raw(inp, first)
    later = _stream(5, 10, first_sensor=10, t0=1.7e9 + 3600)  # sensors appearing mid-stream
    placed += produce_raw(inp, later)
    sent = dict(zip(placed, first + later))
    got = forecasts_by_source(consume_raw(out, len(sent), timeout_s=30))
    assert set(got) == set(sent), worker.log()
    partitions = {p for p, _ in placed}
    assert len(partitions) == 3
    for source, (key, value) in sent.items():
        (forecast,) = got[source]
        body = __import__("json").loads(value)
        assert forecast["_key"] == key.decode() == forecast["sensor_id"]
        assert forecast["ts"] == body["ts"]
        assert math.isfinite(forecast["value"]) and forecast["model_updates"] >= 0
    assert consume_raw(dlq, 1, timeout_s=1) == []
    assert worker.metric("streamer_sensors_active") == 15
    assert worker.metric("streamer_sensors_limit") == 5000


def test_forecasts_are_written_by_an_idempotent_producer_with_either_client(
        topic_factory, group_id, worker_factory, produce_raw, consume_raw, monkeypatch):
    # An idempotent producer's retries can neither duplicate a forecast nor reorder a
    # sensor's; librdkafka's producer is not one unless asked (kafka-python's is by default).
    from kafka.record.default_records import DefaultRecordBatch

    producer_ids: list[int] = []
    batch_records = DefaultRecordBatch.__iter__

    def recording(batch):
        producer_ids.append(batch.producer_id)
        return batch_records(batch)

    monkeypatch.setattr(DefaultRecordBatch, "__iter__", recording)
    inp, out, dlq = _topics(topic_factory)
    worker = worker_factory(inp, out, dlq, group_id).start()
    worker.wait_ready()
    placed = produce_raw(inp, _stream(4, 5))
    assert len(consume_raw(out, len(placed), timeout_s=30)) == len(placed), worker.log()
    assert producer_ids and all(pid >= 0 for pid in producer_ids), producer_ids


def _lag_series(worker) -> dict[int, float]:
    """partition -> the worker's exported consumer lag."""
    _, text = worker.get("/metrics")
    found = {}
    for line in text.splitlines():
        if line.startswith("streamer_consumer_lag_records{"):
            partition = int(line.split('partition="', 1)[1].split('"', 1)[0])
            found[partition] = float(line.rsplit(" ", 1)[1])
    return found


def test_a_worker_stops_exporting_the_lag_of_a_partition_it_lost(
        topic_factory, group_id, worker_factory, produce_raw):
    inp, out, dlq = _topics(topic_factory, partitions=2)
    first = worker_factory(inp, out, dlq, group_id, name="w1").start()
    first.wait_ready()
    placed = produce_raw(inp, _stream(8, 3))
    assert {p for p, _ in placed} == {0, 1}
    wait_for(lambda: _lag_series(first) == {0: 0.0, 1: 0.0}, 30, "lag of both partitions",
             first.log)
    # A second worker takes one partition; no record comes after, so only the revocation and
    # the refresh on idle loop passes can change the first worker's series. (What the partition
    # it keeps shows until a record comes depends on the client: librdkafka knows no position
    # on a partition assigned anew before it consumed from it.)
    second = worker_factory(inp, out, dlq, group_id, name="w2").start()
    second.wait_ready()
    wait_for(lambda: len(_lag_series(first)) <= 1, 30, "the lost partition's series gone",
             lambda: f"{_lag_series(first)}\n{first.log()}")
    produce_raw(inp, _stream(8, 1, t0=1.7e9 + 3600))  # both fetch: each reports its own
    wait_for(lambda: len(_lag_series(first)) == len(_lag_series(second)) == 1, 30,
             "each worker's lag", lambda: first.log() + second.log())
    assert _lag_series(first).keys() | _lag_series(second).keys() == {0, 1}


def test_a_worker_with_no_partition_to_hold_exports_zero_assigned_and_its_peer_one(
        topic_factory, group_id, worker_factory):
    inp, out, dlq = _topics(topic_factory, partitions=1)
    first = worker_factory(inp, out, dlq, group_id, name="w1").start()
    first.wait_ready()
    wait_for(lambda: first.metric("streamer_assigned_partitions") == 1, 30, "w1 holding it",
             first.log)
    second = worker_factory(inp, out, dlq, group_id, name="w2").start()
    second.wait_ready()  # ready: it idles, waiting for a partition
    wait_for(lambda: second.metric("streamer_assigned_partitions", required=True) == 0, 30,
             "w2 idle", second.log)
    wait_for(lambda: first.metric("streamer_assigned_partitions") == 1, 30, "w1 still holding",
             first.log)  # (a rebalance may have moved it; then w2 holds it and w1 idles)


def test_a_worker_holding_no_partition_warns_once_per_idle_stretch(monkeypatch, caplog):
    monkeypatch.setattr(worker_module, "UNASSIGNED_WARN_S", 0.0)
    metrics = Metrics(CollectorRegistry(), max_grad_norm=1.0, device="cpu", coverage_target=0.9)
    idle = SimpleNamespace(settings=Settings(), metrics=metrics, _unassigned_since=None,
                           _idle_warned=False, _topics_ready=True, _output_topics=lambda: True,
                           _join_since=None, _join_warned=False)
    watch = functools.partial(worker_module.Worker._watch_assignment, idle)
    with caplog.at_level(logging.WARNING, logger="streamer.worker"):
        watch(set())  # idle from now
        watch(set())  # ... for UNASSIGNED_WARN_S: warned
        watch(set())
        watch({("readings", 0)})  # assigned: a later idle stretch is warned about again
        watch(set())
        watch(set())
    warnings = [r for r in caplog.records if "no partition of" in r.getMessage()]
    assert len(warnings) == 2
    assert "more workers than the topic has partitions" in warnings[0].getMessage()
    assert idle.metrics.assigned_partitions._value.get() == 0


def test_readings_dead_lettered_for_a_full_sensor_table_are_said_at_most_once_a_minute(
        monkeypatch, caplog):
    # Every new sensor of a full table was dead-lettered for good, the log silent.
    clock = [1000.0]
    monkeypatch.setattr(worker_module.time, "monotonic", lambda: clock[0])
    said = worker_module._TableFullWarning(LearnerConfig(max_sensors=5, initial_capacity=2))
    with caplog.at_level(logging.WARNING, logger="streamer.worker"):
        said.add(0)  # nothing refused: nothing said
        said.add(3)  # said at once...
        clock[0] += 30
        said.add(4)  # ...then counted for the next minute
        clock[0] += 31
        said.add(0)
        said.add(2)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "the sensor table is full (5 sensors): 3 readings of new sensors dead-lettered "
        "(table_full) since this was last said; no idle sensor frees its slot, "
        "sensors.idle_ttl_seconds (STREAMER_SENSORS__IDLE_TTL_SECONDS / "
        "--sensors-idle-ttl-seconds) being unset; raise sensors.max_sensors "
        "(STREAMER_SENSORS__MAX_SENSORS / --sensors-max-sensors)",
        "the sensor table is full (5 sensors): 4 readings of new sensors dead-lettered "
        "(table_full) since this was last said; no idle sensor frees its slot, "
        "sensors.idle_ttl_seconds (STREAMER_SENSORS__IDLE_TTL_SECONDS / "
        "--sensors-idle-ttl-seconds) being unset; raise sensors.max_sensors "
        "(STREAMER_SENSORS__MAX_SENSORS / --sensors-max-sensors)"], messages
    with_ttl = worker_module._TableFullWarning(LearnerConfig(sensor_ttl_seconds=3600))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamer.worker"):
        with_ttl.add(1)
    assert "; a sensor idle 3600 s frees its slot (sensors.idle_ttl_seconds" in caplog.text


def test_a_worker_whose_join_is_under_way_is_said_to_be_joining_not_to_idle(monkeypatch, caplog):
    # Idle for want of its input topic, then reconnected once the topic was made: the next
    # look found the topic and said "more workers than partitions" while the new consumer's
    # join was still under way (the idle stretch counted from before the reconnect); and a
    # join the coordinator held for over a minute (a member slow to rejoin) was said so too.
    monkeypatch.setattr(worker_module, "UNASSIGNED_WARN_S", 30.0)
    metrics = Metrics(CollectorRegistry(), max_grad_norm=1.0, device="cpu", coverage_target=0.9)
    now = time.monotonic()
    idle = SimpleNamespace(settings=Settings(), metrics=metrics, _unassigned_since=now - 40,
                           _idle_warned=False, _topics_ready=True, _output_topics=lambda: True,
                           _join_since=now - 5, _join_warned=False)  # opened again 5 s ago
    watch = functools.partial(worker_module.Worker._watch_assignment, idle)
    with caplog.at_level(logging.WARNING, logger="streamer.worker"):
        watch(set())  # the topic looked at, the consumer joining: nothing said
        assert not caplog.records
        idle._unassigned_since -= 40  # the next look: the join 45 s old, held
        idle._join_since -= 40
        watch(set())
        idle._unassigned_since -= 40  # ... and again: said once per join
        watch(set())
        idle._join_since = None  # the join ended, giving it nothing (_on_assign)
        idle._unassigned_since -= 40
        watch(set())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("this worker's join to group streamer has not ended after "
                                  "45 s, and it holds no partition of sensor-readings "), messages
    assert "rebalance timeout (max.poll.interval.ms, 300 s)" in messages[0]
    assert "more workers than the topic has partitions" in messages[1]


def test_a_worker_idle_for_want_of_its_input_topic_says_so_not_that_the_group_is_too_large(
        monkeypatch, caplog):
    # Also when the topics it writes to exist already (made beforehand, as the compose job
    # does): the input topic is looked up on its own.
    monkeypatch.setattr(worker_module, "UNASSIGNED_WARN_S", 0.0)
    created: list[str] = []

    def input_missing_twice(connection, names, like):  # and deleted again at the 5th look
        created.append(like)
        if len(created) <= 2 or len(created) == 5:
            raise TopicMissing(f"topic {like!r} does not exist")
        return []

    monkeypatch.setattr(worker_module, "create_missing_topics", input_missing_twice)
    metrics = Metrics(CollectorRegistry(), max_grad_norm=1.0, device="cpu", coverage_target=0.9)
    settings = Settings()
    idle = SimpleNamespace(settings=settings, metrics=metrics, _unassigned_since=None,
                           _idle_warned=False, _topics_ready=False, _outputs_seen=True,
                           _join_since=None, _join_warned=False)
    idle._output_topics = functools.partial(worker_module.Worker._output_topics, idle)
    watch = functools.partial(worker_module.Worker._watch_assignment, idle)
    with caplog.at_level(logging.WARNING, logger="streamer.worker"):
        watch(set())  # idle from now
        watch(set())  # for UNASSIGNED_WARN_S: the input topic looked up, still missing
        watch(set())  # ... and again, every UNASSIGNED_WARN_S while it is
        watch(set())  # there now: what is left to say is that the group is too large
        watch(set())  # (once per idle stretch)
        watch(set())  # deleted: said again, and exported
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4, messages
    assert metrics.input_topic_missing._value.get() == 1
    for message in [*messages[:2], messages[3]]:
        assert message.startswith("waiting for the input topic, named by kafka.input_topic "
                                  "(STREAMER_KAFKA__INPUT_TOPIC"), message
        assert "topic 'sensor-readings' does not exist" in message
    assert "more workers than the topic has partitions" in messages[2]
    assert not idle._topics_ready
    watch({("sensor-readings", 0)})  # a partition held: the topic exists (made again)
    assert metrics.input_topic_missing._value.get() == 0


def test_forecasts_carry_an_interval_and_a_spike_becomes_an_anomaly_event(
        topic_factory, group_id, worker_factory, produce_raw, consume_raw):
    inp, out, dlq = _topics(topic_factory, partitions=1)
    worker = worker_factory(inp, out, dlq, group_id).start()
    worker.wait_ready()
    stream = _stream(3, 150)
    spike = 3 * 120 + 1  # sensor-1's reading at step 120
    key, value = stream[spike]
    body = json.loads(value)
    stream[spike] = reading("sensor-1", body["ts"], body["value"] + 500.0)
    placed = produce_raw(inp, stream)
    got = forecasts_by_source(consume_raw(out, len(placed), timeout_s=30))
    assert len(got) == len(placed), worker.log()
    for (forecast,) in got.values():
        assert forecast["lower"] <= forecast["value"] <= forecast["upper"]
        assert 0.0 <= forecast["anomaly_score"] <= 1.0
        assert isinstance(forecast["anomaly"], bool)
    (flagged,) = got[placed[spike]]
    assert flagged["anomaly"] and flagged["anomaly_score"] >= 0.999
    n_flagged = sum(f["anomaly"] for (f,) in got.values())
    events = [(r.key.decode(), json.loads(r.value))
              for r in consume_raw(f"{out}-anomalies", n_flagged, timeout_s=10)]
    assert len(events) == n_flagged  # one event per flag
    assert all(key == event["sensor_id"] for key, event in events)
    (event,) = [e for _, e in events if e["offset"] == placed[spike][1]]
    assert event["sensor_id"] == "sensor-1" and event["ts"] == body["ts"]
    assert event["value"] == body["value"] + 500.0 and event["anomaly"] is True
    assert event["lower"] <= event["forecast"] <= event["upper"] < event["value"]
    wait_for(lambda: worker.metric("streamer_anomalies_total") == len(events), 5.0,
             "the flags to be counted", worker.log)


def test_with_a_horizon_each_forecast_lists_the_next_readings_and_errors_per_step_are_exported(
        topic_factory, group_id, worker_factory, produce_raw, consume_raw):
    inp, out, dlq = _topics(topic_factory, partitions=1)
    worker = worker_factory(inp, out, dlq, group_id, STREAMER_FORECAST__HORIZON="6").start()
    worker.wait_ready()
    placed = produce_raw(inp, _stream(2, 60))
    got = forecasts_by_source(consume_raw(out, len(placed), timeout_s=30))
    assert len(got) == len(placed), worker.log()
    for (forecast,) in got.values():
        steps = forecast["horizon"]
        assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
        assert steps[0]["value"] == forecast["value"] and steps[0]["lower"] == forecast["lower"]
        assert all(s["lower"] <= s["value"] <= s["upper"] for s in steps)
    (late,) = got[placed[-1]]
    # Readings 60 s apart: step k is expected k minutes after the reading.
    assert [s["ts"] - late["ts"] for s in late["horizon"]] == [60.0 * k for k in range(1, 7)]
    wait_for(lambda: worker.metric("streamer_horizon_scored_total", step="4") > 0, 5.0,
             "step 4's errors to be counted", worker.log)
    _, text = worker.get("/metrics")
    assert 'step="6"' not in text  # labelled by powers of two only


def test_last_batch_of_a_burst_is_completed_without_waiting_out_a_poll(
        topic_factory, group_id, worker_factory, produce_raw, consume_raw):
    # Delivery is pipelined: a batch is completed (acks awaited, counted, eligible for a
    # checkpoint) after the next poll. When the input goes quiet that poll must not wait the
    # full poll timeout (5 s here) first, or the last forecasts are counted 5 s late.
    inp, out, dlq = _topics(topic_factory)
    worker = worker_factory(inp, out, dlq, group_id,
                            STREAMER_KAFKA__POLL_TIMEOUT_MS="5000").start()
    worker.wait_ready()
    placed = produce_raw(inp, _stream(6, 10))
    assert len(consume_raw(out, len(placed), timeout_s=30)) == len(placed)

    wait_for(lambda: worker.metric("streamer_forecasts_produced_total") >= len(placed), 2.0,
             "every forecast to be counted", worker.log)
    assert worker.metric("streamer_forecasts_produced_total") == len(placed), worker.log()


def test_each_bad_message_lands_in_the_dlq_with_its_reason_and_the_worker_goes_on(
        topic_factory, group_id, worker_factory, produce_raw, consume_raw):
    inp, out, dlq = topic_factory(1), topic_factory(1), topic_factory(1)
    worker = worker_factory(inp, out, dlq, group_id,
                            STREAMER_SENSORS__MAX_SENSORS="2",
                            STREAMER_SENSORS__INITIAL_CAPACITY="2").start()
    worker.wait_ready()
    bad = [
        (b"a", b"not json {", "not_json"),
        (b"a", b'{"sensor_id": "a", "ts": 1}', "schema_violation"),
        (b"a", b'{"sensor_id": "b", "ts": 1, "value": 1.0}', "key_mismatch"),
        (b"a", b'{"sensor_id": "a", "ts": 1, "value": NaN}', "non_finite"),
        (b"a", b'{"sensor_id": "a", "ts": 1, "values": [1.0, 2.0]}', "wrong_feature_count"),
        (b"a", b'{"sensor_id": "a", "ts": 5, "value": 1.0}', None),
        (b"a", b'{"sensor_id": "a", "ts": 5, "value": 2.0}', "timestamp_not_after_last"),
        (b"b", b'{"sensor_id": "b", "ts": 5, "value": 2.0}', None),
        (b"c", b'{"sensor_id": "c", "ts": 5, "value": 2.0}', "table_full"),
        (b"a", b'{"sensor_id": "a", "ts": 6, "value": 3.0}', None),
    ]
    placed = produce_raw(inp, [(k, v) for k, v, _ in bad])
    expected = {off: (k, v, reason) for (_, off), (k, v, reason) in zip(placed, bad) if reason}
    dead = consume_raw(dlq, len(expected), timeout_s=20)
    assert len(dead) == len(expected), worker.log()
    for record in dead:
        headers = dict(record.headers)
        offset = int(headers[DLQ_SOURCE_OFFSET])
        key, value, reason = expected[offset]
        assert headers[DLQ_REASON].decode() == reason
        assert headers[DLQ_SOURCE_PARTITION] == b"0"
        assert (record.key, record.value) == (key, value)
    good = consume_raw(out, 3, timeout_s=10)
    assert sorted(__import__("json").loads(r.value)["offset"] for r in good) == [5, 7, 9]
    assert worker.proc.poll() is None
    # Counted once the batch's acks were awaited.
    wait_for(lambda: worker.metric('streamer_dlq_records_total{reason="not_json"}') == 1, 10,
             "the not_json rejection to be counted", worker.log)


def test_sigkill_mid_stream_then_restart_loses_no_reading(
        topic_factory, group_id, worker_factory, produce_raw, consume_raw):
    inp, out, dlq = _topics(topic_factory)
    first = worker_factory(inp, out, dlq, group_id).start()
    first.wait_ready()
    stream = _stream(20, 60)
    placed = produce_raw(inp, stream[:600])
    deadline = time.monotonic() + 20
    while first.metric("streamer_forecasts_produced_total") < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    # killed mid-stream: with forecasts out (the second half of the stream is not sent yet)
    assert first.metric("streamer_forecasts_produced_total", required=True) >= 200, first.log()
    first.signal(signal.SIGKILL)
    first.wait(5)
    placed += produce_raw(inp, stream[600:])
    second = worker_factory(inp, out, dlq, group_id).start()
    deadline, missing = time.monotonic() + 60, set(placed)
    while missing and time.monotonic() < deadline:  # re-emitted forecasts come on top
        missing -= set(forecasts_by_source(consume_raw(out, 10**6, timeout_s=2)))
    assert not missing, f"{len(missing)} readings without a forecast\n{second.log()}"
    assert consume_raw(dlq, 1, timeout_s=1) == []  # nothing applied twice (no ts rejections)


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (Linux: SigCgt in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(caught >> (sig - 1) & 1)


def _catching_signals(topic_factory, group_id, worker_factory, **env: str):
    """A worker process, started, from the moment it catches SIGTERM (still starting)."""
    inp, out, dlq = _topics(topic_factory)
    worker = worker_factory(inp, out, dlq, group_id, **env).start()
    deadline = time.monotonic() + 30
    while not _catches(worker.proc.pid, signal.SIGTERM):
        assert time.monotonic() < deadline and worker.proc.poll() is None, worker.log()
        time.sleep(0.005)
    return worker


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_sigterm_while_the_worker_is_still_starting_exits_zero(
        topic_factory, group_id, worker_factory):
    # Kubernetes stops pods that are still starting too (a rollout, a scale-in): from the
    # moment the signal is caught, a stop is clean, never lost, never a kill by the signal.
    worker = _catching_signals(topic_factory, group_id, worker_factory)
    ready_when_signalled = worker.get("/readyz")[0] == 200
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log()
    assert "stopped" in worker.log()
    assert not ready_when_signalled  # it was caught during start-up, before serving


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_second_signal_while_starting_exits_at_once_with_128_plus_its_number(
        topic_factory, group_id, worker_factory):
    # Ctrl-C twice: the first asks for the clean stop, which would run the whole start-up
    # first; the second is "now". As safe as a SIGKILL, which loses nothing.
    # No broker to reach: the clean stop waits seconds for it, so the second signal lands
    # while the first is being acted on, however fast start-up is.
    worker = _catching_signals(topic_factory, group_id, worker_factory,
                               STREAMER_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    worker.signal(signal.SIGTERM)
    time.sleep(signals.SAME_REQUEST_S + 0.3)  # later than one request delivered twice
    assert worker.proc.poll() is None, worker.log()
    worker.signal(signal.SIGINT)
    assert worker.wait(10) == 128 + signal.SIGINT, worker.log()
    assert "SIGINT again: exiting at once" in worker.log()


class _Exited(BaseException):
    def __init__(self, code: int):
        self.code = code


def _exit_raises(monkeypatch) -> None:
    """os._exit raises _Exited instead; a second signal counts however soon it comes."""
    def exit_(code: int):
        raise _Exited(code)

    monkeypatch.setattr(signals.os, "_exit", exit_)
    monkeypatch.setattr(signals, "SAME_REQUEST_S", 0.0)


def test_one_stop_request_delivered_twice_at_once_is_a_clean_stop(monkeypatch):
    # A terminal's Ctrl-C reaches a wrapper that forwards it, and its child: two SIGINTs
    # within microseconds, one request.
    monkeypatch.setattr(signals.os, "_exit", lambda code: pytest.fail(f"exited {code}"))
    with signals.stop_requests() as stopping:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stopping.wait(5)  # set from a thread of its own (signals._set_soon)


class _SignalledWhileSetting(threading.Event):
    """An Event whose set() is interrupted once, inside its lock, by the same signal again (as
    ``timeout`` does: it signals its child, then the child's process group)."""

    def set(self) -> None:
        with self._cond:
            if not getattr(self, "_nested", False):
                self._nested = True
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # what a signal now runs
            self._flag = True
            self._cond.notify_all()


@pytest.mark.parametrize("install", [signals.stop_on_signals, signals.set_on_signals],
                         ids=["worker", "demo"])
def test_a_signal_arriving_while_the_last_one_is_handled_does_not_hang_the_process(install):
    # (the README's demo check hung for ever that way: the handler, run again inside the
    # first one's Event.set, waited for the lock that set held)
    stopping = _SignalledWhileSetting()
    with signals.stop_requests():  # the handlers from before are back afterwards
        install(stopping)
        handling = threading.Thread(
            target=signal.getsignal(signal.SIGINT), args=(signal.SIGINT, None), daemon=True)
        handling.start()
        handling.join(timeout=5)
    assert not handling.is_alive(), "the nested signal handler deadlocked"
    assert stopping.wait(5)


@pytest.mark.parametrize("install", [signals.stop_on_signals, signals.set_on_signals],
                         ids=["worker", "demo"])
def test_a_signal_landing_while_the_main_thread_holds_the_events_lock_does_not_hang(install):
    # (in Event.wait or Event.set the main thread holds the event's lock for a few bytecodes:
    # a handler that set the event itself there waited for its own lock for ever)
    stopping = threading.Event()
    with signals.stop_requests():
        install(stopping)
        with stopping._cond:  # where the main thread is, inside wait() or set()
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # the signal lands here
        assert stopping.wait(5)


def test_a_second_signal_to_a_serving_worker_exits_at_once_and_the_first_only_stops_it(
        monkeypatch):
    _exit_raises(monkeypatch)
    worker = worker_module.Worker.__new__(worker_module.Worker)
    worker._stop = threading.Event()
    with signals.stop_requests():  # the handlers from before are back afterwards
        worker.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGTERM)
        assert worker._stop.wait(5)
        with pytest.raises(_Exited) as exited:
            os.kill(os.getpid(), signal.SIGTERM)
    assert exited.value.code == 128 + signal.SIGTERM


def test_a_second_signal_during_the_workers_construction_exits_at_once(monkeypatch, tmp_path):
    _exit_raises(monkeypatch)
    built = worker_module.Worker.__init__

    def signalled_twice_while_building(self, settings):
        os.kill(os.getpid(), signal.SIGTERM)  # recorded: a clean stop once started
        os.kill(os.getpid(), signal.SIGINT)  # now
        built(self, settings)

    monkeypatch.setattr(worker_module.Worker, "__init__", signalled_twice_while_building)
    with pytest.raises(_Exited) as exited:
        _run_in_process(monkeypatch, tmp_path)
    assert exited.value.code == 128 + signal.SIGINT


def test_sigterm_exits_zero_within_ten_seconds_with_offsets_committed(
        topic_factory, group_id, worker_factory, produce_raw, consume_raw, broker):
    inp, out, dlq = _topics(topic_factory)
    worker = worker_factory(inp, out, dlq, group_id).start()
    worker.wait_ready()
    placed = produce_raw(inp, _stream(10, 30))
    assert len(consume_raw(out, len(placed), timeout_s=20)) == len(placed)
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    assert time.monotonic() - started < 10
    ends = {}
    for partition, offset in placed:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group_id,
                             enable_auto_commit=False)
    try:
        committed = {p: consumer.committed(TopicPartition(inp, p)) for p in ends}
    finally:
        consumer.close()
    assert committed == ends
    assert "stopped" in worker.log()


def test_worker_survives_a_broker_that_comes_back_empty_and_reads_the_new_log_whole(
        tmp_path, worker_factory, group_id):
    # The broker comes back empty (memory storage) and the input topic, made again, has grown
    # past the offsets the worker holds before it is back in its group: the topic's id tells
    # the new log from the old (a log ending before them is recognised by its end alone:
    # tests/serving/test_ledger.py). The topics the worker writes to are made again too, with
    # the input's partition count, not left to the brokers' auto-creation.
    with LocalBroker(log_path=tmp_path / "own-broker.log") as own:
        ensure_topics(own.bootstrap, {"in-l": 2})
        worker = worker_factory("in-l", "out-l", "dlq-l", group_id,
                                STREAMER_KAFKA__BOOTSTRAP_SERVERS=own.bootstrap).start()
        worker.wait_ready()
        produce_to(own.bootstrap, "in-l", _stream(3, 5))
        assert len(consume_from(own.bootstrap, "out-l", 15)) == 15
        own.kill()
        deadline = time.monotonic() + 30
        while worker.get("/readyz")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert worker.get("/readyz")[0] == 503, worker.log()
        assert worker.get("/healthz")[0] == 200
        own.start()
        ensure_topics(own.bootstrap, {"in-l": 2})
        produce_to(own.bootstrap, "in-l", _stream(3, 12, t0=1.8e9))  # 36 readings > 15
        deadline, outputs_made = time.monotonic() + 60, "created topics ['dlq-l', 'out-l', "
        while (worker.log_path.read_text(errors="replace").count(outputs_made) < 2
               and time.monotonic() < deadline):  # the whole log: log() is its tail
            time.sleep(0.2)  # (consume only then: a consumer could auto-create them)
        outputs = ["out-l", "dlq-l", "out-l-anomalies"]
        assert partition_counts(own.bootstrap, outputs) == dict.fromkeys(outputs, 2), worker.log()
        assert len(consume_from(own.bootstrap, "out-l", 36, timeout_s=60)) == 36, worker.log()
        assert "the topic's id changed" in worker.log()
        assert worker.proc.poll() is None
        assert worker.get("/readyz")[0] == 200


def test_a_worker_creates_the_topics_it_writes_to_with_the_input_topics_partitions(
        topic_factory, group_id, worker_factory, broker):
    inp = topic_factory(3)
    out, dlq = f"{inp}-out", f"{inp}-dlq"  # neither exists
    worker = worker_factory(inp, out, dlq, group_id).start()
    try:
        worker.wait_ready()
        assert partition_counts(broker.bootstrap, [out, dlq, f"{out}-anomalies"]) == {
            out: 3, dlq: 3, f"{out}-anomalies": 3}, worker.log()
    finally:
        worker.stop()  # first: a running worker's producer could bring them back
        delete_topics(broker.bootstrap, [out, dlq, f"{out}-anomalies"])


REFUSALS = [
    # what a cluster without Create permission answers
    TopicCreationRefused("creating topic 'sensor-anomalies' failed: "
                         "TopicAuthorizationFailedError: not authorized"),
    # an error retrying cannot fix (kafka-python raises it before sending to an old cluster)
    convert(kerr.IncompatibleBrokerVersion("replication_factor=-1 needs a broker of 2.4 or "
                                           "later"), "creating topics"),
]


def _refusing(error: Exception):
    def refuse(connection, names, like):
        raise error

    return refuse


@pytest.mark.parametrize("error", REFUSALS, ids=["refused", "unfixable"])
def test_output_topics_refused_again_after_they_were_there_are_retried_not_fatal(
        monkeypatch, error):
    # Brokers that lost them, coming back one at a time, may refuse for a while: the worker
    # backs off and reconnects with its batches in flight instead of exiting with them.
    monkeypatch.setattr(worker_module, "create_missing_topics", _refusing(error))
    worker = SimpleNamespace(settings=load_settings({}), _outputs_seen=True)
    with pytest.raises(BrokerUnavailable, match="retrying"):
        worker_module.Worker._output_topics(worker)
    worker._outputs_seen = False  # at start-up: a setup error, as below
    with pytest.raises(ConfigError):
        worker_module.Worker._output_topics(worker)


@pytest.mark.parametrize("error", REFUSALS, ids=["refused", "unfixable"])
def test_a_missing_output_topic_the_cluster_will_not_create_is_a_config_error(
        monkeypatch, error):
    monkeypatch.setattr(worker_module, "create_missing_topics", _refusing(error))
    with pytest.raises(ConfigError) as raised:
        worker_module._create_output_topics(load_settings({
            "kafka.anomaly_topic": "sensor-anomalies"}))  # not what the environment says
    message = str(raised.value)
    assert str(error) in message
    for env in ("STREAMER_KAFKA__OUTPUT_TOPIC", "STREAMER_KAFKA__DLQ_TOPIC",
                "STREAMER_KAFKA__ANOMALY_TOPIC"):
        assert env in message


@pytest.mark.parametrize("error", [
    BrokerUnavailable("listing topics failed: timed out"),
    convert(kerr.UnknownError("during a controller failover"), "creating topics"),
], ids=["unreachable", "unknown server error"])
def test_an_error_retrying_may_fix_while_creating_topics_is_retried_not_a_config_error(
        monkeypatch, error):
    monkeypatch.setattr(worker_module, "create_missing_topics", _refusing(error))
    with pytest.raises(KafkaClientError) as raised:  # the loop backs off and tries again
        worker_module._create_output_topics(load_settings())
    assert raised.value is error


def test_an_input_topic_created_after_the_worker_started_is_read_not_made_by_the_worker(
        broker, group_id, worker_factory, produce_raw, consume_raw):
    # Its clients asked the brokers to create the topics they looked up (kafka-python's
    # default): a missing input topic was made with the brokers' default partition count.
    # Without that, kafka-python did not read one made later for 5 minutes.
    inp = f"late-{group_id}"
    out, dlq = f"{inp}-out", f"{inp}-dlq"
    worker = worker_factory(inp, out, dlq, group_id).start()
    try:
        worker.wait_ready()
        wait_for(lambda: "does not exist" in worker.log(), 30, "the missing input noticed",
                 worker.log)
        time.sleep(3)  # polling, joined, looking it up
        assert partition_counts(broker.bootstrap, [inp]).get(inp, 0) == 0, worker.log()
        # Waiting for a topic is no broker trouble: librdkafka's "unknown topic" at each
        # metadata refresh made the worker reconnect (and rejoin its group) every few seconds.
        assert "broker trouble" not in worker.log(), worker.log()
        assert worker.log().count("connected to") == 1, worker.log()
        assert worker.metric("streamer_input_topic_missing") == 1
        ensure_topics(broker.bootstrap, {inp: 3})
        # Held before any reading: the gauge says the topic exists as soon as partitions do.
        wait_for(lambda: worker.metric("streamer_assigned_partitions") == 3, 30,
                 "the new topic's partitions held", worker.log)
        assert worker.metric("streamer_input_topic_missing", required=True) == 0
        placed = produce_raw(inp, _stream(3, 3))
        got = consume_raw(out, len(placed), timeout_s=30)
        assert len(got) == len(placed), worker.log()
        assert partition_counts(broker.bootstrap, [out, dlq]) == {out: 3, dlq: 3}
        assert worker.metric("streamer_input_topic_missing", required=True) == 0
    finally:
        worker.stop()
        delete_topics(broker.bootstrap, [inp, out, dlq, f"{out}-anomalies", f"{out}-model"])


def test_an_input_topic_deleted_and_made_again_while_the_worker_runs_is_read_whole(
        broker, group_id, worker_factory, produce_raw, consume_raw, client_kind):
    if client_kind == "confluent":  # docs/test-broker.md, "deleting a topic a librdkafka..."
        pytest.skip("librdkafka 2.16 dies of SIGSEGV on this broker's answer for a deleted "
                    "topic (inside its metadata cache), before the worker can do anything")
    inp = f"remade-{group_id}"
    out, dlq = f"{inp}-out", f"{inp}-dlq"
    ensure_topics(broker.bootstrap, {inp: 2})
    worker = worker_factory(inp, out, dlq, group_id).start()
    try:
        worker.wait_ready()
        first = produce_raw(inp, _stream(3, 10))
        assert len(consume_raw(out, len(first), timeout_s=30)) == len(first), worker.log()
        delete_topics(broker.bootstrap, [inp])
        time.sleep(3)  # the worker polls a topic that is gone
        assert worker.proc.poll() is None, worker.log()
        ensure_topics(broker.bootstrap, {inp: 2})
        # More than before: the new log passes our offsets, so only its id tells it apart.
        later = _stream(3, 14, t0=1.8e9)
        again = produce_raw(inp, later)
        got = consume_raw(out, len(first) + len(again), timeout_s=60)
        assert len(got) == len(first) + len(again), worker.log()
        forecast_for = {(json.loads(r.value)["sensor_id"], json.loads(r.value)["ts"])
                        for r in got}
        assert {(json.loads(v)["sensor_id"], json.loads(v)["ts"]) for _, v in later} <= (
            forecast_for)
    finally:
        worker.stop()
        delete_topics(broker.bootstrap, [inp, out, dlq, f"{out}-anomalies", f"{out}-model"])


def test_output_topics_are_left_alone_with_a_warning_while_the_input_topic_is_missing(
        monkeypatch, caplog):
    monkeypatch.setattr(worker_module, "create_missing_topics", _refusing(
        TopicMissing("topic 'sensor-readings' does not exist, so ['sensor-forecasts'] were "
                     "not created")))
    with caplog.at_level(logging.WARNING, logger="streamer.worker"):
        done = worker_module._create_output_topics(load_settings())  # no error: serving goes on
    assert not done  # tried again once the input topic has records
    assert "waiting for the input topic" in caplog.text and "does not exist" in caplog.text


def test_output_topics_are_created_once_an_input_topic_missing_at_start_has_records(
        topic_factory, group_id, broker, monkeypatch, tmp_path):
    inp = topic_factory(3)
    out, dlq = f"{inp}-out", f"{inp}-dlq"
    calls = []
    create = worker_module.create_missing_topics

    def missing_at_start(connection, names, like):  # the input "appears" after the first try
        if not calls:
            calls.append(like)
            raise TopicMissing(f"topic {like!r} does not exist")
        created = create(connection, names, like=like)
        calls.append(like)  # only now may the test read the output topic
        return created

    monkeypatch.setattr(worker_module, "create_missing_topics", missing_at_start)
    settings = load_settings({
        "kafka.bootstrap_servers": broker.bootstrap, "kafka.input_topic": inp,
        "kafka.output_topic": out, "kafka.dlq_topic": dlq, "kafka.anomaly_topic": "",
        "kafka.group_id": group_id, "kafka.poll_timeout_ms": 200,
        **{f"kafka.{k}": v for k, v in TEST_CONSUMER_TIMEOUTS.items()},
        "metrics.enabled": False, "metrics.host": "127.0.0.1", "metrics.port": 0,
        "sharing.enabled": False,
        "checkpoint.dir": str(tmp_path), "device": "cpu"})
    threads = torch.get_num_threads()
    worker = worker_module.Worker(settings)
    serving = threading.Thread(target=worker.run)
    serving.start()
    try:
        produce_to(broker.bootstrap, inp, _stream(3, 3))
        # (reading the output before the worker made it would have the broker create it)
        wait_for(lambda: len(calls) == 2, 60, "the topics created, once records came")
        assert len(consume_from(broker.bootstrap, out, 9, timeout_s=60)) == 9
    finally:
        worker.stop()
        serving.join(60)
        torch.set_num_threads(threads)
    try:
        # created with the input's partitions before the first forecast was sent, not left to
        # the broker's auto-creation (4 partitions here)
        assert calls == [inp, inp]
        assert partition_counts(broker.bootstrap, [out, dlq]) == {out: 3, dlq: 3}
    finally:
        delete_topics(broker.bootstrap, [out, dlq])


def test_a_worker_whose_consumer_comes_back_to_find_its_partition_taken_lets_it_go(
        topic_factory, group_id, broker, monkeypatch, tmp_path, caplog):
    # Broker trouble closes a worker's consumer (it leaves the group) without a revocation;
    # another member takes its partition meanwhile, and the worker's next join gives it none.
    # It must drop the partition: a checkpoint of it (here: the one taken at stop) committed
    # its old offset over the new owner's, which then re-read or skipped readings.
    inp = topic_factory(1)
    out, dlq, tp = f"{inp}-out", f"{inp}-dlq", (inp, 0)
    monkeypatch.setattr(worker_module, "BACKOFF_START_S", 8.0)  # for the other to take it
    settings = load_settings({
        "kafka.bootstrap_servers": broker.bootstrap, "kafka.input_topic": inp,
        "kafka.output_topic": out, "kafka.dlq_topic": dlq, "kafka.anomaly_topic": "",
        "kafka.group_id": group_id, "kafka.poll_timeout_ms": 200, "kafka.client": "kafka-python",
        **{f"kafka.{k}": v for k, v in TEST_CONSUMER_TIMEOUTS.items()},
        "metrics.enabled": False, "metrics.host": "127.0.0.1", "metrics.port": 0,
        "sharing.enabled": False, "checkpoint.interval_seconds": 1,
        "checkpoint.dir": str(tmp_path), "device": "cpu"})
    # Its member id sorts before the worker's ("streamer-..."): the range assignor gives it
    # the one partition when both are in the group.
    other = open_client("kafka-python", KafkaConnection(broker.bootstrap, client_id="a-first"),
                        ConsumerSettings(group_id, **TEST_CONSUMER_TIMEOUTS), ProducerSettings())
    offsets = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group_id,
                            enable_auto_commit=False)
    threads = torch.get_num_threads()
    worker = worker_module.Worker(settings)
    serving = threading.Thread(target=worker.run)
    polling, stop_polling = threading.Thread(target=lambda: None), threading.Event()
    caplog.set_level(logging.INFO, logger="streamer")
    try:
        serving.start()
        produce_to(broker.bootstrap, inp, _stream(3, 3))
        assert len(consume_from(broker.bootstrap, out, 9, timeout_s=60)) == 9
        wait_for(lambda: offsets.committed(TopicPartition(inp, 0)) == 9, 30, "offset 9 committed")
        client = worker._client
        real_poll = client.poll_batch

        def lost_connection(*args, **kwargs):
            client.poll_batch = real_poll
            raise BrokerUnavailable("test: connection lost")

        client.poll_batch = lost_connection
        wait_for(lambda: worker._client is None, 30, "the worker's consumer closed")
        other.subscribe([inp])
        deadline = time.monotonic() + 30
        while other.assignment() != {tp} and time.monotonic() < deadline:
            other.poll_batch(100, 0.2)  # (the worker is backing off meanwhile)
        assert other.assignment() == {tp}
        other.commit({tp: 3})  # its own offset: it reads from 3 (say, a checkpoint of its own)

        def keep_polling() -> None:
            while not stop_polling.is_set():
                other.poll_batch(100, 0.2)

        polling = threading.Thread(target=keep_polling, daemon=True)
        polling.start()
        wait_for(lambda: "released" in caplog.text, 60, "the partition released",
                 lambda: caplog.text)
        assert worker.ledger.partitions() == set()
        assert other.assignment() == {tp}
    finally:
        worker.stop()
        serving.join(60)
        stop_polling.set()
        polling.join(10)
        other.close(timeout_s=1.0)
        torch.set_num_threads(threads)
    assert offsets.committed(TopicPartition(inp, 0)) == 3, caplog.text  # not moved back
    offsets.close()
    assert not serving.is_alive()
    delete_topics(broker.bootstrap, [out, dlq])


def _run_in_process(monkeypatch, tmp_path) -> int:
    """``streamer run`` in this process against a port nobody listens on (sharing off), with
    the logging, signal handlers and torch threads it sets restored afterwards."""
    from streamer.tools import cli

    for name in [n for n in os.environ if n.startswith("STREAMER_")]:
        monkeypatch.delenv(name)
    for name, value in {"STREAMER_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
                        "STREAMER_CHECKPOINT__DIR": str(tmp_path), "STREAMER_METRICS__PORT": "0",
                        "STREAMER_SHARING__ENABLED": "false", "STREAMER_DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)
    root, libraries = logging.getLogger(), [logging.getLogger(n) for n in KAFKA_LIBRARIES]
    handlers, levels = root.handlers[:], [root.level, *(lib.level for lib in libraries)]
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    try:
        return cli.main(["run"])
    finally:
        root.handlers[:] = handlers
        for logger, level in zip([root, *libraries], levels, strict=True):
            logger.setLevel(level)
        for sig, handler in signals.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)


def test_a_sigterm_during_the_workers_construction_stops_it_cleanly_with_exit_0(
        monkeypatch, tmp_path, capsys):
    built = worker_module.Worker.__init__

    def signalled_while_building(self, settings):
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            raise AssertionError("SIGTERM would kill the process: no handler yet")
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not acted on: no worker to stop yet
        built(self, settings)

    def connecting(self):
        raise AssertionError("it went on to serve although asked to stop")

    monkeypatch.setattr(worker_module.Worker, "__init__", signalled_while_building)
    monkeypatch.setattr(worker_module.Worker, "_connected", connecting)
    assert _run_in_process(monkeypatch, tmp_path) == 0
    # and says why it stops (a signal before the logging was set up was not logged)
    assert "asked to stop while starting" in capsys.readouterr().err


def test_streamer_run_refusing_its_config_leaves_the_signal_handlers_as_they_were(monkeypatch):
    from streamer.tools import cli

    monkeypatch.setenv("STREAMER_KAFKA__POLL_TIMEOUT_MS", "-1")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    assert cli.main(["run"]) == 2
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_streamer_run_stops_with_exit_2_and_shuts_down_when_a_topic_cannot_be_created(
        monkeypatch, tmp_path, capsys):
    closed = []
    close = worker_module.Worker._close
    monkeypatch.setattr(worker_module.Worker, "_close",
                        lambda self: (closed.append(self), close(self)))
    monkeypatch.setattr(worker_module, "create_missing_topics", _refusing(REFUSALS[0]))
    code = _run_in_process(monkeypatch, tmp_path)
    assert code == 2
    assert "TopicAuthorizationFailedError" in capsys.readouterr().err
    assert len(closed) == 1  # checkpoint writer, clients, model topic and health server
    # No checkpoint: one written now would date the restored state as new, and a partition's
    # next owner would adopt it over a newer checkpoint of another worker. (Its lock file,
    # .<id>.lock, holds nothing.)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".lock"]


def test_invalid_config_exits_2_naming_the_field():
    done = subprocess.run([sys.executable, "-m", "streamer", "run", "--training-lr", "-1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "training.lr" in done.stderr and "STREAMER_TRAINING__LR" in done.stderr
    assert "--training-lr" in done.stderr


@pytest.mark.parametrize(("env", "args", "message"), [
    ({"STREAMER_KAFKA": "notjson"}, [],
     "invalid configuration: STREAMER_KAFKA is not valid JSON: Expecting value: line 1 column 1 "
     "(char 0); it takes a JSON object of the kafka settings, or set them one by one "
     "(STREAMER_KAFKA__<SETTING>)"),
    ({}, ["--device", "cuda:99"],  # no CUDA, or not 100 devices
     "invalid configuration: device (STREAMER_DEVICE / --device): device 'cuda:99' requested "
     "but "),
    ({}, ["--checkpoint-dir", "/proc/nope/ck"],
     "invalid configuration: checkpoint.dir (STREAMER_CHECKPOINT__DIR / --checkpoint-dir): "
     "cannot use '/proc/nope/ck': No such file or directory"),
    ({}, ["--device", "cuda:99999999999999999999"],  # torch cannot parse the index
     "invalid configuration: device (STREAMER_DEVICE / --device): "),
    ({}, ["--checkpoint-dir", "/proc/version"],
     "invalid configuration: checkpoint.dir (STREAMER_CHECKPOINT__DIR / --checkpoint-dir): "
     "cannot use '/proc/version': a file, not a directory"),
    ({}, ["--checkpoint-dir", "/proc/1"],  # a directory no file can be written to
     "invalid configuration: checkpoint.dir (STREAMER_CHECKPOINT__DIR / --checkpoint-dir): "
     "cannot use '/proc/1': "),
    ({}, ["--metrics-port", "{taken}"],
     "invalid configuration: metrics.port (STREAMER_METRICS__PORT / --metrics-port): cannot "
     "listen on 0.0.0.0:{taken}: Address already in use"),
    ({}, ["--metrics-host", "192.0.2.1", "--metrics-port", "9"],  # TEST-NET: not ours
     "invalid configuration: metrics.host (STREAMER_METRICS__HOST / --metrics-host): cannot "
     "listen on 192.0.2.1:9: Cannot assign requested address"),
], ids=["section-not-json", "device-missing", "device-index-unparsable",
        "checkpoint-dir-impossible", "checkpoint-dir-a-file", "checkpoint-dir-not-writable",
        "metrics-port-taken", "metrics-host-not-ours"])
def test_settings_that_fail_at_start_exit_2_naming_the_setting_without_a_traceback(
        env, args, message, tmp_path):
    own = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
    with socket.socket() as taken:  # held while the worker starts
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        args = [a.replace("{taken}", port) for a in args]
        done = subprocess.run(
            [sys.executable, "-m", "streamer", "run", "--kafka-bootstrap-servers", "127.0.0.1:1",
             "--device", "cpu", "--checkpoint-dir", str(tmp_path), *args], env={**own, **env},
            capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"streamer run: {message.replace('{taken}', port)}" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_worker_whose_id_another_running_worker_writes_checkpoints_under_exits_2(tmp_path):
    # Two workers on one host share its name as their default id: their checkpoints, numbered
    # each from its own count, overwrote and pruned each other's.
    running = CheckpointStore(tmp_path, "vm", "fp")  # (held by this process: the other one)
    own = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
    done = subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--kafka-bootstrap-servers", "127.0.0.1:1",
         "--device", "cpu", "--checkpoint-dir", str(tmp_path), "--checkpoint-worker-id", "vm"],
        env=own, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert ("streamer run: invalid configuration: checkpoint.worker_id "
            "(STREAMER_CHECKPOINT__WORKER_ID / --checkpoint-worker-id): another running worker "
            f"writes its checkpoints in {str(tmp_path)!r} as 'vm' (the id defaults to the host "
            "name: give each worker on one host its own)") in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and running.worker == "vm"


def test_unknown_streamer_env_vars_are_named_in_a_warning_at_start():
    own = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
    env = {**own, "STREAMER_DEVCE": "cpu", "STREAMER_KAFKA_GROUP_ID": "g",
           "STREAMER_FAILPOINTS": "", "STREAMER_PORT_9100_TCP_ADDR": "10.0.0.1",
           "STREAMER_SERVICE_HOST": "10.0.0.1"}
    done = subprocess.run(  # the checkpoint directory then stops it: it warned before that
        [sys.executable, "-m", "streamer", "run", "--checkpoint-dir", "/proc/nope/ck",
         "--device", "cpu"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert ("ignoring STREAMER_DEVCE (did you mean STREAMER_DEVICE?), STREAMER_KAFKA_GROUP_ID "
            "(did you mean STREAMER_KAFKA__GROUP_ID?): no such setting (misspelt? "
            "`streamer run --help` lists them all)") in done.stderr


def test_run_help_documents_every_setting():
    from streamer.config import setting_fields

    done = subprocess.run([sys.executable, "-m", "streamer", "run", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for field in setting_fields():
        assert field.flag in done.stdout and field.env_var in done.stdout


def test_with_metrics_off_the_worker_still_serves_its_health_probes(
        topic_factory, group_id, worker_factory):
    inp, out, dlq = _topics(topic_factory, partitions=1)
    worker = worker_factory(inp, out, dlq, group_id, STREAMER_METRICS__ENABLED="false").start()
    worker.wait_ready()  # /readyz answers 200
    assert worker.get("/healthz") == (200, "ok\n")
    assert worker.get("/metrics")[0] == 404


def test_worker_waits_for_a_broker_that_is_down_at_start(tmp_path, worker_factory, group_id):
    port = free_port()
    worker = worker_factory("in-s", "out-s", "dlq-s", group_id,
                            STREAMER_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{port}").start()
    # Its first attempt takes the bootstrap timeout (10 s): meanwhile /readyz says so.
    wait_for(lambda: worker.get("/readyz")[0] == 503, 30, "/readyz to answer", worker.log)
    answer = worker.get("/readyz")
    if "broker trouble" not in worker.log():  # (read after: the answer came before it)
        assert answer == (503, "not ready: not connected to the broker yet\n")
    deadline = time.monotonic() + 40
    while "broker trouble" not in worker.log():  # the first attempt gives up, then it retries
        assert time.monotonic() < deadline and worker.proc.poll() is None, worker.log()
        time.sleep(0.2)
    status, body = worker.get("/readyz")
    assert status == 503 and "broker unavailable" in body
    assert worker.get("/healthz")[0] == 200
    with LocalBroker(port=port, log_path=tmp_path / "late-broker.log") as late:
        ensure_topics(late.bootstrap, {"in-s": 1, "out-s": 1, "dlq-s": 1})
        worker.wait_ready(timeout_s=60)  # backoff is at most 30 s
        produce_to(late.bootstrap, "in-s", _stream(2, 3))
        assert len(consume_from(late.bootstrap, "out-s", 6, timeout_s=30)) == 6, worker.log()
        assert worker.proc.poll() is None
        # An outage ridden out is the worker's WARNING, not the Kafka library's ERROR lines
        # (which paged whoever alerts on error logs): the library's are warnings too. (Read
        # before this broker stops too: what the library logs then varies from run to run;
        # tests/observability/test_logs.py has those lines.)
        log = worker.log()
        assert [line for line in log.splitlines() if " ERROR " in line] == [], log
        assert "WARNING kafka" in log or "WARNING librdkafka" in log, log


def test_a_worker_stopped_while_its_first_connection_attempt_hangs_exits_without_a_retry(
        worker_factory, group_id):
    worker = worker_factory("in-h", "out-h", "dlq-h", group_id,
                            STREAMER_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}").start()
    wait_for(lambda: worker.get("/readyz")[0] == 503, 30, "/readyz to answer", worker.log)
    worker.signal(signal.SIGTERM)  # (within the attempt's 10 s bootstrap timeout, or between)
    assert worker.wait(30) == 0, worker.log()
    after = worker.log().split("stopping cleanly", 1)[1].splitlines()
    # (it said "retrying in 4.0 s", and then did not)
    assert not [line for line in after if "streamer.worker: broker trouble" in line
                and "retrying in" in line], worker.log()


def test_a_worker_stopped_before_any_assignment_writes_no_checkpoint_over_a_peers(
        tmp_path, worker_factory, group_id):
    checkpoints = tmp_path / "shared"
    peer = Learner(LearnerConfig(device="cpu", tbptt_steps=4, train_every=20,
                                 warmup_readings=2))
    CheckpointStore(checkpoints, "peer", peer.config.fingerprint()).save(
        peer.snapshot(), {("in-p", 0): 7}, {("in-p", 0): []}, created=time.time() - 3600)
    worker = worker_factory("in-p", "out-p", "dlq-p", group_id, name="newcomer",
                            STREAMER_CHECKPOINT__DIR=str(checkpoints),
                            STREAMER_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    worker.start()
    wait_for(lambda: "restored peer-0000000001.json" in worker.log(), 60, "the restore",
             worker.log)
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log()
    # the peer's partition, restored but never assigned here, was not re-dated as ours
    assert sorted(p.name for p in checkpoints.glob("*.json")) == ["peer-0000000001.json"]


def test_a_worker_whose_last_checkpoint_fails_says_so_and_exits_1_not_0(
        tmp_path, topic_factory, group_id, worker_factory, produce_raw, consume_raw):
    # A full or vanished checkpoint volume at SIGTERM: "checkpoint failed", then "stopped" and
    # exit 0, as a clean stop (operator pass). Nothing is lost (the offsets are not committed).
    checkpoints = tmp_path / "ck"
    inp, out, dlq = _topics(topic_factory)
    worker = worker_factory(inp, out, dlq, group_id, STREAMER_CHECKPOINT__DIR=str(checkpoints),
                            STREAMER_CHECKPOINT__INTERVAL_SECONDS="120").start()
    worker.wait_ready()
    placed = produce_raw(inp, _stream(4, 5))
    assert len(consume_raw(out, len(placed), timeout_s=30)) == len(placed), worker.log()
    shutil.rmtree(checkpoints)
    checkpoints.write_text("")  # the volume gone, a file where it was
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 1, worker.log()
    log = worker.log()
    assert "checkpoint failed: " in log and "stopping without a final checkpoint" in log, log
    assert log.index("stopping without a final checkpoint") < log.index("stopped\n"), log


def test_worker_refuses_to_start_fresh_over_unusable_checkpoints_when_told_to(
        tmp_path, worker_factory, group_id):
    checkpoints = tmp_path / "damaged"
    checkpoints.mkdir()
    (checkpoints / "w1-0000000001.json").write_text('{"data": "w1-0000000001.ckpt"}')
    worker = worker_factory("in-x", "out-x", "dlq-x", group_id,
                            STREAMER_CHECKPOINT__DIR=str(checkpoints),
                            STREAMER_CHECKPOINT__ALLOW_FRESH_START="false").start()
    assert worker.wait(60) == 1
    assert "no usable checkpoint" in worker.log()
    assert ("checkpoint.allow_fresh_start (STREAMER_CHECKPOINT__ALLOW_FRESH_START / "
            "--checkpoint-allow-fresh-start) is off") in worker.log()


def test_settings_whose_largest_forecast_the_producer_would_refuse_stop_the_worker(tmp_path):
    # A record over the producer's max.request.size was refused at every send, and the worker
    # retried that batch for ever: no forecast, checkpoint or commit after it.
    settings = load_settings({"device": "cpu", "checkpoint.dir": str(tmp_path),
                              "model.n_features": "64", "forecast.horizon": "256",
                              "sharing.enabled": "false"})
    with pytest.raises(ConfigError, match=r"^invalid configuration: a forecast can take "
                       r"1,2\d\d,\d\d\d bytes with model.n_features \(STREAMER_MODEL__N_FEATURES"
                       r".* = 64, forecast.horizon .* = 256 and sensors.max_sensor_id_length "
                       r".* = 256, above the 1,048,064 a record may take"):
        worker_module.Worker(settings)


def test_a_sensor_table_too_large_for_memory_stops_the_worker_as_a_configuration_error(
        tmp_path, monkeypatch):
    from streamer.core import learner

    monkeypatch.setattr(learner, "memory_limit_bytes", lambda: 2**30)  # whatever the host has
    settings = load_settings({"device": "cpu", "checkpoint.dir": str(tmp_path),
                              "sensors.max_sensors": "100000000",
                              "sensors.initial_capacity": "100000000"})
    with pytest.raises(ConfigError, match=r"^invalid configuration: sensors.initial_capacity "
                       r"\(STREAMER_SENSORS__INITIAL_CAPACITY / --sensors-initial-capacity\): "
                       r"100,000,000 sensor slots up front need about "):
        worker_module.Worker(settings)
