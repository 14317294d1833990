"""The real worker scraped by a real Prometheus: metrics, dashboard queries, health endpoints."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time

import pytest
import yaml

from streamer.kafka.admin import ensure_topics
from streamer.kafka.broker import LocalBroker, free_port
from tests.deploy.dashboard_queries import panels_without_data, query
from tests.serving.conftest import produce_to, reading, wait_for

pytestmark = pytest.mark.prometheus


def test_worker_metrics_feed_every_dashboard_query_and_health_follows_the_broker(
        tmp_path, worker_factory, group_id):
    for tool in ("prometheus", "promtool"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install prometheus)")
    with LocalBroker(log_path=tmp_path / "broker.log") as own:
        ensure_topics(own.bootstrap, {"obs-in": 2, "obs-out": 2, "obs-dlq": 1})
        # Two workers of one group, one partition each: the shared-model panels need a peer.
        worker, peer = (worker_factory("obs-in", "obs-out", "obs-dlq", group_id, name=name,
                                       STREAMER_KAFKA__BOOTSTRAP_SERVERS=own.bootstrap,
                                       STREAMER_CHECKPOINT__INTERVAL_SECONDS="1",
                                       STREAMER_SHARING__INTERVAL_SECONDS="1").start()
                        for name in ("w1", "w2"))
        worker.wait_ready()
        peer.wait_ready()
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "streamer", "static_configs": [
                {"targets": [f"127.0.0.1:{worker.port}", f"127.0.0.1:{peer.port}"]}]}],
        }))
        port = free_port()
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=(tmp_path / "prom.log").open("wb"), stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            # Readings (and a bad one) until training has run and a checkpoint exists.
            t = 0
            deadline = time.monotonic() + 60
            while (worker.metric("streamer_updates_total") < 3
                   or worker.metric("streamer_checkpoint_last_success_timestamp_seconds") == 0
                   or worker.metric("streamer_model_last_average_timestamp_seconds") == 0):
                assert time.monotonic() < deadline, worker.log() + peer.log()
                produce_to(own.bootstrap, "obs-in", [
                    reading(f"s{s}", 1.7e9 + 60 * (t + k), math.sin((t + k) / 3 + s))
                    for k in range(10) for s in range(12)] + [(b"s0", b"garbage")])
                t += 10
                time.sleep(0.3)
            # A few scrapes after training (rates need two samples), however slow the machine.
            wait_for(lambda: panels_without_data(base) == [], 60, "data in every panel",
                     worker.log)

            _, text = worker.get("/metrics")
            check = subprocess.run(["promtool", "check", "metrics"], input=text,
                                   capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr
            labels = set(re.findall(r'(\w+)="([^"]*)"', text))
            assert not {name for name, _ in labels if "sensor" in name}
            assert not {value for _, value in labels} & {f"s{i}" for i in range(12)}

            consumed = query(base, 'sum(streamer_readings_consumed_total{job="streamer"})')
            assert float(consumed["data"]["result"][0]["value"][1]) > 0

            assert worker.get("/healthz")[0] == 200 and worker.get("/readyz")[0] == 200
            own.kill()
            wait_for(lambda: worker.get("/readyz")[0] == 503, 30, "/readyz to turn 503",
                     worker.log)
            status, body = worker.get("/readyz")
            assert "broker unavailable" in body
            assert worker.get("/healthz")[0] == 200  # alive, just not ready
        finally:
            prom.terminate()
            prom.wait(timeout=10)


def test_json_logs_are_one_object_per_line_with_level_and_event(
        tmp_path, worker_factory, group_id, topic_factory):
    inp, out, dlq = topic_factory(1), topic_factory(1), topic_factory(1)
    worker = worker_factory(inp, out, dlq, group_id, STREAMER_LOG__FORMAT="json").start()
    worker.wait_ready()
    worker.stop()
    lines = [json.loads(line) for line in worker.log_path.read_text().splitlines() if line.strip()]
    events = [entry["event"] for entry in lines]
    assert any(e.startswith("worker w1 started") for e in events), worker.log()
    assert all({"ts", "level", "logger", "event"} <= entry.keys() for entry in lines)
