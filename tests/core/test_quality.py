"""Forecast quality of the default learner on synthetic fleets built like real ones."""

from __future__ import annotations

import pytest

from streamer.core import Batch, LearnerConfig
from streamer.tools.replay import replay
from tests.synthetic_fleet import make_fleet, seasonal_fleet


def test_default_learner_beats_persistence_on_a_seasonal_fleet_with_gaps_and_flat_stretches():
    ids, ts, values = seasonal_fleet(seed=0)
    _, status, report = replay(Batch.from_arrays(ids, ts, values), LearnerConfig(device="cpu"))
    assert (status == 0).all()
    worst = max(s.rel_mae for s in report.sensors)
    assert report.rel_mae < 0.8, report.rel_mae
    assert worst <= 1.1, worst


@pytest.mark.parametrize("seed", [0, 1])
def test_no_sensor_loses_to_persistence_on_a_mixed_fleet_with_sentinels_and_random_walks(seed):
    """Random walks and on/off loads are persistence's home ground: the guard must hold there."""
    ids, ts, values = make_fleet(seed=seed)
    _, _, report = replay(Batch.from_arrays(ids, ts, values), LearnerConfig(device="cpu"))
    worst = max(report.sensors, key=lambda s: s.rel_mae)
    assert worst.rel_mae <= 1.1, worst
    assert report.rel_mae < 0.9, report.rel_mae
    sentinel_sensors = [s for s in report.sensors if s.sensor_id.startswith(("q00", "q08"))]
    assert len(sentinel_sensors) == 2, [s.sensor_id for s in report.sensors]
    assert all(s.rel_mae < 1.0 for s in sentinel_sensors), sentinel_sensors
