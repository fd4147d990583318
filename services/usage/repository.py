"""Postgres access of the usage worker's thresholds: every statement is in
sql/thresholds.sql, every value a parameter. Increments and aggregates are
domain/usage/repository.py's (the API reads those too)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection

from services.usage.thresholds import CounterKey, Crossing
from shared.sqlfile import load_queries

SQL_PATH = Path(__file__).resolve().parent / "sql" / "thresholds.sql"


@cache
def queries() -> dict[str, str]:
    return load_queries(SQL_PATH)


async def counters_before(conn: AsyncConnection[Any], keys: Collection[CounterKey]) -> dict[CounterKey, int]:
    """The counters' values before the batch is added, locked (FOR UPDATE) until the
    transaction ends; a counter without a row is left out (it is 0)."""
    out: dict[CounterKey, int] = {}
    pools = sorted(k for k in keys if k[0] == "pool")
    if pools:
        cursor = await conn.execute(queries()["pools_before"], {
            "subject_types": [k[1] for k in pools], "subject_ids": [k[2] for k in pools],
            "features": [k[4] for k in pools], "period_starts": [k[5] for k in pools],
        }, prepare=True)
        for st, sid, feature, start, used in await cursor.fetchall():
            out[("pool", st, sid, "", feature, int(start))] = int(used)
    members = sorted(k for k in keys if k[0] == "member")
    if members:
        cursor = await conn.execute(queries()["members_before"], {
            "family_ids": [k[2] for k in members], "user_ids": [k[3] for k in members],
            "features": [k[4] for k in members], "period_starts": [k[5] for k in members],
        }, prepare=True)
        for family, user, feature, start, used in await cursor.fetchall():
            out[("member", "family", family, user, feature, int(start))] = int(used)
    return out


async def record(conn: AsyncConnection[Any], crossings: Sequence[Crossing]) -> list[Crossing]:
    """Insert the crossings; returns those that were new (in their order). One whose key
    is recorded already (crossed earlier in the period) is skipped."""
    if not crossings:
        return []
    c = crossings
    cursor = await conn.execute(queries()["insert_thresholds"], {
        "scopes": [x.scope for x in c], "subject_types": [x.subject_type for x in c],
        "subject_ids": [x.subject_id for x in c], "member_ids": [x.member_id for x in c],
        "features": [x.feature_code for x in c], "period_starts": [x.period_start for x in c],
        "thresholds": [x.threshold for x in c], "period_ends": [x.period_end for x in c],
        "plan_ids": [x.plan_id for x in c], "units": [x.units for x in c], "usages": [x.usage for x in c],
        "limits": [x.limit for x in c], "event_ids": [x.event_id for x in c], "user_ids": [x.user_id for x in c],
        "created_ms": [x.created_ms for x in c],
    }, prepare=True)
    inserted = {(r[0], r[1], r[2], r[3], r[4], int(r[5]), r[6]) for r in await cursor.fetchall()}
    return [x for x in crossings if x.key in inserted]
