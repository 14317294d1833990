"""`streamer produce`: what reaches the input topic is what the worker can read."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from streamer.core import Batch
from streamer.kafka import KafkaConnection, ProducerSettings, ensure_topics
from streamer.kafka.admin import topic_ids
from streamer.kafka.broker import LocalBroker
from streamer.kafka.errors import KafkaClientError
from streamer.tools import produce as produce_module
from streamer.tools.cli import main
from streamer.tools.produce import Pace, produce
from tests.broker_proxy import ProxiedBroker


@pytest.fixture
def produce_csv(broker, topic_factory, consume_raw, tmp_path, capsys):
    """``send(csv_text, *flags) -> (exit code, [message bodies], stderr)`` into a fresh topic;
    the bodies are parsed as strict JSON."""

    def send(text: str, *flags: str) -> tuple[int, list[dict], str]:
        path = tmp_path / "readings.csv"
        path.write_text(text)
        topic = topic_factory()
        code = main(["produce", str(path), "--bootstrap-servers", broker.bootstrap,
                     "--topic", topic, *flags])
        err = capsys.readouterr().err
        bodies = [json.loads(r.value, parse_constant=_refuse)
                  for r in consume_raw(topic, 100, timeout_s=3)]
        return code, bodies, err

    return send


def _refuse(token: str):
    raise ValueError(f"{token} is not JSON")  # what a strict parser says of NaN


@pytest.mark.broker
def test_a_looped_file_with_one_bad_timestamp_keeps_the_others_finite_and_increasing(
        produce_csv):
    code, bodies, _ = produce_csv("sensor_id,ts,value\na,1717171717,1\na,not-a-time,2\n"
                                  "a,1717171777,3\n", "--loop", "--limit", "6")
    assert code == 0
    good = [b for b in bodies if b["value"] != 2]  # the bad row itself is not the point here
    ts = [b["ts"] for b in good]
    assert [b["value"] for b in good] == [1, 3] * (len(good) // 2) and len(good) >= 4
    assert all(math.isfinite(t) for t in ts), ts
    # Each round moves on by the file's span (60 s) plus its typical gap (60 s).
    assert [b - a for a, b in zip(ts, ts[1:])] == pytest.approx([60.0] * (len(ts) - 1), abs=1e-3)


@pytest.mark.broker
def test_a_looped_file_with_one_distinct_timestamp_moves_on_one_second_a_round(produce_csv):
    code, bodies, _ = produce_csv("sensor_id,ts,value\na,1717171717,1\nb,1717171717,2\n",
                                  "--loop", "--limit", "6")
    assert code == 0
    for sensor in ("a", "b"):
        ts = [b["ts"] for b in bodies if b["sensor_id"] == sensor]
        assert len(ts) == 3 and all(math.isfinite(t) for t in ts), ts
        assert [b - a for a, b in zip(ts, ts[1:])] == pytest.approx([1.0, 1.0], abs=1e-3)


@pytest.mark.broker
def test_rows_with_an_empty_value_or_bad_timestamp_are_skipped_and_counted_not_sent_as_nan(
        produce_csv):
    code, bodies, err = produce_csv("sensor_id,ts,value\na,1717171717,1\na,1717171777,\n"
                                    "a,not-a-time,3\na,1717171897,4,5\nb,1717171717\n"
                                    "a,1717171957,nan\na,1717172017,6\n")
    assert code == 0
    assert [(b["sensor_id"], b["ts"], b["value"]) for b in bodies] == [
        ("a", 1717171717.0, 1.0), ("a", 1717172017.0, 6.0)]
    assert "skipping 5 rows" in err, err


@pytest.mark.broker
def test_readings_a_hung_broker_never_acknowledges_are_an_error_not_counted_as_sent():
    # The broker stops answering mid-file. Unchecked, produce returned the whole count as sent
    # once the records expired, or hung for ever in kafka-python's flush().
    outcome: list = []
    with LocalBroker() as broker:
        ensure_topics(broker.bootstrap, {"readings": 1})
        readings = Batch(sensor_ids=[f"s{i % 5}" for i in range(60)],
                         ts=np.arange(60, dtype=np.float64) + 1.7e9,
                         values=np.ones((60, 1)), n_values=np.ones(60, dtype=np.int64))

        def run() -> None:
            try:
                outcome.append(produce(
                    readings, KafkaConnection(bootstrap_servers=broker.bootstrap), "readings",
                    Pace(rate=40.0),
                    settings=ProducerSettings(request_timeout_ms=2000, delivery_timeout_ms=2500)))
            except Exception as exc:  # noqa: BLE001 - the outcome under test
                outcome.append(exc)

        producing = threading.Thread(target=run, daemon=True)
        producing.start()
        time.sleep(0.5)
        broker.freeze()
        producing.join(timeout=60)
        broker.thaw()
    assert not producing.is_alive(), "produce hung on a broker that stopped answering"
    [error] = outcome
    assert isinstance(error, KafkaClientError), error
    assert str(error).startswith("sending readings to readings failed: KafkaTimeoutError: "), error


def test_a_broker_that_cannot_be_reached_is_a_one_line_error_with_exit_1(tmp_path, capsys):
    path = tmp_path / "readings.csv"
    path.write_text("sensor_id,ts,value\na,1717171717,1\n")
    code = main(["produce", str(path), "--bootstrap-servers", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1, err  # not kafka-python's retries first
    assert err.startswith("streamer produce: connecting the producer failed: ") and \
        "127.0.0.1:1" in err and "ECONNREFUSED" in err, err  # (the reason its logs gave)


@pytest.mark.broker
def test_credentials_the_brokers_refuse_are_a_one_line_configuration_error_with_exit_2(
        tmp_path, capsys, monkeypatch):
    path = tmp_path / "readings.csv"
    path.write_text("sensor_id,ts,value\na,1717171717,1\n")
    settings = {"SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SASL_MECHANISM": "SCRAM-SHA-256",
                "SASL_USERNAME": "streamer", "SASL_PASSWORD": "not-the-password"}
    for name, value in settings.items():
        monkeypatch.setenv(f"STREAMER_KAFKA__{name}", value)
    with ProxiedBroker(tmp_path / "broker.log", sasl_users={"streamer": "pw"}) as secured:
        code = main(["produce", str(path), "--bootstrap-servers", secured.bootstrap])
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith("streamer produce: invalid configuration: kafka.sasl_mechanism"), err
    assert "STREAMER_KAFKA__SASL_PASSWORD" in last and "refused the credentials" in last, err


def test_an_invalid_topic_names_a_flag_that_produce_has(tmp_path, capsys):
    path = tmp_path / "readings.csv"
    path.write_text("sensor_id,ts,value\na,1717171717,1\n")
    for flag in ("--topic", "--kafka-input-topic"):  # the message names the second
        code = main(["produce", str(path), "--bootstrap-servers", "127.0.0.1:1", flag,
                     "bad topic"])
        err = capsys.readouterr().err
        assert code == 2 and "kafka.input_topic (STREAMER_KAFKA__INPUT_TOPIC / "\
            "--kafka-input-topic)" in err, err


@pytest.mark.parametrize(("flag", "setting"), [("--bootstrap-servers", "kafka.bootstrap_servers"),
                                               ("--topic", "kafka.input_topic")])
def test_an_empty_server_or_topic_is_refused_not_replaced_by_the_default(
        tmp_path, capsys, monkeypatch, flag, setting):
    # It fell back to the environment or localhost:9092, and failed there (exit 1).
    monkeypatch.delenv("STREAMER_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    path = tmp_path / "readings.csv"
    path.write_text("sensor_id,ts,value\na,1717171717,1\n")
    code = main(["produce", str(path), "--bootstrap-servers", "127.0.0.1:1", flag, ""])
    err = capsys.readouterr().err
    assert code == 2 and f"invalid configuration: {setting} " in err, err


def test_settings_produce_does_not_use_do_not_stop_it(tmp_path, capsys, monkeypatch):
    # The model's, the checkpoints' or kafka.client's variables, invalid or naming a client
    # that is not installed, stopped it with exit 2 naming a flag produce does not have.
    sent: list[str] = []
    monkeypatch.setattr(produce_module, "produce",
                        lambda readings, connection, topic, *a, **k: sent.append(topic) or 1)
    path = tmp_path / "readings.csv"
    path.write_text("sensor_id,ts,value\na,1717171717,1\n")
    for name, value in {"STREAMER_MODEL__HIDDEN_SIZE": "0", "STREAMER_CHECKPOINT__DIR": "",
                        "STREAMER_KAFKA__CLIENT": "bogus", "STREAMER_DEVICE": "cuda:99"}.items():
        monkeypatch.setenv(name, value)
    assert main(["produce", str(path), "--topic", "t1"]) == 0, capsys.readouterr().err
    assert sent == ["t1"]
    monkeypatch.setenv("STREAMER_KAFKA__COMPRESSION_TYPE", "bogus")  # what it uses: checked
    assert main(["produce", str(path), "--topic", "t1"]) == 2
    assert "STREAMER_KAFKA__COMPRESSION_TYPE" in capsys.readouterr().err


@pytest.mark.broker
def test_ctrl_c_stops_a_looped_run_cleanly_with_every_reading_counted_acknowledged(
        broker, topic_factory, consume_raw):
    # The way to end --loop or a paced run: it printed a 21-line traceback and no count.
    topic = topic_factory()
    own = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", "produce", "--loop", "--rate", "200",
         "--bootstrap-servers", broker.bootstrap, "--topic", topic],
        env=own, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60  # (the interpreter and its imports first)
        while not consume_raw(topic, 1, timeout_s=1) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    # ...and says so as itself (its stop line was logged as the worker's)
    assert "INFO streamer.produce: SIGINT: stopping cleanly (the readings sent are flushed)" in err
    assert "streamer.worker" not in err, err
    sent = int(re.fullmatch(rf"sent (\d+) readings to {topic} \(stopped by a signal\)\n",
                            out)[1])
    assert sent == len(consume_raw(topic, sent + 100, timeout_s=5)) > 0


@pytest.mark.broker
def test_a_topic_that_does_not_exist_is_a_one_line_error_and_is_not_created(
        broker, tmp_path, capsys):
    # A broker's auto-creation gave it its default partition count, for good (a typo).
    path = tmp_path / "readings.csv"
    path.write_text("sensor_id,ts,value\na,1717171717,1\n")
    topic = f"never-made-{os.getpid()}-{time.monotonic_ns()}"
    code = main(["produce", str(path), "--bootstrap-servers", broker.bootstrap, "--topic", topic])
    err = capsys.readouterr().err
    assert code == 1 and err == (f"streamer produce: topic {topic!r} does not exist: create it "
                                 "with the partitions the group's workers are to share "
                                 "(nothing here creates it)\n"), err
    assert topic_ids(broker.bootstrap, [topic]) == {topic: None}


def test_a_file_none_of_whose_rows_can_be_sent_is_an_input_error_not_sent_0(tmp_path, capsys):
    # Local times without a zone: every row skipped, and it said "sent 0 readings", exit 0.
    path = tmp_path / "readings.csv"
    path.write_text("sensor_id,ts,value\na,2024-01-01 00:00:00,1\na,2024-01-01 00:10:00,2\n")
    code = main(["produce", str(path), "--bootstrap-servers", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.splitlines()[-1] == (
        f"streamer produce: no readings to send in {path}: its 2 rows were all skipped "
        "(above); of 2 timestamps, 2 could not be read (a local time without a zone?): a "
        "timestamp is epoch seconds or RFC 3339 with a time zone (2024-01-01T00:00:00Z), as "
        "the worker reads it")
