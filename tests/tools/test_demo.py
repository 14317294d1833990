"""`streamer demo`, the README's first command: it serves, and Ctrl-C stops it cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamer.kafka.broker import free_port

ROOT = Path(__file__).resolve().parents[2]


def _demo(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "streamer", "demo", "--metrics-port", str(free_port()), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own process group, as a shell gives a foreground job


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
