"""Sharing weights across a consumer group, measured end to end: worker processes on the real
local broker (a print-out).

    python -m tests.bench_sharing_live [--fleets appliances,parking,hourly,daily] [--workers 4]

tests/bench_sharing.py measures the averaging itself, deterministically, with an in-process
transport; this runs what users run. For each shared fleet, three ways, each on fresh topics:

* **one worker**: one ``streamer run`` process on a one-partition copy of the input, so that it
  reads the fleet in time order as the in-process benchmark feeds it (a single consumer of a
  four-partition backlog is handed each partition in large chunks, so it would learn some
  sensors' later readings before forecasting the others' earlier ones: on parking that alone
  gave 0.657 against 0.728 in time order);
* **N workers, not sharing**: N processes in one group, ``STREAMER_SHARING__ENABLED=false``;
* **N workers, sharing**: N processes in one group sharing through the model topic.

The fleet is produced first (file order, key = sensor id, murmur2 partitioning as the Java
client) into a 4-partition input topic, then the workers start and drain it. A fleet's months
pass in about a minute here, where in service they pass in months with a sharing round every
30 s, so both intervals are 1 s (a checkpoint and a sharing round per second): the rounds per
reading stay closer to what a service does than the defaults would. Every forecast is read
back from the output topic and scored as ``streamer replay`` scores (relMAE = mean over sensors
of MAE / persistence MAE, ``streamer.tools.replay.score``); a reading without a forecast counts
as rejected. Timing differs run to run (which worker is ahead on its partitions when a round
happens), so the figures carry a run-to-run spread that the in-process benchmark does not.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from streamer.core import Batch
from streamer.kafka.admin import ensure_topics
from streamer.kafka.broker import LocalBroker
from streamer.tools.produce import encode_reading
from streamer.tools.replay import score
from tests.bench_fleets import FLEETS, SHARED, read_fleet

PARTITIONS = 4
INTERVAL_S = 1.0  # default of --interval: seconds between checkpoints and sharing rounds


def produce_fleet(bootstrap: str, topic: str, readings: Batch) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 20,
                         "partitioner": "murmur2_random", "queue.buffering.max.messages": 10**6})
    for sid, ts, values in zip(readings.sensor_ids, readings.ts, readings.values):
        while True:
            try:
                producer.produce(topic, key=sid.encode(), value=encode_reading(sid, ts, values))
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError("the fleet was not produced within 120 s")


def start_workers(bootstrap: str, topics: dict[str, str], n: int, sharing: bool,
                  workdir: Path, interval_s: float = INTERVAL_S) -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
    env.update({
        "STREAMER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "STREAMER_KAFKA__INPUT_TOPIC": topics["in"],
        "STREAMER_KAFKA__OUTPUT_TOPIC": topics["out"],
        "STREAMER_KAFKA__DLQ_TOPIC": topics["dlq"],
        "STREAMER_KAFKA__ANOMALY_TOPIC": topics["anomalies"],
        "STREAMER_KAFKA__MODEL_TOPIC": topics["model"],
        "STREAMER_KAFKA__GROUP_ID": topics["group"],
        "STREAMER_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "STREAMER_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        "STREAMER_KAFKA__FETCH_MAX_WAIT_MS": "100",
        "STREAMER_METRICS__PORT": "0",
        "STREAMER_METRICS__HOST": "127.0.0.1",
        "STREAMER_CHECKPOINT__DIR": str(workdir / "checkpoints"),
        "STREAMER_CHECKPOINT__INTERVAL_SECONDS": str(interval_s),
        "STREAMER_SHARING__ENABLED": "true" if sharing else "false",
        "STREAMER_SHARING__INTERVAL_SECONDS": str(interval_s),
        "STREAMER_DEVICE": "cpu",
        "STREAMER_LOG__LEVEL": "WARNING",
    })
    workers = []
    for i in range(n):
        log = open(workdir / f"w{i}.log", "w")  # noqa: SIM115 - closed with the process
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "streamer", "run"], stdout=log, stderr=subprocess.STDOUT,
            env={**env, "STREAMER_CHECKPOINT__WORKER_ID": f"w{i}"}))
    return workers


def read_forecasts(bootstrap: str, topics: dict[str, str], readings: Batch,
                   timeout_s: float, workers: list[subprocess.Popen]) -> np.ndarray:
    """(n, F) each reading's forecast (nan: none), read until every reading has a forecast
    or a dead letter."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    index = {(sid, float(ts)): i for i, (sid, ts) in enumerate(zip(readings.sensor_ids,
                                                                      readings.ts))}
    forecasts = np.full(readings.values.shape, np.nan)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}",
                        "enable.auto.commit": False})
    consumer.assign([TopicPartition(topics["out"], p, OFFSET_BEGINNING)
                     for p in range(PARTITIONS)] + [TopicPartition(topics["dlq"], 0,
                                                                   OFFSET_BEGINNING)])
    seen = dead = 0
    deadline = time.monotonic() + timeout_s
    try:
        while seen + dead < len(readings):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{seen + dead:,} of {len(readings):,} readings answered")
            if any(w.poll() is not None for w in workers):
                raise RuntimeError("a worker exited")
            for record in consumer.consume(num_messages=5000, timeout=0.5):
                if record.error() is not None:
                    continue
                if record.topic() == topics["dlq"]:
                    dead += 1
                    continue
                body = json.loads(record.value())
                i = index.get((body["sensor_id"], float(body["ts"])))
                if i is not None and np.isnan(forecasts[i]).all():
                    seen += 1
                    forecasts[i] = body["value"] if "value" in body else body["values"]
    finally:
        consumer.close()
    return forecasts


def run(broker: LocalBroker, readings: Batch, n: int, sharing: bool, workdir: Path,
        partitions: int = PARTITIONS, interval_s: float = INTERVAL_S) -> dict:
    name = f"share-{uuid.uuid4().hex[:8]}"
    topics = {k: f"{name}-{k}" for k in ("in", "out", "dlq", "anomalies", "model")}
    topics["group"] = f"{name}-group"
    ensure_topics(broker.bootstrap, {topics["in"]: partitions, topics["out"]: PARTITIONS,
                                     topics["dlq"]: 1, topics["anomalies"]: 1})
    produce_fleet(broker.bootstrap, topics["in"], readings)
    run_dir = workdir / name
    run_dir.mkdir()
    started = time.monotonic()
    workers = start_workers(broker.bootstrap, topics, n, sharing, run_dir, interval_s)
    try:
        forecasts = read_forecasts(broker.bootstrap, topics, readings, 900.0, workers)
    except Exception:
        for log in sorted(run_dir.glob("w*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
    status = np.where(np.isnan(forecasts).any(axis=1), 1, 0)
    report = score(readings.sensor_ids, readings.values, np.nan_to_num(forecasts), status)
    return {"rel_mae": report.rel_mae, "missing": int(status.sum()),
            "seconds": time.monotonic() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED.resolve())
    parser.add_argument("--fleets", default=",".join(FLEETS))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--interval", type=float, default=INTERVAL_S,
                        help="seconds between checkpoints and between sharing rounds")
    args = parser.parse_args()
    n, interval_s = args.workers, args.interval
    print(f"Worker processes on the local broker; sharing and checkpoint intervals {interval_s} s;"
          " relMAE (readings without a forecast; seconds to drain):\n")
    print(f"| fleet | readings | one worker (1 partition) | {n} not sharing | {n} sharing | "
          "sharing vs one | sharing vs not sharing |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-share-") as tmp:
        for fleet in args.fleets.split(","):
            readings = read_fleet(fleet, args.data)
            one = run(broker, readings, 1, False, Path(tmp), 1, interval_s)
            apart = run(broker, readings, n, False, Path(tmp), interval_s=interval_s)
            shared = run(broker, readings, n, True, Path(tmp), interval_s=interval_s)

            def cell(r: dict) -> str:
                return f"{r['rel_mae']:.4f} ({r['missing']}; {r['seconds']:.0f} s)"

            vs_one = shared["rel_mae"] / one["rel_mae"] - 1
            vs_apart = shared["rel_mae"] / apart["rel_mae"] - 1
            print(f"| {fleet} | {len(readings):,} | {cell(one)} | {cell(apart)} | "
                  f"{cell(shared)} | {vs_one:+.1%} | {vs_apart:+.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
