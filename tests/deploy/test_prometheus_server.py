"""A real Prometheus scrapes a real HealthServer; every dashboard query and alert rule runs."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from dashboard_queries import (
    all_selected,
    load_dashboard,
    panels_without_data,
    query,
    runnable_queries,
)
from prometheus_client import CollectorRegistry
from test_prometheus_rules import alert_rules

from streamer.core.batch import HorizonResult, StepResult, UpdateStats
from streamer.core.rejections import Reason
from streamer.observability.health import HealthServer
from streamer.observability.metrics import Metrics

pytestmark = pytest.mark.prometheus

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def feed(metrics: Metrics, tick: int) -> None:
    """One synthetic worker-loop iteration: a batch, a step with an update and a flagged
    reading, lag, checkpoint."""
    rng = np.random.default_rng(tick)
    n = 20
    status = np.zeros(n, dtype=np.int8)
    status[0] = Reason.NON_FINITE
    inside = (rng.uniform(size=n) < 0.9).astype(np.int8)
    inside[0] = -1  # rejected: unscored
    anomaly = np.zeros(n, dtype=bool)
    anomaly[1] = True
    grad_norm = float(10 ** rng.uniform(-1, 0.5))
    horizon = HorizonResult.empty(n, 1, 8, np.array([2, 4, 8]))
    horizon.step_error[:] = rng.uniform(0.2, 2.0, (n, 3))
    result = dataclasses.replace(
        StepResult.empty(n, 1),
        status=status,
        forecasts=np.zeros((n, 1)),
        update_count=np.full(n, tick, dtype=np.int64),
        model_error=rng.uniform(0.1, 0.5, n),
        persistence_error=rng.uniform(0.3, 0.8, n),
        inside=inside,
        interval_width=rng.uniform(0.5, 4.0, n),
        anomaly=anomaly,
        horizon=horizon,
        updates=[
            UpdateStats(
                update_index=tick, loss=float(rng.uniform(0.05, 0.2)), grad_norm=grad_norm,
                clipped=grad_norm > 1.0, skipped=False, slots=8, steps=64,
                duration_seconds=0.01,
            )
        ],
        new_sensors=1 if tick < 5 else 0,
    )
    metrics.observe_batch(n, rng.uniform(0.001, 0.2, n))
    metrics.observe_step(result)
    metrics.observe_flagged([f"s{tick % 3}"], time.time())
    metrics.observe_dlq(Reason.NOT_JSON)
    metrics.set_sensors(active=min(tick, 5), capacity=64)
    metrics.set_lag({("sensor-readings", 0): 10 + tick, ("sensor-readings", 1): 3})
    metrics.observe_checkpoint(0.05, 4096, time.time())
    metrics.set_model_sync_interval(30.0)
    metrics.set_model_peers(3)
    metrics.observe_model_published(time.time())
    metrics.observe_model_averaged(0.01 * tick, time.time())
    metrics.set_ready(True)


@pytest.fixture(scope="module")
def worker_target() -> Iterator[HealthServer]:
    """A HealthServer over a Metrics registry fed by a background 'worker' every 100 ms."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_grad_norm=1.0, device="cpu", coverage_target=0.9, horizon=8)
    stop = threading.Event()

    def loop() -> None:
        tick = 0
        while not stop.is_set():
            tick += 1
            feed(metrics, tick)
            stop.wait(0.1)

    feeder = threading.Thread(target=loop, daemon=True)
    feeder.start()
    server = HealthServer(
        registry, liveness=lambda: True, readiness=lambda: (True, ""), host="127.0.0.1", port=0
    )
    with server:
        yield server
    stop.set()
    feeder.join(timeout=5)


@pytest.fixture(scope="module")
def prometheus(
    worker_target: HealthServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A prometheus server scraping the target every second; yields its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    tmp_path = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "streamer",
                "static_configs": [{"targets": [f"127.0.0.1:{worker_target.port}"]}],
            },
            {   # itself, as in the compose stack: a target that is no worker
                "job_name": "prometheus",
                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
            },
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def api(base: str, path: str, **params: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def wait_for_samples(base: str, samples: int, timeout: float = 60.0) -> None:
    """Block until the target has been scraped ``samples`` times (rates need at least two)."""
    deadline = time.monotonic() + timeout
    probe = "count_over_time(streamer_readings_consumed_total[1m])"
    last_error = ""
    while time.monotonic() < deadline:
        try:
            result = query(base, probe)["data"]["result"]
            if result and float(result[0]["value"][1]) >= samples:
                return
        except OSError as err:  # server still starting
            last_error = str(err)
        time.sleep(0.5)
    pytest.fail(f"prometheus had no {samples} samples after {timeout}s {last_error}")


def test_every_dashboard_query_runs_and_returns_data(prometheus: str) -> None:
    wait_for_samples(prometheus, samples=5)
    # Each query names exported metrics with the right labels, so each must return series.
    assert panels_without_data(prometheus) == []


def test_with_all_selected_the_panels_count_only_streamer_workers(prometheus: str) -> None:
    # allValue ".*" matched every target: "Workers up" read 2 with one worker and Prometheus
    # scraping itself (the compose stack), the CPU and memory panels showed Prometheus too.
    wait_for_samples(prometheus, samples=2)
    dashboard = load_dashboard()
    variables = all_selected(prometheus, dashboard)
    assert variables["job"] == "(streamer)"
    checked = set()
    for where, promql in runnable_queries(dashboard, variables):
        if where.split("/")[0] in ("Workers up", "CPU", "Resident memory"):
            checked.add(where.split("/")[0])
            result = query(prometheus, promql)["data"]["result"]
            assert len(result) == 1, (where, result)
            if where.startswith("Workers up"):
                assert float(result[0]["value"][1]) == 1.0
    assert checked == {"Workers up", "CPU", "Resident memory"}


def test_scraped_values_match_what_the_worker_observed(prometheus: str) -> None:
    wait_for_samples(prometheus, samples=3)
    threshold = query(prometheus, 'streamer_grad_norm_clip_threshold{job="streamer"}')
    assert float(threshold["data"]["result"][0]["value"][1]) == 1.0
    lag = query(prometheus, 'streamer_consumer_lag_records{partition="1"}')["data"]["result"]
    assert [float(r["value"][1]) for r in lag] == [3.0]
    ready = query(prometheus, "streamer_ready")["data"]["result"]
    assert float(ready[0]["value"][1]) == 1.0
    target = query(prometheus, "streamer_interval_coverage_target")["data"]["result"]
    assert [float(r["value"][1]) for r in target] == [0.9]
    # One flagged reading per batch, its sensor one of three.
    flagged = query(prometheus, "streamer_sensors_flagged")["data"]["result"]
    assert [float(r["value"][1]) for r in flagged] == [3.0]
    positions = query(prometheus, "streamer_interval_readings_total")["data"]["result"]
    assert {r["metric"]["position"] for r in positions} == {"inside", "outside"}


def test_alert_rules_load_and_evaluate_without_errors(prometheus: str) -> None:
    wait_for_samples(prometheus, samples=3)
    deadline = time.monotonic() + 30
    while True:
        groups = api(prometheus, "/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"rules never evaluated: {rules}")
        time.sleep(0.5)
    assert len(rules) == len(alert_rules())
    assert {rule["health"] for rule in rules} == {"ok"}, [r.get("lastError") for r in rules]
