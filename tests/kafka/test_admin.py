"""Explicit topic creation and deletion against the real local broker."""

from __future__ import annotations

import uuid

import pytest
from kafka import KafkaAdminClient

from streamer.kafka import BrokerUnavailable, KafkaConnection, delete_topics, ensure_topics
from streamer.kafka.admin import create_missing_topics, created_topics, topic_ids
from streamer.kafka.broker import free_port
from streamer.kafka.errors import TopicCreationRefused, TopicMissing
from tests.kafka.test_broker import topics_at

pytestmark = pytest.mark.broker


def partition_counts(bootstrap: str, names: list[str]) -> dict[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, bootstrap_timeout_ms=2000)
    try:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(names)}
    finally:
        admin.close()


def test_ensure_topics_creates_each_topic_with_its_partition_count(broker):
    names = {f"in-{uuid.uuid4().hex[:8]}": 4, f"out-{uuid.uuid4().hex[:8]}": 2}

    created = ensure_topics(broker.bootstrap, names)

    assert sorted(created) == sorted(names)
    assert partition_counts(broker.bootstrap, list(names)) == names
    delete_topics(broker.bootstrap, names)


def test_ensure_topics_is_idempotent_and_creates_only_the_missing(broker):
    old, new = f"old-{uuid.uuid4().hex[:8]}", f"new-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, {old: 3})

    assert ensure_topics(broker.bootstrap, {old: 3, new: 1}) == [new]
    assert ensure_topics(broker.bootstrap, {old: 3, new: 1}) == []
    assert partition_counts(broker.bootstrap, [old, new]) == {old: 3, new: 1}
    delete_topics(broker.bootstrap, [old, new])


def test_deleted_topic_can_be_created_again_and_unknown_names_are_ignored(broker):
    name = f"gone-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, {name: 1})

    delete_topics(broker.bootstrap, [name, f"never-{uuid.uuid4().hex[:8]}"])

    assert ensure_topics(broker.bootstrap, {name: 2}) == [name]
    delete_topics(broker.bootstrap, [name])


def test_zero_partitions_is_refused_before_any_request():
    with pytest.raises(ValueError, match="topic 'x' needs at least 1 partition, got 0"):
        ensure_topics("127.0.0.1:1", {"x": 0})


def test_unreachable_broker_raises_broker_unavailable():
    connection = KafkaConnection(f"127.0.0.1:{free_port()}", bootstrap_timeout_s=0.5)

    with pytest.raises(BrokerUnavailable, match="connecting the admin client"):
        ensure_topics(connection, {"x": 1})


def test_missing_topics_are_created_with_the_partitions_of_the_topic_they_follow(broker):
    like, old = f"in-{uuid.uuid4().hex[:8]}", f"old-{uuid.uuid4().hex[:8]}"
    new = [f"out-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"]
    ensure_topics(broker.bootstrap, {like: 3, old: 1})

    assert create_missing_topics(broker.bootstrap, [old, *new], like=like) == new
    assert create_missing_topics(broker.bootstrap, [old, *new], like=like) == []
    assert partition_counts(broker.bootstrap, [old, *new]) == {old: 1, new[0]: 3, new[1]: 3}
    delete_topics(broker.bootstrap, [like, old, *new])


def test_nothing_is_created_while_the_topic_they_follow_is_missing(broker):
    name = f"out-{uuid.uuid4().hex[:8]}"

    with pytest.raises(TopicMissing, match=f"no-{name}"):
        create_missing_topics(broker.bootstrap, [name], like=f"no-{name}")
    assert name not in topics_at(broker.bootstrap)


def test_the_topic_they_follow_is_reported_missing_even_when_none_of_them_is(broker):
    # The worker's one look at its input topic: made beforehand, its outputs exist already.
    name = f"out-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, {name: 1})
    with pytest.raises(TopicMissing, match=f"topic 'no-{name}' does not exist$"):
        create_missing_topics(broker.bootstrap, [name], like=f"no-{name}")
    delete_topics(broker.bootstrap, [name])


@pytest.mark.parametrize(("code", "error"), [
    (29, TopicCreationRefused),  # TOPIC_AUTHORIZATION_FAILED: an operator must act
    (38, TopicCreationRefused),  # INVALID_REPLICATION_FACTOR: too few brokers
    (44, TopicCreationRefused),  # POLICY_VIOLATION
    (7, BrokerUnavailable),  # REQUEST_TIMED_OUT: retriable, back off and try again
])
def test_a_refused_creation_says_whether_retrying_can_help(code, error):
    # Tansu creates whatever it is asked to, so the cluster's refusals are pinned on the
    # CreateTopics answer itself.
    answers = [{"name": "ok", "error_code": 0}, {"name": "old", "error_code": 36},
               {"name": "out", "error_code": code, "error_message": None}]

    with pytest.raises(error, match="creating topic 'out' failed"):
        created_topics(answers)
    assert created_topics(answers[:2]) == ["ok"]  # 36: TOPIC_ALREADY_EXISTS is no error


def test_a_controller_moving_during_creation_is_broker_unavailable_not_a_crash(broker,
                                                                              monkeypatch):
    # kafka-python raises a bare RuntimeError when the controller moved twice in a row
    def failover(self, *args, **kwargs):
        raise RuntimeError("Failed to find active controller id!")

    monkeypatch.setattr(KafkaAdminClient, "create_topics", failover)
    with pytest.raises(BrokerUnavailable, match="creating topics failed: Failed to find"):
        ensure_topics(broker.bootstrap, {f"t-{uuid.uuid4().hex[:8]}": 1})


def test_existing_topics_are_never_asked_for_again(broker, monkeypatch):
    # A cluster whose ACLs allow using a topic but not creating one answers a CreateTopics
    # for it with TOPIC_AUTHORIZATION_FAILED, existing or not: so none may be sent for it.
    name = f"t-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, {name: 1})

    def refused(self, *args, **kwargs):
        raise AssertionError("CreateTopics sent for a topic that exists")

    monkeypatch.setattr(KafkaAdminClient, "create_topics", refused)
    assert ensure_topics(broker.bootstrap, {name: 1}) == []
    delete_topics(broker.bootstrap, [name])


def test_a_topic_recreated_under_its_name_has_a_new_id_and_a_missing_one_none(broker):
    name = f"ids-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, {name: 1})
    first = topic_ids(broker.bootstrap, [name, f"{name}-missing"])
    assert first[name] and first[f"{name}-missing"] is None  # None: no such topic
    delete_topics(broker.bootstrap, [name])
    ensure_topics(broker.bootstrap, {name: 1})
    again = topic_ids(broker.bootstrap, [name])
    delete_topics(broker.bootstrap, [name])
    assert again[name] and again[name] != first[name]
