"""The live worker's lanes: partition groups applied concurrently (shared/consumer.py `_Lanes`).

Every test records, inside the projection's transaction, which lane applied which
offsets of which partition and what ran at the same time, and checks each Kafka offset
commit against the marks Postgres has committed at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.entitlements.projection import EntitlementsProjection
from shared import consumer as consumer_module
from shared.config import Topics
from shared.consumer import BatchHealth, KafkaDeadLetters, LoopPolicy, log_end_offsets, run_live
from shared.db import make_pool
from shared.kafka import make_producer
from shared.projection import ApplyContext, Envelope
from shared.worker import LANE, BatchProcessor, RawMessage
from tests.integration.test_entitlements_worker import CATALOG, fingerprints, publish, stories
from tests.support.counting import SCHEMA, CountingProjection
from tests.support.wait import eventually as wait_for

pytestmark = pytest.mark.integration


class Recorder:
    """What the lanes did: per partition the offsets applied in order, the most batches
    applied at once, and any partition applied by two batches at once."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.applied: dict[int, list[int]] = defaultdict(list)
        self.lanes: set[int] = set()
        self.running: list[set[int]] = []
        self.most_at_once = 0
        self.overlapping: list[int] = []


class LaneCounting(CountingProjection):
    """The counting projection, opted in to lanes, slow enough that batches overlap."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def for_lane(self) -> LaneCounting:
        return LaneCounting(self.recorder)

    async def apply(self, conn: psycopg.AsyncConnection[Any], events: list[Envelope[dict[str, Any]]], ctx: ApplyContext) -> None:
        r = self.recorder
        partitions = {e.partition for e in events}
        for other in r.running:
            r.overlapping += sorted(partitions & other)
        r.running.append(partitions)
        r.most_at_once = max(r.most_at_once, len(r.running))
        try:
            await CountingProjection.apply(self, conn, events, ctx)
            await asyncio.sleep(r.delay_s)  # the transaction waits, as on a busy server
        finally:
            r.running.remove(partitions)
        r.lanes.add(LANE.get())
        for e in events:
            r.applied[e.partition].append(e.offset)


@pytest.fixture
def counting_db(database_url: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    return database_url


def counts(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        return dict(conn.execute("SELECT event_id, times FROM applied").fetchall())  # type: ignore[arg-type]


def marks(database_url: str, topic: str) -> dict[int, int]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT kafka_partition, next_offset FROM consumer_offsets WHERE topic = %s", (topic,)
        ).fetchall()
    return {int(p): int(o) for p, o in rows}


@pytest.fixture
def checked_commits(monkeypatch: pytest.MonkeyPatch, counting_db: str) -> list[str]:
    """Every Kafka offset commit, checked against the marks Postgres has committed: a
    partition's offset may never be ahead of its mark. Returns the violations."""
    violations: list[str] = []
    commit = consumer_module._commit

    async def checked(consumer: Any, messages: list[RawMessage], name: str) -> None:
        offsets: dict[tuple[str, int], int] = {}
        for m in messages:
            offsets[(m.topic, m.partition)] = max(offsets.get((m.topic, m.partition), 0), m.offset + 1)
        for (topic, partition), offset in offsets.items():
            mark = marks(counting_db, topic).get(partition, 0)
            if mark < offset:
                violations.append(f"partition {partition}: offset {offset} committed, Postgres mark {mark}")
        await commit(consumer, messages, name)

    monkeypatch.setattr(consumer_module, "_commit", checked)
    return violations


async def send(producer: AIOKafkaProducer, topic: str, ids: Sequence[str], partition: int, **extra: object) -> None:
    acks = [await producer.send(topic, json.dumps({"id": i, **extra}).encode(), partition=partition) for i in ids]
    await asyncio.gather(*acks)


@contextlib.asynccontextmanager
async def lane_worker(
    broker: str, topic: str, database_url: str, recorder: Recorder, *, lanes: int = 3, batch: int = 20,
    health: BatchHealth | None = None, group: str | None = None,
) -> AsyncIterator[asyncio.Task[None]]:
    group = group or f"g-{random.getrandbits(32):x}"
    pool = make_pool(database_url, max_size=lanes + 1)
    await pool.open(wait=True)
    producer = make_producer(broker)
    await producer.start()
    stop = asyncio.Event()
    processor = BatchProcessor(LaneCounting(recorder), pool, KafkaDeadLetters(producer))
    policy = LoopPolicy(max_batch=batch, backoff_initial_s=0.2, backoff_max_s=1.0, lanes=lanes)
    task = asyncio.create_task(run_live(processor, pool, broker, topic, group, stop, policy, 6000, health))
    try:
        yield task
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 30)
        finally:
            await producer.stop()
            await pool.close()


def in_order(recorder: Recorder) -> None:
    for partition, offsets in recorder.applied.items():
        assert offsets == sorted(offsets), f"partition {partition} applied out of order"


async def test_lanes_apply_partitions_concurrently_each_in_order_each_event_once_offsets_after_the_commit(
    broker: str, topics: Topics, counting_db: str, producer: AIOKafkaProducer, checked_commits: list[str]
) -> None:
    topic = topics.payment_events
    for partition in range(3):
        await send(producer, topic, [f"p{partition}-{i}" for i in range(120)], partition)
    recorder = Recorder(delay_s=0.05)
    async with lane_worker(broker, topic, counting_db, recorder):
        await wait_for(lambda: len(counts(counting_db)) >= 360, timeout=60, what="every event applied")
        await wait_for(lambda: marks(counting_db, topic) == {0: 120, 1: 120, 2: 120}, timeout=20, what="the marks")
    applied = counts(counting_db)
    assert len(applied) == 360 and set(applied.values()) == {1}, "an event was lost or applied twice"
    in_order(recorder)
    assert recorder.applied == {p: list(range(120)) for p in range(3)}
    assert recorder.most_at_once >= 2, "the lanes never applied two batches at once"
    assert recorder.lanes == {0, 1, 2}
    assert recorder.overlapping == [], "one partition was applied by two batches at once"
    assert checked_commits == []


async def test_one_lane_is_one_batch_at_a_time(
    broker: str, topics: Topics, counting_db: str, producer: AIOKafkaProducer, checked_commits: list[str]
) -> None:
    topic = topics.payment_events
    for partition in range(3):
        await send(producer, topic, [f"p{partition}-{i}" for i in range(30)], partition)
    recorder = Recorder(delay_s=0.02)
    async with lane_worker(broker, topic, counting_db, recorder, lanes=1):
        await wait_for(lambda: len(counts(counting_db)) >= 90, timeout=60, what="every event applied")
    assert recorder.most_at_once == 1 and recorder.lanes == {0}
    in_order(recorder)
    assert checked_commits == []


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_bug_in_one_lane_pauses_every_lane_dead_letters_nothing_and_the_fix_resumes_all(
    broker: str, topics: Topics, counting_db: str, producer: AIOKafkaProducer, checked_commits: list[str]
) -> None:
    topic = topics.payment_events
    await send(producer, topic, [f"p1-a{i}" for i in range(10)], 1)
    await send(producer, topic, [f"p2-a{i}" for i in range(10)], 2)
    health = BatchHealth()
    recorder = Recorder(delay_s=0.01)
    CountingProjection.bug_active = True
    try:
        async with lane_worker(broker, topic, counting_db, recorder, health=health):
            await wait_for(lambda: len(counts(counting_db)) >= 20, timeout=60, what="the good partitions applied")
            await send(producer, topic, ["p0-bug"], 0, bug=True)
            await wait_for(
                lambda: health.error is not None
                and sample("paymentsvc_worker_transient_failures_total", consumer="test-counter", error="KeyError") >= 2,
                timeout=40, what="the bug to keep failing")
            assert sample("paymentsvc_worker_paused", consumer="test-counter") == 1
            # Every lane is paused: new events of the healthy partitions wait for the fix.
            before = dict(marks(counting_db, topic))
            await send(producer, topic, [f"p1-b{i}" for i in range(5)], 1)
            await send(producer, topic, [f"p2-b{i}" for i in range(5)], 2)
            await asyncio.sleep(2.0)
            assert marks(counting_db, topic) == before
            assert not any(k.startswith(("p1-b", "p2-b", "p0-")) for k in counts(counting_db))
            assert health.error is not None and "KeyError" in health.error

            CountingProjection.bug_active = False  # the fix is deployed
            await wait_for(lambda: len(counts(counting_db)) >= 31, timeout=40, what="everything applied after the fix")
            await wait_for(lambda: health.error is None, timeout=40, what="ready again")
    finally:
        CountingProjection.bug_active = False
    applied = counts(counting_db)
    assert len(applied) == 31 and set(applied.values()) == {1}
    assert marks(counting_db, topic) == {0: 1, 1: 15, 2: 15}
    in_order(recorder)
    assert checked_commits == []
    dlq = Topics.dlq(topic)
    assert await log_end_offsets(broker, [TopicPartition(dlq, p) for p in range(3)]) == {0: 0, 1: 0, 2: 0}


async def test_a_rebalance_mid_flight_loses_nothing_and_applies_nothing_twice_or_out_of_order(
    broker: str, topics: Topics, counting_db: str, producer: AIOKafkaProducer, checked_commits: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A second worker joins while the first has batches in flight, then the first leaves:
    two rebalances with every lane busy."""
    caplog.set_level(logging.INFO, logger="worker")
    topic = topics.payment_events
    sent: list[str] = []

    async def feed(n: int) -> None:
        first = len(sent) // 3
        for partition in range(3):
            ids = [f"p{partition}-{first + i}" for i in range(n)]
            await send(producer, topic, ids, partition)
            sent.extend(ids)

    enough = asyncio.Event()

    async def keep_feeding() -> None:  # every lane stays busy through both rebalances
        while not enough.is_set():
            await feed(10)
            await asyncio.sleep(0.1)

    recorder = Recorder(delay_s=0.1)  # slow batches: the rebalances find them in flight
    group = f"g-{random.getrandbits(32):x}"
    await feed(50)
    feeding = asyncio.create_task(keep_feeding())
    try:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(lane_worker(broker, topic, counting_db, recorder, batch=10, group=group))
            await wait_for(lambda: len(recorder.applied) >= 2, timeout=60, what="the first worker busy")
            second = lane_worker(broker, topic, counting_db, recorder, batch=10, group=group)
            await second.__aenter__()
            try:
                await asyncio.sleep(8)  # the join (about 5 s on Tansu) with batches in flight
                await stack.aclose()  # the first worker leaves: another rebalance
                await asyncio.sleep(6)
                enough.set()
                await feeding
                await wait_for(lambda: len(counts(counting_db)) >= len(sent), timeout=90, what="every event applied")
            finally:
                await second.__aexit__(None, None, None)
    finally:
        feeding.cancel()
    applied = counts(counting_db)
    assert sorted(applied) == sorted(sent) and set(applied.values()) == {1}, "an event was lost or applied twice"
    in_order(recorder)
    assert checked_commits == []
    assert any("batches in flight finish first" in r.getMessage() for r in caplog.records), "no rebalance met a batch"


async def test_entitlements_with_lanes_equal_one_lane_in_postgres_and_redis(
    broker: str, topics: Topics, database_url: str, second_database_url: str, redis_url: str, redis_prefix: str,
) -> None:
    """The same events through three lanes and through one: the same rows, the same answers."""
    from shared.catalog import apply_catalog

    topic = topics.payment_events
    events = stories(60)
    random.Random(7).shuffle(events)
    producer = make_producer(broker)
    await producer.start()
    try:
        await publish(producer, topic, events)
    finally:
        await producer.stop()
    redis = Redis.from_url(redis_url)
    answers: list[dict[str, dict[Any, Any]]] = []
    try:
        for lanes, url, prefix in ((3, database_url, f"{redis_prefix}3:"), (1, second_database_url, f"{redis_prefix}1:")):
            with psycopg.connect(url, autocommit=True) as conn:
                apply_catalog(conn, CATALOG)
            pool = make_pool(url, max_size=lanes + 1)
            await pool.open(wait=True)
            stop = asyncio.Event()
            processor = BatchProcessor(EntitlementsProjection(CATALOG, redis, prefix), pool, _NoLetters())
            recorded: list[int] = []
            process = processor.process

            async def counted(messages: Sequence[RawMessage], process: Any = process, recorded: list[int] = recorded) -> Any:
                result = await process(messages)
                recorded.append(LANE.get())
                return result

            processor.process = counted  # type: ignore[method-assign]
            task = asyncio.create_task(run_live(
                processor, pool, broker, topic, f"g-{random.getrandbits(32):x}", stop,
                LoopPolicy(max_batch=25, lanes=lanes), 6000))
            try:
                def done(url: str = url) -> bool:
                    return sum(marks(url, topic).values()) >= len(events)

                await wait_for(done, timeout=90, what=f"{lanes} lane(s) done")
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
                await pool.close()
            assert set(recorded) == set(range(lanes))
            answers.append(await _answers(redis, prefix))
        assert fingerprints(database_url) == fingerprints(second_database_url)
        assert answers[0] == answers[1] and answers[0]
    finally:
        await redis.aclose()


class _NoLetters:
    async def send(self, letters: Sequence[Any], consumer: str) -> None:
        raise AssertionError(f"nothing here is poison: {letters}")


async def _answers(redis: Redis, prefix: str) -> dict[str, dict[Any, Any]]:
    found = {}
    async for key in redis.scan_iter(match=f"{prefix}ent:*", count=1000):
        name = key.decode().removeprefix(prefix)
        found[name] = await redis.hgetall(key)
    return found
