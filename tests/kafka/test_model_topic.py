"""The model topic's reader on the real local broker: history, and when live records arrived."""

from __future__ import annotations

import gc
import sys
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer

from streamer.core import Learner, LearnerConfig
from streamer.core import weights as w
from streamer.kafka import KafkaConnection, delete_topics, ensure_topics
from streamer.kafka.broker import LocalBroker
from streamer.kafka.model_topic import ModelRecord, ModelTopic
from streamer.serving.sharing import (
    DEPARTED_AFTER_S,
    H_FINGERPRINT,
    H_GROUP,
    H_READINGS,
    H_SEQUENCE,
    ModelSharing,
)
from tests.conftest import unscraped_metrics

pytestmark = pytest.mark.broker


def _send(bootstrap: str, topic: str, key: bytes, timestamp_ms: int, value: bytes = b"v",
          headers: list[tuple[str, bytes]] | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    producer.send(topic, key=key, value=value, partition=0, timestamp_ms=timestamp_ms,
                  headers=headers or []).get(10)
    producer.close()


def _received(topic: ModelTopic, n: int, timeout_s: float = 15.0) -> list[ModelRecord]:
    got: list[ModelRecord] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += topic.received()
        time.sleep(0.05)
    return got


def test_records_written_before_reading_are_history_and_later_ones_live_whatever_their_clock(
        broker, kafka_connection, topic_factory):
    # A peer whose clock is an hour behind: its create times alone would make every record of
    # it look an hour old. What the reader can tell is when a record arrived.
    topic, behind_ms = topic_factory(), int((time.time() - 3600) * 1000)
    _send(broker.bootstrap, topic, b"g/early", behind_ms)
    reader = ModelTopic(kafka_connection, topic, 1_000_000)
    reader.start()
    try:
        early = _received(reader, 1)
        assert [(r.key, r.offset, r.arrived_s) for r in early] == [(b"g/early", 0, None)]
        deadline = time.monotonic() + 5.0
        while not reader.caught_up and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reader.caught_up  # set just after the last record of history joined the inbox
        sent = time.time()
        _send(broker.bootstrap, topic, b"g/late", behind_ms)
        late = _received(reader, 1)
        assert [(r.key, r.offset) for r in late] == [(b"g/late", 1)]
        assert sent <= late[0].arrived_s <= time.time()  # stamped on our clock as it arrived
        assert late[0].timestamp_s == pytest.approx(behind_ms / 1000)  # the peer's clock, kept
    finally:
        reader.close()


def test_a_reader_holds_only_the_newest_record_of_each_worker_however_long_the_history(
        broker, kafka_connection, topic_factory):
    # The active segment is never compacted: a worker starting on it reads every publish of
    # every worker for up to an hour; what it holds until the serving thread takes them is
    # one record per key, the newest, in topic order (a tombstone included).
    topic, now_ms = topic_factory(), int(time.time() * 1000)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    for i in range(30):
        producer.send(topic, key=b"g/" + b"abc"[i % 3:i % 3 + 1], value=str(i).encode(),
                      partition=0, timestamp_ms=now_ms)
    producer.send(topic, key=b"g/a", value=None, partition=0, timestamp_ms=now_ms)
    producer.flush(10)
    producer.close()
    reader = ModelTopic(kafka_connection, topic, 1_000_000)
    reader.start()
    try:
        deadline = time.monotonic() + 15.0
        while not reader.caught_up and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reader.caught_up
        got = [(r.key, r.value, r.offset) for r in reader.received()]
        assert got == [(b"g/b", b"28", 28), (b"g/c", b"29", 29), (b"g/a", None, 30)]
        assert reader.received() == []
    finally:
        reader.close()


def test_a_worker_tombstones_the_keys_of_workers_silent_for_a_day_once_caught_up(
        broker, kafka_connection, topic_factory):
    # A killed pod never publishes its tombstone; its id never returns under a Deployment.
    topic, config = topic_factory(), LearnerConfig(hidden_size=8, initial_capacity=4)
    learner = Learner(config)
    headers = [(H_GROUP, b"g"), (H_FINGERPRINT, config.fingerprint().encode()),
               (H_READINGS, b"5"), (H_SEQUENCE, b"1")]
    day_ago_ms = int((time.time() - DEPARTED_AFTER_S - 60) * 1000)
    weights = w.dumps(learner.weights())
    _send(broker.bootstrap, topic, b"g/gone", day_ago_ms, weights, headers)
    _send(broker.bootstrap, topic, b"other/gone", day_ago_ms, weights,
          [(H_GROUP, b"other")] + headers[1:])  # another group's: not ours to clear
    _send(broker.bootstrap, topic, b"g/alive", int(time.time() * 1000), weights, headers)
    metrics = unscraped_metrics()
    ttl = 1.0  # the tombstones wait for a peer TTL after the history was read
    sharing = ModelSharing(learner, ModelTopic(kafka_connection, topic, 1_000_000), "me", "g",
                           0.1, ttl, metrics)
    sharing.start()
    caught_up_at = None
    try:
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline and sharing.topic.published == 0:
            if caught_up_at is None and sharing.topic.caught_up:
                caught_up_at = time.monotonic()
            sharing.tick()
            time.sleep(0.02)
        published_at = time.monotonic()
        sharing.tick()
    finally:
        sharing.topic.close()
    assert caught_up_at is not None and published_at - caught_up_at >= ttl - 0.1
    # A tombstone is not this worker's weights: its last-publish time stays unset.
    assert metrics.registry.get_sample_value(
        "streamer_model_last_publish_timestamp_seconds") == 0
    consumer = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    written = [(r.key, r.value) for r in consumer]
    consumer.close()
    assert written[3:] == [(b"g/gone", None)]


def test_a_worker_whose_key_is_tombstoned_while_it_serves_publishes_its_weights_again(
        broker, kafka_connection, topic_factory):
    topic, config = topic_factory(), LearnerConfig(hidden_size=8, device="cpu")
    learner = Learner(config)
    metrics = unscraped_metrics()
    sharing = ModelSharing(learner, ModelTopic(kafka_connection, topic, 1_000_000), "me", "g",
                           0.1, 60.0, metrics)
    sharing.start()

    def tick_until(condition) -> None:
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline and not condition():
            sharing.tick()
            time.sleep(0.02)
        assert condition()

    try:
        sharing.checkpoint_durable(learner.weights(), readings=5)
        tick_until(lambda: sharing.topic.published == 1 and sharing.topic.caught_up)
        _send(broker.bootstrap, topic, b"g/me", int(time.time() * 1000), None,
              [(H_GROUP, b"g")])  # another worker's tombstone of our key
        tick_until(lambda: sharing.topic.published == 2)
    finally:
        sharing.topic.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    written = [(r.key, r.value is None) for r in consumer]
    consumer.close()
    assert written == [(b"g/me", False), (b"g/me", True), (b"g/me", False)]


def test_a_reader_of_a_remade_topic_reads_its_new_log_as_another_log(
        broker, kafka_connection, topic_factory):
    # Offsets order one log's records only: the board must not compare them across logs.
    topic = topic_factory()
    for i in range(3):
        _send(broker.bootstrap, topic, b"g/b", int(time.time() * 1000), value=b"%d" % i)
    reader = ModelTopic(kafka_connection, topic, 1_000_000)
    reader.start()
    try:
        assert [(r.offset, r.log) for r in _received(reader, 1)] == [(2, 0)]
        delete_topics(broker.bootstrap, [topic])
        ensure_topics(broker.bootstrap, {topic: 1})
        _send(broker.bootstrap, topic, b"g/b", int(time.time() * 1000), value=b"new")
        remade = _received(reader, 1, timeout_s=30.0)
        assert [(r.value, r.offset, r.log) for r in remade] == [(b"new", 0, 1)]
    finally:
        reader.close()


def test_a_record_published_after_the_brokers_lost_the_topic_reaches_it_made_again():
    # A broker restart (the local one keeps nothing): the next publish waited 60 s for the
    # lost topic's metadata (kafka-python's max_block_ms) before the reconnect that makes it.
    with LocalBroker() as broker:
        topic = ModelTopic(KafkaConnection(broker.bootstrap, bootstrap_timeout_s=2.0),
                           "model", 1_000_000)
        topic.start()
        try:
            topic.publish(b"g/a", b"before", [])
            assert [r.value for r in _received(topic, 1)] == [b"before"]
            broker.kill()
            broker.start()  # same port, no topics
            time.sleep(5)  # the topic's clients connected to it again, the topic still missing
            started = time.monotonic()
            topic.publish(b"g/a", b"after", [])
            assert [r.value for r in _received(topic, 1, timeout_s=90.0)] == [b"after"]
            assert time.monotonic() - started < 45.0  # not a 60 s wait, then the reconnect
        finally:
            topic.close()


def test_closing_while_the_brokers_are_down_leaves_no_producer_to_fail_when_collected():
    # A worker stopped during a broker outage: its tombstone cannot be delivered, and the
    # model topic's producer, whose close() raised from its flush, later printed a traceback
    # from kafka-python's __del__ ("Exception ignored in ... KafkaTimeoutError") on stderr,
    # past the JSON log format, at the moment an operator reads the logs. __del__ calls
    # close(timeout=1) on whatever producer is left: it must find nothing left to flush.
    unraisable: list[str] = []
    hook, sys.unraisablehook = sys.unraisablehook, lambda u: unraisable.append(repr(u))
    try:
        with LocalBroker() as broker:
            topic = ModelTopic(KafkaConnection(broker.bootstrap, bootstrap_timeout_s=2.0),
                               "model", 1_000_000)
            topic.start()
            topic.publish(b"g/a", b"weights", [])
            assert [r.value for r in _received(topic, 1)] == [b"weights"]
            broker.kill()
            topic.publish(b"g/a", None, [])  # the leaving worker's tombstone: undeliverable
            topic.close()
            assert not topic._thread.is_alive()
            gc.collect()  # (collected now, unless something, a log record, still holds it)
            for producer in [o for o in gc.get_objects() if type(o) is KafkaProducer]:
                producer.close(timeout=1)  # what its __del__ will do
    finally:
        sys.unraisablehook = hook
    assert unraisable == []
