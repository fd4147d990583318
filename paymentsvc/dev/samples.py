"""Realistic Stripe webhook events for tests, ``paymentsvc send-webhook`` and benchmarks.

:func:`sample_event` returns the JSON dict Stripe would POST for any type in
:data:`SAMPLE_TYPES`, in the 2024-06-20 shape (:data:`OLD_API_VERSION`) or the
2025-03-31.basil-and-later shape (:data:`NEW_API_VERSION`, or any later version string).
Ids are random with Stripe's prefixes unless given. Pure: no I/O; the only outside inputs are
the clock (default ``created``) and ``secrets`` (ids).

Where the identity goes, as our app sets it up with Stripe: ``user_id`` / ``family_id`` are
in the subscription's metadata (and so, for invoices, in ``subscription_details`` /
``parent.subscription_details``), in the metadata of charges, payment intents, checkout
sessions and one-off invoices, and a checkout session's ``client_reference_id`` is the user id.
"""

from __future__ import annotations

import enum
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from services.ingest_webhooks.normalize import DISPUTE_TYPES, PROJECTED_TYPES

OLD_API_VERSION = "2024-06-20"
NEW_API_VERSION = "2025-03-31.basil"
# The types :func:`sample_event` builds: every projected type but disputes, which name no
# customer and have a builder of their own (:func:`dispute_event`).
SAMPLE_TYPES: list[str] = sorted(PROJECTED_TYPES - DISPUTE_TYPES)

DEFAULT_PRICE_ID = "price_basic_monthly"
DEFAULT_AMOUNT = 999
DEFAULT_CURRENCY = "usd"
DEFAULT_EMAIL = "jenny.rosen@example.com"

_FIRST_NEW_SHAPE_DATE = "2025-03-31"
_API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[a-z]+)?$")
_DAY = 86_400
_MONTH = 30 * _DAY

_STATUS: dict[str, str] = {
    "checkout.session.completed": "complete",
    "invoice.paid": "paid",
    "invoice.payment_succeeded": "paid",
    "invoice.payment_failed": "open",
    "invoice.payment_action_required": "open",
    "charge.succeeded": "succeeded",
    "charge.failed": "failed",
    "charge.refunded": "succeeded",
    "customer.subscription.created": "active",
    "customer.subscription.updated": "active",
    "customer.subscription.deleted": "canceled",
    "customer.subscription.trial_will_end": "trialing",
    "payment_intent.succeeded": "succeeded",
    "payment_intent.payment_failed": "requires_payment_method",
}
_FAILING_TYPES = frozenset({"charge.failed", "payment_intent.payment_failed"})
_PAID_INVOICE_TYPES = frozenset({"invoice.paid", "invoice.payment_succeeded"})

#: Keyword overrides accepted by :func:`sample_event`; ``None`` means "use the default".
OVERRIDES: dict[str, str] = {
    "livemode": "bool, default False",
    "subscription_id": "sub_...; default random",
    "subscription_item_id": "si_...; default random",
    "invoice_id": "in_...; default random",
    "charge_id": "ch_...; default random",
    "payment_intent_id": "pi_...; default random",
    "checkout_session_id": "cs_...; default random",
    "price_id": f"default {DEFAULT_PRICE_ID!r}",
    "product_id": "prod_...; default random",
    "amount": f"unit amount in minor units, default {DEFAULT_AMOUNT}; totals are amount x quantity",
    "quantity": "default 1",
    "currency": f"default {DEFAULT_CURRENCY!r}",
    "status": "the object's status; default fits the event type",
    "period_start": "default created",
    "period_end": "default period_start + 30 days",
    "cancel_at_period_end": "default False",
    "cancel_at": "default None",
    "canceled_at": "default created for customer.subscription.deleted, else None",
    "trial_end": "default period_end for customer.subscription.trial_will_end, else None",
    "amount_refunded": "default the total for charge.refunded, else 0",
    "failure_code": "charge / payment intent; default 'card_declined' on failure events",
    "failure_message": "charge / payment intent; default 'Your card was declined.'",
    "attempt_count": "invoice; default 1",
    "next_payment_attempt": "invoice; default created + 3 days for invoice.payment_failed",
    "billing_reason": "invoice; default 'subscription_cycle' ('manual' when one_off)",
    "mode": "checkout session: 'subscription' (default) or 'payment'",
    "customer_email": f"default {DEFAULT_EMAIL!r}",
    "description": "default None",
    "metadata": "dict merged into the object's own metadata",
    "plan_id": "put into the object's metadata as plan_id",
    "feature_code": "put into the object's metadata as feature_code",
    "client_reference_id": "checkout session; default the user id",
    "customer_metadata": "dict; sends the customer expanded with this metadata",
    "expand_customer": "bool; send the customer as an expanded object",
    "one_off": "bool; an invoice that belongs to no subscription",
    "with_payments": "bool; a new-shape invoice includes its `payments` list",
}


class _Default(enum.Enum):
    RANDOM = "random"


RANDOM: Literal[_Default.RANDOM] = _Default.RANDOM
"""Default of ``user_id``: a random ``user_...`` id."""


def is_new_shape(api_version: str) -> bool:
    """True when ``api_version`` (``YYYY-MM-DD[.name]``) has the 2025-03-31.basil shape."""
    if not _API_VERSION.match(api_version):
        raise ValueError(f"not a Stripe API version: {api_version!r}")
    return api_version[:10] >= _FIRST_NEW_SHAPE_DATE


def new_id(prefix: str) -> str:
    """A random id in Stripe's style, e.g. ``new_id("cus_")``."""
    return f"{prefix}{secrets.token_hex(12)}"


def sample_event(
    event_type: str,
    *,
    api_version: str = NEW_API_VERSION,
    customer_id: str | None = None,
    user_id: str | None | Literal[_Default.RANDOM] = RANDOM,
    family_id: str | None = None,
    event_id: str | None = None,
    created: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A complete Stripe event dict of ``event_type``, as Stripe would send it.

    ``user_id=None`` / ``family_id=None`` leave the identity out of every metadata (the worker
    then resolves it from its customers table). Further keyword overrides are listed in
    :data:`OVERRIDES`. Raises ``ValueError`` for an unknown event type and ``TypeError`` for
    an unknown override.
    """
    if event_type not in SAMPLE_TYPES:
        raise ValueError(f"unknown sample event type {event_type!r}; known: {SAMPLE_TYPES}")
    unknown = overrides.keys() - OVERRIDES.keys()
    if unknown:
        raise TypeError(
            f"unknown sample_event overrides {sorted(unknown)}; known: {sorted(OVERRIDES)}"
        )
    sample = _resolve(
        event_type,
        api_version=api_version,
        customer_id=customer_id or new_id("cus_"),
        user_id=new_id("user_") if isinstance(user_id, _Default) else user_id,
        family_id=family_id,
        event_id=event_id or new_id("evt_"),
        created=created if created is not None else int(time.time()),
        overrides={key: value for key, value in overrides.items() if value is not None},
    )
    return _envelope(sample, _OBJECT_BUILDERS[event_type.rsplit(".", 1)[0]](sample))


# A dispute's status in each event of its life, as Stripe reports it by default.
_DISPUTE_STATUS = {
    "charge.dispute.created": "needs_response",
    "charge.dispute.updated": "under_review",
    "charge.dispute.funds_withdrawn": "needs_response",
    "charge.dispute.funds_reinstated": "won",
    "charge.dispute.closed": "won",
}


def dispute_event(
    event_type: str,
    *,
    charge_id: str,
    payment_intent_id: str | None = None,
    status: str | None = None,
    reason: str = "fraudulent",
    amount: int = DEFAULT_AMOUNT,
    currency: str = DEFAULT_CURRENCY,
    dispute_id: str | None = None,
    event_id: str | None = None,
    created: int | None = None,
    api_version: str = NEW_API_VERSION,
) -> dict[str, Any]:
    """A ``charge.dispute.*`` event as Stripe sends it: the dispute names its charge and
    payment intent by id, and no customer."""
    if event_type not in DISPUTE_TYPES:
        raise ValueError(f"not a dispute event type: {event_type!r}; known: {sorted(DISPUTE_TYPES)}")
    created = created if created is not None else int(time.time())
    dispute_id = dispute_id or new_id("dp_")
    return {
        "id": event_id or new_id("evt_"),
        "object": "event",
        "api_version": api_version,
        "created": created,
        "data": {
            "object": {
                "id": dispute_id,
                "object": "dispute",
                "amount": amount,
                "balance_transactions": [],
                "charge": charge_id,
                "created": created,
                "currency": currency,
                "evidence_details": {
                    "due_by": created + 7 * _DAY,
                    "has_evidence": False,
                    "past_due": False,
                    "submission_count": 0,
                },
                "is_charge_refundable": False,
                "livemode": False,
                "metadata": {},
                "payment_intent": payment_intent_id,
                "reason": reason,
                "status": status or _DISPUTE_STATUS[event_type],
            }
        },
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


LIFECYCLE_STEPS = 10


def customer_lifecycle(start: int, *, price_id: str = DEFAULT_PRICE_ID) -> list[tuple[int, dict[str, Any]]]:
    """(created, event) of one new customer's life, in order, from checkout to cancellation:
    checkout, subscription created, first invoice paid, renewal past due with a failed
    invoice, recovered and paid (invoice, charge, payment intent), canceled. A prefix of
    it is a customer who is still active, or past due."""
    customer, user, sub = new_id("cus_"), new_id("user_"), new_id("sub_")
    ids = {"customer_id": customer, "user_id": user, "subscription_id": sub}
    plan = {"price_id": price_id}
    first, renewal = (start, start + _MONTH), (start + _MONTH, start + 2 * _MONTH)
    invoice, intent, charge = new_id("in_"), new_id("pi_"), new_id("ch_")
    paid = {"invoice_id": invoice, "payment_intent_id": intent, "charge_id": charge}
    recovered = renewal[0] + 2 * _DAY

    def period(p: tuple[int, int]) -> dict[str, int]:
        return {"period_start": p[0], "period_end": p[1]}

    steps: list[tuple[str, int, dict[str, Any]]] = [
        ("checkout.session.completed", start, {"mode": "subscription", "client_reference_id": user}),
        ("customer.subscription.created", start + 1, {"status": "active", **plan, **period(first)}),
        ("invoice.paid", start + 2, {"billing_reason": "subscription_create", **plan, **period(first)}),
        ("customer.subscription.updated", renewal[0] + 60, {"status": "past_due", **plan, **period(renewal)}),
        ("invoice.payment_failed", renewal[0] + 61, {"invoice_id": invoice, **plan, **period(renewal)}),
        ("customer.subscription.updated", recovered, {"status": "active", **plan, **period(renewal)}),
        ("invoice.paid", recovered + 1, {**paid, "attempt_count": 2, **plan, **period(renewal)}),
        ("charge.succeeded", recovered + 2, paid),
        ("payment_intent.succeeded", recovered + 3, paid),
        ("customer.subscription.deleted", renewal[1], {**plan, **period(renewal)}),
    ]
    assert len(steps) == LIFECYCLE_STEPS
    return [(created, sample_event(kind, created=created, **ids, **extra)) for kind, created, extra in steps]


# --- resolved sample values -----------------------------------------------------------


@dataclass(frozen=True)
class _Sample:
    event_type: str
    api_version: str
    new_shape: bool
    event_id: str
    created: int
    livemode: bool
    customer_id: str
    user_id: str | None
    family_id: str | None
    subscription_id: str
    subscription_item_id: str
    invoice_id: str
    charge_id: str
    payment_intent_id: str
    checkout_session_id: str
    price_id: str
    product_id: str
    amount: int
    quantity: int
    currency: str
    status: str
    period_start: int
    period_end: int
    cancel_at_period_end: bool
    cancel_at: int | None
    canceled_at: int | None
    trial_end: int | None
    amount_refunded: int
    failure_code: str | None
    failure_message: str | None
    attempt_count: int
    next_payment_attempt: int | None
    billing_reason: str
    mode: str
    customer_email: str
    description: str | None
    metadata: dict[str, Any]
    client_reference_id: str | None
    customer_metadata: dict[str, Any] | None
    expand_customer: bool
    one_off: bool
    with_payments: bool

    @property
    def total(self) -> int:
        return self.amount * self.quantity

    @property
    def identity(self) -> dict[str, str]:
        found = {"user_id": self.user_id, "family_id": self.family_id}
        return {key: value for key, value in found.items() if value}

    @property
    def failing(self) -> bool:
        return self.event_type in _FAILING_TYPES


def _resolve(
    event_type: str,
    *,
    api_version: str,
    customer_id: str,
    user_id: str | None,
    family_id: str | None,
    event_id: str,
    created: int,
    overrides: dict[str, Any],
) -> _Sample:
    o = overrides
    period_start: int = o.get("period_start", created)
    period_end: int = o.get("period_end", period_start + _MONTH)
    failing = event_type in _FAILING_TYPES
    extra_metadata = {
        **o.get("metadata", {}),
        **{key: o[key] for key in ("plan_id", "feature_code") if key in o},
    }
    quantity: int = o.get("quantity", 1)
    amount: int = o.get("amount", DEFAULT_AMOUNT)
    return _Sample(
        event_type=event_type,
        api_version=api_version,
        new_shape=is_new_shape(api_version),
        event_id=event_id,
        created=created,
        livemode=o.get("livemode", False),
        customer_id=customer_id,
        user_id=user_id,
        family_id=family_id,
        subscription_id=o.get("subscription_id") or new_id("sub_"),
        subscription_item_id=o.get("subscription_item_id") or new_id("si_"),
        invoice_id=o.get("invoice_id") or new_id("in_"),
        charge_id=o.get("charge_id") or new_id("ch_"),
        payment_intent_id=o.get("payment_intent_id") or new_id("pi_"),
        checkout_session_id=o.get("checkout_session_id")
        or new_id("cs_live_" if o.get("livemode") else "cs_test_"),
        price_id=o.get("price_id", DEFAULT_PRICE_ID),
        product_id=o.get("product_id") or new_id("prod_"),
        amount=amount,
        quantity=quantity,
        currency=o.get("currency", DEFAULT_CURRENCY),
        status=o.get("status", _STATUS[event_type]),
        period_start=period_start,
        period_end=period_end,
        cancel_at_period_end=o.get("cancel_at_period_end", False),
        cancel_at=o.get("cancel_at"),
        canceled_at=o.get(
            "canceled_at", created if event_type == "customer.subscription.deleted" else None
        ),
        trial_end=o.get("trial_end", period_end if event_type.endswith("trial_will_end") else None),
        amount_refunded=o.get(
            "amount_refunded", amount * quantity if event_type == "charge.refunded" else 0
        ),
        failure_code=o.get("failure_code", "card_declined" if failing else None),
        failure_message=o.get("failure_message", "Your card was declined." if failing else None),
        attempt_count=o.get("attempt_count", 1),
        next_payment_attempt=o.get(
            "next_payment_attempt",
            created + 3 * _DAY if event_type == "invoice.payment_failed" else None,
        ),
        billing_reason=o.get(
            "billing_reason", "manual" if o.get("one_off") else "subscription_cycle"
        ),
        mode=o.get("mode", "subscription"),
        customer_email=o.get("customer_email", DEFAULT_EMAIL),
        description=o.get("description"),
        metadata=extra_metadata,
        client_reference_id=o.get("client_reference_id", user_id),
        customer_metadata=o.get("customer_metadata"),
        expand_customer=o.get("expand_customer", False),
        one_off=o.get("one_off", False),
        with_payments=o.get("with_payments", False),
    )


# --- envelope and shared parts ------------------------------------------------------


def _envelope(s: _Sample, obj: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"object": obj}
    previous = _previous_attributes(s)
    if previous is not None:
        data["previous_attributes"] = previous
    return {
        "id": s.event_id,
        "object": "event",
        "api_version": s.api_version,
        "created": s.created,
        "data": data,
        "livemode": s.livemode,
        "pending_webhooks": 1,
        "request": _request(s),
        "type": s.event_type,
    }


def _request(s: _Sample) -> dict[str, Any]:
    # Renewals, retries and refunds by Stripe itself come from no API request.
    automatic = s.event_type.startswith(("invoice.", "charge.", "payment_intent."))
    if automatic:
        return {"id": None, "idempotency_key": None}
    return {"id": new_id("req_")[:18], "idempotency_key": str(uuid.uuid4())}


def _previous_attributes(s: _Sample) -> dict[str, Any] | None:
    if s.event_type == "customer.subscription.updated":
        return {"cancel_at_period_end": not s.cancel_at_period_end}
    if s.event_type == "charge.refunded":
        return {"amount_refunded": 0, "refunded": False}
    return None


def _customer(s: _Sample) -> str | dict[str, Any]:
    if s.customer_metadata is None and not s.expand_customer:
        return s.customer_id
    return {
        "id": s.customer_id,
        "object": "customer",
        "address": None,
        "balance": 0,
        "created": s.created - 7 * _DAY,
        "currency": s.currency,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "email": s.customer_email,
        "invoice_prefix": s.customer_id[-8:].upper(),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": s.livemode,
        "metadata": dict(s.customer_metadata or {}),
        "name": "Jenny Rosen",
        "phone": None,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": None,
    }


def _object_metadata(s: _Sample, *, with_identity: bool = True) -> dict[str, Any]:
    return {**(s.identity if with_identity else {}), **s.metadata}


def _price(s: _Sample) -> dict[str, Any]:
    recurring: dict[str, Any] = {
        "interval": "month",
        "interval_count": 1,
        "meter": None,
        "trial_period_days": None,
        "usage_type": "licensed",
    }
    if not s.new_shape:
        recurring["aggregate_usage"] = None  # removed in 2025-03-31.basil
    return {
        "id": s.price_id,
        "object": "price",
        "active": True,
        "billing_scheme": "per_unit",
        "created": s.created - 30 * _DAY,
        "currency": s.currency,
        "custom_unit_amount": None,
        "livemode": s.livemode,
        "lookup_key": None,
        "metadata": {},
        "nickname": None,
        "product": s.product_id,
        "recurring": recurring,
        "tax_behavior": "unspecified",
        "tiers_mode": None,
        "transform_quantity": None,
        "type": "recurring",
        "unit_amount": s.amount,
        "unit_amount_decimal": str(s.amount),
    }


def _plan(s: _Sample) -> dict[str, Any]:
    return {
        "id": s.price_id,
        "object": "plan",
        "active": True,
        "amount": s.amount,
        "amount_decimal": str(s.amount),
        "billing_scheme": "per_unit",
        "created": s.created - 30 * _DAY,
        "currency": s.currency,
        "interval": "month",
        "interval_count": 1,
        "livemode": s.livemode,
        "metadata": {},
        "meter": None,
        "nickname": None,
        "product": s.product_id,
        "tiers_mode": None,
        "transform_usage": None,
        "trial_period_days": None,
        "usage_type": "licensed",
    }


def _list(data: list[dict[str, Any]], url: str) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": False, "total_count": len(data), "url": url}


# --- subscriptions ------------------------------------------------------------------


def _subscription(s: _Sample) -> dict[str, Any]:
    sub: dict[str, Any] = {
        "id": s.subscription_id,
        "object": "subscription",
        "application": None,
        "application_fee_percent": None,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
        "billing_cycle_anchor": s.period_start,
        "billing_cycle_anchor_config": None,
        "cancel_at": s.cancel_at,
        "cancel_at_period_end": s.cancel_at_period_end,
        "canceled_at": s.canceled_at,
        "cancellation_details": {
            "comment": None,
            "feedback": None,
            "reason": "cancellation_requested" if s.canceled_at else None,
        },
        "collection_method": "charge_automatically",
        "created": s.period_start,
        "currency": s.currency,
        "customer": _customer(s),
        "days_until_due": None,
        "default_payment_method": "pm_1" + s.subscription_id[-20:],
        "default_source": None,
        "default_tax_rates": [],
        "description": s.description,
        "discounts": [],
        "ended_at": s.canceled_at if s.status == "canceled" else None,
        "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
        "items": _list(
            [_subscription_item(s)], f"/v1/subscription_items?subscription={s.subscription_id}"
        ),
        "latest_invoice": s.invoice_id,
        "livemode": s.livemode,
        "metadata": _object_metadata(s),
        "next_pending_invoice_item_invoice": None,
        "on_behalf_of": None,
        "pause_collection": None,
        "payment_settings": {
            "payment_method_options": None,
            "payment_method_types": None,
            "save_default_payment_method": "off",
        },
        "pending_invoice_item_interval": None,
        "pending_setup_intent": None,
        "pending_update": None,
        "schedule": None,
        "start_date": s.period_start,
        "status": s.status,
        "test_clock": None,
        "transfer_data": None,
        "trial_end": s.trial_end,
        "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
        "trial_start": s.period_start if s.trial_end else None,
    }
    if not s.new_shape:
        # Moved onto the items (the period) or removed in 2025-03-31.basil.
        sub.update(
            current_period_start=s.period_start,
            current_period_end=s.period_end,
            plan=_plan(s),
            quantity=s.quantity,
            billing_thresholds=None,
        )
    return sub


def _subscription_item(s: _Sample) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": s.subscription_item_id,
        "object": "subscription_item",
        "created": s.period_start,
        "discounts": [],
        "metadata": {},
        "plan": _plan(s),
        "price": _price(s),
        "quantity": s.quantity,
        "subscription": s.subscription_id,
        "tax_rates": [],
    }
    if s.new_shape:
        item.update(current_period_start=s.period_start, current_period_end=s.period_end)
    else:
        item["billing_thresholds"] = None
    return item


# --- invoices -----------------------------------------------------------------------


def _invoice(s: _Sample) -> dict[str, Any]:
    paid = s.event_type in _PAID_INVOICE_TYPES
    invoice = {
        **_invoice_common(s, paid),
        **(_invoice_new_fields(s, paid) if s.new_shape else _invoice_old_fields(s, paid)),
    }
    return invoice


def _invoice_common(s: _Sample, paid: bool) -> dict[str, Any]:
    # Stripe sets a subscription invoice's own period to the one *before* its line's period.
    own_start = s.period_start if s.one_off else s.period_start - _MONTH
    return {
        "id": s.invoice_id,
        "object": "invoice",
        "account_country": "US",
        "account_name": "Example Inc.",
        "account_tax_ids": None,
        "amount_due": s.total,
        "amount_paid": s.total if paid else 0,
        "amount_remaining": 0 if paid else s.total,
        "amount_shipping": 0,
        "application": None,
        "attempt_count": s.attempt_count,
        "attempted": True,
        "auto_advance": not paid,
        "automatic_tax": {
            "disabled_reason": None,
            "enabled": False,
            "liability": None,
            "status": None,
        },
        "billing_reason": s.billing_reason,
        "collection_method": "charge_automatically",
        "created": s.created,
        "currency": s.currency,
        "custom_fields": None,
        "customer": _customer(s),
        "customer_address": None,
        "customer_email": s.customer_email,
        "customer_name": "Jenny Rosen",
        "customer_phone": None,
        "customer_shipping": None,
        "customer_tax_exempt": "none",
        "customer_tax_ids": [],
        "default_payment_method": None,
        "default_source": None,
        "default_tax_rates": [],
        "description": s.description,
        "discounts": [],
        "due_date": None,
        "effective_at": s.created,
        "ending_balance": 0,
        "footer": None,
        "from_invoice": None,
        "hosted_invoice_url": f"https://invoice.stripe.com/i/acct_1Example/test_{s.invoice_id}",
        "invoice_pdf": f"https://pay.stripe.com/invoice/acct_1Example/test_{s.invoice_id}/pdf",
        "issuer": {"type": "self"},
        "last_finalization_error": None,
        "latest_revision": None,
        "lines": _list([_invoice_line(s)], f"/v1/invoices/{s.invoice_id}/lines"),
        "livemode": s.livemode,
        "metadata": _object_metadata(s, with_identity=s.one_off),
        "next_payment_attempt": s.next_payment_attempt,
        "number": f"{s.customer_id[-8:].upper()}-0001",
        "on_behalf_of": None,
        "payment_settings": {
            "default_mandate": None,
            "payment_method_options": None,
            "payment_method_types": None,
        },
        "period_end": s.period_start,
        "period_start": own_start,
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "receipt_number": None,
        "shipping_cost": None,
        "shipping_details": None,
        "starting_balance": 0,
        "statement_descriptor": None,
        "status": s.status,
        "status_transitions": {
            "finalized_at": s.created,
            "marked_uncollectible_at": None,
            "paid_at": s.created if paid else None,
            "voided_at": None,
        },
        "subtotal": s.total,
        "subtotal_excluding_tax": s.total,
        "test_clock": None,
        "total": s.total,
        "total_discount_amounts": [],
        "total_excluding_tax": s.total,
        "webhooks_delivered_at": s.created,
    }


def _invoice_old_fields(s: _Sample, paid: bool) -> dict[str, Any]:
    return {
        "charge": s.charge_id,
        "paid": paid,
        "paid_out_of_band": False,
        "payment_intent": s.payment_intent_id,
        "quote": None,
        "subscription": None if s.one_off else s.subscription_id,
        "subscription_details": {"metadata": {} if s.one_off else _object_metadata(s)},
        "tax": None,
        "total_tax_amounts": [],
    }


def _invoice_new_fields(s: _Sample, paid: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "amount_overpaid": 0,
        "automatically_finalizes_at": None,
        "parent": None if s.one_off else _invoice_parent(s),
        "total_pretax_credit_amounts": [],
        "total_taxes": [],
    }
    if s.with_payments:
        fields["payments"] = _list(
            [_invoice_payment(s, paid)], f"/v1/invoices/{s.invoice_id}/payments"
        )
    return fields


def _invoice_parent(s: _Sample) -> dict[str, Any]:
    return {
        "quote_details": None,
        "subscription_details": {
            "metadata": _object_metadata(s),
            "subscription": s.subscription_id,
            "subscription_proration_date": None,
        },
        "type": "subscription_details",
    }


def _invoice_payment(s: _Sample, paid: bool) -> dict[str, Any]:
    return {
        "id": new_id("inpay_"),
        "object": "invoice_payment",
        "amount_paid": s.total if paid else None,
        "amount_requested": s.total,
        "created": s.created,
        "currency": s.currency,
        "invoice": s.invoice_id,
        "is_default": True,
        "livemode": s.livemode,
        "payment": {"payment_intent": s.payment_intent_id, "type": "payment_intent"},
        "status": "paid" if paid else "open",
        "status_transitions": {"canceled_at": None, "paid_at": s.created if paid else None},
    }


def _invoice_line(s: _Sample) -> dict[str, Any]:
    line: dict[str, Any] = {
        "id": new_id("il_"),
        "object": "line_item",
        "amount": s.total,
        "currency": s.currency,
        "description": f"{s.quantity} × Basic (at {s.amount / 100:.2f} {s.currency} / month)",
        "discount_amounts": [],
        "discountable": True,
        "discounts": [],
        "livemode": s.livemode,
        "metadata": {} if s.one_off else _object_metadata(s),
        "period": {"end": s.period_end, "start": s.period_start},
        "quantity": s.quantity,
    }
    line.update(_new_line_fields(s) if s.new_shape else _old_line_fields(s))
    return line


def _old_line_fields(s: _Sample) -> dict[str, Any]:
    return {
        "amount_excluding_tax": s.total,
        "invoice_item": new_id("ii_") if s.one_off else None,
        "plan": None if s.one_off else _plan(s),
        "price": _price(s),
        "proration": False,
        "proration_details": {"credited_items": None},
        "subscription": None if s.one_off else s.subscription_id,
        "subscription_item": None if s.one_off else s.subscription_item_id,
        "tax_amounts": [],
        "tax_rates": [],
        "type": "invoiceitem" if s.one_off else "subscription",
        "unit_amount_excluding_tax": str(s.amount),
    }


def _new_line_fields(s: _Sample) -> dict[str, Any]:
    return {
        "invoice": s.invoice_id,
        "parent": _one_off_line_parent() if s.one_off else _subscription_line_parent(s),
        "pretax_credit_amounts": [],
        "pricing": {
            "price_details": {"price": s.price_id, "product": s.product_id},
            "type": "price_details",
            "unit_amount_decimal": str(s.amount),
        },
        "taxes": [],
    }


def _subscription_line_parent(s: _Sample) -> dict[str, Any]:
    return {
        "invoice_item_details": None,
        "subscription_item_details": {
            "invoice_item": None,
            "proration": False,
            "proration_details": {"credited_items": None},
            "subscription": s.subscription_id,
            "subscription_item": s.subscription_item_id,
        },
        "type": "subscription_item_details",
    }


def _one_off_line_parent() -> dict[str, Any]:
    return {
        "invoice_item_details": {
            "invoice_item": new_id("ii_"),
            "proration": False,
            "proration_details": {"credited_items": None},
            "subscription": None,
        },
        "subscription_item_details": None,
        "type": "invoice_item_details",
    }


# --- charges and payment intents ----------------------------------------------------


def _charge(s: _Sample) -> dict[str, Any]:
    succeeded = s.status == "succeeded"
    charge: dict[str, Any] = {
        "id": s.charge_id,
        "object": "charge",
        "amount": s.total,
        "amount_captured": s.total if succeeded else 0,
        "amount_refunded": s.amount_refunded,
        "application": None,
        "application_fee": None,
        "application_fee_amount": None,
        "balance_transaction": new_id("txn_") if succeeded else None,
        "billing_details": {
            "address": {
                "city": None,
                "country": "US",
                "line1": None,
                "line2": None,
                "postal_code": "94107",
                "state": None,
            },
            "email": s.customer_email,
            "name": "Jenny Rosen",
            "phone": None,
        },
        "calculated_statement_descriptor": "EXAMPLE",
        "captured": succeeded,
        "created": s.created,
        "currency": s.currency,
        "customer": _customer(s),
        "description": s.description,
        "destination": None,
        "dispute": None,
        "disputed": False,
        "failure_balance_transaction": None,
        "failure_code": s.failure_code,
        "failure_message": s.failure_message,
        "fraud_details": {},
        "livemode": s.livemode,
        "metadata": _object_metadata(s),
        "on_behalf_of": None,
        "outcome": _outcome(s),
        "paid": succeeded,
        "payment_intent": s.payment_intent_id,
        "payment_method": "pm_1" + s.charge_id[-20:],
        "payment_method_details": _card_details(),
        "receipt_email": None,
        "receipt_number": None,
        "receipt_url": f"https://pay.stripe.com/receipts/payment/{s.charge_id}",
        "refunded": s.amount_refunded >= s.total > 0,
        "review": None,
        "shipping": None,
        "source": None,
        "source_transfer": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": s.status,
        "transfer_data": None,
        "transfer_group": None,
    }
    if not s.new_shape:
        charge["invoice"] = s.invoice_id  # removed from Charge in 2025-03-31.basil
    return charge


def _outcome(s: _Sample) -> dict[str, Any]:
    if s.failing:
        return {
            "network_status": "declined_by_network",
            "reason": "generic_decline",
            "risk_level": "normal",
            "risk_score": 33,
            "seller_message": "The bank did not return any further details with this decline.",
            "type": "issuer_declined",
        }
    return {
        "network_status": "approved_by_network",
        "reason": None,
        "risk_level": "normal",
        "risk_score": 42,
        "seller_message": "Payment complete.",
        "type": "authorized",
    }


def _card_details() -> dict[str, Any]:
    return {
        "card": {
            "brand": "visa",
            "checks": {
                "address_line1_check": None,
                "address_postal_code_check": "pass",
                "cvc_check": "pass",
            },
            "country": "US",
            "exp_month": 12,
            "exp_year": 2034,
            "fingerprint": secrets.token_hex(8),
            "funding": "credit",
            "last4": "4242",
            "network": "visa",
            "three_d_secure": None,
            "wallet": None,
        },
        "type": "card",
    }


def _payment_intent(s: _Sample) -> dict[str, Any]:
    succeeded = s.status == "succeeded"
    intent: dict[str, Any] = {
        "id": s.payment_intent_id,
        "object": "payment_intent",
        "amount": s.total,
        "amount_capturable": 0,
        "amount_details": {"tip": {}},
        "amount_received": s.total if succeeded else 0,
        "application": None,
        "application_fee_amount": None,
        "automatic_payment_methods": None,
        "canceled_at": None,
        "cancellation_reason": None,
        "capture_method": "automatic",
        "client_secret": f"{s.payment_intent_id}_secret_{secrets.token_hex(12)}",
        "confirmation_method": "automatic",
        "created": s.created,
        "currency": s.currency,
        "customer": _customer(s),
        "description": s.description,
        "last_payment_error": _last_payment_error(s),
        "latest_charge": s.charge_id,
        "livemode": s.livemode,
        "metadata": _object_metadata(s),
        "next_action": None,
        "on_behalf_of": None,
        "payment_method": None if s.failing else "pm_1" + s.payment_intent_id[-20:],
        "payment_method_configuration_details": None,
        "payment_method_options": {
            "card": {
                "installments": None,
                "mandate_options": None,
                "network": None,
                "request_three_d_secure": "automatic",
            }
        },
        "payment_method_types": ["card"],
        "processing": None,
        "receipt_email": s.customer_email,
        "review": None,
        "setup_future_usage": "off_session",
        "shipping": None,
        "source": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": s.status,
        "transfer_data": None,
        "transfer_group": None,
    }
    if not s.new_shape:
        intent["invoice"] = s.invoice_id  # removed from PaymentIntent in 2025-03-31.basil
    return intent


def _last_payment_error(s: _Sample) -> dict[str, Any] | None:
    if s.failure_code is None and s.failure_message is None:
        return None
    code = s.failure_code or ""
    return {
        "charge": s.charge_id,
        "code": s.failure_code,
        "decline_code": "generic_decline",
        "doc_url": "https://docs.stripe.com/error-codes/" + code.replace("_", "-"),
        "message": s.failure_message,
        "payment_method": {
            "id": "pm_1" + s.payment_intent_id[-20:],
            "object": "payment_method",
            "type": "card",
        },
        "type": "card_error",
    }


# --- checkout sessions --------------------------------------------------------------


def _checkout_session(s: _Sample) -> dict[str, Any]:
    subscription_mode = s.mode == "subscription"
    session: dict[str, Any] = {
        "id": s.checkout_session_id,
        "object": "checkout.session",
        "adaptive_pricing": {"enabled": False},
        "after_expiration": None,
        "allow_promotion_codes": None,
        "amount_subtotal": s.total,
        "amount_total": s.total,
        "automatic_tax": {"enabled": False, "liability": None, "status": None},
        "billing_address_collection": None,
        "cancel_url": "https://example.com/billing/cancel",
        "client_reference_id": s.client_reference_id,
        "client_secret": None,
        "consent": None,
        "consent_collection": None,
        "created": s.created - 120,
        "currency": s.currency,
        "currency_conversion": None,
        "custom_fields": [],
        "custom_text": {
            "after_submit": None,
            "shipping_address": None,
            "submit": None,
            "terms_of_service_acceptance": None,
        },
        "customer": _customer(s),
        "customer_creation": "always",
        "customer_details": {
            "address": {
                "city": None,
                "country": "US",
                "line1": None,
                "line2": None,
                "postal_code": "94107",
                "state": None,
            },
            "email": s.customer_email,
            "name": "Jenny Rosen",
            "phone": None,
            "tax_exempt": "none",
            "tax_ids": [],
        },
        "customer_email": None,
        "expires_at": s.created - 120 + _DAY,
        "invoice": s.invoice_id if subscription_mode else None,
        "invoice_creation": None if subscription_mode else {"enabled": False, "invoice_data": None},
        "livemode": s.livemode,
        "locale": None,
        "metadata": _object_metadata(s),
        "mode": s.mode,
        "payment_intent": None if subscription_mode else s.payment_intent_id,
        "payment_link": None,
        "payment_method_collection": "always",
        "payment_method_configuration_details": None,
        "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
        "payment_method_types": ["card"],
        "payment_status": "paid",
        "phone_number_collection": {"enabled": False},
        "recovered_from": None,
        "saved_payment_method_options": None,
        "setup_intent": None,
        "shipping_address_collection": None,
        "shipping_cost": None,
        "shipping_options": [],
        "status": s.status,
        "submit_type": None,
        "subscription": s.subscription_id if subscription_mode else None,
        "success_url": "https://example.com/billing/success?session_id={CHECKOUT_SESSION_ID}",
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted",
        "url": None,
    }
    if s.new_shape:
        session.update(collected_information={"shipping_details": None}, discounts=[])
    else:
        session["shipping_details"] = None  # removed in 2025-03-31.basil
    return session


_OBJECT_BUILDERS = {
    "checkout.session": _checkout_session,
    "invoice": _invoice,
    "charge": _charge,
    "payment_intent": _payment_intent,
    "customer.subscription": _subscription,
}
