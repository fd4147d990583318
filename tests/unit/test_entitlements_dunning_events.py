"""The entitlements handlers applying the dunning scheduler's decisions (dunning.escalated,
dunning.restored): the subscription is suspended, its entitlements drop to the policy's
level, and access comes back once the escalated invoice was paid."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any

from payment.v1 import events_pb2
from paymentsvc.dev.samples import sample_event
from services.entitlements.handlers import apply
from services.entitlements.model import State
from services.ingest_webhooks.normalize import normalize
from shared.catalog import Catalog, load_catalog
from shared.config import DEFAULT_CATALOG_PATH

DAY = 86_400
T0 = 1_767_225_600
P1 = T0 + 30 * DAY
CUSTOMER, USER, SUB = "cus_Dun", "user_Dun", "sub_Dun"


@cache
def catalog() -> Catalog:
    return load_catalog(DEFAULT_CATALOG_PATH)


def sub_event(kind: str, created: int, **kw: Any) -> events_pb2.PaymentEvent:
    normalized = normalize(
        sample_event(
            f"customer.subscription.{kind}", created=created, customer_id=CUSTOMER, user_id=USER,
            event_id=f"evt_{kind}_{created}", subscription_id=SUB, period_start=T0, period_end=P1,
            price_id="price_basic_monthly", **kw,
        )
    )
    assert normalized is not None
    return normalized


def dunning(event_type: str, created: int, status: str, **kw: Any) -> events_pb2.PaymentEvent:
    return events_pb2.PaymentEvent(
        event_type=event_type, event_id=f"dunning-{event_type}-{created}", created=created,
        customer_id=CUSTOMER, subscription_id=SUB, invoice_id="in_Dun", status=status,
        source=events_pb2.EVENT_SOURCE_DUNNING, **kw,
    )


def run(events: Iterable[events_pb2.PaymentEvent], state: State | None = None) -> State:
    state = state if state is not None else State()
    for e in events:
        state.apply(apply(e, state, catalog()))
    return state


def statuses(state: State) -> dict[str, str]:
    return {row.feature_code: row.status for row in state.entitlements[("subscription", SUB)]}


def test_an_escalation_suspends_the_subscription_and_its_entitlements() -> None:
    state = run([sub_event("created", T0, status="active"), sub_event("updated", T0 + DAY, status="past_due")])
    state = run([dunning("dunning.escalated", T0 + 20 * DAY, "suspended")], state)
    sub = state.subscriptions[SUB]
    assert (sub.status, sub.access_level, sub.price_id, sub.current_period_end) == (
        "suspended", "blocked", "price_basic_monthly", P1
    )
    assert set(statuses(state).values()) == {"suspended"}
    assert [h.status for h in state.history[SUB]] == ["active", "past_due", "suspended"]


def test_a_restore_makes_the_subscription_active_with_full_access_again() -> None:
    state = run([
        sub_event("created", T0, status="active"),
        dunning("dunning.escalated", T0 + 20 * DAY, "suspended"),
        dunning("dunning.restored", T0 + 21 * DAY, "active"),
    ])
    assert (state.subscriptions[SUB].status, state.subscriptions[SUB].access_level) == ("active", "full")
    assert set(statuses(state).values()) == {"active"}


def test_a_later_stripe_event_overrides_the_escalation_and_an_older_one_does_not() -> None:
    state = run([sub_event("created", T0, status="active"), dunning("dunning.escalated", T0 + 20 * DAY, "suspended")])
    older = run([sub_event("updated", T0 + 10 * DAY, status="past_due")], state)
    assert older.subscriptions[SUB].status == "suspended"
    newer = run([sub_event("updated", T0 + 21 * DAY, status="active")], state)
    assert newer.subscriptions[SUB].status == "active"


def test_a_decision_about_an_unknown_subscription_or_without_status_changes_nothing() -> None:
    assert not apply(dunning("dunning.escalated", T0, "suspended"), State(), catalog())
    state = run([sub_event("created", T0, status="active")])
    assert not apply(dunning("dunning.escalated", T0 + DAY, ""), state, catalog())
