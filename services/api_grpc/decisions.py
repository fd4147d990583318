"""The entitlement decision: pure functions from the projection's answers, the catalog
and the clock to "allowed or denied, and why". No I/O.

The answers are the JSON documents of services/entitlements/projection.py (one per
feature of a subject, the same whether read from Redis or built from Postgres rows).
They are what the worker last decided; the reader still applies its clock:

* `expires_at` (Unix seconds) in the past: denied, reason `expired`;
* `grace_until` in the past: the status becomes `after_grace` (`active` or
  `suspended`) and the access level drops to the plan's `then` level;
* a subject without an allowed entitlement for the feature falls back to the catalog's
  default (free) plan: allowed with reason `free_plan` when that plan has the feature,
  explained by the refused answer (its event, rule, clock and grace_until).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from domain.entitlements import plan_version
from services.api_grpc.errors import InvalidArgument
from shared.catalog import Catalog, Feature

Answer = Mapping[str, Any]


class Decision(NamedTuple):
    """One feature of one subject, as CheckEntitlementResponse carries it.

    A named tuple, not a dataclass: a bulk answer keys its kept results by decision
    (servicer.BulkResults), and a tuple's hash and equality run in C, where a frozen
    dataclass's are generated Python (8 % of a bulk call's samples)."""

    allowed: bool
    reason: str
    plan_id: str
    status: str
    expires_at: int
    access_level: str
    decided_by_event_id: str
    usage_limit: int
    limit_period: str
    # The explanation (proto Explanation): the catalog rule, the plan's version, the
    # source that decided and how the clock changed the stored answer.
    rule: str = ""
    plan_version: str = ""
    source: str = ""
    clock: str = ""
    grace_until: int = 0


@dataclass(frozen=True)
class Facts:
    """What the decision needs of the catalog, computed once per process."""

    catalog: Catalog
    known: frozenset[str]
    metered: frozenset[str]
    # The default plan's answer per feature it has (free_plan), built once: it depends
    # on the catalog alone. No default: a Facts without it would never fall back.
    free: Mapping[str, Decision]

    @classmethod
    def of(cls, catalog: Catalog) -> Facts:
        known, metered = known_features(catalog), metered_features(catalog)
        free = {code: d for code in known if (d := free_plan(catalog, code, metered)) is not None}
        return cls(catalog, known, metered, free)


def known_features(catalog: Catalog) -> frozenset[str]:
    return frozenset(code for plan in catalog.plans.values() for code in plan.features)


def metered_features(catalog: Catalog) -> frozenset[str]:
    return frozenset(
        code
        for plan in catalog.plans.values()
        for code, feature in plan.features.items()
        if feature.metered
    )


def require_known(feature_code: str, known: frozenset[str]) -> str:
    """INVALID_ARGUMENT for a feature code that no plan of the catalog grants."""
    if not feature_code:
        raise InvalidArgument("feature_code is required")
    if feature_code not in known:
        raise InvalidArgument(f"unknown feature_code {feature_code!r}: no plan of the catalog has it")
    return feature_code


def wire_limit(limit: int | None, feature_code: str, metered: frozenset[str]) -> int:
    """The proto's convention: -1 unlimited, 0 when the feature has no limit at all."""
    if limit is not None:
        return limit
    return -1 if feature_code in metered else 0


def decide(
    answers: Sequence[Answer | None], feature_code: str, facts: Facts, now: float
) -> Decision:
    """The decision for `feature_code` given the answers of each of the subject's keys
    (user, family; None where there is none). The best allowed answer wins."""
    catalog, metered = facts.catalog, facts.metered
    first: Decision | None = None  # the first answer's decision, allowed or not
    best: Decision | None = None  # the first of the best allowed ones
    for answer in answers:
        if answer is None:
            continue
        decision = evaluate(answer, feature_code, catalog, now, metered)
        if first is None:
            first = decision
        if decision.allowed and (best is None or _rank(decision) > _rank(best)):
            best = decision
    if best is not None:
        return best
    fallback = facts.free.get(feature_code)
    if fallback is not None:
        # Keep what took the paid access away (its event, rule, clock and grace
        # period): it explains the downgrade.
        return fallback if first is None else _after_refusal(fallback, first)
    if first is not None:
        return first
    return Decision(False, "no_entitlement", "", "", 0, "blocked", "", 0, "")


def evaluate(
    answer: Answer, feature_code: str, catalog: Catalog, now: float, metered: frozenset[str]
) -> Decision:
    """One stored answer, with the clock applied (expiry, end of grace)."""
    status = str(answer.get("status") or "")
    level = str(answer.get("access_level") or "blocked")
    allowed = bool(answer.get("allowed"))
    grace_until = answer.get("grace_until")
    clock = ""
    if grace_until is not None and now >= grace_until and answer.get("after_grace"):
        status = str(answer["after_grace"])
        level = _level_after_grace(answer)
        allowed = status == "active"
        clock = "grace_ended"
    expires_at = answer.get("expires_at")
    reason = "granted" if allowed else (status or "no_entitlement")
    if allowed and expires_at is not None and now >= expires_at:
        allowed, status, reason, clock = False, "expired", "expired", "expired"
    if allowed and level == "grace":
        reason = "grace"
    return Decision(
        allowed=allowed,
        reason=reason,
        plan_id=str(answer.get("plan_id") or ""),
        status=status,
        expires_at=int(expires_at or 0),
        access_level=level,
        decided_by_event_id=str(answer.get("decided_by_event_id") or ""),
        usage_limit=wire_limit(answer.get("usage_limit"), feature_code, metered),
        limit_period=str(answer.get("limit_period") or "none"),
        rule=str(answer.get("rule") or ""),
        plan_version=str(answer.get("plan_version") or ""),
        source=str(answer.get("source") or ""),
        clock=clock,
        grace_until=int(grace_until or 0),
    )


def free_plan(catalog: Catalog, feature_code: str, metered: frozenset[str]) -> Decision | None:
    """The default plan's answer for the feature, or None if it lacks it."""
    plan = catalog.default_plan
    feature: Feature | None = plan.features.get(feature_code)
    if feature is None:
        return None
    return Decision(
        allowed=True,
        reason="free_plan",
        plan_id=plan.id,
        status="active",
        expires_at=0,
        access_level="full",
        decided_by_event_id="",
        usage_limit=wire_limit(feature.limit, feature_code, metered),
        limit_period=feature.period,
        rule=f"default_plan: {plan.id}",
        plan_version=plan_version(plan),
    )


def _level_after_grace(answer: Answer) -> str:
    """The level a grace period drops to, as the writer decided it (domain/entitlements.py).
    An answer cached before the writer stored it (for at most REDIS_TTL_S after an
    upgrade) says only the status: its level is then "blocked" unless still active."""
    stored = answer.get("level_after_grace")
    if stored:
        return str(stored)
    return str(answer.get("access_level") or "blocked") if answer.get("after_grace") == "active" else "blocked"


def _rank(decision: Decision) -> tuple[float, float]:
    limit = math.inf if decision.usage_limit == -1 else decision.usage_limit
    expires = math.inf if decision.expires_at == 0 else decision.expires_at
    return (limit, expires)


def _after_refusal(fallback: Decision, denied: Decision) -> Decision:
    """The default plan's answer explained by the refused one, e.g. rule
    "default_plan: free (after past_due: grace 7 days, then reduced)", clock "grace_ended"."""
    rule = f"{fallback.rule} (after {denied.rule})" if denied.rule else fallback.rule
    return fallback._replace(decided_by_event_id=denied.decided_by_event_id, rule=rule,
                             clock=denied.clock, grace_until=denied.grace_until)
