"""The Go service's database metrics on a real Postgres pool: db_connections_active from
psycopg_pool's own measures at scrape time, db_query_duration_seconds around a read."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from shared.db import make_pool, timed_connection

pytestmark = pytest.mark.integration


def scraped(name: str) -> float:
    sample = REGISTRY.get_sample_value(name)
    assert sample is not None, f"{name} is not exported"
    return sample


async def test_db_connections_active_counts_the_connections_in_use_right_now(database_url: str) -> None:
    pool = make_pool(database_url, min_size=2, max_size=4, name="go-metrics-test")
    await pool.open(wait=True, timeout=10)
    try:
        idle = scraped("db_connections_active")  # other tests' pools in this process may hold some
        async with pool.connection() as first, pool.connection() as second:
            assert scraped("db_connections_active") == idle + 2
            await first.execute("SELECT 1")
            await second.execute("SELECT 1")
        assert scraped("db_connections_active") == idle
    finally:
        await pool.close()
    assert scraped("db_connections_active") == idle  # a closed pool has none in use


async def test_db_query_duration_seconds_observes_one_read_from_checkout_to_return(database_url: str) -> None:
    pool = make_pool(database_url, max_size=1, name="go-metrics-test")
    await pool.open(wait=True, timeout=10)
    try:
        count, total = scraped("db_query_duration_seconds_count"), scraped("db_query_duration_seconds_sum")
        async with timed_connection(pool, timeout=5) as conn:
            await conn.execute("SELECT pg_sleep(0.05)")
        assert scraped("db_query_duration_seconds_count") == count + 1
        assert 0.05 <= scraped("db_query_duration_seconds_sum") - total < 5
        with pytest.raises(asyncio.CancelledError):  # a read that never finished is observed too
            async with timed_connection(pool, timeout=5) as conn:
                raise asyncio.CancelledError
        assert scraped("db_query_duration_seconds_count") == count + 2
    finally:
        await pool.close()
