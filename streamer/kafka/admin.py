"""Explicit topic creation and deletion (never rely on a broker's auto-creation)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import kafka.errors as kerr
from kafka import KafkaAdminClient
from kafka.admin import MemberToRemove

from streamer.kafka.connection import KafkaConnection
from streamer.kafka.errors import (
    BrokerUnavailable,
    KafkaClientError,
    TopicCreationRefused,
    TopicMissing,
    converted_errors,
)

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = kerr.TopicAlreadyExistsError.errno
_UNKNOWN_TOPIC = kerr.UnknownTopicOrPartitionError.errno
_NO_TOPIC_ID = "00000000-0000-0000-0000-000000000000"  # what a broker without topic ids sends


@contextmanager
def admin_client(connection: KafkaConnection, **settings: Any) -> Iterator[KafkaAdminClient]:
    """A connected admin client (``settings``: KafkaAdminClient's), closed on exit;
    BrokerUnavailable if none answers."""
    admin = connection.kafka_python(KafkaAdminClient, "connecting the admin client", **settings)
    try:
        yield admin
    finally:
        admin.close()


def ensure_topics(
    connection: KafkaConnection | str,
    partitions: Mapping[str, int],
    *,
    replication_factor: int = -1,
    timeout_s: float = 10.0,
    configs: Mapping[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; return the names actually created.

    ``replication_factor=-1`` takes the broker's default, which is what production clusters
    configure; ``configs`` (e.g. ``cleanup.policy``) apply to the topics created here; an
    existing topic is left as it is, whatever its partition count and configs. Only missing
    topics are asked for: Kafka checks the permission to create before whether a topic
    exists, so a cluster whose ACLs allow using a topic but not creating one would refuse
    even an existing one (the model topic's thread retried that for ever, sharing nothing).
    """
    for name, count in partitions.items():
        if count < 1:
            raise ValueError(f"topic {name!r} needs at least 1 partition, got {count}")
    if not partitions:
        return []
    with admin_client(KafkaConnection.of(connection)) as admin:
        with converted_errors("listing topics"):
            existing = set(admin.list_topics())
        return _create(admin, {name: count for name, count in partitions.items()
                               if name not in existing},
                       replication_factor=replication_factor, timeout_s=timeout_s,
                       configs=configs)


def _create(admin: KafkaAdminClient, partitions: Mapping[str, int], *,
            replication_factor: int = -1, timeout_s: float = 10.0,
            configs: Mapping[str, str] | None = None) -> list[str]:
    """Ask for exactly these topics (known to be missing); the names created."""
    if not partitions:
        return []
    spec = {
        name: {"num_partitions": count, "replication_factor": replication_factor,
               **({"configs": dict(configs)} if configs else {})}
        for name, count in partitions.items()
    }
    with converted_errors("creating topics"):
        result = admin.create_topics(spec, timeout_ms=int(timeout_s * 1000), raise_errors=False)
    created = created_topics(result["topics"])
    if created:
        log.info("created topics %s", sorted(created))
    return created


def created_topics(answers: Iterable[Mapping]) -> list[str]:
    """The names a CreateTopics answer created (an existing topic is not an error).

    A retriable error code (a timeout, no controller yet) is BrokerUnavailable: try again
    later; any other (no permission, a policy, too few brokers for the replication factor) is
    TopicCreationRefused: only an operator can fix it.
    """
    created = []
    for topic in answers:
        code = topic["error_code"]
        if code == 0:
            created.append(topic["name"])
        elif code != _TOPIC_ALREADY_EXISTS:
            error = kerr.for_code(code)
            kind = BrokerUnavailable if error.retriable else TopicCreationRefused
            raise kind(f"creating topic {topic['name']!r} failed: {error.__name__}: "
                       f"{topic.get('error_message') or error.description}")
    return created


def create_missing_topics(
    connection: KafkaConnection | str, names: Iterable[str], *, like: str
) -> list[str]:
    """Create those of ``names`` the cluster does not have, with as many partitions as the topic
    ``like``; return the names created.

    Only missing topics are asked for, so a cluster whose ACLs allow writing to a topic but not
    creating one never refuses a start-up whose topics exist. TopicMissing (nothing created)
    when ``like`` is missing, whether or not any of ``names`` are: their partition count is
    not known, and a topic's partitions cannot be taken back once created. TopicCreationRefused
    when the cluster will not create one (permissions, policy, replication factor).
    """
    wanted = list(dict.fromkeys(names))
    with admin_client(KafkaConnection.of(connection)) as admin:
        with converted_errors("listing topics"):
            existing = set(admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if like not in existing:  # (a topic these credentials may not describe is not listed)
            raise TopicMissing(f"topic {like!r} does not exist" + (
                f", so {missing} were not created (they take its partition count)"
                if missing else ""))
        if not missing:
            return []
        with converted_errors("describing topics"):
            described = admin.describe_topics([like])
        partitions = max((len(t.get("partitions") or ()) for t in described), default=0)
        if not partitions:  # just created (no leader yet) or deleted meanwhile: ask again later
            raise BrokerUnavailable(f"topic {like!r} has no partitions yet, so {missing} were "
                                    "not created (they take its partition count)")
        return _create(admin, dict.fromkeys(missing, partitions))


def topic_ids(connection: KafkaConnection | str, names: Iterable[str]) -> dict[str, str | None]:
    """The id of each of the topics ``names`` that exists and has one (brokers since Kafka 2.8;
    a topic deleted and recreated under the same name gets a new one), and None for each the
    brokers say does not exist. Left out: those they say nothing certain of (no id, another
    error such as an authorization refusal)."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    with admin_client(KafkaConnection.of(connection)) as admin:
        with converted_errors("describing topics"):
            described = admin.describe_topics(wanted)
    ids: dict[str, str | None] = {}
    for t in described:
        if t.get("error_code") == _UNKNOWN_TOPIC:
            ids[t["name"]] = None
        elif t.get("error_code") == 0 and t.get("topic_id") not in (None, _NO_TOPIC_ID):
            ids[t["name"]] = str(t["topic_id"])
    return ids


def delete_topics(
    connection: KafkaConnection | str, names: Iterable[str], *, timeout_s: float = 10.0
) -> None:
    """Delete the topics; ones that do not exist are ignored."""
    names = list(names)
    if not names:
        return
    with admin_client(KafkaConnection.of(connection)) as admin:
        with converted_errors("deleting topics"):
            result = admin.delete_topics(names, timeout_ms=int(timeout_s * 1000),
                                         raise_errors=False)
    for topic in result["topics"]:
        code = topic["error_code"]
        if code not in (0, _UNKNOWN_TOPIC):
            error = kerr.for_code(code)
            raise KafkaClientError(f"deleting topic {topic['name']!r} failed: {error.__name__}")


def remove_member(
    connection: KafkaConnection, group_id: str, member_id: str, *, reason: str,
    timeout_s: float = 5.0,
) -> bool:
    """Take one member out of its consumer group, on connections of its own; False when it
    was gone already.

    A consumer sends its own leave request on its connection to the group coordinator, where
    the broker answers requests in order: behind a JoinGroup the broker is holding (until every
    member has joined, or its rebalance delay) the leave waits as long, and a consumer closing
    then gave up on it and left its member in the group, holding up the next member's join.
    This request is answered at once; Apache Kafka completes the held join without the member.
    KafkaClientError when the broker refuses for another reason.
    ``timeout_s`` bounds the whole: a third each to connect, find the coordinator and leave."""
    step_s = timeout_s / 3
    bounded = dataclasses.replace(
        connection, bootstrap_timeout_s=min(connection.bootstrap_timeout_s, step_s))
    with admin_client(bounded, request_timeout_ms=max(int(step_s * 1000), 1)) as admin:
        with converted_errors(f"leaving group {group_id!r}"):
            results = admin.remove_group_members(
                group_id, [MemberToRemove(member_id=member_id, reason=reason)])
    error = next(iter(results.values()), kerr.NoError)
    if error is kerr.UnknownMemberIdError:
        return False
    if error is not kerr.NoError:
        raise KafkaClientError(f"leaving group {group_id!r} failed: {error.__name__}")
    return True


def leave_during_a_join(
    connection: KafkaConnection, group_id: str, member_id: str, timeout_s: float
) -> bool:
    """remove_member for a consumer closing while its join may be under way; whether the
    member is out of the group now (taken out, or gone already). Logs what went wrong; never
    raises."""
    try:
        removed = remove_member(connection, group_id, member_id,
                                reason="the consumer is closing", timeout_s=timeout_s)
    except Exception as exc:  # noqa: BLE001 - the consumer's own close still tries to leave
        log.warning("leaving group %s through an admin connection failed: %s", group_id, exc)
        return False
    if removed:
        log.info("left group %s through an admin connection (member %s)", group_id, member_id)
    else:  # (librdkafka's own leave went first: a member that was not joining)
        log.debug("member %s of group %s was gone already", member_id, group_id)
    return True
