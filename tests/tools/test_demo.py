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
from streamer.tools import demo as demo_module
from streamer.tools.cli import main, sample_dataset
from streamer.tools.readings_csv import read_csv

ROOT = Path(__file__).resolve().parents[2]


def _demo(*args: str, python: tuple[str, ...] = ("-m", "streamer"),
          env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
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
    # ...saying that the file loops, and how soon it comes round again
    rows = len(read_csv(sample_dataset()))
    assert (f"{rows:,} readings of 26 sensors from {sample_dataset().name} at 500/s (looped: "
            f"they come round again every {round(rows / 500 / 60)} min), metrics") in out, out[:500]
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.broker
def test_a_reader_of_its_output_that_leaves_stops_the_demo_as_ctrl_c_does(broker) -> None:
    # `streamer demo | head -1`: a BrokenPipeError traceback left the broker to a dying process.
    demo = _demo("--rate", "500")
    assert demo.stdout.readline().startswith("streamer demo: broker ")
    demo.stdout.close()  # the next status line finds no reader
    demo.wait(timeout=90)
    err = demo.stderr.read()
    assert demo.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "BrokenPipeError" not in err, err[-3000:]


@pytest.mark.broker
def test_ctrl_c_stops_the_demo_cleanly_without_broker_errors(broker) -> None:
    demo = _demo("--rate", "500")
    seen, serving = "", time.monotonic() + 90  # broker, topics, worker, first forecasts
    # (text mode reads the status lines' "\r" as a line end)
    while _produced(seen) == 0 or not seen.endswith("\n"):  # a status line with forecasts
        assert time.monotonic() < serving and demo.poll() is None, demo.communicate()[1][-3000:]
        seen += demo.stdout.read(1)
    os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    started = time.monotonic()
    out, err = demo.communicate(timeout=60)
    out = seen + out
    assert demo.returncode == 0, err[-3000:]
    assert time.monotonic() - started < 20, "the demo took too long to stop"
    assert _produced(out) > 0, out[-2000:]
    for symptom in ("Traceback", "KafkaTimeoutError", "NodeNotReady", "Connection refused"):
        assert symptom not in err, err[-3000:]


@pytest.mark.broker
def test_the_demo_reads_a_file_of_several_value_columns_as_that_many_features(
        broker, tmp_path) -> None:
    # (with the model's default of one feature, every reading went to the dead letters)
    path = tmp_path / "two.csv"
    rows = [f"s{i % 3},{1717171717 + 60 * (i // 3)},{i % 7},{i % 5}" for i in range(1200)]
    path.write_text("sensor_id,ts,a,b\n" + "\n".join(rows) + "\n")
    demo = _demo("--file", str(path), "--duration", "15", "--rate", "200")
    out, err = demo.communicate(timeout=120)
    assert demo.returncode == 0, err[-3000:]
    assert _produced(out) > 0 and re.findall(r"dlq\s+([\d,]+)", out)[-1] == "0", out[-2000:]


def test_a_taken_metrics_port_stops_the_demo_before_it_starts_with_exit_2(taken_port) -> None:
    demo = _demo("--metrics-port", str(taken_port), "--duration", "20")
    out, err = demo.communicate(timeout=120)
    assert demo.returncode == 2, (out[-2000:], err[-3000:])
    assert f"cannot serve metrics on 0.0.0.0:{taken_port}" in err and "--metrics-port" in err, err
    assert "Traceback" not in err and "broker" not in out, (out[-2000:], err[-3000:])


# The demo as `streamer demo` runs it, but as if the port were taken after the check that it
# was free: the worker dies as it binds its metrics server, 3 s late (the worker binds before
# it starts anything else, so no Kafka client of its is left to complain as the broker stops).
DEMO_WITHOUT_PORT_CHECK = (
    "import sys, time; import streamer.tools.demo as demo; "
    "demo.bindable_port = lambda host, port: port; "
    "from streamer.observability.health import HealthServer; start = HealthServer.start; "
    "HealthServer.start = lambda self: (time.sleep(3), start(self)); "
    "from streamer.tools.cli import main; sys.exit(main())"
)


@pytest.mark.broker
def test_the_demo_stops_with_exit_2_when_its_worker_dies(broker, taken_port) -> None:
    started = time.monotonic()
    demo = _demo("--metrics-port", str(taken_port), "--duration", "60",
                 python=("-c", DEMO_WITHOUT_PORT_CHECK))
    out, err = demo.communicate(timeout=120)
    assert demo.returncode == 2, (out[-2000:], err[-3000:])
    assert err.splitlines() == [
        "streamer demo: the worker failed, so the demo stopped: invalid configuration: "
        "metrics.port (STREAMER_METRICS__PORT / --metrics-port): cannot listen on "
        f"0.0.0.0:{taken_port}: Address already in use (another process has it, or it is "
        "below 1024? 0 picks a free port)"
    ], err[-3000:]
    assert time.monotonic() - started < 45, "the demo ran on without its worker"


@pytest.mark.broker
@pytest.mark.parametrize(("host", "shown"), [(None, "127.0.0.1"), ("127.0.0.2", "127.0.0.2")])
def test_metrics_port_0_prints_the_address_the_metrics_are_served_on(broker, host,
                                                                     shown) -> None:
    # Bound to every address (the default), the banner names this machine's; bound to one
    # address, that one (the only one it answers on).
    demo = _demo("--metrics-port", "0", "--duration", "60",
                 env={"STREAMER_METRICS__HOST": host} if host else None)
    try:
        banner = demo.stdout.readline()
        port = int(re.search(rf"metrics http://{re.escape(shown)}:(\d+)/metrics", banner)[1])
        assert port != 0, banner
        deadline, body = time.monotonic() + 30, ""
        while time.monotonic() < deadline and not body:
            try:
                with urllib.request.urlopen(f"http://{shown}:{port}/metrics", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                time.sleep(0.5)
        assert "streamer_readings_consumed_total" in body, banner
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        _, err = demo.communicate(timeout=60)
    assert demo.returncode == 0 and "Traceback" not in err, err[-3000:]


@pytest.fixture
def demo_runs(monkeypatch) -> list[tuple]:
    """What `streamer demo` would have started: run_demo's arguments, run_demo not run."""
    calls: list[tuple] = []
    monkeypatch.setattr(demo_module, "run_demo", lambda *args, **kwargs: calls.append(args) or 0)
    return calls


def test_a_demo_file_or_rate_that_cannot_be_used_is_a_one_line_error_before_anything_starts(
        tmp_path, demo_runs, capsys) -> None:
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id,time,value\na,1717171717,1\n")
    header_only = tmp_path / "header.csv"
    header_only.write_text("sensor_id,ts,value\n")
    cases = [(["--file", str(tmp_path / "missing.csv")], "cannot read readings from"),
             (["--file", str(wrong)], "expected a header 'sensor_id,ts,value'"),
             (["--file", str(header_only)], "no readings to send in"),
             (["--rate", "0"], "--rate must be at least 1e-06, got 0.0"),
             # slower than one reading in ~12 days: the pacing wait overflowed time_t
             (["--rate", "1e-10"], "--rate must be at least 1e-06, got 1e-10")]
    for args, message in cases:
        code = main(["demo", *args])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("streamer demo: ") and message in err, (args, err)
    assert demo_runs == []


def test_a_device_the_machine_lacks_stops_the_demo_before_anything_starts(
        demo_runs, capsys, monkeypatch) -> None:
    monkeypatch.setenv("STREAMER_DEVICE", "cuda:99")  # no CUDA, or not 100 devices
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamer demo: invalid configuration: device (STREAMER_DEVICE"), err
    assert demo_runs == []


def test_the_demo_reads_no_environment_for_what_it_sets_itself_and_checks_the_rest(
        demo_runs, capsys, monkeypatch) -> None:
    # A deployment's bootstrap servers or checkpoint directory in the shell stopped it (exit 2),
    # though the demo runs its own broker and a temporary directory.
    seen: list[str | None] = []
    monkeypatch.setattr(demo_module, "run_demo", lambda *args, **kwargs: seen.append(
        os.environ.get("STREAMER_KAFKA__BOOTSTRAP_SERVERS")) or 0)
    monkeypatch.setenv("STREAMER_KAFKA__BOOTSTRAP_SERVERS", "not a server")
    monkeypatch.setenv("STREAMER_CHECKPOINT__DIR", "")
    monkeypatch.setenv("STREAMER_KAFKA__GROUP_ID", "")
    assert main(["demo"]) == 0, capsys.readouterr().err
    assert seen == [None]  # nor while it runs
    assert os.environ["STREAMER_KAFKA__BOOTSTRAP_SERVERS"] == "not a server"  # back after it
    monkeypatch.setenv("STREAMER_MODEL__HIDDEN_SIZE", "0")  # what the demo's worker uses
    assert main(["demo"]) == 2
    assert "STREAMER_MODEL__HIDDEN_SIZE" in capsys.readouterr().err


def test_the_demo_skips_and_counts_rows_it_cannot_send_as_produce_does(
        tmp_path, demo_runs, capsys) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("sensor_id,ts,value\na,1717171717,1\na,1717171777,2,99\na,1717171837\n"
                    "a,1717171897,\na,1717171957,5\n")
    assert main(["demo", "--file", str(path)]) == 0
    assert "skipping 3 rows" in capsys.readouterr().err
    (readings, source, pace), = demo_runs
    assert source == "ragged.csv" and pace.rate == 1000.0
    assert readings.values.tolist() == [[1.0], [5.0]] and readings.n_values.tolist() == [1, 1]
