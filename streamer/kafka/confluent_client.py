"""StreamClient on confluent-kafka (librdkafka): the same contract as kafka_python_client.py.

librdkafka fetches, decompresses and batches in C threads; Python sees one call per poll
(``consume(num_messages)``) and one per produced record, where kafka-python runs its protocol,
record parsing and CRC checks per record in Python. Differences the contract hides:

* rebalance callbacks run inside ``consume`` on the caller's thread, before records of the new
  assignment are returned; a ``seek`` asked for inside ``on_assign`` becomes the assignment's
  starting offset (librdkafka cannot seek a partition before it is assigned);
* a batch librdkafka cannot decode comes back as an error message for its partition: the
  partition is paused there (``UndecodableBatch``), the others go on;
* "no broker at all for a while" is reported by librdkafka's error callback (all brokers
  down); ``poll_batch`` raises BrokerUnavailable once that lasted ``unreachable_after_s`` and
  a metadata request still fails.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

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
    CERTIFICATE_NOT_VERIFIED,
    AuthenticationFailed,
    BrokerNotTrusted,
    BrokerUnavailable,
    CommitFailed,
    KafkaClientError,
    UndecodableBatch,
    describe,
    got_no_answer,
    listener_hint,
)

log = logging.getLogger(__name__)
_HEADERS = operator.methodcaller("headers")

# Commit errors that mean our group generation is stale (the partitions may be another's).
_MEMBERSHIP = {KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
               KafkaError.UNKNOWN_MEMBER_ID, KafkaError._ASSIGNMENT_LOST}
# Per-partition errors meaning the fetched bytes cannot be turned into records.
_UNDECODABLE = {KafkaError._BAD_MSG, KafkaError._BAD_COMPRESSION, KafkaError.INVALID_MSG,
                KafkaError.INVALID_RECORD, KafkaError.UNSUPPORTED_COMPRESSION_TYPE}
# The end of a partition: an event, not a failure (and not enabled).
_NOT_FAILURES = {KafkaError._PARTITION_EOF}
# A subscribed topic that does not exist (yet, or any more), which librdkafka reports on the
# topic's partition 0 whether or not it is assigned. For a partition not held it is no failure:
# librdkafka assigns the topic's partitions once it exists, as kafka-python waits without a
# word; taken for broker trouble, it made the worker rejoin its group every few seconds. For a
# partition held it is (a topic deleted under the worker): reconnecting looks it up afresh.
_TOPIC_MISSING = {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC}
# How soon an input topic created after the worker started is read, and partitions added to
# one are: librdkafka looks a missing subscribed topic up again only at this refresh (5
# minutes by default; kafka-python within seconds).
METADATA_REFRESH_MS = 10_000


def convert(exc: KafkaException | KafkaError, action: str) -> KafkaClientError:
    """The project's exception for a librdkafka error raised while doing ``action``."""
    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else exc
    message = f"{action} failed: {error}"
    if not isinstance(error, KafkaError):
        return KafkaClientError(message)
    if error.code() in _MEMBERSHIP:
        return CommitFailed(message)
    if error.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED,
                        KafkaError.UNSUPPORTED_SASL_MECHANISM):
        return AuthenticationFailed(message)
    if error.retriable() or error.code() in (KafkaError._TRANSPORT, KafkaError._TIMED_OUT,
                                              KafkaError._ALL_BROKERS_DOWN,
                                              KafkaError._MSG_TIMED_OUT,
                                              KafkaError._WAIT_COORD):
        return BrokerUnavailable(message)
    return KafkaClientError(message)


@dataclass
class _Acks:
    """Delivery reports of one ``send``: how many are pending, the first failure."""

    total: int
    pending: int
    error: KafkaError | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self, error: KafkaError | None, _message: Any) -> None:
        with self.lock:
            self.pending -= 1
            if error is not None and self.error is None:
                self.error = error


class _LibrdkafkaLog:
    """Where a client's librdkafka log lines go (its ``logger`` setting, called as
    ``log(level, format, facility, client name, line)``): the connection's logger, and each
    FAIL line (a broker connection that failed, and why) to ``on_failure`` as well. librdkafka
    tells its error callback why a connection failed for some failures only (a refused
    connection, not a TLS handshake that timed out)."""

    def __init__(self, logger: logging.Logger, on_failure: Any) -> None:
        self._logger, self._on_failure = logger, on_failure

    def log(self, level: int, fmt: str, *args: Any) -> None:  # served inside poll
        if args and args[0] == "FAIL":
            line = str(args[-1])  # "[thrd:...]: host:port/id: why"
            self._on_failure(line.split("]: ", 1)[-1] if line.startswith("[thrd:") else line)
        self._logger.log(level, fmt, *args)


class ConfluentClient:
    """A StreamClient backed by confluent-kafka; BrokerUnavailable if no broker answers at
    start."""

    def __init__(self, connection: KafkaConnection, consumer: ConsumerSettings,
                 producer: ProducerSettings | None = None) -> None:
        self._connection = connection
        self._settings = consumer
        self._producer_settings = producer or ProducerSettings()
        self._on_assign: PartitionsCallback | None = None
        self._on_revoke: PartitionsCallback | None = None
        self._assigning: dict[PartitionId, int] | None = None  # seeks asked inside on_assign
        # Inside a rebalance callback: the assignment as it will be once the callback returns
        # (kafka-python's callbacks run after the change; librdkafka's before it).
        self._changing: set[PartitionId] | None = None
        self._seeked: set[PartitionId] = set()
        # Partitions this client handed records of since their latest assignment: only their
        # cached high watermark is from this assignment (see highwater).
        self._fetched: set[PartitionId] = set()
        # Where each assigned partition was last put (assigned at, or seeked to): librdkafka
        # reports no position until a record is read there.
        self._starts: dict[PartitionId, int] = {}
        self._stalled: dict[PartitionId, UndecodableBatch] = {}
        self._down_since: float | None = None  # all brokers down, per librdkafka
        # When the brokers last refused our credentials (monotonic), and what they said.
        self._refused: tuple[float, str] | None = None
        # librdkafka's latest error report (monotonic time, text), to say why it cannot connect
        self._last_error: tuple[float, str] | None = None
        self._untrusted: tuple[float, str] | None = None  # ...of an untrusted certificate
        # What a rebalance callback raised, kept to be raised by poll_batch: an exception
        # escaping into librdkafka leaves its rebalance unfinished (close() then hangs).
        self._callback_error: BaseException | None = None
        self._undecodable: UndecodableBatch | None = None  # to raise at the next poll
        self._warned_headers = False  # a record's unreadable headers were logged
        self._lock = threading.Lock()  # guards lazy producer (re)creation
        self._committing: threading.Thread | None = None  # the latest commit's thread
        self._in_callback = False  # a rebalance callback is running (on the polling thread)
        self._consumer = Consumer({
            **self._librdkafka_config(),
            "group.id": consumer.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": consumer.auto_offset_reset,
            "isolation.level": consumer.isolation_level,
            "allow.auto.create.topics": AUTO_CREATE_TOPICS,
            "session.timeout.ms": consumer.session_timeout_ms,
            "heartbeat.interval.ms": consumer.heartbeat_interval_ms,
            "fetch.wait.max.ms": consumer.fetch_max_wait_ms,
            "max.poll.interval.ms": consumer.max_poll_interval_ms,
            "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
            "error_cb": self._on_error,
        })
        try:
            self._metadata("connecting the consumer")
            self._producer: Producer | None = self._new_producer()
        except KafkaClientError:
            self._consumer.close()
            raise

    # -- consuming ---------------------------------------------------------------------------
    def subscribe(self, topics: Collection[str], on_assign: PartitionsCallback | None = None,
                  on_revoke: PartitionsCallback | None = None) -> None:
        """Join the group for ``topics``; callbacks run inside ``poll_batch`` on its thread."""
        self._on_assign, self._on_revoke = on_assign, on_revoke
        try:
            self._consumer.subscribe(sorted(topics), on_assign=self._assigned,
                                     on_revoke=self._revoked, on_lost=self._revoked)
        except KafkaException as exc:
            raise convert(exc, "subscribing") from exc

    def poll_batch(self, max_records: int, timeout_s: float) -> list[InputRecord]:
        """Up to ``max_records`` records; rebalance callbacks run first, on this thread.

        Raises UndecodableBatch (its partition paused at the batch) when a fetched batch cannot
        be decoded; the next poll goes on with the other partitions.
        """
        if self._undecodable is not None:  # found by the previous poll, after its records
            error, self._undecodable = self._undecodable, None
            raise error
        self._await_commit(timeout_s)
        self._seeked.clear()
        try:
            messages = self._consumer.consume(num_messages=max_records, timeout=timeout_s)
        except KafkaException as exc:
            raise convert(exc, "polling") from exc
        producer = self._producer
        if producer is not None:  # its log lines, and acks, served while nothing is sent too
            producer.poll(0)
        records, failure = [], None
        for m in messages:
            error = m.error()
            if error is not None:
                if error.code() not in _NOT_FAILURES and not self._awaited(m, error):
                    failure = failure or self._poll_error(m, error)
                continue
            if (m.topic(), m.partition()) in self._seeked:
                continue  # seeked by a callback: read again from there
            records.append(InputRecord(m.topic(), m.partition(), m.offset(), m.key(),
                                       m.value(), m.timestamp()[1], self._headers(m)))
        callback_error, self._callback_error = self._callback_error, None
        if callback_error is not None or (failure is not None
                                          and not isinstance(failure, UndecodableBatch)):
            self._rewind(records)
            raise callback_error if callback_error is not None else failure
        if failure is not None:
            # The records before the bad batch come out now, the error with the next poll;
            # none at or past it (its partition waits there, paused).
            records = [r for r in records if (r.topic, r.partition) != failure.partition
                       or r.offset < failure.offset]
            if not records:
                raise failure
            self._undecodable = failure
        self._check_reachable(got_records=bool(messages))
        self._fetched.update((r.topic, r.partition) for r in records)
        return records

    def _headers(self, m: Message) -> list[tuple[str, bytes | None]]:
        """A record's headers; none when they cannot be read: confluent-kafka returns from
        ``headers()`` with a UnicodeDecodeError pending for a key that is not UTF-8 (which the
        protocol asks for, but librdkafka and Go producers write any bytes). Its reading is in
        the value: served without them."""
        try:
            # Called from C (methodcaller), where a result returned with an error pending is
            # always caught; a warmed-up call site of ``m.headers()`` skips that check, and
            # the error escaped from a later line (seen in CI, reproduced).
            return list(_HEADERS(m) or ())
        except (SystemError, UnicodeDecodeError) as exc:
            if not self._warned_headers:
                self._warned_headers = True
                log.warning("%s[%d] offset %d: headers unreadable (%s); records like it are "
                            "served without their headers (said once)", m.topic(),
                            m.partition(), m.offset(), exc)
            return []

    def commit(self, offsets: Mapping[PartitionId, int], timeout_s: float = 10.0) -> None:
        """Commit synchronously; an offset is the next one to read (last processed + 1).

        librdkafka's synchronous commit takes no timeout and waits as long as the coordinator
        takes to answer (minutes when the broker stops answering without closing its socket):
        it runs on a thread of its own here, and after ``timeout_s`` BrokerUnavailable is
        raised while it goes on. Until it returns, a later commit raises at once rather than
        queue behind it (offsets are only ever committed again, newer, with the next one).
        Inside a rebalance callback it runs on the calling thread, unbounded, as librdkafka
        needs there.
        """
        if not offsets:
            return
        if self._committing is not None and self._committing.is_alive():
            raise BrokerUnavailable("committing offsets failed: the previous commit has not "
                                    "returned yet")
        partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                self._consumer.commit(offsets=partitions, asynchronous=False)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outcome.append(exc)

        if self._in_callback:
            # Inside a rebalance callback (the last commit before a revocation) the commit
            # must run on this thread: from another one it got no answer until the callback
            # returned (every revocation cost the timeout, then a reconnect).
            run()
        else:
            self._committing = threading.Thread(target=run, name="streamer-commit",
                                                daemon=True)
            self._committing.start()
            self._committing.join(timeout_s)
            if not outcome:
                raise BrokerUnavailable(f"committing offsets failed: no answer in "
                                        f"{timeout_s:g} s (the commit goes on in the background)")
        error = outcome[0]
        if isinstance(error, KafkaException):
            raise convert(error, "committing offsets") from error
        if error is not None:
            raise error

    def _await_commit(self, timeout_s: float) -> None:
        """While a commit that gave up is still waiting, every call on the consumer waits
        with it (measured: poll, assignment and lag blocked as long as the broker did not
        answer): give it ``timeout_s`` more, then raise, so that the caller reconnects with
        a new consumer instead of hanging on this one."""
        if self._committing is None or not self._committing.is_alive():
            return
        self._committing.join(timeout_s)
        if self._committing.is_alive():
            raise BrokerUnavailable("polling: the consumer is still waiting for the answer to "
                                    "a commit that gave up")

    def seek(self, offsets: Mapping[PartitionId, int]) -> None:
        """Read these assigned partitions from these offsets on the next poll."""
        if self._assigning is not None:  # inside on_assign: where the assignment starts
            self._assigning.update(offsets)
            return
        try:
            for (topic, partition), offset in offsets.items():
                self._consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as exc:
            raise convert(exc, "seeking") from exc
        self._seeked.update(offsets)
        self._starts.update(offsets)

    def assignment(self) -> set[PartitionId]:
        """Partitions currently assigned to this member (inside a rebalance callback: once
        the rebalance is done)."""
        if self._changing is not None:
            return set(self._changing)
        try:
            return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        except KafkaException as exc:
            raise convert(exc, "reading the assignment") from exc

    def highwater(self, partition: PartitionId) -> int | None:
        """See StreamClient.highwater."""
        return self._cached_highwater(partition) if partition in self._fetched else None

    def _cached_highwater(self, partition: PartitionId) -> int | None:
        try:
            _, high = self._consumer.get_watermark_offsets(TopicPartition(*partition),
                                                           cached=True)
        except KafkaException:
            return None
        return high if high >= 0 else None

    def lag(self) -> dict[PartitionId, int]:
        """highwater - position per assigned partition that has been fetched from; before a
        record is read there, the position it was put at (a worker resumed at the end of its
        input had no lag series at all)."""
        try:
            positions = self._consumer.position(self._consumer.assignment())
        except KafkaException:
            return {}
        lags = {}
        for tp in positions:
            partition = (tp.topic, tp.partition)
            high = self._cached_highwater(partition)
            position = tp.offset if tp.offset >= 0 else self._starts.get(partition, -1)
            if high is not None and position >= 0:
                lags[partition] = max(high - position, 0)
        return lags

    def stalled(self) -> dict[PartitionId, UndecodableBatch]:
        """Assigned partitions held at a batch that could not be decoded, with the error."""
        assigned = self.assignment()
        return {tp: error for tp, error in self._stalled.items() if tp in assigned}

    # -- producing ---------------------------------------------------------------------------
    def send(self, records: Sequence[OutputRecord]) -> Delivery:
        """Start sending; the returned Delivery is waited on with ``wait``."""
        producer = self._current_producer()
        acks = _Acks(len(records), len(records))
        try:
            for r in records:
                while True:
                    try:
                        producer.produce(r.topic, value=r.value, key=r.key,
                                         headers=list(r.headers) or None, on_delivery=acks.report)
                        break
                    except BufferError:  # the local queue is full: let deliveries drain it
                        producer.poll(0.05)
            producer.poll(0)
        except (KafkaException, TypeError, ValueError) as exc:
            self._discard_producer()
            if isinstance(exc, KafkaException):
                raise convert(exc, f"producing {len(records)} records") from exc
            raise KafkaClientError(f"producing {len(records)} records failed: {exc!r}") from exc
        return Delivery([acks], producer)

    def wait(self, delivery: Delivery, timeout_s: float) -> None:
        """Return once the broker acknowledged every record of ``delivery``."""
        if not delivery.futures:
            return
        acks: _Acks = delivery.futures[0]
        deadline = time.monotonic() + timeout_s
        producer = delivery.producer
        action = f"producing {acks.total} records"
        if producer is not self._producer:
            raise BrokerUnavailable(f"{action} failed: its producer was discarded")
        while acks.pending > 0 and acks.error is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self._discard_producer()
                raise BrokerUnavailable(f"{action} failed: {acks.pending} not acknowledged "
                                        f"within {timeout_s} s")
            producer.poll(min(left, 0.1))
        if acks.error is not None:
            self._discard_producer()
            raise convert(KafkaException(acks.error), action)

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self, timeout_s: float = 5.0) -> None:
        """Leave the group and release connections; never raises. Runs no rebalance callback
        (librdkafka's close revokes the assignment): the caller has finished with its
        partitions, as with kafka-python, whose close runs none."""
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(timeout_s)
        self._on_assign = self._on_revoke = None
        committing = self._committing
        if committing is not None:
            committing.join(timeout_s)
            if committing.is_alive():
                # Closing would free the handle under it: a thread of its own closes the
                # consumer once the commit returns (left to the garbage collector, it would
                # stay in the group, heartbeating, until a collection found it; a process
                # exiting meanwhile leaves the group to expire it after its session timeout).
                log.warning("closing the consumer waits for a commit still waiting for the "
                            "coordinator; it is closed when that returns")
                threading.Thread(target=self._close_after, args=(committing, timeout_s),
                                 name="streamer-close", daemon=True).start()
                return
        self._close_consumer(timeout_s)

    def _close_after(self, committing: threading.Thread, timeout_s: float) -> None:
        committing.join()
        self._close_consumer(timeout_s)

    def _close_consumer(self, timeout_s: float) -> None:
        self._leave_during_a_join(timeout_s)
        try:
            self._consumer.close()
        # KafkaClientError: a revoke callback run by close() read the assignment of a handle
        # already being destroyed (_DESTROY); a SIGTERM'd worker then exited 1 (seen once in
        # CI, tests/serving/test_sharing_workers.py, after its last checkpoint was written).
        except (KafkaException, KafkaClientError, RuntimeError) as exc:
            log.warning("closing the consumer failed: %s", describe(exc))

    def _leave_during_a_join(self, timeout_s: float) -> None:
        """Leave the group through an admin client too while a join may be under way (a
        member holding no partition; librdkafka does not say more): librdkafka's own leave
        request waits behind the join the broker holds (see admin.remove_member). Unsubscribed
        first, so that librdkafka does not join again when the broker answers that held join
        with the member removed (Apache Kafka does at once); its own leave then follows."""
        if self._down_since is not None:  # every broker down, per librdkafka: none to answer
            return
        try:
            member = self._consumer.memberid() if not self._consumer.assignment() else None
            if member:
                self._consumer.unsubscribe()
        except (KafkaException, RuntimeError):  # a handle already closed
            return
        if member:
            leave_during_a_join(self._connection, self._settings.group_id, member,
                                timeout_s)

    # -- internals -------------------------------------------------------------------------------
    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Run on_assign, then take the partitions from where it seeked them (else from the
        committed offsets); taken even when on_assign raised (the error reaches the caller of
        poll_batch, whose retry then reads them), as kafka-python's client does."""
        ids = sorted((tp.topic, tp.partition) for tp in partitions)
        self._fetched.difference_update(ids)
        self._assigning, self._changing = {}, set(ids)
        try:
            self._call(self._on_assign, ids, even_none=True)  # none: the join ended all the same
        finally:
            starts, self._assigning, self._changing = self._assigning, None, None
            self._starts = dict(starts)
            consumer.assign([TopicPartition(t, p, starts.get((t, p), OFFSET_INVALID))
                             for t, p in ids])
            stalled = [TopicPartition(t, p) for t, p in ids if (t, p) in self._stalled]
            if stalled:  # handed back to us: still held at its undecodable batch
                consumer.pause(stalled)

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        ids = sorted((tp.topic, tp.partition) for tp in partitions)
        self._changing = self.assignment() - set(ids)
        try:
            self._call(self._on_revoke, ids)
        finally:
            self._changing = None

    def _call(self, callback: PartitionsCallback | None, ids: list[PartitionId],
              even_none: bool = False) -> None:
        """Run a rebalance callback (for no partition only ``even_none``); what it raises is
        kept for poll_batch to raise."""
        self._in_callback = True
        try:
            if callback is not None and (ids or even_none):
                callback(ids)
        except BaseException as exc:  # noqa: BLE001 - raised by poll_batch, on its thread
            self._callback_error = self._callback_error or exc
        finally:
            self._in_callback = False

    def _awaited(self, message: Any, error: KafkaError) -> bool:
        """A topic that does not exist, reported for a partition this consumer does not hold."""
        return (error.code() in _TOPIC_MISSING
                and (message.topic(), message.partition()) not in self.assignment())

    def _poll_error(self, message: Any, error: KafkaError) -> KafkaClientError:
        tp = (message.topic(), message.partition())
        if error.code() in _UNDECODABLE and message.topic() is not None:
            offset = message.offset()
            stall = UndecodableBatch(tp, offset, str(error))
            self._consumer.pause([TopicPartition(*tp)])
            self._consumer.seek(TopicPartition(*tp, offset))
            self._stalled[tp] = stall
            return stall
        return convert(KafkaException(error), "polling")

    def _rewind(self, records: list[InputRecord]) -> None:
        """Records taken from the consumer's position before a failure: read them again."""
        first: dict[PartitionId, int] = {}
        for r in records:
            first.setdefault((r.topic, r.partition), r.offset)
        assigned = self.assignment()
        for (topic, partition), offset in first.items():
            if (topic, partition) in assigned and (topic, partition) not in self._stalled:
                self._consumer.seek(TopicPartition(topic, partition, offset))

    def _librdkafka_config(self) -> dict[str, Any]:
        """The connection's librdkafka settings, its FAIL log lines kept as the latest error."""
        config = self._connection.librdkafka_config()
        return {**config, "logger": _LibrdkafkaLog(config["logger"], self._on_failure)}

    def _on_failure(self, why: str) -> None:
        """A connection failed, saying ``why``: the latest error, and the latest untrusted
        certificate unless an attempt that got an answer failed otherwise since (one that
        timed out says nothing against it: errors._BootstrapFailures)."""
        now = time.monotonic()
        self._last_error = (now, why)
        if CERTIFICATE_NOT_VERIFIED in why:
            self._untrusted = (now, why)
        elif not got_no_answer(why):
            self._untrusted = None

    def _on_error(self, error: KafkaError) -> None:  # served inside poll: only records
        if error.code() == KafkaError._ALL_BROKERS_DOWN and self._down_since is None:
            self._down_since = time.monotonic()
        if error.code() != KafkaError._ALL_BROKERS_DOWN:  # (that says no more than "down")
            self._on_failure(error.str())
        # The brokers' answer to our credentials or mechanism (librdkafka tries again without
        # end); not a handshake cut short by the connection or a timeout ("Local: ..."),
        # which it reports with the same code.
        if error.code() == KafkaError._AUTHENTICATION and "Local:" not in error.str():
            self._refused = (time.monotonic(), error.str())

    def _check_reachable(self, got_records: bool) -> None:
        if got_records:  # a connection works: what was refused or down before is over
            self._down_since = self._refused = None
            return
        since = self._down_since
        if since is None:
            return
        down_for = time.monotonic() - since
        if down_for < self._settings.unreachable_after_s:
            return
        try:  # back up without records to show for it (an idle input)?
            self._consumer.list_topics(timeout=1.0)
        except KafkaException:
            self._raise_if_refused(f"no connection to {self._connection.bootstrap_servers}",
                                   since=since)
            raise BrokerUnavailable(f"no connection to {self._connection.bootstrap_servers} "
                                    f"for {down_for:.1f} s{self._why(since)}") from None
        self._down_since = self._refused = None

    def _metadata(self, action: str) -> None:
        try:
            self._consumer.list_topics(timeout=self._connection.bootstrap_timeout_s)
        except KafkaException as exc:
            self._consumer.poll(0)  # (serves the error callback: not subscribed, reads nothing)
            self._raise_if_refused(f"{action} failed")
            raise BrokerUnavailable(f"{action} failed: no broker answered at "
                                    f"{self._connection.bootstrap_servers}: {exc}"
                                    f"{self._why()}") from exc

    def _why(self, since: float = 0.0) -> str:
        """`` (the last attempt: ...)``: librdkafka's latest error report at or after
        ``since`` (monotonic), if any: why a connection failed, which the failed call does
        not say ("Broker transport failure")."""
        if self._last_error is None or self._last_error[0] < since:
            return ""
        why = self._last_error[1]
        return (f" (the last attempt: {why})"
                f"{listener_hint(self._connection.security_protocol, why)}")

    def _raise_if_refused(self, failure: str, since: float = 0.0) -> None:
        """A connection that failed because the brokers refused our credentials, or, in its
        latest attempt that got an answer, because their certificate was not trusted (at or
        after ``since``,
        monotonic), which librdkafka reports only to the error callback (the call itself:
        "transport failure")."""
        if self._refused is not None and self._refused[0] >= since:
            raise AuthenticationFailed.refused(failure, self._refused[1])
        untrusted = self._untrusted
        if untrusted is not None and untrusted[0] >= since:
            raise BrokerNotTrusted.untrusted(failure, untrusted[1])

    def _new_producer(self) -> Producer:
        settings = self._producer_settings
        return Producer({
            **self._librdkafka_config(),
            "acks": "all",
            # As kafka-python's producer by default: its own retries can neither duplicate a
            # forecast nor reorder a sensor's (librdkafka's default is neither).
            "enable.idempotence": True,
            "allow.auto.create.topics": AUTO_CREATE_TOPICS,
            "linger.ms": settings.linger_ms,
            "batch.size": settings.batch_size_bytes,
            "compression.type": settings.compression_type or "none",
            "message.max.bytes": settings.max_request_bytes,
            "request.timeout.ms": settings.request_timeout_ms,
            "delivery.timeout.ms": settings.delivery_timeout_ms,
            # The Java client's placement (and kafka-python's): a key goes to the same
            # partition whichever client produced it.
            "partitioner": "murmur2_random",
            "error_cb": self._on_error,
        })

    def _current_producer(self) -> Producer:
        with self._lock:
            if self._producer is None:
                self._producer = self._new_producer()
            return self._producer

    def _discard_producer(self) -> None:
        """Drop the producer and what it still holds: the caller sends the batch again, so a
        late delivery of the old one would duplicate it."""
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            producer.purge(in_queue=True, in_flight=True, blocking=False)
            producer.flush(0)
