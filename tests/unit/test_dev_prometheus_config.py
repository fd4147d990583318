"""The configuration `paymentsvc dev --with-prometheus` generates is one Prometheus
accepts (`promtool check config`, which also checks the rule files it loads), and the
rules it loads are infra/prometheus/alerts.yaml itself (package data by a link)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from paymentsvc.devprometheus import alert_rules_path, prometheus_config
from shared.config import SERVICE_NAMES
from tests.support.tools import tool

ROOT = Path(__file__).resolve().parents[2]


def test_the_packaged_rules_are_the_infra_rules() -> None:
    assert alert_rules_path().read_bytes() == (ROOT / "infra" / "prometheus" / "alerts.yaml").read_bytes()


def test_the_generated_configuration_scrapes_every_service_and_promtool_accepts_it(tmp_path: Path) -> None:
    targets = {name: f"127.0.0.1:{9100 + i}" for i, name in enumerate(SERVICE_NAMES)}
    config = prometheus_config(targets, alert_rules_path())
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}  # type: ignore[attr-defined]
    assert jobs == {name: [address] for name, address in targets.items()}
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(config))
    result = subprocess.run([tool("promtool"), "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = sum(len(g["rules"]) for g in yaml.safe_load(alert_rules_path().read_text())["groups"])
    assert f"SUCCESS: {rules} rules found" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_configuration(tmp_path: Path) -> None:
    config = prometheus_config({"usage": "127.0.0.1:9100"}, tmp_path / "missing.yaml")
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(config))
    result = subprocess.run([tool("promtool"), "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
