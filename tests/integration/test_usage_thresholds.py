"""Usage thresholds end to end: increments through the real gRPC API, the real usage
worker on the session broker recording crossings in Postgres and publishing them on
usage-thresholds through the outbox, and a replay of usage-events that rebuilds the
thresholds table and publishes nothing. The stack is test_usage_api's (its own here)."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from payment.v1 import events_pb2
from services.usage.bootstrap import TABLES
from services.usage.projection import UsageProjection
from shared import replay
from shared.outbox import OutboxRelay
from tests.conftest import random_id
from tests.integration.test_api_grpc import WRITE, auth
from tests.integration.test_entitlements_worker import CATALOG
from tests.integration.test_usage_api import (  # noqa: F401 - module fixtures, shared by import
    Served,
    Stack,
    inc,
    served,
    stack,
    until_recorded,
    usage_server,
)
from tests.kafka_helpers import eventually, read_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def rows(url: str, subject_id: str, schema: str = "public") -> list[tuple[Any, ...]]:
    """(scope, member, feature, period start, threshold, units, usage, limit) recorded for a subject."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            f"SELECT scope, member_id, feature_code, extract(epoch FROM period_start)::bigint, threshold, "  # noqa: S608 - test schema name
            f"threshold_units, usage, usage_limit FROM {schema}.usage_thresholds WHERE subject_id = %s "
            "ORDER BY period_start, scope, member_id, threshold_units, threshold",
            (subject_id,),
        ).fetchall()


async def published(on: Stack, subject_id: str, expect: int) -> list[events_pb2.UsageThresholdCrossed]:
    """The crossings published for a subject, once at least `expect` arrived, read again
    after a moment so a duplicate published late is seen too."""

    async def read() -> list[events_pb2.UsageThresholdCrossed]:
        records = await read_topic(on.broker, on.topics.usage_thresholds, expect=0 if expect == 0 else 1)
        found = [events_pb2.UsageThresholdCrossed.FromString(r.value) for r in records]
        return [e for e in found if e.subject_id == subject_id]

    if expect:
        await eventually(lambda: _at_least(read, expect), 30, 0.3)
    await asyncio.sleep(1.0)
    return await read()


async def _at_least(read: Any, n: int) -> bool:
    return len(await read()) >= n


def outbox_left(url: str, schema: str = "public") -> int:
    with psycopg.connect(url) as conn:
        query = f"SELECT count(*) FROM {schema}.outbox WHERE consumer = 'usage'"  # noqa: S608 - test schema name
        return int(conn.execute(query).fetchone()[0])  # type: ignore[index]


async def test_fifty_concurrent_increments_crossing_80_and_100_percent_emit_exactly_one_event_each(
    served: Served, stack: Stack  # noqa: F811
) -> None:
    user = random_id("user_")
    await served.stub.IncrementUsage(inc(user, amount=780), metadata=auth(WRITE))
    answers = await asyncio.gather(*(served.stub.IncrementUsage(inc(user, amount=5), metadata=auth(WRITE))
                                     for _ in range(50)))
    assert sum(a.allowed for a in answers) == 44  # 780 + 44 * 5 = 1000, the hard limit
    await until_recorded(stack.database_url, user, "api_calls", 1000)
    recorded = rows(stack.database_url, user)
    assert [(r[0], r[4], r[5], r[7]) for r in recorded] == [("pool", "80%", 800, 1000), ("pool", "100%", 1000, 1000)]
    assert recorded[1][6] == 1000 and 800 <= recorded[0][6] < 805
    events = await published(stack, user, 2)
    assert sorted((e.threshold, e.threshold_units, e.limit, e.feature_code) for e in events) == [
        ("100%", 1000, 1000, "api_calls"), ("80%", 800, 1000, "api_calls")]
    assert all(e.plan_id == "free" and e.scope == "pool" and e.subject_type == "user" for e in events)
    assert outbox_left(stack.database_url) == 0


async def test_an_increment_landing_exactly_on_a_threshold_fires_it(served: Served, stack: Stack) -> None:  # noqa: F811
    user = random_id("user_")
    await served.stub.IncrementUsage(inc(user, amount=799), metadata=auth(WRITE))
    await until_recorded(stack.database_url, user, "api_calls", 799)
    assert rows(stack.database_url, user) == []
    await served.stub.IncrementUsage(inc(user, amount=1), metadata=auth(WRITE))
    await until_recorded(stack.database_url, user, "api_calls", 800)
    assert [(r[4], r[6]) for r in rows(stack.database_url, user)] == [("80%", 800)]
    assert [(e.threshold, e.usage) for e in await published(stack, user, 1)] == [("80%", 800)]


async def test_a_release_back_under_and_a_new_crossing_in_the_same_period_fire_nothing_more(
    served: Served, stack: Stack  # noqa: F811
) -> None:
    user = random_id("user_")
    for amount, total in ((400, 400), (-100, 300), (150, 450)):  # storage_mb: limit 500, alerts 80% (400)
        await served.stub.IncrementUsage(inc(user, feature="storage_mb", amount=amount), metadata=auth(WRITE))
        await until_recorded(stack.database_url, user, "storage_mb", total)
    assert [(r[4], r[6]) for r in rows(stack.database_url, user)] == [("80%", 400)]
    assert [e.threshold for e in await published(stack, user, 1)] == ["80%"]


async def test_a_period_rollover_starts_afresh(stack: Stack) -> None:  # noqa: F811
    t = [datetime(2031, 1, 31, 23, 0, tzinfo=UTC).timestamp()]
    user = random_id("user_")
    async with usage_server(stack, clock=lambda: t[0]) as s:
        await s.stub.IncrementUsage(inc(user, amount=900), metadata=auth(WRITE))
        t[0] += 7200  # February
        await s.stub.IncrementUsage(inc(user, amount=850), metadata=auth(WRITE))
    await until_recorded(stack.database_url, user, "api_calls", 1750)
    jan, feb = int(datetime(2031, 1, 1, tzinfo=UTC).timestamp()), int(datetime(2031, 2, 1, tzinfo=UTC).timestamp())
    assert [(r[3], r[4], r[6]) for r in rows(stack.database_url, user)] == [(jan, "80%", 900), (feb, "80%", 850)]
    assert len(await published(stack, user, 2)) == 2


async def test_a_family_pool_fires_for_the_pool_and_for_each_member_against_its_cap(
    served: Served, stack: Stack  # noqa: F811
) -> None:
    f = stack.family  # pro: ai_credits limit 5000, member_cap 2500, alerts 80%, 100%
    other = random_id("user_")
    await served.stub.IncrementUsage(inc(f.user, f.family, "ai_credits", 2000), metadata=auth(WRITE))
    await until_recorded(stack.database_url, f.family, "ai_credits", 2000)
    assert [(r[0], r[1], r[4], r[5]) for r in rows(stack.database_url, f.family)] == [("member", f.user, "80%", 2000)]
    await served.stub.IncrementUsage(inc(other, f.family, "ai_credits", 2500), metadata=auth(WRITE))
    await until_recorded(stack.database_url, f.family, "ai_credits", 4500)
    assert sorted((r[0], r[1], r[4], r[5], r[7]) for r in rows(stack.database_url, f.family)) == sorted([
        ("member", f.user, "80%", 2000, 2500), ("member", other, "80%", 2000, 2500),
        ("member", other, "100%", 2500, 2500), ("pool", "", "80%", 4000, 5000),
    ])
    events = await published(stack, f.family, 4)
    assert sorted((e.scope, e.user_id, e.threshold) for e in events) == sorted([
        ("member", f.user, "80%"), ("member", other, "80%"), ("member", other, "100%"), ("pool", other, "80%")])


async def test_a_replay_of_the_usage_log_reproduces_the_thresholds_table_and_publishes_nothing(
    served: Served, stack: Stack  # noqa: F811
) -> None:
    user = random_id("user_")
    await served.stub.IncrementUsage(inc(user, amount=999), metadata=auth(WRITE))
    await served.stub.IncrementUsage(inc(user, amount=1), metadata=auth(WRITE))
    await until_recorded(stack.database_url, user, "api_calls", 1000)
    sent: list[bytes] = []

    async def send(payloads: list[bytes]) -> None:
        sent.extend(payloads)

    # A relay is wired in, as the live worker has one: replay mode alone must keep it idle.
    from shared.db import make_pool

    pool = make_pool(stack.database_url, max_size=1)
    await pool.open(wait=True)
    try:
        relay = OutboxRelay(pool, UsageProjection.name, send)
        spec = replay.ProjectionSpec(name="usage", topic=stack.topics.usage_events, tables=TABLES,
                                     make=lambda: UsageProjection(CATALOG, relay))
        schema = f"rebuild_{secrets.token_hex(3)}"
        on_topic = len(await read_topic(stack.broker, stack.topics.usage_thresholds, expect=1))
        await replay.rebuild(stack.database_url, stack.broker, spec, schema, progress="never")
        await relay.flush()
    finally:
        await pool.close()
    # Nothing staged, neither in the live outbox nor in the rebuild schema's own.
    assert sent == [] and outbox_left(stack.database_url) == 0 and outbox_left(stack.database_url, schema) == 0
    assert len(await read_topic(stack.broker, stack.topics.usage_thresholds, expect=on_topic)) == on_topic
    assert rows(stack.database_url, user, schema) == rows(stack.database_url, user) != []
    with psycopg.connect(stack.database_url) as conn:
        live = replay.table_fingerprints(conn, "public", ("usage_thresholds",))
        rebuilt = replay.table_fingerprints(conn, schema, ("usage_thresholds",))
    assert rebuilt == live


async def test_the_usage_service_as_served_publishes_a_crossing_through_its_outbox_relay(
    broker: str, template_database: str
) -> None:
    """services/usage/bootstrap.serve, as `paymentsvc serve usage` runs it: its relay
    publishes what its projection staged."""
    from pydantic import SecretStr

    from domain.usage.model import event_id_for
    from services.usage import bootstrap
    from shared.config import Settings, Topics
    from shared.devbroker import ensure_topics, free_port
    from shared.kafka import make_producer
    from tests.conftest import fresh_database
    from tests.integration.test_api_grpc import private_redis

    topics = Topics(prefix=f"t{secrets.token_hex(4)}.")
    await ensure_topics(broker, topics.all(), partitions=1)
    user, key = random_id("user_"), random_id("idem_")
    increment = events_pb2.UsageEvent(
        event_id=event_id_for(key), idempotency_key=key, subject_type="user", subject_id=user, user_id=user,
        feature_code="api_calls", amount=900, period_start=1_924_992_000, period_end=1_927_670_400,
        created_ms=1_924_992_000_000, limit=1000, plan_id="free",
    )
    with private_redis() as redis_server, fresh_database(template_database) as url:
        redis_url = redis_server.url
        settings = Settings(
            database_url=SecretStr(url), redis_url=SecretStr(redis_url), kafka_bootstrap_servers=broker,
            kafka_topic_prefix=topics.prefix, usage_port=free_port(),
        )
        stop = asyncio.Event()
        served = asyncio.create_task(bootstrap.serve(settings, stop))
        try:
            producer = make_producer(broker)
            await producer.start()
            await producer.send_and_wait(topics.usage_events, increment.SerializeToString(), key=user.encode())
            await producer.stop()
            records = await read_topic(broker, topics.usage_thresholds, expect=1, timeout=60)
        finally:
            stop.set()
            await asyncio.wait_for(served, 60)
        assert [events_pb2.UsageThresholdCrossed.FromString(r.value).threshold for r in records] == ["80%"]
        assert dict(records[0].headers)["event-type"] == b"usage.threshold_crossed"
        assert outbox_left(url) == 0
