"""Running the real worker (`python -m streamer run`) as a subprocess against the test broker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streamer.kafka.admin import delete_topics
from streamer.kafka.broker import free_port
from streamer.kafka.errors import KafkaClientError
from tests.conftest import TEST_CONSUMER_TIMEOUTS


class WorkerProcess:
    """One worker subprocess with its own env, log file and metrics port."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env, self.log_path = env, log_path
        self.port = int(env["STREAMER_METRICS__PORT"])
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "streamer", "run"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def metric(self, name: str, *, required: bool = False, **labels: str) -> float:
        """The first sample of ``name`` with these labels (0.0 when there is none, or when
        /metrics does not answer; ``required``: an AssertionError then, so that a check that
        a value is 0 cannot pass on a metric renamed or a worker gone)."""
        status, text = self.get("/metrics")
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                if all(label in line for label in wanted):
                    return float(line.rsplit(" ", 1)[1])
        assert not required, (f"no sample of {name}{labels or ''} (/metrics answered {status})"
                              f"\n{self.log()}")
        return 0.0

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.get("/readyz")[0] == 200:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"worker not ready in {timeout_s}s:\n{self.log()}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


def worker_env(bootstrap: str, client: str, topics: tuple[str, str, str], group: str,
               name: str, checkpoints: Path, **env: str) -> dict[str, str]:
    """A test worker's environment: this process's without its STREAMER_ settings, the topics
    ``(input, output, dead letters)`` (anomaly and model topics named after the output), small
    training windows, one thread, the test broker's quick group timeouts; then ``env``."""
    inp, out, dlq = topics
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")},
        "STREAMER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "STREAMER_KAFKA__CLIENT": client,
        "STREAMER_KAFKA__INPUT_TOPIC": inp,
        "STREAMER_KAFKA__OUTPUT_TOPIC": out,
        "STREAMER_KAFKA__DLQ_TOPIC": dlq,
        "STREAMER_KAFKA__ANOMALY_TOPIC": f"{out}-anomalies",
        "STREAMER_KAFKA__MODEL_TOPIC": f"{out}-model",  # a test's own: nothing to skip
        "STREAMER_KAFKA__GROUP_ID": group,
        "STREAMER_KAFKA__POLL_TIMEOUT_MS": "200",
        "STREAMER_METRICS__PORT": str(free_port()),
        "STREAMER_METRICS__HOST": "127.0.0.1",
        "STREAMER_CHECKPOINT__DIR": str(checkpoints),
        "STREAMER_CHECKPOINT__WORKER_ID": name,
        "STREAMER_DEVICE": "cpu",
        "STREAMER_TRAINING__TBPTT_STEPS": "4",
        "STREAMER_TRAINING__TRAIN_EVERY": "20",
        "STREAMER_TRAINING__WARMUP_READINGS": "2",
        "OMP_NUM_THREADS": "1",
        **{f"STREAMER_KAFKA__{k.upper()}": str(v) for k, v in TEST_CONSUMER_TIMEOUTS.items()},
        **env,
    }


@pytest.fixture
def worker_factory(broker, tmp_path, client_kind) -> Iterator[Callable[..., WorkerProcess]]:
    """``make(topics, group, **env) -> WorkerProcess`` (not started); killed after the test.

    Each test that uses it runs once per Kafka client backend (``client_kind``)."""
    made: list[WorkerProcess] = []
    own_topics: set[str] = set()  # named here, created by the workers: removed afterwards

    def make(inp: str, out: str, dlq: str, group: str, name: str = "w1",
             **env: str) -> WorkerProcess:
        own_topics.update((f"{out}-anomalies", f"{out}-model"))
        full = worker_env(broker.bootstrap, client_kind, (inp, out, dlq), group, name,
                          tmp_path / "checkpoints", **env)
        worker = WorkerProcess(full, tmp_path / f"{name}-{len(made)}.log")
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stop()
    with contextlib.suppress(KafkaClientError):  # best effort: the broker keeps every topic
        delete_topics(broker.bootstrap, own_topics)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str,
             log: Callable[[], str] = lambda: "") -> None:
    """Poll ``predicate`` every 0.1 s; fail naming ``what`` (and ``log()``) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{log()}")


def reading(sensor: str, ts: float, value: float | None = None, **body) -> tuple[bytes, bytes]:
    payload = {"sensor_id": sensor, "ts": ts, **body}
    if value is not None:
        payload["value"] = value
    return sensor.encode(), json.dumps(payload).encode()


def forecasts_by_source(records) -> dict[tuple[int, int], list[dict]]:
    """Output records grouped by the (partition, offset) of the reading they follow."""
    grouped: dict[tuple[int, int], list[dict]] = {}
    for r in records:
        body = json.loads(r.value)
        grouped.setdefault((body["partition"], body["offset"]), []).append(
            {**body, "_key": r.key.decode()})
    return grouped


def produce_to(bootstrap: str, topic: str, records) -> None:
    """Produce (key, value) pairs to a broker other than the session one, acks=all."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for key, value in records:
        producer.send(topic, key=key, value=value)
    producer.flush(10)
    producer.close()


def consume_from(bootstrap: str, topic: str, n: int, timeout_s: float = 20.0) -> list:
    """Up to ``n`` records of all partitions of ``topic`` on a broker other than the session's."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, fetch_max_wait_ms=100)
    got, deadline = [], time.monotonic() + timeout_s
    try:
        while len(got) < n and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                got.extend(batch)
    finally:
        consumer.close()
    return got
