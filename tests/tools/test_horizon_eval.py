"""`streamer replay --horizon`: per-step scores, also when nothing could be scored."""

from __future__ import annotations

import json

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


def test_replay_with_a_horizon_writes_its_outputs_when_every_reading_is_rejected(tmp_path):
    readings = tmp_path / "ms.csv"  # millisecond timestamps: all out of range
    readings.write_text("sensor_id,ts,value\na,1717171717000,1\na,1717171777000,2\n"
                        "b,1717171717000,3\n")
    out, report = tmp_path / "out.csv", tmp_path / "report.json"
    code = main(["replay", str(readings), "--horizon", "3", "--device", "cpu",
                 "--out", str(out), "--json", str(report)])
    assert code == 0
    assert out.read_text().splitlines() == ["sensor_id,ts,forecast,lower,upper,anomaly_score,"
                                            "anomaly"]
    document = json.loads(report.read_text())
    assert document["accepted"] == 0 and document["rejected"] == {"value_out_of_range": 3}
    assert [(s["step"], s["pairs"], s["vs_persistence"]) for s in document["steps"]] == [
        (1, 0, None), (2, 0, None), (3, 0, None)]
