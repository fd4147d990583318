"""The Grafana dashboard (infra/grafana/paymentsvc.json), read as Grafana reads it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "paymentsvc.json"


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def grafana_free(expr: str) -> str:
    """The query as Prometheus gets it from Grafana: variables replaced by values."""
    return expr.replace("$__rate_interval", "1m").replace("$consumer", ".*")


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    return [grafana_free(t["expr"]) for p in all_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
