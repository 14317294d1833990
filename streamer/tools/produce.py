"""`streamer produce`: replay a CSV of readings into the input topic at a chosen pace."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError

from streamer.core import Batch
from streamer.kafka.admin import topic_ids
from streamer.kafka.client import AUTO_CREATE_TOPICS, ProducerSettings
from streamer.kafka.connection import KafkaConnection
from streamer.kafka.errors import TopicMissing, converted_errors
from streamer.kafka.kafka_python_client import close_producer, producer_config

log = logging.getLogger("streamer.produce")

DEFAULT_LOOP_GAP_S = 1.0  # between rounds of a looped file whose timestamps show no gap
FLUSH_MARGIN_S = 5.0  # past the delivery timeout, when every record has failed or gone out
# For kafka-python's sender thread to stop: all was acknowledged; closing sooner can race its
# IO thread (a logged AttributeError). After a failure, pending records are aborted sooner.
CLOSE_TIMEOUT_S = 10.0
CLOSE_FAILED_TIMEOUT_S = 1.0
MIN_PACE = 1e-6  # readings/s, or times the data's own speed


@dataclass(frozen=True)
class Pace:
    """Either a fixed rate in readings/s, or a speed-up of the data's own timestamps."""

    rate: float | None = None
    speedup: float | None = None

    def __post_init__(self) -> None:
        if self.rate is not None and self.speedup is not None:
            raise ValueError("give either --rate or --speedup, not both")
        for name in ("rate", "speedup"):
            value = getattr(self, name)
            # (below one reading in ~12 days the pacing wait overflowed the platform's time_t)
            if value is not None and not value >= MIN_PACE:
                raise ValueError(f"--{name} must be at least {MIN_PACE:g}, got {value}")


def encode_reading(sensor_id: str, ts: float, values: np.ndarray) -> bytes:
    """The input-topic JSON of one reading (``value`` for one feature, else ``values``)."""
    body: dict = {"sensor_id": sensor_id, "ts": float(ts)}
    if len(values) == 1:
        body["value"] = float(values[0])
    else:
        body["values"] = [float(v) for v in values]
    # allow_nan=False: NaN is no JSON; callers send only well_formed rows.
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def produce(readings: Batch, connection: KafkaConnection, topic: str, pace: Pace,
            limit: int | None = None, loop: bool = False,
            stop: threading.Event | None = None, time_shift: bool = True,
            settings: ProducerSettings | None = None) -> int:
    """Send the readings in file order; returns how many were sent, all acknowledged: a
    reading the producer or the brokers refused (too large, retries used up) stops it with
    the error, never counted as sent. ``settings`` (the worker's own by default) give the
    codec and how long a reading is retried before it fails.

    With ``loop`` the file repeats, its timestamps shifted forward by the file's span each
    round (and, with ``time_shift``, the first round is moved to end now) so every sensor's
    timestamps keep increasing.
    """
    stop = stop or threading.Event()
    n = len(readings)
    if n == 0:
        return 0
    finite = readings.ts[np.isfinite(readings.ts)]  # (M,) file order; one bad ts spoils no other
    span = loop_span(finite)
    shift = time.time() - float(finite.max()) if time_shift and loop and len(finite) else 0.0
    settings = settings or ProducerSettings()
    producer = connection.kafka_python(KafkaProducer, "connecting the producer",
                                       allow_auto_create_topics=AUTO_CREATE_TOPICS,
                                       **producer_config(settings))
    sent, started = 0, time.monotonic()
    unacked: deque = deque()  # send futures in order, dropped once acknowledged
    first_ts = float(finite[0]) if len(finite) else 0.0
    close_timeout_s = CLOSE_FAILED_TIMEOUT_S
    try:
        # Never created here: a broker's auto-creation would give the input topic its default
        # partition count (1 on Apache Kafka), for good (a typo in --topic made one so).
        if topic_ids(connection, [topic]).get(topic, "") is None:
            raise TopicMissing(f"topic {topic!r} does not exist: create it with the partitions "
                               f"the group's workers are to share (nothing here creates it)")
        with converted_errors(f"sending readings to {topic}"):
            while not stop.is_set():
                for i in range(n):
                    if stop.is_set() or (limit is not None and sent >= limit):
                        break
                    ts = float(readings.ts[i]) + shift
                    _wait_for_turn(pace, sent, float(readings.ts[i]) - first_ts, started, stop)
                    unacked.append(producer.send(
                        topic, key=readings.sensor_ids[i].encode(),
                        value=encode_reading(readings.sensor_ids[i], ts, readings.values[i])))
                    sent += 1
                    _drop_acknowledged(unacked)
                if not loop or (limit is not None and sent >= limit):
                    break
                shift += span
                first_ts -= span  # keep --speedup pacing continuous across rounds
            _flush(producer, unacked, settings.delivery_timeout_ms / 1000 + FLUSH_MARGIN_S)
        close_timeout_s = CLOSE_TIMEOUT_S
    finally:
        close_producer(producer, timeout_s=close_timeout_s)
    return sent


def _flush(producer: KafkaProducer, unacked: deque, timeout_s: float) -> None:
    """Wait for every reading sent to be acknowledged; raise the first failure, or say how many
    are still pending after ``timeout_s`` (a broker that hangs leaves kafka-python's flush()
    waiting for ever)."""
    try:
        producer.flush(timeout=timeout_s)
    except KafkaTimeoutError:
        pass
    _drop_acknowledged(unacked)
    if unacked:
        raise KafkaTimeoutError(f"{len(unacked)} readings not acknowledged in {timeout_s:.0f} s")


def _drop_acknowledged(unacked: deque) -> None:
    """Drop the finished send futures from the front of ``unacked``; raise the error of the
    first that failed."""
    while unacked and unacked[0].is_done:
        future = unacked.popleft()
        future.get(timeout=0)  # raises what the producer or the brokers said


def loop_span(finite_ts: np.ndarray) -> float:
    """How far each round of a looped file moves its timestamps: the span of the (finite)
    timestamps plus their typical gap, so that a round starts one gap after the previous one
    ended; with no gap (one distinct timestamp, or none) the gap is DEFAULT_LOOP_GAP_S."""
    distinct = np.unique(finite_ts)
    gap = float(np.median(np.diff(distinct))) if len(distinct) > 1 else DEFAULT_LOOP_GAP_S
    return float(distinct[-1] - distinct[0]) + gap if len(distinct) else gap


def _wait_for_turn(pace: Pace, sent: int, data_elapsed: float, started: float,
                   stop: threading.Event) -> None:
    """Sleep until this reading is due under ``pace``."""
    if pace.rate is not None:
        due = started + sent / pace.rate
    elif pace.speedup is not None:
        due = started + data_elapsed / pace.speedup
    else:
        return
    delay = due - time.monotonic()
    if delay > 0.002:
        stop.wait(delay)
