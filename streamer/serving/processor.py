"""One micro-batch of Kafka records through the learner: forecasts, DLQ records, offsets."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamer.config import setting_name
from streamer.core import Learner, Reason, StepResult
from streamer.core.normalizer import MAX_ABS_TS, MAX_ABS_VALUE
from streamer.kafka.client import InputRecord, OutputRecord, PartitionId
from streamer.serving.codec import (
    dead_letter,
    decode_batch,
    encode_anomalies,
    encode_forecasts,
    forecast_key,
)

# What the learner's rejections say in the DLQ detail header.
_LEARNER_DETAIL = {
    Reason.NON_FINITE: "timestamp or value is not a finite number",
    Reason.WRONG_FEATURE_COUNT: "number of values differs from the model's n_features",
    Reason.BAD_SENSOR_ID: "sensor id is empty or longer than the configured maximum",
    Reason.TIMESTAMP_NOT_AFTER_LAST: "timestamp is not after the sensor's previous reading",
    Reason.TABLE_FULL: "sensor table is full (max_sensors) and no sensor is idle long enough",
    Reason.VALUE_OUT_OF_RANGE: f"a value's magnitude exceeds {MAX_ABS_VALUE:g} or the "
                               f"timestamp's {MAX_ABS_TS:g} s, beyond what the model holds "
                               "(ts is in seconds: epoch milliseconds are 1,000 times that)",
}


def _bad_sensor_id(sensor_id: str, limit: int) -> str:
    """The DLQ detail of a sensor id the learner refused: empty, or how long against what."""
    if not sensor_id:
        return "sensor id is empty"
    return (f"sensor id is {len(sensor_id):,} characters long, over the maximum of {limit:,} "
            f"set by {setting_name('sensors.max_sensor_id_length')}")


@dataclass
class Processed:
    """What one micro-batch produced; nothing here has reached the broker yet."""

    outputs: list[OutputRecord]
    next_offsets: dict[PartitionId, int]  # per partition: last offset in the batch + 1
    fed: list[tuple[PartitionId, str]]  # (partition, sensor) of each reading applied
    consumed: int  # records applied (re-deliveries below the applied offset excluded)
    decode_rejected: dict[Reason, int]  # the codec's rejections (the learner's are in `result`)
    record_timestamps_ms: np.ndarray  # (forecasts,) source record timestamps, for latency
    result: StepResult
    flagged_sensors: list[str]  # the sensor of each reading flagged as an anomaly


class BatchProcessor:
    """Decodes, steps the learner, and encodes. Which records are fresh, and what a batch
    changes of each partition, is the ledger's (streamer.serving.ledger)."""

    def __init__(self, learner: Learner, output_topic: str, dlq_topic: str,
                 anomaly_topic: str | None = None):
        self.learner = learner
        self.output_topic, self.dlq_topic = output_topic, dlq_topic
        self.anomaly_topic = anomaly_topic  # None: no anomaly events

    def process(self, fresh: Sequence[InputRecord]) -> Processed:
        """One batch of records not applied before, in poll order."""
        n_f = self.learner.config.n_features
        decoded = decode_batch([(r.key, r.value) for r in fresh], n_f,
                               [r.timestamp_ms for r in fresh])
        result = self.learner.step(decoded.batch)
        outputs: list[OutputRecord] = []

        def reject(record: InputRecord, reason: Reason, detail: str) -> None:
            outputs.append(OutputRecord(self.dlq_topic, *dead_letter(
                record.key, record.value, record.headers, reason, detail, record.topic,
                record.partition, record.offset)))

        decode_rejected: dict[Reason, int] = {}
        for position, reason, detail in decoded.rejections:
            reject(fresh[position], reason, detail)
            decode_rejected[reason] = decode_rejected.get(reason, 0) + 1
        accepted = np.flatnonzero(result.status == 0)
        for i in np.flatnonzero(result.status != 0).tolist():
            reason = Reason(int(result.status[i]))
            detail = _LEARNER_DETAIL[reason]
            if reason is Reason.BAD_SENSOR_ID:  # which of the two, and by how much
                detail = _bad_sensor_id(decoded.batch.sensor_ids[i],
                                        self.learner.config.max_sensor_id_length)
            reject(fresh[int(decoded.index[i])], reason, detail)
        batch = decoded.batch
        sources = [fresh[i] for i in decoded.index[accepted].tolist()]
        ids = [batch.sensor_ids[i] for i in accepted.tolist()]
        partitions, offsets = [r.partition for r in sources], [r.offset for r in sources]
        values = encode_forecasts(ids, batch.ts[accepted], result.forecasts[accepted],
                                  partitions, offsets, result.update_count[accepted],
                                  lower=result.lower[accepted], upper=result.upper[accepted],
                                  anomaly_scores=result.anomaly_score[accepted],
                                  anomalies=result.anomaly[accepted],
                                  horizon=None if result.horizon is None
                                  else result.horizon.take(accepted))
        topic = self.output_topic
        # A record's key, when it has one, is already its sensor id in UTF-8 (decoding checked).
        outputs.extend(OutputRecord(topic, r.key or forecast_key(sid), value)
                       for r, sid, value in zip(sources, ids, values))
        flagged = np.flatnonzero(result.anomaly[accepted])
        flagged_ids = [ids[i] for i in flagged.tolist()]
        if self.anomaly_topic is not None and len(flagged):
            rows = accepted[flagged]
            events = encode_anomalies(
                flagged_ids, batch.ts[rows], batch.values[rows], result.expected[rows],
                result.expected_lower[rows], result.expected_upper[rows],
                result.anomaly_score[rows], [partitions[i] for i in flagged.tolist()],
                [offsets[i] for i in flagged.tolist()])
            outputs.extend(OutputRecord(self.anomaly_topic, sources[i].key or forecast_key(sid),
                                        event)
                           for i, sid, event in zip(flagged.tolist(), flagged_ids, events))
        fed = [((r.topic, r.partition), sensor_id) for r, sensor_id in zip(sources, ids)]
        stamps = [r.timestamp_ms for r in sources]
        # A poll hands out each partition's records in offset order: the last one wins.
        next_offsets = {(r.topic, r.partition): r.offset + 1 for r in fresh}
        return Processed(outputs, next_offsets, fed, len(fresh), decode_rejected,
                         np.asarray(stamps, dtype=np.float64), result, flagged_ids)


def latency_seconds(record_timestamps_ms: np.ndarray) -> np.ndarray:
    """Seconds from each source record's timestamp to now (when its forecast was acked); NaN
    (not observed) for a record without one (-1 from kafka-python, 0 from librdkafka), which
    would otherwise count as 56 years late."""
    stamps = np.asarray(record_timestamps_ms, dtype=np.float64)
    late = np.maximum(time.time() - stamps / 1000.0, 0.0)
    return np.where(stamps > 0, late, np.nan)
