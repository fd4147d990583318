"""`paymentsvc dev --with-prometheus`: the real Prometheus scrapes every service of the
dev stack and loads the production alert rules; asked through its HTTP API.

The stack runs as in test_dev_stack.py (free ports, a fresh database, the session's
broker with a topic prefix of its own); Prometheus comes from Debian's package.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.devbroker import free_port
from tests.support.grafana import dashboard_queries, load
from tests.support.tools import tool
from tests.support.wait import eventually_sync

pytestmark = pytest.mark.e2e
READY_WITHIN_S = 90
ROOT = Path(__file__).resolve().parents[2]
ALERTS = [r["alert"] for g in yaml.safe_load((ROOT / "infra/prometheus/alerts.yaml").read_text())["groups"] for r in g["rules"]]


@pytest.fixture
def stack(tmp_path: Path, database_url: str, broker: str) -> Iterator[dict[str, Any]]:
    """Where the stack listens (stack.json), plus `stop()`: Ctrl-C, then the output."""
    tool("prometheus")  # skips on a laptop without it, fails under CI
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "API_KEYS"))}
    env.update(
        DATABASE_URL=database_url,
        KAFKA_BOOTSTRAP_SERVERS=broker,
        KAFKA_TOPIC_PREFIX=f"e2e{os.urandom(3).hex()}.",
        **{name: str(free_port()) for name in ("GRPC_PORT", "GRPC_HTTP_PORT", "INGEST_PORT", "ENTITLEMENTS_PORT", "USAGE_PORT", "DUNNING_PORT")},
    )
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "paymentsvc.cli", "dev", "--with-prometheus", "--log-dir", str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )

    def stop() -> str:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("the dev stack did not stop on Ctrl-C")
        return output.decode()

    stack_file = tmp_path / "stack.json"
    try:
        while not stack_file.exists():
            if process.poll() is not None or time.monotonic() - started > READY_WITHIN_S:
                output = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(f"dev stack not ready within {READY_WITHIN_S} s:\n{output[-3000:]}")
            time.sleep(0.2)
        yield {**json.loads(stack_file.read_text()), "stop": stop}
    finally:
        if process.poll() is None:
            stop()


def query(prometheus: str, path: str, **params: str) -> Any:
    url = f"{prometheus}{path}?{urllib.parse.urlencode(params)}" if params else f"{prometheus}{path}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes: it no longer runs.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_prometheus_scrapes_every_dev_service_and_loads_the_alert_rules(stack: dict[str, Any]) -> None:
    prometheus = stack["prometheus"]["url"]
    assert prometheus.startswith("http://127.0.0.1:")
    services = set(stack["services"])

    def every_target_up() -> list[dict[str, Any]] | None:
        results = query(prometheus, "/api/v1/query", query="up")["result"]
        up = {r["metric"]["job"]: r["value"][1] for r in results}
        return results if up == {name: "1" for name in services} else None

    targets = eventually_sync(every_target_up, timeout=30, interval=0.5, what="up == 1 for every service")
    assert {t["metric"]["instance"] for t in targets} == {
        url.removeprefix("http://") for url in stack["services"].values()
    }

    # Our own metrics, as each service serves them.
    info = query(prometheus, "/api/v1/query", query="paymentsvc_service_info")["result"]
    assert {(r["metric"]["job"], r["metric"]["service"]) for r in info} == {(s, s) for s in services}

    # The production rules are loaded and evaluate without error.
    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = query(prometheus, "/api/v1/rules", type="alert")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r["lastEvaluation"] > "2000" for r in rules) else None

    rules = eventually_sync(rules_evaluated, timeout=30, interval=0.5, what="every alert rule evaluated")
    assert sorted(r["name"] for r in rules) == sorted(ALERTS)
    assert {r["name"]: r["health"] for r in rules} == {name: "ok" for name in ALERTS}
    # A stack that just started fires nothing.
    assert [r["name"] for r in rules if r["state"] == "firing"] == []

    # Every query of the Grafana dashboard runs against it; its targets panel shows every service.
    for expr in dashboard_queries(load()):
        query(prometheus, "/api/v1/query", query=expr)
    shown = query(prometheus, "/api/v1/query", query=dashboard_queries(load())[1])["result"]
    assert {(r["metric"]["service"], r["value"][1]) for r in shown} == {(s, "1") for s in services}

    # The table shows it; Ctrl-C stops it with the stack, by its pid.
    pid = stack["prometheus"]["pid"]
    assert alive(pid)
    output = stack["stop"]()
    assert "prometheus" in output and prometheus in output.replace("\n", "")
    assert eventually_sync(lambda: not alive(pid), timeout=10, interval=0.2, what="prometheus stopped")
