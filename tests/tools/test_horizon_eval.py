"""`streamer replay --horizon`: per-step scores, also when nothing could be scored."""

from __future__ import annotations

import numpy as np

from streamer.core import Reason
from streamer.core.batch import HorizonResult
from streamer.core.horizon import scored_steps
from streamer.tools.cli import main
from streamer.tools.horizon_eval import score_steps


def test_steps_score_no_pairs_when_no_reading_was_accepted():
    rejected = np.full(3, int(Reason.VALUE_OUT_OF_RANGE), dtype=np.int8)
    horizon = HorizonResult.empty(3, 1, 3, scored_steps(3))
    steps = score_steps(["a", "a", "b"], np.array([1e12, 2e12, 1e12]), np.ones((3, 1)),
                        rejected, horizon)
    assert [(s.step, s.pairs, s.nonfinite) for s in steps] == [(1, 0, 0), (2, 0, 0), (3, 0, 0)]
    assert all(np.isnan(s.vs_persistence) and np.isnan(s.coverage) for s in steps)


def test_replay_with_a_horizon_of_a_file_whose_every_reading_is_rejected_writes_nothing(
        tmp_path, capsys):
    # (It wrote a header-only file and a report of nulls, exit 0; the scoring of no pairs
    # itself is pinned above.) Every reading refused is the user's input error: exit 2, why.
    readings = tmp_path / "ms.csv"  # millisecond timestamps: all out of range
    readings.write_text("sensor_id,ts,value\na,1717171717000,1\na,1717171777000,2\n"
                        "b,1717171717000,3\n")
    out, report = tmp_path / "out.csv", tmp_path / "report.json"
    code = main(["replay", str(readings), "--horizon", "3", "--device", "cpu",
                 "--out", str(out), "--json", str(report)])
    assert code == 2
    err = capsys.readouterr().err
    assert "no reading of" in err and "(epoch milliseconds?)" in err, err
    assert not out.exists() and not report.exists()


def test_steps_report_coverage_over_the_readings_across_a_gap_apart():
    # Hourly for nine days, then nothing for ten hours: step k's pairs from the k readings
    # before the gap span it. Their intervals miss; every other one holds its reading.
    ts = np.concatenate([np.arange(216) * 3600.0, 215 * 3600.0 + 36_000 + np.arange(5) * 3600])
    n, h = len(ts), 2
    horizon = HorizonResult.empty(n, 1, h, scored_steps(h))
    horizon.forecast[:] = 5.0
    horizon.lower[:], horizon.upper[:] = 4.0, 6.0
    for k in range(1, h + 1):
        horizon.lower[216 - k:216, k - 1] = 100.0
    steps = score_steps(["a"] * n, ts + 1.7e9, np.full((n, 1), 5.0),
                        np.zeros(n, dtype=np.int8), horizon)
    assert [(s.step, s.pairs_across_gaps, s.coverage_across_gaps) for s in steps] == [
        (1, 1, 0.0), (2, 2, 0.0)]
    assert all(s.coverage == 1 - s.pairs_across_gaps / s.pairs for s in steps)
