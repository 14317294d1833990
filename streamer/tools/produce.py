"""`streamer produce`: replay a CSV of readings into the input topic at a chosen pace."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
from kafka import KafkaProducer

from streamer.core import Batch
from streamer.kafka.connection import KafkaConnection
from streamer.kafka.errors import converted_errors

log = logging.getLogger("streamer.produce")

DEFAULT_LOOP_GAP_S = 1.0  # between rounds of a looped file whose timestamps show no gap


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
            if value is not None and not value > 0:
                raise ValueError(f"--{name} must be > 0, got {value}")


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
            stop: threading.Event | None = None, time_shift: bool = True) -> int:
    """Send the readings in file order; returns how many were sent (all acknowledged).

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
    with converted_errors("connecting the producer"):
        producer = connection.kafka_python(KafkaProducer, acks="all", linger_ms=5)
    sent, started = 0, time.monotonic()
    first_ts = float(finite[0]) if len(finite) else 0.0
    try:
        with converted_errors(f"sending readings to {topic}"):
            while not stop.is_set():
                for i in range(n):
                    if stop.is_set() or (limit is not None and sent >= limit):
                        break
                    ts = float(readings.ts[i]) + shift
                    _wait_for_turn(pace, sent, float(readings.ts[i]) - first_ts, started, stop)
                    producer.send(topic, key=readings.sensor_ids[i].encode(),
                                  value=encode_reading(readings.sensor_ids[i], ts,
                                                       readings.values[i]))
                    sent += 1
                if not loop or (limit is not None and sent >= limit):
                    break
                shift += span
                first_ts -= span  # keep --speedup pacing continuous across rounds
        with converted_errors("flushing"):
            producer.flush()
    finally:
        producer.close()
    return sent


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
