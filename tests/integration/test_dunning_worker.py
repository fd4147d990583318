"""The dunning worker on the real broker: the live projection and scheduler publish their
decisions on payment-events and notices on dunning-events; a replay of payment-events
rebuilds dunning_cases exactly, calls no Stripe endpoint and emits nothing."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from services.dunning.bootstrap import TABLES
from services.dunning.events import KafkaPublisher, notice_sender
from services.dunning.projection import DunningProjection
from services.dunning.scheduler import Scheduler, SchedulerConfig, StripeInvoices
from shared import replay
from shared.catalog import load_catalog
from shared.config import DEFAULT_CATALOG_PATH, Topics
from shared.consumer import KafkaDeadLetters, LoopPolicy, run_live
from shared.db import make_pool
from shared.kafka import make_producer
from shared.outbox import OutboxRelay
from shared.worker import BatchProcessor
from tests.integration.test_dunning_support import (
    DAY,
    Clock,
    FakeStripe,
    failure,
    fake_stripe,
    paid,
)
from tests.integration.test_entitlements_worker import publish
from tests.kafka_helpers import eventually, read_topic

pytestmark = pytest.mark.integration
CATALOG = load_catalog(DEFAULT_CATALOG_PATH)
T0 = 1_767_225_600


def processed(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM processed_events WHERE consumer = 'dunning'").fetchone()
        return int(row[0]) if row else 0


async def until_processed(database_url: str, n: int, timeout: float = 40) -> None:
    async def done() -> bool:
        return processed(database_url) >= n

    assert await eventually(done, timeout), f"{processed(database_url)} of {n} events processed"


@contextlib.asynccontextmanager
async def dunning_worker(broker: str, topics: Topics, database_url: str, producer: AIOKafkaProducer) -> AsyncIterator[None]:
    pool = make_pool(database_url, max_size=2)
    await pool.open(wait=True)
    stop = asyncio.Event()
    relay = OutboxRelay(pool, "dunning", notice_sender(KafkaPublisher(producer, topics)))
    projection = DunningProjection(CATALOG, relay)
    processor = BatchProcessor(projection, pool, KafkaDeadLetters(producer))
    task = asyncio.create_task(
        run_live(processor, pool, broker, topics.payment_events, f"g-{random.getrandbits(32):x}", stop,
                 LoopPolicy(max_batch=200), 6000)
    )
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await pool.close()


async def test_replay_rebuilds_the_live_cases_without_calling_stripe_or_emitting(
    broker: str, topics: Topics, database_url: str
) -> None:
    producer = make_producer(broker)
    await producer.start()
    pool = make_pool(database_url, max_size=2)
    await pool.open(wait=True)
    try:
        async with fake_stripe() as stripe_fake, dunning_worker(broker, topics, database_url, producer):
            await run_a_story(stripe_fake, producer, topics, pool, database_url)
            calls_live = sum(stripe_fake.calls.values())
            notices_live = len(await read_topic(broker, topics.dunning_events, expect=1))
            spec = replay.ProjectionSpec("dunning", topics.payment_events, TABLES, lambda: DunningProjection(CATALOG, None))
            await replay.rebuild(database_url, broker, spec, "dunning_rebuild", progress="never")
            assert replay.verify(database_url, spec, "dunning_rebuild") == []
            assert sum(stripe_fake.calls.values()) == calls_live
            assert len(await read_topic(broker, topics.dunning_events, expect=notices_live)) == notices_live
        with psycopg.connect(database_url) as conn:
            states = dict(conn.execute("SELECT invoice_id, state FROM dunning_cases").fetchall())  # type: ignore[arg-type]
        assert states == {"in_w1": "escalated", "in_w2": "recovered", "in_w3": "retrying"}
        # in_w1: 4 retries; in_w2: days 1 and 3 (paid after); in_w3 (opened day 3): days 5, 7, 14.
        assert calls_live == 4 + 2 + 3
    finally:
        await pool.close()
        await producer.stop()


async def run_a_story(
    stripe_fake: FakeStripe, producer: AIOKafkaProducer, topics: Topics, pool: object, database_url: str
) -> None:
    """Three invoices fail; one runs to escalation, one is paid after a retry, one stays."""
    clock = Clock(T0)
    scheduler = Scheduler(
        pool, StripeInvoices("sk_test_fake", stripe_fake.url), KafkaPublisher(producer, topics), CATALOG,  # type: ignore[arg-type]
        clock=clock, config=SchedulerConfig(owner="worker-test"),
    )
    stripe_fake.mode = "decline"
    sent = 3
    await publish(producer, topics.payment_events, [failure("in_w1", T0), failure("in_w2", T0), failure("in_w3", T0 + 3 * DAY)])
    await until_processed(database_url, sent)
    for day in (1, 3, 5, 7, 14):
        clock.now = T0 + day * DAY
        report = await scheduler.tick()
        sent += len(report.attempts) + len(report.escalations)
        if day == 3:
            await publish(producer, topics.payment_events, [paid("in_w2", T0 + 3 * DAY + 60)])
            sent += 1
        await until_processed(database_url, sent)
