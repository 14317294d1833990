"""Records our own client would never write: undecodable batches, every codec from librdkafka."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from kafka import KafkaProducer
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.util import calc_crc32c

CODECS = ("gzip", "snappy", "lz4", "zstd")


@contextmanager
def _garbled_payloads() -> Iterator[None]:
    """While open, kafka-python writes batches whose compressed payload is garbage.

    The CRC is computed over the garbage, so the broker stores the batch as valid (Tansu and
    Apache Kafka do not decompress what a producer sends) and only a consumer finds it cannot
    be decompressed: what a buggy or hostile producer, or a broken codec, leaves in a log.
    """
    build = DefaultRecordBatchBuilder.build

    def garbled(self: DefaultRecordBatchBuilder) -> bytearray:
        buf = build(self)
        for i in range(DefaultRecordBatchBuilder.HEADER_STRUCT.size + 4, len(buf)):
            buf[i] ^= 0x5A
        crc = calc_crc32c(memoryview(buf)[DefaultRecordBatchBuilder.ATTRIBUTES_OFFSET:])
        struct.pack_into(">I", buf, DefaultRecordBatchBuilder.CRC_OFFSET, crc)
        return buf

    DefaultRecordBatchBuilder.build = garbled
    try:
        yield
    finally:
        DefaultRecordBatchBuilder.build = build


def produce_undecodable(bootstrap: str, topic: str, partition: int, n: int = 3) -> int:
    """Write one gzip batch of ``n`` records that no consumer can decompress; its offset."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", compression_type="gzip",
                             linger_ms=50)
    try:
        with _garbled_payloads():
            futures = [producer.send(topic, key=b"k", value=b'{"ts": 1, "value": 1}',
                                     partition=partition) for _ in range(n)]
            producer.flush(10)
            offsets = [f.get(timeout=10).offset for f in futures]
    finally:
        producer.close(timeout=2)
    assert offsets == list(range(offsets[0], offsets[0] + n)), "expected one batch"
    return offsets[0]


class _RawHeaderKey(str):
    """A header key that kafka-python's producer writes as these bytes, whatever they are."""

    def __new__(cls, raw: bytes) -> _RawHeaderKey:
        key = super().__new__(cls, raw.decode("latin-1"))
        key.raw = raw
        return key

    def encode(self, *_: object, **__: object) -> bytes:
        return self.raw


def raw_header_key(raw: bytes) -> str:
    """A header key that kafka-python writes as ``raw``, UTF-8 or not."""
    return _RawHeaderKey(raw)


def produce_with_header_key(bootstrap: str, topic: str, partition: int, raw_key: bytes,
                            values: Sequence[bytes], bad: int, compression_type: str | None = None
                            ) -> int:
    """Write ``values`` (key ``s1``) as one batch, each with a header ``h``, and record ``bad``
    with a header ``é`` and then one whose key is ``raw_key`` (the Kafka protocol says UTF-8;
    librdkafka and Go producers write any bytes); the batch's first offset."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=50,
                             compression_type=compression_type)
    try:
        futures = [producer.send(topic, key=b"s1", value=value, partition=partition,
                                 headers=([("é", b"1"), (raw_header_key(raw_key), b"v")]
                                          if i == bad else [("h", b"v")]))
                   for i, value in enumerate(values)]
        producer.flush(10)
        offsets = [f.get(timeout=10).offset for f in futures]
    finally:
        producer.close(timeout=2)
    # One produce request's batch: every record's future hangs off the same one.
    assert len({id(f._produce_future) for f in futures}) == 1, "expected one batch"
    return offsets[0]


def produce_with_librdkafka(
    bootstrap: str, topic: str, records: Sequence[tuple], compression: str = "none",
    **config: object,
) -> list[tuple[int, int]]:
    """Produce ``(key, value[, headers[, partition[, timestamp_ms]]])`` with confluent-kafka;
    (partition, offset) of each (a partition or timestamp of None: the producer's choice).

    A second client, so tests see what producers other than kafka-python write.
    """
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "compression.type": compression,
                         "linger.ms": 20, "acks": "all", **config})
    placed: list[tuple[int, int] | None] = [None] * len(records)
    errors: list[str] = []

    def report(i: int):
        def on_delivery(err, msg) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                placed[i] = (msg.partition(), msg.offset())
        return on_delivery

    for i, record in enumerate(records):
        key, value = record[0], record[1]
        headers = record[2] if len(record) > 2 else None
        extra = {name: given for name, given in zip(("partition", "timestamp"), record[3:])
                 if given is not None}
        producer.produce(topic, key=key, value=value, headers=headers, on_delivery=report(i),
                         **extra)
        producer.poll(0)
    remaining = producer.flush(15)
    assert remaining == 0 and not errors, f"librdkafka could not deliver: {errors[:3]}"
    return [p for p in placed if p is not None]
