"""Postgres reads of the API: every query is in sql/api.sql, every value a parameter.

Each method takes a connection from the pool within `timeout` seconds (the caller's
remaining deadline). Driver errors propagate: the exception-mapping interceptor turns
psycopg's OperationalError and the pool's PoolTimeout into UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import AsyncConnectionPool

from domain.entitlements import SubjectRow, read_subjects
from domain.entitlements_asof import History, read_access_changes, read_history
from services.api_grpc.validation import SubjectKey
from shared.db import timed_connection
from shared.sqlfile import load_queries

SQL_PATH = Path(__file__).resolve().parent / "sql" / "api.sql"
Row = dict[str, Any]


@cache
def _queries() -> dict[str, str]:
    return load_queries(SQL_PATH)


@dataclass(frozen=True, slots=True)
class Watermark:
    """The newest event the entitlements projection applied, and its lag then."""

    created: int
    event_id: str
    lag_ms: int


@dataclass(frozen=True, slots=True)
class PaymentFilter:
    customer_id: str | None = None
    user_id: str | None = None
    family_id: str | None = None
    status: str | None = None
    created_after: int | None = None
    created_before: int | None = None


def _ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def _from_unix(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value).astimezone()


class Queries:
    """`checkout_timeout_s` caps the wait for a pooled connection: with Postgres down the
    pool has none to give, and the caller should hear UNAVAILABLE, not wait out its deadline."""

    def __init__(self, pool: AsyncConnectionPool, checkout_timeout_s: float = 2.0) -> None:
        self._pool = pool
        self._checkout_s = checkout_timeout_s

    def _connection(self, timeout: float) -> Any:
        return timed_connection(self._pool, min(timeout, self._checkout_s))

    async def watermark(self, timeout: float) -> Watermark | None:
        async with self._connection(timeout) as conn:
            return await _watermark(conn)

    async def subject_rows(
        self, subjects: Sequence[SubjectKey], timeout: float
    ) -> tuple[list[SubjectRow], Watermark | None]:
        """Every entitlement row of `subjects` and the watermark, from one REPEATABLE READ
        snapshot, so a bulk answer never mixes two states of the projection."""
        async with self._connection(timeout) as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            rows = await read_subjects(conn, subjects)
            return rows, await _watermark(conn)

    async def history(self, user_id: str | None, family_id: str | None, at: int, timeout: float) -> History:
        """The subject's recorded entitlement history until `at`, from one snapshot."""
        async with self._connection(timeout) as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return await read_history(conn, user_id, family_id, at)

    async def access_changes(
        self, user_id: str | None, family_id: str | None, since: int, until: int, after: Sequence[Any] | None,
        limit: int, timeout: float,
    ) -> list[Row]:
        async with self._connection(timeout) as conn:
            return await read_access_changes(conn, user_id, family_id, since, until, after, limit)

    async def payment(self, payment_id: str, timeout: float) -> Row | None:
        rows = await self._fetch("get_payment", {"payment_id": payment_id}, timeout)
        return rows[0] if rows else None

    async def payments(
        self, where: PaymentFilter, after: Sequence[str] | None, limit: int, timeout: float
    ) -> list[Row]:
        """Newest first; `after` is the (created_at ISO, payment_id) of the last row seen."""
        params = {
            "customer_id": where.customer_id,
            "user_id": where.user_id,
            "family_id": where.family_id,
            "status": where.status,
            "created_after": _from_unix(where.created_after),
            "created_before": _from_unix(where.created_before),
            "after_created": after[0] if after else None,
            "after_id": after[1] if after else None,
            "limit": limit,
        }
        return await self._fetch("list_payments", params, timeout)

    async def entitlements(
        self, subjects: Sequence[SubjectKey], after: Sequence[str] | None, limit: int, timeout: float
    ) -> list[Row]:
        params = {
            "subject_types": [s[0] for s in subjects],
            "subject_ids": [s[1] for s in subjects],
            "after": list(after) if after else None,
            "limit": limit,
        }
        return await self._fetch("list_entitlements", params, timeout)

    async def subscriptions(
        self, user_id: str | None, family_id: str | None, after: str | None, limit: int, timeout: float
    ) -> list[Row]:
        params = {"user_id": user_id, "family_id": family_id, "after": after, "limit": limit}
        return await self._fetch("list_subscriptions", params, timeout)

    async def _fetch(self, name: str, params: dict[str, Any], timeout: float) -> list[Row]:
        async with self._connection(timeout) as conn:
            async with conn.cursor(row_factory=dict_row) as cursor:
                await cursor.execute(_queries()[name], params)
                return await cursor.fetchall()


async def _watermark(conn: AsyncConnection[Any]) -> Watermark | None:
    async with conn.cursor(row_factory=tuple_row) as cursor:
        await cursor.execute(_queries()["freshness"])
        row = await cursor.fetchone()
    if row is None:
        return None
    return Watermark(int(row[0]), str(row[1] or ""), max(0, int(row[2])))
