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
