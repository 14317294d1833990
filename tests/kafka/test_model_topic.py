"""The model topic's reader on the real local broker: history, and when live records arrived."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaProducer

from streamer.kafka.model_topic import ModelRecord, ModelTopic

pytestmark = pytest.mark.broker


def _send(bootstrap: str, topic: str, key: bytes, timestamp_ms: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    producer.send(topic, key=key, value=b"v", partition=0, timestamp_ms=timestamp_ms).get(10)
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
        sent = time.time()
        _send(broker.bootstrap, topic, b"g/late", behind_ms)
        late = _received(reader, 1)
        assert [(r.key, r.offset) for r in late] == [(b"g/late", 1)]
        assert sent <= late[0].arrived_s <= time.time()  # stamped on our clock as it arrived
        assert late[0].timestamp_s == pytest.approx(behind_ms / 1000)  # the peer's clock, kept
    finally:
        reader.close()
