"""Input no producer of ours would write: other clients, codecs, undecodable batches."""

from __future__ import annotations

import hashlib
import json
import math
import signal
import time

import pytest

from streamer.kafka.admin import ensure_topics
from streamer.kafka.broker import LocalBroker
from streamer.serving.codec import (
    CUT_KEEP_BYTES,
    DLQ_CUT,
    DLQ_ORIGINAL_SHA256,
    DLQ_ORIGINAL_SIZE,
    DLQ_REASON,
    DLQ_SOURCE_OFFSET,
)
from tests.hostile_records import (
    CODECS,
    produce_undecodable,
    produce_with_header_key,
    produce_with_librdkafka,
)
from tests.serving.conftest import consume_from, forecasts_by_source, reading, wait_for

pytestmark = pytest.mark.broker


def _partitioned_stream(partitions: int, steps: int, t0: float = 1.7e9) -> list[tuple]:
    """Readings of sensor ``p<i>`` sent to partition i, as (key, value, headers, partition)."""
    return [(*reading(f"p{p}", t0 + 60.0 * t, math.sin(t / 3 + p)), None, p)
            for t in range(steps) for p in range(partitions)]


@pytest.mark.parametrize("codec", CODECS)
def test_readings_compressed_by_librdkafka_with_each_codec_are_all_forecast(
        codec, broker, topic_factory, group_id, worker_factory, consume_raw):
    inp, out, dlq = topic_factory(2), topic_factory(2), topic_factory(1)
    worker = worker_factory(inp, out, dlq, group_id,
                            STREAMER_KAFKA__COMPRESSION_TYPE=codec).start()
    worker.wait_ready()

    placed = produce_with_librdkafka(broker.bootstrap, inp, _partitioned_stream(2, 30),
                                     compression=codec)

    got = forecasts_by_source(consume_raw(out, len(placed), timeout_s=30))
    assert sorted(got) == sorted(placed), worker.log()
    assert all(len(forecasts) == 1 for forecasts in got.values())
    assert worker.metric("streamer_undecodable_batches_total", required=True) == 0


def test_readings_without_ts_are_forecast_at_their_records_timestamps(
        broker, topic_factory, group_id, worker_factory, consume_raw):
    # Producers that leave the time to Kafka (as Kafka Streams and Flink read it by default):
    # the record's timestamp, in milliseconds, stands in for the body's ts.
    inp, out, dlq = topic_factory(1), topic_factory(1), topic_factory(1)
    worker = worker_factory(inp, out, dlq, group_id).start()
    worker.wait_ready()
    stamps_ms = [1_765_000_000_000 + 60_000 * t + 7 for t in range(20)]
    records = [(b"s1", json.dumps({"value": math.sin(t)}).encode(), None, 0, stamp)
               for t, stamp in enumerate(stamps_ms)]
    placed = produce_with_librdkafka(broker.bootstrap, inp, records)
    got = consume_raw(out, len(placed), timeout_s=30)
    assert [json.loads(r.value)["ts"] for r in got] == [s / 1000 for s in stamps_ms], worker.log()


def test_readings_of_a_transaction_are_forecast_once_it_commits_not_while_it_is_open(
        broker, topic_factory, group_id, worker_factory, consume_raw):
    # kafka-python read a transactional producer's records before their transaction ended:
    # readings a Flink or Kafka Streams job aborts and sends again were forecast twice.
    # (Aborted ones are left out by the clients from the brokers' list of aborted
    # transactions, which Apache Kafka sends with each fetch and the local broker does not.)
    from confluent_kafka import Producer

    inp, out, dlq = topic_factory(1), topic_factory(1), topic_factory(1)
    worker = worker_factory(inp, out, dlq, group_id).start()
    worker.wait_ready()
    producer = Producer({"bootstrap.servers": broker.bootstrap, "transactional.id": inp})
    producer.init_transactions(10)
    stream = [reading(f"s{i % 3}", 1.7e9 + 60.0 * i, math.sin(i / 3)) for i in range(12)]

    def write(records) -> None:
        producer.begin_transaction()
        for key, value in records:
            producer.produce(inp, key=key, value=value)
        producer.flush(10)

    write(stream[:8])
    producer.commit_transaction(10)
    write(stream[8:])  # flushed to the log, its transaction open
    committed = consume_raw(out, 8, timeout_s=30)
    assert len(committed) == 8, worker.log()
    assert len(consume_raw(out, 9, timeout_s=3)) == 8  # the open transaction is not served

    producer.commit_transaction(10)
    got = forecasts_by_source(consume_raw(out, 12, timeout_s=30))
    assert len(got) == 12 and all(len(f) == 1 for f in got.values()), worker.log()
    assert sorted(f[0]["_key"] for f in got.values()) == sorted(k.decode() for k, _ in stream)


def test_undecodable_batch_holds_its_partition_not_ready_while_the_others_are_served(
        broker, topic_factory, group_id, worker_factory, consume_raw):
    inp, out, dlq = topic_factory(2), topic_factory(2), topic_factory(1)
    worker = worker_factory(inp, out, dlq, group_id).start()
    worker.wait_ready()
    stream = _partitioned_stream(2, 20)
    before = produce_with_librdkafka(broker.bootstrap, inp, stream[:20])
    bad_offset = produce_undecodable(broker.bootstrap, inp, partition=0)
    after = produce_with_librdkafka(broker.bootstrap, inp, stream[20:])

    expected = before + [placed for placed in after if placed[0] == 1]
    got = forecasts_by_source(consume_raw(out, len(after) + len(before), timeout_s=15))
    assert sorted(got) == sorted(expected), worker.log()

    where = f"{inp}[0] at offset {bad_offset}"
    wait_for(lambda: worker.get("/readyz")[0] == 503, 10, "not ready", worker.log)
    status, body = worker.get("/readyz")
    assert where in body and "decompress" in body.lower()  # either client's wording
    assert worker.get("/healthz")[0] == 200  # alive: a restart would not help
    assert worker.metric("streamer_undecodable_batches_total") >= 1
    assert worker.metric("streamer_stalled_partitions") == 1
    assert worker.metric("streamer_ready", required=True) == 0
    assert f"ERROR streamer.worker: cannot decode the record batch of partition {where}" \
        in worker.log()
    assert worker.proc.poll() is None


def test_tombstone_is_dead_lettered_as_null_and_input_headers_are_kept(
        broker, topic_factory, group_id, worker_factory, consume_raw):
    inp, out, dlq = topic_factory(1), topic_factory(1), topic_factory(1)
    worker = worker_factory(inp, out, dlq, group_id).start()
    worker.wait_ready()
    produce_with_librdkafka(broker.bootstrap, inp, [
        (b"s", None, [("trace", b"t-9"), ("empty", b"")]),
        (b"s", b"{broken", [("trace", b"t-10")]),
    ])

    produce_with_librdkafka(broker.bootstrap, inp, [
        (None, None, [("null", None)]),  # neither key nor value; a header with no value
        (*reading("s", 1.7e9, 1.0), None),
    ])
    tombstone, broken, keyless = sorted(consume_raw(dlq, 3, timeout_s=20),
                                        key=lambda r: r.offset)
    assert (keyless.key, keyless.value, keyless.headers[0]) == (b"", None, ("null", b""))
    assert len(consume_raw(out, 1, timeout_s=10)) == 1 and worker.proc.poll() is None
    assert tombstone.value is None and tombstone.key == b"s"
    assert tombstone.headers[:2] == [("trace", b"t-9"), ("empty", b"")]
    assert dict(tombstone.headers)[DLQ_REASON] == b"not_json"
    assert broken.value == b"{broken" and broken.headers[0] == ("trace", b"t-10")
    assert DLQ_CUT not in dict(broken.headers)


def test_a_record_whose_header_key_is_not_utf8_is_dead_lettered_and_its_batch_forecast(
        broker, topic_factory, group_id, worker_factory, consume_raw, client_kind):
    inp, out, dlq = topic_factory(1), topic_factory(1), topic_factory(1)
    worker = worker_factory(inp, out, dlq, group_id).start()
    worker.wait_ready()
    values = [reading("s1", 1.7e9 + 60.0 * t, float(t))[1] for t in range(3)]
    values[1] = b"{broken"
    first = produce_with_header_key(broker.bootstrap, inp, 0, b"\xffid", values, bad=1)

    got = forecasts_by_source(consume_raw(out, 2, timeout_s=20))
    assert sorted(got) == [(0, first), (0, first + 2)], worker.log()
    (dead,) = consume_raw(dlq, 1, timeout_s=10)
    # The headers as the client could read them (the librdkafka client: none at all).
    kept = [("é", b"1"), ("?id", b"v")] if client_kind == "kafka-python" else []
    assert dead.value == b"{broken" and dead.headers[:len(kept) + 1] == [
        *kept, (DLQ_REASON, b"not_json")]
    assert worker.metric("streamer_stalled_partitions", required=True) == 0
    assert worker.get("/readyz")[0] == 200


@pytest.mark.parametrize("size", [1_100_000, 1_048_400])
def test_oversized_record_is_dead_lettered_cut_and_the_readings_around_it_are_forecast(
        size, broker, topic_factory, group_id, worker_factory, consume_raw):
    inp, out, dlq = topic_factory(1), topic_factory(1), topic_factory(1)
    worker = worker_factory(inp, out, dlq, group_id).start()
    worker.wait_ready()
    huge = b"x" * size  # not JSON; a default Apache Kafka broker accepts it
    stream = [(*reading("s", 1.7e9 + 60.0 * t, float(t)), [("trace", b"t-1")])
              for t in range(11)]
    stream[5] = (b"s", huge, [("trace", b"t-1")])
    placed = produce_with_librdkafka(broker.bootstrap, inp, stream,
                                     **{"message.max.bytes": 2_000_000})

    got = forecasts_by_source(consume_raw(out, 10, timeout_s=20))
    assert sorted(got) == [placed[i] for i in range(11) if i != 5], worker.log()
    (dead,) = consume_raw(dlq, 1, timeout_s=10)
    headers = dict(dead.headers)
    assert dead.key == b"s" and dead.value == huge[:CUT_KEEP_BYTES]
    assert headers["trace"] == b"t-1"
    assert headers[DLQ_REASON] == b"not_json"
    assert headers[DLQ_SOURCE_OFFSET] == b"5"
    assert headers[DLQ_CUT] == b"value"
    assert headers[DLQ_ORIGINAL_SIZE.format("value")] == str(size).encode()
    assert headers[DLQ_ORIGINAL_SHA256.format("value")] == hashlib.sha256(huge).hexdigest().encode()

    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    assert _committed(broker.bootstrap, group_id, inp) == 11  # everything was delivered


def test_a_broker_that_stops_answering_mid_stream_costs_no_forecast(
        tmp_path, worker_factory, group_id):
    with LocalBroker(log_path=tmp_path / "own-broker.log") as own:
        ensure_topics(own.bootstrap, {"in-f": 2, "out-f": 2, "dlq-f": 1})
        stream = [(*reading(f"s{s}", 1.7e9 + 60.0 * t, math.sin(t / 3 + s)), None, s % 2)
                  for t in range(300) for s in range(50)]
        placed = produce_with_librdkafka(own.bootstrap, "in-f", stream)
        worker = worker_factory("in-f", "out-f", "dlq-f", group_id,
                                STREAMER_KAFKA__BOOTSTRAP_SERVERS=own.bootstrap,
                                STREAMER_KAFKA__PRODUCE_TIMEOUT_S="1.5").start()
        wait_for(lambda: worker.metric("streamer_forecasts_produced_total") >= 1000, 30,
                 "forecasts before the freeze", worker.log)
        own.freeze()  # the worker is draining a backlog: its batches in flight cannot be acked
        time.sleep(4)
        own.thaw()

        got: dict = {}
        deadline = time.monotonic() + 60
        while set(got) != set(placed) and time.monotonic() < deadline:
            # At least once: re-sent batches may repeat forecasts, so read past len(stream).
            got = forecasts_by_source(consume_from(own.bootstrap, "out-f", 2 * len(stream),
                                                   timeout_s=3))
        assert sorted(got) == sorted(placed), worker.log()
        assert "broker trouble" in worker.log() and worker.proc.poll() is None


def _committed(bootstrap: str, group: str, topic: str) -> int:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                             enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(topic, 0)) or 0
    finally:
        consumer.close(autocommit=False)

