"""The transactional outbox: staged with the rows, published at least once, in order."""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from shared.db import make_pool
from shared.outbox import OutboxRelay, stage

pytestmark = pytest.mark.integration


class Sink:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.down = False

    async def send(self, payloads: list[bytes]) -> None:
        if self.down:
            raise ConnectionError("broker down (simulated)")
        self.sent.extend(payloads)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = make_pool(database_url, max_size=3)
    await pool.open(wait=True)
    yield pool
    await pool.close()


async def staged(pool: AsyncConnectionPool) -> int:
    async with pool.connection() as conn:
        return int((await (await conn.execute("SELECT count(*) FROM outbox")).fetchone())[0])  # type: ignore[index]


async def test_staged_messages_are_published_in_order_and_then_removed(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn, conn.transaction():
        await stage(conn, "c", [b"one", b"two", b"three"])
    sink = Sink()
    assert await OutboxRelay(pool, "c", sink.send, batch=2).flush() == 3
    assert sink.sent == [b"one", b"two", b"three"] and await staged(pool) == 0


async def test_a_rolled_back_transaction_stages_nothing(pool: AsyncConnectionPool) -> None:
    with pytest.raises(RuntimeError):
        async with pool.connection() as conn, conn.transaction():
            await stage(conn, "c", [b"never"])
            raise RuntimeError("the projection's transaction failed")
    assert await staged(pool) == 0


async def test_a_broker_failure_keeps_the_messages_for_the_next_flush(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn, conn.transaction():
        await stage(conn, "c", [b"kept"])
    sink = Sink()
    sink.down = True
    relay = OutboxRelay(pool, "c", sink.send)
    with pytest.raises(ConnectionError):
        await relay.flush()
    assert await staged(pool) == 1
    sink.down = False
    await relay.flush()
    assert sink.sent == [b"kept"] and await staged(pool) == 0


async def test_each_consumer_flushes_only_its_own_messages(pool: AsyncConnectionPool, database_url: str) -> None:
    async with pool.connection() as conn, conn.transaction():
        await stage(conn, "a", [b"for a"])
        await stage(conn, "b", [b"for b"])
    sink = Sink()
    await OutboxRelay(pool, "a", sink.send).flush()
    assert sink.sent == [b"for a"]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT consumer FROM outbox").fetchall() == [("b",)]
