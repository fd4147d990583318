"""Postgres side of the dunning service: load and save cases (projection), and the
scheduler's claims in the dunning_steps ledger.

All SQL is in sql/dunning.sql and every value is a parameter. The projection's functions
run on the caller's connection, inside its transaction.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import tuple_row

from services.dunning.model import Case, State, Version
from shared.db import json_rows
from shared.sqlfile import load_queries

SQL_PATH = Path(__file__).resolve().parent / "sql" / "dunning.sql"


@cache
def queries() -> dict[str, str]:
    return load_queries(SQL_PATH)


def _ts(value: datetime) -> int:
    return int(value.timestamp())


def _ts_or_none(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def _dt(value: int) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _dt_or_none(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


# ---------------------------------------------------------------- projection


async def load_state(
    conn: AsyncConnection[Any], invoice_ids: Collection[str], subscription_ids: Collection[str]
) -> State:
    """The cases of these invoices and of these subscriptions, in one query."""
    params = {"invoice_ids": sorted(invoice_ids), "subscription_ids": sorted(subscription_ids)}
    async with conn.cursor(row_factory=tuple_row) as cursor:
        await cursor.execute(queries()["load_cases"], params)
        rows = await cursor.fetchall()
    return State({case.invoice_id: case for case in map(_case, rows)})


def _case(row: tuple[Any, ...]) -> Case:
    (
        case_id, invoice_id, customer_id, subscription_id, user_id, family_id, plan_id,
        price_id, state, attempt_count, next_attempt_at, last_error, amount_due, currency,
        opened_at, closed_at, last_attempt_at, escalated_at, restored_at,
        event_id, event_created,
    ) = row
    return Case(
        case_id, invoice_id, customer_id, subscription_id, user_id, family_id, plan_id,
        price_id, state, attempt_count, _ts_or_none(next_attempt_at), last_error, amount_due,
        currency, _ts(opened_at), _ts_or_none(closed_at), _ts_or_none(last_attempt_at),
        _ts_or_none(escalated_at), _ts_or_none(restored_at),
        Version(_ts(event_created), event_id),
    )


def changed(before: State, after: State) -> list[Case]:
    """The cases that differ from what was loaded, in a stable order."""
    return sorted(
        (c for key, c in after.cases.items() if before.cases.get(key) != c),
        key=lambda c: c.case_id,
    )


async def save(conn: AsyncConnection[Any], cases: Sequence[Case], traces: Mapping[str, str] | None = None) -> None:
    """Upsert `cases` in one statement, in the order given (by case id, as `changed` sorts).

    `traces` maps an invoice id to the `traceparent` of the event that last changed its
    case (the scheduler's steps continue that trace)."""
    if not cases:
        return
    traces = traces or {}
    rows = [_case_params(c) | {"traceparent": traces.get(c.invoice_id) or None} for c in cases]
    await conn.execute(queries()["upsert_case"], {"rows": json_rows(rows)}, prepare=True)


def _case_params(c: Case) -> dict[str, Any]:
    return {
        "case_id": c.case_id,
        "invoice_id": c.invoice_id,
        "customer_id": c.customer_id,
        "subscription_id": c.subscription_id,
        "user_id": c.user_id,
        "family_id": c.family_id,
        "plan_id": c.plan_id,
        "price_id": c.price_id,
        "state": c.state,
        "attempt_count": c.attempt_count,
        "next_attempt_at": _dt_or_none(c.next_attempt_at),
        "last_error": c.last_error,
        "amount_due": c.amount_due,
        "currency": c.currency,
        "opened_at": _dt(c.opened_at),
        "closed_at": _dt_or_none(c.closed_at),
        "last_attempt_at": _dt_or_none(c.last_attempt_at),
        "escalated_at": _dt_or_none(c.escalated_at),
        "restored_at": _dt_or_none(c.restored_at),
        "last_event_id": c.version.event_id,
        "last_event_created": _dt(c.version.created),
    }


# ---------------------------------------------------------------- scheduler


@dataclass(frozen=True, slots=True)
class DueCase:
    """What the scheduler needs of a case to act on it."""

    case_id: str
    invoice_id: str
    customer_id: str
    subscription_id: str | None
    user_id: str | None
    family_id: str | None
    plan_id: str | None
    price_id: str | None
    state: str
    attempt_count: int
    amount_due: int | None
    currency: str | None
    traceparent: str | None = None  # of the event that last changed the case


async def due_cases(
    conn: AsyncConnection[Any], query: str, now: int, limit: int
) -> list[DueCase]:
    """Rows of `due_cases` or `cases_to_restore`, locked FOR UPDATE SKIP LOCKED."""
    async with conn.cursor(row_factory=tuple_row) as cursor:
        await cursor.execute(queries()[query], {"now": _dt(now), "limit": limit})
        return [DueCase(*row) for row in await cursor.fetchall()]


async def claim_step(
    conn: AsyncConnection[Any], case_id: str, step: str, after_attempts: int, owner: str,
    now: int, claimed_until: int,
) -> bool:
    """True if this owner now holds the step (inserted, or took over an expired claim)."""
    params = {
        "case_id": case_id,
        "step": step,
        "after_attempts": after_attempts,
        "owner": owner,
        "now": _dt(now),
        "claimed_until": _dt(claimed_until),
    }
    cursor = await conn.execute(queries()["claim_step"], params)
    return await cursor.fetchone() is not None


async def release_step(conn: AsyncConnection[Any], case_id: str, step: str, owner: str) -> None:
    await conn.execute(
        queries()["release_step"], {"case_id": case_id, "step": step, "owner": owner}
    )


async def mark_published(
    conn: AsyncConnection[Any], case_id: str, step: str, owner: str, now: int
) -> None:
    params = {"case_id": case_id, "step": step, "owner": owner, "now": _dt(now)}
    await conn.execute(queries()["mark_published"], params)
