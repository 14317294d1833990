"""Grafana dashboard: fixed uid, variables, and queries that match what the worker exports."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from dashboard_queries import (
    REPO,
    iter_panels,
    load_dashboard,
    metric_names,
    panel_queries,
    runnable_queries,
    substitute,
    variable_selectors,
)
from prometheus_client import CollectorRegistry

from streamer.observability.metrics import Metrics

# The provisioned datasource: the datasource variable's default.
PROVISIONED = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DATASOURCE_UID = yaml.safe_load(PROVISIONED.read_text())["datasources"][0]["uid"]
# What every panel, target and query variable names: the datasource variable, so that the
# dashboard imported into another Grafana runs on whichever Prometheus is picked there.
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
# Series Prometheus itself adds to every target; not exported by the worker.
PROMETHEUS_SERIES = {"up"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


def exported_sample_names() -> set[str]:
    """Every sample name a fully-exercised ``Metrics`` registry exposes."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_grad_norm=1.0, device="cpu", coverage_target=0.9, horizon=12)
    metrics.set_lag({("sensor-readings", 0): 0})
    metrics.observe_flagged([], now=0.0)
    return {sample.name for family in registry.collect() for sample in family.samples}


def test_uid_and_title_are_fixed(dashboard: dict) -> None:
    assert dashboard["uid"] == "streamer-overview"
    assert dashboard["title"] == "streamer"


def test_job_and_instance_are_label_values_query_variables(dashboard: dict) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"job", "instance"} <= variables.keys()
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["includeAll"] is True
        # No allValue: "All" is the values the query lists, never `.*`, which matched every
        # target of the Prometheus (itself, other services) in the panels on `up`, CPU, memory.
        assert "allValue" not in variables[name]
        assert variables[name]["datasource"] == DATASOURCE_REF
    selectors = variable_selectors(dashboard)
    assert selectors["job"] == ("streamer_build_info", "job")
    assert selectors["instance"] == ('streamer_build_info{job=~".*"}', "instance")


def test_the_datasource_is_a_variable_defaulting_to_the_provisioned_prometheus(
    dashboard: dict,
) -> None:
    variables = dashboard["templating"]["list"]
    assert variables[0]["name"] == "datasource"  # first: the others' queries run on it
    assert variables[0]["type"] == "datasource"
    assert variables[0]["query"] == "prometheus"
    assert variables[0]["current"]["value"] == DATASOURCE_UID
    text = json.dumps(dashboard)
    assert DATASOURCE_UID not in text.replace(json.dumps(variables[0]), "")


def test_rows_cover_every_area(dashboard: dict) -> None:
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Throughput", "Training", "Forecast quality", "Capacity", "Shared model",
                    "Process"]


def test_every_panel_has_targets_on_the_datasource_variable(dashboard: dict) -> None:
    panels = list(iter_panels(dashboard))
    assert len(panels) >= 20
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == DATASOURCE_REF, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE_REF, panel["title"]


def test_panel_ids_are_unique(dashboard: dict) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_rate_uses_rate_interval(dashboard: dict) -> None:
    for query in panel_queries(dashboard):
        for call in re.finditer(r"\b(?:rate|irate|increase)\s*\([^()]*\[([^\]]+)\]", query.expr):
            assert call.group(1) == "$__rate_interval", f"{query.panel}: {query.expr}"


def test_event_counts_are_rates_whatever_the_zoom(dashboard: dict) -> None:
    # increase() over $__rate_interval counts events in a window that widens as the panel
    # zooms out (and overlaps the next point's), so "3 failures" meant nothing on its own; a
    # rate, shown per minute or per second as its legend says, reads the same at every zoom.
    for query in panel_queries(dashboard):
        assert not re.search(r"\bincrease\s*\(", query.expr), f"{query.panel}: {query.expr}"


def test_every_selector_filters_on_job_and_instance(dashboard: dict) -> None:
    for query in panel_queries(dashboard):
        expr = re.sub(r"\b(?:by|without|on)\s*\([^)]*\)", "", query.expr)
        names = metric_names(query.expr)
        assert names, f"{query.panel}: no metric in {query.expr}"
        for name in names:
            for use in re.finditer(rf"\b{re.escape(name)}\b(\{{[^}}]*\}})?", expr):
                matchers = use.group(1) or ""
                assert 'job=~"$job"' in matchers, f"{query.panel}: {name} in {query.expr}"
                assert 'instance=~"$instance"' in matchers, f"{query.panel}: {name}"


def test_every_metric_referenced_is_exported(dashboard: dict) -> None:
    exported = exported_sample_names() | PROMETHEUS_SERIES
    referenced = {name for q in panel_queries(dashboard) for name in metric_names(q.expr)}
    assert referenced - exported == set()


def test_every_training_and_quality_metric_is_on_the_dashboard(dashboard: dict) -> None:
    referenced = {name for q in panel_queries(dashboard) for name in metric_names(q.expr)}
    for name in (
        "streamer_grad_norm_bucket", "streamer_grad_norm_clip_threshold",
        "streamer_clip_events_total", "streamer_updates_skipped_total",
        "streamer_model_abs_error_total", "streamer_persistence_abs_error_total",
        "streamer_interval_readings_total", "streamer_interval_coverage_target",
        "streamer_interval_width_bucket", "streamer_anomalies_total", "streamer_sensors_flagged",
        "streamer_horizon_abs_error_total", "streamer_horizon_scored_total",
        "streamer_consumer_lag_records", "streamer_sensor_slots_capacity",
        "streamer_sensors_limit",
        "streamer_checkpoint_last_success_timestamp_seconds",
        "streamer_device_memory_allocated_bytes", "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert name in referenced, name


def test_grad_norm_panel_shows_the_clip_threshold(dashboard: dict) -> None:
    (panel,) = [p for p in iter_panels(dashboard) if "Gradient norm" in p["title"]]
    exprs = " ".join(t["expr"] for t in panel["targets"])
    assert "streamer_grad_norm_clip_threshold" in exprs
    assert "histogram_quantile(0.99" in exprs


def test_coverage_panel_divides_inside_by_scored_and_shows_the_target(dashboard: dict) -> None:
    (panel,) = [p for p in iter_panels(dashboard) if p["title"] == "Interval coverage vs target"]
    coverage, target = (t["expr"] for t in panel["targets"])
    inside, scored = coverage.split(" / ")
    assert 'position="inside"' in inside and "position" not in scored
    assert metric_names(inside) == metric_names(scored) == {"streamer_interval_readings_total"}
    assert metric_names(target) == {"streamer_interval_coverage_target"}


def test_anomaly_panel_shows_rate_share_and_sensors_flagged(dashboard: dict) -> None:
    (panel,) = [p for p in iter_panels(dashboard) if p["title"] == "Anomaly rate"]
    per_second, per_thousand, sensors = (t["expr"] for t in panel["targets"])
    assert metric_names(per_second) == {"streamer_anomalies_total"}
    assert per_thousand.startswith("1000 * ")
    # per scored reading, not per scored value (the interval counter counts each feature)
    assert metric_names(per_thousand) == {
        "streamer_anomalies_total", "streamer_scored_readings_total"
    }
    assert metric_names(sensors) == {"streamer_sensors_flagged"}


def test_panels_do_not_overlap_on_the_grid(dashboard: dict) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for y in range(pos["y"], pos["y"] + pos["h"]):
            for x in range(pos["x"], pos["x"] + pos["w"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]


def test_substitution_leaves_no_variables(dashboard: dict) -> None:
    for where, expr in runnable_queries(dashboard):
        assert "$" not in expr, where
        assert "[1m]" in expr or "rate(" not in expr, where


def test_substitute_handles_every_variable_syntax() -> None:
    assert substitute('x{a=~"${job}", b=~"[[instance]]"}[$__rate_interval]') == (
        'x{a=~".*", b=~".*"}[1m]'
    )
    with pytest.raises(KeyError, match="nope"):
        substitute("x{a=\"$nope\"}")


def test_metric_names_skips_functions_labels_and_keywords() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"$job"}[$__rate_interval])))'
        " / on (job) group_left b_total offset 5m and time() - c > 1e-3"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
