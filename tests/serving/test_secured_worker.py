"""The worker against a cluster that requires SASL (tests/broker_proxy.py in front of the local
broker): it forecasts through SCRAM over TLS, and credentials the brokers refuse stop it at
start-up with a configuration error (exit 2) instead of being retried as an outage. (With
either client the first refusal comes from kafka-python's admin client, which makes the output
topics; tests/kafka/test_sasl.py has each client's own.)"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from streamer.kafka import KafkaConnection, ensure_topics
from tests.broker_proxy import ProxiedBroker, make_tls_files
from tests.conftest import TLS_KEY_PASSWORD
from tests.serving.conftest import WorkerProcess, reading, wait_for, worker_env

pytestmark = pytest.mark.broker

USERS = {"streamer": "pw-streamer"}
TOPICS = ("secured-in", "secured-out", "secured-dlq")


def _worker(broker: ProxiedBroker, client_kind: str, tls_files, password: str, tmp_path,
            group: str, cafile: Path | None = None, **more: str) -> WorkerProcess:
    env = worker_env(broker.bootstrap, client_kind, TOPICS, group, "w1",
                     tmp_path / "checkpoints", **more,
                     STREAMER_KAFKA__SECURITY_PROTOCOL="SASL_SSL",
                     STREAMER_KAFKA__SSL_CAFILE=str(cafile or tls_files["ca"]),
                     STREAMER_KAFKA__SASL_MECHANISM="SCRAM-SHA-512",
                     STREAMER_KAFKA__SASL_USERNAME="streamer",
                     STREAMER_KAFKA__SASL_PASSWORD=password)
    return WorkerProcess(env, tmp_path / "worker.log")


@contextlib.contextmanager
def _secured_worker(tls_files, client_kind: str, group: str, tmp_path, users: dict[str, str],
                    partitions: int) -> Iterator[tuple[ProxiedBroker, KafkaConnection,
                                                       WorkerProcess]]:
    """A broker that requires SCRAM over TLS of ``users`` (changes to the dict apply to the
    next logins), its input topic, the test's own connection, and a worker started with the
    password of USERS."""
    with ProxiedBroker(tmp_path / "broker.log", tls_files=tls_files, mutual=False,
                       sasl_users=users) as broker:
        connection = KafkaConnection(
            broker.bootstrap, security_protocol="SASL_SSL", ssl_cafile=str(tls_files["ca"]),
            sasl_mechanism="SCRAM-SHA-512", sasl_plain_username="streamer",
            sasl_plain_password=USERS["streamer"])
        ensure_topics(connection, {TOPICS[0]: partitions})
        yield broker, connection, _worker(broker, client_kind, tls_files, USERS["streamer"],
                                          tmp_path, group).start()


def _produce(connection: KafkaConnection, numbers) -> None:
    """Readings ``numbers`` of sensors s0, s1, s2 (one minute apart per sensor)."""
    producer = connection.kafka_python(KafkaProducer, acks="all")
    for i in numbers:
        key, value = reading(f"s{i % 3}", 1.7e9 + 60.0 * (i // 3), float(i % 7))
        producer.send(TOPICS[0], key=key, value=value)
    producer.flush(10)
    producer.close()


class _Forecasts:
    """The output topic read from its start; ``read()`` polls once, returns the count."""

    def __init__(self, connection: KafkaConnection) -> None:
        self.forecasts: list[dict] = []
        self._consumer = connection.kafka_python(KafkaConsumer, auto_offset_reset="earliest",
                                                 enable_auto_commit=False)
        self._consumer.subscribe([TOPICS[1]])

    def read(self) -> int:
        for batch in self._consumer.poll(timeout_ms=200).values():
            self.forecasts.extend(json.loads(r.value) for r in batch)
        return len(self.forecasts)

    def close(self) -> None:
        self._consumer.close()


def test_a_worker_forecasts_through_a_cluster_that_requires_scram_over_tls(
        tls_files, client_kind, group_id, tmp_path):
    with _secured_worker(tls_files, client_kind, group_id, tmp_path, USERS,
                         partitions=2) as (broker, connection, worker):
        try:
            worker.wait_ready()
            _produce(connection, range(30))
            consumer = _Forecasts(connection)
            try:
                wait_for(lambda: consumer.read() >= 30, 60, "30 forecasts", worker.log)
            finally:
                consumer.close()
            forecasts = consumer.forecasts
        finally:
            worker.stop()
        assert sorted((f["partition"], f["offset"]) for f in forecasts) == sorted(
            {(f["partition"], f["offset"]) for f in forecasts})  # each reading once
        assert {f["sensor_id"] for f in forecasts} == {"s0", "s1", "s2"}
        assert set(broker.authenticated) == {("SCRAM-SHA-512", "streamer")}
        assert broker.refused == []


def _exit_status_and_log(worker: WorkerProcess) -> tuple[int | None, str]:
    """How the worker exited within a minute (the 10 s bootstrap timeout, then out; None: still
    retrying, then stopped), and its log."""
    try:
        status = worker.wait(timeout_s=60)
    except subprocess.TimeoutExpired:
        status = None
    finally:
        worker.stop()
    return status, worker.log()


@pytest.mark.parametrize("log_level", ["INFO", "CRITICAL"])
def test_a_worker_whose_credentials_the_brokers_refuse_exits_with_a_configuration_error(
        tls_files, client_kind, group_id, tmp_path, log_level):
    # (at CRITICAL, kafka-python's records that say why were not made: retried for ever)
    with ProxiedBroker(tmp_path / "broker.log", tls_files=tls_files, mutual=False,
                       sasl_users=USERS) as broker:
        worker = _worker(broker, client_kind, tls_files, "not-the-password", tmp_path,
                         group_id, STREAMER_LOG__LEVEL=log_level).start()
        started = time.monotonic()
        status, log = _exit_status_and_log(worker)
        assert status == 2, f"exit status {status}\n{log}"
        assert "invalid configuration" in log and "STREAMER_KAFKA__SASL_PASSWORD" in log, log
        assert "refused the credentials" in log and "Authentication failed" in log, log
        assert broker.authenticated == [] and broker.refused
        print(f"exited {time.monotonic() - started:.1f} s after start")


def test_a_worker_that_does_not_trust_the_brokers_certificate_exits_with_a_configuration_error(
        tls_files, client_kind, group_id, tmp_path):
    # Its CA file holds another CA than the one that signed the brokers' certificate.
    (tmp_path / "other").mkdir()
    other_ca = make_tls_files(tmp_path / "other", TLS_KEY_PASSWORD)["ca"]
    with ProxiedBroker(tmp_path / "broker.log", tls_files=tls_files, mutual=False,
                       sasl_users=USERS) as broker:
        worker = _worker(broker, client_kind, tls_files, USERS["streamer"], tmp_path,
                         group_id, cafile=other_ca).start()
        status, log = _exit_status_and_log(worker)
        assert status == 2, f"exit status {status}\n{log}"
        assert "invalid configuration" in log and "STREAMER_KAFKA__SSL_CAFILE" in log, log
        assert "TLS certificate was not trusted" in log, log
        assert "certificate verify failed" in log.lower(), log
        assert broker.authenticated == []  # (no further than the TLS handshake)
        assert broker.refused and all("UNKNOWN_CA" in why for why in broker.refused), (
            broker.refused)


def test_credentials_refused_after_the_worker_connected_are_retried_until_accepted_again(
        tls_files, client_kind, group_id, tmp_path):
    # Passwords rotated on the brokers before the worker's: an outage to ride out (not ready,
    # saying why), not an exit; it forecasts again once its credentials are accepted.
    users = dict(USERS)
    with _secured_worker(tls_files, client_kind, group_id, tmp_path, users,
                         partitions=1) as (broker, connection, worker):
        try:
            worker.wait_ready()
            _produce(connection, range(0, 9))
            consumer = _Forecasts(connection)
            wait_for(lambda: consumer.read() >= 9, 60, "9 forecasts", worker.log)
            users["streamer"] = "rotated"
            broker.drop_connections()
            wait_for(lambda: "refused the credentials" in worker.log(), 90,
                     "the refusal, logged", worker.log)
            assert worker.proc.poll() is None, worker.log()
            assert worker.get("/readyz")[0] != 200
            users["streamer"] = USERS["streamer"]  # (the worker's password accepted again)
            _produce(connection, range(9, 18))
            wait_for(lambda: consumer.read() >= 18, 120, "18 forecasts", worker.log)
            consumer.close()
            assert worker.proc.poll() is None, worker.log()
        finally:
            worker.stop()
