"""Extract the Grafana dashboard's PromQL, with Grafana's variables substituted, for real queries.

Used by the dashboard structure test and by tests that run every panel query against a real
Prometheus (``test_prometheus_server.py`` here, ``tests/serving/test_observability.py``).
"""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "streamer.json"

# What Grafana would put in place of each variable when "All" is selected and the range is short
# (for job and instance the values their queries list, as a regex: `.*` stands in for them where
# only streamer is scraped; all_selected() gives the real ones).
DEFAULT_VARIABLES: Mapping[str, str] = {
    "job": ".*",
    "instance": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$"
)


@dataclass(frozen=True)
class PanelQuery:
    """One target of one panel."""

    panel: str
    ref_id: str
    expr: str  # as written in the dashboard, variables unsubstituted


def load_dashboard(path: Path = DASHBOARD) -> dict:
    """The dashboard JSON as a dict."""
    return json.loads(path.read_text())


def iter_panels(dashboard: Mapping) -> Iterator[dict]:
    """Every non-row panel, including panels nested inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_queries(dashboard: Mapping) -> list[PanelQuery]:
    """Every PromQL target in the dashboard, in panel order."""
    return [
        PanelQuery(panel["title"], target.get("refId", ""), target["expr"])
        for panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def substitute(expr: str, variables: Mapping[str, str] = DEFAULT_VARIABLES) -> str:
    """``expr`` with ``$var``, ``${var}`` and ``[[var]]`` replaced; unknown names raise KeyError."""

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        if name not in variables:
            raise KeyError(f"no value for dashboard variable ${name} in {expr!r}")
        return variables[name]

    return _VARIABLE.sub(replace, expr)


def runnable_queries(
    dashboard: Mapping, variables: Mapping[str, str] = DEFAULT_VARIABLES
) -> list[tuple[str, str]]:
    """(``panel/refId``, PromQL ready for /api/v1/query) for every panel target."""
    return [
        (f"{q.panel}/{q.ref_id}", substitute(q.expr, variables)) for q in panel_queries(dashboard)
    ]


def variable_selectors(
    dashboard: Mapping, variables: Mapping[str, str] = DEFAULT_VARIABLES
) -> dict[str, tuple[str, str]]:
    """For each ``label_values(selector, label)`` variable: (substituted selector, label)."""
    found: dict[str, tuple[str, str]] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        match = _LABEL_VALUES.match(_query_text(var))
        if match:
            selector = substitute(match.group("selector") or "", variables)
            found[var["name"]] = (selector, match.group("label"))
    return found


def _query_text(var: Mapping) -> str:
    query = var.get("query")
    return query.get("query", "") if isinstance(query, dict) else str(query or "")


# PromQL words that are not metric names.
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan",
}
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (functions, labels, keywords excluded)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, is_call = match.group(1), match.group(2)
        if is_call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def query(base: str, promql: str) -> dict:
    """The JSON answer of a real Prometheus at ``base`` to an instant query."""
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def all_selected(base: str, dashboard: Mapping) -> dict[str, str]:
    """The variables as Grafana sets them with "All" selected in each, against the Prometheus at
    ``base``: the variable's allValue if it has one, else a regex of every value its query
    lists."""
    variables = dict(DEFAULT_VARIABLES)
    for var in dashboard.get("templating", {}).get("list", []):  # each after those it names
        match = _LABEL_VALUES.match(_query_text(var))
        if not match:
            continue
        if "allValue" in var:
            variables[var["name"]] = var["allValue"]
            continue
        selector = substitute(match.group("selector") or "", variables)
        url = (f"{base}/api/v1/label/{match.group('label')}/values?"
               f"{urllib.parse.urlencode({'match[]': selector})}")
        with urllib.request.urlopen(url, timeout=10) as resp:
            values = json.load(resp)["data"]
        # Regex-escaped, then escaped again for a PromQL string, as Grafana does.
        variables[var["name"]] = "(" + "|".join(re.escape(v).replace("\\", "\\\\")
                                                for v in values) + ")"
    return variables


def panels_without_data(base: str) -> list[str]:
    """Run every dashboard query against ``base``, "All" selected as Grafana selects it; each
    must succeed. Returns the ``panel/refId`` of those that returned no series."""
    empty = []
    dashboard = load_dashboard()
    for where, promql in runnable_queries(dashboard, all_selected(base, dashboard)):
        response = query(base, promql)
        assert response["status"] == "success", f"{where}: {promql}: {response}"
        if not response["data"]["result"]:
            empty.append(where)
    return empty
