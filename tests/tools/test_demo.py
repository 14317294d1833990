"""`streamer demo`, the README's first command: it serves, and Ctrl-C stops it cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamer.kafka.broker import free_port

ROOT = Path(__file__).resolve().parents[2]


def _demo(*args: str, python: tuple[str, ...] = ("-m", "streamer")) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, *python, "demo", "--metrics-port", str(free_port()), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own process group, as a shell gives a foreground job


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another program is listening on (all addresses), as a second exporter would."""
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _produced(stdout: str) -> int:
    totals = re.findall(r"total\s+([\d,]+)", stdout)
    return int(totals[-1].replace(",", "")) if totals else 0


@pytest.mark.broker
def test_demo_forecasts_the_bundled_sample_and_stops_after_its_duration(broker) -> None:
    # ``broker`` only proves the local broker is installed; the demo starts its own.
    demo = _demo("--duration", "25", "--rate", "500")
    out, err = demo.communicate(timeout=120)
    assert demo.returncode == 0, err[-3000:]
    assert _produced(out) > 1000, out[-2000:]
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.broker
def test_ctrl_c_stops_the_demo_cleanly_without_broker_errors(broker) -> None:
    demo = _demo("--rate", "500")
    serving = time.monotonic() + 15  # broker, topics, worker, first forecasts
    while time.monotonic() < serving:
        assert demo.poll() is None, demo.communicate()[1][-3000:]
        time.sleep(0.5)
    os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    started = time.monotonic()
    out, err = demo.communicate(timeout=60)
    assert demo.returncode == 0, err[-3000:]
    assert time.monotonic() - started < 20, "the demo took too long to stop"
    assert _produced(out) > 0, out[-2000:]
    for symptom in ("Traceback", "KafkaTimeoutError", "NodeNotReady", "Connection refused"):
        assert symptom not in err, err[-3000:]


def test_a_taken_metrics_port_stops_the_demo_before_it_starts_with_exit_2(taken_port) -> None:
    demo = _demo("--metrics-port", str(taken_port), "--duration", "20")
    out, err = demo.communicate(timeout=120)
    assert demo.returncode == 2, (out[-2000:], err[-3000:])
    assert f"cannot serve metrics on 0.0.0.0:{taken_port}" in err and "--metrics-port" in err, err
    assert "Traceback" not in err and "broker" not in out, (out[-2000:], err[-3000:])


# The demo as `streamer demo` runs it, but as if the port were taken after the check that it
# was free: the worker dies as it binds its metrics server.
DEMO_WITHOUT_PORT_CHECK = (
    "import sys; import streamer.tools.demo as demo; "
    "demo.bindable_port = lambda host, port: port; "
    "from streamer.tools.cli import main; sys.exit(main())"
)


@pytest.mark.broker
def test_the_demo_stops_with_exit_2_when_its_worker_dies(broker, taken_port) -> None:
    started = time.monotonic()
    demo = _demo("--metrics-port", str(taken_port), "--duration", "60",
                 python=("-c", DEMO_WITHOUT_PORT_CHECK))
    out, err = demo.communicate(timeout=120)
    assert demo.returncode == 2, (out[-2000:], err[-3000:])
    assert "the worker failed, so the demo stopped: [Errno 98] Address already in use" in err, err
    assert "Traceback" not in err, err[-3000:]
    assert time.monotonic() - started < 45, "the demo ran on without its worker"


@pytest.mark.broker
def test_metrics_port_0_prints_the_port_the_metrics_are_served_on(broker) -> None:
    demo = _demo("--metrics-port", "0", "--duration", "60")
    try:
        banner = demo.stdout.readline()
        port = int(re.search(r"metrics http://127\.0\.0\.1:(\d+)/metrics", banner)[1])
        assert port != 0, banner
        deadline, body = time.monotonic() + 30, ""
        while time.monotonic() < deadline and not body:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                time.sleep(0.5)
        assert "streamer_readings_consumed_total" in body, banner
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        _, err = demo.communicate(timeout=60)
    assert demo.returncode == 0 and "Traceback" not in err, err[-3000:]
