"""The inbox is bounded (issue 11, item 4): pruned in small batches, flat over a long run.

A long run is simulated on the real Postgres: each simulated day inserts a day's
inbox rows (back-dated), then the pruner runs with a clock at that day. The row
count and the table's size must stop growing once the window is full.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from shared.db import make_pool
from shared.inbox import DAY_S, InboxPruner

pytestmark = pytest.mark.integration

START = 1_767_225_600.0  # 2026-01-01
PER_DAY = 2_000
WINDOW_DAYS = 5


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = make_pool(database_url, max_size=2)
    await pool.open(wait=True)
    try:
        yield pool
    finally:
        await pool.close()


def insert_day(database_url: str, consumer: str, day: int) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO processed_events (consumer, event_id, topic, kafka_partition, kafka_offset, processed_at) "
            "SELECT %s, 'evt_' || md5(%s || '-' || g), 'payment-events', 0, g, to_timestamp(%s + g * 40) "
            "FROM generate_series(1, %s) AS g",
            (consumer, day, START + day * DAY_S, PER_DAY),
        )


def figures(database_url: str, consumer: str) -> tuple[int, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT count(*) FROM processed_events WHERE consumer = %s", (consumer,)).fetchone()
        size = conn.execute("SELECT pg_relation_size('processed_events')").fetchone()
    assert rows and size
    return int(rows[0]), int(size[0])


async def test_the_inbox_stays_flat_over_a_long_run(database_url: str, pool: AsyncConnectionPool) -> None:
    now = [START]
    pruner = InboxPruner(pool, "test-inbox", retention_s=WINDOW_DAYS * DAY_S, batch=700, clock=lambda: now[0])
    other = "other-consumer"
    insert_day(database_url, other, 0)  # another consumer's rows are not this pruner's
    history = []
    for day in range(40):
        insert_day(database_url, "test-inbox", day)
        now[0] = START + (day + 1) * DAY_S
        await pruner.prune()
        history.append(figures(database_url, "test-inbox"))
    counts = [rows for rows, _ in history]
    sizes = [size for _, size in history]
    assert max(counts) <= (WINDOW_DAYS + 1) * PER_DAY
    assert counts[-1] == counts[20] == WINDOW_DAYS * PER_DAY, counts
    print(f"inbox rows by day: {counts[::5]}, heap bytes by day: {sizes[::5]}")
    assert sizes[-1] <= sizes[WINDOW_DAYS + 2] * 1.25, f"the table grew: {sizes}"
    assert figures(database_url, other)[0] == PER_DAY


async def test_rows_inside_the_window_are_kept_and_a_duplicate_is_still_caught(
    database_url: str, pool: AsyncConnectionPool
) -> None:
    now = [START + 10 * DAY_S]
    insert_day(database_url, "test-inbox", 9)  # a day old
    insert_day(database_url, "test-inbox", 0)  # ten days old
    pruner = InboxPruner(pool, "test-inbox", retention_s=WINDOW_DAYS * DAY_S, batch=500, clock=lambda: now[0])
    assert await pruner.prune() == PER_DAY
    assert figures(database_url, "test-inbox")[0] == PER_DAY
