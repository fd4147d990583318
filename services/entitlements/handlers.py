"""Pure handlers of the entitlements projection: (event, state, catalog) -> Changes.

No I/O and no clock: every time written comes from an event (its `created`, or a period it
reports), so replaying the log rebuilds identical rows. A handler raises `InvalidEvent`
for an event it can never apply; the projection dead-letters it.

Ordering rules
--------------
Stripe does not order its events, and a replay may interleave them differently. The
rows depend on the *set* of events applied, never on their order:

* Events are ordered by `Version` = (created, event_id). Each row keeps the version of
  the event that last decided its mutable state (`last_event_created`, `last_event_id`).
* Snapshots, newest wins: customer.subscription.* events carry the whole subscription;
  the subscriptions row holds the snapshot with the highest version. An older event is
  still added to `subscription_history`.
* Facts fill if missing: customer, user and family, amount, currency, description,
  invoice id, email. Any event may fill them, whatever its age; nothing overwrites them.
* Grow-only values: paid-through (max period end of paid invoices), amount_refunded
  (max); created_at and first_seen_at are minimums.
* Payments: status, failure and status_reason come from the newest event.
* Derived rows are pure functions of their inputs. A subscription's status_since,
  access level, access_changes and entitlement rows are recomputed from (its newest
  snapshot, its history, its paid-through, the customer's user / family, the catalog)
  whenever one of these changes, and they replace what was stored. A one-time grant's
  rows likewise. So whichever event comes last, the derivation sees the same inputs.
* A customer that gains a user or family re-derives its subscriptions and grants (an
  early subscription is granted when checkout.session.completed comes last), and its
  stored payments are backfilled by the repository.

Access levels and grace
-----------------------
The level of each history entry is `Plan.access_for(status, created - status_since)`, the
policy evaluated at the time of that event; status_since is the `created` of the first
entry of the run of entries with the same status. A subscription that turns past_due is
stored with level `grace` and its status_since. The drop to the rule's `then` level once
`grace_days` have passed is not made by a timer here: readers evaluate it (grace ends at
status_since + grace_days; the Redis answer carries `grace_until` and `after_grace`), and
the next event of the subscription (a later customer.subscription.updated, e.g. Stripe
or dunning moving it to unpaid) records it in access_changes.

Entitlements
------------
One row per (subject, feature, source). The subject is the family when the plan is a
family pool and the family is known, else the user; with neither, nothing is granted.
A subscription grants its plan's features: `active`, `suspended` when the feature is
not available at the access level (`Plan.features_at`), or `revoked` once the
subscription is canceled or incomplete_expired (revoked_at = status_since). A feature
held under an earlier plan (or subject) that the current one lacks is `revoked` at the
first history entry without it. expires_at is current_period_end when
cancel_at_period_end, cancel_at when set, else max(current_period_end, paid-through).
A price missing from the catalog grants nothing and is recorded as a catalog miss.
The default (free) plan is never stored; readers fall back to it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace

from payment.v1 import events_pb2
from services.entitlements.model import (
    NO_CURRENCY,
    PAYMENT_STATUSES,
    SUBSCRIPTION_STATUSES,
    AccessChange,
    AccessChangeSet,
    CatalogMiss,
    Changes,
    Customer,
    Derivation,
    Entitlement,
    EntitlementSet,
    HistoryEntry,
    OneTimeGrant,
    PaidPeriod,
    Payment,
    SourceKey,
    State,
    SubjectKey,
    Subscription,
    Version,
    with_entry,
)
from shared.catalog import AccessLevel, Catalog, Feature, Plan
from shared.values import value

Event = events_pb2.PaymentEvent
Handler = Callable[[Event, State, Customer | None, Catalog], Changes]

# 9999-12-31T23:59:59Z: the last second Python's datetime (and so the repository) can hold.
MAX_TIME = 253_402_300_799
TERMINAL_STATUSES = frozenset({"canceled", "incomplete_expired"})
DUNNING_STATUS_TYPES = frozenset({"dunning.escalated", "dunning.restored"})
_CURRENCY = re.compile(r"^[a-z]{3}$")


class InvalidEvent(ValueError):
    """The event can never be applied (bad data); retrying cannot help."""


def apply(event: Event, state: State, catalog: Catalog) -> Changes:
    """The changes `event` makes to `state`. Unknown event types change nothing.

    Every known event first maps its customer to the user / family it names; the
    handler of its type then sees that customer. Raises InvalidEvent for bad data.
    """
    handler = HANDLERS.get(event.event_type)
    if handler is None:
        return Changes()
    if not event.customer_id and not _guest_allowed(event):
        raise InvalidEvent(f"{event.event_type} without a customer")
    mapping, customer = _map_customer(event, state, catalog)
    return mapping.then(handler(event, state, customer, catalog))


DISPUTE_TYPES = frozenset(
    {
        "charge.dispute.created",
        "charge.dispute.updated",
        "charge.dispute.closed",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
    }
)

# Payments Stripe lets happen without a customer (Payment Links, guest checkout), and our
# own commands about them. Any other event without a customer cannot be applied.
GUEST_TYPES = frozenset(
    {
        "charge.succeeded",
        "charge.failed",
        "charge.refunded",
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment.created",
        "payment.status_updated",
        *DISPUTE_TYPES,
    }
)


def _guest_allowed(event: Event) -> bool:
    if event.event_type == "checkout.session.completed":
        return event.mode == "payment"
    return event.event_type in GUEST_TYPES


# ---------------------------------------------------------------- customers


def _map_customer(event: Event, state: State, catalog: Catalog) -> tuple[Changes, Customer | None]:
    stored = state.customers.get(event.customer_id)
    if not event.customer_id or not (event.user_id or event.family_id):
        return Changes(), stored
    version = _version(event)
    seen = Customer(
        customer_id=event.customer_id,
        user_id=event.user_id or None,
        family_id=event.family_id or None,
        email=event.customer_email or None,
        created_at=version.created,
        version=version,
    )
    customer = seen if stored is None else stored.merge(seen)
    if customer == stored:
        return Changes(), stored
    changes = Changes(customers=(customer,))
    identity = (customer.user_id, customer.family_id)
    if stored is None or (stored.user_id, stored.family_id) != identity:
        changes = changes.then(_rederive_customer(customer, state, catalog))
    return changes, customer


def _rederive_customer(customer: Customer, state: State, catalog: Catalog) -> Changes:
    """A customer gained a user or family: grant what waited for it."""
    changes = Changes(mapped_customers=(customer.customer_id,))
    for sub in state.subscriptions_of(customer.customer_id):
        paid = state.paid.get(sub.subscription_id)
        changes = changes.then(
            _subscription_changes(sub, _history(state, sub), paid, customer, state, catalog)
        )
    for grant in state.grants_of(customer.customer_id):
        changes = changes.then(derive_grant(grant, customer, catalog))
    return changes.then(Changes(payments=_backfilled_payments(customer, state)))


def _backfilled_payments(customer: Customer, state: State) -> tuple[Payment, ...]:
    """The customer's payments in the batch, with the user / family they lacked.

    The repository backfills its stored payments the same way (mapped_customers).
    """
    filled = [
        replace(
            payment,
            user_id=_fill(payment.user_id, customer.user_id),
            family_id=_fill(payment.family_id, customer.family_id),
        )
        for payment in state.payments.values()
        if payment.customer_id == customer.customer_id
    ]
    return tuple(p for p in filled if p != state.payments[p.payment_id])


def _identity_only(
    event: Event, state: State, customer: Customer | None, catalog: Catalog
) -> Changes:
    """Events that only map their customer (done by `apply` for every event)."""
    return Changes()


# ---------------------------------------------------------------- subscriptions


def on_subscription_event(
    event: Event, state: State, customer: Customer | None, catalog: Catalog
) -> Changes:
    """customer.subscription.*: record the snapshot in the history, keep the newest."""
    entry = _history_entry(event)
    stored = state.subscriptions.get(entry.subscription_id)
    user_id = _fill(stored.user_id if stored else None, event.user_id)
    family_id = _fill(stored.family_id if stored else None, event.family_id)
    if stored is None or entry.version > stored.version:
        sub = _snapshot(event, entry, user_id, family_id)
    elif (user_id, family_id) == (stored.user_id, stored.family_id):
        sub = stored
    else:
        sub = replace(stored, user_id=user_id, family_id=family_id)
    history = with_entry(
        _history(state, stored) if stored else state.history.get(entry.subscription_id, ()), entry
    )
    derived = _subscription_changes(
        sub, history, state.paid.get(sub.subscription_id), customer, state, catalog
    )
    known = catalog.plan_for_price(entry.price_id) is not None
    misses = () if known else (_miss(entry.price_id, entry.subscription_id, entry.version),)
    return Changes(history=(entry,), catalog_misses=misses).then(derived)


def on_dunning_status(
    event: Event, state: State, customer: Customer | None, catalog: Catalog
) -> Changes:
    """dunning.escalated / dunning.restored (our scheduler): the subscription's status
    becomes `event.status` (e.g. suspended, then active again) as a newer snapshot that
    keeps everything else of the stored one. An unknown subscription changes nothing."""
    stored = state.subscriptions.get(event.subscription_id)
    if stored is None or not event.status:
        return Changes()
    snapshot = Event()
    snapshot.CopyFrom(event)
    snapshot.price_id = stored.price_id
    snapshot.period_start = stored.current_period_start or 0
    snapshot.period_end = stored.current_period_end or 0
    snapshot.cancel_at_period_end = stored.cancel_at_period_end
    snapshot.cancel_at = stored.cancel_at or 0
    snapshot.canceled_at = stored.canceled_at or 0
    snapshot.trial_end = stored.trial_end or 0
    return on_subscription_event(snapshot, state, customer, catalog)


def on_invoice_paid(
    event: Event, state: State, customer: Customer | None, catalog: Catalog
) -> Changes:
    """invoice.paid / invoice.payment_succeeded: extend the paid-through of the subscription."""
    period_end = _time(event.period_end, "period_end")
    if not event.subscription_id or period_end is None:
        return Changes()  # a one-off invoice pays for no period of access
    seen = PaidPeriod(
        event.subscription_id,
        event.customer_id,
        period_end,
        event.invoice_id or None,
        _version(event),
    )
    stored = state.paid.get(event.subscription_id)
    paid = seen.merge(stored)
    if paid == stored:
        return Changes(paid_events=(seen,))
    changes = Changes(paid_periods=(paid,), paid_events=(seen,))
    sub = state.subscriptions.get(event.subscription_id)
    if sub is None:
        return changes  # kept until the subscription's own events arrive
    return changes.then(_subscription_changes(sub, _history(state, sub), paid, customer, state, catalog))


def _history_entry(event: Event) -> HistoryEntry:
    status = "canceled" if event.event_type == "customer.subscription.deleted" else event.status
    if not event.subscription_id:
        raise InvalidEvent("a subscription event without subscription_id")
    if status not in SUBSCRIPTION_STATUSES:
        raise InvalidEvent(f"unknown subscription status {status!r}")
    if not event.price_id:
        raise InvalidEvent("a subscription event without a price")
    return HistoryEntry(
        _version(event), event.subscription_id, event.customer_id, status, event.price_id,
        _time(event.period_end, "period_end"), event.cancel_at_period_end, _time(event.cancel_at, "cancel_at"),
        event.event_type in DUNNING_STATUS_TYPES,
    )


def _snapshot(
    event: Event, entry: HistoryEntry, user_id: str | None, family_id: str | None
) -> Subscription:
    start = _time(event.period_start, "period_start")
    end = _time(event.period_end, "period_end")
    if start is not None and end is not None and end < start:
        raise InvalidEvent("the subscription's period ends before it starts")
    created = entry.version.created
    return Subscription(
        subscription_id=entry.subscription_id,
        customer_id=event.customer_id,
        user_id=user_id,
        family_id=family_id,
        plan_id=None,  # derived
        price_id=entry.price_id,
        status=entry.status,
        current_period_start=start,
        current_period_end=end,
        cancel_at_period_end=event.cancel_at_period_end,
        cancel_at=_time(event.cancel_at, "cancel_at"),
        canceled_at=_time(event.canceled_at, "canceled_at"),
        trial_end=_time(event.trial_end, "trial_end"),
        access_level="blocked",  # derived
        status_since=created,  # derived
        created_at=created,  # derived
        updated_at=created,
        version=entry.version,
    )


def _history(state: State, sub: Subscription) -> tuple[HistoryEntry, ...]:
    """The subscription's history; a row stored without one stands for its own entry."""
    own = HistoryEntry(sub.version, sub.subscription_id, sub.customer_id, sub.status, sub.price_id,
                       sub.current_period_end, sub.cancel_at_period_end, sub.cancel_at)
    return state.history.get(sub.subscription_id) or (own,)


# ---------------------------------------------------------------- derivation


@value
class Step:
    """A history entry with what it implies: its plan, since when its status holds, its level."""

    entry: HistoryEntry
    plan: Plan | None
    since: int
    level: AccessLevel


def _subscription_changes(
    sub: Subscription,
    history: tuple[HistoryEntry, ...],
    paid: PaidPeriod | None,
    customer: Customer | None,
    state: State,
    catalog: Catalog,
) -> Changes:
    """`derive_subscription` now; or, when the state defers derivations, the subscription
    with its user / family filled and the inputs to derive it from once the batch is
    folded (`derive_deferred`).

    Deferring gives the same rows: a derivation is a pure function of these inputs, every
    change of an input comes with a new derivation, the last one replaces every earlier
    one, and no handler reads what a derivation computes (the derived fields of the
    subscription, its access changes and entitlements) - only its snapshot and identity.
    """
    if not state.defer_derivations:
        return derive_subscription(sub, history, paid, customer, catalog)
    sub = _with_identity(sub, customer)
    return Changes(subscriptions=(sub,), derivations=(Derivation(sub, history, paid),))


def derive_deferred(state: State, catalog: Catalog) -> Changes:
    """The derived rows of every subscription whose derivation the state deferred, each
    from the inputs of its latest one: what deriving after each event would have left."""
    subscriptions: list[Subscription] = []
    access: list[AccessChangeSet] = []
    entitlements: list[EntitlementSet] = []
    for pending in state.underived.values():
        sub, changes, rows = _derived(pending.sub, pending.history, pending.paid, catalog)
        subscriptions.append(sub)
        access.append(changes)
        entitlements.append(rows)
    return Changes(
        subscriptions=tuple(subscriptions),
        access_change_sets=tuple(access),
        entitlement_sets=tuple(entitlements),
    )


def derive_subscription(
    sub: Subscription,
    history: Sequence[HistoryEntry],
    paid: PaidPeriod | None,
    customer: Customer | None,
    catalog: Catalog,
) -> Changes:
    """The subscription row, its access changes and its entitlements, from these inputs alone.

    `sub` is the newest snapshot (the last entry of `history`, which is sorted by version).
    """
    sub, changes, rows = _derived(_with_identity(sub, customer), history, paid, catalog)
    return Changes(subscriptions=(sub,), access_change_sets=(changes,), entitlement_sets=(rows,))


def _with_identity(sub: Subscription, customer: Customer | None) -> Subscription:
    """`sub` with the user / family it lacks taken from its customer."""
    user_id = _fill(sub.user_id, customer.user_id if customer else None)
    family_id = _fill(sub.family_id, customer.family_id if customer else None)
    if user_id == sub.user_id and family_id == sub.family_id:
        return sub
    return replace(sub, user_id=user_id, family_id=family_id)


def _derived(
    sub: Subscription, history: Sequence[HistoryEntry], paid: PaidPeriod | None, catalog: Catalog
) -> tuple[Subscription, AccessChangeSet, EntitlementSet]:
    steps = access_steps(history, catalog)
    last = steps[-1]
    sub = Subscription(  # dataclasses.replace costs 5 us a call
        sub.subscription_id,
        sub.customer_id,
        sub.user_id,
        sub.family_id,
        plan_id=last.plan.id if last.plan else None,
        price_id=sub.price_id,
        status=sub.status,
        current_period_start=sub.current_period_start,
        current_period_end=sub.current_period_end,
        cancel_at_period_end=sub.cancel_at_period_end,
        cancel_at=sub.cancel_at,
        canceled_at=sub.canceled_at,
        trial_end=sub.trial_end,
        access_level=last.level,
        status_since=last.since,
        created_at=steps[0].entry.version.created,
        updated_at=sub.updated_at,
        version=sub.version,
    )
    return (
        sub,
        AccessChangeSet(sub.subscription_id, access_changes(sub.subscription_id, steps)),
        EntitlementSet(("subscription", sub.subscription_id), subscription_entitlements(sub, steps, paid)),
    )


def access_steps(history: Sequence[HistoryEntry], catalog: Catalog) -> list[Step]:
    """Each entry's plan, status_since and access level (the policy at the event's time)."""
    steps: list[Step] = []
    since, status = 0, ""
    for entry in history:
        if entry.status != status:
            since, status = entry.version.created, entry.status
        plan = catalog.plan_for_price(entry.price_id)
        level = plan.access_for(entry.status, entry.version.created - since) if plan else "blocked"
        steps.append(Step(entry, plan, since, level))
    return steps


def access_changes(subscription_id: str, steps: Sequence[Step]) -> tuple[AccessChange, ...]:
    """One row per entry whose level differs from the one before (a new subscription: blocked)."""
    changes: list[AccessChange] = []
    level: str = "blocked"
    for step in steps:
        if step.level != level:
            version = step.entry.version
            changes.append(
                AccessChange(
                    subscription_id,
                    version.event_id,
                    version.created,
                    level,
                    step.level,
                    step.entry.status,
                )
            )
            level = step.level
    return tuple(changes)


def subscription_entitlements(
    sub: Subscription, steps: Sequence[Step], paid: PaidPeriod | None
) -> tuple[Entitlement, ...]:
    """Rows for what the current plan grants, and revoked rows for what earlier plans did."""
    last = steps[-1]
    available = {f.code for f in last.plan.features_at(last.level)} if last.plan else set()
    rows = []
    for (subject, code), (start, end) in feature_runs(steps, sub.user_id, sub.family_id).items():
        granted_at = steps[start].entry.version.created
        if end == len(steps):
            rows.append(_current_row(sub, last, subject, code, code in available, granted_at, paid))
        else:
            rows.append(_lost_row(sub, steps[end - 1], steps[end], subject, code, granted_at))
    return tuple(sorted(rows, key=lambda row: row.key))


def feature_runs(
    steps: Sequence[Step], user_id: str | None, family_id: str | None
) -> dict[tuple[SubjectKey, str], tuple[int, int]]:
    """(subject, feature) -> (first, end) step indexes of the latest run of steps granting it.

    end is len(steps) when the last step still grants it, else the step that took it away.
    """
    runs: dict[tuple[SubjectKey, str], tuple[int, int]] = {}
    running: dict[tuple[SubjectKey, str], int] = {}
    held_under: dict[int, set[tuple[SubjectKey, str]]] = {}  # by id(plan): steps share plans
    for index, step in enumerate(steps):
        held = held_under.get(id(step.plan))
        if held is None:
            held = held_under[id(step.plan)] = _held(step.plan, user_id, family_id)
        for key in [key for key in running if key not in held]:
            runs[key] = (running.pop(key), index)
        for key in held:
            running.setdefault(key, index)
    runs.update({key: (start, len(steps)) for key, start in running.items()})
    return runs


def _held(
    plan: Plan | None, user_id: str | None, family_id: str | None
) -> set[tuple[SubjectKey, str]]:
    subject = subject_for(plan, user_id, family_id) if plan else None
    if plan is None or subject is None:
        return set()
    return {(subject, code) for code in plan.features}


def subject_for(plan: Plan, user_id: str | None, family_id: str | None) -> SubjectKey | None:
    """The family for a family-pool plan when it is known, else the user; None if neither."""
    if plan.family_pool and family_id:
        return ("family", family_id)
    if user_id:
        return ("user", user_id)
    return None


def _current_row(
    sub: Subscription,
    last: Step,
    subject: SubjectKey,
    code: str,
    available: bool,
    granted_at: int,
    paid: PaidPeriod | None,
) -> Entitlement:
    assert last.plan is not None  # a feature is only held under a known plan
    terminal = sub.status in TERMINAL_STATUSES
    status = "revoked" if terminal else "active" if available else "suspended"
    expires_at, version = _expiry(sub, paid)
    return _row(
        ("subscription", sub.subscription_id),
        subject,
        (sub.user_id, sub.family_id),
        last.plan.features[code],
        last.plan.id,
        status=status,
        access_level=last.level,
        granted_at=granted_at,
        expires_at=expires_at,
        revoked_at=sub.status_since if terminal else None,
        version=version,
    )


def _lost_row(
    sub: Subscription, held: Step, taken: Step, subject: SubjectKey, code: str, granted_at: int
) -> Entitlement:
    """A feature that `held` (the last step granting it) had and the next step `taken` lacks."""
    assert held.plan is not None
    version = taken.entry.version
    return _row(
        ("subscription", sub.subscription_id),
        subject,
        (sub.user_id, sub.family_id),
        held.plan.features[code],
        held.plan.id,
        status="revoked",
        access_level="blocked",
        granted_at=granted_at,
        expires_at=None,
        revoked_at=version.created,
        version=version,
    )


def _expiry(sub: Subscription, paid: PaidPeriod | None) -> tuple[int | None, Version]:
    """expires_at, and the version of the newest event that decided the row."""
    if sub.cancel_at_period_end:
        return sub.current_period_end, sub.version
    if sub.cancel_at is not None:
        return sub.cancel_at, sub.version
    end = sub.current_period_end
    if paid is not None and (end is None or paid.paid_through > end):
        return paid.paid_through, max(sub.version, paid.version)
    return end, sub.version


def _row(
    source: SourceKey,
    subject: SubjectKey,
    identity: tuple[str | None, str | None],
    feature: Feature,
    plan_id: str,
    *,
    status: str,
    access_level: str,
    granted_at: int,
    expires_at: int | None,
    revoked_at: int | None,
    version: Version,
) -> Entitlement:
    return Entitlement(
        subject_type=subject[0],
        subject_id=subject[1],
        feature_code=feature.code,
        source_type=source[0],
        source_id=source[1],
        user_id=identity[0],
        family_id=identity[1],
        plan_id=plan_id,
        status=status,
        access_level=access_level,
        usage_limit=feature.limit,
        limit_period=feature.period,
        enforcement=feature.enforcement,
        granted_at=granted_at,
        expires_at=expires_at,
        revoked_at=revoked_at,
        version=version,
    )


def derive_grant(grant: OneTimeGrant, customer: Customer | None, catalog: Catalog) -> Changes:
    """A one-time grant's row and entitlements: every feature of its plan, active, no expiry."""
    grant = replace(
        grant,
        user_id=_fill(grant.user_id, customer.user_id if customer else None),
        family_id=_fill(grant.family_id, customer.family_id if customer else None),
    )
    plan = catalog.plans.get(grant.plan_id)
    subject = subject_for(plan, grant.user_id, grant.family_id) if plan else None
    rows: list[Entitlement] = []
    if plan is not None and subject is not None:
        rows = [
            _row(
                grant.source,
                subject,
                (grant.user_id, grant.family_id),
                feature,
                plan.id,
                status="active",
                access_level="full",
                granted_at=grant.granted_at,
                expires_at=None,
                revoked_at=None,
                version=grant.version,
            )
            for feature in plan.features.values()
        ]
    rows.sort(key=lambda row: row.key)
    return Changes(grants=(grant,), entitlement_sets=(EntitlementSet(grant.source, tuple(rows)),))


# ---------------------------------------------------------------- one-time purchases


def on_checkout_completed(
    event: Event, state: State, customer: Customer | None, catalog: Catalog
) -> Changes:
    """mode=payment grants the plan once; mode=subscription only maps the customer
    (done by `apply`), and the subscription's own events grant."""
    if event.mode != "payment":
        return Changes()
    source_id = event.checkout_session_id or event.object_id
    return _one_time_purchase(event, ("checkout", source_id), state, customer, catalog)


def _one_time_purchase(
    event: Event, source: SourceKey, state: State, customer: Customer | None, catalog: Catalog
) -> Changes:
    version = _version(event)
    plan, misses = _purchased_plan(event, version, catalog)
    if plan is None or not source[1]:
        return Changes(catalog_misses=misses)
    seen = OneTimeGrant(
        source[0],
        source[1],
        event.customer_id or None,
        event.user_id or None,
        event.family_id or None,
        plan.id,
        version.created,
        version,
    )
    return derive_grant(seen.merge(state.grants.get(source)), customer, catalog)


def _purchased_plan(
    event: Event, version: Version, catalog: Catalog
) -> tuple[Plan | None, tuple[CatalogMiss, ...]]:
    """The plan named by metadata plan_id, else by the price; the default plan grants nothing."""
    if event.plan_id:
        plan = catalog.plans.get(event.plan_id)
    elif event.price_id:
        plan = catalog.plan_for_price(event.price_id)
        if plan is None:
            return None, (_miss(event.price_id, None, version),)
    else:
        return None, ()
    return (None if plan is None or plan.default else plan), ()


def _miss(price_id: str, subscription_id: str | None, version: Version) -> CatalogMiss:
    """One sighting of a price the catalog does not know."""
    return CatalogMiss(
        price_id, version.created, version.created, subscription_id, version.event_id
    )


# ---------------------------------------------------------------- payments


def on_payment_intent(
    event: Event, state: State, customer: Customer | None, catalog: Catalog
) -> Changes:
    status = "succeeded" if event.event_type == "payment_intent.succeeded" else "failed"
    return _record_payment(event, state, customer, status)


def on_charge_succeeded(
    event: Event, state: State, customer: Customer | None, catalog: Catalog
) -> Changes:
    """A charge; one without an invoice that names a plan_id is a one-time purchase of it."""
    changes = _record_payment(event, state, customer, "succeeded")
    if event.invoice_id or not event.plan_id:
        return changes
    source = ("charge", event.charge_id or event.object_id)
    return changes.then(_one_time_purchase(event, source, state, customer, catalog))


def on_charge_failed(
    event: Event, state: State, customer: Customer | None, catalog: Catalog
) -> Changes:
    return _record_payment(event, state, customer, "failed")


def on_charge_refunded(
    event: Event, state: State, customer: Customer | None, catalog: Catalog
) -> Changes:
    full = event.amount > 0 and event.amount_refunded >= event.amount
    return _record_payment(event, state, customer, "refunded" if full else "partially_refunded")


# A dispute's status (Stripe's) -> the payment's. Open and lost disputes make the payment
# `disputed`; one closed in the merchant's favour gives the payment back its own status.
# Any status Stripe adds later counts as open: the cautious answer.
_DISPUTE_ENDED_FOR_MERCHANT = frozenset({"won", "warning_closed", "prevented"})


def on_charge_dispute(
    event: Event, state: State, customer: Customer | None, catalog: Catalog
) -> Changes:
    """charge.dispute.*: the payment is `disputed` while the dispute is open or once it is
    lost; won (or an inquiry closed) gives back succeeded / (partially_)refunded. The
    reason names the dispute, its status and Stripe's reason."""
    reason = f"dispute {event.dispute_id or event.object_id} {event.status or 'open'}"
    if event.reason:
        reason += f": {event.reason}"
    if event.status == "charge_refunded":  # pre-2019 API versions: refunded to close it
        return _record_payment(event, state, customer, "refunded", reason=reason)
    ended = event.status in _DISPUTE_ENDED_FOR_MERCHANT
    return _record_payment(
        event, state, customer, "succeeded" if ended else "disputed", reason=reason,
        own_status=ended,
    )


def _own_status(payment: Payment) -> str:
    """What a captured payment is by its refunds alone."""
    if payment.amount > 0 and payment.amount_refunded >= payment.amount:
        return "refunded"
    return "partially_refunded" if payment.amount_refunded > 0 else "succeeded"


def on_payment_created(
    event: Event, state: State, customer: Customer | None, catalog: Catalog
) -> Changes:
    """payment.created: our CreatePayment command, pending until Stripe reports."""
    return _record_payment(event, state, customer, event.status or "pending")


def on_payment_status_updated(
    event: Event, state: State, customer: Customer | None, catalog: Catalog
) -> Changes:
    """payment.status_updated: an admin set the status, for `reason`."""
    if not event.status:
        raise InvalidEvent("payment.status_updated without a status")
    return _record_payment(event, state, customer, event.status, reason=event.reason or None)


def _record_payment(
    event: Event,
    state: State,
    customer: Customer | None,
    status: str,
    reason: str | None = None,
    own_status: bool = False,
) -> Changes:
    """Merge what the event says about a payment with every stored view of it.

    A payment first stored under its charge id is re-keyed to its payment intent id
    as soon as an event names both; the charge-keyed row is deleted. With `own_status`,
    the status (if this event is the newest view) is what the merged refunds make it.
    """
    merged = seen = _payment_seen(event, customer, status, reason)
    stored = _stored_views(seen, state)
    for row in stored:
        merged = merged.merge(row)
    if own_status and merged.version == seen.version:
        merged = replace(merged, status=_own_status(merged))
    if merged.amount_refunded > merged.amount:
        raise InvalidEvent(f"refunded {merged.amount_refunded} of a payment of {merged.amount}")
    gone = tuple(row.payment_id for row in stored if row.payment_id != merged.payment_id)
    return Changes(merged_payments=gone, payments=(merged,))


def _payment_seen(
    event: Event, customer: Customer | None, status: str, reason: str | None
) -> Payment:
    payment_id = event.payment_intent_id or event.charge_id or event.object_id
    if not payment_id:
        raise InvalidEvent("a payment event without a payment intent, charge or object id")
    if status not in PAYMENT_STATUSES:
        raise InvalidEvent(f"unknown payment status {status!r}")
    if event.amount < 0 or event.amount_refunded < 0:
        raise InvalidEvent("a negative amount")
    version = _version(event)
    return Payment(
        payment_id=payment_id,
        customer_id=event.customer_id or None,
        user_id=_fill(event.user_id or None, customer.user_id if customer else None),
        family_id=_fill(event.family_id or None, customer.family_id if customer else None),
        amount=event.amount,
        currency=_currency(event.currency),
        status=status,
        amount_refunded=event.amount_refunded,
        payment_intent_id=event.payment_intent_id or None,
        charge_id=event.charge_id or None,
        invoice_id=event.invoice_id or None,
        description=event.description or None,
        failure_code=event.failure_code or None,
        failure_message=event.failure_message or None,
        status_reason=reason,
        metadata=dict(event.metadata),
        created_at=version.created,
        updated_at=version.created,
        version=version,
    )


def _stored_views(seen: Payment, state: State) -> list[Payment]:
    found = {
        key: state.payments[key]
        for key in (seen.payment_id, seen.charge_id)
        if key is not None and key in state.payments
    }
    if not found and seen.charge_id and not seen.payment_intent_id:
        row = state.payment_with_charge(seen.charge_id)  # keyed by its intent already
        if row is not None:
            found[row.payment_id] = row
    return list(found.values())


# ---------------------------------------------------------------- values


def _version(event: Event) -> Version:
    if not 0 <= event.created <= MAX_TIME:
        raise InvalidEvent(f"created {event.created} is out of range")
    return Version(event.created, event.event_id)


def _time(value: int, name: str) -> int | None:
    """A Unix time of the event, None for 0 (proto3's "not set")."""
    if value == 0:
        return None
    if not 0 < value <= MAX_TIME:
        raise InvalidEvent(f"{name} {value} is out of range")
    return value


def _currency(value: str) -> str:
    if not value:
        return NO_CURRENCY
    currency = value.lower()
    if not _CURRENCY.match(currency):
        raise InvalidEvent(f"currency {value!r} is not an ISO 4217 code")
    return currency


def _fill(known: str | None, other: str | None) -> str | None:
    return known or other or None


HANDLERS: dict[str, Handler] = {
    "customer.subscription.created": on_subscription_event,
    "customer.subscription.updated": on_subscription_event,
    "customer.subscription.deleted": on_subscription_event,
    "customer.subscription.trial_will_end": on_subscription_event,
    "invoice.paid": on_invoice_paid,
    "invoice.payment_succeeded": on_invoice_paid,
    "invoice.payment_failed": _identity_only,
    "invoice.payment_action_required": _identity_only,
    "dunning.escalated": on_dunning_status,
    "dunning.restored": on_dunning_status,
    "checkout.session.completed": on_checkout_completed,
    "charge.succeeded": on_charge_succeeded,
    "charge.failed": on_charge_failed,
    "charge.refunded": on_charge_refunded,
    **dict.fromkeys(DISPUTE_TYPES, on_charge_dispute),
    "payment_intent.succeeded": on_payment_intent,
    "payment_intent.payment_failed": on_payment_intent,
    "payment.created": on_payment_created,
    "payment.status_updated": on_payment_status_updated,
}
