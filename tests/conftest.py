"""Shared fixtures: one real local broker per session, fresh topics and groups per test."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# kafka-python 3 warns from its protocol schema loader on import and from its IO thread.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"kafka(\.|$)")
warnings.filterwarnings("ignore", message="open_text is deprecated", category=DeprecationWarning)

from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from streamer.kafka import (  # noqa: E402
    CLIENTS,
    ConsumerSettings,
    InputRecord,
    KafkaConnection,
    ProducerSettings,
    StreamClient,
    delete_topics,
    ensure_topics,
    open_client,
)

if TYPE_CHECKING:
    from streamer.kafka.broker import LocalBroker


TLS_KEY_PASSWORD = "s3cret-key"  # of the client key in tls_files


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate it signed, the
    client key encrypted under TLS_KEY_PASSWORD, in its own file and, with the certificate,
    in "client_with_key" (tests/broker_proxy.py's make_tls_files; needs openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    from tests.broker_proxy import make_tls_files

    files = make_tls_files(tmp_path_factory.mktemp("tls"), TLS_KEY_PASSWORD)
    combined = files["client"].with_name("client_with_key.pem")  # one file, as some ship them
    combined.write_bytes(files["client"].read_bytes() + files["client_key"].read_bytes())
    return {**files, "client_with_key": combined}


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A command run in a test (``main([...])``) routes logs to that test's captured stderr;
    put the root logger back after it, so later tests do not write to a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# Tansu holds every JoinGroup for ~max(1 s, session_timeout / 2): short sessions keep the first
# assignment near 1.2 s; a short fetch wait keeps the ~250 ms new-data latency from adding up.
TEST_CONSUMER_TIMEOUTS = {
    "session_timeout_ms": 2000,
    "heartbeat_interval_ms": 500,
    "fetch_max_wait_ms": 100,
}

RawRecord = tuple[bytes | None, bytes | None] | tuple[bytes | None, bytes | None, list]


def unscraped_metrics():
    """The worker's metrics on a registry of their own, for parts that need some to report to
    (the model topic, durability, the sharing benchmark)."""
    from prometheus_client import CollectorRegistry

    from streamer.observability.metrics import Metrics

    return Metrics(CollectorRegistry(), max_grad_norm=1.0, device="cpu", coverage_target=0.9,
                   horizon=1)


def pytest_configure(config: pytest.Config) -> None:
    # kafka-python 3 loads its protocol schemas lazily through importlib.resources.open_text,
    # which warns from importlib's module, so pyproject's "kafka.*" module filter misses it.
    config.addinivalue_line(
        "filterwarnings", "ignore:open_text is deprecated:DeprecationWarning:importlib.*"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The benchmark smoke runs (minutes each, busy cores) go first: spread over the test
    processes, they overlap the many short tests instead of ending the run on their own."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/test_benchmarks.py"))


def _unique(prefix: str, request: pytest.FixtureRequest) -> str:
    test = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:60]
    return f"{prefix}-{test}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def broker() -> Iterator[LocalBroker]:
    """One Tansu broker on a free loopback port for the whole session."""
    try:
        from streamer.kafka.broker import LocalBroker, resolve_broker_binary

        resolve_broker_binary()
    except ModuleNotFoundError as exc:
        pytest.skip(f"no local broker: {exc}")
    with LocalBroker() as local:
        yield local


@pytest.fixture
def kafka_connection(broker: LocalBroker) -> KafkaConnection:
    """A connection to the session broker that gives up quickly if it is gone."""
    return KafkaConnection(broker.bootstrap, client_id="streamer-tests", bootstrap_timeout_s=5.0)


@pytest.fixture
def topic_factory(
    broker: LocalBroker, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """``make(partitions=1) -> name``: a fresh topic created explicitly, deleted after the test."""
    created: list[str] = []

    def make(partitions: int = 1) -> str:
        name = _unique("t", request)
        ensure_topics(broker.bootstrap, {name: partitions})
        created.append(name)
        return name

    yield make
    delete_topics(broker.bootstrap, created)


@pytest.fixture
def group_id(request: pytest.FixtureRequest) -> str:
    """A consumer group id no other test uses."""
    return _unique("g", request)


@pytest.fixture
def consumer_timeouts() -> dict[str, int]:
    """ConsumerSettings overrides every test consumer should use (see docs/test-broker.md)."""
    return dict(TEST_CONSUMER_TIMEOUTS)


@pytest.fixture(params=CLIENTS)
def client_kind(request: pytest.FixtureRequest) -> str:
    """Each Kafka client backend (kafka.client): a test using it runs once per backend."""
    return request.param


@pytest.fixture
def client_factory(kafka_connection: KafkaConnection,
                   client_kind: str) -> Iterator[Callable[..., StreamClient]]:
    """``make(group_id, **consumer_overrides)``: a client of each backend with test timeouts."""
    clients: list[StreamClient] = []

    def make(group_id: str, **overrides: object) -> StreamClient:
        settings = ConsumerSettings(group_id, **{**TEST_CONSUMER_TIMEOUTS, **overrides})
        client = open_client(client_kind, kafka_connection, settings, ProducerSettings())
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close(timeout_s=1.0)


@pytest.fixture
def produce_raw(broker: LocalBroker) -> Iterator[Callable[..., list[tuple[int, int]]]]:
    """``produce(topic, [(key, value[, headers]), ...]) -> [(partition, offset)]``, acks=all.

    Plain kafka-python, independent of the client under test.
    """
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=2)

    def produce(topic: str, records: Sequence[RawRecord]) -> list[tuple[int, int]]:
        futures = [
            producer.send(topic, key=r[0], value=r[1], headers=r[2] if len(r) > 2 else None)
            for r in records
        ]
        producer.flush(timeout=10)
        return [(m.partition, m.offset) for m in (f.get(timeout=10) for f in futures)]

    yield produce
    producer.close(timeout=2)


@pytest.fixture
def consume_raw(broker: LocalBroker) -> Callable[..., list[InputRecord]]:
    """``consume(topic, n, timeout_s=10) -> records``: every partition from the start, no group.

    Manual assignment skips the group join, so it returns as soon as ``n`` records are in; it
    returns what it has at the timeout, so a test can assert on fewer.
    """

    def consume(topic: str, n: int, timeout_s: float = 10.0) -> list[InputRecord]:
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                                 fetch_max_wait_ms=100)
        try:
            deadline = time.monotonic() + timeout_s
            partitions = consumer.partitions_for_topic(topic)
            while not partitions and time.monotonic() < deadline:
                time.sleep(0.05)
                partitions = consumer.partitions_for_topic(topic)
            consumer.assign([TopicPartition(topic, p) for p in sorted(partitions or ())])
            consumer.seek_to_beginning()
            records: list[InputRecord] = []
            while len(records) < n and time.monotonic() < deadline:
                for batch in consumer.poll(timeout_ms=200).values():
                    records.extend(
                        InputRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp,
                                    list(r.headers or ()))
                        for r in batch
                    )
            return records
        finally:
            consumer.close(autocommit=False)

    return consume


@pytest.fixture
def poll_until() -> Callable[..., list[InputRecord]]:
    """``poll(client, n, timeout_s=10)``: poll until ``n`` records came back or time is up."""

    def poll(client: StreamClient, n: int, timeout_s: float = 10.0,
             max_records: int = 500) -> list[InputRecord]:
        deadline = time.monotonic() + timeout_s
        records: list[InputRecord] = []
        while len(records) < n and time.monotonic() < deadline:
            records.extend(client.poll_batch(max_records, timeout_s=0.2))
        return records

    return poll


# Tools CI installs; a skip for lack of one there would hide a broken set-up, so it fails instead.
_MISSING_TOOL = re.compile(r"not installed|no local broker|no docker compose", re.IGNORECASE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if _MISSING_TOOL.search(reason):
            report.outcome = "failed"
            report.longrepr = f"CI must provide this tool, but the test skipped: {reason}"
