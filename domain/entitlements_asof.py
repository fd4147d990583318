"""Entitlements as of a past moment: the read model's history, and the answer the
projection would have given then. The contract between the entitlements worker, which
records the history (subscription_history with its expiry fields, paid_period_events,
one_time_grants, access_changes), and the API, which reads it here.

`rows_as_of` is the projection's derivation (services/entitlements/handlers.py:
`access_steps`, `subscription_entitlements`, `_expiry`, `derive_grant`) applied to the
events created until the moment. The projection's rows are a function of the *set* of
events applied, never of their arrival order, so "what it would have answered at T" is
that function of the events created until T, whatever order they arrived in. The two
are kept equal by tests/integration/test_entitlements_asof.py, which checks that the
answer as of the newest event is the live answer.

The moment includes the events created at it (`created <= at`). Subjects, users and
families are those the subscription has now (facts, filled once); the catalog is the
one loaded now. Entries recorded before migration 0011 lack their expiry fields: their
answer has no expiry until a replay fills them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row, tuple_row

from domain.entitlements import SubjectRow, Version
from shared.catalog import AccessLevel, Catalog, Plan
from shared.sqlfile import load_queries

_QUERIES = load_queries(Path(__file__).resolve().parent / "sql" / "entitlements_asof.sql")
TERMINAL_STATUSES = frozenset({"canceled", "incomplete_expired"})


@dataclass(frozen=True, slots=True)
class Entry:
    """One subscription_history row with its subscription's subject."""

    subscription_id: str
    user_id: str | None
    family_id: str | None
    version: Version
    status: str
    price_id: str
    period_end: int | None
    cancel_at_period_end: bool
    cancel_at: int | None
    status_only: bool = False


@dataclass(frozen=True, slots=True)
class Paid:
    subscription_id: str
    version: Version
    paid_through: int


@dataclass(frozen=True, slots=True)
class Grant:
    source_type: str
    source_id: str
    user_id: str | None
    family_id: str | None
    plan_id: str
    granted_at: int
    version: Version


@dataclass(frozen=True, slots=True)
class History:
    entries: tuple[Entry, ...]
    paid: tuple[Paid, ...]
    grants: tuple[Grant, ...]


@dataclass(frozen=True, slots=True)
class Moment:
    """The rows the projection would have held at the moment, and per source
    (`subscription:<id>`, `checkout:<id>`, ...) the ids of the events they rest on,
    oldest first."""

    rows: tuple[SubjectRow, ...]
    evidence: dict[str, tuple[str, ...]]


def _ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


async def read_history(conn: AsyncConnection[Any], user_id: str | None, family_id: str | None, at: int) -> History:
    """The subject's recorded history until `at`, in three statements of one pipeline."""
    params = {"user_id": user_id, "family_id": family_id, "at": at}
    results = []
    async with conn.pipeline():
        cursors = []
        for name in ("asof_history", "asof_paid", "asof_grants"):
            cursor = conn.cursor(row_factory=tuple_row)
            await cursor.execute(_QUERIES[name], params)
            cursors.append(cursor)
    for cursor in cursors:
        results.append(await cursor.fetchall())
    entries = tuple(
        Entry(r[0], r[1], r[2], Version(int(r[3].timestamp()), r[4]), r[5], r[6], _ts(r[7]), bool(r[8]), _ts(r[9]),
              bool(r[10]))
        for r in results[0]
    )
    paid = tuple(Paid(r[0], Version(int(r[1].timestamp()), r[2]), int(r[3].timestamp())) for r in results[1])
    grants = tuple(
        Grant(r[0], r[1], r[2], r[3], r[4], int(r[5].timestamp()), Version(int(r[7].timestamp()), r[6]))
        for r in results[2]
    )
    return History(entries, paid, grants)


async def read_access_changes(
    conn: AsyncConnection[Any], user_id: str | None, family_id: str | None, since: int, until: int,
    after: Sequence[Any] | None, limit: int,
) -> list[dict[str, Any]]:
    """The access changes of the subject's subscriptions with since <= created < until,
    oldest first; `after` is the (changed_at, subscription_id, event_id) of the last seen."""
    params = {
        "user_id": user_id, "family_id": family_id, "since": since, "until": until,
        "after_created": after[0] if after else None, "after_subscription": after[1] if after else None,
        "after_event": after[2] if after else None, "limit": limit,
    }
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(_QUERIES["access_changes_of_subject"], params)
        return await cursor.fetchall()


# ---------------------------------------------------------------- the derivation


@dataclass(frozen=True, slots=True)
class _Step:
    entry: Entry
    plan: Plan | None
    since: int
    level: AccessLevel


def _subject(plan: Plan, user_id: str | None, family_id: str | None) -> tuple[str, str] | None:
    if plan.family_pool and family_id:
        return ("family", family_id)
    if user_id:
        return ("user", user_id)
    return None


def _snapshots(entries: Sequence[Entry]) -> list[Entry]:
    """Entries sorted by version, a status-only entry (a dunning decision) taking its
    price and expiry from the newest real snapshot before it: what it copied when the
    events arrive in order, whatever order they arrived in."""
    out: list[Entry] = []
    snapshot: Entry | None = None
    for entry in sorted(entries, key=lambda e: e.version):
        if entry.status_only and snapshot is not None:
            entry = replace(entry, price_id=snapshot.price_id, period_end=snapshot.period_end,
                            cancel_at_period_end=snapshot.cancel_at_period_end, cancel_at=snapshot.cancel_at)
        elif not entry.status_only:
            snapshot = entry
        out.append(entry)
    return out


def _steps(entries: Sequence[Entry], catalog: Catalog) -> list[_Step]:
    steps: list[_Step] = []
    since, status = 0, ""
    for entry in _snapshots(entries):
        if entry.status != status:
            since, status = entry.version.created, entry.status
        plan = catalog.plan_for_price(entry.price_id)
        level = plan.access_for(entry.status, entry.version.created - since) if plan else "blocked"
        steps.append(_Step(entry, plan, since, level))
    return steps


def _expiry(last: Entry, paid: Paid | None) -> tuple[int | None, Version]:
    if last.cancel_at_period_end:
        return last.period_end, last.version
    if last.cancel_at is not None:
        return last.cancel_at, last.version
    end = last.period_end
    if paid is not None and (end is None or paid.paid_through > end):
        return paid.paid_through, max(last.version, paid.version)
    return end, last.version


def _subscription_rows(entries: Sequence[Entry], paid: Paid | None, catalog: Catalog) -> list[SubjectRow]:
    steps = _steps(entries, catalog)
    last = steps[-1]
    sub = last.entry
    available = {f.code for f in last.plan.features_at(last.level)} if last.plan else set()
    runs: dict[tuple[tuple[str, str], str], tuple[int, int]] = {}
    running: dict[tuple[tuple[str, str], str], int] = {}
    for index, step in enumerate(steps):
        subject = _subject(step.plan, sub.user_id, sub.family_id) if step.plan else None
        held = {(subject, code) for code in step.plan.features} if step.plan and subject else set()
        for key in [key for key in running if key not in held]:
            runs[key] = (running.pop(key), index)
        for key in held:
            running.setdefault(key, index)
    runs.update({key: (start, len(steps)) for key, start in running.items()})
    rows = []
    for ((subject_type, subject_id), code), (_, end) in sorted(runs.items()):
        if end == len(steps):
            assert last.plan is not None
            feature, plan_id = last.plan.features[code], last.plan.id
            terminal = sub.status in TERMINAL_STATUSES
            status = "revoked" if terminal else "active" if code in available else "suspended"
            level: str = last.level
            expires_at, version = _expiry(sub, paid)
        else:
            held_plan = steps[end - 1].plan
            assert held_plan is not None
            feature, plan_id = held_plan.features[code], held_plan.id
            status, level, expires_at, version = "revoked", "blocked", None, steps[end].entry.version
        rows.append(SubjectRow(
            subject_type, subject_id, code, "subscription", sub.subscription_id, plan_id, status, level,
            feature.limit, feature.period, feature.enforcement, expires_at, version, sub.status, last.since,
        ))
    return rows


def rows_as_of(history: History, catalog: Catalog, at: int) -> Moment:
    """What the projection would have held at `at` (see the module docstring)."""
    rows: list[SubjectRow] = []
    evidence: dict[str, tuple[str, ...]] = {}
    by_sub: dict[str, list[Entry]] = {}
    for entry in history.entries:
        if entry.version.created <= at:
            by_sub.setdefault(entry.subscription_id, []).append(entry)
    for sub_id, entries in sorted(by_sub.items()):
        entries.sort(key=lambda e: e.version)
        paid_events = sorted((p for p in history.paid if p.subscription_id == sub_id and p.version.created <= at),
                             key=lambda p: p.version)
        paid = max(paid_events, key=lambda p: (p.paid_through, p.version), default=None)
        rows += _subscription_rows(entries, paid, catalog)
        ids = sorted([*((e.version, e.version.event_id) for e in entries),
                      *((p.version, p.version.event_id) for p in paid_events)])
        evidence[f"subscription:{sub_id}"] = tuple(dict.fromkeys(event_id for _, event_id in ids))
    for grant in sorted(history.grants, key=lambda g: (g.source_type, g.source_id)):
        plan = catalog.plans.get(grant.plan_id)
        subject = _subject(plan, grant.user_id, grant.family_id) if plan else None
        if plan is None or subject is None or grant.granted_at > at:
            continue
        rows += [
            SubjectRow(subject[0], subject[1], f.code, grant.source_type, grant.source_id, plan.id, "active", "full",
                       f.limit, f.period, f.enforcement, None, grant.version, None, None)
            for f in plan.features.values()
        ]
        evidence[f"{grant.source_type}:{grant.source_id}"] = (grant.version.event_id,)
    return Moment(tuple(rows), evidence)
