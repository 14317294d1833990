"""StreamClient on kafka-python: one group consumer and one acks=all producer."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import kafka.errors as kerr
from kafka import (
    ConsumerRebalanceListener,
    KafkaConsumer,
    KafkaProducer,
    OffsetAndMetadata,
    TopicPartition,
)
from kafka.cluster import ClusterMetadata
from kafka.partitioner.default import DefaultPartitioner, murmur2

from streamer.kafka.admin import leave_during_a_join
from streamer.kafka.client import (
    AUTO_CREATE_TOPICS,
    ConsumerSettings,
    Delivery,
    InputRecord,
    OutputRecord,
    PartitionId,
    PartitionsCallback,
    ProducerSettings,
)
from streamer.kafka.connection import KafkaConnection
from streamer.kafka.errors import (
    BrokerUnavailable,
    KafkaClientError,
    UndecodableBatch,
    convert,
    converted_errors,
    describe,
)

log = logging.getLogger(__name__)


def producer_config(settings: ProducerSettings) -> dict[str, Any]:
    """kafka-python's KafkaProducer keywords for ``settings`` (acks=all always)."""
    return {
        "acks": "all",
        "linger_ms": settings.linger_ms,
        "compression_type": settings.compression_type,
        "max_block_ms": settings.max_block_ms,
        "request_timeout_ms": settings.request_timeout_ms,
        "delivery_timeout_ms": settings.delivery_timeout_ms,
        "batch_size": settings.batch_size_bytes,
        "max_request_size": settings.max_request_bytes,
    }


def close_producer(producer: KafkaProducer, timeout_s: float) -> None:
    """Close, giving pending records ``timeout_s`` to be acknowledged; those still pending
    then are aborted, never sent later. Never raises."""
    try:
        producer.close(timeout=timeout_s)
    except kerr.KafkaTimeoutError:
        # kafka-python 3.0.12's close() raises from its flush() before reaching its own
        # force-close when records are still pending; abort them ourselves (they would
        # otherwise be delivered late, duplicating the batch the worker retries).
        producer._sender.force_close()
        try:
            producer.close(timeout=1.0)
        except kerr.KafkaError as exc:
            log.warning("force-closing the producer failed: %s", describe(exc))
    except kerr.KafkaError as exc:
        log.warning("closing the producer failed: %s", describe(exc))


class _RecordingListener(ConsumerRebalanceListener):
    """Only records rebalance events; the client replays them on the caller's thread.

    kafka-python 3 runs listeners inside its group join, on its IO loop, where a blocking call
    (commit, position) raises; a callback there would act in the middle of kafka-python's own
    bookkeeping. Replaying inside poll_batch keeps every callback on the worker's
    thread, in order, before the records fetched under the new assignment are handed out.
    The price: on_revoke is a notification after the fact, so it must not commit; the worker
    commits only with its checkpoints, and the next owner resumes from the newest of those.
    """

    def __init__(self, assigned_without_topic: Callable[[], bool]) -> None:
        self.events: deque[tuple[str, list[PartitionId]]] = deque()
        self._assigned_without_topic = assigned_without_topic
        # Written on kafka-python's IO thread only. A join since this member last had
        # partitions was assigned without a topic subscribed to (a later join that gives none
        # leaves it so: see _rejoin_for_a_new_topic) ...
        self.joined_without_topic = False
        # ... and a join is under way: from kafka-python's notice before it (a revocation,
        # empty or not, or a loss) to the assignment after it.
        self.joining = False

    def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        self.joining = True
        self.events.append(("revoke", _ids(revoked)))

    def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        self.events.append(("assign", _ids(assigned)))
        self.joining = False
        if assigned:  # (a topic missing from the metadata for a moment then is no matter)
            self.joined_without_topic = False
        elif self._assigned_without_topic():
            self.joined_without_topic = True

    def on_partitions_lost(self, lost: Collection[TopicPartition]) -> None:
        self.joining = True
        self.events.append(("revoke", _ids(lost)))


class _FinishedJoin:
    """A join task that has finished, reading as still in flight (``_keep_a_finished_join``):
    kafka-python awaits it with add_callback/add_errback, which run at once on a done future."""

    is_done = False

    def __init__(self, task: Any) -> None:
        self._task = task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


class _KeyHashCachingPartitioner(DefaultPartitioner):
    """kafka-python's DefaultPartitioner placement, hashing each key once.

    The keys are sensor ids, a bounded set seen over and over, and murmur2 is pure Python
    (about a tenth of the worker thread's time in tests/bench_e2e.py). Same partition for the
    same key and partition count as the Java client and DefaultPartitioner. Only keys of up
    to 256 bytes are cached (a dead-letter record keeps whatever key it came with), at most
    262k of them (~27 MB; default max_sensors is 100k); a full cache starts over.
    """

    def __init__(self, max_keys: int = 1 << 18, max_key_bytes: int = 256) -> None:
        self._hashes: dict[bytes, int] = {}
        self._max_keys, self._max_key_bytes = max_keys, max_key_bytes

    def partition(
        self, topic: str, key: object, serialized_key: bytes | None, value: object,
        serialized_value: bytes | None, cluster: ClusterMetadata,
    ) -> int:
        cacheable = (isinstance(serialized_key, bytes)  # (a bytearray is not hashable)
                     and len(serialized_key) <= self._max_key_bytes)
        partitions = cluster.partitions_for_topic(topic) if cacheable else None
        if not partitions:  # no/long key, or unknown topic (its error): DefaultPartitioner
            return super().partition(topic, key, serialized_key, value, serialized_value,
                                     cluster)
        hashed = self._hashes.get(serialized_key)
        if hashed is None:
            if len(self._hashes) >= self._max_keys:
                self._hashes.clear()
            hashed = self._hashes[serialized_key] = murmur2(serialized_key) & 0x7FFFFFFF
        return sorted(partitions)[hashed % len(partitions)]


def input_record(r: Any) -> InputRecord:
    """A kafka-python ConsumerRecord as an InputRecord; a record of the oldest format (magic
    0) has no timestamp (None), which is -1 here, as the type says."""
    return InputRecord(r.topic, r.partition, r.offset, r.key, r.value,
                       -1 if r.timestamp is None else r.timestamp, list(r.headers or ()))


def _ids(partitions: Collection[TopicPartition]) -> list[PartitionId]:
    return sorted((tp.topic, tp.partition) for tp in partitions)


class KafkaPythonClient:
    """A StreamClient backed by kafka-python; BrokerUnavailable if no broker answers at start."""

    def __init__(
        self,
        connection: KafkaConnection,
        consumer: ConsumerSettings,
        producer: ProducerSettings | None = None,
    ) -> None:
        self._connection = connection
        self._settings = consumer
        self._producer_settings = producer or ProducerSettings()
        self._listener = _RecordingListener(self._assigned_without_topic)
        self._on_assign: PartitionsCallback | None = None
        self._on_revoke: PartitionsCallback | None = None
        self._seeked: set[PartitionId] = set()
        # Partitions this client handed records of since their latest assignment (highwater).
        self._fetched: set[PartitionId] = set()
        self._stalled: dict[PartitionId, UndecodableBatch] = {}
        self._unreachable_since: float | None = None
        self._lock = threading.Lock()  # guards lazy producer (re)creation
        self._consumer = connection.kafka_python(
            KafkaConsumer,
            "connecting the consumer",
            group_id=consumer.group_id,
            enable_auto_commit=False,
            auto_offset_reset=consumer.auto_offset_reset,
            isolation_level=consumer.isolation_level,
            allow_auto_create_topics=AUTO_CREATE_TOPICS,
            session_timeout_ms=consumer.session_timeout_ms,
            heartbeat_interval_ms=consumer.heartbeat_interval_ms,
            fetch_max_wait_ms=consumer.fetch_max_wait_ms,
            max_poll_records=consumer.max_poll_records,
            max_poll_interval_ms=consumer.max_poll_interval_ms,
        )
        self._producer: KafkaProducer | None = None
        try:
            self._producer = self._new_producer()
        except KafkaClientError:
            self._consumer.close(autocommit=False, timeout_ms=0)
            raise

    def subscribe(
        self,
        topics: Collection[str],
        on_assign: PartitionsCallback | None = None,
        on_revoke: PartitionsCallback | None = None,
    ) -> None:
        """Join the group for ``topics``; callbacks run inside ``poll_batch`` on its thread."""
        self._on_assign, self._on_revoke = on_assign, on_revoke
        with converted_errors("subscribing"):
            self._consumer.subscribe(sorted(topics), listener=self._listener)

    def poll_batch(self, max_records: int, timeout_s: float) -> list[InputRecord]:
        """Up to ``max_records`` records; rebalance callbacks run first, on this thread.

        Raises UndecodableBatch (its partition paused at the batch) when a fetched batch cannot
        be decoded; the next poll goes on with the other partitions.
        """
        coordinator = getattr(self._consumer, "_coordinator", None)
        self._keep_a_finished_join(coordinator)
        self._keep_a_begun_join_needed(coordinator)
        try:
            fetched = self._consumer.poll(timeout_ms=int(timeout_s * 1000),
                                          max_records=max_records)
        except Exception as exc:  # decompressors raise their own types, not KafkaError
            raise self._poll_failure(exc) from exc
        self._seeked.clear()
        self._replay_rebalance_events(fetched)
        if self._stalled:  # a rebalance may have handed a stalled partition back
            self._consumer.pause(*(TopicPartition(*tp) for tp in self.stalled()))
        assigned = self._consumer.assignment()
        records = [
            input_record(r)
            for tp, batch in fetched.items()
            # A callback may have moved a partition away or seeked it: those records are stale.
            if tp in assigned and (tp.topic, tp.partition) not in self._seeked
            for r in batch
        ]
        self._check_reachable(got_records=bool(fetched))
        self._rejoin_for_a_new_topic(assigned)
        self._fetched.update((r.topic, r.partition) for r in records)
        return records

    @staticmethod
    def _keep_a_finished_join(coordinator: Any) -> None:
        """kafka-python 3.0.12 starts a new JoinGroup when the one a poll left in flight has
        finished before the next poll (``join_group_async``: ``_join_task.is_done``), its
        assignment never read: a caller busy between polls (a worker stepping the model, any
        loaded machine) joined again and again, never assigned. Shown finished-as-pending, the
        task is awaited by the next poll, which reads its result (or its Kafka error) at once.
        One that failed otherwise is dropped, as kafka-python would: it leaves such a task in
        place, and awaited again it would raise the same error at every poll."""
        task = getattr(coordinator, "_join_task", None)
        if task is None or not task.is_done or isinstance(task, _FinishedJoin):
            return
        failed_otherwise = task.exception is not None and not isinstance(task.exception,
                                                                          kerr.KafkaError)
        coordinator._join_task = None if failed_otherwise else _FinishedJoin(task)

    @staticmethod
    def _keep_a_begun_join_needed(coordinator: Any) -> None:
        """kafka-python 3.0.12 polls a join under way only while ``need_rejoin()``; a group
        leader's join begun for new metadata (a topic made, partitions added) is needed only
        until its own assignment updates the snapshot it compares with, before the broker
        answers that assignment. A poll that returned before that answer left the join
        unread for good: no assignment, no heartbeat (off during a join), the member idle
        and soon out of its group. A join begun (``rejoining``) stays needed until one
        completes (which clears both flags, on kafka-python's IO thread inside a poll; other
        threads only ever set ``rejoin_needed``)."""
        if coordinator is None:
            return
        with coordinator._lock:
            if coordinator.rejoining:
                coordinator.rejoin_needed = True

    def _subscribed_topic_missing(self) -> bool:
        cluster = self._consumer._client.cluster
        return any(cluster.partitions_for_topic(t) is None
                   for t in self._consumer.subscription() or ())

    def _assigned_without_topic(self) -> bool:
        """Whether the join that just ended may have been assigned without a topic subscribed
        to: one missing from the metadata now, or, where this member is the group's leader,
        from the metadata it assigned with (the topic's can come between the two; kafka-python
        keeps it, None on other members, pinned by tests/kafka/test_client.py)."""
        assigned_with = getattr(self._consumer._coordinator, "_assignment_snapshot", None)
        subscribed = self._consumer.subscription() or ()
        return self._subscribed_topic_missing() or (
            assigned_with is not None and any(not assigned_with.get(t) for t in subscribed))

    def _rejoin_for_a_new_topic(self, assigned: Collection[TopicPartition]) -> None:
        """BrokerUnavailable, so that a new consumer joins the group, when this one joined while
        a topic subscribed to did not exist, is still without partitions, the topic exists now,
        and no join is under way. Once the topic's metadata comes, kafka-python's group leader
        joins again by itself; the local broker then answers with the generation it had and
        that generation's empty assignment, leaving the member with none of the topic's
        partitions for good (an input topic created after the worker started was never read).
        Not while that join is under way: the leave request of the closing consumer queued
        behind it on the coordinator's connection, timed out, and the member it left behind
        kept the new consumer's joins waiting for minutes (the topic made 40 s after the start;
        made 3 s after, before the first join ended, this worked). A member that gets no
        partition of a topic that existed at its join (more members than partitions) never
        joins again from here. (The brokers are never asked to create the topic:
        AUTO_CREATE_TOPICS.)"""
        if not self._listener.joining and self._listener.joined_without_topic \
                and not assigned and not self._subscribed_topic_missing():
            raise BrokerUnavailable("the topic subscribed to exists now: joining the group "
                                    "again to be assigned its partitions")

    def send(self, records: Sequence[OutputRecord]) -> Delivery:
        """Start sending; the returned Delivery is waited on with ``wait``."""
        producer = self._current_producer()
        try:
            futures = [
                producer.send(r.topic, key=r.key, value=r.value, headers=list(r.headers))
                for r in records
            ]
        except kerr.KafkaError as exc:
            self._discard_producer()
            raise convert(exc, f"producing {len(records)} records") from exc
        except (TypeError, ValueError) as exc:  # a record kafka-python refuses to serialize
            self._discard_producer()
            raise KafkaClientError(f"producing {len(records)} records failed: {exc!r}") from exc
        return Delivery(futures, producer)

    def wait(self, delivery: Delivery, timeout_s: float) -> None:
        """Return once the broker acknowledged every record of ``delivery``."""
        if not delivery.futures:
            return
        deadline = time.monotonic() + timeout_s
        try:
            if delivery.producer is not self._producer:
                raise kerr.KafkaConnectionError("the producer of this delivery was discarded")
            # No flush(): it would also wait for batches sent after this one (pipelining);
            # linger_ms bounds how long these records sit before they go out.
            for future in delivery.futures:
                future.get(timeout=max(deadline - time.monotonic(), 0.0))
        except kerr.KafkaError as exc:
            # A producer that failed may hold stale state (e.g. a producer id the restarted
            # broker no longer knows): start the next attempt from a fresh one.
            self._discard_producer()
            raise convert(exc, f"producing {len(delivery.futures)} records") from exc

    def commit(self, offsets: Mapping[PartitionId, int], timeout_s: float = 10.0) -> None:
        """Commit synchronously; an offset is the next one to read (last processed + 1)."""
        if not offsets:
            return
        payload = {
            TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
            for (topic, partition), offset in offsets.items()
        }
        with converted_errors("committing offsets"):
            self._consumer.commit(payload, timeout_ms=int(timeout_s * 1000))

    def seek(self, offsets: Mapping[PartitionId, int]) -> None:
        """Read these assigned partitions from these offsets on the next poll."""
        with converted_errors("seeking"):
            for (topic, partition), offset in offsets.items():
                self._consumer.seek(TopicPartition(topic, partition), offset)
        self._seeked.update(offsets)

    def assignment(self) -> set[PartitionId]:
        """Partitions currently assigned to this member."""
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def highwater(self, partition: PartitionId) -> int | None:
        """The partition's end offset from the last fetch response; None before any fetch.

        Exact on every broker (unlike end_offsets(), which Tansu answers with the last batch's
        base offset + 1), but only as fresh as the last fetch.
        """
        if partition not in self._fetched:  # see StreamClient.highwater
            return None
        try:
            return self._consumer.highwater(TopicPartition(*partition))
        except kerr.IllegalStateError:  # taken away by a join whose events are not replayed
            return None  # yet (kafka-python raises for a partition it does not hold)

    def lag(self) -> dict[PartitionId, int]:
        """highwater - position per assigned partition that has been fetched from.

        end_offsets() is avoided on purpose: some brokers (Tansu) answer it wrongly, while the
        highwater mark comes back with every fetch response.
        """
        lags = {}
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = self._consumer.position(tp, timeout_ms=0)
            except kerr.KafkaError:
                continue
            if position is not None:
                lags[(tp.topic, tp.partition)] = max(highwater - position, 0)
        return lags

    def stalled(self) -> dict[PartitionId, UndecodableBatch]:
        """Assigned partitions held at a batch that could not be decoded, with the error.

        A stalled partition stays paused for this client's lifetime: kafka-python keeps the
        failed batch parked and would spin on it if resumed. A new client (a restart or a
        reconnect) reads the batch again.
        """
        assigned = self.assignment()
        return {tp: error for tp, error in self._stalled.items() if tp in assigned}

    def close(self, timeout_s: float = 5.0) -> None:
        """Leave the group and release connections; never raises."""
        self._discard_producer(timeout_s)
        self._leave_during_a_join(timeout_s)
        try:
            self._consumer.close(autocommit=False, timeout_ms=int(timeout_s * 1000))
        except Exception as exc:  # noqa: BLE001 - never raises: the library's own errors too
            log.warning("closing the consumer failed: %s", describe(exc))

    def _leave_during_a_join(self, timeout_s: float) -> None:
        """Leave the group through an admin client while a join is under way: kafka-python's
        own leave request would wait behind the join the broker holds (~23 s on the local
        broker: see admin.remove_member), time out after 5 s with an ERROR, and leave the
        member in the group. The member's generation is then reset, so that kafka-python's
        close sends no second request. Reads two fields of kafka-python 3's consumer
        (pinned by tests/kafka/test_client.py). Never raises."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        generation = getattr(coordinator, "_generation", None)
        if (coordinator is None or generation is None or not coordinator.rebalance_in_progress()
                or not generation.has_member_id() or coordinator.coordinator_unknown()):
            return  # (the last: kafka-python's own condition, no coordinator to answer)
        if leave_during_a_join(self._connection, self._settings.group_id,
                               generation.member_id, timeout_s):
            coordinator.reset_generation()

    def _replay_rebalance_events(self, fetched: Mapping[TopicPartition, Any]) -> None:
        events = self._listener.events
        try:
            while events:
                kind, partitions = events.popleft()
                if kind == "assign":
                    self._fetched.difference_update(partitions)
                callback = self._on_assign if kind == "assign" else self._on_revoke
                # kafka-python reports an empty revocation on the first join: not an event.
                # An empty assignment is one: the join ended with nothing for this member.
                if callback is not None and (partitions or kind == "assign"):
                    callback(partitions)
        except BaseException:
            # The records were taken from the consumer's position already: rewind so a retry
            # of poll_batch hands them out again rather than skipping them.
            for tp, batch in fetched.items():
                if batch and tp in self._consumer.assignment():
                    self._consumer.seek(tp, batch[0].offset)
            raise

    def _poll_failure(self, exc: Exception) -> KafkaClientError:
        """The project's error for a failed poll; an undecodable batch stalls its partition."""
        decoding = (not isinstance(exc, kerr.KafkaError)
                    or isinstance(exc, (kerr.UnsupportedCodecError, kerr.CorruptRecordError)))
        where = self._failed_batch() if decoding else None
        if where is None:
            if isinstance(exc, kerr.KafkaError):
                return convert(exc, "polling")
            return KafkaClientError(f"polling failed: {describe(exc)}")
        tp, offset = where
        error = UndecodableBatch((tp.topic, tp.partition), offset, describe(exc))
        # Pause, then seek: kafka-python parks the failed batch of a paused partition and
        # fetches the others; without both its next poll spins on the failed batch forever.
        self._consumer.pause(tp)
        self._consumer.seek(tp, offset)
        self._stalled[(tp.topic, tp.partition)] = error
        return error

    def _failed_batch(self) -> tuple[TopicPartition, int] | None:
        """Partition and offset of the batch whose decoding just failed, if known.

        kafka-python's exception does not say; its fetcher still holds the records it was
        unpacking (pinned by tests/kafka/test_client.py for the kafka-python 3 we depend on).
        """
        fetcher = getattr(self._consumer, "_fetcher", None)
        records = getattr(fetcher, "_next_partition_records", None)
        tp = getattr(records, "topic_partition", None)
        offset = getattr(records, "next_fetch_offset", None)
        # A drained (falsy) PartitionRecords is an earlier, healthy batch: not the culprit.
        if (not records or tp is None or not isinstance(offset, int)
                or tp not in self._consumer.assignment()):
            return None
        return tp, offset

    def _check_reachable(self, got_records: bool) -> None:
        # kafka-python keeps reconnecting in the background and poll() just returns nothing,
        # so "no connection at all for a while" is the only sign that the broker is gone.
        if got_records or self._consumer.metrics().get("consumer-metrics", {}).get(
                "connection-count", 1.0) > 0:  # metrics() builds every metric: only when idle
            self._unreachable_since = None
            return
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
        down_for = now - self._unreachable_since
        if down_for >= self._settings.unreachable_after_s:
            raise BrokerUnavailable(
                f"no connection to {self._connection.bootstrap_servers} for {down_for:.1f} s"
            )

    def _new_producer(self) -> KafkaProducer:
        return self._connection.kafka_python(
            KafkaProducer, "connecting the producer", **producer_config(self._producer_settings),
            partitioner=_KeyHashCachingPartitioner(), allow_auto_create_topics=AUTO_CREATE_TOPICS)

    def _current_producer(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                self._producer = self._new_producer()
            return self._producer

    def _discard_producer(self, timeout_s: float = 0.0) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            close_producer(producer, timeout_s)
