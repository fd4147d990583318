"""Pydantic models for the parts of Stripe webhook payloads that the ingester reads.

The models cover two API shapes at once: the 2024-06-20 shape and the 2025-03-31.basil
(and later) shape. Fields that only one shape has are optional, so one model reads both;
deciding which field to prefer is the normalizer's job, not the model's.

Contract:

* Only the fields we cannot do without are required: the event's ``id``, ``type``,
  ``created`` and ``data.object``, and every object's ``id``. Everything else is optional
  with a default, because Stripe sends ``null`` or omits fields depending on version and
  object state.
* Unknown fields are kept (``extra="allow"``) so a newer payload never fails to parse and
  the extras stay reachable through ``model_extra``.
* Integers and booleans are strict: Stripe always sends JSON integers for amounts and
  timestamps, so ``10.5`` or ``"10"`` means the payload is not what we think it is.
  Integers are bounded to what the protobuf fields can hold.
* Expandable references (``customer``, ``subscription``, ``payment_intent``, ...) arrive
  either as an id string or as the expanded object. A string is turned into an object
  carrying only that ``id``, so readers always write ``ref.id`` and never branch on type.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt

Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
Int32 = Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


def _none_to_empty(value: Any) -> Any:
    # Stripe sends `metadata: null` on some nested objects (e.g. subscription_details).
    return {} if value is None else value


def _id_to_object(value: Any) -> Any:
    # An unexpanded reference is just the id; give it the expanded form's shape.
    return {"id": value} if isinstance(value, str) else value


Metadata = Annotated[dict[str, Any], BeforeValidator(_none_to_empty)]
"""Stripe metadata. Values are strings on Stripe's side; we accept any JSON value."""

Expand = BeforeValidator(_id_to_object)
"""Marks a field as an expandable reference: an id string or the expanded object."""


class StripeModel(BaseModel):
    """Base for every Stripe model: keeps unknown fields."""

    model_config = ConfigDict(extra="allow")


class ObjectRef(StripeModel):
    """A reference of which we only read the id (the expanded object's other fields are kept)."""

    id: NonEmptyStr
    object: str | None = None
    metadata: Metadata = Field(default_factory=dict)


T = TypeVar("T")


class StripeList(StripeModel, Generic[T]):
    """A Stripe list object (``{"object": "list", "data": [...]}``)."""

    object: str | None = "list"
    data: list[T] = Field(default_factory=list)
    has_more: StrictBool = False
    url: str | None = None


class Customer(StripeModel):
    """A customer reference; metadata and email only when Stripe sent it expanded."""

    id: NonEmptyStr
    object: str | None = None
    email: str | None = None
    metadata: Metadata = Field(default_factory=dict)
    deleted: StrictBool = False


CustomerRef = Annotated[Customer | None, Expand]


class Price(StripeModel):
    """A price (also used for the legacy ``plan``, which has the same fields we read)."""

    id: NonEmptyStr
    object: str | None = None
    product: Annotated[ObjectRef | None, Expand] = None
    unit_amount: Int64 | None = None
    currency: str | None = None
    metadata: Metadata = Field(default_factory=dict)


class SubscriptionItem(StripeModel):
    """One subscription item. Since 2025-03-31 it carries the billing period."""

    id: str | None = None
    price: Price | None = None
    plan: Price | None = None
    quantity: Int64 | None = None
    current_period_start: Int64 | None = None
    current_period_end: Int64 | None = None
    metadata: Metadata = Field(default_factory=dict)


class Subscription(StripeModel):
    """A subscription, as the event object or expanded inside another object."""

    id: NonEmptyStr
    object: str | None = None
    customer: CustomerRef = None
    status: str | None = None
    currency: str | None = None
    items: StripeList[SubscriptionItem] | None = None
    # Only up to 2024-*: moved onto the items in 2025-03-31.basil.
    current_period_start: Int64 | None = None
    current_period_end: Int64 | None = None
    cancel_at_period_end: StrictBool | None = None
    cancel_at: Int64 | None = None
    canceled_at: Int64 | None = None
    ended_at: Int64 | None = None
    trial_start: Int64 | None = None
    trial_end: Int64 | None = None
    description: str | None = None
    latest_invoice: Annotated[ObjectRef | None, Expand] = None
    metadata: Metadata = Field(default_factory=dict)


SubscriptionRef = Annotated[Subscription | None, Expand]


class PaymentError(StripeModel):
    """``payment_intent.last_payment_error`` (and ``invoice.last_finalization_error``)."""

    code: str | None = None
    decline_code: str | None = None
    message: str | None = None
    type: str | None = None


class BillingDetails(StripeModel):
    email: str | None = None
    name: str | None = None


class PaymentIntent(StripeModel):
    id: NonEmptyStr
    object: str | None = None
    customer: CustomerRef = None
    amount: Int64 | None = None
    amount_received: Int64 | None = None
    currency: str | None = None
    status: str | None = None
    description: str | None = None
    receipt_email: str | None = None
    last_payment_error: PaymentError | None = None
    latest_charge: Annotated[ObjectRef | None, Expand] = None
    # Only up to 2024-*: removed from PaymentIntent in 2025-03-31.basil.
    invoice: Annotated[ObjectRef | None, Expand] = None
    metadata: Metadata = Field(default_factory=dict)


class Charge(StripeModel):
    id: NonEmptyStr
    object: str | None = None
    customer: CustomerRef = None
    amount: Int64 | None = None
    amount_captured: Int64 | None = None
    amount_refunded: Int64 | None = None
    currency: str | None = None
    status: str | None = None
    paid: StrictBool | None = None
    refunded: StrictBool | None = None
    failure_code: str | None = None
    failure_message: str | None = None
    description: str | None = None
    receipt_email: str | None = None
    billing_details: BillingDetails | None = None
    payment_intent: Annotated[ObjectRef | None, Expand] = None
    # Only up to 2024-*: removed from Charge in 2025-03-31.basil.
    invoice: Annotated[ObjectRef | None, Expand] = None
    metadata: Metadata = Field(default_factory=dict)


class Dispute(StripeModel):
    """A charge's dispute (chargeback). It names no customer; an expanded charge may."""

    id: NonEmptyStr
    object: str | None = None
    charge: Annotated[Charge | None, Expand] = None
    payment_intent: Annotated[ObjectRef | None, Expand] = None
    amount: Int64 | None = None
    currency: str | None = None
    status: str | None = None
    reason: str | None = None


class Period(StripeModel):
    start: Int64 | None = None
    end: Int64 | None = None


class PriceDetails(StripeModel):
    price: Annotated[Price | None, Expand] = None
    product: Annotated[ObjectRef | None, Expand] = None


class Pricing(StripeModel):
    """``line.pricing`` (2025-03-31.basil): replaces ``line.price`` / ``line.plan``."""

    type: str | None = None
    price_details: PriceDetails | None = None


class LineSubscriptionItemDetails(StripeModel):
    subscription: str | None = None
    subscription_item: str | None = None
    proration: StrictBool | None = None


class LineParent(StripeModel):
    """``line.parent`` (2025-03-31.basil): replaces ``line.type`` / ``line.subscription``."""

    type: str | None = None
    subscription_item_details: LineSubscriptionItemDetails | None = None


class InvoiceLine(StripeModel):
    id: str | None = None
    amount: Int64 | None = None
    currency: str | None = None
    period: Period | None = None
    quantity: Int64 | None = None
    # Up to 2024-*:
    type: str | None = None
    proration: StrictBool | None = None
    subscription: Annotated[ObjectRef | None, Expand] = None
    price: Price | None = None
    plan: Price | None = None
    # 2025-03-31.basil and later:
    parent: LineParent | None = None
    pricing: Pricing | None = None
    metadata: Metadata = Field(default_factory=dict)


class SubscriptionDetails(StripeModel):
    """``invoice.subscription_details`` (old) / ``invoice.parent.subscription_details`` (new).

    Only the new shape has ``subscription`` here; the old one has it on the invoice.
    """

    subscription: SubscriptionRef = None
    metadata: Metadata = Field(default_factory=dict)


class InvoiceParent(StripeModel):
    """``invoice.parent`` (2025-03-31.basil); null for one-off invoices."""

    type: str | None = None
    subscription_details: SubscriptionDetails | None = None


class InvoicePaymentDetails(StripeModel):
    """``invoice_payment.payment``: what paid the invoice."""

    type: str | None = None
    payment_intent: Annotated[ObjectRef | None, Expand] = None
    charge: Annotated[ObjectRef | None, Expand] = None


class InvoicePayment(StripeModel):
    id: str | None = None
    is_default: StrictBool | None = None
    status: str | None = None
    payment: InvoicePaymentDetails | None = None


class Invoice(StripeModel):
    id: NonEmptyStr
    object: str | None = None
    customer: CustomerRef = None
    customer_email: str | None = None
    status: str | None = None
    currency: str | None = None
    amount_due: Int64 | None = None
    amount_paid: Int64 | None = None
    amount_remaining: Int64 | None = None
    total: Int64 | None = None
    attempt_count: Int32 | None = None
    next_payment_attempt: Int64 | None = None
    billing_reason: str | None = None
    description: str | None = None
    period_start: Int64 | None = None
    period_end: Int64 | None = None
    lines: StripeList[InvoiceLine] | None = None
    last_finalization_error: PaymentError | None = None
    # Up to 2024-*:
    subscription: SubscriptionRef = None
    subscription_details: SubscriptionDetails | None = None
    payment_intent: Annotated[PaymentIntent | None, Expand] = None
    charge: Annotated[Charge | None, Expand] = None
    # 2025-03-31.basil and later (``payments`` only when Stripe includes it):
    parent: InvoiceParent | None = None
    payments: StripeList[InvoicePayment] | None = None
    metadata: Metadata = Field(default_factory=dict)


class CustomerDetails(StripeModel):
    email: str | None = None
    name: str | None = None


class CheckoutSession(StripeModel):
    id: NonEmptyStr
    object: str | None = None
    customer: CustomerRef = None
    customer_email: str | None = None
    customer_details: CustomerDetails | None = None
    client_reference_id: str | None = None
    mode: str | None = None
    status: str | None = None
    payment_status: str | None = None
    amount_total: Int64 | None = None
    amount_subtotal: Int64 | None = None
    currency: str | None = None
    subscription: SubscriptionRef = None
    invoice: Annotated[ObjectRef | None, Expand] = None
    payment_intent: Annotated[ObjectRef | None, Expand] = None
    metadata: Metadata = Field(default_factory=dict)


class EventData(StripeModel):
    # Kept as a plain dict: which model applies depends on the event type.
    object: dict[str, Any]
    previous_attributes: dict[str, Any] | None = None


ObjectT = TypeVar("ObjectT", bound=StripeModel)


class ObjectData(StripeModel, Generic[ObjectT]):
    """``data`` of an event whose type names its object's model."""

    object: ObjectT
    previous_attributes: dict[str, Any] | None = None


class Envelope(StripeModel):
    """The webhook envelope's own fields (``"object": "event"``)."""

    id: NonEmptyStr
    object: str | None = "event"
    type: NonEmptyStr
    created: Int64
    api_version: str | None = None
    livemode: StrictBool = False
    pending_webhooks: Int64 | None = None
    request: dict[str, Any] | None = None


class StripeEvent(Envelope):
    """Any event: the object stays a plain dict."""

    data: EventData


class TypedEvent(Envelope, Generic[ObjectT]):
    """An event of a type we project, its object read by that type's model in the same
    validation (one pass over the payload instead of the envelope, then the object)."""

    data: ObjectData[ObjectT]
