from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_SOURCE_UNSPECIFIED: _ClassVar[EventSource]
    EVENT_SOURCE_STRIPE_WEBHOOK: _ClassVar[EventSource]
    EVENT_SOURCE_API: _ClassVar[EventSource]
    EVENT_SOURCE_DUNNING: _ClassVar[EventSource]
    EVENT_SOURCE_STRIPE_BACKFILL: _ClassVar[EventSource]
EVENT_SOURCE_UNSPECIFIED: EventSource
EVENT_SOURCE_STRIPE_WEBHOOK: EventSource
EVENT_SOURCE_API: EventSource
EVENT_SOURCE_DUNNING: EventSource
EVENT_SOURCE_STRIPE_BACKFILL: EventSource

class PaymentEvent(_message.Message):
    __slots__ = ("event_type", "user_id", "family_id", "feature_code", "plan_id", "subscription_id", "amount", "currency", "status", "expires_at", "metadata", "event_id", "created", "customer_id", "source", "api_version", "livemode", "object_type", "object_id", "invoice_id", "charge_id", "payment_intent_id", "checkout_session_id", "price_id", "product_id", "period_start", "period_end", "cancel_at_period_end", "cancel_at", "canceled_at", "trial_end", "amount_refunded", "failure_code", "failure_message", "attempt_count", "next_payment_attempt", "billing_reason", "mode", "customer_email", "description", "actor", "reason", "dispute_id")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CODE_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIVEMODE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_TYPE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    INVOICE_ID_FIELD_NUMBER: _ClassVar[int]
    CHARGE_ID_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_INTENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKOUT_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PRICE_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    CANCEL_AT_PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    CANCEL_AT_FIELD_NUMBER: _ClassVar[int]
    CANCELED_AT_FIELD_NUMBER: _ClassVar[int]
    TRIAL_END_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_REFUNDED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_CODE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_COUNT_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAYMENT_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    BILLING_REASON_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_EMAIL_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DISPUTE_ID_FIELD_NUMBER: _ClassVar[int]
    event_type: str
    user_id: str
    family_id: str
    feature_code: str
    plan_id: str
    subscription_id: str
    amount: int
    currency: str
    status: str
    expires_at: int
    metadata: _containers.ScalarMap[str, str]
    event_id: str
    created: int
    customer_id: str
    source: EventSource
    api_version: str
    livemode: bool
    object_type: str
    object_id: str
    invoice_id: str
    charge_id: str
    payment_intent_id: str
    checkout_session_id: str
    price_id: str
    product_id: str
    period_start: int
    period_end: int
    cancel_at_period_end: bool
    cancel_at: int
    canceled_at: int
    trial_end: int
    amount_refunded: int
    failure_code: str
    failure_message: str
    attempt_count: int
    next_payment_attempt: int
    billing_reason: str
    mode: str
    customer_email: str
    description: str
    actor: str
    reason: str
    dispute_id: str
    def __init__(self, event_type: _Optional[str] = ..., user_id: _Optional[str] = ..., family_id: _Optional[str] = ..., feature_code: _Optional[str] = ..., plan_id: _Optional[str] = ..., subscription_id: _Optional[str] = ..., amount: _Optional[int] = ..., currency: _Optional[str] = ..., status: _Optional[str] = ..., expires_at: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., event_id: _Optional[str] = ..., created: _Optional[int] = ..., customer_id: _Optional[str] = ..., source: _Optional[_Union[EventSource, str]] = ..., api_version: _Optional[str] = ..., livemode: _Optional[bool] = ..., object_type: _Optional[str] = ..., object_id: _Optional[str] = ..., invoice_id: _Optional[str] = ..., charge_id: _Optional[str] = ..., payment_intent_id: _Optional[str] = ..., checkout_session_id: _Optional[str] = ..., price_id: _Optional[str] = ..., product_id: _Optional[str] = ..., period_start: _Optional[int] = ..., period_end: _Optional[int] = ..., cancel_at_period_end: _Optional[bool] = ..., cancel_at: _Optional[int] = ..., canceled_at: _Optional[int] = ..., trial_end: _Optional[int] = ..., amount_refunded: _Optional[int] = ..., failure_code: _Optional[str] = ..., failure_message: _Optional[str] = ..., attempt_count: _Optional[int] = ..., next_payment_attempt: _Optional[int] = ..., billing_reason: _Optional[str] = ..., mode: _Optional[str] = ..., customer_email: _Optional[str] = ..., description: _Optional[str] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ..., dispute_id: _Optional[str] = ...) -> None: ...

class UsageEvent(_message.Message):
    __slots__ = ("event_id", "idempotency_key", "subject_type", "subject_id", "user_id", "family_id", "feature_code", "amount", "period_start", "period_end", "created_ms", "metadata", "used_after", "limit", "over_soft_limit", "plan_id", "member_cap")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CODE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    USED_AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OVER_SOFT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_CAP_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    idempotency_key: str
    subject_type: str
    subject_id: str
    user_id: str
    family_id: str
    feature_code: str
    amount: int
    period_start: int
    period_end: int
    created_ms: int
    metadata: _containers.ScalarMap[str, str]
    used_after: int
    limit: int
    over_soft_limit: bool
    plan_id: str
    member_cap: int
    def __init__(self, event_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., subject_type: _Optional[str] = ..., subject_id: _Optional[str] = ..., user_id: _Optional[str] = ..., family_id: _Optional[str] = ..., feature_code: _Optional[str] = ..., amount: _Optional[int] = ..., period_start: _Optional[int] = ..., period_end: _Optional[int] = ..., created_ms: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., used_after: _Optional[int] = ..., limit: _Optional[int] = ..., over_soft_limit: _Optional[bool] = ..., plan_id: _Optional[str] = ..., member_cap: _Optional[int] = ...) -> None: ...

class UsageThresholdCrossed(_message.Message):
    __slots__ = ("event_id", "scope", "subject_type", "subject_id", "user_id", "family_id", "feature_code", "plan_id", "period_start", "period_end", "threshold", "threshold_units", "usage", "limit", "crossing_event_id", "created_ms")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CODE_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_UNITS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CROSSING_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    scope: str
    subject_type: str
    subject_id: str
    user_id: str
    family_id: str
    feature_code: str
    plan_id: str
    period_start: int
    period_end: int
    threshold: str
    threshold_units: int
    usage: int
    limit: int
    crossing_event_id: str
    created_ms: int
    def __init__(self, event_id: _Optional[str] = ..., scope: _Optional[str] = ..., subject_type: _Optional[str] = ..., subject_id: _Optional[str] = ..., user_id: _Optional[str] = ..., family_id: _Optional[str] = ..., feature_code: _Optional[str] = ..., plan_id: _Optional[str] = ..., period_start: _Optional[int] = ..., period_end: _Optional[int] = ..., threshold: _Optional[str] = ..., threshold_units: _Optional[int] = ..., usage: _Optional[int] = ..., limit: _Optional[int] = ..., crossing_event_id: _Optional[str] = ..., created_ms: _Optional[int] = ...) -> None: ...

class DunningEvent(_message.Message):
    __slots__ = ("event_id", "kind", "case_id", "invoice_id", "customer_id", "subscription_id", "user_id", "family_id", "attempt", "next_attempt_at", "state", "error", "created", "amount", "currency", "plan_id")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[DunningEvent.Kind]
        CASE_OPENED: _ClassVar[DunningEvent.Kind]
        RETRY_SCHEDULED: _ClassVar[DunningEvent.Kind]
        ATTEMPT_MADE: _ClassVar[DunningEvent.Kind]
        ATTEMPT_FAILED: _ClassVar[DunningEvent.Kind]
        ESCALATED: _ClassVar[DunningEvent.Kind]
        RECOVERED: _ClassVar[DunningEvent.Kind]
        CLOSED: _ClassVar[DunningEvent.Kind]
    KIND_UNSPECIFIED: DunningEvent.Kind
    CASE_OPENED: DunningEvent.Kind
    RETRY_SCHEDULED: DunningEvent.Kind
    ATTEMPT_MADE: DunningEvent.Kind
    ATTEMPT_FAILED: DunningEvent.Kind
    ESCALATED: DunningEvent.Kind
    RECOVERED: DunningEvent.Kind
    CLOSED: DunningEvent.Kind
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    INVOICE_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    kind: DunningEvent.Kind
    case_id: str
    invoice_id: str
    customer_id: str
    subscription_id: str
    user_id: str
    family_id: str
    attempt: int
    next_attempt_at: int
    state: str
    error: str
    created: int
    amount: int
    currency: str
    plan_id: str
    def __init__(self, event_id: _Optional[str] = ..., kind: _Optional[_Union[DunningEvent.Kind, str]] = ..., case_id: _Optional[str] = ..., invoice_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., subscription_id: _Optional[str] = ..., user_id: _Optional[str] = ..., family_id: _Optional[str] = ..., attempt: _Optional[int] = ..., next_attempt_at: _Optional[int] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., created: _Optional[int] = ..., amount: _Optional[int] = ..., currency: _Optional[str] = ..., plan_id: _Optional[str] = ...) -> None: ...
