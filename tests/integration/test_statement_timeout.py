"""Every pooled connection carries statement_timeout, so a stuck query fails instead of hanging."""

from __future__ import annotations

import psycopg
import pytest

from shared.config import Settings
from shared.db import make_pool

pytestmark = pytest.mark.integration


async def test_a_query_longer_than_the_statement_timeout_is_cancelled(database_url: str) -> None:
    pool = make_pool(database_url, max_size=1, statement_timeout_ms=200)
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            shown = await (await conn.execute("SHOW statement_timeout")).fetchone()
            assert shown == ("200ms",)
            with pytest.raises(psycopg.errors.QueryCanceled):
                await conn.execute("SELECT pg_sleep(5)")
    finally:
        await pool.close()


async def test_the_replay_schema_and_the_default_timeout_go_together(database_url: str) -> None:
    pool = make_pool(database_url, max_size=1, schema="replay_x")
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            timeout = await (await conn.execute("SHOW statement_timeout")).fetchone()
            path = await (await conn.execute("SHOW search_path")).fetchone()
        assert timeout == ("30s",) and path == ("replay_x,public",)
        assert Settings().db_statement_timeout_ms == 30_000
    finally:
        await pool.close()
