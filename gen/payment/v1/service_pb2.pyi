from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Subject(_message.Message):
    __slots__ = ("user_id", "family_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    family_id: str
    def __init__(self, user_id: _Optional[str] = ..., family_id: _Optional[str] = ...) -> None: ...

class Freshness(_message.Message):
    __slots__ = ("watermark", "watermark_event_id", "lag_ms")
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    LAG_MS_FIELD_NUMBER: _ClassVar[int]
    watermark: int
    watermark_event_id: str
    lag_ms: int
    def __init__(self, watermark: _Optional[int] = ..., watermark_event_id: _Optional[str] = ..., lag_ms: _Optional[int] = ...) -> None: ...

class Payment(_message.Message):
    __slots__ = ("payment_id", "customer_id", "user_id", "family_id", "amount", "currency", "status", "amount_refunded", "payment_intent_id", "charge_id", "invoice_id", "description", "failure_code", "failure_message", "created_at", "updated_at", "last_event_id", "last_event_created", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_REFUNDED_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_INTENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHARGE_ID_FIELD_NUMBER: _ClassVar[int]
    INVOICE_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    FAILURE_CODE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_CREATED_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    payment_id: str
    customer_id: str
    user_id: str
    family_id: str
    amount: int
    currency: str
    status: str
    amount_refunded: int
    payment_intent_id: str
    charge_id: str
    invoice_id: str
    description: str
    failure_code: str
    failure_message: str
    created_at: int
    updated_at: int
    last_event_id: str
    last_event_created: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, payment_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., user_id: _Optional[str] = ..., family_id: _Optional[str] = ..., amount: _Optional[int] = ..., currency: _Optional[str] = ..., status: _Optional[str] = ..., amount_refunded: _Optional[int] = ..., payment_intent_id: _Optional[str] = ..., charge_id: _Optional[str] = ..., invoice_id: _Optional[str] = ..., description: _Optional[str] = ..., failure_code: _Optional[str] = ..., failure_message: _Optional[str] = ..., created_at: _Optional[int] = ..., updated_at: _Optional[int] = ..., last_event_id: _Optional[str] = ..., last_event_created: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CreatePaymentRequest(_message.Message):
    __slots__ = ("subject", "customer_id", "amount", "currency", "description", "idempotency_key", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    subject: Subject
    customer_id: str
    amount: int
    currency: str
    description: str
    idempotency_key: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, subject: _Optional[_Union[Subject, _Mapping]] = ..., customer_id: _Optional[str] = ..., amount: _Optional[int] = ..., currency: _Optional[str] = ..., description: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CreatePaymentResponse(_message.Message):
    __slots__ = ("payment", "client_secret")
    PAYMENT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    payment: Payment
    client_secret: str
    def __init__(self, payment: _Optional[_Union[Payment, _Mapping]] = ..., client_secret: _Optional[str] = ...) -> None: ...

class GetPaymentRequest(_message.Message):
    __slots__ = ("payment_id",)
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    payment_id: str
    def __init__(self, payment_id: _Optional[str] = ...) -> None: ...

class GetPaymentResponse(_message.Message):
    __slots__ = ("payment", "freshness")
    PAYMENT_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    payment: Payment
    freshness: Freshness
    def __init__(self, payment: _Optional[_Union[Payment, _Mapping]] = ..., freshness: _Optional[_Union[Freshness, _Mapping]] = ...) -> None: ...

class UpdatePaymentStatusRequest(_message.Message):
    __slots__ = ("payment_id", "status", "reason", "idempotency_key")
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    payment_id: str
    status: str
    reason: str
    idempotency_key: str
    def __init__(self, payment_id: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class UpdatePaymentStatusResponse(_message.Message):
    __slots__ = ("event_id",)
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    def __init__(self, event_id: _Optional[str] = ...) -> None: ...

class GetPaymentsByCustomerRequest(_message.Message):
    __slots__ = ("customer_id", "page_size", "page_token")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    page_size: int
    page_token: str
    def __init__(self, customer_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPaymentsRequest(_message.Message):
    __slots__ = ("subject", "customer_id", "status", "created_after", "created_before", "page_size", "page_token")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    subject: Subject
    customer_id: str
    status: str
    created_after: int
    created_before: int
    page_size: int
    page_token: str
    def __init__(self, subject: _Optional[_Union[Subject, _Mapping]] = ..., customer_id: _Optional[str] = ..., status: _Optional[str] = ..., created_after: _Optional[int] = ..., created_before: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPaymentsResponse(_message.Message):
    __slots__ = ("payments", "next_page_token", "freshness")
    PAYMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    payments: _containers.RepeatedCompositeFieldContainer[Payment]
    next_page_token: str
    freshness: Freshness
    def __init__(self, payments: _Optional[_Iterable[_Union[Payment, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., freshness: _Optional[_Union[Freshness, _Mapping]] = ...) -> None: ...

class CreateCheckoutSessionRequest(_message.Message):
    __slots__ = ("subject", "plan_id", "success_url", "cancel_url", "customer_id", "idempotency_key")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_URL_FIELD_NUMBER: _ClassVar[int]
    CANCEL_URL_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    subject: Subject
    plan_id: str
    success_url: str
    cancel_url: str
    customer_id: str
    idempotency_key: str
    def __init__(self, subject: _Optional[_Union[Subject, _Mapping]] = ..., plan_id: _Optional[str] = ..., success_url: _Optional[str] = ..., cancel_url: _Optional[str] = ..., customer_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CreateCheckoutSessionResponse(_message.Message):
    __slots__ = ("session_id", "url")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    url: str
    def __init__(self, session_id: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class CheckEntitlementRequest(_message.Message):
    __slots__ = ("subject", "feature_code", "as_of")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CODE_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    subject: Subject
    feature_code: str
    as_of: int
    def __init__(self, subject: _Optional[_Union[Subject, _Mapping]] = ..., feature_code: _Optional[str] = ..., as_of: _Optional[int] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("rule", "plan_id", "plan_version", "source", "deciding_event_id", "clock")
    RULE_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DECIDING_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    rule: str
    plan_id: str
    plan_version: str
    source: str
    deciding_event_id: str
    clock: str
    def __init__(self, rule: _Optional[str] = ..., plan_id: _Optional[str] = ..., plan_version: _Optional[str] = ..., source: _Optional[str] = ..., deciding_event_id: _Optional[str] = ..., clock: _Optional[str] = ...) -> None: ...

class CheckEntitlementResponse(_message.Message):
    __slots__ = ("allowed", "reason", "plan_id", "status", "expires_at", "access_level", "decided_by_event_id", "usage_limit", "limit_period", "freshness", "feature_code", "subject", "explanation", "evidence_event_ids", "as_of", "grace_until")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ACCESS_LEVEL_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_PERIOD_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CODE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_EVENT_IDS_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    GRACE_UNTIL_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    reason: str
    plan_id: str
    status: str
    expires_at: int
    access_level: str
    decided_by_event_id: str
    usage_limit: int
    limit_period: str
    freshness: Freshness
    feature_code: str
    subject: Subject
    explanation: Explanation
    evidence_event_ids: _containers.RepeatedScalarFieldContainer[str]
    as_of: int
    grace_until: int
    def __init__(self, allowed: _Optional[bool] = ..., reason: _Optional[str] = ..., plan_id: _Optional[str] = ..., status: _Optional[str] = ..., expires_at: _Optional[int] = ..., access_level: _Optional[str] = ..., decided_by_event_id: _Optional[str] = ..., usage_limit: _Optional[int] = ..., limit_period: _Optional[str] = ..., freshness: _Optional[_Union[Freshness, _Mapping]] = ..., feature_code: _Optional[str] = ..., subject: _Optional[_Union[Subject, _Mapping]] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ..., evidence_event_ids: _Optional[_Iterable[str]] = ..., as_of: _Optional[int] = ..., grace_until: _Optional[int] = ...) -> None: ...

class BulkCheckEntitlementsRequest(_message.Message):
    __slots__ = ("subjects", "feature_codes")
    SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CODES_FIELD_NUMBER: _ClassVar[int]
    subjects: _containers.RepeatedCompositeFieldContainer[Subject]
    feature_codes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, subjects: _Optional[_Iterable[_Union[Subject, _Mapping]]] = ..., feature_codes: _Optional[_Iterable[str]] = ...) -> None: ...

class BulkCheckEntitlementsResponse(_message.Message):
    __slots__ = ("results", "freshness")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CheckEntitlementResponse]
    freshness: Freshness
    def __init__(self, results: _Optional[_Iterable[_Union[CheckEntitlementResponse, _Mapping]]] = ..., freshness: _Optional[_Union[Freshness, _Mapping]] = ...) -> None: ...

class Entitlement(_message.Message):
    __slots__ = ("feature_code", "plan_id", "status", "access_level", "usage_limit", "limit_period", "granted_at", "expires_at", "subscription_id", "user_id", "family_id", "last_event_id")
    FEATURE_CODE_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ACCESS_LEVEL_FIELD_NUMBER: _ClassVar[int]
    USAGE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_PERIOD_FIELD_NUMBER: _ClassVar[int]
    GRANTED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    feature_code: str
    plan_id: str
    status: str
    access_level: str
    usage_limit: int
    limit_period: str
    granted_at: int
    expires_at: int
    subscription_id: str
    user_id: str
    family_id: str
    last_event_id: str
    def __init__(self, feature_code: _Optional[str] = ..., plan_id: _Optional[str] = ..., status: _Optional[str] = ..., access_level: _Optional[str] = ..., usage_limit: _Optional[int] = ..., limit_period: _Optional[str] = ..., granted_at: _Optional[int] = ..., expires_at: _Optional[int] = ..., subscription_id: _Optional[str] = ..., user_id: _Optional[str] = ..., family_id: _Optional[str] = ..., last_event_id: _Optional[str] = ...) -> None: ...

class ListEntitlementsRequest(_message.Message):
    __slots__ = ("subject", "page_size", "page_token")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    subject: Subject
    page_size: int
    page_token: str
    def __init__(self, subject: _Optional[_Union[Subject, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListEntitlementsResponse(_message.Message):
    __slots__ = ("entitlements", "next_page_token", "freshness")
    ENTITLEMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    entitlements: _containers.RepeatedCompositeFieldContainer[Entitlement]
    next_page_token: str
    freshness: Freshness
    def __init__(self, entitlements: _Optional[_Iterable[_Union[Entitlement, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., freshness: _Optional[_Union[Freshness, _Mapping]] = ...) -> None: ...

class Subscription(_message.Message):
    __slots__ = ("subscription_id", "customer_id", "user_id", "family_id", "plan_id", "price_id", "status", "current_period_start", "current_period_end", "cancel_at_period_end", "canceled_at", "trial_end", "access_level", "last_event_id", "last_event_created")
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    PRICE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    CANCEL_AT_PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    CANCELED_AT_FIELD_NUMBER: _ClassVar[int]
    TRIAL_END_FIELD_NUMBER: _ClassVar[int]
    ACCESS_LEVEL_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_CREATED_FIELD_NUMBER: _ClassVar[int]
    subscription_id: str
    customer_id: str
    user_id: str
    family_id: str
    plan_id: str
    price_id: str
    status: str
    current_period_start: int
    current_period_end: int
    cancel_at_period_end: bool
    canceled_at: int
    trial_end: int
    access_level: str
    last_event_id: str
    last_event_created: int
    def __init__(self, subscription_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., user_id: _Optional[str] = ..., family_id: _Optional[str] = ..., plan_id: _Optional[str] = ..., price_id: _Optional[str] = ..., status: _Optional[str] = ..., current_period_start: _Optional[int] = ..., current_period_end: _Optional[int] = ..., cancel_at_period_end: _Optional[bool] = ..., canceled_at: _Optional[int] = ..., trial_end: _Optional[int] = ..., access_level: _Optional[str] = ..., last_event_id: _Optional[str] = ..., last_event_created: _Optional[int] = ...) -> None: ...

class ListSubscriptionsRequest(_message.Message):
    __slots__ = ("subject", "page_size", "page_token")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    subject: Subject
    page_size: int
    page_token: str
    def __init__(self, subject: _Optional[_Union[Subject, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSubscriptionsResponse(_message.Message):
    __slots__ = ("subscriptions", "next_page_token", "freshness")
    SUBSCRIPTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    subscriptions: _containers.RepeatedCompositeFieldContainer[Subscription]
    next_page_token: str
    freshness: Freshness
    def __init__(self, subscriptions: _Optional[_Iterable[_Union[Subscription, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., freshness: _Optional[_Union[Freshness, _Mapping]] = ...) -> None: ...

class AccessChange(_message.Message):
    __slots__ = ("subscription_id", "event_id", "changed_at", "from_level", "to_level", "status", "plan_id", "user_id", "family_id")
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHANGED_AT_FIELD_NUMBER: _ClassVar[int]
    FROM_LEVEL_FIELD_NUMBER: _ClassVar[int]
    TO_LEVEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    subscription_id: str
    event_id: str
    changed_at: int
    from_level: str
    to_level: str
    status: str
    plan_id: str
    user_id: str
    family_id: str
    def __init__(self, subscription_id: _Optional[str] = ..., event_id: _Optional[str] = ..., changed_at: _Optional[int] = ..., from_level: _Optional[str] = ..., to_level: _Optional[str] = ..., status: _Optional[str] = ..., plan_id: _Optional[str] = ..., user_id: _Optional[str] = ..., family_id: _Optional[str] = ...) -> None: ...

class ListAccessChangesRequest(_message.Message):
    __slots__ = ("subject", "since", "until", "page_size", "page_token")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    subject: Subject
    since: int
    until: int
    page_size: int
    page_token: str
    def __init__(self, subject: _Optional[_Union[Subject, _Mapping]] = ..., since: _Optional[int] = ..., until: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAccessChangesResponse(_message.Message):
    __slots__ = ("changes", "next_page_token", "freshness")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[AccessChange]
    next_page_token: str
    freshness: Freshness
    def __init__(self, changes: _Optional[_Iterable[_Union[AccessChange, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., freshness: _Optional[_Union[Freshness, _Mapping]] = ...) -> None: ...

class UsagePeriod(_message.Message):
    __slots__ = ("feature_code", "period_start", "period_end", "used", "limit")
    FEATURE_CODE_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    feature_code: str
    period_start: int
    period_end: int
    used: int
    limit: int
    def __init__(self, feature_code: _Optional[str] = ..., period_start: _Optional[int] = ..., period_end: _Optional[int] = ..., used: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListUsageRequest(_message.Message):
    __slots__ = ("subject", "feature_code", "page_size", "page_token")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CODE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    subject: Subject
    feature_code: str
    page_size: int
    page_token: str
    def __init__(self, subject: _Optional[_Union[Subject, _Mapping]] = ..., feature_code: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListUsageResponse(_message.Message):
    __slots__ = ("periods", "next_page_token", "freshness")
    PERIODS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    periods: _containers.RepeatedCompositeFieldContainer[UsagePeriod]
    next_page_token: str
    freshness: Freshness
    def __init__(self, periods: _Optional[_Iterable[_Union[UsagePeriod, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., freshness: _Optional[_Union[Freshness, _Mapping]] = ...) -> None: ...

class IncrementUsageRequest(_message.Message):
    __slots__ = ("subject", "feature_code", "amount", "idempotency_key", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CODE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    subject: Subject
    feature_code: str
    amount: int
    idempotency_key: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, subject: _Optional[_Union[Subject, _Mapping]] = ..., feature_code: _Optional[str] = ..., amount: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class IncrementUsageResponse(_message.Message):
    __slots__ = ("allowed", "used", "limit", "remaining", "over_soft_limit", "overage", "period_start", "period_end", "consistency_token", "hard_limit")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    OVER_SOFT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HARD_LIMIT_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    used: int
    limit: int
    remaining: int
    over_soft_limit: bool
    overage: int
    period_start: int
    period_end: int
    consistency_token: str
    hard_limit: bool
    def __init__(self, allowed: _Optional[bool] = ..., used: _Optional[int] = ..., limit: _Optional[int] = ..., remaining: _Optional[int] = ..., over_soft_limit: _Optional[bool] = ..., overage: _Optional[int] = ..., period_start: _Optional[int] = ..., period_end: _Optional[int] = ..., consistency_token: _Optional[str] = ..., hard_limit: _Optional[bool] = ...) -> None: ...

class Quota(_message.Message):
    __slots__ = ("feature_code", "used", "limit", "remaining", "period_start", "period_end", "hard_limit")
    FEATURE_CODE_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    HARD_LIMIT_FIELD_NUMBER: _ClassVar[int]
    feature_code: str
    used: int
    limit: int
    remaining: int
    period_start: int
    period_end: int
    hard_limit: bool
    def __init__(self, feature_code: _Optional[str] = ..., used: _Optional[int] = ..., limit: _Optional[int] = ..., remaining: _Optional[int] = ..., period_start: _Optional[int] = ..., period_end: _Optional[int] = ..., hard_limit: _Optional[bool] = ...) -> None: ...

class CheckQuotaRequest(_message.Message):
    __slots__ = ("subject", "feature_code", "consistency_token")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CODE_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    subject: Subject
    feature_code: str
    consistency_token: str
    def __init__(self, subject: _Optional[_Union[Subject, _Mapping]] = ..., feature_code: _Optional[str] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class CheckQuotaResponse(_message.Message):
    __slots__ = ("quotas", "freshness")
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    quotas: _containers.RepeatedCompositeFieldContainer[Quota]
    freshness: Freshness
    def __init__(self, quotas: _Optional[_Iterable[_Union[Quota, _Mapping]]] = ..., freshness: _Optional[_Union[Freshness, _Mapping]] = ...) -> None: ...
