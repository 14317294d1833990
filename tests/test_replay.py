"""`streamer replay`: the report agrees with its forecasts file; --json and --plot outputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from tests.core.conftest import sine_fleet


@pytest.fixture
def fleet_csv(tmp_path):
    stream = sine_fleet(6, 300, seed=3, log10_scale=(-1, 3))
    path = tmp_path / "fleet.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sensor_id", "ts", "value"])
        for sensor, ts, value in zip(stream.sensor_ids, stream.ts, stream.values[:, 0]):
            writer.writerow([sensor, repr(float(ts)), repr(float(value))])
        writer.writerow(["s0", "not-a-time", "1.0"])  # a bad row: rejected, reported
    return path, stream


def _replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", "replay", *args, "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)


def test_report_numbers_equal_a_direct_computation_from_the_forecasts_file(fleet_csv, tmp_path):
    path, stream = fleet_csv
    out, report_path = tmp_path / "forecasts.csv", tmp_path / "report.json"
    done = _replay(str(path), "--out", str(out), "--json", str(report_path))
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    actual = {(s, float(t)): float(v) for s, t, v in
              zip(stream.sensor_ids, stream.ts, stream.values[:, 0])}
    forecasts = defaultdict(list)
    with open(out, newline="") as handle:
        for row in csv.DictReader(handle):
            forecasts[row["sensor_id"]].append((float(row["ts"]), float(row["forecast"])))
    rel = []
    for score in report["sensors"]:
        rows = sorted(forecasts[score["sensor_id"]])
        model = [abs(actual[(score["sensor_id"], t1)] - f0) for (_, f0), (t1, _) in
                 zip(rows, rows[1:])]
        naive = [abs(actual[(score["sensor_id"], t1)] - actual[(score["sensor_id"], t0)])
                 for (t0, _), (t1, _) in zip(rows, rows[1:])]
        assert score["scored"] == len(model) == 299
        assert score["mae"] == pytest.approx(np.mean(model), rel=1e-9)
        assert score["persistence_mae"] == pytest.approx(np.mean(naive), rel=1e-9)
        rel.append(np.mean(model) / np.mean(naive))
    assert report["rel_mae"] == pytest.approx(np.mean(rel), rel=1e-9)
    assert report["readings"] == 1801 and report["accepted"] == 1800
    assert report["rejected"] == {"non_finite": 1}
    assert "relMAE" in done.stdout and "readings/s" in done.stdout


def test_plot_writes_a_png_of_the_expected_size(fleet_csv, tmp_path):
    path, _ = fleet_csv
    png = tmp_path / "replay.png"
    done = _replay(str(path), "--plot", str(png), "--plot-sensors", "s1,s2")
    assert done.returncode == 0, done.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 900)
    assert len(data) > 20_000  # drawn lines, not an empty canvas


def test_replay_uses_the_same_settings_flags_as_run(fleet_csv, tmp_path):
    path, _ = fleet_csv
    done = _replay(str(path), "--training-lr", "0")
    assert done.returncode == 2 and "STREAMER_TRAINING__LR" in done.stderr


def test_replay_help_lists_the_learners_settings_and_no_kafka_metrics_or_checkpoint_flags():
    done = subprocess.run([sys.executable, "-m", "streamer", "replay", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for flag in ("--model-hidden-size", "--training-min-update-windows",
                 "--sensors-max-sensors", "--device", "--torch-threads"):
        assert flag in done.stdout, flag
    for prefix in ("--kafka-", "--metrics-", "--checkpoint-", "--log-"):
        assert prefix not in done.stdout, prefix
