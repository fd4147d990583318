"""The live worker loop on the real broker and Postgres: crashes, poison, outages, scale-out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import psycopg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from prometheus_client import REGISTRY

from shared.config import Topics
from shared.consumer import BatchHealth, LogCheck, foreign_tail, log_end_offsets, mark_mismatch
from shared.db import make_pool
from shared.migrate import migrate_up
from shared.worker import BatchProcessor, RawMessage
from tests.kafka_helpers import eventually, headers_of, read_topic
from tests.support.counting import SCHEMA, CountingProjection, run_worker
from tests.support.private_postgres import PrivatePostgres
from tests.support.wait import eventually as wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def counting_db(database_url: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    return database_url


async def produce(producer: AIOKafkaProducer, topic: str, ids: range, **extra: object) -> None:
    acks = [
        await producer.send(topic, json.dumps({"id": f"e{i}", **extra}).encode(), key=f"k{i % 7}".encode())
        for i in ids
    ]
    await asyncio.gather(*acks)


def counts(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        return dict(conn.execute("SELECT event_id, times FROM applied").fetchall())  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def worker(bootstrap: str, topic: str, database_url: str) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(bootstrap, topic, database_url, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def caplog_refusals(caplog: pytest.LogCaptureFixture) -> int:
    """psycopg's pool logs each failed connection attempt."""
    return sum(1 for r in caplog.records if r.name == "psycopg.pool" and "error connecting" in r.getMessage())


async def all_applied_once(database_url: str, n: int, timeout: float = 40.0) -> dict[str, int]:
    async def check() -> bool:
        return len(counts(database_url)) >= n

    await eventually(check, timeout)
    result = counts(database_url)
    assert len(result) == n, f"{len(result)} of {n} events applied"
    assert set(result.values()) == {1}, "an event was applied twice"
    return result


async def test_the_loop_applies_every_message_once(broker: str, topics: Topics, counting_db: str, producer: AIOKafkaProducer) -> None:
    await produce(producer, topics.payment_events, range(300))
    async with worker(broker, topics.payment_events, counting_db):
        await all_applied_once(counting_db, 300)


async def test_a_worker_killed_between_the_database_commit_and_the_offset_commit_applies_nothing_twice(
    broker: str, topics: Topics, counting_db: str, producer: AIOKafkaProducer
) -> None:
    await produce(producer, topics.payment_events, range(100))
    records = await read_topic(broker, topics.payment_events, expect=100)
    # The crashed worker: its batch committed to the database, its offsets never reached Kafka.
    pool = make_pool(counting_db)
    await pool.open(wait=True)
    try:
        first_half = [RawMessage(r.topic, r.partition, r.offset, r.key, r.value) for r in records[:60]]
        await BatchProcessor(CountingProjection(), pool, None).process(first_half)  # type: ignore[arg-type]
    finally:
        await pool.close()
    async with worker(broker, topics.payment_events, counting_db):
        await all_applied_once(counting_db, 100)


async def test_a_poison_message_goes_to_the_dlq_and_the_next_good_message_is_applied(
    broker: str, topics: Topics, counting_db: str, producer: AIOKafkaProducer
) -> None:
    topic = topics.payment_events
    await (await producer.send(topic, b"\x00 not json", key=b"k0"))
    await produce(producer, topic, range(1, 2), poison=True)
    await produce(producer, topic, range(2, 4))
    async with worker(broker, topic, counting_db):
        await all_applied_once(counting_db, 2)
    letters = await read_topic(broker, Topics.dlq(topic), expect=2)
    assert sorted(headers_of(r)["error-class"] for r in letters) == ["JSONDecodeError", "PoisonEvent"]
    assert all(headers_of(r)["original-topic"] == topic for r in letters)


async def test_a_bug_stops_the_line_instead_of_dead_lettering_and_the_fix_resumes_it(
    broker: str, topics: Topics, counting_db: str, producer: AIOKafkaProducer
) -> None:
    """A handler that raises anything but PoisonEvent is a bug: the batch is retried, the
    worker is not ready and says why, the stalled gauge grows, nothing reaches the DLQ."""
    topic = topics.payment_events
    health = BatchHealth()
    stop = asyncio.Event()
    CountingProjection.bug_active = True
    try:
        await produce(producer, topic, range(0, 1), bug=True)
        await produce(producer, topic, range(1, 3))
        task = asyncio.create_task(run_worker(broker, topic, counting_db, stop, health=health))
        try:
            # Retried at least once: a loaded machine may take longer than any fixed stall.
            await wait_for(
                lambda: health.error is not None and health.stalled_s() > 0.5
                and sample("paymentsvc_worker_transient_failures_total", consumer="test-counter", error="KeyError") >= 2,
                timeout=40, what="the batch to keep failing")
            with pytest.raises(RuntimeError, match="KeyError: 'a bug on purpose'"):
                await health.probe()
            assert sample("paymentsvc_worker_paused", consumer="test-counter") == 1
            assert sample("paymentsvc_worker_stalled_seconds", consumer="test-counter") > 0
            assert sample("paymentsvc_worker_transient_failures_total", consumer="test-counter", error="KeyError") >= 2
            assert "e0" not in counts(counting_db)

            CountingProjection.bug_active = False  # the fix is deployed
            await all_applied_once(counting_db, 3)
            # Ready again: the worker clears the error just after its commit, which the
            # rows above may show first.
            await wait_for(lambda: health.error is None, timeout=40, what="the worker to be ready again")
            await health.probe()
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    finally:
        CountingProjection.bug_active = False
    dlq = Topics.dlq(topic)
    assert await log_end_offsets(broker, [TopicPartition(dlq, p) for p in range(3)]) == {0: 0, 1: 0, 2: 0}


async def test_a_mark_beyond_the_log_end_stops_that_partition_and_says_how_to_rebuild(
    broker: str, topics: Topics, counting_db: str, producer: AIOKafkaProducer, caplog: pytest.LogCaptureFixture
) -> None:
    """A topic recreated under the projection's marks (as every `make dev` did): the
    partition whose mark is beyond the new log's end is not consumed, and says so."""
    topic = topics.payment_events
    with psycopg.connect(counting_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO consumer_offsets (consumer, topic, kafka_partition, next_offset) VALUES (%s, %s, 0, 29)",
            ("test-counter", topic),
        )
    for partition in range(3):
        acks = [await producer.send(topic, json.dumps({"id": f"p{partition}-{i}"}).encode(), partition=partition)
                for i in range(3)]
        await asyncio.gather(*acks)
    check = LogCheck("test-counter")
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(broker, topic, counting_db, stop, log_check=check))
    try:
        await wait_for(lambda: len(counts(counting_db)) >= 6, timeout=40, what="partitions 1 and 2 applied")
        assert sorted(counts(counting_db)) == [f"p{p}-{i}" for p in (1, 2) for i in range(3)]
        assert list(check.mismatches) == [0]
        assert "mark 29 is beyond the log's end 3" in check.mismatches[0]
        with pytest.raises(RuntimeError, match="partition"):
            await check.probe()
        assert sample("paymentsvc_worker_log_mismatch", consumer="test-counter", topic=topic, partition="0") == 1
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "not consumed" in r.getMessage()]
        assert errors and f"{topic} partition 0" in errors[0]
        assert "paymentsvc replay test-counter --into rebuild_1 --swap" in errors[0]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert not any(k.startswith("p0-") for k in counts(counting_db))


async def test_a_recreated_topic_whose_offsets_line_up_is_recognised_by_the_record_below_the_mark(
    broker: str, topics: Topics, counting_db: str, producer: AIOKafkaProducer, caplog: pytest.LogCaptureFixture
) -> None:
    """Marks made on one log (3 events in partition 0), then a new log of the same length
    under the same name: offsets fit, but the record below the mark is not ours."""
    old, new = topics.payment_events, topics.usage_events  # `new` plays the recreated topic

    async def fill(topic: str, prefix: str) -> None:
        acks = [await producer.send(topic, json.dumps({"id": f"{prefix}{i}"}).encode(), partition=0,
                                    headers=[("event-id", f"{prefix}{i}".encode())]) for i in range(3)]
        await asyncio.gather(*acks)

    await fill(old, "old-")
    async with worker(broker, old, counting_db):
        await wait_for(lambda: len(counts(counting_db)) == 3, timeout=40, what="the old log applied")
    with psycopg.connect(counting_db, autocommit=True) as conn:  # the marks, as if `new` were `old`
        conn.execute(
            "INSERT INTO consumer_offsets (consumer, topic, kafka_partition, next_offset, tail_event_id)"
            " SELECT consumer, %s, kafka_partition, next_offset, tail_event_id FROM consumer_offsets WHERE topic = %s",
            (new, old),
        )
    await fill(new, "new-")
    check = LogCheck("test-counter")
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(broker, new, counting_db, stop, log_check=check))
    try:
        await wait_for(lambda: list(check.mismatches) == [0], timeout=40, what="partition 0 flagged")
        assert "below the projection's mark 3 is new-2, not old-2" in check.mismatches[0]
        assert "the topic was recreated" in check.mismatches[0]
        with pytest.raises(RuntimeError, match="not consumed"):
            await check.probe()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert not any(k.startswith("new-") for k in counts(counting_db))


def mark_of(database_url: str, topic: str, partition: int) -> int | None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT next_offset FROM consumer_offsets WHERE topic = %s AND kafka_partition = %s", (topic, partition)
        ).fetchone()
    return None if row is None else int(row[0])


async def test_a_restart_on_the_same_log_passes_the_record_below_the_mark_even_a_dead_lettered_one(
    broker: str, topics: Topics, counting_db: str, producer: AIOKafkaProducer
) -> None:
    topic = topics.payment_events
    acks = [await producer.send(topic, json.dumps({"id": f"same-{i}"}).encode(), partition=0,
                                headers=[("event-id", f"same-{i}".encode())]) for i in range(3)]
    # The last record is poison: dead-lettered, never in the inbox, still below the mark.
    acks.append(await producer.send(topic, b"not json", partition=0, headers=[("event-id", b"same-poison")]))
    await asyncio.gather(*acks)
    async with worker(broker, topic, counting_db):
        await wait_for(lambda: mark_of(counting_db, topic, 0) == 4, timeout=40, what="first run")
    more = [await producer.send(topic, json.dumps({"id": "same-3"}).encode(), partition=0,
                                headers=[("event-id", b"same-3")])]
    await asyncio.gather(*more)
    check = LogCheck("test-counter")
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(broker, topic, counting_db, stop, log_check=check))
    try:
        await wait_for(lambda: "same-3" in counts(counting_db), timeout=40, what="the restart to go on")
        assert check.mismatches == {}
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_a_record_below_the_mark_must_be_the_one_stored_with_it() -> None:
    assert foreign_tail(3, "evt_a", "evt_a") is None
    assert "is evt_b, not evt_a" in (foreign_tail(3, "evt_a", "evt_b") or "")


def test_marks_are_checked_against_both_ends_of_the_log() -> None:
    assert mark_mismatch(5, 0, 5) is None and mark_mismatch(0, 0, 0) is None
    assert "beyond the log's end 5" in (mark_mismatch(6, 0, 5) or "")
    assert "unapplied events were deleted" in (mark_mismatch(3, 4, 10) or "")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_postgres_down_for_a_while_makes_the_worker_wait_then_catch_up(
    broker: str, topics: Topics, producer: AIOKafkaProducer, caplog: pytest.LogCaptureFixture
) -> None:
    pg = PrivatePostgres().init()
    pg.start()
    try:
        migrate_up(pg.url, create_database=False)
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(SCHEMA)
        async with worker(broker, topics.payment_events, pg.url):
            await produce(producer, topics.payment_events, range(50))
            await all_applied_once(pg.url, 50)
            pg.stop()
            await produce(producer, topics.payment_events, range(50, 100))
            # The worker meets the outage: its pool fails to connect, again and again.
            refused = caplog_refusals(caplog)
            await wait_for(lambda: caplog_refusals(caplog) >= refused + 3, timeout=60, what="three refused connections")
            pg.start()
            await all_applied_once(pg.url, 100)
    finally:
        pg.destroy()


async def test_two_worker_processes_split_the_partitions_and_killing_one_loses_nothing(
    broker: str, topics: Topics, counting_db: str, producer: AIOKafkaProducer
) -> None:
    topic = topics.payment_events
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([".", "gen"])}
    command = [sys.executable, "-m", "tests.support.counting", broker, topic, counting_db]
    first = subprocess.Popen(command, env=env)
    second = subprocess.Popen(command, env=env)

    def pids() -> set[int]:
        with psycopg.connect(counting_db) as conn:
            return {row[0] for row in conn.execute("SELECT DISTINCT pid FROM applied")}

    produced = 0

    async def split() -> bool:
        """Produce some more; whether both processes have applied something (the group
        split the partitions)."""
        nonlocal produced
        await produce(producer, topic, range(produced, produced + 200))
        produced += 200
        return {first.pid, second.pid} <= pids()

    try:
        await wait_for(split, timeout=90, interval=0.5, what="the two workers splitting the partitions")
        first.send_signal(signal.SIGKILL)
        await produce(producer, topic, range(produced, produced + 500))
        await all_applied_once(counting_db, produced + 500, timeout=60)
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.terminate()
                process.wait(20)
