"""The model topic: one small, compacted, single-partition topic every worker reads whole.

Workers of one consumer group share what they learn through it (serving/sharing.py), the way
Kafka Streams' global tables work: each worker reads the topic with its own consumer outside
the group (``assign``, never ``subscribe``: it takes no part in the input's rebalances) and
publishes its weights under its worker id. All Kafka I/O runs in one background thread, so
the serving loop never waits on it: it hands over records to publish and takes the records
read so far.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import MessageSizeTooLargeError

from streamer.kafka.admin import ensure_topics
from streamer.kafka.client import AUTO_CREATE_TOPICS, LOG_ENDED_AFTER_S, ProducerSettings
from streamer.kafka.connection import KafkaConnection
from streamer.kafka.errors import describe
from streamer.kafka.kafka_python_client import close_producer

log = logging.getLogger(__name__)
# The newest record per worker is what counts: compacted, and segments rolled hourly so that
# compaction can act (the active segment is never compacted).
TOPIC_CONFIG = {"cleanup.policy": "compact", "segment.ms": "3600000"}
POLL_S = 0.2
BACKOFF_START_S, BACKOFF_MAX_S = 1.0, 30.0
CLOSE_TIMEOUT_S = 5.0


class LogEnded(Exception):
    """The model topic now ends before where we read: read its new log from the start."""


@dataclass(frozen=True)
class ModelRecord:
    key: bytes | None
    value: bytes | None  # None: a tombstone (a worker that left)
    headers: list[tuple[str, bytes]]
    timestamp_s: float  # when it was published (the record's create time: the peer's clock)
    offset: int | None = None  # its position on the topic (None: a transport that keeps order)
    # Our wall clock when it arrived, for a record read live (at or past the topic's end when
    # this reader (re)connected); None for history, whose age only its create time can tell.
    arrived_s: float | None = None
    # Which log of the topic its offset is on: one more each time the reader found the topic
    # ending before where it had read (made again, or the brokers lost it), whose offsets
    # start again from 0. Offsets order records of the same log only.
    log: int = 0


class ModelTopic:
    """Publish to and read the model topic from a background thread."""

    def __init__(self, connection: KafkaConnection, topic: str, max_message_bytes: int):
        self.connection, self.topic, self.max_message_bytes = connection, topic, max_message_bytes
        # Newest record per key, oldest key first; a record leaves only once acknowledged.
        self._outbox: dict[bytes, tuple[bytes | None, list[tuple[str, bytes]]]] = {}
        self._outbox_lock = threading.Lock()
        self._next_offset: int | None = None  # where a reconnect reads on from
        self._log = 0  # ModelRecord.log of the records read now
        # The newest record read per key, not yet taken, in topic order: a worker starting
        # on an hour of uncompacted history (every publish of every worker) holds one record
        # per worker, not all of them.
        self._inbox: dict[bytes | None, ModelRecord] = {}
        self._inbox_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-topic", daemon=True)
        self._failures = 0  # read by the serving thread (an int: no lock needed)
        self.published = 0  # records acknowledged by the broker
        self.weights_published = 0  # of which weights (not tombstones)
        # Every record written before this connection started reading has been handed over
        # (set after the last of them joined the inbox; cleared at each (re)connect).
        self.caught_up = False

    @property
    def failures(self) -> int:
        """Kafka errors so far (each followed by a reconnect after a backoff)."""
        return self._failures

    def start(self) -> None:
        self._thread.start()

    def publish(self, key: bytes, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        """Queue a record to publish (sent by the background thread, retried on failure; a
        newer record for the same key replaces one not yet sent)."""
        with self._outbox_lock:
            self._outbox.pop(key, None)
            self._outbox[key] = (value, headers)

    def received(self) -> list[ModelRecord]:
        """The records read since the last call, in topic order, the newest of each key only
        (an older one of the same key is superseded: the board would skip it)."""
        with self._inbox_lock:
            out, self._inbox = list(self._inbox.values()), {}
        return out

    def close(self) -> None:
        """Send what is queued (a leaving worker's tombstone), then stop."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(CLOSE_TIMEOUT_S + 5.0)

    # -- the background thread ---------------------------------------------------------------
    def _run(self) -> None:
        backoff = BACKOFF_START_S
        created = False
        while not self._stop.is_set():
            consumer = producer = None
            try:
                if not created:
                    ensure_topics(self.connection, {self.topic: 1}, configs={
                        **TOPIC_CONFIG, "max.message.bytes": str(self.max_message_bytes)})
                    created = True
                # auto_offset_reset "none": a position past the log's end (the topic was made
                # again, or the brokers lost it) is an error, so that we reconnect and read the
                # new log from its start, instead of kafka-python's reset to its end, which
                # skipped what peers wrote to it meanwhile.
                consumer = self.connection.kafka_python(
                    KafkaConsumer, "connecting the model topic's consumer", group_id=None,
                    enable_auto_commit=False, auto_offset_reset="none",
                    allow_auto_create_topics=AUTO_CREATE_TOPICS,
                    fetch_max_wait_ms=int(POLL_S * 1000),
                    max_partition_fetch_bytes=self.max_message_bytes * 2)
                partition = TopicPartition(self.topic, 0)
                consumer.assign([partition])
                # Below this offset is history (written before we were reading): its age can
                # only come from its create time; records from here on arrive live, and are
                # stamped with our clock as they do.
                live_from = consumer.end_offsets([partition])[partition]
                if self._next_offset is None or live_from < self._next_offset:
                    # (a topic that ends before where we were: made again, or the brokers lost
                    # it; read from its start, not from "latest" past what peers wrote since)
                    consumer.seek_to_beginning(partition)
                    if self._next_offset is not None:
                        self._log += 1
                else:  # a reconnect: read on, not the whole history again
                    start = consumer.beginning_offsets([partition])[partition]
                    consumer.seek(partition, max(self._next_offset, start))
                self.caught_up = False
                # max_block_ms: a topic the brokers lost held a send 60 s (kafka-python's
                # default) waiting for its metadata before the reconnect that makes it again.
                producer = self.connection.kafka_python(
                    KafkaProducer, "connecting the model topic's producer", acks="all",
                    linger_ms=0, allow_auto_create_topics=AUTO_CREATE_TOPICS,
                    max_request_size=self.max_message_bytes,
                    max_block_ms=ProducerSettings.max_block_ms)
                self._serve(consumer, producer, partition, live_from)
                return
            except Exception as exc:  # noqa: BLE001 - any Kafka trouble: count, wait, reconnect
                self._failures += 1
                created = False  # checked again on reconnecting: the brokers may have lost it
                log.warning("model topic %s: %s; retrying in %.0f s", self.topic,
                            describe(exc), backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            finally:
                for client in (consumer, producer):
                    if client is not None:
                        _close_quietly(client)

    def _serve(self, consumer: KafkaConsumer, producer: KafkaProducer,
               partition: TopicPartition, live_from: int) -> None:
        behind_since: float | None = None  # monotonic: since when the log ends before us
        while True:
            stopping = self._stop.is_set()
            with self._outbox_lock:
                queued = list(self._outbox.items())
            for key, (value, headers) in queued:
                try:
                    producer.send(self.topic, key=key, value=value, headers=headers,
                                  partition=0).get(timeout=CLOSE_TIMEOUT_S if stopping else 30.0)
                    self.published += 1
                    self.weights_published += value is not None
                except MessageSizeTooLargeError as exc:  # never fits: drop it, say so
                    log.error("model topic %s: a record of %s does not fit (%s); not sent",
                              self.topic, key, exc)
                    self._failures += 1
                with self._outbox_lock:  # acknowledged (or dropped): gone, unless replaced
                    if self._outbox.get(key) == (value, headers):
                        del self._outbox[key]
            if stopping:
                return
            for batch in consumer.poll(timeout_ms=int(POLL_S * 1000)).values():
                now = time.time()
                with self._inbox_lock:
                    for r in batch:
                        self._inbox.pop(r.key, None)  # to the end: topic order
                        self._inbox[r.key] = ModelRecord(
                            r.key, r.value, list(r.headers or []), r.timestamp / 1000.0,
                            r.offset, now if r.offset >= live_from else None, self._log)
                self._next_offset = batch[-1].offset + 1
            position = consumer.position(partition)
            end = consumer.highwater(partition)  # as of the last fetch; None before one
            # Brokers that answer an empty fetch there: the log ends before us. For a while
            # only, that is a new leader's high watermark catching up (a failover), not a
            # new log: read again from the start, it would be taken for one.
            if end is None or end >= position:
                behind_since = None
            elif behind_since is None:
                behind_since = time.monotonic()
            elif time.monotonic() - behind_since >= LOG_ENDED_AFTER_S:
                raise LogEnded(f"the topic ends at offset {end}, before ours ({position}): "
                               "made again, or the brokers lost it")
            if not self.caught_up and position >= live_from:
                self.caught_up = True


def _close_quietly(client) -> None:
    try:
        if isinstance(client, KafkaProducer):  # (a plain close() left a record pending in a
            close_producer(client, timeout_s=1.0)  # broker outage to raise from __del__)
        else:
            client.close()
    except Exception:  # noqa: BLE001 - closing after an error: nothing more to do
        pass

