"""Postgres access of the usage service: the worker's batch writes, the API's reads and
the rebuild's reads. Every statement is in sql/usage.sql, every value a parameter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from payment.v1 import events_pb2
from shared.sqlfile import load_queries

SQL_PATH = Path(__file__).resolve().parent / "sql" / "usage.sql"
PeriodKey = tuple[str, str, str, int]  # pool type, pool id, feature, period start


@cache
def queries() -> dict[str, str]:
    return load_queries(SQL_PATH)


# ---------------------------------------------------------------- the worker's writes


@dataclass(frozen=True, slots=True)
class Totals:
    """What a batch adds per pool period and per member period, summed in event order."""

    pools: dict[PeriodKey, tuple[int, int, int]]  # -> (period_end, amount, limit of the last event)
    members: dict[PeriodKey, int]  # (family, user, feature, period_start) -> amount


def totals(events: Sequence[events_pb2.UsageEvent]) -> Totals:
    pools: dict[PeriodKey, tuple[int, int, int]] = {}
    members: dict[PeriodKey, int] = {}
    for e in events:
        key = (e.subject_type, e.subject_id, e.feature_code, e.period_start)
        _, amount, _ = pools.get(key, (0, 0, 0))
        pools[key] = (e.period_end, amount + e.amount, e.limit)
        if e.subject_type == "family" and e.user_id:
            mkey = (e.subject_id, e.user_id, e.feature_code, e.period_start)
            members[mkey] = members.get(mkey, 0) + e.amount
    return Totals(pools, members)


async def record(conn: AsyncConnection[Any], events: Sequence[events_pb2.UsageEvent]) -> list[str]:
    """Insert the increments and add the new ones to the aggregates. Returns the event ids
    inserted (an idempotency key recorded before is skipped, not counted again)."""
    params = {
        "event_ids": [e.event_id for e in events],
        "keys": [e.idempotency_key for e in events],
        "subject_types": [e.subject_type for e in events],
        "subject_ids": [e.subject_id for e in events],
        "user_ids": [e.user_id for e in events],
        "family_ids": [e.family_id for e in events],
        "features": [e.feature_code for e in events],
        "amounts": [e.amount for e in events],
        "period_starts": [e.period_start for e in events],
        "period_ends": [e.period_end for e in events],
        "metadata": [orjson.dumps(dict(e.metadata)).decode() for e in events],
        "created_ms": [e.created_ms for e in events],
        "used_after": [e.used_after for e in events],
        "limits": [e.limit for e in events],
        "over": [e.over_soft_limit for e in events],
    }
    cursor = await conn.execute(queries()["insert_records"], params, prepare=True)
    inserted = {row[0] for row in await cursor.fetchall()}
    new = [e for e in events if e.event_id in inserted]
    await _add(conn, totals(new))
    return [e.event_id for e in new]


async def _add(conn: AsyncConnection[Any], t: Totals) -> None:
    if t.pools:
        keys = sorted(t.pools)  # a stable lock order
        base = {
            "subject_types": [k[0] for k in keys],
            "subject_ids": [k[1] for k in keys],
            "features": [k[2] for k in keys],
            "period_starts": [k[3] for k in keys],
        }
        await conn.execute(
            queries()["ensure_aggregates"], {**base, "period_ends": [t.pools[k][0] for k in keys]}, prepare=True
        )
        await conn.execute(
            queries()["add_to_aggregates"],
            {**base, "amounts": [t.pools[k][1] for k in keys], "limits": [t.pools[k][2] for k in keys]},
            prepare=True,
        )
    if t.members:
        keys = sorted(t.members)
        base = {
            "family_ids": [k[0] for k in keys],
            "user_ids": [k[1] for k in keys],
            "features": [k[2] for k in keys],
            "period_starts": [k[3] for k in keys],
        }
        await conn.execute(queries()["ensure_member_aggregates"], base, prepare=True)
        await conn.execute(
            queries()["add_to_member_aggregates"], {**base, "amounts": [t.members[k] for k in keys]}, prepare=True
        )


# ---------------------------------------------------------------- the API's reads


async def billing_period(
    conn: AsyncConnection[Any], subjects: Sequence[tuple[str, str]], feature_code: str, plan_id: str
) -> tuple[int, int] | None:
    params = {
        "subject_types": [s[0] for s in subjects],
        "subject_ids": [s[1] for s in subjects],
        "feature_code": feature_code,
        "plan_id": plan_id,
    }
    cursor = await conn.execute(queries()["billing_period"], params)
    row = await cursor.fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


async def used_in_periods(conn: AsyncConnection[Any], keys: Sequence[PeriodKey]) -> list[int]:
    if not keys:
        return []
    params = {
        "subject_types": [k[0] for k in keys],
        "subject_ids": [k[1] for k in keys],
        "features": [k[2] for k in keys],
        "period_starts": [k[3] for k in keys],
    }
    cursor = await conn.execute(queries()["used_in_periods"], params)
    return [int(row[1]) for row in await cursor.fetchall()]


async def list_usage(
    conn: AsyncConnection[Any],
    subjects: Sequence[tuple[str, str]],
    feature_code: str | None,
    after: Sequence[Any] | None,
    limit: int,
) -> list[dict[str, Any]]:
    """`after`: (period_start, feature_code, subject_type, subject_id) of the last row seen."""
    params = {
        "subject_types": [s[0] for s in subjects],
        "subject_ids": [s[1] for s in subjects],
        "feature_code": feature_code,
        "after_start": after[0] if after else None,
        "after_feature": after[1] if after else None,
        "after_type": after[2] if after else None,
        "after_id": after[3] if after else None,
        "limit": limit,
    }
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(queries()["list_usage"], params)
        return await cursor.fetchall()
