"""Fixtures of the integration tier's projection tests: the catalog, a database holding
it, and a Redis client whose keys under the test's prefix are deleted afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest
from redis.asyncio import Redis

from shared.catalog import Catalog, apply_catalog, load_catalog
from shared.config import DEFAULT_CATALOG_PATH


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog(DEFAULT_CATALOG_PATH)


@pytest.fixture
def db(database_url: str, catalog: Catalog) -> str:
    with psycopg.connect(database_url) as conn:
        apply_catalog(conn, catalog)
    return database_url


@pytest.fixture
async def redis(redis_url: str, redis_prefix: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{redis_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
