"""What the worker loop needs from Kafka, independent of the client library behind it."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from streamer.kafka.connection import KafkaConnection
from streamer.kafka.errors import UndecodableBatch

# (topic, partition): plain tuples so no library type leaks into the worker.
PartitionId = tuple[str, int]
# Heartbeats at most a third of the session timeout apart (Kafka's guidance): two may be lost
# before the group coordinator gives a consumer's partitions to another.
HEARTBEATS_PER_SESSION = 3


def heartbeat_fits(heartbeat_interval_ms: int, session_timeout_ms: int) -> bool:
    """Whether heartbeats this often keep a consumer in its group (the rule, stated once)."""
    return heartbeat_interval_ms * HEARTBEATS_PER_SESSION <= session_timeout_ms
PartitionsCallback = Callable[[list[PartitionId]], None]


def partition_names(partitions: Collection[PartitionId]) -> str:
    """``topic[0], topic[3]`` for logs and messages; "nothing" when empty."""
    return ", ".join(f"{t}[{p}]" for t, p in sorted(partitions)) or "nothing"


@dataclass(frozen=True)
class InputRecord:
    """One consumed record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int  # the record's Kafka timestamp; <= 0 when it has none
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class OutputRecord:
    """One record to produce; the partition follows from the key."""

    topic: str
    key: bytes | None
    value: bytes | None  # None: a tombstone (a dead letter of a record that had no value)
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class Delivery:
    """Records handed to a producer, not yet known to be acknowledged."""

    futures: list[Any]
    producer: Any  # the library's producer that holds them


ISOLATION_LEVELS = ("read_committed", "read_uncommitted")
# The worker's clients never ask the brokers to create a topic they look up.
# Brokers that allow it (Apache Kafka's default) would make a missing input topic, or an output
# topic they lost, with their default partition count (1), which cannot be taken back: a
# worker creates the topics it writes to itself, with the input's partition count, and waits
# for a missing input topic (README, "Running the stack"). librdkafka's consumer asks for none
# by default; kafka-python's clients and librdkafka's producer did.
AUTO_CREATE_TOPICS = False


@dataclass(frozen=True)
class ConsumerSettings:
    """Consumer-group tuning; Kafka's defaults except where a streaming worker needs less."""

    group_id: str
    session_timeout_ms: int = 45_000
    heartbeat_interval_ms: int = 3_000
    fetch_max_wait_ms: int = 500
    max_poll_records: int = 500
    max_poll_interval_ms: int = 300_000
    # Where a partition with no committed offset (and no checkpoint) starts.
    auto_offset_reset: str = "earliest"
    # read_committed: a transactional producer's readings are served once its transaction
    # commits, and never when it aborts (librdkafka's default; Kafka's Java one reads them all).
    isolation_level: str = "read_committed"
    # poll_batch raises BrokerUnavailable once no broker connection has been up for this long,
    # instead of returning empty batches forever (kafka-python reconnects silently).
    unreachable_after_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.group_id:
            raise ValueError("group_id must not be empty")
        if not heartbeat_fits(self.heartbeat_interval_ms, self.session_timeout_ms):
            raise ValueError(
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be at most a third of "
                f"session_timeout_ms ({self.session_timeout_ms})"
            )
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ValueError(
                f"auto_offset_reset must be earliest or latest, got {self.auto_offset_reset!r}"
            )
        if self.isolation_level not in ISOLATION_LEVELS:
            raise ValueError(f"isolation_level must be one of {ISOLATION_LEVELS}, got "
                             f"{self.isolation_level!r}")
        if self.max_poll_records < 1:
            raise ValueError(f"max_poll_records must be >= 1, got {self.max_poll_records}")
        if not self.unreachable_after_s > 0:
            raise ValueError(f"unreachable_after_s must be > 0, got {self.unreachable_after_s}")


# A partition's log ending before our position this long is a new log (the topic deleted and
# made again, or the brokers lost it); for a shorter while, a new leader's high watermark still
# catching up after a failover, which an empty fetch reports too.
LOG_ENDED_AFTER_S = 5.0


@dataclass(frozen=True)
class ProducerSettings:
    """Producer tuning: acks=all always; small linger to batch a poll's worth of outputs."""

    linger_ms: int = 5
    # Large batches: a poll's worth of forecasts goes out in a few requests, and the client's
    # network thread is woken far less often (the e2e benchmark saw 14% of time in wake-ups).
    batch_size_bytes: int = 1 << 20
    compression_type: str | None = None  # None, "gzip", "snappy", "lz4" or "zstd"
    # The producer refuses a record larger than this (Kafka's default max.request.size, and
    # about the brokers' default message.max.bytes); see codec.dead_letter.
    max_request_bytes: int = 1 << 20
    # send() blocks this long when topic metadata is missing (e.g. broker down).
    max_block_ms: int = 10_000
    request_timeout_ms: int = 10_000
    # A record not acknowledged within this time fails (retries happen inside it); Kafka
    # requires it to exceed linger_ms + request_timeout_ms. The worker sets it from
    # kafka.produce_timeout_s (config.KafkaSettings.producer).
    delivery_timeout_ms: int = 30_000

    def __post_init__(self) -> None:
        allowed = (None, "gzip", "snappy", "lz4", "zstd")
        if self.compression_type not in allowed:
            raise ValueError(
                f"compression_type must be one of {allowed}, got {self.compression_type!r}"
            )
        if self.delivery_timeout_ms <= self.linger_ms + self.request_timeout_ms:
            raise ValueError(
                f"delivery_timeout_ms ({self.delivery_timeout_ms}) must exceed linger_ms + "
                f"request_timeout_ms ({self.linger_ms + self.request_timeout_ms})"
            )


class StreamClient(Protocol):
    """Consume, produce and commit for one worker; errors are streamer.kafka.errors types."""

    def subscribe(
        self,
        topics: Collection[str],
        on_assign: PartitionsCallback | None = None,
        on_revoke: PartitionsCallback | None = None,
    ) -> None:
        """Join the group for ``topics``; callbacks run inside ``poll_batch`` on its thread.
        ``on_assign`` ends every join, with no partition too (a group with more members than
        partitions): what the member held before, under a consumer closed since, is another
        member's now. ``on_revoke`` runs only for partitions held."""
        ...

    def poll_batch(self, max_records: int, timeout_s: float) -> list[InputRecord]:
        """Up to ``max_records`` records, waiting at most ``timeout_s`` for the first.

        Each partition's records come in offset order (partitions may interleave). A batch
        that cannot be decoded raises UndecodableBatch after its partition was paused there;
        the other partitions go on with the next poll.
        """
        ...

    def send(self, records: Sequence[OutputRecord]) -> Delivery:
        """Start sending ``records`` (in order); acknowledgements are awaited with ``wait``."""
        ...

    def wait(self, delivery: Delivery, timeout_s: float) -> None:
        """Return once every record of ``delivery`` is acknowledged; raise if one failed."""
        ...

    def commit(self, offsets: Mapping[PartitionId, int], timeout_s: float = 10.0) -> None:
        """Commit synchronously; an offset is the next one to read (last processed + 1)."""
        ...

    def seek(self, offsets: Mapping[PartitionId, int]) -> None:
        """Read these assigned partitions from these offsets on the next poll."""
        ...

    def assignment(self) -> set[PartitionId]:
        """Partitions currently assigned to this member."""
        ...

    def highwater(self, partition: PartitionId) -> int | None:
        """The partition's end offset as of the last fetch that returned records of it since
        it was last assigned; None before one. Both libraries keep a partition's end across
        assignments: one given back reported where its log ended when this member last held
        it, below the offset the worker had restored from a newer checkpoint, and the worker
        took it for a recreated topic and read it all again (CI, the sharing SIGKILL test:
        every reading of it dead-lettered as not after the sensor's last)."""
        ...

    def lag(self) -> dict[PartitionId, int]:
        """Records behind the partition end, per assigned partition with a known end."""
        ...

    def stalled(self) -> dict[PartitionId, UndecodableBatch]:
        """Assigned partitions held at a batch that could not be decoded, with the error."""
        ...

    def close(self) -> None:
        """Leave the group and release connections; never raises."""
        ...


CLIENTS = ("kafka-python", "confluent")


def open_client(kind: str, connection: KafkaConnection, consumer: ConsumerSettings,
                producer: ProducerSettings) -> StreamClient:
    """A connected client of ``kind`` (one of CLIENTS); ImportError naming the extra to
    install when confluent-kafka is missing."""
    if kind == "confluent":
        try:
            from streamer.kafka.confluent_client import ConfluentClient
        except ImportError as exc:
            raise ImportError("kafka.client is confluent but confluent-kafka is not installed: "
                              "pip install 'streamer[fast]'") from exc
        return ConfluentClient(connection, consumer, producer)
    if kind != "kafka-python":
        raise ValueError(f"kafka client must be one of {CLIENTS}, got {kind!r}")
    from streamer.kafka.kafka_python_client import KafkaPythonClient

    return KafkaPythonClient(connection, consumer, producer)
