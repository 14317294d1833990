"""HTTP endpoints on the metrics port: /metrics, /healthz (liveness), /readyz (readiness).

The health endpoints are served whether or not metrics are: probes (Kubernetes, the image's
HEALTHCHECK) must not fail because nobody scrapes the worker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)
T = TypeVar("T")

# Returns (ready, reason); the reason is shown with a 503 so an operator sees why.
Readiness = Callable[[], tuple[bool, str]]
Liveness = Callable[[], bool]


class HealthServer:
    """A daemon-threaded HTTP server exposing the worker's health and, unless ``registry`` is
    None (metrics off: /metrics is 404), its metrics."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        *,
        liveness: Liveness,
        readiness: Readiness,
        host: str = "0.0.0.0",
        port: int = 9100,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535 (0 picks a free one), got {port}")
        self._registry = registry
        self._liveness = liveness
        self._readiness = readiness
        self._host = host
        self._requested_port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the ephemeral one when constructed with 0)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in a daemon thread; raises ``OSError`` if the port is taken."""
        if self._server is not None:
            raise RuntimeError("HealthServer already started")
        server = ThreadingHTTPServer((self._host, self._requested_port), self._handler_class())
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="streamer-health", daemon=True
        )
        self._thread.start()
        log.info("health server listening on %s:%d", self._host, self.port)

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        """A handler class bound to this server's registry and callables."""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's naming
                path = urlsplit(self.path).path
                if path == "/metrics" and owner._registry is not None:
                    owner._serve_metrics(self)
                elif path == "/metrics":
                    _reply(self, HTTPStatus.NOT_FOUND,
                           "metrics are off (STREAMER_METRICS__ENABLED=false)\n")
                elif path == "/healthz":
                    owner._serve_health(self)
                elif path == "/readyz":
                    owner._serve_ready(self)
                else:
                    _reply(self, HTTPStatus.NOT_FOUND, "not found\n")

            # Uptime checkers and load balancers probe with HEAD: the same status and headers.
            do_HEAD = do_GET

            def log_message(self, format: str, *args: object) -> None:
                # Probes hit these endpoints every few seconds; keep them out of the worker log.
                log.debug("%s " + format, self.address_string(), *args)

        return Handler

    def _serve_metrics(self, handler: BaseHTTPRequestHandler) -> None:
        """The registry in the format the scraper asked for."""
        encoder, content_type = choose_encoder(handler.headers.get("Accept", ""))
        body = encoder(self._registry)
        _reply(handler, HTTPStatus.OK, body, content_type)

    def _serve_health(self, handler: BaseHTTPRequestHandler) -> None:
        """200 while the process loop is alive, 503 once it has stopped or stalled."""
        if _call_safely(self._liveness, False):
            _reply(handler, HTTPStatus.OK, "ok\n")
        else:
            _reply(handler, HTTPStatus.SERVICE_UNAVAILABLE, "worker loop not alive\n")

    def _serve_ready(self, handler: BaseHTTPRequestHandler) -> None:
        """200 when ready, else 503 with the readiness callable's reason."""
        ready, reason = _call_safely(self._readiness, (False, "readiness check failed"))
        if ready:
            _reply(handler, HTTPStatus.OK, "ready\n")
        else:
            _reply(handler, HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {reason}\n")


def _call_safely(check: Callable[[], T], default: T) -> T:
    """Run a health callable; an exception in it reports unhealthy rather than a 500."""
    try:
        return check()
    except Exception:
        log.exception("health check %r raised", check)
        return default


def _reply(
    handler: BaseHTTPRequestHandler,
    status: HTTPStatus,
    body: str | bytes,
    content_type: str = "text/plain; charset=utf-8",
) -> None:
    """Write a complete response (its headers only, to a HEAD request)."""
    data = body.encode() if isinstance(body, str) else body
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)
