"""The Prometheus alert rules (infra/prometheus/alerts.yaml) and their promtool tests.

`promtool check rules` parses them, `promtool test rules` runs the unit tests in
infra/prometheus/tests/ (each rule fires on its signal and stays quiet on near misses),
and two mutants of every rule (one that never fires, one without its `for:`) must make
those tests fail, so a test that cannot fail is caught. Every metric and label the
rules name must be one the code declares (shared/metrics.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.promql import problems
from tests.support.tools import tool

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "infra" / "prometheus" / "alerts.yaml"
RULE_TESTS = sorted((ROOT / "infra" / "prometheus" / "tests").glob("*.yaml"))
SEVERITIES = {"critical", "warning"}


def load_rules(path: Path = RULES) -> list[dict[str, Any]]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


ALERTS = [rule["alert"] for rule in load_rules()]


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120)


def run_rule_tests(rules_dir: Path, only: str | None = None) -> subprocess.CompletedProcess[str]:
    """promtool test rules against `rules_dir/alerts.yaml`, over every test file or those
    with cases of the alert `only`."""
    files = [p for p in RULE_TESTS if only is None or f"alertname: {only}\n" in p.read_text()]
    if rules_dir != RULES.parent:
        (rules_dir / "tests").mkdir()
        files = [Path(shutil.copy(p, rules_dir / "tests" / p.name)) for p in files]
    return promtool("test", "rules", *files)


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_the_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool tests in infra/prometheus/tests"
    result = run_rule_tests(RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


@pytest.mark.parametrize("alert", ALERTS)
def test_each_rule_waits_is_labelled_and_tells_what_to_do(alert: str) -> None:
    rule = next(r for r in load_rules() if r["alert"] == alert)
    assert rule.get("for"), "a rule without `for:` pages on one bad scrape"
    assert rule["labels"]["severity"] in SEVERITIES
    for annotation in ("summary", "description", "runbook"):
        assert len(rule["annotations"].get(annotation, "").strip()) > 20, annotation


def alert_cases() -> dict[str, dict[str, int]]:
    """For each alert name, how many promtool cases expect it to fire and to stay quiet."""
    cases: dict[str, dict[str, int]] = {}
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                counts = cases.setdefault(case["alertname"], {"fires": 0, "quiet": 0})
                counts["fires" if case.get("exp_alerts") else "quiet"] += 1
    return cases


def test_every_alert_has_cases_where_it_fires_and_where_it_stays_quiet() -> None:
    cases = alert_cases()
    assert set(cases) == set(ALERTS), "promtool cases name an alert that does not exist, or miss one"
    missing = {name: c for name, c in cases.items() if not (c["fires"] and c["quiet"])}
    assert not missing


@pytest.mark.parametrize("alert", ALERTS)
@pytest.mark.parametrize("mutant", ["never fires", "no for"])
def test_the_promtool_tests_fail_when_a_rule_is_broken(alert: str, mutant: str, tmp_path: Path) -> None:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alert:
                if mutant == "never fires":
                    rule["expr"] = "absent(vector(1))"
                else:
                    rule["for"] = "0s"
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    assert promtool("check", "rules", tmp_path / "alerts.yaml").returncode == 0
    result = run_rule_tests(tmp_path, only=alert)
    assert result.returncode != 0, f"the promtool tests still pass with {alert} broken ({mutant})"
    assert f"alertname: {alert}," in result.stdout + result.stderr


@pytest.mark.parametrize("alert", ALERTS)
def test_every_metric_and_label_a_rule_names_is_declared_in_the_code(alert: str) -> None:
    rule = next(r for r in load_rules() if r["alert"] == alert)
    assert problems(rule["expr"]) == []


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("paymentsvc_worker_lagg_messages > 1000", "unknown metric paymentsvc_worker_lagg_messages"),
        ('paymentsvc_worker_lag_messages{consumr="usage"} > 1', "paymentsvc_worker_lag_messages has no label consumr"),
        ("sum by (service) (paymentsvc_worker_lag_messages) > 1", "grouping by service, a label none of the expression's metrics has"),
        ('increase(paymentsvc_worker_events_total{outcome="deadlettered"}[5m]) > 0',
         "paymentsvc_worker_events_total{outcome=\"deadlettered\"}: the code never uses the value 'deadlettered'"),
        ("rate(paymentsvc_webhooks_rejected[5m]) > 0", "unknown metric paymentsvc_webhooks_rejected"),
    ],
)
def test_a_misspelled_metric_label_or_value_is_caught(expr: str, problem: str) -> None:
    assert problem in problems(expr)
