"""Unit tests of the entitlements handlers: events in, state out, no I/O.

Events are realistic: built by the ingester's sample builder and normalizer.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import fields
from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payment.v1 import events_pb2
from paymentsvc.dev.samples import SAMPLE_TYPES, dispute_event, sample_event
from services.entitlements.handlers import HANDLERS, InvalidEvent, apply, derive_deferred
from services.entitlements.model import Changes, Entitlement, State
from services.ingest_webhooks.normalize import normalize
from shared.catalog import Catalog, load_catalog
from shared.config import DEFAULT_CATALOG_PATH
from tests.support.guests import guest_event

DAY = 86_400
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
P1 = T0 + 30 * DAY  # end of the first period
P2 = P1 + 30 * DAY
CUSTOMER = "cus_Unit"
USER = "user_Unit"
FAMILY = "family_Unit"
SUB = "sub_Unit"
BASIC_FEATURES = {"projects", "api_calls", "storage_mb", "ai_credits", "export_pdf"}
PRO_ONLY = {"seats", "priority_support"}
REDUCED_BASIC = {"projects", "storage_mb", "export_pdf"}  # min_access: reduced


@cache
def catalog() -> Catalog:
    return load_catalog(DEFAULT_CATALOG_PATH)


def event(
    event_type: str, created: int, *, user_id: str | None = None, **kw: Any
) -> events_pb2.PaymentEvent:
    kw.setdefault("customer_id", CUSTOMER)
    kw.setdefault("event_id", f"evt_{event_type}_{created}")
    normalized = normalize(sample_event(event_type, created=created, user_id=user_id, **kw))
    assert normalized is not None
    return normalized


def sub_event(event_type: str, created: int, **kw: Any) -> events_pb2.PaymentEvent:
    kw.setdefault("subscription_id", SUB)
    kw.setdefault("period_start", T0)
    kw.setdefault("period_end", P1)
    return event(f"customer.subscription.{event_type}", created, **kw)


def command(event_type: str, created: int, **fields: Any) -> events_pb2.PaymentEvent:
    """One of our own events (api_grpc commands), which have no Stripe payload."""
    fields.setdefault("customer_id", CUSTOMER)
    fields.setdefault("event_id", f"evt_{event_type}_{created}")
    return events_pb2.PaymentEvent(
        event_type=event_type, created=created, source=events_pb2.EVENT_SOURCE_API, **fields
    )


def run(events: Iterable[events_pb2.PaymentEvent], state: State | None = None) -> State:
    state = state if state is not None else State()
    for e in events:
        state.apply(apply(e, state, catalog()))
    return state


def grants(state: State, source: tuple[str, str] = ("subscription", SUB)) -> dict[str, Entitlement]:
    return {row.feature_code: row for row in state.entitlements.get(source, ())}


def statuses(state: State, source: tuple[str, str] = ("subscription", SUB)) -> dict[str, str]:
    return {code: row.status for code, row in grants(state, source).items()}


def mapped(*events: events_pb2.PaymentEvent) -> State:
    """The customer mapped to USER first, then `events`."""
    checkout = event("checkout.session.completed", T0 - 60, user_id=USER, subscription_id=SUB)
    return run([checkout, *events])


# ---------------------------------------------------------------- every event type


@pytest.mark.parametrize("event_type", SAMPLE_TYPES)
def test_every_stripe_event_type_applies_and_maps_its_customer(event_type: str) -> None:
    state = run([event(event_type, T0, user_id=USER, subscription_id=SUB)])

    assert state.customers[CUSTOMER].user_id == USER


def test_our_two_payment_commands_are_handled() -> None:
    assert {"payment.created", "payment.status_updated"} <= HANDLERS.keys()
    assert set(SAMPLE_TYPES) <= HANDLERS.keys()


def test_an_unknown_event_type_changes_nothing() -> None:
    changes = apply(command("customer.created", T0, user_id=USER), State(), catalog())

    assert not changes


# ---------------------------------------------------------------- customers


def test_an_event_without_user_or_family_maps_no_customer() -> None:
    state = run([sub_event("created", T0)])

    assert CUSTOMER not in state.customers


def test_a_customer_keeps_the_user_it_was_first_mapped_to_and_gains_a_family() -> None:
    state = run(
        [
            event("charge.succeeded", T0, user_id=USER),
            event("charge.succeeded", T0 + 1, user_id="user_Other", family_id=FAMILY),
        ]
    )

    customer = state.customers[CUSTOMER]
    assert (customer.user_id, customer.family_id, customer.created_at) == (USER, FAMILY, T0)


# ---------------------------------------------------------------- subscription lifecycle


def test_an_active_subscription_grants_every_feature_of_its_plan_with_its_limits() -> None:
    state = mapped(sub_event("created", T0))

    rows = grants(state)
    assert set(rows) == BASIC_FEATURES
    assert {r.status for r in rows.values()} == {"active"}
    assert rows["api_calls"].usage_limit == 50_000
    assert rows["api_calls"].limit_period == "billing_period"
    assert rows["ai_credits"].enforcement == "soft"
    assert rows["api_calls"].expires_at == P1
    assert rows["api_calls"].subject_type == "user" and rows["api_calls"].subject_id == USER
    sub = state.subscriptions[SUB]
    assert (sub.plan_id, sub.access_level, sub.user_id) == ("basic", "full", USER)


def test_a_trialing_subscription_has_full_access() -> None:
    state = mapped(sub_event("created", T0, status="trialing", trial_end=P1))

    assert state.subscriptions[SUB].access_level == "full"
    assert set(statuses(state).values()) == {"active"}


def test_an_incomplete_subscription_keeps_its_features_suspended() -> None:
    state = mapped(sub_event("created", T0, status="incomplete"))

    assert state.subscriptions[SUB].access_level == "blocked"
    assert set(statuses(state).values()) == {"suspended"}
    assert state.access_changes.get(SUB) == ()


def test_past_due_enters_grace_and_records_when_the_status_began() -> None:
    state = mapped(
        sub_event("created", T0),
        sub_event("updated", P1 + 60, status="past_due", period_start=P1, period_end=P2),
    )

    sub = state.subscriptions[SUB]
    assert (sub.status, sub.access_level, sub.status_since) == ("past_due", "grace", P1 + 60)
    assert set(statuses(state).values()) == {"active"}  # grace is full access


def test_a_past_due_update_after_the_grace_days_applies_the_policy_level() -> None:
    past_due = {"status": "past_due", "period_start": P1, "period_end": P2}
    state = mapped(
        sub_event("created", T0),
        sub_event("updated", P1, **past_due),
        sub_event("updated", P1 + 8 * DAY, **past_due, cancel_at_period_end=False),
    )

    sub = state.subscriptions[SUB]
    assert (sub.access_level, sub.status_since) == ("reduced", P1)  # still since the first past_due
    found = statuses(state)
    assert {code for code, status in found.items() if status == "active"} == REDUCED_BASIC
    assert {
        code for code, status in found.items() if status == "suspended"
    } == BASIC_FEATURES - REDUCED_BASIC
    assert [c.to_level for c in state.access_changes[SUB]] == ["full", "grace", "reduced"]


def test_recovery_from_past_due_restores_every_feature() -> None:
    state = mapped(
        sub_event("created", T0),
        sub_event("updated", P1, status="past_due", period_start=P1, period_end=P2),
        sub_event("updated", P1 + 9 * DAY, status="past_due", period_start=P1, period_end=P2),
        sub_event("updated", P1 + 10 * DAY, period_start=P1, period_end=P2),
    )

    assert state.subscriptions[SUB].access_level == "full"
    assert set(statuses(state).values()) == {"active"}


def test_unpaid_blocks_the_subscription_and_suspends_every_feature() -> None:
    state = mapped(sub_event("created", T0), sub_event("updated", P1 + 20 * DAY, status="unpaid"))

    assert state.subscriptions[SUB].access_level == "blocked"
    assert set(statuses(state).values()) == {"suspended"}


def test_deleting_a_subscription_revokes_its_entitlements() -> None:
    state = mapped(sub_event("created", T0), sub_event("deleted", T0 + 5 * DAY))

    sub = state.subscriptions[SUB]
    assert (sub.status, sub.access_level) == ("canceled", "blocked")
    rows = grants(state).values()
    assert {r.status for r in rows} == {"revoked"}
    assert {r.revoked_at for r in rows} == {T0 + 5 * DAY}


def test_cancel_at_period_end_sets_every_entitlement_to_expire_at_period_end() -> None:
    state = mapped(
        event("invoice.paid", T0 + 1, subscription_id=SUB, period_start=P1, period_end=P2),
        sub_event("created", T0),
        sub_event("updated", T0 + DAY, cancel_at_period_end=True),
    )

    rows = grants(state).values()
    assert {r.expires_at for r in rows} == {P1}  # not the paid-through P2
    assert {r.status for r in rows} == {"active"}


def test_invoice_paid_extends_expiry_to_the_paid_period_end() -> None:
    paid = event("invoice.paid", P1 - 60, subscription_id=SUB, period_start=P1, period_end=P2)
    state = mapped(sub_event("created", T0), paid)

    rows = grants(state).values()
    assert {r.expires_at for r in rows} == {P2}
    assert {r.version.event_id for r in rows} == {paid.event_id}


def test_an_invoice_before_its_subscription_is_kept_until_the_subscription_arrives() -> None:
    state = mapped(
        event("invoice.paid", T0 - 1, subscription_id=SUB, period_start=P1, period_end=P2)
    )
    assert state.paid[SUB].paid_through == P2
    assert not grants(state)

    state = run([sub_event("created", T0)], state)
    assert {r.expires_at for r in grants(state).values()} == {P2}


def test_the_paid_through_only_grows() -> None:
    later = event(
        "invoice.paid", P1, subscription_id=SUB, period_start=P1, period_end=P2, event_id="evt_b"
    )
    earlier = event(
        "invoice.paid", T0, subscription_id=SUB, period_start=T0, period_end=P1, event_id="evt_a"
    )

    assert run([later, earlier]).paid[SUB] == run([earlier, later]).paid[SUB]
    assert run([later, earlier]).paid[SUB].paid_through == P2


def test_an_older_subscription_event_does_not_overwrite_the_newer_snapshot() -> None:
    state = mapped(sub_event("updated", T0 + DAY, status="past_due"), sub_event("created", T0))

    sub = state.subscriptions[SUB]
    assert (sub.status, sub.version.created, sub.created_at) == ("past_due", T0 + DAY, T0)
    assert [c.to_level for c in state.access_changes[SUB]] == ["full", "grace"]


def test_trial_will_end_is_applied_like_any_subscription_snapshot() -> None:
    state = mapped(sub_event("trial_will_end", T0, trial_end=P1))

    assert (state.subscriptions[SUB].status, state.subscriptions[SUB].trial_end) == ("trialing", P1)


def test_each_change_of_access_level_is_recorded_with_the_event_that_caused_it() -> None:
    updated = sub_event("updated", P1, status="past_due")
    state = mapped(
        sub_event("created", T0), sub_event("updated", T0 + 1, cancel_at_period_end=True), updated
    )

    changes = state.access_changes[SUB]
    assert [(c.from_level, c.to_level) for c in changes] == [("blocked", "full"), ("full", "grace")]
    assert (changes[1].event_id, changes[1].event_created, changes[1].status) == (
        updated.event_id,
        P1,
        "past_due",
    )


# ---------------------------------------------------------------- catalog, subjects, plans


def test_a_price_not_in_the_catalog_grants_nothing_and_is_recorded_as_a_miss() -> None:
    state = mapped(sub_event("created", T0, price_id="price_unknown"))

    sub = state.subscriptions[SUB]
    assert (sub.plan_id, sub.price_id, sub.access_level) == (None, "price_unknown", "blocked")
    assert not grants(state)
    miss = state.catalog_misses["price_unknown"]
    assert (miss.first_seen_at, miss.last_subscription_id) == (T0, SUB)


def test_a_family_pool_plan_grants_to_the_family() -> None:
    state = run(
        [sub_event("created", T0, price_id="price_pro_monthly", user_id=USER, family_id=FAMILY)]
    )

    rows = grants(state).values()
    assert {(r.subject_type, r.subject_id) for r in rows} == {("family", FAMILY)}
    assert {r.feature_code for r in rows} == BASIC_FEATURES | PRO_ONLY
    assert {(r.user_id, r.family_id) for r in rows} == {(USER, FAMILY)}


def test_a_family_pool_plan_without_a_known_family_grants_to_the_user() -> None:
    state = mapped(sub_event("created", T0, price_id="price_pro_monthly"))

    assert {(r.subject_type, r.subject_id) for r in grants(state).values()} == {("user", USER)}


def test_a_plan_that_is_no_family_pool_grants_to_the_user_even_in_a_family() -> None:
    state = run([sub_event("created", T0, user_id=USER, family_id=FAMILY)])

    assert {(r.subject_type, r.subject_id) for r in grants(state).values()} == {("user", USER)}


def test_a_plan_change_revokes_the_features_the_new_plan_lacks() -> None:
    upgrade = sub_event("updated", T0 + DAY, price_id="price_pro_monthly")
    downgrade = sub_event("updated", T0 + 2 * DAY)
    state = mapped(sub_event("created", T0), upgrade, downgrade)

    rows = grants(state)
    assert {code for code, r in rows.items() if r.status == "revoked"} == PRO_ONLY
    assert {rows[code].revoked_at for code in PRO_ONLY} == {T0 + 2 * DAY}
    assert {rows[code].plan_id for code in PRO_ONLY} == {"pro"}
    assert {code for code, r in rows.items() if r.status == "active"} == BASIC_FEATURES
    assert rows["api_calls"].plan_id == "basic"
    assert rows["api_calls"].granted_at == T0  # held throughout


def test_a_subscription_without_user_or_family_grants_nothing() -> None:
    state = run([sub_event("created", T0)])

    assert state.subscriptions[SUB].user_id is None
    assert not grants(state)


def test_checkout_after_the_subscription_events_grants_the_subscription() -> None:
    checkout = event("checkout.session.completed", T0 + DAY, user_id=USER, subscription_id=SUB)
    state = run([sub_event("created", T0), checkout])

    assert state.subscriptions[SUB].user_id == USER
    assert set(statuses(state).values()) == {"active"}
    assert state.mapped_customers == {CUSTOMER}


def test_the_free_plan_is_never_stored_per_subject() -> None:
    checkout = event("checkout.session.completed", T0, user_id=USER, mode="payment", plan_id="free")

    assert not run([checkout]).entitlements.get(("checkout", checkout.checkout_session_id))


# ---------------------------------------------------------------- one-time purchases


def test_a_checkout_in_payment_mode_with_a_plan_grants_it_once_without_expiry() -> None:
    checkout = event("checkout.session.completed", T0, user_id=USER, mode="payment", plan_id="pro")
    state = run([checkout])

    rows = grants(state, ("checkout", checkout.checkout_session_id)).values()
    assert {r.feature_code for r in rows} == BASIC_FEATURES | PRO_ONLY
    assert {(r.status, r.access_level, r.expires_at, r.granted_at) for r in rows} == {
        ("active", "full", None, T0)
    }


def test_a_checkout_in_payment_mode_with_an_unknown_price_grants_nothing_and_is_a_miss() -> None:
    checkout = event("checkout.session.completed", T0, user_id=USER, mode="payment")
    checkout.price_id = "price_unknown"  # sessions carry no price in their payload
    state = run([checkout])

    assert not state.entitlements and not state.grants
    assert "price_unknown" in state.catalog_misses


def test_a_checkout_in_subscription_mode_only_maps_the_customer() -> None:
    state = run([event("checkout.session.completed", T0, user_id=USER, subscription_id=SUB)])

    assert state.customers[CUSTOMER].user_id == USER
    assert not state.entitlements and not state.grants


def test_a_charge_without_invoice_that_names_a_plan_grants_it() -> None:
    charge = event("charge.succeeded", T0, user_id=USER, plan_id="basic", charge_id="ch_Unit")
    state = run([charge])

    assert set(statuses(state, ("charge", "ch_Unit")).values()) == {"active"}
    assert set(grants(state, ("charge", "ch_Unit"))) == BASIC_FEATURES


def test_a_charge_without_a_plan_id_grants_nothing() -> None:
    assert not run([event("charge.succeeded", T0, user_id=USER, one_off=True)]).entitlements


def test_a_one_time_grant_waits_for_its_customer_to_be_mapped() -> None:
    charge = event("charge.succeeded", T0, plan_id="basic", charge_id="ch_Unit")
    state = run([charge])
    assert not grants(state, ("charge", "ch_Unit"))

    state = run([event("invoice.payment_failed", T0 + 1, user_id=USER)], state)
    assert set(grants(state, ("charge", "ch_Unit"))) == BASIC_FEATURES


# ---------------------------------------------------------------- payments


def test_a_succeeded_payment_intent_records_a_payment_keyed_by_it() -> None:
    intent = event(
        "payment_intent.succeeded", T0, user_id=USER, payment_intent_id="pi_Unit", amount=1200
    )
    payment = run([intent]).payments["pi_Unit"]

    assert (payment.status, payment.amount, payment.currency, payment.user_id) == (
        "succeeded",
        1200,
        "usd",
        USER,
    )
    assert payment.version.event_id == intent.event_id


def test_a_failed_payment_records_its_failure() -> None:
    state = run([event("charge.failed", T0, payment_intent_id="pi_Unit")])

    payment = state.payments["pi_Unit"]
    assert (payment.status, payment.failure_code) == ("failed", "card_declined")


def test_a_partial_then_a_full_refund() -> None:
    ids = {"payment_intent_id": "pi_Unit", "charge_id": "ch_Unit", "amount": 1000}
    partial = event("charge.refunded", T0 + 1, amount_refunded=400, **ids)
    full = event("charge.refunded", T0 + 2, amount_refunded=1000, **ids)

    state = run([event("charge.succeeded", T0, **ids), partial])
    assert (state.payments["pi_Unit"].status, state.payments["pi_Unit"].amount_refunded) == (
        "partially_refunded",
        400,
    )
    state = run([full], state)
    assert (state.payments["pi_Unit"].status, state.payments["pi_Unit"].amount_refunded) == (
        "refunded",
        1000,
    )


def test_a_refund_that_arrives_before_its_charge_is_kept() -> None:
    ids = {"payment_intent_id": "pi_Unit", "charge_id": "ch_Unit", "amount": 1000}
    state = run([event("charge.refunded", T0 + 1, **ids), event("charge.succeeded", T0, **ids)])

    payment = state.payments["pi_Unit"]
    assert (payment.status, payment.amount_refunded, payment.created_at) == ("refunded", 1000, T0)


def test_payment_created_records_a_pending_payment() -> None:
    created = command(
        "payment.created", T0, payment_intent_id="pi_Unit", amount=500, currency="eur", user_id=USER
    )
    payment = run([created]).payments["pi_Unit"]

    assert (payment.status, payment.amount, payment.currency) == ("pending", 500, "eur")


def test_an_admin_status_update_sets_the_status_and_its_reason() -> None:
    update = command(
        "payment.status_updated",
        T0 + 5,
        payment_intent_id="pi_Unit",
        status="disputed",
        reason="chargeback",
        actor="ops",
    )
    state = run(
        [event("payment_intent.succeeded", T0, payment_intent_id="pi_Unit", amount=700), update]
    )

    payment = state.payments["pi_Unit"]
    assert (payment.status, payment.status_reason, payment.amount) == (
        "disputed",
        "chargeback",
        700,
    )


def test_an_admin_update_of_a_payment_not_seen_yet_keeps_a_placeholder_currency() -> None:
    update = command("payment.status_updated", T0, payment_intent_id="pi_Unit", status="canceled")
    state = run([update])
    assert state.payments["pi_Unit"].currency == "xxx"

    state = run(
        [event("payment_intent.succeeded", T0 - 1, payment_intent_id="pi_Unit", currency="eur")],
        state,
    )
    assert (state.payments["pi_Unit"].currency, state.payments["pi_Unit"].status) == (
        "eur",
        "canceled",
    )


def test_an_older_payment_event_does_not_overwrite_the_status() -> None:
    state = run(
        [
            event("payment_intent.succeeded", T0 + 10, payment_intent_id="pi_Unit"),
            event("payment_intent.payment_failed", T0, payment_intent_id="pi_Unit"),
        ]
    )

    payment = state.payments["pi_Unit"]
    assert (payment.status, payment.failure_code, payment.created_at) == ("succeeded", None, T0)


def test_a_payment_first_known_by_its_charge_is_rekeyed_to_its_payment_intent() -> None:
    charge_only = event("charge.succeeded", T0, charge_id="ch_Unit")
    charge_only.ClearField("payment_intent_id")  # a legacy charge without a payment intent
    state = run([charge_only])
    assert set(state.payments) == {"ch_Unit"}

    state = run(
        [
            event(
                "payment_intent.succeeded", T0 + 1, payment_intent_id="pi_Unit", charge_id="ch_Unit"
            )
        ],
        state,
    )
    assert set(state.payments) == {"pi_Unit"}
    assert state.payments["pi_Unit"].charge_id == "ch_Unit"
    state = run([charge_only], state)
    assert set(state.payments) == {"pi_Unit"}


# ---------------------------------------------------------------- bad data


def _bad_currency() -> events_pb2.PaymentEvent:
    bad = event("payment_intent.succeeded", T0)
    bad.currency = "dollars"
    return bad


def _no_price() -> events_pb2.PaymentEvent:
    bad = sub_event("created", T0)
    bad.ClearField("price_id")
    return bad


@pytest.mark.parametrize(
    "bad",
    [
        lambda: sub_event("updated", T0, status="exploded"),
        _no_price,
        _bad_currency,
        lambda: event(
            "charge.refunded", T0, amount=100, amount_refunded=200, payment_intent_id="pi_Unit"
        ),
        lambda: command("payment.status_updated", T0, payment_intent_id="pi_Unit"),
        lambda: command(
            "payment.status_updated", T0, payment_intent_id="pi_Unit", status="exploded"
        ),
        lambda: command("payment.created", T0),
        lambda: sub_event("created", -5),
        lambda: sub_event("created", T0, period_start=P1, period_end=T0),
    ],
    ids=[
        "sub-status",
        "no-price",
        "currency",
        "over-refund",
        "no-status",
        "bad-status",
        "no-id",
        "created",
        "period",
    ],
)
def test_bad_data_raises_invalid_event(bad: Any) -> None:
    with pytest.raises(InvalidEvent):
        apply(bad(), State(), catalog())


# ---------------------------------------------------------------- order independence


def lifecycle() -> list[events_pb2.PaymentEvent]:
    """Checkout (the only event naming the user), then a subscription's life."""
    second = {"period_start": P1, "period_end": P2}
    return [
        event("checkout.session.completed", T0 - 60, user_id=USER, subscription_id=SUB),
        sub_event("created", T0),
        sub_event("updated", P1 + 60, status="past_due", **second),
        event("invoice.paid", P1 + 3 * DAY, subscription_id=SUB, **second),
        sub_event("updated", P1 + 3 * DAY + 1, **second),
        sub_event("deleted", P1 + 10 * DAY, **second),
    ]


def test_every_order_of_a_lifecycle_with_redeliveries_ends_in_the_same_state() -> None:
    events = lifecycle()
    expected = run(events)
    assert [c.to_level for c in expected.access_changes[SUB]] == [
        "full",
        "grace",
        "full",
        "blocked",
    ]

    for order in itertools.permutations(events):
        assert run([*order, order[0], order[3]]) == expected, [e.event_type for e in order]


def test_every_order_of_a_lifecycle_without_deletion_grants_the_same() -> None:
    events = lifecycle()[:5]
    expected = run(events)
    assert set(statuses(expected).values()) == {"active"}

    for order in itertools.permutations(events):
        assert run(order) == expected


def rich_lifecycle() -> list[events_pb2.PaymentEvent]:
    """Plan changes, a family learned late, payments, refunds and an admin update."""
    pro = {"price_id": "price_pro_monthly"}
    pay = {"payment_intent_id": "pi_Rich", "charge_id": "ch_Rich", "amount": 1900}
    return [
        sub_event("created", T0, status="trialing"),
        sub_event("updated", T0 + DAY, **pro),
        event(
            "invoice.paid",
            T0 + DAY + 5,
            subscription_id=SUB,
            period_start=P1,
            period_end=P2,
            user_id=USER,
        ),
        sub_event("updated", T0 + 2 * DAY, status="past_due", **pro),
        sub_event("updated", T0 + 3 * DAY, cancel_at_period_end=True),
        event(
            "checkout.session.completed",
            T0 + 4 * DAY,
            user_id=USER,
            family_id=FAMILY,
            subscription_id=SUB,
        ),
        event("charge.succeeded", T0 + DAY + 1, **pay),
        event("payment_intent.succeeded", T0 + DAY + 2, **pay),
        event("charge.refunded", T0 + 5 * DAY, amount_refunded=900, **pay),
        command(
            "payment.status_updated",
            T0 + 6 * DAY,
            payment_intent_id="pi_Rich",
            status="disputed",
            reason="r",
        ),
        sub_event("updated", T0 + 7 * DAY, price_id="price_unknown"),
    ]


RICH = rich_lifecycle()  # built once: the sample builder draws random object ids


@settings(max_examples=300, deadline=None)
@given(st.permutations(RICH))
def test_any_order_of_a_rich_lifecycle_ends_in_the_same_state(
    order: list[events_pb2.PaymentEvent],
) -> None:
    assert run(order) == run(RICH)


@pytest.mark.parametrize("name", [f.name for f in fields(Changes)])
def test_changes_are_something_and_concatenate_in_every_field(name: str) -> None:
    one, other = Changes(**{name: ("a",)}), Changes(**{name: ("b",)})  # type: ignore[arg-type]

    assert one and not Changes()
    assert Changes().then(one) == one.then(Changes()) == one
    assert getattr(one.then(other), name) == ("a", "b")
    assert one.then(other) == Changes(**{name: ("a", "b")})  # type: ignore[arg-type]


def run_deferred(
    events: Iterable[events_pb2.PaymentEvent], cuts: Iterable[int] = (), state: State | None = None
) -> State:
    """As the projection folds a batch: each subscription derived once, at the end of its
    batch (batches end before the indexes in `cuts`)."""
    state = state if state is not None else State()
    events = list(events)
    bounds = sorted({0, *(c for c in cuts if 0 < c < len(events)), len(events)})
    for start, end in itertools.pairwise(bounds):
        state.defer_derivations = True
        for e in events[start:end]:
            state.apply(apply(e, state, catalog()))
        state.apply(derive_deferred(state, catalog()))
        state.defer_derivations = False
    return state


@settings(max_examples=300, deadline=None)
@given(st.permutations(RICH), st.lists(st.integers(1, len(RICH) - 1), max_size=3))
def test_deriving_each_subscription_once_per_batch_equals_deriving_after_every_event(
    order: list[events_pb2.PaymentEvent], cuts: list[int]
) -> None:
    assert run_deferred(order, cuts) == run(order)
    assert run_deferred([*order, *order[:3]], cuts) == run([*order, *order[:3]])  # redelivered


def test_a_deferred_derivation_waits_for_the_end_of_the_batch() -> None:
    state = mapped()
    state.defer_derivations = True
    for e in lifecycle()[1:3]:
        state.apply(apply(e, state, catalog()))

    assert set(state.underived) == {SUB}
    assert ("subscription", SUB) not in state.entitlements  # not derived yet
    state.apply(derive_deferred(state, catalog()))
    assert not state.underived
    state.defer_derivations = False
    assert state == mapped(*lifecycle()[1:3])


def test_a_subscription_stored_without_history_derives_the_same_deferred() -> None:
    """A row written before its history was recorded stands for its own entry until its
    first new event: deferring must derive from the same history as each event did."""
    stored = mapped(sub_event("created", T0))
    del stored.history[SUB]
    later = [
        sub_event("updated", P1 + 60, status="past_due", period_start=P1, period_end=P1 + 30 * DAY),
        event("invoice.paid", P1 + 3 * DAY, subscription_id=SUB, period_start=P1, period_end=P2),
        sub_event("updated", P1 + 3 * DAY + 1, period_start=P1, period_end=P2),
    ]
    for order in itertools.permutations(later):
        assert run_deferred(order, state=stored.copy()) == run(order, stored.copy())


def test_the_rich_lifecycle_ends_where_it_should() -> None:
    state = run(rich_lifecycle())

    assert state.subscriptions[SUB].plan_id is None  # now on an unknown price
    assert {r.status for r in state.entitlements[("subscription", SUB)]} == {"revoked"}
    subjects = {r.subject for r in state.entitlements[("subscription", SUB)]}
    assert subjects == {
        ("user", USER),
        ("family", FAMILY),
    }  # basic was the user's, pro the family's
    payment = state.payments["pi_Rich"]
    assert (payment.status, payment.amount_refunded) == ("disputed", 900)
    assert (payment.user_id, payment.family_id) == (USER, FAMILY)  # learned after the payment


# ---------------------------------------------------------------- guest payments


def guest(event_type: str, created: int, **kw: Any) -> events_pb2.PaymentEvent:
    """A payment made without a Stripe Customer (Payment Links, guest checkout)."""
    return guest_event(event_type, created, event_id=kw.pop("event_id", f"evt_guest_{event_type}_{created}"), **kw)


GUEST_IDS = {"payment_intent_id": "pi_Guest", "charge_id": "ch_Guest", "amount": 1000}


def guest_refund_flow() -> list[events_pb2.PaymentEvent]:
    return [
        guest("charge.succeeded", T0, **GUEST_IDS),
        guest("payment_intent.succeeded", T0 + 1, **GUEST_IDS),
        guest("charge.refunded", T0 + 2, amount_refunded=1000, **GUEST_IDS),
    ]


def test_a_guest_payment_is_recorded_without_a_customer_and_grants_nothing() -> None:
    state = run([guest("charge.succeeded", T0, plan_id="basic", **GUEST_IDS)])

    payment = state.payments["pi_Guest"]
    assert (payment.customer_id, payment.user_id, payment.status) == (None, None, "succeeded")
    assert not state.customers
    assert not grants(state, ("charge", "ch_Guest"))


@pytest.mark.parametrize(
    ("event_type", "extra", "status"),
    [
        ("charge.failed", {}, "failed"),
        ("payment_intent.payment_failed", {}, "failed"),
        ("charge.refunded", {"amount_refunded": 400}, "partially_refunded"),
        ("charge.refunded", {"amount_refunded": 1000}, "refunded"),
    ],
)
def test_a_guest_payment_follows_its_status(
    event_type: str, extra: dict[str, Any], status: str
) -> None:
    state = run([guest("charge.succeeded", T0, **GUEST_IDS), guest(event_type, T0 + 1, **GUEST_IDS, **extra)])
    assert state.payments["pi_Guest"].status == status


def test_a_guest_charge_naming_a_user_grants_its_plan_once() -> None:
    charge = guest("charge.succeeded", T0, user_id=USER, plan_id="basic", **GUEST_IDS)
    state = run([charge, charge])

    assert set(grants(state, ("charge", "ch_Guest"))) == BASIC_FEATURES
    assert state.grants[("charge", "ch_Guest")].customer_id is None
    assert state.payments["pi_Guest"].user_id == USER


def test_a_guest_checkout_naming_a_user_by_client_reference_id_grants_its_plan() -> None:
    payload = sample_event(
        "checkout.session.completed",
        created=T0,
        mode="payment",
        plan_id="basic",
        checkout_session_id="cs_Guest",
        event_id="evt_guest_checkout",
        user_id=None,
    )
    payload["data"]["object"]["customer"] = None
    payload["data"]["object"]["client_reference_id"] = USER
    normalized = normalize(payload)
    assert normalized is not None
    state = run([normalized])
    assert set(grants(state, ("checkout", "cs_Guest"))) == BASIC_FEATURES


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_the_guest_refund_flow_in_any_order_delivered_twice_ends_refunded(
    order: tuple[int, ...],
) -> None:
    flow = guest_refund_flow()
    events = [flow[i] for i in order for _ in range(2)]
    payment = run(events).payments["pi_Guest"]
    assert (payment.status, payment.amount_refunded, payment.customer_id) == ("refunded", 1000, None)


@pytest.mark.parametrize("customer_first", [True, False])
def test_a_guest_payment_later_attached_to_a_customer_joins_it(customer_first: bool) -> None:
    as_guest = guest("charge.succeeded", T0, **GUEST_IDS)
    with_customer = event("payment_intent.succeeded", T0 + 1, user_id=USER, **GUEST_IDS)
    events = [with_customer, as_guest] if customer_first else [as_guest, with_customer]
    state = run(events)

    payment = state.payments["pi_Guest"]
    assert (payment.customer_id, payment.user_id, payment.status) == (CUSTOMER, USER, "succeeded")
    assert state.customers[CUSTOMER].user_id == USER


@pytest.mark.parametrize(
    "event_type", ["invoice.paid", "customer.subscription.updated", "checkout.session.completed"]
)
def test_a_non_payment_event_without_a_customer_is_invalid(event_type: str) -> None:
    e = event(event_type, T0, user_id=USER, subscription_id=SUB)
    e.customer_id = ""
    with pytest.raises(InvalidEvent, match="without a customer"):
        apply(e, State(), catalog())


# ---------------------------------------------------------------- disputes


def dispute(event_type: str, created: int, **kw: Any) -> events_pb2.PaymentEvent:
    """A charge.dispute.* event as Stripe sends it: no customer, the payment's ids."""
    kw.setdefault("charge_id", "ch_Unit")
    kw.setdefault("payment_intent_id", "pi_Unit")
    normalized = normalize(
        dispute_event(event_type, created=created, event_id=f"evt_{event_type}_{created}", **kw)
    )
    assert normalized is not None
    return normalized


PAID = {"payment_intent_id": "pi_Unit", "charge_id": "ch_Unit", "amount": 1000}


@pytest.mark.parametrize(
    ("closing", "status"),
    [
        ("won", "succeeded"),
        ("warning_closed", "succeeded"),
        ("lost", "disputed"),
        ("charge_refunded", "refunded"),
    ],
)
def test_a_dispute_makes_the_payment_disputed_until_it_is_closed(closing: str, status: str) -> None:
    state = run([event("charge.succeeded", T0, user_id=USER, **PAID), dispute("charge.dispute.created", T0 + 1)])
    payment = state.payments["pi_Unit"]
    assert (payment.status, payment.customer_id, payment.amount) == ("disputed", CUSTOMER, 1000)
    assert payment.status_reason is not None and payment.status_reason.endswith("needs_response: fraudulent")

    state = run([dispute("charge.dispute.closed", T0 + 2, status=closing)], state)
    payment = state.payments["pi_Unit"]
    assert (payment.status, payment.amount, payment.user_id) == (status, 1000, USER)
    assert payment.status_reason is not None and closing in payment.status_reason


def test_a_won_dispute_gives_back_a_partially_refunded_status() -> None:
    partial = event("charge.refunded", T0 + 1, amount_refunded=300, **PAID)
    state = run(
        [event("charge.succeeded", T0, **PAID), partial, dispute("charge.dispute.created", T0 + 2)]
    )
    assert state.payments["pi_Unit"].status == "disputed"
    state = run([dispute("charge.dispute.funds_reinstated", T0 + 3)], state)
    assert (state.payments["pi_Unit"].status, state.payments["pi_Unit"].amount_refunded) == (
        "partially_refunded",
        300,
    )


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_a_dispute_flow_in_any_order_delivered_twice_ends_as_the_newest_event_says(
    order: tuple[int, ...],
) -> None:
    """The dispute arrives on the payment's partition, the charge on the customer's: any
    order is possible. Amount and customer come from the charge whatever the order."""
    flow = [
        event("charge.succeeded", T0, **PAID),
        dispute("charge.dispute.created", T0 + 1),
        dispute("charge.dispute.closed", T0 + 2, status="lost"),
    ]
    payment = run([flow[i] for i in order for _ in range(2)]).payments["pi_Unit"]
    assert (payment.status, payment.amount, payment.customer_id, payment.currency) == (
        "disputed",
        1000,
        CUSTOMER,
        "usd",
    )
    assert payment.status_reason is not None and " lost: " in payment.status_reason


def test_a_dispute_of_a_payment_never_seen_is_recorded_and_grants_nothing() -> None:
    state = run([dispute("charge.dispute.created", T0, charge_id="ch_Alone", payment_intent_id=None)])
    payment = state.payments["ch_Alone"]
    assert (payment.status, payment.amount, payment.customer_id) == ("disputed", 0, None)
    assert not state.entitlements


def test_an_unknown_dispute_status_counts_as_open() -> None:
    state = run([event("charge.succeeded", T0, **PAID), dispute("charge.dispute.updated", T0 + 1, status="brand_new")])
    assert state.payments["pi_Unit"].status == "disputed"
