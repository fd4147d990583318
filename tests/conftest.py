"""Fixtures shared by every tier.

- `broker`: one Tansu per test session (or KAFKA_BOOTSTRAP_SERVERS when set).
- `topics`: topic names unique to the test, created on that broker.
- `database_url`: a fresh database per test, cloned from a migrated template.
- `redis_url` / `redis_prefix`: the shared Redis with a key prefix unique to the test.
- Postgres and Redis are the machine's (TEST_ADMIN_DATABASE_URL, REDIS_URL, or their
  defaults), or, where those do not answer, embedded servers started once for the
  session (a laptop with only Python); the first line of the run says which.
Ids are random so that tests never collide, even across parallel runs.

Hypothesis runs under the profile named by HYPOTHESIS_PROFILE (`make test` under CI=true
and `.ci/run` set `ci`):
- `ci`: derandomized, so every run draws the same examples (each test's seed is fixed,
  derived from the test itself) and a red CI is red on every rerun.
- `dev` (the default): a new random seed per session, printed in pytest's header; rerun
  with HYPOTHESIS_SEED=<seed> (or --hypothesis-seed=<seed>) to draw the same examples.
Both print the blob to reproduce a failure (@reproduce_failure). An example Hypothesis
ever found is kept as an explicit @example (or a plain test) next to its property.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import settings as hypothesis_settings
from psycopg import sql

from shared import db
from shared.config import Topics
from shared.devbroker import DevBroker, ensure_topics, wait_for_broker
from shared.devpostgres import EmbeddedPostgres
from shared.devredis import EmbeddedRedis
from shared.kafka import make_producer
from shared.migrate import migrate_up

# Read at import: pytest_configure (below) points these variables at embedded servers
# first when the configured ones do not answer, and test modules import the values later.
ADMIN_URL = os.environ.get("TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
TEMPLATE_DB = f"paymentsvc_tpl_{secrets.token_hex(4)}"

hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
hypothesis_settings.register_profile("dev", print_blob=True)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "dev")
hypothesis_settings.load_profile(HYPOTHESIS_PROFILE)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Outside `ci`, pick the session's seed here (before Hypothesis' own plugin reads
    --hypothesis-seed) so that it can be printed and given back."""
    if HYPOTHESIS_PROFILE != "ci" and config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = os.environ.get("HYPOTHESIS_SEED") or str(secrets.randbits(32))
    _choose_stores(config)


# The session's embedded servers, when the configured ones do not answer (see _choose_stores).
_embedded: list[EmbeddedPostgres | EmbeddedRedis] = []


def _choose_stores(config: pytest.Config) -> None:
    """Use the configured Postgres and Redis, or start embedded ones once for the session.

    A store that does not answer is replaced by an embedded one (shared/devpostgres.py,
    shared/devredis.py), except under CI=true: CI keeps the machine's services, so
    there it is an error. The choice is said in one line at the start of the run.
    """
    global ADMIN_URL, REDIS_URL
    from paymentsvc.devstores import postgres_answers, redis_answers

    said: list[str] = []
    for name, variable, url, answers in (
        ("postgres", "TEST_ADMIN_DATABASE_URL", ADMIN_URL, postgres_answers),
        ("redis", "REDIS_URL", REDIS_URL, redis_answers),
    ):
        where = db.describe(url) if name == "postgres" else url.split("@")[-1].removeprefix("redis://")
        if answers(url):
            said.append(f"{name} at {where}")
            continue
        if os.environ.get("CI") == "true":
            raise pytest.UsageError(f"{name} at {where} does not answer, and CI uses the machine's services ({variable})")
        server: EmbeddedPostgres | EmbeddedRedis
        if name == "postgres":
            base = Path(tempfile.mkdtemp(prefix="pg-session-"))
            base.chmod(0o755)  # as root the server runs as another user, who must get in
            # autovacuum off, like the Postgres of the machines the suite runs on (CI's):
            # code that vacuums or analyzes only where autovacuum is off (shared/inbox.py,
            # shared/worker.py) is then tested the same, and no test waits on autovacuum's naptime.
            server = EmbeddedPostgres(base, durable=False, settings={"autovacuum": "off"})
        else:
            server = EmbeddedRedis()
        server.start()
        _embedded.append(server)
        os.environ[variable] = server.url  # for `tests.conftest` imported by test modules, and children
        if name == "postgres":
            ADMIN_URL = server.url
            # What the benchmarks' smoke runs (tests/bench) and other children use when unset.
            os.environ.setdefault("DATABASE_URL", server.url_for("paymentsvc"))
            os.environ.setdefault("BENCH_ADMIN_DATABASE_URL", server.url)
        else:
            REDIS_URL = server.url
        said.append(f"{name} embedded at 127.0.0.1:{server.port} (nothing answers at {where})")
    config.stash[_STORES_LINE] = "stores: " + ", ".join(said)


_STORES_LINE = pytest.StashKey[str]()


def pytest_sessionstart(session: pytest.Session) -> None:
    """The one line that says which Postgres and Redis this run uses (also under -q)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    line = session.config.stash.get(_STORES_LINE, "")
    if reporter is not None and line:
        reporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    while _embedded:
        server = _embedded.pop()
        server.stop()
        shutil.rmtree(server.base_dir, ignore_errors=True)


def pytest_report_header(config: pytest.Config) -> str:
    if HYPOTHESIS_PROFILE == "ci":
        return "hypothesis: profile ci, derandomized (each test's seed is fixed by the test itself)"
    seed = config.getoption("hypothesis_seed", None)
    return f"hypothesis: profile {HYPOTHESIS_PROFILE}, seed {seed} (rerun with HYPOTHESIS_SEED={seed})"


def random_id(prefix: str = "") -> str:
    return f"{prefix}{secrets.token_hex(6)}"


def _url_for(dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=dbname)


@pytest.fixture(scope="session")
def template_database() -> Iterator[str]:
    """A database with every migration applied, cloned by `database_url`."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
    try:
        migrate_up(_url_for(TEMPLATE_DB), create_database=False)
        yield TEMPLATE_DB
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE_DB)))


@contextlib.contextmanager
def fresh_database(template: str) -> Iterator[str]:
    """A new database cloned from `template`, dropped afterwards."""
    name = f"paymentsvc_t_{secrets.token_hex(6)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
    try:
        yield _url_for(name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def database_url(template_database: str) -> Iterator[str]:
    with fresh_database(template_database) as url:
        yield url


@pytest.fixture
def second_database_url(template_database: str) -> Iterator[str]:
    with fresh_database(template_database) as url:
        yield url


@pytest.fixture(scope="session")
async def broker() -> AsyncIterator[str]:
    """Bootstrap servers of the session's broker."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        await wait_for_broker(configured)
        yield configured
        return
    if os.environ.get("TEST_KAFKA") == "container":
        kafka = _kafka_container()
        if kafka is not None:
            with kafka:
                servers = kafka.get_bootstrap_server()
                await wait_for_broker(servers)
                yield servers
            return
    async with DevBroker() as dev:
        yield dev.bootstrap_servers


def _kafka_container():  # type: ignore[no-untyped-def]
    """Apache Kafka in Docker (testcontainers), or None, said in one line, without a Docker engine."""
    try:
        import docker
        from testcontainers.community.kafka import KafkaContainer

        docker.from_env().ping()
    except Exception as exc:  # no engine, no socket, no permission
        print(f"\nTEST_KAFKA=container: no Docker engine answers ({type(exc).__name__}); using Tansu")
        return None
    return KafkaContainer("confluentinc/cp-kafka:7.6.1").with_kraft()


@pytest.fixture
async def topics(broker: str) -> Topics:
    names = Topics(prefix=f"t{secrets.token_hex(4)}.")
    await ensure_topics(broker, names.all(), partitions=3)
    return names


@pytest.fixture
async def producer(broker: str) -> AsyncIterator[AIOKafkaProducer]:
    """An acks=all producer on the session's broker."""
    producer = make_producer(broker)
    await producer.start()
    yield producer
    await producer.stop()


@pytest.fixture
def redis_prefix() -> str:
    return f"test:{secrets.token_hex(6)}:"


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL
