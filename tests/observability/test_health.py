"""HealthServer: real HTTP requests against an ephemeral port."""

from __future__ import annotations

import http.client
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from streamer.observability.health import HealthServer
from streamer.observability.metrics import Metrics


class Flags:
    """Mutable liveness/readiness the tests flip."""

    def __init__(self) -> None:
        self.alive = True
        self.ready = False
        self.reason = "waiting for partition assignment"
        self.lock = threading.Lock()

    def liveness(self) -> bool:
        with self.lock:
            return self.alive

    def readiness(self) -> tuple[bool, str]:
        with self.lock:
            return self.ready, self.reason


@pytest.fixture
def flags() -> Flags:
    return Flags()


@pytest.fixture
def server(flags: Flags) -> Iterator[HealthServer]:
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_grad_norm=1.0, device="cpu", coverage_target=0.9)
    metrics.readings_consumed.inc(42)
    with HealthServer(
        registry, liveness=flags.liveness, readiness=flags.readiness, host="127.0.0.1", port=0
    ) as srv:
        yield srv


def get(server: HealthServer, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, 4xx/5xx included."""
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_port_zero_binds_an_ephemeral_port(server: HealthServer) -> None:
    assert server.port > 0


def test_healthz_is_ok_while_the_loop_is_alive_and_503_after(
    server: HealthServer, flags: Flags
) -> None:
    assert get(server, "/healthz")[0::2] == (200, "ok\n")
    flags.alive = False
    status, _, body = get(server, "/healthz")
    assert status == 503
    assert "not alive" in body


def test_readyz_reports_the_reason_until_readiness_flips(
    server: HealthServer, flags: Flags
) -> None:
    assert get(server, "/readyz")[0::2] == (503, "not ready: waiting for partition assignment\n")
    with flags.lock:
        flags.ready = True
    assert get(server, "/readyz")[0::2] == (200, "ready\n")


def test_head_gets_the_status_and_headers_of_get_without_a_body(
    server: HealthServer, flags: Flags
) -> None:
    # Uptime checkers and load balancers probe with HEAD; http.server answers 501 to it.
    def head(path: str) -> tuple[int, str | None, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            conn.request("HEAD", path)
            resp = conn.getresponse()
            return resp.status, resp.headers["Content-Length"], resp.read()
        finally:
            conn.close()

    assert head("/healthz") == (200, "3", b"")
    assert head("/readyz")[::2] == (503, b"")
    with flags.lock:
        flags.ready = True
    assert head("/readyz") == (200, "6", b"")
    assert head("/metrics")[0] == 200 and head("/metrics")[2] == b""
    assert get(server, "/healthz")[0::2] == (200, "ok\n")  # the connection left usable


def test_readyz_is_503_when_the_readiness_check_raises(flags: Flags) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    with HealthServer(
        CollectorRegistry(), liveness=flags.liveness, readiness=broken, host="127.0.0.1", port=0
    ) as srv:
        status, _, body = get(srv, "/readyz")
    assert status == 503
    assert "readiness check failed" in body


def test_metrics_serves_the_injected_registry_in_text_format(server: HealthServer) -> None:
    status, content_type, body = get(server, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert "streamer_readings_consumed_total 42.0" in body
    assert 'streamer_dlq_records_total{reason="not_json"} 0.0' in body


def test_without_a_registry_health_is_served_and_metrics_are_404(flags: Flags) -> None:
    flags.ready = True
    with HealthServer(
        None, liveness=flags.liveness, readiness=flags.readiness, host="127.0.0.1", port=0
    ) as srv:
        assert get(srv, "/healthz")[::2] == (200, "ok\n")
        assert get(srv, "/readyz")[::2] == (200, "ready\n")
        assert get(srv, "/metrics")[::2] == (
            404, "metrics are off (STREAMER_METRICS__ENABLED=false)\n")


def test_unknown_path_is_404(server: HealthServer) -> None:
    assert get(server, "/nope")[0] == 404


def test_stop_releases_the_port_and_is_idempotent(flags: Flags) -> None:
    srv = HealthServer(
        CollectorRegistry(), liveness=flags.liveness, readiness=flags.readiness,
        host="127.0.0.1", port=0,
    )
    srv.start()
    port = srv.port
    srv.stop()
    srv.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_out_of_range_port_is_rejected(flags: Flags) -> None:
    with pytest.raises(ValueError, match="port"):
        HealthServer(
            CollectorRegistry(), liveness=flags.liveness, readiness=flags.readiness, port=70000
        )
