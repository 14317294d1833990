"""Both client backends against the real local broker: records, offsets, rebalances, outages."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from kafka.partitioner.default import murmur2

import streamer.kafka.broker as broker_module
from streamer.kafka import (
    BrokerUnavailable,
    ConsumerSettings,
    KafkaConnection,
    OutputRecord,
    ProducerSettings,
    UndecodableBatch,
    delete_topics,
    ensure_topics,
    open_client,
)
from streamer.kafka.broker import LocalBroker, free_port
from tests.hostile_records import (
    produce_undecodable,
    produce_with_header_key,
    produce_with_librdkafka,
)

pytestmark = pytest.mark.broker


def test_poll_batch_returns_exactly_the_produced_records(
    topic_factory, group_id, client_factory, produce_raw, poll_until
):
    topic = topic_factory(partitions=1)
    before_ms = int(time.time() * 1000)
    produce_raw(topic, [(b"s1", b"1.5", [("schema", b"v1")]), (None, b"2.5"), (b"s2", None)])
    client = client_factory(group_id)
    client.subscribe([topic])

    records = poll_until(client, 3)

    got = [(r.topic, r.partition, r.offset, r.key, r.value, r.headers) for r in records]
    assert got == [
        (topic, 0, 0, b"s1", b"1.5", [("schema", b"v1")]),
        (topic, 0, 1, None, b"2.5", []),
        (topic, 0, 2, b"s2", None, []),
    ]
    assert all(before_ms <= r.timestamp_ms <= time.time() * 1000 for r in records)


def test_no_client_asks_the_brokers_to_create_a_topic_it_looks_up(
    group_id, client_factory, client_kind, monkeypatch
):
    # Brokers that allow it (Apache Kafka's default) made a missing input topic, or an output
    # topic they lost, with their default partition count: kafka-python asked for that, and
    # librdkafka's producer. (The local broker creates them whatever it is asked.)
    if client_kind == "kafka-python":
        client = client_factory(group_id)
        for cluster in (client._consumer._client.cluster, client._current_producer()._metadata):
            cluster.set_topics(["sensor-readings"])
            assert cluster.metadata_request().allow_auto_topic_creation is False
        return
    import confluent_kafka

    from streamer.kafka import confluent_client

    configs: list[dict] = []
    for name in ("Consumer", "Producer"):
        made = getattr(confluent_kafka, name)
        monkeypatch.setattr(confluent_client, name,
                            lambda config, made=made: configs.append(config) or made(config))
    client_factory(group_id)._current_producer()
    assert [c.get("allow.auto.create.topics") for c in configs] == [False, False]


def test_a_member_a_full_group_leaves_without_partitions_stays_in_it(
    topic_factory, group_id, client_factory, produce_raw, poll_until
):
    # A member that joined while its topic was missing joins again once the topic exists
    # (kafka-python gave it none of the topic's partitions); one that joined with the topic
    # there and got none (more members than partitions) must not churn the group.
    topic = topic_factory(partitions=1)
    produce_raw(topic, [(b"s1", b"1.0")])
    first = client_factory(group_id)
    first.subscribe([topic])
    assert len(poll_until(first, 1, timeout_s=15)) == 1
    second = client_factory(group_id)
    second.subscribe([topic])
    for _ in range(25):  # a join again would raise BrokerUnavailable here
        poll_until(first, 1, timeout_s=0.2)
        poll_until(second, 1, timeout_s=0.2)
    assert len(first.assignment() | second.assignment()) == 1


def _close_then_delete(broker, client, topic: str) -> None:
    # Closed first: librdkafka dies of SIGSEGV on this broker's fetch answer for a topic deleted
    # under it (docs/test-broker.md); the test's worker process died so once in CI, under load.
    client.close(timeout_s=5.0)
    delete_topics(broker.bootstrap, [topic])


def test_a_topic_made_after_the_member_joined_without_it_is_assigned_to_it(
    broker, group_id, client_factory, produce_raw, poll_until, caplog
):
    # The worker's input topic made once its first join had ended without it. kafka-python's
    # leader joins again when the topic's metadata comes, and the local broker answers with the
    # old generation's empty assignment; the client then has a new consumer join (the worker
    # reconnects on BrokerUnavailable). It did so while that join was under way: the closing
    # consumer's leave request timed out behind it, and the member left behind kept every join
    # of the new one waiting for minutes.
    topic = f"{group_id}-late"
    # Should it fail again (twice in CI, not reproduced in 14 runs here): the joins, their
    # assignments and leaves, and each new consumer, in the failure's captured log.
    caplog.set_level(logging.INFO, logger="kafka.coordinator")
    caplog.set_level(logging.INFO, logger="streamer.kafka")
    started, consumers = time.monotonic(), []
    # The worker's default timeouts: the local broker holds a join about half the session
    # timeout, and with 10 s instead of 45 the member left behind was gone soon enough.
    timeouts = {"session_timeout_ms": 45_000, "heartbeat_interval_ms": 3_000}
    client = client_factory(group_id, **timeouts)
    client.subscribe([topic])
    # The first join (~23 s) ends without the topic: kafka-python's listener says when.
    listener = getattr(client, "_listener", None)
    deadline = time.monotonic() + (60 if listener else 30)
    while time.monotonic() < deadline and not (listener and listener.joined_without_topic):
        client.poll_batch(10, timeout_s=0.5)
    if listener is not None:  # and the leader's snapshot the client reads is kafka-python's
        assert listener.joined_without_topic
        assert client._consumer._coordinator._assignment_snapshot == {topic: set()}
    ensure_topics(broker.bootstrap, {topic: 2})
    try:
        produce_raw(topic, [(b"s1", b"1.0")])
        # ~50 s: two joins; ~100 s when the first consumer is closed during a join of its own
        # (the local broker lets the held join run its course: docs/test-broker.md)
        deadline, records = time.monotonic() + 240, []
        while not records and time.monotonic() < deadline:
            try:
                records = client.poll_batch(10, timeout_s=0.5)
            except BrokerUnavailable as exc:
                consumers.append(f"{time.monotonic() - started:.1f} s: {exc}")
                client.close(timeout_s=5.0)
                client = client_factory(group_id, **timeouts)
                client.subscribe([topic])
        listener = getattr(client, "_listener", None)
        assert [r.value for r in records] == [b"1.0"], (
            f"after {time.monotonic() - started:.1f} s, new consumers at {consumers}, "
            f"assignment {client.assignment()}, listener "
            f"{listener and (listener.joining, listener.joined_without_topic)}")
        assert client.assignment() == {(topic, 0), (topic, 1)}
    finally:
        _close_then_delete(broker, client, topic)


def test_a_join_begun_for_a_topic_made_later_is_read_by_a_member_busy_between_polls(
    broker, group_id, client_factory, caplog
):
    # kafka-python 3.0.12 reads a join under way only while it "needs" one; its leader's join
    # for a topic made later stopped being needed at its own assignment, before the broker
    # answered: a member between two polls then (a worker stepping its model, a loaded
    # machine) never read it, and sat without partitions or heartbeats for good.
    caplog.set_level(logging.INFO, logger="kafka.coordinator")
    topic = f"{group_id}-late"
    client = client_factory(group_id)
    client.subscribe([topic])
    listener = getattr(client, "_listener", None)  # kafka-python's says when its join ended
    deadline = time.monotonic() + (30 if listener else 5)  # (~1 s here)
    while time.monotonic() < deadline and not (listener and listener.joined_without_topic):
        client.poll_batch(10, timeout_s=0.2)
    if listener is not None:  # the leader assigned without the topic: the path under test
        assert client._consumer._coordinator._assignment_snapshot == {topic: set()}
    assert client.assignment() == set()
    ensure_topics(broker.bootstrap, {topic: 2})
    try:
        new_consumers, deadline = 0, time.monotonic() + 60
        while client.assignment() != {(topic, 0), (topic, 1)} and time.monotonic() < deadline:
            try:
                client.poll_batch(10, timeout_s=0.05)  # returns before the broker answers
            except BrokerUnavailable:  # (the client's own way to a join that gives the topic)
                new_consumers += 1
                client.close(timeout_s=5.0)
                client = client_factory(group_id)
                client.subscribe([topic])
            time.sleep(2.0)  # busy: the join goes on meanwhile
        assert client.assignment() == {(topic, 0), (topic, 1)}, (new_consumers, caplog.text)
    finally:
        _close_then_delete(broker, client, topic)


def test_a_partition_given_back_reports_no_end_from_when_it_was_held_before(
    topic_factory, group_id, client_factory, produce_raw, poll_until
):
    # Both libraries kept a partition's end across assignments: given back, it reported
    # where the log ended when this member last held it, below the offset the worker restored
    # from a newer checkpoint, and the worker read the partition all over again as recreated.
    topic = topic_factory(partitions=2)
    keys = [f"s{i}".encode() for i in range(20)]
    placed = produce_raw(topic, [(k, b"1") for k in keys])
    first, ends_at_assignment = client_factory(group_id), []
    first.subscribe([topic], on_assign=lambda ids: ends_at_assignment.append(
        {tp: first.highwater(tp) for tp in ids}))
    assert len(poll_until(first, 20)) == 20

    second = client_factory(group_id)
    second.subscribe([topic])
    deadline = time.monotonic() + 20
    while not second.assignment() and time.monotonic() < deadline:
        poll_until(first, 1, timeout_s=0.2)
        poll_until(second, 1, timeout_s=0.2)
    (tp,) = second.assignment()
    before = sum(1 for p, _ in placed if p == tp[1])  # its end while the first one held it
    assert first.highwater(tp) is None or first.highwater(tp) == before
    produce_raw(topic, [(k, b"2") for k, (p, _) in zip(keys, placed) if p == tp[1]])
    poll_until(second, before)  # read by the other one: the end moves on, unseen by the first
    second.close(timeout_s=2.0)
    deadline = time.monotonic() + 20
    while tp not in first.assignment() and time.monotonic() < deadline:
        poll_until(first, 1, timeout_s=0.2)
    assert tp in first.assignment()
    assert ends_at_assignment[-1][tp] in (None, 2 * before)  # never `before`


def test_records_acknowledged_are_all_readable_in_key_order(
    topic_factory, group_id, client_factory, consume_raw
):
    topic = topic_factory(partitions=3)
    client = client_factory(group_id)
    outputs = [
        OutputRecord(topic, f"sensor-{i % 4}".encode(), f"{i}".encode(), [("n", bytes([i]))])
        for i in range(40)
    ]

    client.wait(client.send(outputs), 10)

    # No waiting: everything must already be on the broker when wait returns.
    records = consume_raw(topic, 40, timeout_s=3)
    assert len(records) == 40
    by_key: dict[bytes | None, list] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        by_key.setdefault(r.key, []).append(r)
    for i in range(4):
        same_key = by_key[f"sensor-{i}".encode()]
        # One key, one partition, and the producer's order kept.
        assert len({r.partition for r in same_key}) == 1
        assert [r.value for r in same_key] == [f"{j}".encode() for j in range(i, 40, 4)]
        assert [r.headers for r in same_key] == [[("n", bytes([j]))] for j in range(i, 40, 4)]


def test_keyed_records_land_on_the_java_clients_murmur2_partition(
    topic_factory, group_id, client_factory, consume_raw
):
    # Downstream readers (and other producers) place a sensor by murmur2(key) % partitions:
    # the client's key-hash cache must not move any sensor. Each key is sent twice so the
    # second placement comes from the cache.
    topic = topic_factory(partitions=5)
    client = client_factory(group_id)
    # (the long key is past the cache's 256-byte bound: placed by the uncached path)
    keys = [f"sensor-{i:05d}".encode() for i in range(60)] + ["☃ sensor".encode(), b"k" * 300]
    client.wait(client.send([OutputRecord(topic, k, b"x") for k in keys + keys]), 10)

    records = consume_raw(topic, 2 * len(keys), timeout_s=5)

    assert len(records) == 2 * len(keys)
    for r in records:
        assert r.partition == (murmur2(r.key) & 0x7FFFFFFF) % 5, r.key


def test_poll_batch_returns_at_most_max_records(
    topic_factory, group_id, client_factory, produce_raw, poll_until
):
    topic = topic_factory(partitions=1)
    produce_raw(topic, [(None, b"x")] * 10)
    client = client_factory(group_id)
    client.subscribe([topic])

    first = poll_until(client, 1, max_records=4)
    rest = poll_until(client, 10 - len(first), max_records=4)

    assert len(first) == 4
    assert [r.offset for r in first + rest] == list(range(10))


def test_committed_offsets_resume_a_new_consumer(
    topic_factory, group_id, client_factory, produce_raw, poll_until
):
    topic = topic_factory(partitions=1)
    produce_raw(topic, [(None, f"{i}".encode()) for i in range(10)])
    first = client_factory(group_id)
    first.subscribe([topic])
    assert len(poll_until(first, 10)) == 10
    first.commit({(topic, 0): 6})  # records 0..5 processed
    first.close()

    second = client_factory(group_id)
    second.subscribe([topic])

    assert [r.offset for r in poll_until(second, 4)] == [6, 7, 8, 9]


def test_seek_in_on_assign_overrides_committed_offsets(
    topic_factory, group_id, client_factory, produce_raw, poll_until
):
    topic = topic_factory(partitions=1)
    produce_raw(topic, [(None, f"{i}".encode()) for i in range(10)])
    first = client_factory(group_id)
    first.subscribe([topic])
    poll_until(first, 10)
    first.commit({(topic, 0): 8})
    first.close()

    # The worker restores offsets from its checkpoint when partitions arrive.
    second = client_factory(group_id)
    second.subscribe([topic], on_assign=lambda parts: second.seek({p: 2 for p in parts}))

    assert [r.offset for r in poll_until(second, 8)] == [2, 3, 4, 5, 6, 7, 8, 9]


def test_seek_rewinds_an_assigned_partition(
    topic_factory, group_id, client_factory, produce_raw, poll_until
):
    topic = topic_factory(partitions=1)
    produce_raw(topic, [(None, f"{i}".encode()) for i in range(5)])
    client = client_factory(group_id)
    client.subscribe([topic])
    assert len(poll_until(client, 5)) == 5

    client.seek({(topic, 0): 3})

    assert [r.offset for r in poll_until(client, 2)] == [3, 4]


class PollingMember:
    """A group member polling on its own thread, as each worker process does."""

    def __init__(self, client, topic: str, on_revoke=None) -> None:
        self.client = client
        self.events: list[tuple[str, list]] = []

        def revoked(parts) -> None:
            self.events.append(("revoke", parts))
            if on_revoke is not None:
                on_revoke(parts)

        client.subscribe([topic], on_assign=lambda parts: self.events.append(("assign", parts)),
                         on_revoke=revoked)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.client.poll_batch(100, 0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def wait_for(condition, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_second_member_splits_partitions_and_callbacks_report_each_move(
    topic_factory, group_id, client_factory
):
    topic = topic_factory(partitions=4)
    everything = [(topic, p) for p in range(4)]
    a = PollingMember(client_factory(group_id), topic)
    assert wait_for(lambda: a.events == [("assign", everything)])

    b = PollingMember(client_factory(group_id), topic)
    assert wait_for(lambda: len(a.events) == 3 and len(b.events) == 1)
    a.stop()
    b.stop()

    # Eager rebalancing: the first member gives everything back, then gets its half.
    a_half, b_half = a.events[2][1], b.events[0][1]
    assert a.events == [("assign", everything), ("revoke", everything), ("assign", a_half)]
    assert b.events == [("assign", b_half)]
    assert sorted(a_half + b_half) == everything
    assert len(a_half) == len(b_half) == 2
    assert a.client.assignment() == set(a_half)

    b.client.close()  # leaves the group at once
    a = PollingMember(a.client, topic)
    assert wait_for(lambda: len(a.events) == 2)
    a.stop()
    assert a.events == [("revoke", a_half), ("assign", everything)]


def test_a_member_whose_join_gives_it_no_partition_hears_of_it(
    topic_factory, group_id, client_factory
):
    # Its on_assign with none is how a worker whose consumer was opened again (after broker
    # trouble) learns that the partitions it held are another member's now.
    topic = topic_factory(partitions=1)
    a = PollingMember(client_factory(group_id), topic)
    try:
        assert wait_for(lambda: a.events == [("assign", [(topic, 0)])])
        b = PollingMember(client_factory(group_id), topic)
        try:
            assert wait_for(lambda: len(a.events) == 3 and len(b.events) == 1, 30), (
                a.events, b.events)
        finally:
            b.stop()
    finally:
        a.stop()
    # (eager: a gives its partition back, then one of the two gets it)
    assert sorted([a.events[2], b.events[0]]) == [("assign", []), ("assign", [(topic, 0)])], (
        a.events, b.events)


@pytest.mark.parametrize("client_kind", ["confluent"])  # kafka-python's revoke is replayed
def test_a_commit_inside_the_revoke_callback_is_answered_there(  # after the fact: no commit
    topic_factory, group_id, client_factory
):
    # The worker's last commit before a revocation runs inside the callback. librdkafka
    # answers a commit made there from another thread only after the callback returned:
    # every revocation cost the commit's timeout, then a reconnect (the confluent client's
    # commit runs on a thread of its own elsewhere, to be bounded).
    topic = topic_factory(partitions=2)
    commits: list[tuple[str, float]] = []

    def commit_before_revoking(parts) -> None:
        started = time.monotonic()
        try:
            a.client.commit(dict.fromkeys(parts, 0), timeout_s=5)
            commits.append(("committed", time.monotonic() - started))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            commits.append((repr(exc), time.monotonic() - started))

    a = PollingMember(client_factory(group_id), topic, on_revoke=commit_before_revoking)
    assert wait_for(lambda: len(a.events) == 1)
    b = PollingMember(client_factory(group_id), topic)
    assert wait_for(lambda: len(a.events) == 3 and len(b.events) == 1)
    a.stop()
    b.stop()
    assert [outcome for outcome, _ in commits] == ["committed"], commits
    assert commits[0][1] < 4


def test_a_client_closed_while_its_join_is_held_leaves_the_group_at_once(
    topic_factory, group_id, client_factory, client_kind, caplog
):
    # A worker stopped in its first seconds: the broker holds the member's JoinGroup (the local
    # one about half the session timeout, here ~7 s). A consumer's own leave request queued
    # behind it on the coordinator's connection, timed out after close's 5 s (kafka-python:
    # with an ERROR), and the member it left behind held up the group's next member: with
    # kafka-python not assigned in 120 s on the local broker.
    caplog.set_level(logging.INFO, logger="streamer.kafka")
    topic = topic_factory(partitions=2)
    timeouts = {"session_timeout_ms": 14_000, "heartbeat_interval_ms": 1_000}
    client = client_factory(group_id, **timeouts)
    client.subscribe([topic])
    assert client.poll_batch(10, timeout_s=1.0) == []  # the join is held
    assert client.assignment() == set()
    member = (client._consumer._coordinator._generation.member_id
              if client_kind == "kafka-python" else client._consumer.memberid())
    started = time.monotonic()
    client.close(timeout_s=5.0)
    left = [r.getMessage() for r in caplog.records if "admin connection" in r.getMessage()]
    assert left == [f"left group {group_id} through an admin connection (member {member})"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    if client_kind != "kafka-python":
        # librdkafka's close sends its own leave as well, answered once the broker answers
        # the held join: Apache Kafka does at once (the member removed). The local broker
        # answers it at its end, and its group then assigns no later member (with or without
        # the removal: docs/test-broker.md), so the rest is kafka-python's alone here.
        return
    assert time.monotonic() - started < 4.0  # kafka-python sent no leave of its own
    follower = client_factory(group_id, **timeouts)
    follower.subscribe([topic])
    deadline = time.monotonic() + 90  # ~27 s here: the old member's join, then its own
    while not follower.assignment() and time.monotonic() < deadline:
        follower.poll_batch(10, timeout_s=0.5)
    assert follower.assignment() == {(topic, 0), (topic, 1)}


def test_closing_a_client_runs_no_rebalance_callback(topic_factory, group_id, client_factory):
    # A worker checkpoints before it closes; a revoke run by close() (librdkafka's) found the
    # checkpoint writer stopped and copied the whole learner for nothing.
    topic = topic_factory(partitions=2)
    member = PollingMember(client_factory(group_id), topic)
    assert wait_for(lambda: len(member.events) == 1)
    member.stop()
    member.client.close()
    assert member.events == [("assign", [(topic, 0), (topic, 1)])]


def test_lag_is_highwater_minus_position(
    topic_factory, group_id, client_factory, produce_raw, poll_until
):
    topic = topic_factory(partitions=1)
    produce_raw(topic, [(None, b"x")] * 10)
    client = client_factory(group_id)
    client.subscribe([topic])

    first = poll_until(client, 1, max_records=3)
    assert len(first) == 3
    assert client.lag() == {(topic, 0): 7}

    poll_until(client, 7)
    assert client.lag() == {(topic, 0): 0}

    produce_raw(topic, [(None, b"y")] * 5)
    poll_until(client, 1, max_records=1)
    assert client.lag() == {(topic, 0): 4}


def test_a_partition_resumed_at_its_end_reports_no_lag_before_any_record(
    topic_factory, group_id, client_factory, produce_raw
):
    # A worker restarted on a caught-up input: its checkpoint seeks each partition to the end.
    # librdkafka reports no position until a record is read, so the lag gauge had no series
    # for any partition (kafka-python's: 0).
    topic = topic_factory(partitions=1)
    produce_raw(topic, [(None, b"x")] * 10)
    client = client_factory(group_id)
    client.subscribe([topic], on_assign=lambda parts: client.seek({p: 10 for p in parts}))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not client.lag():
        assert client.poll_batch(10, timeout_s=0.2) == []
    assert client.lag() == {(topic, 0): 0}


def test_failing_on_assign_hands_the_same_records_out_again(
    topic_factory, group_id, client_factory, produce_raw, poll_until
):
    topic = topic_factory(partitions=1)
    produce_raw(topic, [(None, f"{i}".encode()) for i in range(3)])
    calls = []

    def on_assign(parts):
        calls.append(parts)
        if len(calls) == 1:
            raise RuntimeError("state store not ready")

    client = client_factory(group_id)
    client.subscribe([topic], on_assign=on_assign)
    with pytest.raises(RuntimeError, match="state store not ready"):
        poll_until(client, 3)

    assert [r.offset for r in poll_until(client, 3)] == [0, 1, 2]


def test_client_without_a_broker_raises_broker_unavailable_quickly(consumer_timeouts,
                                                                   client_kind):
    connection = KafkaConnection(f"127.0.0.1:{free_port()}", bootstrap_timeout_s=0.5)
    started = time.monotonic()

    with pytest.raises(BrokerUnavailable, match="connecting"):
        open_client(client_kind, connection, ConsumerSettings("g", **consumer_timeouts),
                    ProducerSettings())

    assert time.monotonic() - started < 5


def test_the_clients_log_lines_go_through_python_logging_not_straight_to_stderr(
    consumer_timeouts, client_kind, capfd, caplog
):
    # librdkafka printed its own lines to stderr ("%3|...|FAIL|...| Connect to ... failed"):
    # not in the worker's format, not JSON with STREAMER_LOG__FORMAT=json, never thinned (320
    # in a 35 s outage). They now reach the "librdkafka" logger, as kafka-python's reach "kafka".
    caplog.set_level(logging.WARNING)
    connection = KafkaConnection(f"127.0.0.1:{free_port()}", bootstrap_timeout_s=0.5)
    with pytest.raises(BrokerUnavailable):
        open_client(client_kind, connection, ConsumerSettings("g", **consumer_timeouts),
                    ProducerSettings())
    library = "kafka" if client_kind == "kafka-python" else "librdkafka"
    refused = [r for r in caplog.records if r.name.split(".")[0] == library
               and "refused" in r.getMessage().lower()]
    assert refused, [(r.name, r.getMessage()) for r in caplog.records]
    assert "refused" not in capfd.readouterr().err.lower()


def _client_of_readings(broker: LocalBroker, client_kind: str, timeouts: dict[str, int],
                        unreachable_after_s: float):
    """A client of group "worker" on ``broker``, whose topic "readings" (1 partition) exists."""
    ensure_topics(broker.bootstrap, {"readings": 1})
    connection = KafkaConnection(broker.bootstrap, bootstrap_timeout_s=2.0)
    settings = ConsumerSettings("worker", **timeouts, unreachable_after_s=unreachable_after_s)
    return open_client(client_kind, connection, settings, ProducerSettings())


def test_outage_surfaces_broker_unavailable_and_client_recovers_after_restart(
    consumer_timeouts, poll_until, client_kind
):
    with LocalBroker() as broker:
        client = _client_of_readings(broker, client_kind, consumer_timeouts, 1.0)
        try:
            client.subscribe(["readings"])
            client.wait(client.send([OutputRecord("readings", b"k", b"before")]), 5)
            assert [r.value for r in poll_until(client, 1)] == [b"before"]

            broker.kill()
            with pytest.raises(BrokerUnavailable, match="producing 1 records"):
                client.wait(client.send([OutputRecord("readings", b"k", b"lost")]), 1)
            with pytest.raises(BrokerUnavailable, match="no connection") as down:
                poll_until(client, 1, timeout_s=5)
            if client_kind == "confluent":  # what librdkafka reported, not only "no connection"
                assert "(the last attempt: " in str(down.value), down.value

            broker.start()  # same port, empty memory storage
            ensure_topics(broker.bootstrap, {"readings": 1})
            client.wait(client.send([OutputRecord("readings", b"k", b"after")]), 10)
            deadline = time.monotonic() + 20
            values: list = []
            while not values and time.monotonic() < deadline:
                try:
                    values = [r.value for r in client.poll_batch(10, 0.5)]
                except BrokerUnavailable:
                    time.sleep(0.2)  # the worker's backoff while kafka-python reconnects
            assert values == [b"after"]
        finally:
            client.close(timeout_s=1.0)


@pytest.mark.parametrize("client_kind", ["confluent"])  # kafka-python logs on its IO thread
def test_librdkafkas_producer_lines_come_while_the_worker_only_polls(
    consumer_timeouts, client_kind, caplog
):
    # librdkafka serves a client's log lines when that client is polled; the producer was
    # polled only while sending, so an idle worker's producer said nothing of an outage.
    caplog.set_level(logging.WARNING)

    def producer_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == "librdkafka" and "#producer" in r.getMessage()]

    with LocalBroker() as broker:
        client = _client_of_readings(broker, client_kind, consumer_timeouts, 60.0)
        try:
            client.subscribe(["readings"])
            client.wait(client.send([OutputRecord("readings", b"k", b"v")]), 5)
            broker.kill()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not producer_lines():
                client.poll_batch(10, 0.2)
            assert producer_lines()
        finally:
            client.close(timeout_s=1.0)


def test_a_commit_to_a_broker_that_stopped_answering_gives_up_at_its_timeout(
    consumer_timeouts, poll_until, client_kind
):
    # librdkafka's synchronous commit takes no timeout: it waited past 90 s for a frozen
    # broker, and the worker's loop with it.
    with LocalBroker() as broker:
        ensure_topics(broker.bootstrap, {"readings": 1})
        connection = KafkaConnection(broker.bootstrap, bootstrap_timeout_s=2.0)
        settings = ConsumerSettings("worker", **consumer_timeouts)
        client = open_client(client_kind, connection, settings, ProducerSettings())
        try:
            client.subscribe(["readings"])
            client.wait(client.send([OutputRecord("readings", b"k", b"v")] * 3), 5)
            assert len(poll_until(client, 3)) == 3
            client.commit({("readings", 0): 1}, timeout_s=5)

            broker.freeze()
            try:
                started, error = time.monotonic(), None
                try:
                    client.commit({("readings", 0): 2}, timeout_s=1)
                except BrokerUnavailable as exc:
                    error = exc
                # (It returned twice in CI, once per client, not reproduced here: say how.)
                assert error is not None and "committing offsets" in str(error), (
                    f"the commit returned {error!r} after {time.monotonic() - started:.2f} s; "
                    f"broker stopped: {broker_module._threads_stopped(broker._proc.pid)}")
                assert time.monotonic() - started < 10
            finally:
                broker.thaw()
            deadline, committed = time.monotonic() + 30, False
            while not committed and time.monotonic() < deadline:
                try:
                    client.commit({("readings", 0): 3}, timeout_s=5)
                    committed = True
                except BrokerUnavailable:
                    time.sleep(0.2)  # the one left in the background has not returned yet
            assert committed
        finally:
            client.close(timeout_s=5.0)
        again = open_client(client_kind, connection, settings, ProducerSettings())
        try:  # a new member of the group resumes from the last commit
            again.subscribe(["readings"])
            again.wait(again.send([OutputRecord("readings", b"k", b"w")]), 5)
            assert [r.offset for r in poll_until(again, 1)] == [3]
        finally:
            again.close(timeout_s=1.0)


def test_a_confluent_client_whose_commit_gave_up_raises_on_poll_and_closes_once_it_returns(
    consumer_timeouts, poll_until
):
    # While librdkafka's commit waits for a broker that stopped answering, every call on the
    # consumer waits too: the worker's next poll hung as long as the broker did. It raises
    # now, so the worker closes the client and reconnects. The consumer was then left to the
    # garbage collector (it and the client refer to each other), so it stayed in the group,
    # heartbeating, with nobody serving its rebalances; it is closed once the commit returns.
    with LocalBroker() as broker:
        ensure_topics(broker.bootstrap, {"readings": 1})
        connection = KafkaConnection(broker.bootstrap, bootstrap_timeout_s=2.0)
        settings = ConsumerSettings("worker", **consumer_timeouts)
        client = open_client("confluent", connection, settings, ProducerSettings())
        client.subscribe(["readings"])
        client.wait(client.send([OutputRecord("readings", b"k", b"v")] * 3), 5)
        assert len(poll_until(client, 3)) == 3
        broker.freeze()
        try:
            with pytest.raises(BrokerUnavailable, match="committing offsets"):
                client.commit({("readings", 0): 2}, timeout_s=1)
            raised: list[BaseException] = []
            poll = threading.Thread(target=_raised, args=(raised, client.poll_batch, 10, 0.5),
                                    daemon=True)  # blocked, it would wait for the thaw below
            poll.start()
            poll.join(5)
            assert len(raised) == 1 and isinstance(raised[0], BrokerUnavailable), raised
            assert "waiting for the answer to a commit" in str(raised[0])
            started = time.monotonic()
            client.close(timeout_s=1.0)
            assert time.monotonic() - started < 5  # never waits for the broker to answer
        finally:
            broker.thaw()
        deadline = time.monotonic() + 30
        while _consumer_open(client) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _consumer_open(client)


def _raised(raised: list[BaseException], call, *args) -> None:
    try:
        call(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
        raised.append(exc)


def _consumer_open(client) -> bool:
    try:
        client._consumer.assignment()
        return True
    except RuntimeError:  # "Consumer closed"
        return False


def test_auto_offset_reset_latest_skips_what_came_before_a_new_group(
        topic_factory, group_id, client_factory, produce_raw, poll_until):
    topic = topic_factory(1)
    produce_raw(topic, [(b"k", b"old")])
    client = client_factory(group_id, auto_offset_reset="latest")
    client.subscribe([topic])
    assert poll_until(client, 1, timeout_s=3) == []
    produce_raw(topic, [(b"k", b"new")])
    assert [r.value for r in poll_until(client, 1, timeout_s=10)] == [b"new"]


def test_undecodable_batch_stalls_its_partition_at_its_offset_and_the_others_go_on(
    broker, topic_factory, group_id, client_factory, poll_until
):
    topic = topic_factory(partitions=2)
    produce_with_librdkafka(broker.bootstrap, topic, [(b"a", b"before", None, 0),
                                                      (b"b", b"other", None, 1)])
    bad_offset = produce_undecodable(broker.bootstrap, topic, partition=0)
    produce_with_librdkafka(broker.bootstrap, topic, [(b"a", b"after", None, 0)])
    client = client_factory(group_id)
    client.subscribe([topic])

    got, error = [], None
    deadline = time.monotonic() + 15
    while error is None and time.monotonic() < deadline:
        try:
            got += client.poll_batch(500, 0.2)
        except UndecodableBatch as exc:
            error = exc
    assert error is not None, "no UndecodableBatch raised"
    assert (error.partition, error.offset) == ((topic, 0), bad_offset) == ((topic, 0), 1)
    assert "decompress" in error.cause.lower()
    assert client.stalled() == {(topic, 0): error}

    # Nothing at or past the bad batch comes out of partition 0; partition 1 keeps flowing.
    produce_with_librdkafka(broker.bootstrap, topic, [(b"b", b"later", None, 1)])
    got += poll_until(client, 3, timeout_s=3)
    assert sorted((r.partition, r.value) for r in got) == [
        (0, b"before"), (1, b"later"), (1, b"other")]
    assert client.stalled() == {(topic, 0): error}


@pytest.mark.parametrize("compression", [None, "lz4"])
def test_a_record_whose_header_key_is_not_utf8_is_served_and_its_batch_goes_on(
    broker, topic_factory, group_id, client_factory, client_kind, produce_raw, poll_until,
    compression,
):
    # kafka-python failed the whole batch (its partition held there for good); confluent-kafka
    # returned from headers() with a UnicodeDecodeError pending, which escaped the poll. 200
    # records with headers first warm the call site up, where CPython skips the check that
    # catches the latter.
    topic = topic_factory(partitions=1)
    produce_raw(topic, [(b"s1", b"warm", [("h", b"v")])] * 200)
    first = produce_with_header_key(broker.bootstrap, topic, 0, b"\xff\xfeid",
                                    [b"before", b"with", b"after"], bad=1,
                                    compression_type=compression)
    produce_raw(topic, [(b"s1", b"later")])
    client = client_factory(group_id)
    client.subscribe([topic])

    got = [(r.offset, r.key, r.value, r.headers) for r in poll_until(client, 204)]
    assert first == 200 and client.stalled() == {}
    # kafka-python reads the bytes outside ASCII of that key as "?"; librdkafka's client
    # gives no way to read a record's headers once one key is not UTF-8.
    served = ([("é", b"1"), ("??id", b"v")] if client_kind == "kafka-python" else [])
    assert got[199:] == [(199, b"s1", b"warm", [("h", b"v")]),
                         (200, b"s1", b"before", [("h", b"v")]),
                         (201, b"s1", b"with", served),
                         (202, b"s1", b"after", [("h", b"v")]),
                         (203, b"s1", b"later", [])]


def test_kafka_python_clients_warn_of_a_stalled_io_thread_only_past_a_second(broker):
    # kafka-python warns at 0.1 s, which every worker hit whenever its serving thread held the
    # interpreter (a training update): a warning nobody could act on.
    from kafka import KafkaConsumer

    from streamer.kafka.connection import IO_STALL_WARNING_S

    consumer = KafkaConnection(broker.bootstrap).kafka_python(KafkaConsumer)
    try:
        assert consumer._client._net.config["slow_task_threshold_secs"] == IO_STALL_WARNING_S
    finally:
        consumer.close()
    assert IO_STALL_WARNING_S >= 1.0  # a second, not kafka-python's own 0.1 s


@pytest.mark.parametrize("factory", ["KafkaConsumer", "KafkaAdminClient"])
def test_kafka_python_clients_close_their_connections_only_once_their_io_thread_stopped(
        broker, factory):
    # kafka-python 3.0.12 closed them from the calling thread while its IO thread still ran
    # their tasks: now and then one was cancelled as it ran ("generator already executing",
    # a traceback on the demo's Ctrl-C), and requests in flight failed mid-step.
    import kafka

    client = KafkaConnection(broker.bootstrap).kafka_python(getattr(kafka, factory))
    io_thread, manager = client._net._io_thread, client._client._manager
    assert io_thread is not None and io_thread.is_alive()
    io_thread_alive_at_close: list[bool] = []
    close_connections = manager.close

    def recording_close(*args, **kwargs):
        io_thread_alive_at_close.append(io_thread.is_alive())
        return close_connections(*args, **kwargs)

    manager.close = recording_close
    client.close()
    assert io_thread_alive_at_close == [False]


def test_connecting_to_no_broker_again_and_again_leaves_no_io_thread_behind():
    # kafka-python 3 starts a network thread before it bootstraps and kept it when that failed:
    # a worker retrying through an outage gained a thread (and a socket pair) per attempt.
    def io_threads() -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith("kafka-io"))

    connection = KafkaConnection(f"127.0.0.1:{free_port()}", bootstrap_timeout_s=0.3)
    before = io_threads()
    for _ in range(3):
        with pytest.raises(BrokerUnavailable):
            ensure_topics(connection, {"never": 1})
        with pytest.raises(BrokerUnavailable):
            open_client("kafka-python", connection, ConsumerSettings(group_id="g"),
                        ProducerSettings())
    assert io_threads() == before


def test_a_kafka_python_record_without_a_timestamp_becomes_one_stamped_minus_one():
    # The oldest record format (magic 0) has none: None compared with 0 raised in the codec.
    from kafka.consumer.fetcher import ConsumerRecord

    from streamer.kafka.kafka_python_client import input_record

    fields = dict.fromkeys(ConsumerRecord._fields)
    old = ConsumerRecord(**{**fields, "topic": "t", "partition": 0, "offset": 7,
                            "timestamp": None, "key": b"s1", "value": b"{}", "headers": []})
    assert input_record(old).timestamp_ms == -1
    assert input_record(old._replace(timestamp=1_765_000_000_000)).timestamp_ms == (
        1_765_000_000_000)


def test_a_join_that_finishes_between_two_polls_is_not_thrown_away(
    topic_factory, group_id, client_factory, client_kind
):
    # kafka-python 3.0.12 replaced a join task that had finished while the caller was between
    # two polls with a new JoinGroup, its assignment never read: a worker busy between polls
    # (stepping the model) or a loaded machine joined again and again, never assigned.
    topic = topic_factory(partitions=2)
    client = client_factory(group_id)  # tests' session: the broker holds a join ~1 s
    client.subscribe([topic])
    deadline = time.monotonic() + 30
    while not client.assignment() and time.monotonic() < deadline:
        client.poll_batch(10, timeout_s=0.05)  # returns before the broker answers the join
        time.sleep(2.0)  # busy: the join finishes meanwhile
    assert client.assignment() == {(topic, 0), (topic, 1)}
