"""The usage domain, free of I/O: periods, the policy a subject has for a feature, the
Redis key layout, the idempotency record, the answer of an increment and its event.

Everything here is a plain function of its arguments (the clock is passed in), so the
API, the worker and the cache rebuild agree on periods and keys by construction.
"""

from __future__ import annotations

import calendar
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson

from payment.v1 import events_pb2

# period `none` (a count held at once: projects, seats) has one everlasting period.
# Its end is the last day Python's datetime can still read back from Postgres.
NONE_START = 0
NONE_END = 253_402_214_400  # 9999-12-31T00:00:00Z
MAX_AMOUNT = 2**53  # beyond this, Lua's doubles in Redis stop being exact
UNLIMITED = -1


@dataclass(frozen=True, slots=True)
class Period:
    start: int  # Unix seconds, inclusive
    end: int  # Unix seconds, exclusive


def calendar_month(now: float) -> Period:
    t = datetime.fromtimestamp(now, UTC)
    start = datetime(t.year, t.month, 1, tzinfo=UTC)
    days = calendar.monthrange(t.year, t.month)[1]
    return Period(int(start.timestamp()), int(start.timestamp()) + days * 86_400)


def calendar_day(now: float) -> Period:
    start = int(now) - int(now) % 86_400
    return Period(start, start + 86_400)


def billing_period(now: float, start: int | None, end: int | None) -> Period:
    """The subscription's current period; rolled forward by its length while its renewal
    has not been projected yet; the calendar month when the subject has none (free plan)."""
    if start is None or end is None or end <= start:
        return calendar_month(now)
    length = end - start
    if now >= end:
        skipped = int((now - end) // length) + 1
        start, end = start + skipped * length, end + skipped * length
    elif now < start:  # a period that has not begun: count against the one before it
        skipped = int((start - now) // length) + 1
        start, end = start - skipped * length, end - skipped * length
    return Period(start, end)


def period_for(limit_period: str, now: float, sub_start: int | None = None, sub_end: int | None = None) -> Period:
    if limit_period == "day":
        return calendar_day(now)
    if limit_period == "month":
        return calendar_month(now)
    if limit_period == "billing_period":
        return billing_period(now, sub_start, sub_end)
    return Period(NONE_START, NONE_END)


@dataclass(frozen=True, slots=True)
class Policy:
    """How one subject's use of one feature is counted and limited, now.

    `pool` is whose counter is charged: the family for a family-pool plan, else the user
    (or the family when no user is named). `member` is the user whose member counter is
    kept inside a family pool (None otherwise); `member_cap` limits it.
    """

    feature_code: str
    plan_id: str
    pool_type: str
    pool_id: str
    member: str | None
    limit: int  # UNLIMITED (-1) or >= 0
    hard: bool
    allow_release: bool
    member_cap: int  # UNLIMITED (-1) or >= 0
    period: Period
    user_id: str = ""
    family_id: str = ""


# ---------------------------------------------------------------- Redis keys


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = ""

    @property
    def ready(self) -> str:
        """Exists iff the counters are complete (written by the rebuild). Without it,
        Redis was emptied or restarted: increments are refused, quotas read Postgres."""
        return f"{self.prefix}usage:ready"

    @property
    def rebuild_lease(self) -> str:
        """Held (a random token, with an expiry) by the one rebuild allowed to run."""
        return f"{self.prefix}usage:rebuild:lease"

    def counter(self, pool_type: str, pool_id: str, feature_code: str, period_start: int) -> str:
        return f"{self.prefix}usage:c:{pool_type}:{pool_id}:{feature_code}:{period_start}"

    def member(self, family_id: str, user_id: str, feature_code: str, period_start: int) -> str:
        return f"{self.prefix}usage:m:{family_id}:{user_id}:{feature_code}:{period_start}"

    def idempotency(self, idempotency_key: str) -> str:
        return f"{self.prefix}usage:idem:{idempotency_key}"

    def of(self, policy: Policy) -> tuple[str, str | None]:
        counter = self.counter(policy.pool_type, policy.pool_id, policy.feature_code, policy.period.start)
        member = None
        if policy.member is not None:
            member = self.member(policy.pool_id, policy.member, policy.feature_code, policy.period.start)
        return counter, member


def counter_ttl_s(period: Period, now: float) -> int:
    """Counters of a bounded period outlive it by 40 days (late reads); `none` never expires."""
    if period.end >= NONE_END:
        return 0
    return max(60, int(period.end - now) + 40 * 86_400)


# ---------------------------------------------------------------- the idempotency record


@dataclass(frozen=True, slots=True)
class Request:
    """What an IncrementUsage call asked, with the policy it was judged by. Stored in the
    idempotency record, so a retry can rebuild the answer and the very same event."""

    idempotency_key: str
    policy: Policy
    amount: int
    created_ms: int
    metadata: Mapping[str, str] = field(default_factory=dict)

    def context(self) -> bytes:
        p = self.policy
        metadata = self.metadata
        return orjson.dumps({
            "k": self.idempotency_key, "f": p.feature_code, "pl": p.plan_id, "st": p.pool_type,
            "sid": p.pool_id, "m": p.member, "u": p.user_id, "fa": p.family_id, "l": p.limit,
            "h": p.hard, "r": p.allow_release, "cap": p.member_cap, "ps": p.period.start,
            "pe": p.period.end, "a": self.amount, "c": self.created_ms,
            "md": metadata if type(metadata) is dict else dict(metadata),  # orjson takes a dict, not any Mapping
        })

    @classmethod
    def from_context(cls, raw: bytes) -> Request:
        d = orjson.loads(raw)
        policy = Policy(
            d["f"], d["pl"], d["st"], d["sid"], d["m"], d["l"], d["h"], d["r"], d["cap"],
            Period(d["ps"], d["pe"]), d["u"], d["fa"],
        )
        return cls(d["k"], policy, d["a"], d["c"], d["md"])


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the increment script decided (or decided the first time, for a retry)."""

    allowed: bool
    used: int  # the pool's counter after the step
    applied: int  # what was added (0 when denied; a release is clamped at zero)
    member_used: int
    done: bool  # the record needs no publish any more (denied, nothing applied, or confirmed)
    request: Request


def parse_record(record: bytes, request: Request | None = None) -> Outcome:
    """A record as the Lua script stores it: `state|allowed|used|applied|member_used|context`,
    state P (published? not known yet) or D (done).

    `request`: the Request whose `context()` the record holds, when the caller has it (the
    script's answer to a new step stores the context it was given): decoding it again
    would only rebuild an equal Request. A replayed record is decoded (None)."""
    state, allowed, used, applied, member_used, context = record.split(b"|", 5)
    return Outcome(
        allowed == b"1", int(used), int(applied), int(member_used), state == b"D",
        request if request is not None else Request.from_context(context),
    )


def done_record(outcome: Outcome) -> bytes:
    """The record of an increment known to be durable (used by confirm and the rebuild)."""
    fields = [b"D", b"1" if outcome.allowed else b"0", str(outcome.used).encode(), str(outcome.applied).encode(),
              str(outcome.member_used).encode(), outcome.request.context()]
    return b"|".join(fields)


# ---------------------------------------------------------------- answers and events


@dataclass(frozen=True, slots=True)
class Answer:
    allowed: bool
    used: int
    limit: int
    remaining: int
    over_soft_limit: bool
    overage: int
    period: Period
    hard: bool


def remaining(limit: int, used: int, member_cap: int = UNLIMITED, member_used: int = 0) -> int:
    """What may still be added: -1 when nothing limits it, never below zero."""
    room = [limit - used] if limit >= 0 else []
    if member_cap >= 0:
        room.append(member_cap - member_used)
    return max(0, min(room)) if room else UNLIMITED


def over_soft_limit(policy: Policy, used: int) -> bool:
    return not policy.hard and policy.limit >= 0 and used > policy.limit


def answer(outcome: Outcome) -> Answer:
    p = outcome.request.policy
    over = over_soft_limit(p, outcome.used)
    return Answer(
        allowed=outcome.allowed,
        used=outcome.used,
        limit=p.limit,
        remaining=remaining(p.limit, outcome.used, p.member_cap, outcome.member_used),
        over_soft_limit=over,
        overage=max(0, outcome.used - p.limit) if over else 0,
        period=p.period,
        hard=p.hard,
    )


def outcome_label(outcome: Outcome, answered: Answer | None = None) -> str:
    """`answered`: `answer(outcome)`, when the caller has it already (it is built per call)."""
    if not outcome.allowed:
        return "denied"
    if (answered or answer(outcome)).over_soft_limit:
        return "over_soft_limit"
    return "released" if outcome.request.amount < 0 else "allowed"


# sha256 with `usage\0` already fed: copying it is cheaper than a new hash object (with
# OpenSSL 3 a constructor fetches the algorithm each time), and the digest is the same.
_USAGE_PREFIX = hashlib.sha256(b"usage\x00")


def event_id_for(idempotency_key: str) -> str:
    """Deterministic: a republished increment carries the same id, and the worker's inbox
    drops the copy. The id is a contract: `usage_` + the first 32 hex digits of
    sha256(b"usage\0" + the key in UTF-8); it must never change."""
    digest = _USAGE_PREFIX.copy()
    digest.update(idempotency_key.encode())
    return "usage_" + digest.hexdigest()[:32]


def usage_event(outcome: Outcome) -> events_pb2.UsageEvent:
    r = outcome.request
    p = r.policy
    return events_pb2.UsageEvent(
        event_id=event_id_for(r.idempotency_key),
        idempotency_key=r.idempotency_key,
        subject_type=p.pool_type,
        subject_id=p.pool_id,
        user_id=p.member or p.user_id,
        family_id=p.family_id,
        feature_code=p.feature_code,
        amount=outcome.applied,
        period_start=p.period.start,
        period_end=p.period.end,
        created_ms=r.created_ms,
        metadata=r.metadata or None,  # copied into the message; None: no map to build for none
        used_after=outcome.used,
        limit=p.limit,
        over_soft_limit=over_soft_limit(p, outcome.used),
        plan_id=p.plan_id,
        member_cap=p.member_cap if p.member is not None and p.member_cap >= 0 else None,
    )


def needs_publish(outcome: Outcome) -> bool:
    return outcome.allowed and outcome.applied != 0 and not outcome.done
