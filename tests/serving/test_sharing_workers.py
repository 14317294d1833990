"""One model per consumer group, with real workers on the real local broker."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from kafka import KafkaProducer

from streamer.kafka.admin import ensure_topics
from streamer.serving.sharing import H_FINGERPRINT, H_GROUP, H_READINGS, H_SEQUENCE
from tests.serving.conftest import forecasts_by_source, reading, wait_for

SHARING = dict(STREAMER_SHARING__INTERVAL_SECONDS="1", STREAMER_SHARING__PEER_TTL_SECONDS="60",
               STREAMER_CHECKPOINT__INTERVAL_SECONDS="1")


def _stream(n_sensors: int, n_steps: int, step0: int = 0):
    return [reading(f"s{s}", 1.7e9 + 60.0 * t, math.sin(t / 3 + s) * (s % 5 + 1) + 0.02 * t)
            for t in range(step0, step0 + n_steps) for s in range(n_sensors)]


def _final_weights(directory: Path, worker: str) -> dict[str, torch.Tensor]:
    manifest = json.loads(sorted(directory.glob(f"{worker}-*.json"))[-1].read_text())
    return torch.load(directory / manifest["data"], weights_only=True)["model"]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _four_workers(worker_factory, topics, group_id: str, tmp_path: Path):
    """Four ready workers of one group sharing weights; (their env, them, their logs)."""
    env = dict(SHARING, STREAMER_KAFKA__MODEL_TOPIC=f"{group_id}-model",
               STREAMER_CHECKPOINT__DIR=str(tmp_path / "ckpt"))
    workers = [worker_factory(*topics, group_id, name=f"w{i}", **env).start() for i in range(4)]

    def logs() -> str:
        return "".join(w.log() for w in workers)

    wait_for(lambda: all(w.metric("streamer_ready") == 1 for w in workers), 60, "ready", logs)
    return env, workers, logs


def _holds_a_partition(worker) -> bool:
    assigned = [line for line in worker.log().splitlines() if " assigned " in line]
    return bool(assigned) and "assigned nothing" not in assigned[-1]


def _wait_settled(workers, quiet_s: float, timeout_s: float, logs) -> None:
    """Until every worker has averaged and no publish or average happened for ``quiet_s``."""
    def marks():
        return [(w.metric("streamer_model_last_publish_timestamp_seconds"),
                 w.metric("streamer_model_last_average_timestamp_seconds")) for w in workers]

    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = marks()
        if now != last:
            last, since = now, time.monotonic()
        elif all(average > 0 for _, average in now) and time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.2)
    raise AssertionError(f"sharing did not settle: {last}\n{logs()}")


def test_four_workers_forecast_every_reading_once_and_end_with_equal_weights(
        topic_factory, group_id, worker_factory, produce_raw, consume_raw, tmp_path):
    inp, out, dlq = topic_factory(4), topic_factory(4), topic_factory(1)
    env, workers, logs = _four_workers(worker_factory, (inp, out, dlq), group_id, tmp_path)
    wait_for(lambda: all(_holds_a_partition(w) for w in workers), 60, "a partition each", logs)
    data = _stream(24, 60)
    sent = dict(zip(produce_raw(inp, data), data))
    wait_for(lambda: sum(w.metric("streamer_forecasts_produced_total") for w in workers)
             >= len(sent), 120, "every forecast", logs)
    assert all(w.metric("streamer_updates_total") > 0 for w in workers), logs()
    # The stream has ended: one more round (publish, average) with no training, then quiet.
    _wait_settled(workers, quiet_s=4.0, timeout_s=60, logs=logs)
    assert all(w.metric("streamer_model_peers") == 3 for w in workers)
    for w in workers:
        w.signal(signal.SIGTERM)
    assert [w.wait(20) for w in workers] == [0, 0, 0, 0], logs()

    got = forecasts_by_source(consume_raw(out, 10**6, timeout_s=2))
    assert set(got) == set(sent) and all(len(v) == 1 for v in got.values())  # each once
    assert consume_raw(dlq, 1, timeout_s=1) == []
    final = [_final_weights(tmp_path / "ckpt", f"w{i}") for i in range(4)]
    assert max(_max_difference(final[0], f) for f in final[1:]) <= 1e-6


def test_a_worker_killed_mid_stream_restarts_rejoins_the_averaging_and_loses_nothing(
        topic_factory, group_id, worker_factory, produce_raw, consume_raw, tmp_path):
    inp, out, dlq = topic_factory(4), topic_factory(4), topic_factory(1)
    env, workers, logs = _four_workers(worker_factory, (inp, out, dlq), group_id, tmp_path)
    sent = {}
    first = _stream(24, 40)  # 24 sensors: every one of the four partitions gets some
    sent.update(zip(produce_raw(inp, first), first))
    wait_for(lambda: all(w.metric("streamer_model_peers") >= 1 for w in workers), 60,
             "peers heard", logs)
    workers[3].proc.kill()  # SIGKILL, mid-stream
    workers[3].proc.wait(5)
    second = _stream(24, 40, step0=40)
    sent.update(zip(produce_raw(inp, second), second))
    # The others never block: they go on forecasting without the dead one.
    done = sum(w.metric("streamer_forecasts_produced_total") for w in workers[:3])
    wait_for(lambda: sum(w.metric("streamer_forecasts_produced_total") for w in workers[:3])
             > done, 60, "the others to go on", logs)
    restarted = worker_factory(inp, out, dlq, group_id, name="w3", **env).start()
    since = time.time()
    workers[3] = restarted
    wait_for(lambda: _holds_a_partition(restarted), 60, "the restarted worker's partition",
             logs)
    third = _stream(24, 40, step0=80)
    sent.update(zip(produce_raw(inp, third), third))

    def all_forecast(got={}) -> bool:  # noqa: B006 - accumulates across polls
        got.update(forecasts_by_source(consume_raw(out, 10**6, timeout_s=1)))
        all_forecast.got = got
        return set(sent) <= set(got)

    wait_for(all_forecast, 120, "every reading forecast", logs)
    wait_for(lambda: restarted.metric("streamer_model_last_average_timestamp_seconds") > since,
             60, "the restarted worker to average again", restarted.log)
    assert restarted.metric("streamer_model_peers") >= 1
    assert consume_raw(dlq, 1, timeout_s=1) == []  # no reading rejected (e.g. out of order)


def test_a_lone_worker_replacing_a_killed_one_under_a_new_id_does_not_average_with_it(
        topic_factory, group_id, worker_factory, produce_raw, tmp_path):
    # A Deployment's new pod has a new name: it restores the dead pod's checkpoint, whose
    # weights the dead pod's last record on the model topic holds (or older ones). Averaging
    # with that record would pull the new pod back towards its own past for a whole TTL.
    inp, out, dlq = topic_factory(1), topic_factory(1), topic_factory(1)
    env = dict(SHARING, STREAMER_KAFKA__MODEL_TOPIC=f"{group_id}-model",
               STREAMER_CHECKPOINT__DIR=str(tmp_path / "ckpt"))
    old = worker_factory(inp, out, dlq, group_id, name="pod-old", **env).start()
    produce_raw(inp, _stream(6, 60))
    wait_for(lambda: old.metric("streamer_model_last_publish_timestamp_seconds") > 0, 60,
             "the old pod's publish", old.log)
    old.proc.kill()
    old.proc.wait(5)
    new = worker_factory(inp, out, dlq, group_id, name="pod-new", **env).start()
    produce_raw(inp, _stream(6, 60, step0=60))
    published = lambda: new.metric(  # noqa: E731
        "streamer_model_last_publish_timestamp_seconds")
    wait_for(lambda: published() > 0, 60, "the new pod's publish", new.log)
    first = published()
    produce_raw(inp, _stream(6, 60, step0=120))
    wait_for(lambda: published() > first, 60, "a second publish (a round later)", new.log)
    assert "restored pod-old-" in new.log()
    assert new.metric("streamer_model_peers", required=True) == 0, new.log()
    last_average = new.metric("streamer_model_last_average_timestamp_seconds", required=True)
    assert last_average == 0, new.log()


def test_garbage_and_incompatible_weights_are_ignored_and_a_lone_worker_is_unchanged(
        topic_factory, group_id, worker_factory, produce_raw, consume_raw, broker, tmp_path):
    """One worker with sharing on, garbage on its model topic, gives bitwise the forecasts of
    one with sharing off."""
    data = _stream(6, 50)

    def run(sharing: str) -> np.ndarray:
        inp, out, dlq = topic_factory(1), topic_factory(1), topic_factory(1)
        model, group = f"{group_id}-{sharing}-model", f"{group_id}-{sharing}"
        if sharing == "on":
            _publish_intruders(broker.bootstrap, model, group)
        produce_raw(inp, data)  # all of it before the start: the same micro-batches both runs
        worker = worker_factory(inp, out, dlq, group, name=f"lone-{sharing}",
                                STREAMER_SHARING__ENABLED=str(sharing == "on").lower(),
                                STREAMER_KAFKA__MODEL_TOPIC=model,
                                STREAMER_CHECKPOINT__DIR=str(tmp_path / sharing), **SHARING)
        worker.start()
        wait_for(lambda: worker.metric("streamer_forecasts_produced_total") >= len(data), 60,
                 "forecasts", worker.log)
        if sharing == "on":
            ignored = lambda reason: worker.metric(  # noqa: E731
                "streamer_model_records_ignored_total", reason=reason)
            wait_for(lambda: ignored("garbage") >= 1 and ignored("incompatible") >= 1, 30,
                     "both ignored", worker.log)
            wait_for(lambda: worker.metric("streamer_model_last_publish_timestamp_seconds") > 0,
                     30, "a publish", worker.log)
            assert worker.metric("streamer_model_peers", required=True) == 0
        worker.signal(signal.SIGTERM)
        assert worker.wait(20) == 0
        got = forecasts_by_source(consume_raw(out, len(data), timeout_s=10))
        return np.array([got[k][0]["value"] for k in sorted(got)])

    np.testing.assert_array_equal(run("on"), run("off"))


def _publish_intruders(bootstrap: str, model: str, group: str) -> None:
    """Records of our group on the model topic: one of another model, one not weights."""
    ensure_topics(bootstrap, {model: 1})
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    headers = [(H_GROUP, group.encode()), (H_READINGS, b"5"), (H_SEQUENCE, b"1")]
    producer.send(model, key=f"{group}/intruder".encode(), value=b"\x80\x04garbage", partition=0,
                  headers=headers + [(H_FINGERPRINT, b"whatever")])
    producer.send(model, key=f"{group}/stranger".encode(), value=b"junk", partition=0,
                  headers=headers + [(H_FINGERPRINT, _fingerprint().encode())])
    producer.flush(10)
    producer.close()


def _fingerprint() -> str:
    """The model fingerprint of worker_factory's workers (its training settings)."""
    from streamer.config import load_settings

    return load_settings({"training.tbptt_steps": "4", "training.train_every": "20",
                          "training.warmup_readings": "2", "device": "cpu"}
                         ).learner_config().fingerprint()


def test_weights_too_large_to_publish_are_refused_at_start_up_naming_the_limit():
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
    env.update(STREAMER_MODEL__HIDDEN_SIZE="256", STREAMER_DEVICE="cpu")
    done = subprocess.run([sys.executable, "-m", "streamer", "run"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "1,000,000" in done.stderr and "STREAMER_SHARING__MAX_MESSAGE_BYTES" in done.stderr
