"""Unit tests for the Stripe event normalizer and the sample event builders (no I/O)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payment.v1 import events_pb2
from paymentsvc.dev.samples import (
    DEFAULT_EMAIL,
    DEFAULT_PRICE_ID,
    NEW_API_VERSION,
    OLD_API_VERSION,
    SAMPLE_TYPES,
    dispute_event,
    is_new_shape,
    sample_event,
)
from services.ingest_webhooks.normalize import (
    DISPUTE_TYPES,
    PROJECTED_TYPES,
    MalformedEvent,
    normalize,
    partition_key,
)
from tests.support import stripe_fixtures

VERSIONS = [OLD_API_VERSION, NEW_API_VERSION]
CREATED = 1_767_225_600  # 2026-01-01T00:00:00Z
PERIOD_START = CREATED - 3_600
PERIOD_END = PERIOD_START + 31 * 86_400
BUILT_WITH: dict[str, Any] = {
    "customer_id": "cus_Test",
    "event_id": "evt_Test",
    "created": CREATED,
    "user_id": "user_Test",
    "family_id": "family_Test",
    "subscription_id": "sub_Test",
    "subscription_item_id": "si_Test",
    "invoice_id": "in_Test",
    "charge_id": "ch_Test",
    "payment_intent_id": "pi_Test",
    "checkout_session_id": "cs_test_Test",
    "price_id": "price_pro_monthly",
    "product_id": "prod_Test",
    "amount": 1_500,
    "quantity": 2,
    "currency": "eur",
    "period_start": PERIOD_START,
    "period_end": PERIOD_END,
}
TOTAL = 3_000
IDENTITY = {"user_id": "user_Test", "family_id": "family_Test"}
DEFAULT_STATUS = {
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


def built(event_type: str, api_version: str = NEW_API_VERSION, **changes: Any) -> dict[str, Any]:
    return sample_event(event_type, api_version=api_version, **{**BUILT_WITH, **changes})


def normalized(event: dict[str, Any]) -> events_pb2.PaymentEvent:
    result = normalize(event)
    assert result is not None
    return result


def obj(event: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = event["data"]["object"]
    return result


def assert_fields(actual: events_pb2.PaymentEvent, expected: dict[str, Any]) -> None:
    """Every field of `actual` equals `expected`, or the proto default where not listed."""
    defaults = events_pb2.PaymentEvent()
    for field in events_pb2.PaymentEvent.DESCRIPTOR.fields:
        want = expected.get(field.name, getattr(defaults, field.name))
        got = getattr(actual, field.name)
        if field.name == "metadata":
            got, want = dict(got), dict(want)
        assert got == want, f"{field.name}: got {got!r}, want {want!r}"


def expected_fields(event_type: str, api_version: str) -> dict[str, Any]:
    old = not is_new_shape(api_version)
    kind = event_type.rsplit(".", 1)[0]
    common = {
        "source": events_pb2.EVENT_SOURCE_STRIPE_WEBHOOK,
        "event_id": "evt_Test",
        "event_type": event_type,
        "created": CREATED,
        "customer_id": "cus_Test",
        "api_version": api_version,
        "livemode": False,
        "status": DEFAULT_STATUS[event_type],
        "currency": "eur",
        **IDENTITY,
    }
    specific = {
        "customer.subscription": _expected_subscription,
        "invoice": _expected_invoice,
        "charge": _expected_charge,
        "payment_intent": _expected_payment_intent,
        "checkout.session": _expected_checkout_session,
    }[kind](event_type, old)
    return {**common, **specific}


def _expected_subscription(event_type: str, old: bool) -> dict[str, Any]:
    return {
        "object_type": "subscription",
        "object_id": "sub_Test",
        "subscription_id": "sub_Test",
        "price_id": "price_pro_monthly",
        "product_id": "prod_Test",
        "amount": TOTAL,
        "period_start": PERIOD_START,
        "period_end": PERIOD_END,
        "expires_at": PERIOD_END,
        "canceled_at": CREATED if event_type.endswith("deleted") else 0,
        "trial_end": PERIOD_END if event_type.endswith("trial_will_end") else 0,
        "metadata": IDENTITY,
    }


def _expected_invoice(event_type: str, old: bool) -> dict[str, Any]:
    return {
        "object_type": "invoice",
        "object_id": "in_Test",
        "invoice_id": "in_Test",
        "subscription_id": "sub_Test",
        # 2025-03-31.basil dropped these; `payments` is not in webhook payloads by default.
        "payment_intent_id": "pi_Test" if old else "",
        "charge_id": "ch_Test" if old else "",
        "price_id": "price_pro_monthly",
        "product_id": "prod_Test",
        "amount": TOTAL,
        "period_start": PERIOD_START,
        "period_end": PERIOD_END,
        "expires_at": PERIOD_END,
        "attempt_count": 1,
        "next_payment_attempt": CREATED + 3 * 86_400 if event_type.endswith("failed") else 0,
        "billing_reason": "subscription_cycle",
        "customer_email": DEFAULT_EMAIL,
    }


def _expected_charge(event_type: str, old: bool) -> dict[str, Any]:
    failed = event_type == "charge.failed"
    return {
        "object_type": "charge",
        "object_id": "ch_Test",
        "charge_id": "ch_Test",
        "payment_intent_id": "pi_Test",
        "invoice_id": "in_Test" if old else "",
        "amount": TOTAL,
        "amount_refunded": TOTAL if event_type == "charge.refunded" else 0,
        "failure_code": "card_declined" if failed else "",
        "failure_message": "Your card was declined." if failed else "",
        "customer_email": DEFAULT_EMAIL,
        "metadata": IDENTITY,
    }


def _expected_payment_intent(event_type: str, old: bool) -> dict[str, Any]:
    failed = event_type == "payment_intent.payment_failed"
    return {
        "object_type": "payment_intent",
        "object_id": "pi_Test",
        "payment_intent_id": "pi_Test",
        "charge_id": "ch_Test",
        "invoice_id": "in_Test" if old else "",
        "amount": TOTAL,
        "failure_code": "card_declined" if failed else "",
        "failure_message": "Your card was declined." if failed else "",
        "customer_email": DEFAULT_EMAIL,
        "metadata": IDENTITY,
    }


def _expected_checkout_session(event_type: str, old: bool) -> dict[str, Any]:
    return {
        "object_type": "checkout.session",
        "object_id": "cs_test_Test",
        "checkout_session_id": "cs_test_Test",
        "subscription_id": "sub_Test",
        "invoice_id": "in_Test",
        "amount": TOTAL,
        "mode": "subscription",
        "customer_email": DEFAULT_EMAIL,
        "metadata": IDENTITY,
    }


# --- every projected type, both API shapes --------------------------------------------


@pytest.mark.parametrize("api_version", VERSIONS)
@pytest.mark.parametrize("event_type", SAMPLE_TYPES)
def test_every_projected_type_normalizes_to_what_its_sample_was_built_with(
    event_type: str, api_version: str
) -> None:
    assert_fields(
        normalized(built(event_type, api_version)), expected_fields(event_type, api_version)
    )


@pytest.mark.parametrize("event_type", SAMPLE_TYPES)
def test_a_later_api_version_is_read_in_the_new_shape(event_type: str) -> None:
    event = built(event_type, "2025-10-29.clover")
    assert_fields(normalized(event), expected_fields(event_type, "2025-10-29.clover"))


def test_the_sample_types_are_exactly_the_projected_types() -> None:
    assert SAMPLE_TYPES == sorted(PROJECTED_TYPES - DISPUTE_TYPES)
    assert (len(PROJECTED_TYPES), len(DISPUTE_TYPES)) == (19, 5)


# --- disputes ----------------------------------------------------------------------


@pytest.mark.parametrize("event_type", sorted(DISPUTE_TYPES))
def test_a_dispute_is_news_about_its_payment_keyed_by_the_payment(event_type: str) -> None:
    event = dispute_event(
        event_type, charge_id="ch_D", payment_intent_id="pi_D", dispute_id="dp_D", created=CREATED
    )
    result = normalized(event)
    assert (result.event_type, result.object_type, result.object_id) == (event_type, "dispute", "dp_D")
    assert (result.dispute_id, result.charge_id, result.payment_intent_id) == ("dp_D", "ch_D", "pi_D")
    assert (result.status, result.reason) == (obj(event)["status"], "fraudulent")
    assert (result.customer_id, result.amount, result.currency) == ("", 0, "usd")
    assert partition_key(result) == "pi_D"


def test_a_dispute_of_a_charge_without_an_intent_is_keyed_by_the_charge() -> None:
    result = normalized(dispute_event("charge.dispute.created", charge_id="ch_Old", created=CREATED))
    assert (result.payment_intent_id, partition_key(result)) == ("", "ch_Old")


def test_a_dispute_with_its_charge_expanded_takes_the_customer_and_identity_from_it() -> None:
    event = dispute_event("charge.dispute.closed", charge_id="ch_D", created=CREATED)
    charge = obj(built("charge.succeeded", charge_id="ch_D", payment_intent_id="pi_D"))
    obj(event)["charge"] = charge
    result = normalized(event)
    assert (result.customer_id, result.user_id, result.payment_intent_id) == ("cus_Test", "user_Test", "pi_D")
    assert partition_key(result) == "cus_Test"


def test_a_dispute_without_a_charge_is_malformed_and_named() -> None:
    event = dispute_event("charge.dispute.created", charge_id="ch_D", created=CREATED)
    obj(event)["charge"] = None
    with pytest.raises(MalformedEvent, match=r"data\.object\.charge"):
        normalize(event)


def test_a_dispute_sample_of_another_type_is_refused() -> None:
    with pytest.raises(ValueError, match="not a dispute event type"):
        dispute_event("charge.refunded", charge_id="ch_D")
    with pytest.raises(ValueError, match="unknown sample event type"):
        sample_event("charge.dispute.created")


# --- unknown and malformed events ---------------------------------------------------


@pytest.mark.parametrize("event_type", ["customer.created", "invoice.created", "ping"])
def test_an_unprojected_type_gives_none(event_type: str) -> None:
    assert normalize({**built("invoice.paid"), "type": event_type}) is None


def _delete(event: dict[str, Any], path: tuple[str, ...]) -> None:
    parent = event
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]


@pytest.mark.parametrize(
    ("path", "named"),
    [
        (("id",), "id"),
        (("type",), "type"),
        (("created",), "created"),
        (("data",), "data"),
        (("data", "object"), "data.object"),
        (("data", "object", "id"), "data.object.id"),
        (("data", "object", "customer"), "data.object.customer"),
    ],
)
@pytest.mark.parametrize(
    "event_type",
    [
        "invoice.paid",
        "customer.subscription.updated",
        "charge.succeeded",
        "checkout.session.completed",
    ],
)
def test_a_missing_needed_field_is_malformed_and_named(
    event_type: str, path: tuple[str, ...], named: str
) -> None:
    event = built(event_type)
    if path[-1] == "customer" and event_type == "checkout.session.completed":
        obj(event)["mode"] = "subscription"  # in payment mode it may be a guest's
    if path[-1] == "customer" and event_type == "charge.succeeded":
        _delete(event, path)  # a guest payment: normalized, not malformed
        assert normalized(event).customer_id == ""
        return
    _delete(event, path)
    with pytest.raises(MalformedEvent, match=rf"(^|\W){named}\W"):
        normalize(event)


GUEST_PAYMENT_TYPES = frozenset(
    {
        "charge.succeeded",
        "charge.failed",
        "charge.refunded",
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "checkout.session.completed",
    }
)


@pytest.mark.parametrize("event_type", sorted(GUEST_PAYMENT_TYPES))
@pytest.mark.parametrize("customer", [None, "absent"])
def test_a_guest_payment_normalizes_keyed_by_its_own_id(event_type: str, customer: Any) -> None:
    event = built(event_type)
    if event_type == "checkout.session.completed":
        obj(event)["mode"] = "payment"
    if customer == "absent":
        del obj(event)["customer"]
    else:
        obj(event)["customer"] = customer
    result = normalized(event)
    assert result.customer_id == ""
    expected_key = result.payment_intent_id or result.charge_id or result.object_id
    assert expected_key and partition_key(result) == expected_key


def test_a_guest_charge_without_a_payment_intent_is_keyed_by_the_charge() -> None:
    event = built("charge.succeeded")
    obj(event)["customer"] = None
    obj(event)["payment_intent"] = None
    result = normalized(event)
    assert partition_key(result) == "ch_Test"


def test_every_event_of_one_guest_payment_shares_a_key() -> None:
    keys = set()
    for event_type in ("charge.succeeded", "payment_intent.succeeded", "charge.refunded"):
        event = built(event_type)
        obj(event)["customer"] = None
        keys.add(partition_key(normalized(event)))
    assert keys == {"pi_Test"}


def test_a_customers_event_is_keyed_by_the_customer() -> None:
    assert partition_key(normalized(built("charge.succeeded"))) == "cus_Test"


@pytest.mark.parametrize("event_type", ["invoice.paid", "customer.subscription.updated"])
def test_a_subscription_or_invoice_without_a_customer_stays_malformed(event_type: str) -> None:
    event = built(event_type)
    obj(event)["customer"] = None
    with pytest.raises(MalformedEvent, match=r"data\.object\.customer"):
        normalize(event)


def test_a_subscription_checkout_without_a_customer_stays_malformed() -> None:
    event = built("checkout.session.completed")
    obj(event)["mode"] = "subscription"
    obj(event)["customer"] = None
    with pytest.raises(MalformedEvent, match=r"data\.object\.customer"):
        normalize(event)


@pytest.mark.parametrize("field", ["id", "customer"])
def test_a_null_or_empty_needed_id_is_malformed(field: str) -> None:
    for value in (None, ""):
        event = built("invoice.paid")
        obj(event)[field] = value
        with pytest.raises(MalformedEvent, match=f"data.object.{field}"):
            normalize(event)


def test_a_non_dict_object_is_malformed() -> None:
    event = built("charge.succeeded")
    event["data"]["object"] = ["ch_Test"]
    with pytest.raises(MalformedEvent, match="data.object"):
        normalize(event)


def test_a_non_dict_event_is_malformed() -> None:
    with pytest.raises(MalformedEvent, match="event"):
        normalize([])  # type: ignore[arg-type]


def test_an_object_of_the_wrong_kind_is_malformed() -> None:
    event = built("invoice.paid")
    event["data"]["object"] = obj(built("charge.succeeded"))
    with pytest.raises(MalformedEvent, match="data.object.object"):
        normalize(event)


def test_the_error_message_never_echoes_the_payload() -> None:
    event = built("invoice.paid")
    obj(event)["amount_paid"] = "secret-looking-value-42"
    del obj(event)["customer"]
    with pytest.raises(MalformedEvent) as caught:
        normalize(event)
    assert "data.object.amount_paid" in str(caught.value)
    assert "secret-looking-value-42" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize("bad", [10.5, 999.0, "999", True, [999]])
def test_a_non_integer_amount_is_malformed(bad: Any) -> None:
    event = built("charge.succeeded")
    obj(event)["amount"] = bad
    with pytest.raises(MalformedEvent, match="data.object.amount"):
        normalize(event)


def test_a_null_amount_is_stripes_not_set_and_gives_zero() -> None:
    event = built("charge.succeeded")
    obj(event)["amount"] = None
    assert normalized(event).amount == 0


def test_a_non_integer_created_is_malformed() -> None:
    with pytest.raises(MalformedEvent, match="created"):
        normalize({**built("invoice.paid"), "created": "1767225600"})


def test_an_amount_beyond_int64_is_malformed() -> None:
    event = built("invoice.paid")
    obj(event)["amount_paid"] = 2**63
    with pytest.raises(MalformedEvent, match="data.object.amount_paid"):
        normalize(event)


def test_a_subscription_amount_that_overflows_int64_is_malformed() -> None:
    event = built("customer.subscription.updated")
    obj(event)["items"]["data"][0]["quantity"] = 2**62
    with pytest.raises(MalformedEvent):
        normalize(event)


def test_text_that_is_not_valid_unicode_is_malformed() -> None:
    event = built("charge.succeeded")
    obj(event)["description"] = "lone \ud800 surrogate"
    with pytest.raises(MalformedEvent):
        normalize(event)


def test_extra_unknown_fields_are_accepted_and_do_not_change_the_result() -> None:
    event = built("invoice.paid")
    expected = normalized(copy.deepcopy(event))
    event["brand_new_envelope_field"] = {"nested": [1, 2]}
    obj(event)["brand_new_object_field"] = None
    obj(event)["lines"]["data"][0]["brand_new_line_field"] = "x"
    obj(event)["parent"]["subscription_details"]["brand_new"] = True
    assert normalized(event) == expected


def test_a_missing_api_version_gives_an_empty_one() -> None:
    event = built("invoice.paid")
    event["api_version"] = None
    assert normalized(event).api_version == ""


# --- API version differences --------------------------------------------------------


def test_an_old_invoice_reads_its_subscription_from_the_top_level() -> None:
    event = built("invoice.paid", OLD_API_VERSION)
    assert "parent" not in obj(event)
    assert normalized(event).subscription_id == "sub_Test"


def test_an_old_invoice_reads_an_expanded_subscription_and_its_metadata() -> None:
    event = built("invoice.paid", OLD_API_VERSION, user_id=None, family_id=None)
    obj(event)["subscription"] = obj(
        built("customer.subscription.updated", OLD_API_VERSION, user_id="user_Sub")
    )
    result = normalized(event)
    assert result.subscription_id == "sub_Test"
    assert result.user_id == "user_Sub"


def test_a_new_invoice_reads_its_subscription_from_the_parent() -> None:
    event = built("invoice.paid", NEW_API_VERSION)
    assert "subscription" not in obj(event)
    assert obj(event)["parent"]["subscription_details"]["subscription"] == "sub_Test"
    assert normalized(event).subscription_id == "sub_Test"


def test_a_new_one_off_invoice_without_a_parent_has_no_subscription() -> None:
    event = built("invoice.paid", NEW_API_VERSION, one_off=True)
    assert obj(event)["parent"] is None
    result = normalized(event)
    assert result.subscription_id == ""
    assert result.expires_at == 0
    assert result.price_id == "price_pro_monthly"
    assert result.user_id == "user_Test"  # one-off invoices carry it in their own metadata


def test_an_old_one_off_invoice_has_no_subscription() -> None:
    result = normalized(built("invoice.paid", OLD_API_VERSION, one_off=True))
    assert (result.subscription_id, result.expires_at, result.billing_reason) == ("", 0, "manual")


def test_a_new_invoice_reads_its_payment_intent_from_the_payments_list() -> None:
    event = built("invoice.paid", NEW_API_VERSION, with_payments=True)
    result = normalized(event)
    assert (result.payment_intent_id, result.charge_id) == ("pi_Test", "")


def test_a_new_invoice_paid_by_a_charge_reads_the_charge_from_the_payments_list() -> None:
    event = built("invoice.paid", NEW_API_VERSION, with_payments=True)
    obj(event)["payments"]["data"][0]["payment"] = {"type": "charge", "charge": "ch_Legacy"}
    result = normalized(event)
    assert (result.payment_intent_id, result.charge_id) == ("", "ch_Legacy")


def test_an_old_invoice_reads_an_expanded_payment_intent_and_its_failure() -> None:
    event = built("invoice.payment_failed", OLD_API_VERSION)
    obj(event)["payment_intent"] = obj(built("payment_intent.payment_failed", OLD_API_VERSION))
    result = normalized(event)
    assert result.payment_intent_id == "pi_Test"
    assert (result.failure_code, result.failure_message) == (
        "card_declined",
        "Your card was declined.",
    )


def test_an_invoice_failure_is_empty_unless_the_payload_has_one() -> None:
    for version in VERSIONS:
        result = normalized(built("invoice.payment_failed", version))
        assert (result.failure_code, result.failure_message) == ("", "")


def test_an_invoice_amount_is_the_amount_paid_or_the_amount_due() -> None:
    paid = built("invoice.paid")
    obj(paid).update(amount_due=5_000, amount_paid=4_000)
    failed = built("invoice.payment_failed")
    obj(failed).update(amount_due=5_000, amount_paid=0)
    assert normalized(paid).amount == 4_000
    assert normalized(failed).amount == 5_000


def test_an_old_subscription_reads_its_period_from_the_top_level() -> None:
    event = built("customer.subscription.updated", OLD_API_VERSION)
    assert "current_period_end" not in obj(event)["items"]["data"][0]
    result = normalized(event)
    assert (result.period_start, result.period_end) == (PERIOD_START, PERIOD_END)


def test_a_new_subscription_reads_its_period_from_its_items() -> None:
    event = built("customer.subscription.updated", NEW_API_VERSION)
    assert "current_period_end" not in obj(event)
    result = normalized(event)
    assert (result.period_start, result.period_end, result.expires_at) == (
        PERIOD_START,
        PERIOD_END,
        PERIOD_END,
    )


def test_subscription_items_that_disagree_give_the_earliest_start_and_latest_end() -> None:
    event = built("customer.subscription.updated", NEW_API_VERSION)
    first = obj(event)["items"]["data"][0]
    second = {
        **copy.deepcopy(first),
        "id": "si_Second",
        "current_period_start": PERIOD_START - 10,
        "current_period_end": PERIOD_END - 10,
    }
    first.update(current_period_start=PERIOD_START + 10, current_period_end=PERIOD_END + 10)
    obj(event)["items"]["data"].append(second)
    result = normalized(event)
    assert (result.period_start, result.period_end) == (PERIOD_START - 10, PERIOD_END + 10)
    assert result.price_id == "price_pro_monthly"  # still the first item's


def test_a_subscription_item_without_a_price_falls_back_to_its_plan() -> None:
    event = built("customer.subscription.updated", OLD_API_VERSION)
    obj(event)["items"]["data"][0]["price"] = None
    result = normalized(event)
    assert (result.price_id, result.product_id) == ("price_pro_monthly", "prod_Test")


def test_a_new_invoice_line_reads_its_price_from_pricing() -> None:
    event = built("invoice.paid", NEW_API_VERSION)
    line = obj(event)["lines"]["data"][0]
    assert "price" not in line and "plan" not in line
    result = normalized(event)
    assert (result.price_id, result.product_id) == ("price_pro_monthly", "prod_Test")


def test_an_old_invoice_line_without_a_price_falls_back_to_its_plan() -> None:
    event = built("invoice.paid", OLD_API_VERSION)
    obj(event)["lines"]["data"][0]["price"] = None
    assert normalized(event).price_id == "price_pro_monthly"


@pytest.mark.parametrize("api_version", VERSIONS)
def test_an_invoice_takes_the_period_of_its_subscription_line_not_a_proration_line(
    api_version: str,
) -> None:
    event = built("invoice.paid", api_version)
    lines = obj(event)["lines"]["data"]
    proration = copy.deepcopy(lines[0])
    proration["period"] = {"start": PERIOD_START - 99, "end": PERIOD_START}
    if is_new_shape(api_version):
        proration["parent"]["subscription_item_details"]["proration"] = True
        proration["pricing"]["price_details"]["price"] = "price_old"
    else:
        proration.update(proration=True, type="invoiceitem", price=None, plan=None)
    lines.insert(0, proration)
    result = normalized(event)
    assert (result.period_start, result.period_end) == (PERIOD_START, PERIOD_END)
    assert result.price_id == "price_pro_monthly"


def test_an_invoice_without_lines_falls_back_to_its_own_period() -> None:
    event = built("invoice.paid")
    obj(event)["lines"]["data"] = []
    obj(event).update(period_start=111, period_end=222)
    result = normalized(event)
    assert (result.period_start, result.period_end, result.expires_at) == (111, 222, 222)
    assert result.price_id == ""


# --- customers, identity and metadata -----------------------------------------------


@pytest.mark.parametrize("event_type", SAMPLE_TYPES)
def test_an_expanded_customer_object_gives_the_customer_id(event_type: str) -> None:
    event = built(
        event_type,
        user_id=None,
        family_id=None,
        customer_metadata={"user_id": "user_Cus", "family_id": "family_Cus"},
    )
    assert isinstance(obj(event)["customer"], dict)
    result = normalized(event)
    assert result.customer_id == "cus_Test"
    assert (result.user_id, result.family_id) == ("user_Cus", "family_Cus")


def test_an_expanded_customer_without_an_id_is_malformed() -> None:
    event = built("charge.succeeded")
    obj(event)["customer"] = {"object": "customer", "metadata": {}}
    with pytest.raises(MalformedEvent, match=r"data\.object\.customer\.id"):
        normalize(event)


def test_the_customer_email_falls_back_to_the_expanded_customer() -> None:
    event = built(
        "customer.subscription.updated", expand_customer=True, customer_email="sub@example.com"
    )
    assert normalized(event).customer_email == "sub@example.com"


def test_object_metadata_beats_subscription_metadata() -> None:
    event = built("invoice.paid", OLD_API_VERSION)
    obj(event)["metadata"] = {"user_id": "user_Obj"}
    assert obj(event)["subscription_details"]["metadata"]["user_id"] == "user_Test"
    result = normalized(event)
    assert (result.user_id, result.family_id) == ("user_Obj", "family_Test")


@pytest.mark.parametrize("api_version", VERSIONS)
def test_subscription_metadata_beats_customer_metadata(api_version: str) -> None:
    event = built("invoice.paid", api_version, customer_metadata={"user_id": "user_Cus"})
    assert normalized(event).user_id == "user_Test"


def test_customer_metadata_beats_the_client_reference_id() -> None:
    event = built(
        "checkout.session.completed",
        user_id=None,
        family_id=None,
        customer_metadata={"user_id": "user_Cus"},
        client_reference_id="user_Ref",
    )
    assert normalized(event).user_id == "user_Cus"


def test_the_client_reference_id_is_the_last_resort_for_the_user_only() -> None:
    event = built(
        "checkout.session.completed", user_id=None, family_id=None, client_reference_id="user_Ref"
    )
    result = normalized(event)
    assert (result.user_id, result.family_id) == ("user_Ref", "")


def test_an_expanded_checkout_subscription_metadata_beats_the_customer_metadata() -> None:
    event = built(
        "checkout.session.completed",
        user_id=None,
        family_id=None,
        customer_metadata={"user_id": "user_Cus", "family_id": "family_Cus"},
    )
    obj(event)["subscription"] = obj(
        built("customer.subscription.created", user_id="user_Sub", family_id=None)
    )
    result = normalized(event)
    assert (result.user_id, result.family_id) == ("user_Sub", "family_Cus")


def test_user_and_family_are_resolved_independently() -> None:
    event = built(
        "charge.succeeded",
        user_id="user_Obj",
        family_id=None,
        customer_metadata={"user_id": "user_Cus", "family_id": "family_Cus"},
    )
    result = normalized(event)
    assert (result.user_id, result.family_id) == ("user_Obj", "family_Cus")


def test_blank_metadata_values_do_not_count_as_found() -> None:
    event = built("invoice.paid", NEW_API_VERSION)
    obj(event)["metadata"] = {"user_id": "  ", "family_id": None}
    result = normalized(event)
    assert (result.user_id, result.family_id) == ("user_Test", "family_Test")


def test_without_any_identity_user_and_family_are_empty() -> None:
    for event_type in SAMPLE_TYPES:
        result = normalized(
            built(event_type, user_id=None, family_id=None, client_reference_id=None)
        )
        assert (result.user_id, result.family_id) == ("", ""), event_type


def test_plan_id_and_feature_code_come_from_metadata() -> None:
    result = normalized(built("charge.succeeded", plan_id="pro", feature_code="exports"))
    assert (result.plan_id, result.feature_code) == ("pro", "exports")
    assert normalized(built("charge.succeeded")).plan_id == ""


def test_an_invoice_gets_the_plan_id_from_its_subscription_metadata() -> None:
    event = built("invoice.paid", NEW_API_VERSION)
    obj(event)["parent"]["subscription_details"]["metadata"]["plan_id"] = "basic"
    assert normalized(event).plan_id == "basic"


def test_non_string_metadata_values_are_stringified() -> None:
    event = built("charge.succeeded", user_id=None, family_id=None)
    obj(event)["metadata"] = {
        "n": 3,
        "flag": True,
        "none": None,
        "nested": {"b": 1, "a": [2]},
        "s": "text",
    }
    assert dict(normalized(event).metadata) == {
        "n": "3",
        "flag": "true",
        "none": "",
        "nested": '{"a":[2],"b":1}',
        "s": "text",
    }


def test_null_metadata_on_a_nested_object_is_treated_as_empty() -> None:
    event = built("invoice.paid", NEW_API_VERSION)
    obj(event)["parent"]["subscription_details"]["metadata"] = None
    assert normalized(event).user_id == ""


# --- subscription details -----------------------------------------------------------


def test_a_subscription_set_to_cancel_reports_when() -> None:
    event = built(
        "customer.subscription.updated",
        cancel_at_period_end=True,
        cancel_at=PERIOD_END,
        canceled_at=CREATED,
    )
    result = normalized(event)
    assert (result.cancel_at_period_end, result.cancel_at, result.canceled_at) == (
        True,
        PERIOD_END,
        CREATED,
    )


def test_a_charge_refund_reports_the_refunded_amount() -> None:
    result = normalized(built("charge.refunded", amount_refunded=500))
    assert (result.amount, result.amount_refunded) == (TOTAL, 500)


def test_a_payment_mode_checkout_reports_its_payment_intent() -> None:
    result = normalized(built("checkout.session.completed", mode="payment"))
    assert (result.mode, result.payment_intent_id, result.subscription_id, result.invoice_id) == (
        "payment",
        "pi_Test",
        "",
        "",
    )


# --- samples ------------------------------------------------------------------------


def test_a_sample_of_an_unknown_type_is_refused_with_the_known_types() -> None:
    with pytest.raises(ValueError, match="invoice.paid"):
        sample_event("invoice.created")


def test_a_sample_with_an_unknown_override_is_refused() -> None:
    with pytest.raises(TypeError, match="price_idd"):
        sample_event("invoice.paid", price_idd="price_x")


@pytest.mark.parametrize("api_version", VERSIONS)
@pytest.mark.parametrize("event_type", SAMPLE_TYPES)
def test_a_sample_looks_like_a_stripe_event(event_type: str, api_version: str) -> None:
    event = sample_event(event_type, api_version=api_version)
    assert event["object"] == "event"
    assert event["id"].startswith("evt_")
    assert event["type"] == event_type and event["api_version"] == api_version
    assert {"created", "livemode", "pending_webhooks", "request", "data"} <= event.keys()
    assert obj(event)["customer"].startswith("cus_")
    assert obj(event)["metadata"].get("user_id", "user_").startswith("user_")


def test_a_sample_subscription_defaults_to_the_basic_monthly_price() -> None:
    event = sample_event("customer.subscription.created")
    assert obj(event)["items"]["data"][0]["price"]["id"] == DEFAULT_PRICE_ID
    assert obj(event)["items"]["data"][0]["id"].startswith("si_")
    assert obj(event)["id"].startswith("sub_")


def test_sample_ids_are_random_unless_given() -> None:
    first, second = sample_event("invoice.paid"), sample_event("invoice.paid")
    assert first["id"] != second["id"]
    assert obj(first)["id"] != obj(second)["id"]
    assert obj(first)["id"].startswith("in_")
    assert obj(first)["lines"]["data"][0]["id"].startswith("il_")


def test_an_unparseable_api_version_is_refused() -> None:
    with pytest.raises(ValueError, match="API version"):
        sample_event("invoice.paid", api_version="latest")


# --- property tests -----------------------------------------------------------------

_text = st.text(max_size=12) | st.sampled_from(["", "cus_1", "\ud800", "x\udfff"])
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | _text
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=24,
)
_object_keys = (
    st.sampled_from(
        [
            "id",
            "object",
            "customer",
            "metadata",
            "amount",
            "amount_due",
            "amount_paid",
            "lines",
            "items",
            "parent",
            "subscription",
            "subscription_details",
            "payments",
            "payment_intent",
            "charge",
            "latest_charge",
            "last_payment_error",
            "period_start",
            "client_reference_id",
            "customer_details",
            "status",
            "currency",
            "quantity",
        ]
    )
    | _text
)
_loose_events = st.fixed_dictionaries(
    {},
    optional={
        "id": st.just("evt_1") | _json,
        "type": st.sampled_from(SAMPLE_TYPES) | _json,
        "created": st.integers() | _json,
        "api_version": st.sampled_from(VERSIONS) | _json,
        "livemode": st.booleans() | _json,
        "data": st.fixed_dictionaries(
            {}, optional={"object": st.dictionaries(_object_keys, _json, max_size=8) | _json}
        )
        | _json,
    },
)
# A valid envelope around an object of random fields, so the object parsers get exercised.
_objects = st.builds(
    lambda fields, known: {**fields, **known},
    st.dictionaries(_object_keys, _json, max_size=8),
    st.fixed_dictionaries({"id": st.just("obj_1")}, optional={"customer": st.just("cus_1")}),
)
_envelopes = st.fixed_dictionaries(
    {
        "id": st.just("evt_1"),
        "type": st.sampled_from(SAMPLE_TYPES),
        "created": st.integers(min_value=0, max_value=2**40),
        "data": st.fixed_dictionaries({"object": _objects}),
    },
    optional={"api_version": st.sampled_from(VERSIONS), "livemode": st.booleans()},
)


def _normalizes_or_refuses(event: Any) -> None:
    try:
        result = normalize(event)
    except MalformedEvent:
        return
    assert result is None or isinstance(result, events_pb2.PaymentEvent)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=_envelopes | _loose_events | st.dictionaries(_text, _json, max_size=6))
def test_arbitrary_json_gives_an_event_none_or_malformed_event_only(event: dict[str, Any]) -> None:
    _normalizes_or_refuses(event)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, inner in value.items():
            paths += _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            paths += _paths(inner, (*prefix, index))
    return paths


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(), event_type=st.sampled_from(SAMPLE_TYPES), api_version=st.sampled_from(VERSIONS)
)
def test_a_sample_with_any_field_replaced_gives_an_event_or_malformed_event_only(
    data: st.DataObject, event_type: str, api_version: str
) -> None:
    event = built(event_type, api_version, expand_customer=data.draw(st.booleans()))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        path = data.draw(st.sampled_from(_paths(event)))
        parent = event
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(_json)
        elif isinstance(parent, dict):
            del parent[path[-1]]
    _normalizes_or_refuses(event)


# --- real Stripe payloads (tests/fixtures/stripe) -----------------------------------
# The generic tests above, run over payloads Stripe generated (not our sample builder).

REAL = stripe_fixtures.names()
REAL_PROJECTED = stripe_fixtures.of_types(PROJECTED_TYPES)
_AMOUNT_FIELD = {
    "charge": "amount",
    "payment_intent": "amount",
    "checkout.session": "amount_total",
    "dispute": "amount",  # read (and checked), but the disputed sum is not the payment's amount
}


def test_the_real_payloads_cover_every_payment_kind() -> None:
    kinds = {stripe_fixtures.event(name)["data"]["object"]["object"] for name in REAL}
    assert {"charge", "payment_intent", "checkout.session", "dispute"} <= kinds
    assert any(stripe_fixtures.event(n)["data"]["object"].get("customer") is None for n in REAL_PROJECTED)


@pytest.mark.parametrize("name", REAL_PROJECTED)
def test_a_real_payload_normalizes_to_what_it_says(name: str) -> None:
    event = stripe_fixtures.event(name)
    o = obj(event)
    result = normalized(stripe_fixtures.event(name))
    customer = o.get("customer") or ""
    assert (result.event_id, result.event_type, result.created) == (event["id"], event["type"], event["created"])
    assert (result.object_id, result.customer_id, result.api_version) == (o["id"], customer, event.get("api_version") or "")
    amount = 0 if o["object"] == "dispute" else o[_AMOUNT_FIELD[o["object"]]]
    assert (result.amount, result.currency) == (amount, o["currency"])
    assert result.status == (o.get("status") or "")
    if o["object"] == "dispute":
        assert (result.dispute_id, result.charge_id) == (o["id"], o["charge"])
        assert (result.payment_intent_id, result.reason) == (o.get("payment_intent") or "", o["reason"])
    if o["object"] == "charge":
        assert (result.charge_id, result.payment_intent_id) == (o["id"], o.get("payment_intent") or "")
        assert result.amount_refunded == o["amount_refunded"]
    if o["object"] == "payment_intent":
        assert result.payment_intent_id == o["id"]
        error = o.get("last_payment_error") or {}
        assert result.failure_code == (error.get("code") or "")
    if o["object"] == "checkout.session":
        assert (result.mode, result.payment_intent_id) == (o["mode"], o.get("payment_intent") or "")
        assert result.user_id == (o.get("client_reference_id") or "")
    expected_key = customer or o.get("payment_intent") or o["id"]
    if o["object"] == "payment_intent":
        expected_key = customer or o["id"]
    if o["object"] == "dispute":
        expected_key = o.get("payment_intent") or o["charge"]
    assert partition_key(result) == expected_key


_UNPROJECTED = {
    "charge": "charge.updated",
    "payment_intent": "payment_intent.created",
    "checkout.session": "checkout.session.expired",
    "dispute": "charge.dispute.not_a_type",
}


@pytest.mark.parametrize("name", REAL)
def test_a_real_payload_of_an_unprojected_type_gives_none(name: str) -> None:
    event = stripe_fixtures.event(name)
    event["type"] = _UNPROJECTED[obj(event)["object"]]
    assert normalize(event) is None


@pytest.mark.parametrize(
    ("path", "named"),
    [
        (("id",), "id"),
        (("type",), "type"),
        (("created",), "created"),
        (("data",), "data"),
        (("data", "object"), "data.object"),
        (("data", "object", "id"), "data.object.id"),
    ],
)
@pytest.mark.parametrize("name", REAL_PROJECTED)
def test_a_real_payload_missing_a_needed_field_is_malformed_and_named(
    name: str, path: tuple[str, ...], named: str
) -> None:
    event = stripe_fixtures.event(name)
    _delete(event, path)
    with pytest.raises(MalformedEvent, match=rf"(^|\W){named}\W"):
        normalize(event)


@pytest.mark.parametrize("name", REAL_PROJECTED)
def test_a_real_payload_with_a_non_dict_object_or_the_wrong_kind_is_malformed(name: str) -> None:
    event = stripe_fixtures.event(name)
    event["data"]["object"] = [obj(event)["id"]]
    with pytest.raises(MalformedEvent, match="data.object"):
        normalize(event)
    event = stripe_fixtures.event(name)
    obj(event)["object"] = "invoiceitem"
    with pytest.raises(MalformedEvent, match="data.object.object"):
        normalize(event)


@pytest.mark.parametrize("bad", [10.5, "999", True, [999], 2**63])
@pytest.mark.parametrize("name", REAL_PROJECTED)
def test_a_real_payload_with_a_bad_amount_is_malformed_and_never_echoed(name: str, bad: Any) -> None:
    event = stripe_fixtures.event(name)
    field_name = _AMOUNT_FIELD[obj(event)["object"]]
    obj(event)[field_name] = bad
    with pytest.raises(MalformedEvent, match=f"data.object.{field_name}") as caught:
        normalize(event)
    assert repr(bad) not in str(caught.value) and caught.value.__cause__ is None


@pytest.mark.parametrize("name", REAL_PROJECTED)
def test_a_real_payload_with_a_non_integer_created_or_invalid_unicode_is_malformed(name: str) -> None:
    with pytest.raises(MalformedEvent, match="created"):
        normalize({**stripe_fixtures.event(name), "created": str(stripe_fixtures.event(name)["created"])})
    event = stripe_fixtures.event(name)
    obj(event)["currency"] = "lone \ud800 surrogate"
    with pytest.raises(MalformedEvent):
        normalize(event)


@pytest.mark.parametrize("name", REAL_PROJECTED)
def test_a_real_payload_with_extra_fields_or_no_api_version_normalizes_the_same(name: str) -> None:
    expected = normalized(stripe_fixtures.event(name))
    event = stripe_fixtures.event(name)
    event["brand_new_envelope_field"] = {"nested": [1, 2]}
    obj(event)["brand_new_object_field"] = None
    assert normalized(event) == expected
    event["api_version"] = None
    assert normalized(event).api_version == ""


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(REAL))
def test_a_real_payload_with_any_field_replaced_gives_an_event_or_malformed_event_only(
    data: st.DataObject, name: str
) -> None:
    event = stripe_fixtures.event(name)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        path = data.draw(st.sampled_from(_paths(event)))
        parent = event
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(_json)
        elif isinstance(parent, dict):
            del parent[path[-1]]
    _normalizes_or_refuses(event)


# The specific tests above, over the real payloads where the kind of object allows.
REAL_WITH_CUSTOMER_FIELD = [n for n in REAL_PROJECTED if "customer" in obj(stripe_fixtures.event(n))]


@pytest.mark.parametrize("name", REAL_WITH_CUSTOMER_FIELD)
def test_a_real_payload_with_its_customer_expanded_takes_the_id_and_the_identity_from_it(name: str) -> None:
    event = stripe_fixtures.event(name)
    obj(event)["metadata"] = {}
    obj(event).pop("client_reference_id", None)
    obj(event)["customer"] = {"id": "cus_Real", "object": "customer", "metadata": {"user_id": "user_Cus", "family_id": "family_Cus"}}
    result = normalized(event)
    assert (result.customer_id, result.user_id, result.family_id) == ("cus_Real", "user_Cus", "family_Cus")
    assert partition_key(result) == "cus_Real"


@pytest.mark.parametrize("name", REAL_PROJECTED)
def test_a_real_payload_with_a_null_or_empty_object_id_is_malformed(name: str) -> None:
    for value in (None, ""):
        event = stripe_fixtures.event(name)
        obj(event)["id"] = value
        with pytest.raises(MalformedEvent, match="data.object.id"):
            normalize(event)


@pytest.mark.parametrize("name", REAL_PROJECTED)
def test_a_real_payloads_error_never_echoes_it(name: str) -> None:
    event = stripe_fixtures.event(name)
    obj(event)["currency"] = ["secret-looking-value-42"]
    with pytest.raises(MalformedEvent) as caught:
        normalize(event)
    assert "data.object.currency" in str(caught.value)
    assert "secret-looking-value-42" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize("name", REAL_PROJECTED)
def test_a_real_payloads_non_string_metadata_is_stringified(name: str) -> None:
    event = stripe_fixtures.event(name)
    if obj(event)["object"] == "dispute":  # a dispute's metadata is not the payment's: not carried
        assert dict(normalized(event).metadata) == {}
        return
    obj(event)["metadata"] = {"n": 3, "flag": True, "none": None, "nested": {"b": 1, "a": [2]}, "s": "text"}
    assert dict(normalized(event).metadata) == {
        "n": "3", "flag": "true", "none": "", "nested": '{"a":[2],"b":1}', "s": "text",
    }
