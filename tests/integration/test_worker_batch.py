"""The batch processor of the shared worker runtime, on the real Postgres.

The projection here is a small test projection that records each event's
payload in a table of its own, so the tests see exactly what was applied.
"""

from __future__ import annotations

import gc
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from shared.db import make_pool
from shared.projection import ApplyContext, Envelope, PoisonEvent
from shared.worker import BatchProcessor, DeadLetter, RawMessage, TooManyDeadLetters

pytestmark = pytest.mark.integration


class RecordingProjection:
    name = "test-recorder"

    def __init__(self) -> None:
        self.after_commit_calls: list[Any] = []
        self.fail_transiently = 0
        self.gc_enabled: list[bool] = []  # during each apply

    def decode(self, value: bytes, headers: dict[str, bytes]) -> tuple[str, str, dict]:  # type: ignore[type-arg]
        body = json.loads(value)
        return body["id"], body.get("type", "test"), body

    async def apply(self, conn: psycopg.AsyncConnection, events: list[Envelope[dict]], ctx: ApplyContext) -> Any:  # type: ignore[type-arg]
        self.gc_enabled.append(gc.isenabled())
        if self.fail_transiently:
            self.fail_transiently -= 1
            raise psycopg.OperationalError("the database went away (simulated)")
        for e in events:
            if e.message.get("poison"):
                raise PoisonEvent(e.event_id, "this event can never apply")
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO recorded (event_id, n) VALUES (%s, %s)", [(e.event_id, e.message["n"]) for e in events]
            )
        return [e.event_id for e in events]

    async def after_commit(self, result: Any, ctx: ApplyContext) -> None:
        self.after_commit_calls.append(result)


class Letters:
    def __init__(self) -> None:
        self.sent: list[DeadLetter] = []

    async def send(self, letters: Sequence[DeadLetter], consumer: str) -> None:
        self.sent.extend(letters)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE recorded (event_id text PRIMARY KEY, n int NOT NULL)")
    pool = make_pool(database_url, max_size=4)
    await pool.open(wait=True)
    yield pool
    await pool.close()


def message(offset: int, event_id: str, partition: int = 0, **body: Any) -> RawMessage:
    return RawMessage("events", partition, offset, b"k", json.dumps({"id": event_id, "n": offset, **body}).encode())


async def recorded(pool: AsyncConnectionPool) -> list[tuple[str, int]]:
    async with pool.connection() as conn:
        return await (await conn.execute("SELECT event_id, n FROM recorded ORDER BY n, event_id")).fetchall()  # type: ignore[return-value]


async def offsets(pool: AsyncConnectionPool) -> dict[int, int]:
    async with pool.connection() as conn:
        rows = await (await conn.execute("SELECT kafka_partition, next_offset FROM consumer_offsets")).fetchall()
    return dict(rows)  # type: ignore[arg-type]


async def test_a_batch_is_applied_once_with_its_inbox_rows_and_offsets(pool: AsyncConnectionPool) -> None:
    processor = BatchProcessor(RecordingProjection(), pool, Letters())
    result = await processor.process([message(0, "e1"), message(1, "e2"), message(0, "e3", partition=1)])
    assert (result.applied, result.duplicates) == (3, 0)
    assert await recorded(pool) == [("e1", 0), ("e3", 0), ("e2", 1)]
    assert await offsets(pool) == {0: 2, 1: 1}
    assert result.next_offsets == {("events", 0): 2, ("events", 1): 1}


async def test_a_redelivered_batch_is_a_no_op_but_still_advances_nothing_backwards(pool: AsyncConnectionPool) -> None:
    projection = RecordingProjection()
    processor = BatchProcessor(projection, pool, Letters())
    batch = [message(0, "e1"), message(1, "e2")]
    await processor.process(batch)
    again = await processor.process(batch)
    assert (again.applied, again.duplicates) == (0, 2)
    assert len(await recorded(pool)) == 2 and await offsets(pool) == {0: 2}
    assert projection.after_commit_calls[-1] is None


async def test_a_duplicate_inside_one_batch_is_applied_once(pool: AsyncConnectionPool) -> None:
    result = await BatchProcessor(RecordingProjection(), pool, Letters()).process([message(0, "e1"), message(1, "e1")])
    assert (result.applied, result.duplicates) == (1, 1)
    assert await recorded(pool) == [("e1", 0)]


async def test_poison_and_undecodable_messages_are_dead_lettered_and_the_rest_applied(pool: AsyncConnectionPool) -> None:
    letters = Letters()
    undecodable = RawMessage("events", 0, 1, b"k", b"{not json")
    batch = [message(0, "good1"), undecodable, message(2, "bad", poison=True), message(3, "good2")]
    result = await BatchProcessor(RecordingProjection(), pool, letters).process(batch)
    assert [r[0] for r in await recorded(pool)] == ["good1", "good2"]
    assert sorted(letter.error_class for letter in letters.sent) == ["JSONDecodeError", "PoisonEvent"]
    assert result.applied == 2 and await offsets(pool) == {0: 4}, "the partition moves past the poison"


async def test_a_transient_failure_commits_nothing_and_the_retry_applies_everything_once(pool: AsyncConnectionPool) -> None:
    projection = RecordingProjection()
    projection.fail_transiently = 1
    processor = BatchProcessor(projection, pool, Letters())
    batch = [message(0, "e1"), message(1, "e2")]
    with pytest.raises(psycopg.OperationalError):
        await processor.process(batch)
    assert await recorded(pool) == [] and await offsets(pool) == {}
    await processor.process(batch)
    assert len(await recorded(pool)) == 2


async def test_two_workers_racing_on_the_same_events_apply_each_once(database_url: str, pool: AsyncConnectionPool) -> None:
    import asyncio

    other_pool = make_pool(database_url, max_size=2)
    await other_pool.open(wait=True)
    try:
        batch = [message(i, f"e{i}") for i in range(50)]
        first, second = await asyncio.gather(
            BatchProcessor(RecordingProjection(), pool, Letters()).process(batch),
            BatchProcessor(RecordingProjection(), other_pool, Letters()).process(batch),
        )
        assert first.applied + second.applied == 50
        assert len(await recorded(pool)) == 50
    finally:
        await other_pool.close()


async def test_a_batch_that_is_mostly_poison_stops_instead_of_draining_to_the_dlq(pool: AsyncConnectionPool) -> None:
    letters = Letters()
    processor = BatchProcessor(RecordingProjection(), pool, letters)
    batch = [RawMessage("events", 0, i, b"k", b"{broken") for i in range(30)] + [message(30, "good")]
    with pytest.raises(TooManyDeadLetters, match="30 of 31"):
        await processor.process(batch)
    assert letters.sent == [] and await recorded(pool) == [] and await offsets(pool) == {}, "nothing committed"


async def test_a_batch_of_rejected_events_over_the_ratio_commits_nothing(pool: AsyncConnectionPool) -> None:
    letters = Letters()
    processor = BatchProcessor(RecordingProjection(), pool, letters, dead_letter_allowance=2)
    batch = [message(i, f"bad{i}", poison=True) for i in range(4)] + [message(4, "good")]
    with pytest.raises(TooManyDeadLetters):
        await processor.process(batch)
    assert letters.sent == [] and await recorded(pool) == [] and await offsets(pool) == {}


async def test_a_batch_runs_with_the_cyclic_gc_paused_and_resumes_it_even_on_failure(pool: AsyncConnectionPool) -> None:
    projection = RecordingProjection()
    processor = BatchProcessor(projection, pool, Letters())
    assert gc.isenabled()

    await processor.process([message(0, "e0")])
    assert projection.gc_enabled == [False]
    assert gc.isenabled()

    projection.fail_transiently = 1
    with pytest.raises(psycopg.OperationalError):
        await processor.process([message(1, "e1")])
    assert projection.gc_enabled == [False, False]
    assert gc.isenabled()
