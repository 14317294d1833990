"""`streamer replay`: the report agrees with its forecasts file (forecasts, intervals, flags);
--json and --plot outputs."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from streamer.core import LearnerConfig, Reason
from streamer.tools.cli import main
from streamer.tools.readings_csv import read_csv, well_formed
from streamer.tools.replay import backtest, forecasts_header, format_report, score
from tests.core.conftest import sine_fleet

WARMUP = LearnerConfig().warmup_readings
SPIKE_SENSOR, SPIKE_STEP = "s2", 300


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


def _write_csv(path, stream) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sensor_id", "ts", "value"])
        for sensor, ts, value in zip(stream.sensor_ids, stream.ts, stream.values[:, 0]):
            writer.writerow([sensor, repr(float(ts)), repr(float(value))])


def _read_rows(path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def spiked_replay(tmp_path_factory):
    """One replay (--out, --json, --plot) of a smooth noisy sine fleet at unit scale in which
    one sensor jumps by 5 at one reading: 50 times the largest noise sigma (0.1)."""
    stream = sine_fleet(6, 400, seed=3, log10_scale=(0, 0))
    spike = np.flatnonzero(np.asarray(stream.sensor_ids) == SPIKE_SENSOR)[SPIKE_STEP]
    stream.values[spike] += 5.0
    root = tmp_path_factory.mktemp("spiked")
    path = root / "fleet.csv"
    _write_csv(path, stream)
    out, report, png = root / "forecasts.csv", root / "report.json", root / "replay.png"
    done = _replay(str(path), "--out", str(out), "--json", str(report), "--plot", str(png),
                   "--plot-sensors", SPIKE_SENSOR)
    assert done.returncode == 0, done.stderr
    return {"out": out, "report": json.loads(report.read_text()), "png": png,
            "stdout": done.stdout, "spike_ts": float(stream.ts[spike])}


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
            forecasts[row["sensor_id"]].append(
                (float(row["ts"]), float(row["forecast"]), float(row["lower"]),
                 float(row["upper"]), int(row["anomaly"])))
    rel, covered, flags = [], 0, 0
    for sensor in report["sensors"]:
        name = sensor["sensor_id"]
        rows = sorted(forecasts[name])
        model = [abs(actual[(name, t1)] - f0) for (_, f0, *_), (t1, *_) in zip(rows, rows[1:])]
        naive = [abs(actual[(name, t1)] - actual[(name, t0)])
                 for (t0, *_), (t1, *_) in zip(rows, rows[1:])]
        assert sensor["scored"] == len(model) == 299
        assert sensor["mae"] == pytest.approx(np.mean(model), rel=1e-9)
        assert sensor["persistence_mae"] == pytest.approx(np.mean(naive), rel=1e-9)
        rel.append(np.mean(model) / np.mean(naive))
        # Past warm-up each reading is scored against the interval in its sensor's previous row.
        inside = [lo0 <= actual[(name, t1)] <= hi0
                  for (_, _, lo0, hi0, _), (t1, *_) in zip(rows[WARMUP - 1 :], rows[WARMUP:])]
        assert sensor["interval_scored"] == len(inside) == 300 - WARMUP
        assert sensor["coverage"] == pytest.approx(np.mean(inside), rel=1e-12)
        assert sensor["anomalies"] == sum(row[-1] for row in rows)
        covered, flags = covered + sum(inside), flags + sensor["anomalies"]
    assert report["rel_mae"] == pytest.approx(np.mean(rel), rel=1e-9)
    assert report["interval_scored"] == 6 * (300 - WARMUP)
    assert report["coverage"] == pytest.approx(covered / report["interval_scored"], rel=1e-12)
    assert report["anomalies"] == flags
    assert report["readings"] == 1801 and report["accepted"] == 1800
    assert report["rejected"] == {"non_finite": 1}
    assert "relMAE" in done.stdout and "readings/s" in done.stdout


def test_forecasts_file_has_interval_and_anomaly_columns_after_the_forecast(spiked_replay):
    header, rows = _read_rows(spiked_replay["out"])
    assert header == ["sensor_id", "ts", "forecast", "lower", "upper", "anomaly_score",
                      "anomaly"]
    assert len(rows) == 6 * 400
    table = np.array([[float(row[c]) for c in header[1:]] for row in rows])  # (N, 6)
    assert np.isfinite(table).all()
    forecast, lower, upper, anomaly_score, anomaly = table[:, 1:].T
    assert (lower <= forecast).all() and (forecast <= upper).all()
    assert (lower < upper).mean() > 0.95  # a band, not a line
    assert ((anomaly_score >= 0) & (anomaly_score <= 1)).all()
    assert set(anomaly) <= {0.0, 1.0}


def test_forecasts_header_has_one_column_per_feature_for_forecast_and_bounds():
    assert forecasts_header(2) == ["sensor_id", "ts", "forecast_0", "forecast_1", "lower_0",
                                   "lower_1", "upper_0", "upper_1", "anomaly_score", "anomaly"]


def test_a_50_sigma_spike_is_flagged_in_its_row_and_few_others_are(spiked_replay):
    _, rows = _read_rows(spiked_replay["out"])
    (spike,) = [row for row in rows if row["sensor_id"] == SPIKE_SENSOR
                and float(row["ts"]) == spiked_replay["spike_ts"]]
    assert spike["anomaly"] == "1"
    assert float(spike["anomaly_score"]) >= LearnerConfig().anomaly_threshold
    flagged = sum(row["anomaly"] == "1" for row in rows)
    assert 1 <= flagged <= 0.02 * len(rows)


def test_json_has_coverage_width_and_flags_per_sensor_and_overall(spiked_replay):
    report = spiked_replay["report"]
    sensors = report["sensors"]
    assert len(sensors) == 6
    for s in sensors:
        assert s["interval_scored"] == 400 - WARMUP
        assert 0.75 <= s["coverage"] <= 1.0, s
        assert 0.0 < s["interval_width"] < 20.0, s
        assert s["anomalies_per_1000"] == pytest.approx(1000 * s["anomalies"] / (400 - WARMUP))
    assert report["target_coverage"] == LearnerConfig().coverage
    assert report["interval_scored"] == 6 * (400 - WARMUP)
    # Pooled over readings; every sensor has as many, so also the mean over sensors.
    assert report["coverage"] == pytest.approx(np.mean([s["coverage"] for s in sensors]))
    assert 0.8 <= report["coverage"] <= 0.97  # calibrated online toward 0.9
    assert report["interval_width"] == pytest.approx(
        np.mean([s["interval_width"] for s in sensors]))
    assert report["anomalies"] == sum(s["anomalies"] for s in sensors) >= 1
    assert report["anomalies_per_1000"] == pytest.approx(
        1000 * report["anomalies"] / report["interval_scored"])
    spiked = next(s for s in sensors if s["sensor_id"] == SPIKE_SENSOR)
    assert spiked["anomalies"] >= 1
    assert "coverage" in spiked_replay["stdout"] and "flagged" in spiked_replay["stdout"]


def test_score_of_a_model_without_intervals_leaves_the_interval_figures_empty():
    ids = ["a", "b"] * 4
    values = np.arange(8.0)[:, None]
    report = score(ids, values, values + 1.0, np.zeros(8, dtype=np.int8))
    assert report.mae == 1.0 and report.persistence_mae == 2.0 and report.rel_mae == 0.5
    assert np.isnan(report.coverage) and report.interval_scored == 0 and report.anomalies == 0
    assert all(np.isnan(s.coverage) and np.isnan(s.interval_width) for s in report.sensors)


def test_an_interval_too_wide_for_a_float_leaves_the_mean_width_finite():
    # A flat sensor that jumps to 1e295 gets an interval wider than a float can hold in units
    # of its own (tiny) persistence error: the fleet's mean width is taken over the others,
    # and near-overflow ones add up to no inf either.
    ids = ["a", "b"] * 4
    values = np.arange(8.0)[:, None]
    width = np.array([np.inf, 1e308, np.inf, 1e308, 1.0, 2.0, 3.0, 4.0])
    report = score(ids, values, values + 1.0, np.zeros(8, dtype=np.int8),
                   inside=np.ones(8, dtype=np.int8), interval_width=width,
                   anomaly=np.zeros(8, dtype=bool))
    assert report.interval_scored == 6
    # Each reading is scored against the interval made at the sensor's reading before it.
    assert report.interval_width == pytest.approx(1e308 / 2 + 3.0 / 4)
    by_name = {s.sensor_id: s.interval_width for s in report.sensors}
    assert by_name == {"a": pytest.approx(1.0), "b": pytest.approx(1e308 / 3 * 2 + 2.0 / 3)}


def test_a_sensor_that_never_changes_neither_swamps_the_width_nor_counts_as_rated(tmp_path):
    # A constant sensor's persistence MAE is 0: its interval is thousands of those wide, which
    # made the fleet's mean width 761 where the others' were 5 and 90, and its relMAE is nan,
    # so "mean over 3 sensors" was a mean over 2 (a black-box audit).
    rng = np.random.default_rng(0)
    rows = ["sensor_id,ts,value"]
    for i in range(2000):
        ts = 1_700_000_000 + 60 * i
        rows += [f"noisy{k},{ts},{rng.normal():.6f}" for k in range(4)]
        rows += [f"flat,{ts},5", f"mostly_flat,{ts},{6 if i % 200 == 0 else 5}"]
    path = tmp_path / "flat.csv"
    path.write_text("\n".join(rows) + "\n")
    _, report = backtest(read_csv(path), LearnerConfig(device="cpu"))
    text = format_report(report)
    assert "mean over 5 of 6 sensors (1 never changed)" in text, text
    noisy = max(s.interval_width for s in report.sensors if s.sensor_id.startswith("noisy"))
    assert report.interval_width_median < noisy < 10
    assert report.interval_width > 100  # the mean, swamped by the two that barely change
    assert f"width {report.interval_width_median:.3g} persistence MAEs (median; " in text
    # The per-sensor column is the median too: the mostly flat sensor's mean is its 199 flat
    # readings' thousands of persistence MAEs.
    mostly = next(s for s in report.sensors if s.sensor_id == "mostly_flat")
    row = next(line for line in text.splitlines() if line.startswith("mostly_flat "))
    assert "width p50" in text and row.split()[-2] == f"{mostly.interval_width_median:.3g}"


def test_plot_writes_a_png_of_the_expected_size_with_the_flagged_spike_in_red(spiked_replay):
    data = spiked_replay["png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 900)
    assert len(data) > 20_000  # drawn lines, not an empty canvas
    import matplotlib.image

    rgb = matplotlib.image.imread(spiked_replay["png"])[..., :3]  # (900, 1200, 3) in [0, 1]
    red = (rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.1) & (rgb[..., 2] < 0.1)
    assert red.sum() >= 20  # the anomaly markers (matplotlib's "red" is pure red)


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


def test_horizon_out_has_one_row_per_reading_and_step_and_the_report_scores_each_step(tmp_path):
    # Ten days of 10-minute readings: a week of history, then steps scored against baselines.
    stream = sine_fleet(3, 1440, seed=5, log10_scale=(0, 1))
    path, out, report = tmp_path / "fleet.csv", tmp_path / "ahead.csv", tmp_path / "r.json"
    _write_csv(path, stream)
    done = _replay(str(path), "--horizon", "4", "--horizon-out", str(out), "--json", str(report))
    assert done.returncode == 0, done.stderr
    header, rows = _read_rows(out)
    assert header == ["sensor_id", "ts", "step", "target_ts", "forecast", "lower", "upper"]
    assert len(rows) == 4 * len(stream)
    assert [int(r["step"]) for r in rows[:8]] == [1, 2, 3, 4, 1, 2, 3, 4]
    late = rows[-4:]  # a sensor's last reading: its steps expected 10, 20, 30, 40 min later
    assert [float(r["target_ts"]) - float(r["ts"]) for r in late] == [600.0, 1200.0, 1800.0,
                                                                      2400.0]
    assert all(float(r["lower"]) <= float(r["forecast"]) <= float(r["upper"]) for r in rows)
    steps = json.loads(report.read_text())["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(s["pairs"] > 0 and s["vs_persistence"] < 1.0 for s in steps)
    assert "vs persist" in done.stdout


def test_horizon_out_without_a_horizon_is_a_usage_error(fleet_csv, tmp_path):
    path, _ = fleet_csv
    done = _replay(str(path), "--horizon-out", str(tmp_path / "ahead.csv"))
    assert done.returncode == 2 and "--horizon" in done.stderr


def _main_stderr(capsys, *args: str) -> tuple[int, str]:
    from streamer.tools.cli import main

    try:
        code = main(["replay", *args])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    return code, capsys.readouterr().err


def test_unreadable_input_or_output_is_a_one_line_error_with_exit_2(fleet_csv, tmp_path, capsys):
    path, _ = fleet_csv
    huge = tmp_path / "huge.csv"
    huge.write_text("sensor_id,ts,value\ns1,1600000000," + "9" * 200_000 + "\n")
    truncated = tmp_path / "cut.csv.gz"
    truncated.write_bytes(gzip.compress(path.read_bytes())[:300])
    cases = [((str(huge),), "field larger than field limit"),
             ((str(truncated),), "ended before"),
             ((str(path), "--batch-size", "0"), "--batch-size: must be at least 1"),
             ((str(path), "--limit", "-5"), "--limit: must be at least 1"),
             ((str(path), "--limit", "abc"), "--limit: must be a whole number"),
             ((str(path), "--out", str(tmp_path / "missing" / "x.csv")), "does not exist"),
             ((str(path), "--json", str(tmp_path)), "it is a directory")]
    for args, message in cases:
        code, err = _main_stderr(capsys, *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)


def test_a_csv_with_a_byte_order_mark_reads_as_one_without(fleet_csv, tmp_path):
    path, _ = fleet_csv
    marked = tmp_path / "excel.csv"
    marked.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    plain, bom = read_csv(path), read_csv(marked)
    assert bom.sensor_ids == plain.sensor_ids
    np.testing.assert_array_equal(bom.values, plain.values)


def test_a_row_with_more_or_fewer_cells_than_the_header_is_rejected_for_its_count(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("sensor_id,ts,value\na,1600000000,1\na,1600000600,2,99\na,1600001200\n"
                    "a,1600001800,4,\n")  # a trailing separator is not another value
    out = backtest(read_csv(path), LearnerConfig(device="cpu"))[0]
    assert [Reason(int(s)).label for s in out.status] == [
        "accepted", "wrong_feature_count", "wrong_feature_count", "accepted"]
    sendable, skipped = well_formed(read_csv(path))  # what `streamer produce` sends
    assert skipped == 2 and sendable.values[:, 0].tolist() == [1.0, 4.0]


def test_json_report_is_strict_json_while_figures_are_unknown(fleet_csv, tmp_path, capsys):
    path, _ = fleet_csv
    report = tmp_path / "one.json"
    assert _main_stderr(capsys, str(path), "--limit", "1", "--json", str(report))[0] == 0

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    document = json.loads(report.read_text(), parse_constant=refuse)
    assert document["rel_mae"] is None and document["accepted"] == 1


def test_a_file_of_more_value_columns_than_the_model_reads_is_refused_naming_the_setting(
        tmp_path, capsys):
    # (every reading was rejected as wrong_feature_count, though each row matched its header)
    path = tmp_path / "two.csv"
    path.write_text("sensor_id,ts,a,b\nx,1717171717,1,2\nx,1717171777,2,3\n")
    assert main(["replay", str(path), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        f"streamer replay: {path} has 2 value columns but the model reads 1 per reading: set "
        "model.n_features (STREAMER_MODEL__N_FEATURES / --model-n-features) to 2\n")
    assert main(["replay", str(path), "--device", "cpu", "--model-n-features", "2"]) == 0


def test_a_deployments_kafka_checkpoint_and_log_environment_does_not_stop_a_replay(
        tmp_path, monkeypatch, capsys):
    # (replay needs no Kafka, metrics, checkpoints or sharing: their variables, invalid here,
    # stopped it with exit 2 naming a flag replay does not have)
    path = tmp_path / "r.csv"
    path.write_text("sensor_id,ts,value\na,1717171717,1\na,1717171777,2\n")
    monkeypatch.setenv("STREAMER_KAFKA__BOOTSTRAP_SERVERS", "not a server")
    monkeypatch.setenv("STREAMER_CHECKPOINT", "not json")
    monkeypatch.setenv("STREAMER_METRICS__PORT", "-1")
    monkeypatch.setenv("streamer_sharing__peer_ttl_seconds", "-1")  # read case-insensitively
    monkeypatch.setenv("STREAMER_LOG__LEVEL", "bogus")  # (named --log-level, which it lacks)
    assert main(["replay", str(path), "--device", "cpu"]) == 0, capsys.readouterr().err
    monkeypatch.setenv("STREAMER_TRAINING__LR", "-1")  # what replay uses is still checked
    assert main(["replay", str(path), "--device", "cpu"]) == 2
    assert "STREAMER_TRAINING__LR" in capsys.readouterr().err


def test_results_that_cannot_be_written_after_the_replay_are_a_one_line_error(tmp_path,
                                                                               capsys):
    # Writable when checked before the replay; a full disk shows only when written.
    path = tmp_path / "readings.csv"
    path.write_text("sensor_id,ts,value\n" + "".join(f"a,{1717171717 + 60 * i},{i % 7}\n"
                                                     for i in range(40)))
    code = main(["replay", str(path), "--json", "/dev/full"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert err.strip() == "streamer replay: cannot write /dev/full: No space left on device"


def test_a_report_reader_that_leaves_early_cuts_the_report_not_the_files(tmp_path):
    # `streamer replay ... | head`: a BrokenPipeError traceback, exit 1, and the files, written
    # after the report, never were.
    path = tmp_path / "r.csv"
    path.write_text("sensor_id,ts,value\na,1717171717,1\na,1717171777,2\nb,1717171717,5\n")
    out, report = tmp_path / "f.csv", tmp_path / "r.json"
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (CI sets it)
    replay = subprocess.Popen([sys.executable, "-m", "streamer", "replay", str(path), "--device",
                               "cpu", "--out", str(out), "--json", str(report)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=buffered)
    replay.stdout.close()  # the reader is gone before the report is printed (torch loads first)
    _, err = replay.communicate(timeout=120)
    assert replay.returncode == 141 and not err, err.decode()  # as a shell's `yes | head`
    assert json.loads(report.read_text())["readings"] == 3
    assert len(out.read_text().splitlines()) == 4


def test_a_broken_pipe_that_is_not_stdout_is_not_taken_for_a_reader_gone():
    check = ("from streamer.tools import stdout; "
             "print(stdout.reader_gone(BrokenPipeError()), stdout.reader_gone(OSError()))")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          check=True)  # stdout: a pipe whose reader is here
    assert done.stdout == "False False\n"


def test_a_sensor_table_too_large_for_memory_is_a_configuration_error(tmp_path, capsys,
                                                                     monkeypatch):
    # It allocated ~370 GB up front: a numpy MemoryError traceback, or the OOM killer.
    from streamer.core import learner

    monkeypatch.setattr(learner, "memory_limit_bytes", lambda: 2**30)  # whatever the host has
    path = tmp_path / "r.csv"
    path.write_text("sensor_id,ts,value\na,1717171717,1\n")
    code = main(["replay", str(path), "--device", "cpu", "--sensors-max-sensors", "100000000",
                 "--sensors-initial-capacity", "100000000"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(
        "streamer replay: invalid configuration: sensors.initial_capacity "
        "(STREAMER_SENSORS__INITIAL_CAPACITY / --sensors-initial-capacity): 100,000,000 sensor "
        "slots up front need about "), err
    assert "lower it (the table grows as sensors appear, up to sensors.max_sensors" in err


@pytest.mark.parametrize(("stamp", "why"), [
    (lambda i: str(1_700_000_000_000 + 60_000 * i),  # epoch milliseconds
     "of 40 timestamps, 40 are beyond +-1e+11 s (epoch milliseconds?)"),
    (lambda i: f"2024-01-01T{i // 4:02d}:{15 * (i % 4):02d}:00",  # local times, no zone
     "of 40 timestamps, 40 could not be read (a local time without a zone?)"),
])
def test_a_file_none_of_whose_readings_is_accepted_is_an_input_error_saying_why(
        tmp_path, capsys, stamp, why):
    # It printed a report of nan and exit 0 (operator pass): a script took that for a result.
    path = tmp_path / "readings.csv"
    path.write_text("sensor_id,ts,value\n" + "".join(f"a,{stamp(i)},{i % 7}\n"
                                                     for i in range(40)))
    code, err = _main_stderr(capsys, str(path), "--out", str(tmp_path / "out.csv"))
    assert code == 2, err
    assert err.startswith(f"streamer replay: no reading of {path} was accepted (rejected: "), err
    assert f"; {why}: a timestamp is epoch seconds or RFC 3339 with a time zone " in err, err
    assert not (tmp_path / "out.csv").exists()


def test_rows_rejected_for_their_timestamps_are_named_beside_the_report(tmp_path, capsys):
    path = tmp_path / "readings.csv"
    path.write_text("sensor_id,ts,value\n" + "".join(f"a,{1_600_000_000 + 60 * i},{i % 7}\n"
                                                     for i in range(40))
                    + "a,1600099000000,3\n")  # one typed in milliseconds
    code = main(["replay", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "accepted 40  rejected 1 {'value_out_of_range': 1}" in out
    assert err == ("streamer replay: of 41 timestamps, 1 is beyond +-1e+11 s (epoch "
                   "milliseconds?): a timestamp is epoch seconds or RFC 3339 with a time zone "
                   "(2024-01-01T00:00:00Z), as the worker reads it; those rows were rejected\n")
