"""Random SIGKILLs against a real worker: nothing lost, and the forecasts of a crashed run
equal an uninterrupted one (a print-out; a check run from outside the test suite).

    python -m tests.chaos_kills [--clients kafka-python,confluent] [--kills 20] [--seed 0]
                                [--sensors 8] [--steps 3000]

For each Kafka client, on the local broker: the same readings go to two one-partition topics;
an **uninterrupted** worker forecasts the first; on the second a worker is started and killed
with SIGKILL ``--kills`` times, each at a random moment: a quarter within 1.5 s of it being
ready, restored (the group join, the first micro-batches), the others after its first
forecast, uniform up to the uninterrupted run's time per kill (mid micro-batch, mid update,
mid checkpoint write, mid produce alike); then one last worker finishes the stream (fewer
kills when the stream ends first: the count is printed). Checked: every reading has a
forecast, none was dead-lettered (a reading applied twice would be), the last forecast
emitted for each reading equals the uninterrupted run's (atol 1e-4: the output is at least
once, the state exactly once), and the final checkpoints' weights are equal.
tests/serving/test_durability.py pins six named crash points in CI; this throws many unnamed
ones. Settings as that test: checkpoints every 60 readings, micro-batches of 37.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic

from streamer.kafka.broker import LocalBroker
from tests.serving.conftest import (
    WorkerProcess,
    consume_from,
    forecasts_by_source,
    produce_to,
    wait_for,
    worker_env,
)
from tests.serving.test_durability import _final_weights, _stream


def _worker(broker: LocalBroker, client: str, topics: tuple[str, str, str], name: str,
            directory: Path, log: Path) -> WorkerProcess:
    """The durability test's worker: checkpoints every 60 readings, micro-batches of 37."""
    env = worker_env(broker.bootstrap, client, topics, f"{topics[1]}-group", name, directory,
                     STREAMER_KAFKA__ANOMALY_TOPIC="",
                     STREAMER_KAFKA__MAX_POLL_RECORDS="37",
                     STREAMER_CHECKPOINT__INTERVAL_READINGS="60",
                     STREAMER_CHECKPOINT__INTERVAL_SECONDS="3600",
                     STREAMER_SHARING__ENABLED="false")
    return WorkerProcess(env, log)


def _forecasts(broker: LocalBroker, topic: str, n: int) -> dict[tuple[int, int], list[dict]]:
    return forecasts_by_source(consume_from(broker.bootstrap, topic, n, timeout_s=30))


def run(broker: LocalBroker, client: str, kills: int, rng: random.Random, data: list,
        work: Path) -> dict[str, object]:
    run_id = f"{client}-{os.getpid()}-{time.monotonic_ns()}"
    topics = {name: tuple(f"chaos-{run_id}-{name}-{x}" for x in ("in", "out", "dlq"))
              for name in ("steady", "crashy")}
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:  # one partition each: one consumption order, so the two runs must agree exactly
        admin.create_topics([NewTopic(t, 1, 1) for names in topics.values() for t in names])
    finally:
        admin.close()
    for inp, _, _ in topics.values():
        produce_to(broker.bootstrap, inp, data)
    n = len(data)

    steady = _worker(broker, client, topics["steady"], "steady", work / f"{run_id}-steady",
                     work / f"{run_id}-steady.log").start()
    began = time.monotonic()
    steady.wait_ready(60)
    wait_for(lambda: steady.metric("streamer_forecasts_produced_total") >= n, 300,
             "the uninterrupted run", steady.log)
    took = time.monotonic() - began
    steady.signal(signal.SIGTERM)
    assert steady.wait(30) == 0, steady.log()

    reader = KafkaConsumer(topics["crashy"][1], bootstrap_servers=broker.bootstrap,
                           auto_offset_reset="earliest", enable_auto_commit=False,
                           fetch_max_wait_ms=100)
    records: list = []

    def all_forecast() -> bool:
        for batch in reader.poll(timeout_ms=500).values():
            records.extend(batch)
        return len(forecasts_by_source(records)) >= n

    crashy_dir, killed, started = work / f"{run_id}-crashy", 0, []
    try:
        for k in range(kills):
            victim = _worker(broker, client, topics["crashy"], "crashy", crashy_dir,
                             work / f"{run_id}-crashy-{k}.log").start()
            started.append(victim)
            victim.wait_ready(60)  # restored: the health server starts after the restore
            if rng.random() < 0.25:  # during the group join or the first micro-batches
                time.sleep(rng.uniform(0.0, 1.5))
            else:  # while it works through the stream: once its first forecast is out
                try:
                    wait_for(lambda v=victim: v.metric("streamer_forecasts_produced_total") > 0,
                             15, "a restarted worker's first forecast")
                except AssertionError:
                    if all_forecast():  # nothing left: the kills got through the stream
                        victim.stop()
                        break
                time.sleep(rng.uniform(0.0, took / kills))
            victim.signal(signal.SIGKILL)
            victim.wait(30)
            killed += 1
        last = _worker(broker, client, topics["crashy"], "crashy", crashy_dir,
                       work / f"{run_id}-crashy-last.log").start()
        started.append(last)
        last.wait_ready(60)
        wait_for(all_forecast, 300, "every reading to be forecast after the kills", last.log)
        # Every reading has a forecast, maybe from a killed worker: the last one must still
        # catch up from the checkpoint it restored before its final checkpoint is the end state.
        restored = re.search(r"restored \S+: .* offsets \{[^}]*: (\d+)\}",
                             last.log_path.read_text())
        start = int(restored.group(1)) if restored else 0
        wait_for(lambda: last.metric("streamer_forecasts_produced_total") >= n - start, 300,
                 "the last worker to catch up", last.log)
        last.signal(signal.SIGTERM)
        assert last.wait(30) == 0, last.log()
        while True:  # its re-emitted forecasts too: the last one per reading is compared
            seen = len(records)
            all_forecast()
            if len(records) == seen:
                break
    finally:
        reader.close()
        for worker in started:  # none is left running when a check above fails
            worker.stop()
    got = forecasts_by_source(records)

    expected = _forecasts(broker, topics["steady"][1], n)
    missing = set(expected) - set(got)
    common = sorted(set(expected) & set(got))
    diff = np.abs(np.array([got[k][-1]["value"] for k in common])
                  - np.array([expected[k][-1]["value"] for k in common]))
    probe = KafkaConsumer(bootstrap_servers=broker.bootstrap)
    try:  # one partition, created empty: its end offset counts every dead letter ever sent
        dlq = TopicPartition(topics["crashy"][2], 0)
        dead = probe.end_offsets([dlq])[dlq]
    finally:
        probe.close()
    steady_w = _final_weights(work / f"{run_id}-steady", "steady")
    crashy_w = _final_weights(crashy_dir, "crashy")
    weight_diff = max(float((crashy_w[name] - t).abs().max()) for name, t in steady_w.items())
    return {
        "readings": n, "uninterrupted s": round(took, 1), "kills": killed,
        "missing": len(missing), "re-emitted": sum(1 for k in got if len(got[k]) > 1),
        "emitted": sum(len(v) for v in got.values()),
        "max |forecast diff|": float(diff.max()) if len(diff) else float("nan"),
        "differ > 1e-4": int((diff > 1e-4).sum()), "dead letters": dead,
        "uninterrupted forecasts": len(expected),
        "max |weight diff|": weight_diff,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="kafka-python,confluent")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sensors", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3000, help="readings per sensor")
    parser.add_argument("--keep", default=None, help="keep logs and checkpoints in this folder")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    data = _stream(args.sensors, args.steps)
    failed = False
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for client in args.clients.split(","):
            result = run(broker, client, args.kills, rng, data, work)
            ok = (result["missing"] == 0 and result["differ > 1e-4"] == 0
                  and result["dead letters"] == 0 and result["max |weight diff|"] <= 1e-4
                  and result["uninterrupted forecasts"] == result["readings"]
                  and (result["kills"] > 0 or args.kills == 0))
            failed = failed or not ok
            print(f"{client}: {'OK' if ok else 'FAILED'} " + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in result.items()), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
