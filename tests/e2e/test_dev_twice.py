"""`make dev` twice (issue 11, item 1): the second run's events reach the projections.

Each run of `paymentsvc dev` starts its own embedded Tansu, whose log starts empty,
against the same database and Redis. The first run leaves high-water marks on every
partition; before the fix, the second run's workers waited at those marks, beyond
the new log's end, and skipped every new event. A private redis-server keeps the
dev stack's unprefixed keys away from other tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from paymentsvc.devstack import DEV_WEBHOOK_SECRET
from shared.devbroker import free_port
from tests.conftest import random_id
from tests.support.processes import ROOT, PrivateRedis
from tests.support.wait import eventually_sync

pytestmark = pytest.mark.e2e

PORTS = ("GRPC_PORT", "GRPC_HTTP_PORT", "INGEST_PORT", "ENTITLEMENTS_PORT", "USAGE_PORT", "DUNNING_PORT")


class DevRun:
    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        log_dir.mkdir()
        self.env, self.log_dir = env, log_dir
        self.output = log_dir / "dev.out"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "paymentsvc.cli", "dev", "--log-dir", str(log_dir)],
            cwd=ROOT, env=env, stdout=open(self.output, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        eventually_sync(self._ready, timeout=90, what="the dev stack's stack.json")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"paymentsvc dev exited {self.process.returncode}:\n{self.text()[-3000:]}")
        return (self.log_dir / "stack.json").exists()

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def send(self, event_type: str, customer: str, user: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "paymentsvc.cli", "send-webhook", event_type, "--customer", customer, "--user", user,
             "--secret", DEV_WEBHOOK_SECRET],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0 and done.stdout.startswith("200"), done.stdout + done.stderr

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            assert self.process.wait(30) == 0, self.text()[-3000:]
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def marks(database_url: str) -> dict[int, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT kafka_partition, next_offset FROM consumer_offsets WHERE consumer = 'entitlements'"
        ).fetchall()
    return {int(p): int(o) for p, o in rows}


def subscribed(database_url: str, customer: str) -> bool:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT 1 FROM subscriptions WHERE customer_id = %s", (customer,)).fetchone() is not None


def test_a_second_make_dev_applies_its_new_events_despite_the_first_runs_marks(
    tmp_path: Path, database_url: str, private_redis: PrivateRedis
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "API_KEYS", "KAFKA_"))}
    env.update(DATABASE_URL=database_url, REDIS_URL=private_redis.url, **{p: str(free_port()) for p in PORTS})

    first = DevRun(env, tmp_path / "run1")
    try:
        # Customers until every partition holds a mark (keys hash to partitions; a dozen
        # random ones miss one partition about once in forty runs).
        customers: list[str] = []
        while len(customers) < 60 and (len(customers) < 6 or len(marks(database_url)) < 3):
            batch = [random_id("cus_") for _ in range(6)]
            for customer in batch:
                first.send("customer.subscription.created", customer, random_id("user_"))
            customers += batch
            eventually_sync(lambda: all(subscribed(database_url, c) for c in batch), timeout=60,  # noqa: B023
                            what="the first run's subscriptions")
        left = marks(database_url)
        assert sorted(left) == [0, 1, 2] and all(offset > 0 for offset in left.values()), left
    finally:
        first.stop()

    second = DevRun(env, tmp_path / "run2")
    try:
        assert "projections start fresh" in second.text()
        customer = random_id("cus_")
        second.send("customer.subscription.created", customer, random_id("user_"))
        eventually_sync(lambda: subscribed(database_url, customer), timeout=60, what="the second run's subscription")
        assert not any(subscribed(database_url, c) for c in customers), "the first run's projections were reused"
    finally:
        second.stop()
    stack = json.loads((tmp_path / "run2" / "stack.json").read_text())
    assert stack["kafka_bootstrap_servers"]
