"""Postgres side of the entitlements projection: load a batch's state, save what changed,
and read subjects back for Redis.

All SQL is in sql/entitlements.sql and every value is a parameter. Everything runs on
the caller's connection, inside its transaction. A batch costs three round trips for
Postgres: two pipelined load phases and one pipeline of set-based writes, one statement
per table (plus one query to read back the subjects for Redis).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, lru_cache
from operator import attrgetter
from pathlib import Path
from typing import Any, TypeVar

from psycopg import AsyncConnection, AsyncCursor
from psycopg.rows import TupleRow, tuple_row

from domain.entitlements import SubjectRow, read_subjects, subject_params
from payment.v1 import events_pb2
from services.entitlements.model import (
    AccessChange,
    CatalogMiss,
    Customer,
    Entitlement,
    HistoryEntry,
    OneTimeGrant,
    PaidPeriod,
    Payment,
    State,
    SubjectKey,
    Subscription,
    Version,
)
from shared.db import json_rows
from shared.sqlfile import load_queries

__all__ = ["SubjectRow", "read_subjects"]  # the read model's (domain/entitlements.py)

SQL_PATH = Path(__file__).resolve().parent / "sql" / "entitlements.sql"

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")
Row = tuple[Any, ...]


@cache
def _queries() -> dict[str, str]:
    return load_queries(SQL_PATH)


# ---------------------------------------------------------------- loading


@dataclass(frozen=True)
class BatchKeys:
    """The ids a batch of events can touch; the state to load is what they own."""

    customer_ids: list[str]
    subscription_ids: list[str]
    payment_ids: list[str]
    charge_ids: list[str]

    @classmethod
    def of(cls, events: Iterable[events_pb2.PaymentEvent]) -> BatchKeys:
        customers: set[str] = set()
        subscriptions: set[str] = set()
        payments: set[str] = set()
        charges: set[str] = set()
        for event in events:
            customers.add(event.customer_id)
            subscriptions.add(event.subscription_id)
            # Every id a payment or grant row of the event can be keyed by: the batch
            # writes only rows it loaded or found missing (load_state, save).
            payments.update(
                (event.payment_intent_id, event.charge_id, event.object_id, event.checkout_session_id)
            )
            charges.add(event.charge_id)
        return cls(*(sorted(ids - {""}) for ids in (customers, subscriptions, payments, charges)))


async def load_state(conn: AsyncConnection[Any], keys: BatchKeys) -> State:
    """Every row the batch's customers own (and its payments), in two pipelined phases:
    the owned subscriptions and grants first, then their entitlements and access changes.

    It must run inside the transaction that writes the batch: the payments and grants it
    finds stay locked until that transaction ends (`FOR UPDATE`), because batches of two
    partitions may write one of them (a dispute is keyed by its payment, the charge by its
    customer). The rows it does not find are inserted by `save` only if nobody inserted
    them meanwhile (`ConcurrentInsert`). Every other row belongs to one customer and is
    only written by batches of that customer's partition, which the runtime applies one
    at a time. Nothing is taken from the server's lock table per id (docs/performance.md,
    issue 12 section 9)."""
    params = {
        "customer_ids": keys.customer_ids,
        "subscription_ids": keys.subscription_ids,
        "payment_ids": keys.payment_ids,
        "charge_ids": keys.charge_ids,
    }
    state = _state(*await _fetch_all(conn, _FIRST_PHASE, params))
    sources = [("subscription", sub_id) for sub_id in state.subscriptions] + list(state.grants)
    params = {
        "subscription_ids": list(state.subscriptions),
        "source_types": [source[0] for source in sources],
        "source_ids": [source[1] for source in sources],
    }
    entitlements, changes = await _fetch_all(
        conn, ("load_entitlements", "load_access_changes"), params
    )
    state.entitlements = _grouped(
        map(_entitlement, entitlements), attrgetter("source_type", "source_id"), attrgetter("key")
    )
    state.access_changes = _grouped(
        map(_access_change, changes), _HISTORY_GROUP, attrgetter("event_created", "event_id")
    )
    return state


_FIRST_PHASE = (
    "load_customers",
    "load_subscriptions",
    "load_history",
    "load_paid_periods",
    "load_grants",
    "load_payments",
)


async def _fetch_all(
    conn: AsyncConnection[Any], names: Sequence[str], params: dict[str, Any]
) -> list[list[Row]]:
    """The rows of each named query, all sent in one pipeline (one round trip)."""
    cursors: list[AsyncCursor[TupleRow]] = []
    async with conn.pipeline():
        for name in names:
            cursor = conn.cursor(row_factory=tuple_row)
            await cursor.execute(_queries()[name], params)
            cursors.append(cursor)
    return [await cursor.fetchall() for cursor in cursors]


def _state(
    customers: list[Row],
    subscriptions: list[Row],
    history: list[Row],
    paid: list[Row],
    grants: list[Row],
    payments: list[Row],
) -> State:
    return State(
        customers={c.customer_id: c for c in map(_customer, customers)},
        subscriptions={s.subscription_id: s for s in map(_subscription, subscriptions)},
        history=_grouped(map(_history_entry, history), _HISTORY_GROUP, lambda e: e),
        paid={p.subscription_id: p for p in map(_paid_period, paid)},
        grants={g.source: g for g in map(_grant, grants)},
        payments={p.payment_id: p for p in map(_payment, payments)},
    )


def _grouped(
    rows: Iterable[R], group: Callable[[R], K], order: Callable[[R], Any]
) -> dict[K, tuple[R, ...]]:
    """Rows by `group`, each group sorted by `order`."""
    groups: dict[K, list[R]] = {}
    for row in rows:
        key = group(row)
        members = groups.get(key)
        if members is None:
            groups[key] = [row]
        else:
            members.append(row)
    return {
        key: (members[0],) if len(members) == 1 else tuple(sorted(members, key=order))
        for key, members in groups.items()
    }


_HISTORY_GROUP = attrgetter("subscription_id")

# The load queries return the model's fields in order, times as Unix seconds, and the
# version last as (created, event id): a row is its model's arguments. (The one star
# of a whole tuple is for mypy, which cannot count a slice's items.)


def _customer(row: Row) -> Customer:
    return Customer(*(*row[:5], Version(row[5], row[6])))


def _subscription(row: Row) -> Subscription:
    return Subscription(*(*row[:17], Version(row[17], row[18])))


def _history_entry(row: Row) -> HistoryEntry:
    return HistoryEntry(Version(row[0], row[1]), *row[2:])


def _paid_period(row: Row) -> PaidPeriod:
    return PaidPeriod(*(*row[:4], Version(row[4], row[5])))


def _grant(row: Row) -> OneTimeGrant:
    return OneTimeGrant(*(*row[:7], Version(row[7], row[8])))


def _entitlement(row: Row) -> Entitlement:
    return Entitlement(*(*row[:16], Version(row[16], row[17])))


def _access_change(row: Row) -> AccessChange:
    return AccessChange(*row)


def _payment(row: Row) -> Payment:
    fields = list(row[:18])
    fields[15] = dict(fields[15] or {})  # metadata
    return Payment(*(*fields, Version(row[18], row[19])))


# ---------------------------------------------------------------- saving


@dataclass(frozen=True)
class Writes:
    """The rows a batch changed: what `save` writes. `*_gone` rows are deleted."""

    customers: list[Customer]
    subscriptions: list[Subscription]
    history: list[HistoryEntry]
    paid_periods: list[PaidPeriod]
    grants: list[OneTimeGrant]
    entitlements: list[Entitlement]
    entitlements_gone: list[Entitlement]
    access_changes: list[AccessChange]
    access_changes_new: list[AccessChange]
    access_changes_gone: list[AccessChange]
    payments: list[Payment]  # rows the batch loaded (and holds locked) ...
    payments_gone: list[str]
    catalog_misses: list[CatalogMiss]
    mapped_customers: list[Customer]
    paid_events: list[PaidPeriod] = field(default_factory=list)
    # ... and rows it did not find: inserted only if nobody inserted them meanwhile.
    new_payments: list[Payment] = field(default_factory=list)
    new_grants: list[OneTimeGrant] = field(default_factory=list)

    @property
    def subjects(self) -> set[SubjectKey]:
        """Subjects whose entitlements changed (their Redis answers must be rewritten)."""
        return {row.subject for row in (*self.entitlements, *self.entitlements_gone)}


def diff(before: State, after: State) -> Writes:
    """What changed from the loaded state `before` to the final state `after`."""
    entitlements, entitlements_gone = _set_diff(
        before.entitlements, after.entitlements, lambda r: r.key
    )
    changes, changes_gone = _set_diff(before.access_changes, after.access_changes, lambda r: r.key)
    old_changes = {row.key for rows in before.access_changes.values() for row in rows}
    payments = _changed(before.payments, after.payments)
    grants = _changed(before.grants, after.grants)
    return Writes(
        customers=_changed(before.customers, after.customers),
        subscriptions=_changed(before.subscriptions, after.subscriptions),
        history=[
            e
            for sub, rows in after.history.items()
            for e in rows
            if e not in before.history.get(sub, ())
        ],
        paid_periods=_changed(before.paid, after.paid),
        grants=[g for g in grants if g.source in before.grants],
        entitlements=entitlements,
        entitlements_gone=entitlements_gone,
        access_changes=changes,
        access_changes_new=[row for row in changes if row.key not in old_changes],
        access_changes_gone=changes_gone,
        payments=[p for p in payments if p.payment_id in before.payments],
        payments_gone=[
            payment_id for payment_id in before.payments if payment_id not in after.payments
        ],
        catalog_misses=sorted(after.catalog_misses.values(), key=lambda m: m.price_id),
        mapped_customers=[
            after.customers[c] for c in sorted(after.mapped_customers) if c in after.customers
        ],
        paid_events=_changed(before.paid_events, after.paid_events),
        # sorted: concurrent batches insert in one order (one waits, none deadlocks)
        new_payments=sorted(
            (p for p in payments if p.payment_id not in before.payments), key=attrgetter("payment_id")
        ),
        new_grants=sorted((g for g in grants if g.source not in before.grants), key=attrgetter("source")),
    )


def _changed(before: dict[K, R], after: dict[K, R]) -> list[R]:
    return [
        row for key, row in after.items() if before.get(key) is not row and before.get(key) != row
    ]


def _set_diff(
    before: dict[K, tuple[R, ...]], after: dict[K, tuple[R, ...]], key: Callable[[R], Hashable]
) -> tuple[list[R], list[R]]:
    """Rows to upsert and rows to delete, for groups that replace each other whole."""
    upserts: list[R] = []
    gone: list[R] = []
    for group, rows in after.items():
        if before.get(group) is rows:
            continue
        old = {key(row): row for row in before.get(group, ())}
        new = {key(row): row for row in rows}
        upserts += [row for k, row in new.items() if old.get(k) != row]
        gone += [row for k, row in old.items() if k not in new]
    return upserts, gone


class ConcurrentInsert(RuntimeError):
    """Another transaction inserted a payment or grant this batch did not find when it
    loaded (a batch of another partition about the same payment, committed meanwhile).
    Nothing of the batch is committed; retried, its load finds the row and merges it
    (shared/consumer.py retries every failure of a batch)."""


async def save(conn: AsyncConnection[Any], writes: Writes) -> None:
    """Write `writes` in the caller's transaction: one set-based statement per table and
    kind of change, all in one pipeline, so a batch costs the same number of statements
    (at most 13) and one round trip whatever the number of its events.

    Deletions go first: a merged payment gives up its charge_id (a unique column) and
    an entitlement may move to another subject. Payments are backfilled last. Raises
    ConcurrentInsert when a new payment or grant of the batch was inserted meanwhile by
    another transaction (`upsert_payment`): the caller's transaction must roll back.
    """
    steps: list[tuple[str, dict[str, Any] | None]] = [
        ("delete_payment", _rows([{"payment_id": p} for p in writes.payments_gone])),
        ("delete_entitlement", _rows([_entitlement_key(e) for e in writes.entitlements_gone])),
        ("delete_access_change", _rows([_access_change_key(a) for a in writes.access_changes_gone])),
        ("upsert_customer", _rows([_customer_params(c) for c in writes.customers])),
        ("upsert_subscription", _rows([_subscription_params(s) for s in writes.subscriptions])),
        ("insert_history", _rows([_history_params(e) for e in writes.history])),
        ("upsert_paid_period", _rows([_paid_params(p) for p in writes.paid_periods])),
        ("insert_paid_events", _rows([_paid_event_params(p) for p in writes.paid_events])),
        ("upsert_grant", _rows([_grant_params(g) for g in writes.grants], [_grant_params(g) for g in writes.new_grants])),
        ("upsert_entitlement", _rows([_entitlement_params(e) for e in writes.entitlements])),
        ("upsert_access_change", _rows([_access_change_params(a) for a in writes.access_changes])),
        (
            "upsert_payment",
            _rows([_payment_params(p) for p in writes.payments], [_payment_params(p) for p in writes.new_payments]),
        ),
        ("upsert_catalog_miss", _rows([_miss_params(m) for m in writes.catalog_misses])),
        ("backfill_payment_identity", _rows([_backfill_params(c) for c in writes.mapped_customers])),
    ]
    checked: list[tuple[str, int, AsyncCursor[TupleRow]]] = []
    async with conn.pipeline(), conn.cursor() as cursor:
        for name, params in steps:
            if params is None:
                continue
            if "new_count" in params:
                # its own cursor: its count is read once the pipeline has synced
                expected = params.pop("new_count")
                own = conn.cursor(row_factory=tuple_row)
                await own.execute(_queries()[name], params, prepare=True)
                checked.append((name, expected, own))
            else:
                await cursor.execute(_queries()[name], params, prepare=True)
    for name, expected, own in checked:
        row = await own.fetchone()
        await own.close()
        inserted = row[0] if row else 0
        if inserted != expected:
            raise ConcurrentInsert(
                f"{name}: {expected - inserted} of the batch's {expected} new rows were inserted by"
                " another transaction since the batch loaded; the batch is retried"
            )


def _rows(rows: list[dict[str, Any]], new_rows: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The parameters of a write, None when it has nothing to write. With `new_rows` (a
    write that must not overwrite rows the batch did not load): both sets, and how many
    new rows it must insert."""
    if new_rows is None:
        return {"rows": json_rows(rows)} if rows else None
    if not rows and not new_rows:
        return None
    return {"rows": json_rows(rows), "new_rows": json_rows(new_rows), "new_count": len(new_rows)}


@lru_cache(maxsize=65_536)
def _dt(value: int) -> datetime:
    # Cached: a batch writes the same few times many times over (a subscription's rows
    # share its version, grant and expiry), and the cache's lookup is C.
    return datetime.fromtimestamp(value, UTC)


def _dt_or_none(value: int | None) -> datetime | None:
    return None if value is None else _dt(value)


def _version_params(version: Version) -> dict[str, Any]:
    return {"last_event_id": version.event_id, "last_event_created": _dt(version.created)}


def _customer_params(c: Customer) -> dict[str, Any]:
    return {
        "customer_id": c.customer_id,
        "user_id": c.user_id,
        "family_id": c.family_id,
        "email": c.email,
        "created_at": _dt(c.created_at),
        **_version_params(c.version),
    }


def _subscription_params(s: Subscription) -> dict[str, Any]:
    return {
        "subscription_id": s.subscription_id,
        "customer_id": s.customer_id,
        "user_id": s.user_id,
        "family_id": s.family_id,
        "plan_id": s.plan_id,
        "price_id": s.price_id,
        "status": s.status,
        "current_period_start": _dt_or_none(s.current_period_start),
        "current_period_end": _dt_or_none(s.current_period_end),
        "cancel_at_period_end": s.cancel_at_period_end,
        "cancel_at": _dt_or_none(s.cancel_at),
        "canceled_at": _dt_or_none(s.canceled_at),
        "trial_end": _dt_or_none(s.trial_end),
        "access_level": s.access_level,
        "status_since": _dt(s.status_since),
        "created_at": _dt(s.created_at),
        "updated_at": _dt(s.updated_at),
        **_version_params(s.version),
    }


def _history_params(e: HistoryEntry) -> dict[str, Any]:
    return {
        "subscription_id": e.subscription_id,
        "event_id": e.version.event_id,
        "event_created": _dt(e.version.created),
        "customer_id": e.customer_id,
        "status": e.status,
        "price_id": e.price_id,
        "current_period_end": _dt_or_none(e.current_period_end),
        "cancel_at_period_end": e.cancel_at_period_end,
        "cancel_at": _dt_or_none(e.cancel_at),
        "status_only": e.status_only,
    }


def _paid_event_params(p: PaidPeriod) -> dict[str, Any]:
    return {
        "subscription_id": p.subscription_id,
        "event_id": p.version.event_id,
        "event_created": _dt(p.version.created),
        "customer_id": p.customer_id,
        "paid_through": _dt(p.paid_through),
    }


def _paid_params(p: PaidPeriod) -> dict[str, Any]:
    return {
        "subscription_id": p.subscription_id,
        "customer_id": p.customer_id,
        "paid_through": _dt(p.paid_through),
        "invoice_id": p.invoice_id,
        **_version_params(p.version),
    }


def _grant_params(g: OneTimeGrant) -> dict[str, Any]:
    return {
        "source_type": g.source_type,
        "source_id": g.source_id,
        "customer_id": g.customer_id,
        "user_id": g.user_id,
        "family_id": g.family_id,
        "plan_id": g.plan_id,
        "granted_at": _dt(g.granted_at),
        **_version_params(g.version),
    }


def _entitlement_key(e: Entitlement) -> dict[str, Any]:
    return {
        "subject_type": e.subject_type,
        "subject_id": e.subject_id,
        "feature_code": e.feature_code,
        "source_type": e.source_type,
        "source_id": e.source_id,
    }


def _entitlement_params(e: Entitlement) -> dict[str, Any]:
    return {  # the most written table: one literal, no helpers
        "subject_type": e.subject_type,
        "subject_id": e.subject_id,
        "feature_code": e.feature_code,
        "source_type": e.source_type,
        "source_id": e.source_id,
        "user_id": e.user_id,
        "family_id": e.family_id,
        "plan_id": e.plan_id,
        "status": e.status,
        "access_level": e.access_level,
        "usage_limit": e.usage_limit,
        "limit_period": e.limit_period,
        "enforcement": e.enforcement,
        "granted_at": _dt(e.granted_at),
        "expires_at": None if e.expires_at is None else _dt(e.expires_at),
        "revoked_at": None if e.revoked_at is None else _dt(e.revoked_at),
        "last_event_id": e.version.event_id,
        "last_event_created": _dt(e.version.created),
    }


def _access_change_key(a: AccessChange) -> dict[str, Any]:
    return {"subscription_id": a.subscription_id, "event_id": a.event_id}


def _access_change_params(a: AccessChange) -> dict[str, Any]:
    return {
        **_access_change_key(a),
        "event_created": _dt(a.event_created),
        "from_level": a.from_level,
        "to_level": a.to_level,
        "status": a.status,
    }


def _payment_params(p: Payment) -> dict[str, Any]:
    return {
        "payment_id": p.payment_id,
        "customer_id": p.customer_id,
        "user_id": p.user_id,
        "family_id": p.family_id,
        "amount": p.amount,
        "currency": p.currency,
        "status": p.status,
        "amount_refunded": p.amount_refunded,
        "payment_intent_id": p.payment_intent_id,
        "charge_id": p.charge_id,
        "invoice_id": p.invoice_id,
        "description": p.description,
        "failure_code": p.failure_code,
        "failure_message": p.failure_message,
        "status_reason": p.status_reason,
        "metadata": p.metadata,
        "created_at": _dt(p.created_at),
        "updated_at": _dt(p.updated_at),
        **_version_params(p.version),
    }


def _miss_params(m: CatalogMiss) -> dict[str, Any]:
    return {
        "price_id": m.price_id,
        "first_seen_at": _dt(m.first_seen_at),
        "last_seen_at": _dt(m.last_seen_at),
        "last_subscription_id": m.last_subscription_id,
        "last_event_id": m.last_event_id,
    }


def _backfill_params(c: Customer) -> dict[str, Any]:
    return {"customer_id": c.customer_id, "user_id": c.user_id, "family_id": c.family_id}


# ---------------------------------------------------------------- reading for Redis


async def mark_cache_pending(conn: AsyncConnection[Any], consumer: str, subjects: Collection[SubjectKey]) -> int | None:
    """Mark `subjects` as possibly stale in Redis, in the caller's transaction; its txid."""
    if not subjects:
        return None
    cursor = await conn.execute(_queries()["mark_cache_pending"], {"consumer": consumer, **subject_params(subjects)})
    row = await cursor.fetchone()
    return int(row[0]) if row else None


async def clear_cache_pending(
    conn: AsyncConnection[Any], consumer: str, subjects: Collection[SubjectKey], batch_txid: int
) -> None:
    """Clear the marks that transaction `batch_txid` set on `subjects` (their answer is in Redis)."""
    if subjects:
        params = {"consumer": consumer, "batch_txid": batch_txid, **subject_params(subjects)}
        await conn.execute(_queries()["clear_cache_pending"], params)


async def take_cache_pending(conn: AsyncConnection[Any], consumer: str, limit: int) -> list[SubjectKey]:
    """Up to `limit` marked subjects that no running batch holds, locked by the caller's transaction."""
    cursor = await conn.execute(_queries()["take_cache_pending"], {"consumer": consumer, "limit": limit})
    return [(str(r[0]), str(r[1])) for r in await cursor.fetchall()]


async def mark_all_cache_pending(conn: AsyncConnection[Any], consumer: str, subject: SubjectKey | None) -> None:
    """Mark every subject with entitlement rows (or only `subject`) for a rewrite of its answer."""
    subject_type, subject_id = subject if subject else (None, None)
    params = {"consumer": consumer, "subject_type": subject_type, "subject_id": subject_id}
    await conn.execute(_queries()["mark_all_cache_pending"], params)


async def drop_cache_pending(conn: AsyncConnection[Any], consumer: str, subjects: Collection[SubjectKey]) -> None:
    """Clear the marks of `subjects`, whoever set them (the caller holds their locks)."""
    if subjects:
        await conn.execute(_queries()["drop_cache_pending"], {"consumer": consumer, **subject_params(subjects)})


async def count_cache_pending(conn: AsyncConnection[Any], consumer: str) -> int:
    cursor = await conn.execute(_queries()["count_cache_pending"], {"consumer": consumer})
    row = await cursor.fetchone()
    return int(row[0]) if row else 0
