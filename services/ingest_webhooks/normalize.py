"""Turn a verified Stripe webhook event into a normalized ``payment.v1.PaymentEvent``.

Contract of :func:`normalize`:

* The input is the parsed JSON of an event whose signature was already verified.
* A type outside :data:`PROJECTED_TYPES` gives ``None``; the caller archives and counts it.
* A projected event that lacks what the projections need raises :class:`MalformedEvent`,
  whose message names the field path and never echoes the payload. Needed are the
  event's ``id``, ``type``, ``created`` and ``data.object``, the object's ``id`` and, for
  subscriptions, invoices and checkout sessions in subscription mode, its ``customer``.
  Integers must be JSON integers.
* Guest payments: a charge, a payment intent or a checkout session in payment mode may
  have no customer (Payment Links, guest checkout). ``customer_id`` is then empty and
  :func:`partition_key` gives the payment's own id, so all events of one payment share a
  partition. A dispute (``charge.dispute.*``) names no customer unless its charge is
  expanded; it carries its payment's ids, its own id (``dispute_id``), its status and
  its reason, and no amount.
* Nothing else raises: any other oddity in the payload is a ``MalformedEvent`` too.

API versions. Both the 2024-06-20 shape and the 2025-03-31.basil-and-later shape are read.
The normalizer looks at which fields the payload carries, not at ``api_version``, so a
payload is read correctly whatever version string it claims:

* invoice -> subscription: ``parent.subscription_details.subscription`` (new), else the
  top-level ``subscription`` (old; an id or the expanded object).
* invoice -> payment intent / charge: top-level ``payment_intent`` / ``charge`` (old), else
  ``payments.data[0].payment`` (new, only when Stripe included ``payments``), else empty.
* billing period of a subscription: its items' ``current_period_start/end`` (new; the
  earliest start and latest end over the items), else the subscription's own (old).
* billing period of an invoice: the period of its subscription line (the first
  non-proration subscription line, else the first line), else ``period_start/period_end``
  of the invoice (which Stripe sets to the *previous* period for subscription invoices).
* price of a subscription: ``items.data[0].price``, else the legacy ``items.data[0].plan``;
  of an invoice line: ``pricing.price_details`` (new), else ``price``, else ``plan`` (old).

User and family resolution. ``user_id`` and ``family_id`` are resolved independently; each
takes the first non-blank string found in this order:

1. the event object's own ``metadata``;
2. the subscription's metadata where the payload carries it: for an invoice
   ``subscription_details.metadata`` (old), ``parent.subscription_details.metadata`` (new)
   and the metadata of an expanded ``subscription`` object; for a checkout session an
   expanded ``subscription`` object (charges and payment intents carry none);
3. the metadata of an expanded ``customer`` object;
4. for ``user_id`` only: a checkout session's ``client_reference_id``.

Both stay empty when nothing is found; the worker then resolves them from its customers
table. ``plan_id`` and ``feature_code`` come from the same metadata chain (steps 1-3), under
the keys ``plan_id`` and ``feature_code``; the worker maps ``price_id`` to a plan otherwise.
``PaymentEvent.metadata`` is the object's own metadata only, with non-string values
JSON-encoded.

Amounts: an invoice's ``amount`` is ``amount_paid`` for ``invoice.paid`` /
``invoice.payment_succeeded`` and ``amount_due`` otherwise; a subscription's is the first
item's unit amount times its quantity; a checkout session's is ``amount_total``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from payment.v1 import events_pb2
from services.ingest_webhooks.stripe_models import (
    Charge,
    CheckoutSession,
    Customer,
    Dispute,
    Envelope,
    Invoice,
    InvoiceLine,
    InvoicePaymentDetails,
    PaymentError,
    PaymentIntent,
    Price,
    StripeEvent,
    Subscription,
    SubscriptionItem,
    TypedEvent,
)
from shared.kafka import payment_event_key

# A dispute's life: opened, changed (evidence, status), funds moved, closed (won or lost).
DISPUTE_TYPES: frozenset[str] = frozenset(
    {
        "charge.dispute.created",
        "charge.dispute.updated",
        "charge.dispute.closed",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
    }
)

PROJECTED_TYPES: frozenset[str] = frozenset(
    {
        "checkout.session.completed",
        "invoice.paid",
        "invoice.payment_succeeded",
        "invoice.payment_failed",
        "invoice.payment_action_required",
        "charge.succeeded",
        "charge.failed",
        "charge.refunded",
        *DISPUTE_TYPES,
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.trial_will_end",
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
    }
)

_PAID_INVOICE_TYPES = frozenset({"invoice.paid", "invoice.payment_succeeded"})
_MAX_REPORTED_ERRORS = 3
_PAYMENT_EVENT_FIELDS = frozenset(f.name for f in events_pb2.PaymentEvent.DESCRIPTOR.fields)


class MalformedEvent(ValueError):
    """A projected event lacks a needed field or has one of the wrong type.

    The message names the field path (``data.object.customer``) and what is wrong with it,
    never the payload's values, so it is safe to log.
    """


def partition_key(event: events_pb2.PaymentEvent) -> str:
    """The Kafka key of a normalized event: its customer, else the payment's own id
    (the payment intent id first, so all events of one guest payment share a partition)."""
    return payment_event_key(event)


def normalize(event: dict[str, Any]) -> events_pb2.PaymentEvent | None:
    """Normalize a verified Stripe event; ``None`` when its type is not projected.

    Raises :class:`MalformedEvent` when a projected event cannot be normalized.
    """
    if not isinstance(event, dict):
        raise MalformedEvent("malformed Stripe event: expected a JSON object")
    event_type = event.get("type")
    kind = _KINDS.get(event_type) if isinstance(event_type, str) else None
    if kind is None:
        _parse(StripeEvent, event, prefix=())  # a malformed envelope is still named
        return None
    envelope = _parse_typed(kind, event)
    projection = kind.project(envelope.type, envelope.data.object)
    return _build(
        envelope, {**_common_fields(envelope, kind.object_type, projection), **projection.fields}
    )


# --- parsing and errors -------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], data: Any, prefix: tuple[str, ...]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # `from None`: a chained ValidationError would print the offending input values.
        raise MalformedEvent(_describe(exc, prefix)) from None


def _parse_typed(kind: _Kind, event: dict[str, Any]) -> TypedEvent[Any]:
    """The envelope and its object in one validation, failing as the envelope first,
    then the object's kind, then its fields (the order of the checks' meaning)."""
    try:
        envelope = kind.model.model_validate(event)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        outside = [e for e in errors if tuple(e["loc"][:2]) != ("data", "object") or len(e["loc"]) == 2]
        if not outside:
            data = event.get("data")
            _check_object_type(data.get("object") if isinstance(data, dict) else None, event["type"], kind.object_type)
        raise MalformedEvent(_message(outside or errors, ())) from None
    _check_object_type(envelope.data.object.object, envelope.type, kind.object_type)
    return envelope


def _describe(exc: ValidationError, prefix: tuple[str, ...]) -> str:
    return _message(exc.errors(include_url=False, include_input=False, include_context=False), prefix)


def _message(errors: Sequence[Any], prefix: tuple[str, ...]) -> str:
    problems = [f"{_path((*prefix, *error['loc']))}: {error['msg']}" for error in errors]
    text = "; ".join(problems[:_MAX_REPORTED_ERRORS])
    hidden = len(problems) - _MAX_REPORTED_ERRORS
    suffix = f" (and {hidden} more)" if hidden > 0 else ""
    return f"malformed Stripe event: {text}{suffix}"


def _path(loc: Sequence[str | int]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path or "event"


def _check_object_type(obj: Any, event_type: str, expected: str) -> None:
    """`obj` is the object's `object` field (a model's, or a raw dict's whole object)."""
    actual = obj.get("object") if isinstance(obj, dict) else obj
    if actual is not None and actual != expected:
        raise MalformedEvent(
            f"malformed Stripe event: data.object.object: {event_type} must carry a {expected!r}"
        )


def _build(event: Envelope, fields: dict[str, Any]) -> events_pb2.PaymentEvent:
    unknown = fields.keys() - _PAYMENT_EVENT_FIELDS
    if unknown:  # a bug here, not a bad payload: keep it out of the ValueError net below
        raise TypeError(f"PaymentEvent has no fields {sorted(unknown)}")
    try:
        return events_pb2.PaymentEvent(**fields)
    except ValueError as exc:
        # Text that is not valid UTF-8 (lone surrogates from JSON escapes) or a product of
        # two valid integers that overflows int64.
        raise MalformedEvent(
            f"malformed Stripe event {event.id}: a value does not fit PaymentEvent "
            f"({type(exc).__name__})"
        ) from None


# --- shared envelope fields ---------------------------------------------------------


@dataclass(frozen=True)
class _Projection:
    """What a per-kind normalizer extracts from the event object."""

    object_id: str
    customer: Customer | None
    metadata: Mapping[str, Any]
    # Metadata maps in resolution order (the object's own first); see the module docstring.
    identity: Sequence[Mapping[str, Any]]
    fields: dict[str, Any] = field(default_factory=dict)
    # A one-time payment, which Stripe lets happen without a customer.
    guest_allowed: bool = False


def _common_fields(event: Envelope, object_type: str, p: _Projection) -> dict[str, Any]:
    return {
        "source": events_pb2.EVENT_SOURCE_STRIPE_WEBHOOK,
        "event_id": event.id,
        "event_type": event.type,
        "created": event.created,
        "customer_id": _customer_id(p.customer, p.guest_allowed),
        "api_version": event.api_version,
        "livemode": event.livemode,
        "object_type": object_type,
        "object_id": p.object_id,
        "metadata": _stringify(p.metadata),
        "user_id": _resolve("user_id", p.identity),
        "family_id": _resolve("family_id", p.identity),
        "plan_id": _resolve("plan_id", p.identity),
        "feature_code": _resolve("feature_code", p.identity),
    }


def _customer_id(customer: Customer | None, guest_allowed: bool) -> str:
    if customer is None:
        if guest_allowed:
            return ""
        raise MalformedEvent(
            "malformed Stripe event: data.object.customer: required "
            "(a subscription or invoice always has a customer; it is the Kafka key)"
        )
    return customer.id


def _customer_metadata(customer: Customer | None) -> Mapping[str, Any]:
    return customer.metadata if customer is not None else {}


def _customer_email(customer: Customer | None) -> str | None:
    return customer.email if customer is not None else None


def _resolve(key: str, sources: Sequence[Mapping[str, Any]]) -> str:
    for source in sources:
        value = source.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return ""


def _stringify(metadata: Mapping[str, Any]) -> dict[str, str]:
    return {key: _metadata_value(value) for key, value in metadata.items()}


def _metadata_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


def _id(ref: _HasId | None) -> str | None:
    return ref.id if ref is not None else None


# --- subscriptions ------------------------------------------------------------------


def _project_subscription(event_type: str, sub: Subscription) -> _Projection:
    item = _first_item(sub)
    price = _item_price(item)
    start, end = _subscription_period(sub)
    return _Projection(
        object_id=sub.id,
        customer=sub.customer,
        metadata=sub.metadata,
        # The object is the subscription itself, so steps 1 and 2 coincide.
        identity=[sub.metadata, _customer_metadata(sub.customer)],
        fields={
            "subscription_id": sub.id,
            "status": sub.status,
            "amount": _item_amount(item),
            "currency": (price.currency if price else None) or sub.currency,
            "price_id": _id(price),
            "product_id": _id(price.product) if price else None,
            "period_start": start,
            "period_end": end,
            "expires_at": end,
            "cancel_at_period_end": sub.cancel_at_period_end,
            "cancel_at": sub.cancel_at,
            "canceled_at": sub.canceled_at,
            "trial_end": sub.trial_end,
            "description": sub.description,
            "customer_email": _customer_email(sub.customer),
        },
    )


def _first_item(sub: Subscription) -> SubscriptionItem | None:
    items = sub.items.data if sub.items is not None else []
    return items[0] if items else None


def _item_price(item: SubscriptionItem | None) -> Price | None:
    return (item.price or item.plan) if item is not None else None


def _item_amount(item: SubscriptionItem | None) -> int | None:
    price = _item_price(item)
    if item is None or price is None or price.unit_amount is None:
        return None
    return price.unit_amount * (item.quantity if item.quantity is not None else 1)


def _subscription_period(sub: Subscription) -> tuple[int | None, int | None]:
    items = sub.items.data if sub.items is not None else []
    starts = [i.current_period_start for i in items if i.current_period_start is not None]
    ends = [i.current_period_end for i in items if i.current_period_end is not None]
    # Items of one subscription can be on different cycles; cover all of them.
    start = min(starts) if starts else sub.current_period_start
    end = max(ends) if ends else sub.current_period_end
    return start, end


# --- invoices -----------------------------------------------------------------------


def _project_invoice(event_type: str, invoice: Invoice) -> _Projection:
    subscription = _invoice_subscription(invoice)
    line = _subscription_line(invoice)
    price_id, product_id = _line_price(line)
    start, end = _invoice_period(invoice, line)
    payment_intent_id, charge_id = _invoice_payment_ids(invoice)
    failure = _invoice_failure(invoice)
    paid = event_type in _PAID_INVOICE_TYPES
    return _Projection(
        object_id=invoice.id,
        customer=invoice.customer,
        metadata=invoice.metadata,
        identity=[
            invoice.metadata,
            *_invoice_subscription_metadata(invoice, subscription),
            _customer_metadata(invoice.customer),
        ],
        fields={
            "invoice_id": invoice.id,
            "subscription_id": _id(subscription),
            "payment_intent_id": payment_intent_id,
            "charge_id": charge_id,
            "amount": invoice.amount_paid if paid else invoice.amount_due,
            "currency": invoice.currency,
            "status": invoice.status,
            "price_id": price_id,
            "product_id": product_id,
            "period_start": start,
            "period_end": end,
            # Only a subscription invoice pays for a period of access.
            "expires_at": end if subscription is not None else None,
            "failure_code": failure.code if failure else None,
            "failure_message": failure.message if failure else None,
            "attempt_count": invoice.attempt_count,
            "next_payment_attempt": invoice.next_payment_attempt,
            "billing_reason": invoice.billing_reason,
            "customer_email": invoice.customer_email or _customer_email(invoice.customer),
            "description": invoice.description,
        },
    )


def _invoice_subscription(invoice: Invoice) -> Subscription | None:
    details = invoice.parent.subscription_details if invoice.parent is not None else None
    if details is not None and details.subscription is not None:
        return details.subscription
    return invoice.subscription


def _invoice_subscription_metadata(
    invoice: Invoice, subscription: Subscription | None
) -> list[Mapping[str, Any]]:
    sources: list[Mapping[str, Any]] = []
    if invoice.subscription_details is not None:
        sources.append(invoice.subscription_details.metadata)
    if invoice.parent is not None and invoice.parent.subscription_details is not None:
        sources.append(invoice.parent.subscription_details.metadata)
    if subscription is not None:
        sources.append(subscription.metadata)  # empty unless Stripe expanded it
    return sources


def _subscription_line(invoice: Invoice) -> InvoiceLine | None:
    lines = invoice.lines.data if invoice.lines is not None else []
    # Proration lines come first on an upgrade invoice; they do not carry the new period.
    for line in lines:
        if _is_subscription_line(line):
            return line
    return lines[0] if lines else None


def _is_subscription_line(line: InvoiceLine) -> bool:
    details = line.parent.subscription_item_details if line.parent is not None else None
    if details is not None:
        return not details.proration
    return line.type == "subscription" and not line.proration


def _line_price(line: InvoiceLine | None) -> tuple[str | None, str | None]:
    if line is None:
        return None, None
    details = line.pricing.price_details if line.pricing is not None else None
    if details is not None and details.price is not None:
        product = details.product or details.price.product
        return details.price.id, _id(product)
    price = line.price or line.plan
    if price is None:
        return None, None
    return price.id, _id(price.product)


def _invoice_period(invoice: Invoice, line: InvoiceLine | None) -> tuple[int | None, int | None]:
    period = line.period if line is not None else None
    start = period.start if period is not None and period.start is not None else None
    end = period.end if period is not None and period.end is not None else None
    return (
        start if start is not None else invoice.period_start,
        end if end is not None else invoice.period_end,
    )


def _invoice_payment_ids(invoice: Invoice) -> tuple[str | None, str | None]:
    if invoice.payment_intent is not None or invoice.charge is not None:
        return _id(invoice.payment_intent), _id(invoice.charge)
    payment = _first_invoice_payment(invoice)
    if payment is None:
        return None, None
    return _id(payment.payment_intent), _id(payment.charge)


def _first_invoice_payment(invoice: Invoice) -> InvoicePaymentDetails | None:
    payments = invoice.payments.data if invoice.payments is not None else []
    return payments[0].payment if payments else None


def _invoice_failure(invoice: Invoice) -> PaymentError | None:
    # Invoices carry no failure of their own; report one only when the payload has it.
    intent = invoice.payment_intent
    if intent is not None and intent.last_payment_error is not None:
        return intent.last_payment_error
    charge = invoice.charge
    if charge is not None and (charge.failure_code or charge.failure_message):
        return PaymentError(code=charge.failure_code, message=charge.failure_message)
    return invoice.last_finalization_error


# --- charges and payment intents ----------------------------------------------------


def _project_charge(event_type: str, charge: Charge) -> _Projection:
    billing_email = charge.billing_details.email if charge.billing_details else None
    return _Projection(
        object_id=charge.id,
        customer=charge.customer,
        metadata=charge.metadata,
        identity=[charge.metadata, _customer_metadata(charge.customer)],
        guest_allowed=True,
        fields={
            "charge_id": charge.id,
            "payment_intent_id": _id(charge.payment_intent),
            "invoice_id": _id(charge.invoice),
            "amount": charge.amount,
            "amount_refunded": charge.amount_refunded,
            "currency": charge.currency,
            "status": charge.status,
            "failure_code": charge.failure_code,
            "failure_message": charge.failure_message,
            "description": charge.description,
            "customer_email": billing_email
            or charge.receipt_email
            or _customer_email(charge.customer),
        },
    )


def _project_payment_intent(event_type: str, intent: PaymentIntent) -> _Projection:
    error = intent.last_payment_error
    return _Projection(
        object_id=intent.id,
        customer=intent.customer,
        metadata=intent.metadata,
        identity=[intent.metadata, _customer_metadata(intent.customer)],
        guest_allowed=True,
        fields={
            "payment_intent_id": intent.id,
            "charge_id": _id(intent.latest_charge),
            "invoice_id": _id(intent.invoice),
            "amount": intent.amount,
            "currency": intent.currency,
            "status": intent.status,
            "failure_code": error.code if error else None,
            "failure_message": error.message if error else None,
            "description": intent.description,
            "customer_email": intent.receipt_email or _customer_email(intent.customer),
        },
    )


def _project_dispute(event_type: str, dispute: Dispute) -> _Projection:
    """A dispute is news about its payment: keyed and merged by the payment intent (else
    the charge) it names. Its amount is the disputed sum, not the payment's, so it is left
    out; the dispute's own status and reason travel in `status` and `reason`."""
    charge = dispute.charge
    if charge is None:
        raise MalformedEvent("malformed Stripe event: data.object.charge: required on a dispute")
    customer = charge.customer  # only when Stripe expanded the charge
    return _Projection(
        object_id=dispute.id,
        customer=customer,
        metadata={},
        identity=[charge.metadata, _customer_metadata(customer)],
        guest_allowed=True,
        fields={
            "dispute_id": dispute.id,
            "charge_id": charge.id,
            "payment_intent_id": _id(dispute.payment_intent) or _id(charge.payment_intent),
            "currency": dispute.currency,
            "status": dispute.status,
            "reason": dispute.reason,
        },
    )


# --- checkout sessions --------------------------------------------------------------


def _project_checkout_session(event_type: str, session: CheckoutSession) -> _Projection:
    details_email = session.customer_details.email if session.customer_details else None
    subscription_metadata = session.subscription.metadata if session.subscription else {}
    return _Projection(
        object_id=session.id,
        customer=session.customer,
        metadata=session.metadata,
        identity=[
            session.metadata,
            subscription_metadata,
            _customer_metadata(session.customer),
            {"user_id": session.client_reference_id},
        ],
        guest_allowed=session.mode == "payment",
        fields={
            "checkout_session_id": session.id,
            "subscription_id": _id(session.subscription),
            "invoice_id": _id(session.invoice),
            "payment_intent_id": _id(session.payment_intent),
            "amount": session.amount_total,
            "currency": session.currency,
            "status": session.status,
            "mode": session.mode,
            "customer_email": details_email
            or session.customer_email
            or _customer_email(session.customer),
        },
    )


# --- registry -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    object_type: str
    model: type[TypedEvent[Any]]  # the event with its object's model
    project: Callable[[str, Any], _Projection]


_INVOICE = _Kind("invoice", TypedEvent[Invoice], _project_invoice)
_SUBSCRIPTION = _Kind("subscription", TypedEvent[Subscription], _project_subscription)
_CHARGE = _Kind("charge", TypedEvent[Charge], _project_charge)
_PAYMENT_INTENT = _Kind("payment_intent", TypedEvent[PaymentIntent], _project_payment_intent)
_CHECKOUT_SESSION = _Kind("checkout.session", TypedEvent[CheckoutSession], _project_checkout_session)
_DISPUTE = _Kind("dispute", TypedEvent[Dispute], _project_dispute)

_KINDS: dict[str, _Kind] = {
    "checkout.session.completed": _CHECKOUT_SESSION,
    "invoice.paid": _INVOICE,
    "invoice.payment_succeeded": _INVOICE,
    "invoice.payment_failed": _INVOICE,
    "invoice.payment_action_required": _INVOICE,
    "charge.succeeded": _CHARGE,
    "charge.failed": _CHARGE,
    "charge.refunded": _CHARGE,
    **dict.fromkeys(DISPUTE_TYPES, _DISPUTE),
    "customer.subscription.created": _SUBSCRIPTION,
    "customer.subscription.updated": _SUBSCRIPTION,
    "customer.subscription.deleted": _SUBSCRIPTION,
    "customer.subscription.trial_will_end": _SUBSCRIPTION,
    "payment_intent.succeeded": _PAYMENT_INTENT,
    "payment_intent.payment_failed": _PAYMENT_INTENT,
}

if _KINDS.keys() != PROJECTED_TYPES:  # a registry edit that forgot the other half
    raise RuntimeError("normalize: _KINDS and PROJECTED_TYPES disagree")
