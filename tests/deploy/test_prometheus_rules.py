"""Alert rules: valid for promtool, unit tests pass, and every alert has a test."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"

# Behaviours the brief asks the rules to cover, as alert names.
REQUIRED_ALERTS = {
    "StreamerExplodingGradients",
    "StreamerNonFiniteUpdates",
    "StreamerLossRising",
    "StreamerSkillBelowZero",
    "StreamerConsumerLagGrowing",
    "StreamerNoForecasts",
    "StreamerCheckpointStale",
    "StreamerWorkerDown",
    "StreamerWorkersAbsent",
    "StreamerPartitionStalled",
    "StreamerDeadLetterFlood",
    "StreamerSensorTableNearlyFull",
    "StreamerBrokerTrouble",
    "StreamerInputTopicMissing",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool in the rules directory (paths inside the files are relative to it)."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return subprocess.run(
        [binary, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120
    )


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_the_rules() -> None:
    proc = promtool("check", "rules", ALERTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_accepts_the_scrape_config() -> None:
    proc = promtool("check", "config", CONFIG.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    proc = promtool("test", "rules", ALERTS_TEST.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_required_alerts_exist() -> None:
    assert REQUIRED_ALERTS <= {rule["alert"] for rule in alert_rules()}


def test_every_alert_has_a_firing_and_a_quiet_test() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    assert tests["rule_files"] == [ALERTS.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts without a firing test"
    assert names - quiet == set(), "alerts without a not-firing test"


def test_every_alert_has_severity_and_summary() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_scrape_config_loads_the_alerts_and_scrapes_the_worker_every_5s() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert config["rule_files"] == [ALERTS.name]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "streamer"]
    assert job["scrape_interval"] == "5s"
    assert job["static_configs"][0]["targets"] == ["streamer:9100"]
