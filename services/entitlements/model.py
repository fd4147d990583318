"""Rows of the entitlements projection, their merge rules, and the changes handlers return.

Times are Unix seconds (int), as on the bus; the repository converts them to timestamptz.
Rows are frozen values. A handler never mutates anything: it reads a `State` and returns
`Changes` (new versions of rows), and the executor folds them into the `State` with
`State.apply`. `merge` methods are the join of two partial views of one row: they are
commutative for consistent input, which is what makes the projection independent of the
order in which events arrive (handlers.py explains the rules).
"""

from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass, field, fields, replace
from operator import attrgetter
from typing import Any, get_args

from domain.entitlements import SubjectKey, Version
from domain.payments import PAYMENT_STATUSES
from shared.catalog import SubscriptionStatus
from shared.values import ordered_value, value

__all__ = ["PAYMENT_STATUSES", "SubjectKey", "Version"]  # the read model's, re-exported for the worker's modules

# The statuses the subscriptions table accepts: one list, in the catalog's types.
SUBSCRIPTION_STATUSES = frozenset(get_args(SubscriptionStatus))
# ISO 4217 "no currency": stands in until an event tells a payment's currency,
# because the column is NOT NULL and checked against ^[a-z]{3}$.
NO_CURRENCY = "xxx"

SourceKey = tuple[str, str]  # (source_type, source_id)
EntitlementKey = tuple[str, str, str, str, str]  # subject, feature, source
AccessChangeKey = tuple[str, str]  # (subscription_id, event_id)


def _first(older: Any, newer: Any) -> Any:
    """Fill-if-missing for facts: the value of the older view, else the newer's."""
    return older if older is not None else newer


def _by_version(a: Any, b: Any) -> tuple[Any, Any]:
    """(newer, older) of two rows that have a `version`."""
    return (a, b) if a.version >= b.version else (b, a)


@value
class Customer:
    """A Stripe customer and the user / family it belongs to (facts, filled once)."""

    customer_id: str
    user_id: str | None
    family_id: str | None
    email: str | None
    created_at: int
    version: Version

    def merge(self, other: Customer) -> Customer:
        newer, older = _by_version(self, other)
        return Customer(
            newer.customer_id,
            user_id=_first(older.user_id, newer.user_id),
            family_id=_first(older.family_id, newer.family_id),
            email=_first(older.email, newer.email),
            created_at=min(self.created_at, other.created_at),
            version=newer.version,
        )


@value
class Subscription:
    """The newest snapshot of a subscription plus what is derived from its history.

    The snapshot fields (status .. trial_end, updated_at) are those of the event with the
    highest `version`. plan_id, access_level, status_since and created_at are derived
    from the history and the catalog; user_id / family_id are facts filled once.
    """

    subscription_id: str
    customer_id: str
    user_id: str | None
    family_id: str | None
    plan_id: str | None
    price_id: str
    status: str
    current_period_start: int | None
    current_period_end: int | None
    cancel_at_period_end: bool
    cancel_at: int | None
    canceled_at: int | None
    trial_end: int | None
    access_level: str
    status_since: int
    created_at: int
    updated_at: int
    version: Version


@ordered_value
class HistoryEntry:
    """One customer.subscription.* event: the status and price it reported, and the
    snapshot fields that decide expiry (read back by CheckEntitlement as_of)."""

    version: Version
    subscription_id: str
    customer_id: str
    status: str
    price_id: str
    current_period_end: int | None = None
    cancel_at_period_end: bool = False
    cancel_at: int | None = None
    status_only: bool = False  # a dunning decision: only its status is its own


@value
class PaidPeriod:
    """The latest period end paid by an invoice of a subscription: a grow-only max."""

    subscription_id: str
    customer_id: str
    paid_through: int
    invoice_id: str | None
    version: Version

    def merge(self, other: PaidPeriod | None) -> PaidPeriod:
        if other is None:
            return self
        return max(self, other, key=lambda p: (p.paid_through, p.version))


@value
class OneTimeGrant:
    """A one-time purchase of a plan (a checkout in payment mode, or a charge)."""

    source_type: str
    source_id: str
    customer_id: str | None  # None: bought by a guest
    user_id: str | None
    family_id: str | None
    plan_id: str
    granted_at: int
    version: Version

    @property
    def source(self) -> SourceKey:
        return (self.source_type, self.source_id)

    def merge(self, other: OneTimeGrant | None) -> OneTimeGrant:
        if other is None:
            return self
        newer, older = _by_version(self, other)
        return OneTimeGrant(
            newer.source_type,
            newer.source_id,
            customer_id=_first(older.customer_id, newer.customer_id),
            user_id=_first(older.user_id, newer.user_id),
            family_id=_first(older.family_id, newer.family_id),
            plan_id=older.plan_id,
            granted_at=min(self.granted_at, other.granted_at),
            version=newer.version,
        )


@value
class Entitlement:
    """What one subject may use of one feature through one source."""

    subject_type: str
    subject_id: str
    feature_code: str
    source_type: str
    source_id: str
    user_id: str | None
    family_id: str | None
    plan_id: str
    status: str
    access_level: str
    usage_limit: int | None
    limit_period: str
    enforcement: str
    granted_at: int
    expires_at: int | None
    revoked_at: int | None
    version: Version

    @property
    def key(self) -> EntitlementKey:
        return (
            self.subject_type,
            self.subject_id,
            self.feature_code,
            self.source_type,
            self.source_id,
        )

    @property
    def subject(self) -> SubjectKey:
        return (self.subject_type, self.subject_id)


@value
class AccessChange:
    """A change of a subscription's access level and the event that caused it."""

    subscription_id: str
    event_id: str
    event_created: int
    from_level: str
    to_level: str
    status: str

    @property
    def key(self) -> AccessChangeKey:
        return (self.subscription_id, self.event_id)


@value
class Payment:
    """One payment, keyed by its payment intent id when known, else its charge id."""

    payment_id: str
    customer_id: str | None
    user_id: str | None
    family_id: str | None
    amount: int
    currency: str
    status: str
    amount_refunded: int
    payment_intent_id: str | None
    charge_id: str | None
    invoice_id: str | None
    description: str | None
    failure_code: str | None
    failure_message: str | None
    status_reason: str | None
    metadata: dict[str, str]
    created_at: int
    updated_at: int
    version: Version

    def merge(self, other: Payment) -> Payment:
        """Facts fill if missing, status & failure come from the newer view, refunds only grow."""
        newer, older = _by_version(self, other)
        intent = _first(older.payment_intent_id, newer.payment_intent_id)
        charge = _first(older.charge_id, newer.charge_id)
        return Payment(
            payment_id=intent or charge or older.payment_id,
            customer_id=_first(older.customer_id, newer.customer_id),
            user_id=_first(older.user_id, newer.user_id),
            family_id=_first(older.family_id, newer.family_id),
            amount=older.amount or newer.amount,
            currency=newer.currency if older.currency == NO_CURRENCY else older.currency,
            status=newer.status,
            amount_refunded=max(self.amount_refunded, other.amount_refunded),
            payment_intent_id=intent,
            charge_id=charge,
            invoice_id=_first(older.invoice_id, newer.invoice_id),
            description=_first(older.description, newer.description),
            failure_code=newer.failure_code,
            failure_message=newer.failure_message,
            status_reason=newer.status_reason,
            metadata={**newer.metadata, **older.metadata},
            created_at=min(self.created_at, other.created_at),
            updated_at=newer.updated_at,
            version=newer.version,
        )


@value
class CatalogMiss:
    """A Stripe price seen on a subscription (or purchase) that the catalog does not know."""

    price_id: str
    first_seen_at: int
    last_seen_at: int
    last_subscription_id: str | None
    last_event_id: str

    def merge(self, other: CatalogMiss | None) -> CatalogMiss:
        if other is None:
            return self
        last = max(self, other, key=lambda m: (m.last_seen_at, m.last_event_id))
        return replace(last, first_seen_at=min(self.first_seen_at, other.first_seen_at))


@value
class EntitlementSet:
    """Every entitlement row of one source: rows of the source not listed here go."""

    source: SourceKey
    rows: tuple[Entitlement, ...]


@value
class AccessChangeSet:
    """Every access change of one subscription: rows not listed here go."""

    subscription_id: str
    rows: tuple[AccessChange, ...]


@value
class Derivation:
    """What a subscription's derived rows are computed from (handlers.derive_subscription):
    its newest snapshot with its user / family, its history, its paid-through."""

    sub: Subscription
    history: tuple[HistoryEntry, ...]
    paid: PaidPeriod | None


@value
class Changes:
    """What one event changes: new versions of rows, applied in field order.

    `merged_payments` are payment ids folded into another row (deleted).
    `mapped_customers` gained a user or family: their stored payments are backfilled.
    `derivations`: subscriptions whose derived rows are left for the end of the batch
    (`State.defer_derivations`); their `subscriptions` rows are not derived yet.
    """

    customers: tuple[Customer, ...] = ()
    subscriptions: tuple[Subscription, ...] = ()
    derivations: tuple[Derivation, ...] = ()
    history: tuple[HistoryEntry, ...] = ()
    paid_periods: tuple[PaidPeriod, ...] = ()
    grants: tuple[OneTimeGrant, ...] = ()
    entitlement_sets: tuple[EntitlementSet, ...] = ()
    access_change_sets: tuple[AccessChangeSet, ...] = ()
    merged_payments: tuple[str, ...] = ()
    payments: tuple[Payment, ...] = ()
    catalog_misses: tuple[CatalogMiss, ...] = ()
    mapped_customers: tuple[str, ...] = ()
    paid_events: tuple[PaidPeriod, ...] = ()  # every paid invoice (append-only history)

    def then(self, later: Changes) -> Changes:
        """Both, `later` winning where they touch the same row."""
        if not later:
            return self
        if not self:
            return later
        return Changes(*map(operator.add, _changes_values(self), _changes_values(later)))

    def __bool__(self) -> bool:
        return any(_changes_values(self))


# Every field's value at once, in C: `then` and `__bool__` run a few times per event.
_changes_values = attrgetter(*(f.name for f in fields(Changes)))


@dataclass
class State:
    """The rows a batch can touch, in memory; mutated only by `apply`.

    Loaded by the repository for the customers of a batch; the pure handlers read it.
    `history` holds each subscription's entries sorted by version.

    With `defer_derivations`, handlers do not derive a subscription's rows (its derived
    fields, access changes and entitlements) after each event: `underived` keeps the
    inputs of each one's latest derivation, and `handlers.derive_deferred` derives each
    once, for the whole batch. Until then those rows are stale.
    """

    customers: dict[str, Customer] = field(default_factory=dict)
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    history: dict[str, tuple[HistoryEntry, ...]] = field(default_factory=dict)
    paid: dict[str, PaidPeriod] = field(default_factory=dict)
    grants: dict[SourceKey, OneTimeGrant] = field(default_factory=dict)
    entitlements: dict[SourceKey, tuple[Entitlement, ...]] = field(default_factory=dict)
    access_changes: dict[str, tuple[AccessChange, ...]] = field(default_factory=dict)
    payments: dict[str, Payment] = field(default_factory=dict)
    catalog_misses: dict[str, CatalogMiss] = field(default_factory=dict)
    mapped_customers: set[str] = field(default_factory=set)
    # Paid invoices seen by this batch (never loaded: the table is append-only).
    paid_events: dict[tuple[str, str], PaidPeriod] = field(default_factory=dict)
    defer_derivations: bool = False
    underived: dict[str, Derivation] = field(default_factory=dict)

    def copy(self) -> State:
        """A copy whose dicts can change independently (rows are immutable)."""
        return State(**{f.name: type(v)(v) for f in fields(self) for v in [getattr(self, f.name)]})

    def subscriptions_of(self, customer_id: str) -> list[Subscription]:
        return [s for s in self.subscriptions.values() if s.customer_id == customer_id]

    def grants_of(self, customer_id: str) -> list[OneTimeGrant]:
        return [g for g in self.grants.values() if g.customer_id == customer_id]

    def payment_with_charge(self, charge_id: str) -> Payment | None:
        return next((p for p in self.payments.values() if p.charge_id == charge_id), None)

    def apply(self, changes: Changes) -> None:
        """Fold `changes` into the state, later rows replacing earlier ones."""
        for customer in changes.customers:
            self.customers[customer.customer_id] = customer
        for sub in changes.subscriptions:
            self.subscriptions[sub.subscription_id] = sub
            self.underived.pop(sub.subscription_id, None)  # derived, or derived below
        for pending in changes.derivations:
            self.underived[pending.sub.subscription_id] = pending
        for entry in changes.history:
            self.history[entry.subscription_id] = with_entry(
                self.history.get(entry.subscription_id, ()), entry
            )
        for paid in changes.paid_periods:
            self.paid[paid.subscription_id] = paid
        for grant in changes.grants:
            self.grants[grant.source] = grant
        for ents in changes.entitlement_sets:
            self.entitlements[ents.source] = ents.rows
        for acs in changes.access_change_sets:
            self.access_changes[acs.subscription_id] = acs.rows
        for payment_id in changes.merged_payments:
            self.payments.pop(payment_id, None)
        for payment in changes.payments:
            self.payments[payment.payment_id] = payment
        for miss in changes.catalog_misses:
            self.catalog_misses[miss.price_id] = miss.merge(self.catalog_misses.get(miss.price_id))
        self.mapped_customers.update(changes.mapped_customers)
        for paid in changes.paid_events:
            self.paid_events[(paid.subscription_id, paid.version.event_id)] = paid


def with_entry(history: tuple[HistoryEntry, ...], entry: HistoryEntry) -> tuple[HistoryEntry, ...]:
    """`history` with `entry` in its place by version; unchanged if already there."""
    if any(e.version.event_id == entry.version.event_id for e in history):
        return history
    index = bisect.bisect_left(history, entry)
    return (*history[:index], entry, *history[index:])
