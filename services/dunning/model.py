"""Rows of the dunning projection and what a handler returns.

Times are Unix seconds (int), as on the bus; the repository converts them to timestamptz.
Rows are frozen values: a handler reads a `State` and returns an `Outcome` (new versions
of cases plus the notices that the live side publishes on dunning-events).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# States in which the scheduler acts on a case (retry or escalate).
SCHEDULED_STATES = frozenset({"open", "retrying"})
# States that no webhook about a failure moves any more.
FINAL_STATES = frozenset({"escalated", "recovered", "closed"})

# Event types that the dunning scheduler publishes on payment-events (source DUNNING).
ATTEMPT_MADE = "dunning.attempt_made"
ESCALATED = "dunning.escalated"
RESTORED = "dunning.restored"


@dataclass(frozen=True, order=True, slots=True)
class Version:
    """The ordering key of events: `created`, then the event id to break ties."""

    created: int
    event_id: str


@dataclass(frozen=True, slots=True)
class Case:
    """One dunning case: a failed invoice being recovered. Keyed by invoice (case_id derives
    from it, so a replay names every case the same)."""

    case_id: str
    invoice_id: str
    customer_id: str
    subscription_id: str | None
    user_id: str | None
    family_id: str | None
    plan_id: str | None
    price_id: str | None
    state: str
    attempt_count: int  # retries the scheduler made (not Stripe's own attempts)
    next_attempt_at: int | None  # the next retry, or the escalation once retries ran out
    last_error: str | None
    amount_due: int | None
    currency: str | None
    opened_at: int  # the first failure: the retry schedule counts from it
    closed_at: int | None
    last_attempt_at: int | None
    escalated_at: int | None
    restored_at: int | None
    version: Version  # the newest event that decided `state`


@dataclass(frozen=True, slots=True)
class Notice:
    """One step to announce on dunning-events (payment.v1.DunningEvent), made from the case
    as it is after the step. `source_event_id` makes the notice's id stable."""

    kind: str  # a DunningEvent.Kind name: CASE_OPENED, RETRY_SCHEDULED, ...
    case: Case
    source_event_id: str
    created: int


@dataclass(frozen=True, slots=True)
class Outcome:
    cases: tuple[Case, ...] = ()
    notices: tuple[Notice, ...] = ()


@dataclass
class State:
    """The cases a batch can touch, by invoice id; mutated only by `apply`."""

    cases: dict[str, Case] = field(default_factory=dict)

    def copy(self) -> State:
        return State(dict(self.cases))

    def of_subscription(self, subscription_id: str) -> list[Case]:
        return sorted(
            (c for c in self.cases.values() if c.subscription_id == subscription_id),
            key=lambda c: c.case_id,
        )

    def apply(self, cases: Iterable[Case]) -> None:
        for case in cases:
            self.cases[case.invoice_id] = case
