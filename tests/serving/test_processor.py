"""The batch processor's dead letters: why a reading was set aside, in words an operator acts on."""

from __future__ import annotations

import json

from streamer.core.config import LearnerConfig
from streamer.core.learner import Learner
from streamer.kafka.client import InputRecord
from streamer.serving.codec import DLQ_DETAIL, DLQ_REASON
from streamer.serving.processor import BatchProcessor


def _record(offset: int, ts: float) -> InputRecord:
    value = json.dumps({"sensor_id": "s1", "ts": ts, "value": 1.5}).encode()
    return InputRecord("readings", 0, offset, b"s1", value, 0, [])


def test_a_reading_stamped_in_epoch_milliseconds_is_dead_lettered_saying_ts_is_in_seconds():
    processor = BatchProcessor(Learner(LearnerConfig()), "forecasts", "dlq")
    processed = processor.process([_record(0, 1_765_000_000_000), _record(1, 1_765_000_000)])
    dead = [r for r in processed.outputs if r.topic == "dlq"]
    forecasts = [r for r in processed.outputs if r.topic == "forecasts"]
    assert len(dead) == 1 and len(forecasts) == 1
    headers = dict(dead[0].headers)
    assert headers[DLQ_REASON] == b"value_out_of_range"
    assert b"ts is in seconds: epoch milliseconds" in headers[DLQ_DETAIL]


def test_a_sensor_id_refused_is_dead_lettered_saying_whether_empty_or_how_long():
    # It said "empty or longer than the configured maximum" for both (operator pass).
    processor = BatchProcessor(Learner(LearnerConfig(max_sensor_id_length=8)), "f", "dlq")

    def unkeyed(offset: int, sensor_id: str) -> InputRecord:
        value = json.dumps({"sensor_id": sensor_id, "ts": 1_765_000_000, "value": 1.5})
        return InputRecord("readings", 0, offset, None, value.encode(), 0, [])

    processed = processor.process([unkeyed(0, ""), unkeyed(1, "x" * 1200), unkeyed(2, "ok")])
    details = [dict(r.headers)[DLQ_DETAIL].decode() for r in processed.outputs
               if r.topic == "dlq"]
    assert details == [
        "sensor id is empty",
        "sensor id is 1,200 characters long, over the maximum of 8 set by "
        "sensors.max_sensor_id_length (STREAMER_SENSORS__MAX_SENSOR_ID_LENGTH / "
        "--sensors-max-sensor-id-length)"]
