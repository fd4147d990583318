"""The entitlements read model: the one contract between its writer (the entitlements
worker, services/entitlements) and its readers (services/api_grpc).

Here and only here: the Redis key layout, TTL and change channel; the row type of a
subject's entitlements and the one query that reads them; and the answer built from
those rows, including what applies once a grace period ends, so that no reader
re-derives policy. The writer stores these answers in Redis; a reader that misses Redis
reads the rows with `read_subjects` and builds the same answer with `subject_hash`.

Redis layout:

* key `{prefix}ent:{subject_type}:{subject_id}`, a hash with a TTL of REDIS_TTL_S;
* field `<feature_code>`: compact JSON `{"allowed", "status", "access_level", "plan_id",
  "expires_at", "usage_limit", "limit_period", "enforcement", "decided_by_event_id",
  "source", "grace_until", "after_grace", "level_after_grace", "rule", "plan_version"}` for the best row of that feature (an allowed
  one first, then the highest limit, the latest expiry, the newest event). Readers must
  still check `expires_at` (Unix seconds or null) against their clock, and once
  `grace_until` has passed treat the status as `after_grace` ("active"/"suspended")
  and the access level as `level_after_grace`;
* field `_watermark`: `{"created", "event_id"}` of the newest event behind the hash;
* channel `{prefix}ent:changes`: the keys of each written batch, newline-separated.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from psycopg import AsyncConnection
from psycopg.rows import tuple_row

from shared.catalog import SECONDS_PER_DAY, Catalog, Plan
from shared.sqlfile import load_queries
from shared.values import ordered_value, value

REDIS_TTL_S = 24 * 3600
WATERMARK_FIELD = "_watermark"
CHANGES_CHANNEL = "ent:changes"

SubjectKey = tuple[str, str]  # (subject_type, subject_id)
Row = tuple[Any, ...]
_QUERIES = load_queries(Path(__file__).resolve().parent / "sql" / "entitlements.sql")


@ordered_value
class Version:
    """The ordering key of events: Stripe's `created`, then the event id to break ties.

    A row remembers the version of the newest event that decided its mutable state;
    an event with a lower version never overwrites that state.
    """

    created: int
    event_id: str


@value
class SubjectRow:
    """One entitlement row of a subject, with its subscription's status (if any)."""

    subject_type: str
    subject_id: str
    feature_code: str
    source_type: str
    source_id: str
    plan_id: str
    status: str
    access_level: str
    usage_limit: int | None
    limit_period: str
    enforcement: str
    expires_at: int | None
    version: Version
    subscription_status: str | None
    status_since: int | None


async def read_subjects(
    conn: AsyncConnection[Any], subjects: Collection[SubjectKey]
) -> list[SubjectRow]:
    """Every entitlement row of `subjects`, in one query."""
    if not subjects:
        return []
    async with conn.cursor(row_factory=tuple_row) as cursor:
        await cursor.execute(_QUERIES["subject_entitlements"], subject_params(subjects))
        return [_subject_row(row) for row in await cursor.fetchall()]


def _subject_row(row: Row) -> SubjectRow:
    return SubjectRow(*(*row[:12], Version(row[12], row[13]), row[14], row[15]))


def subject_params(subjects: Collection[SubjectKey]) -> dict[str, list[str]]:
    ordered = sorted(subjects)
    return {"subject_types": [s[0] for s in ordered], "subject_ids": [s[1] for s in ordered]}


# ---------------------------------------------------------------- answers


def changes_channel(prefix: str) -> str:
    """The pub/sub channel of the change feed (see the module docstring)."""
    return f"{prefix}{CHANGES_CHANNEL}"


def redis_key(prefix: str, subject: SubjectKey) -> str:
    return f"{prefix}ent:{subject[0]}:{subject[1]}"


def redis_answers(
    rows: Sequence[SubjectRow], subjects: Collection[SubjectKey], catalog: Catalog, prefix: str = ""
) -> dict[str, dict[str, bytes]]:
    """Redis key -> hash fields for each subject; {} for a subject without rows."""
    by_subject: dict[SubjectKey, list[SubjectRow]] = defaultdict(list)
    for row in rows:
        by_subject[(row.subject_type, row.subject_id)].append(row)
    return {
        redis_key(prefix, s): subject_hash(by_subject.get(s, []), catalog) for s in sorted(subjects)
    }


def parse_hash(raw: Mapping[bytes, bytes] | None) -> dict[str, Any] | None:
    """A hash as read from Redis -> feature_code -> answer (and `_watermark`); None when
    absent or incomplete (no watermark: not written by the worker as a whole)."""
    if not raw or WATERMARK_FIELD.encode() not in raw:
        return None
    return {k.decode(): orjson.loads(v) for k, v in raw.items()}


def subject_hash(rows: Sequence[SubjectRow], catalog: Catalog) -> dict[str, bytes]:
    """feature_code -> JSON answer of its best row, plus the watermark."""
    if not rows:
        return {}
    best: dict[str, SubjectRow] = {}
    for row in rows:
        known = best.get(row.feature_code)
        best[row.feature_code] = row if known is None else max(known, row, key=_rank)
    fields = {code: orjson.dumps(answer(row, catalog)) for code, row in sorted(best.items())}
    newest = max(row.version for row in rows)
    fields[WATERMARK_FIELD] = orjson.dumps({"created": newest.created, "event_id": newest.event_id})
    return fields


def _allowed(row: SubjectRow) -> bool:
    return row.status == "active" and row.access_level != "blocked"


def _rank(row: SubjectRow) -> tuple[bool, float, float, Any]:
    limit = math.inf if row.usage_limit is None else row.usage_limit
    expires = math.inf if row.expires_at is None else row.expires_at
    return (_allowed(row), limit, expires, row.version)


def answer(row: SubjectRow, catalog: Catalog) -> dict[str, Any]:
    """The JSON answer for one feature of a subject (see the module docstring)."""
    grace_until, after_grace, level_after_grace = _grace(row, catalog)
    plan = catalog.plans.get(row.plan_id)
    return {
        "allowed": _allowed(row),
        "status": row.status,
        "access_level": row.access_level,
        "plan_id": row.plan_id,
        "expires_at": row.expires_at,
        "usage_limit": row.usage_limit,
        "limit_period": row.limit_period,
        "enforcement": row.enforcement,
        "decided_by_event_id": row.version.event_id,
        "source": f"{row.source_type}:{row.source_id}",
        "grace_until": grace_until,
        "after_grace": after_grace,
        "level_after_grace": level_after_grace,
        "rule": rule_text(row, plan),
        "plan_version": plan_version(plan) if plan is not None else "",
    }


def rule_text(row: SubjectRow, plan: Plan | None) -> str:
    """The catalog rule that decided the row, machine-readable and stable:
    `<subscription status>: <level>` or `<status>: grace <n> days, then <level>` (the plan's
    access policy), `; <feature> needs <min_access>` when the level lacks the feature,
    `one_time: full` for a one-time purchase, `<status>: revoked` for a feature the
    subscription ended or a later plan lacks."""
    if row.source_type != "subscription":
        return "one_time: full"
    status = row.subscription_status or ""
    if row.status == "revoked":
        return f"{status}: revoked"
    rule = plan.access_policy.get(status) if plan is not None else None  # type: ignore[call-overload]
    if rule is None:
        return f"{status}: not in the access policy, blocked"
    text = f"{status}: grace {rule.grace_days} days, then {rule.then}" if rule.grace_days else f"{status}: {rule.level}"
    feature = plan.features.get(row.feature_code) if plan is not None else None
    if row.status == "suspended" and feature is not None:
        text += f"; {row.feature_code} needs {feature.min_access}"
    return text


_PLAN_VERSIONS: dict[int, tuple[Plan, str]] = {}


def plan_version(plan: Plan) -> str:
    """A content hash of the plan's effective definition (features, limits, policies):
    which version of the plan decided, since the catalog has no version numbers."""
    known = _PLAN_VERSIONS.get(id(plan))
    if known is not None and known[0] is plan:
        return known[1]
    version = "sha256:" + hashlib.sha256(plan.model_dump_json().encode()).hexdigest()[:16]
    _PLAN_VERSIONS[id(plan)] = (plan, version)
    return version


def _grace(row: SubjectRow, catalog: Catalog) -> tuple[int | None, str | None, str | None]:
    """When the grace period of the row's subscription ends, the row's status then, and
    the access level then (the `then` of the subscription's own rule): decided here, by
    the writer, so that no reader guesses the rule."""
    plan = catalog.plans.get(row.plan_id)
    if row.access_level != "grace" or row.status_since is None or plan is None:
        return None, None, None
    rule = plan.access_policy.get(row.subscription_status)  # type: ignore[call-overload]
    if rule is None or not rule.grace_days:
        return None, None, None
    level = rule.then or "blocked"
    then = {f.code for f in plan.features_at(level)}
    after = "active" if row.feature_code in then else "suspended"
    return row.status_since + rule.grace_days * SECONDS_PER_DAY, after, level
