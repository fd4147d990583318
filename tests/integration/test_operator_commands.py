"""Every operator command as an operator runs it: a subprocess, progress output on
(PROGRESS_OUTPUT=always, since a pipe is not a terminal), real Postgres, Redis and
broker. Each case asserts the exit code and the last line of stdout; the progress
output goes to stderr and must not carry a traceback.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import psycopg
import pytest

from shared.catalog import apply_catalog, load_catalog
from shared.config import DEFAULT_CATALOG_PATH, Topics
from shared.kafka import make_producer
from tests.conftest import ADMIN_URL
from tests.integration.test_api_grpc import private_redis
from tests.integration.test_entitlements_projection import Ids, story
from tests.integration.test_entitlements_worker import entitlements_worker, publish, until_processed

pytestmark = pytest.mark.integration
CATALOG = load_catalog(DEFAULT_CATALOG_PATH)


@dataclass
class Env:
    broker: str
    topics: Topics
    database_url: str
    redis_url: str
    values: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, str]:
        return {
            **os.environ,
            "PROGRESS_OUTPUT": "always",
            "COLUMNS": "120",
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "KAFKA_BOOTSTRAP_SERVERS": self.broker,
            "KAFKA_TOPIC_PREFIX": self.topics.prefix,
            **self.values,
        }


def run(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paymentsvc.cli", *args], env=env.environ(), capture_output=True, text=True, timeout=180
    )


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------ set-ups: what each command needs first

async def nothing(env: Env) -> None:
    return None


async def a_fresh_database_name(env: Env) -> None:
    # `migrate` creates the database it is pointed at; the test drops it afterwards.
    name = f"paymentsvc_op_{secrets.token_hex(5)}"
    env.database_url = psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)
    env.values["_drop"] = name


async def a_live_entitlements_projection(env: Env) -> None:
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        apply_catalog(conn, CATALOG)
    events = story(Ids()) + story(Ids())
    producer = make_producer(env.broker)
    await producer.start()
    try:
        async with entitlements_worker(env.broker, env.topics.payment_events, env.database_url):
            await publish(producer, env.topics.payment_events, events)
            await until_processed(env.database_url, len(events))
    finally:
        await producer.stop()
    env.values["_events"] = str(len(events))


async def an_empty_topic_and_a_catalog(env: Env) -> None:
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        apply_catalog(conn, CATALOG)


async def a_new_topic_prefix(env: Env) -> None:
    env.topics = Topics(prefix=f"t{secrets.token_hex(4)}.")


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    setup: Callable[[Env], Awaitable[None]]
    last: str  # a regex the last line of stdout must match in full ({events}: the events published)
    progress: str = ""  # a word the progress output on stderr must show, where the command draws one
    code: int = 0


CASES = [
    Case("migrate", ("migrate",), a_fresh_database_name, r"applied \d+ migration\(s\)"),
    Case("migrate-again", ("migrate",), nothing, r"applied 0 migration\(s\)"),
    Case("catalog-load", ("catalog", "load"), nothing, r"loaded 3 plans, .*"),
    Case("topics-create", ("topics", "create"), a_new_topic_prefix, r"created 9 topic\(s\): .*payment-events.*"),
    Case(
        "replay-entitlements", ("replay", "entitlements", "--into", "chaos_check"), a_live_entitlements_projection,
        r"chaos_check equals the live entitlements projection \(\d+ tables\)", progress="events",
    ),
    Case(
        "replay-an-empty-topic", ("replay", "entitlements", "--into", "empty_check"), an_empty_topic_and_a_catalog,
        r"empty_check equals the live entitlements projection \(\d+ tables\)", progress="0/0 events",
    ),
    Case(
        "replay-in-lane-processes", ("replay", "entitlements", "--into", "procs_check", "--processes", "3"),
        a_live_entitlements_projection, r"procs_check equals the live entitlements projection \(\d+ tables\)",
        progress="events",
    ),
    Case(
        "replay-resume-of-nothing", ("replay", "entitlements", "--into", "never_started", "--resume"), nothing,
        r"error: no schema never_started to resume: rebuild it .*", code=2,
    ),
    Case(
        "replay-verify", ("replay", "entitlements", "--into", "never_built", "--verify"), nothing,
        r"error: no schema never_built to verify: rebuild it first .*", code=2,
    ),
    Case(
        "replay-into-an-existing-schema", ("replay", "entitlements", "--into", "public"), nothing,
        r"error: 'public' cannot be a rebuild target.*", code=2,
    ),
    Case(
        "entitlements-rebuild-cache", ("entitlements", "rebuild-cache"), a_live_entitlements_projection,
        r"rewrote the Redis answers of [1-9]\d* subject\(s\) from Postgres", progress="subjects",
    ),
    Case(
        "renormalize-dry-run", ("renormalize", "--since", "2020-01-01T00:00:00"), nothing,
        r"would publish 0 event\(s\) to .*payment-events with their original event ids \(dry run: .*\)",
    ),
    Case(
        "usage-rebuild-cache", ("usage", "rebuild-cache", "--settle", "0"), nothing,
        r"rebuilt 0 counter\(s\), 0 member counter\(s\), 0 idempotency record\(s\)", progress="writing the counters",
    ),
]


@pytest.fixture
def own_redis() -> Iterator[str]:
    # usage rebuild-cache rewrites every unprefixed usage key: never on the shared Redis.
    with private_redis() as server:
        yield server.url


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_an_operator_command_runs_to_its_last_line(
    case: Case, broker: str, topics: Topics, database_url: str, own_redis: str
) -> None:
    env = Env(broker, topics, database_url, own_redis)
    await case.setup(env)
    try:
        result = run(env, *case.args)
    finally:
        if "_drop" in env.values:
            with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{env.values["_drop"]}" WITH (FORCE)')
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == case.code, (result.stdout, result.stderr)
    out = result.stdout if case.code == 0 else result.stdout + result.stderr
    assert re.fullmatch(case.last, last_line(out)), (result.stdout, result.stderr)
    if case.progress:
        assert case.progress in result.stderr, result.stderr
