"""The Grafana dashboard (infra/grafana/paymentsvc.json) is provisioning-ready and
shows what the alerts watch, with metrics and labels the code declares.

Each check is a function that returns its problems, so the tests can show that a
broken dashboard (a hard-wired data source, a misspelled metric, a panel off the
grid) is caught.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.grafana import all_panels, dashboard_queries, load
from tests.support.promql import declared_series, problems, scan
from tests.support.tools import tool

ROOT = Path(__file__).resolve().parents[2]
PROVISIONING = ROOT / "infra" / "grafana" / "provisioning"
RULES = ROOT / "infra" / "prometheus" / "alerts.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)$")


def shape_problems(dashboard: dict[str, Any]) -> list[str]:
    """What would stop Grafana provisioning it as is, on any Prometheus data source."""
    out = []
    if dashboard.get("id") is not None:
        out.append("id must be null: Grafana assigns it")
    if not re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", str(dashboard.get("uid", ""))):
        out.append("uid must be set (a stable link), 40 characters at most")
    if "__inputs" in dashboard or "__requires" in dashboard:
        out.append("an export for sharing (__inputs) is not read by provisioning")
    if not isinstance(dashboard.get("schemaVersion"), int) or not dashboard.get("title"):
        out.append("schemaVersion and title are required")
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    source = variables.get("datasource", {})
    if (source.get("type"), source.get("query")) != ("datasource", "prometheus"):
        out.append("no `datasource` variable of type datasource over prometheus")
    ids = [p.get("id") for p in all_panels(dashboard)]
    if len(ids) != len(set(ids)) or None in ids:
        out.append(f"panel ids must be unique: {ids}")
    for panel in all_panels(dashboard):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in "hwxy") or grid["x"] + grid["w"] > 24:
            out.append(f"{where}: gridPos must have h, w, x, y within 24 columns")
        if panel.get("type") == "row":
            continue
        if panel.get("datasource") != DATASOURCE:
            out.append(f"{where}: datasource must be the variable, {DATASOURCE}")
        targets = panel.get("targets", [])
        if not targets:
            out.append(f"{where}: no queries")
        refs = [t.get("refId") for t in targets]
        if len(refs) != len(set(refs)) or None in refs:
            out.append(f"{where}: refIds must be unique")
        for target in targets:
            if target.get("datasource", DATASOURCE) != DATASOURCE:
                out.append(f"{where}: a query's datasource must be the variable")
            if not target.get("expr"):
                out.append(f"{where}: a query without expr")
    for name, variable in variables.items():
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query)
            if not LABEL_VALUES.match(text):
                out.append(f"variable {name}: expected label_values(metric, label), got {text!r}")
            if variable.get("datasource") != DATASOURCE:
                out.append(f"variable {name}: datasource must be the variable")
    return out


def reference_problems(dashboard: dict[str, Any]) -> list[str]:
    """Metrics, labels and values the code does not serve, in queries and variables."""
    out = []
    series = declared_series()
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            out += [f"{panel.get('title')!r}: {p}" for p in problems(target.get("expr", ""), series)]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query)
        match = LABEL_VALUES.match(text)
        if match and match.group(2) not in series.get(match.group(1), frozenset()):
            out.append(f"variable {variable.get('name')}: {match.group(1)} has no label {match.group(2)}")
    return out


def alert_metrics() -> dict[str, set[str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: {ref.metric for ref in scan(r["expr"]).references} for g in groups for r in g["rules"]}


def dashboard_metrics(dashboard: dict[str, Any]) -> set[str]:
    return {ref.metric for p in all_panels(dashboard) for t in p.get("targets", []) for ref in scan(t.get("expr", "")).references}


def test_the_dashboard_is_valid_json_ready_for_provisioning() -> None:
    assert shape_problems(load()) == []


def test_every_metric_label_and_value_the_dashboard_names_is_declared_in_the_code() -> None:
    assert reference_problems(load()) == []


def test_promtool_parses_every_query_of_the_dashboard(tmp_path: Path) -> None:
    # As recording rules, so promtool's parser checks each query without a server.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(dashboard_queries(load()))
    ]}]}
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump(rules))
    result = subprocess.run([tool("promtool"), "check", "rules", str(tmp_path / "queries.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_shows_every_signal_an_alert_watches() -> None:
    shown = dashboard_metrics(load())
    assert {alert: metrics - shown for alert, metrics in alert_metrics().items() if metrics - shown} == {}


def test_the_provisioning_files_point_grafana_at_the_dashboards() -> None:
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "paymentsvc.yaml").read_text())
    assert providers["apiVersion"] == 1
    assert [p["type"] for p in providers["providers"]] == ["file"]
    assert providers["providers"][0]["options"]["path"]
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    assert [s["type"] for s in sources["datasources"]] == ["prometheus"]


def _first_query(dashboard: dict[str, Any]) -> dict[str, Any]:
    return next(t for p in all_panels(dashboard) for t in p.get("targets", []))


def _first_panel(dashboard: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in all_panels(dashboard) if p.get("type") != "row")


@pytest.mark.parametrize(
    ("breakage", "check", "problem"),
    [
        (lambda d: _first_panel(d).update(datasource={"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}),
         shape_problems, "datasource must be the variable"),
        (lambda d: d.update(id=7), shape_problems, "id must be null"),
        (lambda d: d["templating"]["list"].pop(0), shape_problems, "no `datasource` variable"),
        (lambda d: _first_panel(d)["gridPos"].update(x=20), shape_problems, "within 24 columns"),
        (lambda d: _first_query(d).update(expr="sum(rate(paymentsvc_webhooks_recieved_total[5m]))"),
         reference_problems, "unknown metric paymentsvc_webhooks_recieved_total"),
        (lambda d: d["templating"]["list"][1]["query"].update(query="label_values(paymentsvc_worker_events_total, worker)"),
         reference_problems, "paymentsvc_worker_events_total has no label worker"),
    ],
)
def test_a_broken_dashboard_is_caught(breakage: Any, check: Any, problem: str) -> None:
    dashboard = copy.deepcopy(load())
    breakage(dashboard)
    assert any(problem in p for p in check(dashboard)), check(dashboard)


def test_a_signal_missing_from_the_dashboard_is_caught() -> None:
    dashboard = copy.deepcopy(load())
    for panel in all_panels(dashboard):
        panel["targets"] = [t for t in panel.get("targets", []) if "paymentsvc_worker_log_mismatch" not in t["expr"]]
    assert "paymentsvc_worker_log_mismatch" not in dashboard_metrics(dashboard)
    assert "paymentsvc_worker_log_mismatch" in alert_metrics()["PaymentsvcWorkerLogMismatch"]
