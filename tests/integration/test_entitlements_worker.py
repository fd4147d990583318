"""The entitlements worker on the real broker, Postgres and Redis: live, shuffled, replayed, swapped.

Events go on the topic as the ingester puts them (protobuf, keyed by customer,
with the same headers); tests/integration/test_ingest_webhooks.py covers the
ingester itself, and tests/e2e the chain from localstripe.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Sequence

import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from payment.v1 import events_pb2
from services.entitlements.bootstrap import TABLES
from services.entitlements.projection import EntitlementsProjection
from shared import replay
from shared.catalog import apply_catalog, load_catalog, parse_catalog
from shared.config import DEFAULT_CATALOG_PATH, Topics
from shared.consumer import KafkaDeadLetters, LoopPolicy, run_live
from shared.db import make_pool
from shared.devbroker import ensure_topics
from shared.kafka import make_producer
from shared.worker import BatchProcessor
from tests.integration.test_entitlements_projection import Ids, event, story
from tests.kafka_helpers import eventually
from tests.support.wait import eventually as wait_for

pytestmark = pytest.mark.integration
CATALOG = load_catalog(DEFAULT_CATALOG_PATH)


@pytest.fixture
def live_db(database_url: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        apply_catalog(conn, CATALOG)
    return database_url


async def publish(producer: AIOKafkaProducer, topic: str, events: Sequence[events_pb2.PaymentEvent]) -> None:
    acks = []
    for e in events:
        headers = [("event-id", e.event_id.encode()), ("event-type", e.event_type.encode()), ("schema-version", b"1")]
        acks.append(await producer.send(topic, e.SerializeToString(), key=e.customer_id.encode(), headers=headers))
    await asyncio.gather(*acks)


class Progress:
    """How many events the worker has finished: applied or skipped as duplicates, with
    the batch's after-commit work (the Redis hashes) done. Resolved by BatchProcessor
    returning, so waiting on it needs no guess of how long after_commit takes."""

    def __init__(self, processor: BatchProcessor) -> None:
        self.finished = 0
        process = processor.process

        async def counted(messages):  # type: ignore[no-untyped-def]
            result = await process(messages)
            self.finished += result.applied + result.duplicates
            return result

        processor.process = counted  # type: ignore[method-assign]

    async def until_finished(self, n: int, timeout: float = 40) -> None:
        await wait_for(lambda: self.finished >= n, timeout=timeout, what=f"{n} events finished ({self.finished} so far)")


@contextlib.asynccontextmanager
async def entitlements_worker(
    broker: str, topic: str, database_url: str, redis: Redis | None = None, prefix: str = ""
) -> AsyncIterator[Progress]:
    pool = make_pool(database_url, max_size=2)
    await pool.open(wait=True)
    producer = make_producer(broker)
    await producer.start()
    stop = asyncio.Event()
    processor = BatchProcessor(EntitlementsProjection(CATALOG, redis, prefix), pool, KafkaDeadLetters(producer))
    progress = Progress(processor)
    task = asyncio.create_task(
        run_live(processor, pool, broker, topic, f"g-{random.getrandbits(32):x}", stop, LoopPolicy(max_batch=200), 6000)
    )
    try:
        yield progress
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await producer.stop()
        await pool.close()


def processed(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return int(conn.execute("SELECT count(*) FROM processed_events WHERE consumer = 'entitlements'").fetchone()[0])  # type: ignore[index]


async def until_processed(database_url: str, n: int, timeout: float = 40) -> None:
    async def done() -> bool:
        return processed(database_url) >= n

    assert await eventually(done, timeout), f"{processed(database_url)} of {n} events processed"


def fingerprints(database_url: str, schema: str = "public") -> dict[str, tuple[int, str]]:
    with psycopg.connect(database_url) as conn:
        return replay.table_fingerprints(conn, schema, TABLES)


def spec(topic: str) -> replay.ProjectionSpec:
    return replay.ProjectionSpec("entitlements", topic, TABLES, lambda: EntitlementsProjection(CATALOG, None))


def stories(n: int) -> list[events_pb2.PaymentEvent]:
    return [e for _ in range(n) for e in story(Ids())]


async def test_the_worker_projects_events_into_postgres_and_redis(
    broker: str, topics: Topics, live_db: str, producer: AIOKafkaProducer, redis_url: str, redis_prefix: str
) -> None:
    ids = Ids()
    events = story(ids)
    redis = Redis.from_url(redis_url)
    try:
        async with entitlements_worker(broker, topics.payment_events, live_db, redis, redis_prefix) as progress:
            await publish(producer, topics.payment_events, events)
            await progress.until_finished(len(events))  # Redis is written after the commit
        with psycopg.connect(live_db) as conn:
            sub = conn.execute(
                "SELECT status, plan_id, user_id, family_id, cancel_at_period_end FROM subscriptions WHERE subscription_id = %s",
                (ids.sub,),
            ).fetchone()
            held = conn.execute(
                "SELECT count(*) FROM entitlements WHERE subject_id = %s AND status = 'active'", (ids.family,)
            ).fetchone()
        assert sub == ("active", "pro", ids.user, ids.family, True)
        assert held is not None and held[0] > 0
        cached = await redis.hgetall(f"{redis_prefix}ent:family:{ids.family}")
        assert b"_watermark" in cached and len(cached) > 1
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{redis_prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def test_shuffled_and_duplicated_delivery_ends_in_the_same_rows_as_in_order(
    broker: str, topics: Topics, live_db: str, second_database_url: str, producer: AIOKafkaProducer
) -> None:
    events = stories(5)
    shuffled = events + random.sample(events, 15)
    random.Random(7).shuffle(shuffled)
    other = Topics(prefix=f"{topics.prefix}b.")
    await ensure_topics(broker, other.all(), partitions=3)
    with psycopg.connect(second_database_url, autocommit=True) as conn:
        apply_catalog(conn, CATALOG)
    # The same events: in order into one database, shuffled with duplicates into the other.
    async with entitlements_worker(broker, topics.payment_events, live_db), entitlements_worker(
        broker, other.payment_events, second_database_url
    ):
        await publish(producer, topics.payment_events, events)
        for e in shuffled:  # one partition, so the worker sees exactly the shuffled order
            await publish_one_partition(producer, other.payment_events, e)
        await until_processed(live_db, len(events))
        await until_processed(second_database_url, len(events))
    assert fingerprints(second_database_url) == fingerprints(live_db)


async def publish_one_partition(producer: AIOKafkaProducer, topic: str, e: events_pb2.PaymentEvent) -> None:
    await (await producer.send(topic, e.SerializeToString(), key=e.customer_id.encode(), partition=0))


async def test_a_replay_into_a_fresh_schema_equals_the_live_projection(
    broker: str, topics: Topics, live_db: str, producer: AIOKafkaProducer
) -> None:
    events = stories(8)
    async with entitlements_worker(broker, topics.payment_events, live_db):
        await publish(producer, topics.payment_events, events)
        await until_processed(live_db, len(events))
    figures = await replay.rebuild(live_db, broker, spec(topics.payment_events), "rebuild_a", progress="never")
    assert figures["offsets"] == len(events)
    assert replay.verify(live_db, spec(topics.payment_events), "rebuild_a") == []
    # And the check can fail: a live row changed by hand shows up.
    with psycopg.connect(live_db, autocommit=True) as conn:
        conn.execute("UPDATE subscriptions SET status = 'unpaid' WHERE subscription_id = (SELECT min(subscription_id) FROM subscriptions)")
    assert [d.split(":")[0] for d in replay.verify(live_db, spec(topics.payment_events), "rebuild_a")] == ["subscriptions"]


async def test_a_swap_during_live_traffic_loses_no_event_and_applies_none_twice(
    broker: str, topics: Topics, live_db: str, producer: AIOKafkaProducer
) -> None:
    first, second = stories(10), stories(10)
    async with entitlements_worker(broker, topics.payment_events, live_db) as progress:
        await publish(producer, topics.payment_events, first)
        await until_processed(live_db, len(first))

        async def trickle() -> None:
            """Live traffic, ten events at a time, each ten once the worker took the last."""
            for i in range(0, len(second), 10):
                await publish(producer, topics.payment_events, second[i : i + 10])
                await progress.until_finished(len(first) + i + 10)

        sender = asyncio.create_task(trickle())
        await replay.rebuild(live_db, broker, spec(topics.payment_events), "rebuild_b", progress="never")
        await replay.swap(live_db, broker, spec(topics.payment_events), "rebuild_b", progress="never")
        await sender
        await until_processed(live_db, len(first) + len(second))
    await replay.rebuild(live_db, broker, spec(topics.payment_events), "rebuild_check", progress="never")
    assert replay.verify(live_db, spec(topics.payment_events), "rebuild_check") == []
    assert processed(live_db) == len(first) + len(second)


async def test_a_price_the_catalog_lacks_grants_nothing_until_the_catalog_gains_it_and_a_replay_runs(
    broker: str, topics: Topics, live_db: str, producer: AIOKafkaProducer
) -> None:
    ids = Ids()
    unknown = {"price_id": "price_launch_promo"}
    events = [
        event(ids, "customer.subscription.created", 1_800_000_000, subscription_id=ids.sub, user_id=ids.user, **unknown),
    ]
    async with entitlements_worker(broker, topics.payment_events, live_db):
        await publish(producer, topics.payment_events, events)
        await until_processed(live_db, len(events))
    with psycopg.connect(live_db) as conn:
        assert conn.execute("SELECT plan_id, price_id FROM subscriptions").fetchall() == [(None, "price_launch_promo")]
        assert conn.execute("SELECT count(*) FROM entitlements").fetchone() == (0,)
        assert conn.execute("SELECT price_id FROM catalog_misses").fetchall() == [("price_launch_promo",)]

    # The operator adds the price to the catalog, loads it, and rebuilds.
    text = DEFAULT_CATALOG_PATH.read_text().replace(
        "      price_basic_monthly: {zone: us",
        "      price_launch_promo: {zone: us, currency: usd, amount: 500, interval: month}\n"
        "      price_basic_monthly: {zone: us",
    )
    grown = parse_catalog(text)
    with psycopg.connect(live_db, autocommit=True) as conn:
        apply_catalog(conn, grown)
    grown_spec = replay.ProjectionSpec("entitlements", topics.payment_events, TABLES, lambda: EntitlementsProjection(grown, None))
    await replay.rebuild(live_db, broker, grown_spec, "rebuild_promo", progress="never")
    await replay.swap(live_db, broker, grown_spec, "rebuild_promo", progress="never")
    with psycopg.connect(live_db) as conn:
        assert conn.execute("SELECT plan_id FROM subscriptions").fetchall() == [("basic",)]
        granted = conn.execute("SELECT count(*) FROM entitlements WHERE subject_id = %s AND status = 'active'", (ids.user,)).fetchone()
    assert granted is not None and granted[0] > 0
