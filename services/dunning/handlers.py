"""Pure handlers of the dunning projection: (event, state, catalog) -> Outcome.

No I/O and no clock: every time written comes from an event's `created`, so replaying
payment-events rebuilds identical cases. A handler raises `InvalidEvent` for an event it
can never apply; the projection dead-letters it.

The life of a case (one per invoice)
------------------------------------
* invoice.payment_failed opens the case (`open`), or moves an `open`/`retrying`/
  `action_required` case back to automatic retries (`retrying` once we retried).
* invoice.payment_action_required needs the customer (3-D Secure, ...): `action_required`,
  no automatic retry until a later failure or payment.
* dunning.attempt_made (the scheduler retried) counts the attempt: `retrying`.
* dunning.escalated (retries ran out, grace over): `escalated`; access drops through the
  entitlements worker, which applies the same event. Retries go on at a slow pace
  (`next_attempt_at`), and further dunning.attempt_made keep the case `escalated`.
* invoice.paid / invoice.payment_succeeded: `recovered` from any state, closed_at set.
  dunning.restored (the scheduler gave back access after an escalated case recovered)
  records restored_at.
* customer.subscription.deleted: every unfinished case of the subscription is `closed`.

The schedule (`next_attempt_at`) is a function of the case alone: retry N is due
`retry_after_days[N-1]` days after the first failure (opened_at); after the last retry,
escalation is due `grace_days` after it (if the policy escalates). It is recomputed
whenever its inputs change, so a late, older failure that moves opened_at earlier also
moves the schedule.

Ordering rules
--------------
* Facts fill if missing (subscription, user, family, plan, price, amount, currency);
  opened_at is a minimum; attempt_count only grows (duplicated attempt events are no-ops).
* State and last_error come from the newest event (`Version` = (created, event_id)): a
  failure webhook older than the case's last change (e.g. the one that preceded a retry,
  delivered late) fills facts but moves nothing.
* A payment is final: recovered wins over every other state, whatever the order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from payment.v1 import events_pb2
from services.dunning.model import (
    ATTEMPT_MADE,
    ESCALATED,
    FINAL_STATES,
    RESTORED,
    SCHEDULED_STATES,
    Case,
    Notice,
    Outcome,
    State,
    Version,
)
from shared.catalog import SECONDS_PER_DAY, Catalog, DunningPolicy

Event = events_pb2.PaymentEvent
Handler = Callable[[Event, State, Catalog], Outcome]
MAX_TIME = 253_402_300_799  # the last second the repository (datetime) can hold


class InvalidEvent(ValueError):
    """The event can never be applied (bad data); retrying cannot help."""


def apply(event: Event, state: State, catalog: Catalog) -> Outcome:
    """The cases `event` changes and the notices it causes. Unknown types change nothing."""
    handler = HANDLERS.get(event.event_type)
    return handler(event, state, catalog) if handler else Outcome()


def case_id_for(invoice_id: str) -> str:
    return f"dc_{invoice_id}"


# ---------------------------------------------------------------- policy and schedule


def policy_for(case: Case, catalog: Catalog) -> DunningPolicy:
    """The dunning policy of the case's plan; the default plan's when the plan is unknown."""
    plan = catalog.plans.get(case.plan_id) if case.plan_id else None
    return (plan or catalog.default_plan).dunning


def retries_left(case: Case, policy: DunningPolicy) -> bool:
    return case.attempt_count < len(policy.retry_after_days)


def next_attempt_at(case: Case, policy: DunningPolicy) -> int | None:
    """When the scheduler should act next on `case`: a retry, or else the escalation.

    An escalated case is still retried, every `grace_days` (at least daily), so that a
    customer who fixed their card gets access back without a support ticket; unless the
    escalation canceled the subscription.
    """
    if case.state == "escalated":
        if policy.escalate_to == "canceled":
            return None
        since = max(case.last_attempt_at or 0, case.escalated_at or 0)
        return since + max(policy.grace_days, 1) * SECONDS_PER_DAY
    if case.state not in SCHEDULED_STATES:
        return None
    days = policy.retry_after_days
    if case.attempt_count < len(days):
        return case.opened_at + days[case.attempt_count] * SECONDS_PER_DAY
    if not policy.escalate_after_last:
        return None
    return (case.last_attempt_at or case.opened_at) + policy.grace_days * SECONDS_PER_DAY


def _scheduled(case: Case, catalog: Catalog) -> Case:
    return replace(case, next_attempt_at=next_attempt_at(case, policy_for(case, catalog)))


# ---------------------------------------------------------------- invoices


def on_invoice_failed(event: Event, state: State, catalog: Catalog) -> Outcome:
    """invoice.payment_failed / invoice.payment_action_required: open or update the case."""
    version = _version(event)
    needs_customer = event.event_type == "invoice.payment_action_required"
    seen = _seen_case(event, catalog, version, needs_customer)
    stored = state.cases.get(seen.invoice_id)
    if stored is None:
        case = _scheduled(seen, catalog)
        kinds = ["CASE_OPENED"] if needs_customer else ["CASE_OPENED", "RETRY_SCHEDULED"]
        return _outcome(case, kinds, event)
    case = _filled(stored, seen)
    if case.state in FINAL_STATES or version <= stored.version:
        return _changed(stored, _scheduled(case, catalog), [], event)
    state_now = "action_required" if needs_customer else _automatic_state(case)
    case = _scheduled(
        replace(case, state=state_now, last_error=seen.last_error, version=version), catalog
    )
    kinds = ["ATTEMPT_FAILED"]
    if case.state in SCHEDULED_STATES and retries_left(case, policy_for(case, catalog)):
        kinds.append("RETRY_SCHEDULED")
    return _changed(stored, case, kinds, event)


def on_invoice_paid(event: Event, state: State, catalog: Catalog) -> Outcome:
    """invoice.paid / invoice.payment_succeeded: the case recovers. An invoice without a
    case (the usual, paid the first time) opens nothing."""
    stored = state.cases.get(event.invoice_id)
    if stored is None or stored.state == "recovered":
        return Outcome()
    version = _version(event)
    case = replace(
        stored,
        state="recovered",
        closed_at=version.created,
        next_attempt_at=None,
        last_error=None,
        version=max(stored.version, version),
    )
    return _outcome(case, ["RECOVERED"], event)


def on_subscription_deleted(event: Event, state: State, catalog: Catalog) -> Outcome:
    """customer.subscription.deleted: close the unfinished cases of the subscription."""
    if not event.subscription_id:
        return Outcome()
    version = _version(event)
    cases, notices = [], []
    for stored in state.of_subscription(event.subscription_id):
        if stored.state in ("recovered", "closed"):
            continue
        case = replace(
            stored,
            state="closed",
            closed_at=version.created,
            next_attempt_at=None,
            version=max(stored.version, version),
        )
        cases.append(case)
        notices.append(Notice("CLOSED", case, event.event_id, version.created))
    return Outcome(tuple(cases), tuple(notices))


# ---------------------------------------------------------------- the scheduler's decisions


def on_attempt_made(event: Event, state: State, catalog: Catalog) -> Outcome:
    """dunning.attempt_made: retry number `attempt_count` was made at `created`."""
    stored = state.cases.get(event.invoice_id)
    if stored is None or event.attempt_count <= stored.attempt_count:
        return Outcome()  # a duplicate or a stale attempt: the count only grows
    version = _version(event)
    case = replace(stored, attempt_count=event.attempt_count, last_attempt_at=version.created)
    newer = version > stored.version
    if newer and event.failure_message:  # Stripe's immediate answer, until a webhook says more
        case = replace(case, last_error=event.failure_message)
    if case.state in SCHEDULED_STATES or case.state == "action_required":
        case = replace(case, state="retrying", version=max(stored.version, version))
    return _changed(stored, _scheduled(case, catalog), [], event)


def on_escalated(event: Event, state: State, catalog: Catalog) -> Outcome:
    """dunning.escalated: the case escalates (if it is still unpaid); escalated_at is
    recorded in any case, so that access is restored if a payment came in between."""
    stored = state.cases.get(event.invoice_id)
    if stored is None or stored.escalated_at is not None:
        return Outcome()
    version = _version(event)
    case = replace(stored, escalated_at=version.created)
    if case.state not in ("recovered", "closed"):
        case = replace(case, state="escalated", version=max(stored.version, version))
    return _changed(stored, _scheduled(case, catalog), [], event)


def on_restored(event: Event, state: State, catalog: Catalog) -> Outcome:
    """dunning.restored: access was given back after the escalated case recovered."""
    stored = state.cases.get(event.invoice_id)
    if stored is None or stored.restored_at is not None:
        return Outcome()
    return _changed(stored, replace(stored, restored_at=_version(event).created), [], event)


# ---------------------------------------------------------------- helpers


def _seen_case(event: Event, catalog: Catalog, version: Version, needs_customer: bool) -> Case:
    """The case as this one event describes it."""
    if not event.invoice_id:
        raise InvalidEvent(f"{event.event_type} without invoice_id")
    if event.amount < 0:
        raise InvalidEvent("a negative amount due")
    plan = catalog.plan_for_price(event.price_id) if event.price_id else None
    error = event.failure_message or event.failure_code or None
    return Case(
        case_id=case_id_for(event.invoice_id),
        invoice_id=event.invoice_id,
        customer_id=event.customer_id,
        subscription_id=event.subscription_id or None,
        user_id=event.user_id or None,
        family_id=event.family_id or None,
        plan_id=plan.id if plan else (event.plan_id or None),
        price_id=event.price_id or None,
        state="action_required" if needs_customer else "open",
        attempt_count=0,
        next_attempt_at=None,
        last_error=("action required: " + (error or "authentication needed"))
        if needs_customer
        else error,
        amount_due=event.amount,
        currency=event.currency.lower() or None,
        opened_at=version.created,
        closed_at=None,
        last_attempt_at=None,
        escalated_at=None,
        restored_at=None,
        version=version,
    )


def _filled(stored: Case, seen: Case) -> Case:
    """Facts fill if missing; opened_at is the earliest failure."""
    return replace(
        stored,
        subscription_id=stored.subscription_id or seen.subscription_id,
        user_id=stored.user_id or seen.user_id,
        family_id=stored.family_id or seen.family_id,
        plan_id=stored.plan_id or seen.plan_id,
        price_id=stored.price_id or seen.price_id,
        amount_due=stored.amount_due if stored.amount_due is not None else seen.amount_due,
        currency=stored.currency or seen.currency,
        opened_at=min(stored.opened_at, seen.opened_at),
    )


def _automatic_state(case: Case) -> str:
    return "retrying" if case.attempt_count else "open"


def _outcome(case: Case, kinds: list[str], event: Event) -> Outcome:
    notices = tuple(Notice(kind, case, event.event_id, event.created) for kind in kinds)
    return Outcome((case,), notices)


def _changed(stored: Case, case: Case, kinds: list[str], event: Event) -> Outcome:
    """Nothing when the case did not change (a duplicate); else the case and its notices."""
    if case == stored:
        return Outcome()
    return _outcome(case, kinds, event)


def _version(event: Event) -> Version:
    if not 0 <= event.created <= MAX_TIME:
        raise InvalidEvent(f"created {event.created} is out of range")
    return Version(event.created, event.event_id)


HANDLERS: dict[str, Handler] = {
    "invoice.payment_failed": on_invoice_failed,
    "invoice.payment_action_required": on_invoice_failed,
    "invoice.paid": on_invoice_paid,
    "invoice.payment_succeeded": on_invoice_paid,
    "customer.subscription.deleted": on_subscription_deleted,
    ATTEMPT_MADE: on_attempt_made,
    ESCALATED: on_escalated,
    RESTORED: on_restored,
}
