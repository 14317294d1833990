"""`streamer demo`: a local broker, a steady producer and the worker, with one live status line."""

from __future__ import annotations

import logging
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from streamer.config import ConfigError, load_settings
from streamer.core import REJECTION_REASONS, Batch
from streamer.kafka.admin import ensure_topics
from streamer.kafka.broker import LocalBroker
from streamer.observability.logs import configure_logging
from streamer.serving.signals import set_on_signals
from streamer.serving.worker import Worker
from streamer.tools import stdout
from streamer.tools.produce import Pace, produce

STATUS_EVERY_S = 1.0
# What the demo sets for its own broker and worker. These, the port, the feature count, the
# broker's address and the checkpoint directory are the demo's: their STREAMER_* variables
# (a deployment's bootstrap servers, say, in the same shell) are not read (SET_BY_DEMO).
DEMO_SETTINGS = {
    "kafka.group_id": "streamer-demo", "kafka.session_timeout_ms": "6000",
    "kafka.heartbeat_interval_ms": "1000", "kafka.fetch_max_wait_ms": "100",
    "checkpoint.interval_seconds": "30",
}
SET_BY_DEMO = (*DEMO_SETTINGS, "metrics.port", "model.n_features", "kafka.bootstrap_servers",
               "checkpoint.dir")
EXIT_FAILED = 2  # the worker or the producer died: the demo stops rather than run on without


def run_demo(readings: Batch, source: str, pace: Pace, duration: float | None,
             metrics_port: int) -> int:
    """Send ``readings`` (well formed, from the file named ``source``) at ``pace`` and run
    everything until Ctrl-C (or ``duration``, or until the worker or the producer fails: then
    exit status 2); returns the exit status."""
    configure_logging("WARNING")
    overrides = {
        **DEMO_SETTINGS, "metrics.port": str(metrics_port),
        # As many features as the file has value columns: the model fits the file.
        "model.n_features": str(readings.values.shape[1]),
    }
    # A taken port stops the demo here, before the broker starts; 0 becomes the port it got.
    port = bindable_port(load_settings(overrides).metrics.host, metrics_port)
    overrides["metrics.port"] = str(port)
    stop = threading.Event()
    set_on_signals(stop)
    failures: list[tuple[str, Exception]] = []
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="streamer-demo-") as ckpt:
        settings = load_settings({**overrides, "kafka.bootstrap_servers": broker.bootstrap,
                                  "checkpoint.dir": ckpt})
        k = settings.kafka
        topics = {k.input_topic: 4, k.output_topic: 4, k.dlq_topic: 1}
        if k.anomaly_topic is not None:
            topics[k.anomaly_topic] = 1
        ensure_topics(broker.bootstrap, topics)
        worker = Worker(settings)
        worker_thread = _watched("worker", stop, failures, worker.run)
        producer = _watched("producer", stop, failures, produce, readings, k.connection(),
                            k.input_topic, pace, loop=True, stop=stop, settings=k.producer())
        worker_thread.start()
        producer.start()
        metrics_url = f"http://{_url_host(settings.metrics.host)}:{port}/metrics"
        # (looped: a file of a few rows comes round again every few milliseconds, and its
        # skill is that of forecasting a repeat; operator pass)
        banner = (f"streamer demo: broker {broker.bootstrap}, {len(readings):,} readings of "
                  f"{len(set(readings.sensor_ids))} sensors from {source} at {pace.rate:g}/s "
                  f"(looped: they come round again every {_duration(len(readings) / pace.rate)}"
                  f"), metrics {metrics_url}. Ctrl-C stops.")
        started = time.monotonic()
        status = StatusLine(worker)
        # A reader of stdout that leaves (`| head`) stops the demo, as Ctrl-C does.
        if not stdout.shown(lambda: print(banner, flush=True)):
            stop.set()
        while not stop.wait(STATUS_EVERY_S):
            if not stdout.shown(status.print):
                stop.set()
            if duration is not None and time.monotonic() - started >= duration:
                stop.set()
        producer.join(timeout=10)
        worker.stop()
        worker_thread.join(timeout=15)
        stdout.shown(lambda: status.print(final=True))
    for name, exc in failures:
        print(f"streamer demo: the {name} failed, so the demo stopped: {exc}", file=sys.stderr)
    logging.getLogger("streamer").info("demo stopped")
    return EXIT_FAILED if failures else 0


def _duration(seconds: float) -> str:
    """``0.002 s``, ``56 s``, ``1.2 h``: how long a round of the looped file takes."""
    if seconds < 100:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"


def bindable_port(host: str, port: int) -> int:
    """``port`` (for 0, a free one), checked bindable on ``host`` as the worker's metrics
    server binds it; a taken one is a ConfigError naming the flag."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
                              "choose another --metrics-port (0 picks a free one)") from exc
        return int(probe.getsockname()[1])


def _url_host(host: str) -> str:
    """Where a browser on this machine reaches a server bound to ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


def _watched(name: str, stop: threading.Event, failures: list[tuple[str, Exception]],
             target: Callable[..., object], /, *args: object,
             **kwargs: object) -> threading.Thread:
    """A daemon thread running ``target`` that records the exception it dies of and, however
    it ends, sets ``stop``: the demo never runs on without its worker or producer."""

    def run() -> None:
        try:
            target(*args, **kwargs)
        except Exception as exc:  # reported once the demo has stopped
            failures.append((name, exc))
        finally:
            stop.set()

    return threading.Thread(target=run, name=name, daemon=True)


class StatusLine:
    """Rates and training figures read back from the worker's own metrics registry."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.last = (time.monotonic(), 0.0, 0.0)

    def _get(self, name: str, labels: dict | None = None) -> float:
        return self.worker.registry.get_sample_value(name, labels or {}) or 0.0

    def print(self, final: bool = False) -> None:
        now = time.monotonic()
        consumed = self._get("streamer_readings_consumed_total")
        produced = self._get("streamer_forecasts_produced_total")
        then, consumed0, produced0 = self.last
        dt = max(now - then, 1e-9)
        self.last = (now, consumed, produced)
        dlq = sum(self._get("streamer_dlq_records_total", {"reason": r.label})
                  for r in REJECTION_REASONS)
        model = self._get("streamer_model_abs_error_total")
        naive = self._get("streamer_persistence_abs_error_total")
        # Nothing scored yet (the first seconds, or warm-up): say so rather than print +nan.
        skill = f"{1.0 - model / naive:+.3f}" if naive > 0 else "   n/a"
        line = (f"in {(consumed - consumed0) / dt:7.0f}/s  out {(produced - produced0) / dt:7.0f}/s"
                f"  total {int(produced):>9,}  dlq {int(dlq):>5}  updates "
                f"{int(self._get('streamer_updates_total')):>5}  loss "
                f"{self._get('streamer_update_loss_last'):7.4f}  grad_norm "
                f"{self._get('streamer_grad_norm_last'):7.3f}  skill vs persistence {skill}")
        sys.stdout.write(("\n" if final else "\r") + line + ("\n" if final else ""))
        sys.stdout.flush()
