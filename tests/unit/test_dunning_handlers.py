"""The dunning handlers without a database: every transition, out of order, duplicates."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from payment.v1 import events_pb2
from services.dunning import handlers
from services.dunning.model import Case, State
from services.dunning.repository import DueCase
from services.dunning.scheduler import next_step
from shared.catalog import Catalog, load_catalog
from shared.config import DEFAULT_CATALOG_PATH

DAY = 86_400
T0 = 1_767_225_600
CATALOG: Catalog = load_catalog(DEFAULT_CATALOG_PATH)
_ids = itertools.count()


def ev(event_type: str, created: int, **kw: Any) -> events_pb2.PaymentEvent:
    kw.setdefault("invoice_id", "in_1")
    kw.setdefault("subscription_id", "sub_1")
    kw.setdefault("customer_id", "cus_1")
    kw.setdefault("event_id", f"evt_{next(_ids):05d}")
    if event_type.startswith("invoice."):
        kw.setdefault("price_id", "price_pro_monthly")
        kw.setdefault("amount", 1900)
        kw.setdefault("currency", "usd")
    return events_pb2.PaymentEvent(event_type=event_type, created=created, **kw)


def failed(created: int = T0, **kw: Any) -> events_pb2.PaymentEvent:
    kw.setdefault("failure_message", "Your card was declined.")
    return ev("invoice.payment_failed", created, **kw)


def attempt(n: int, created: int) -> events_pb2.PaymentEvent:
    return ev("dunning.attempt_made", created, attempt_count=n, event_id=f"dunning-dc_in_1-attempt-{n}")


def fold(events: list[events_pb2.PaymentEvent], state: State | None = None) -> tuple[State, list[str]]:
    state = state or State()
    kinds: list[str] = []
    for e in events:
        outcome = handlers.apply(e, state, CATALOG)
        state.apply(outcome.cases)
        kinds += [n.kind for n in outcome.notices]
    return state, kinds


def case(state: State) -> Case:
    return state.cases["in_1"]


def test_a_failed_payment_opens_a_case_with_the_plans_first_retry_scheduled() -> None:
    state, kinds = fold([failed()])
    c = case(state)
    assert (c.case_id, c.state, c.attempt_count, c.plan_id, c.price_id) == ("dc_in_1", "open", 0, "pro", "price_pro_monthly")
    assert c.next_attempt_at == T0 + 1 * DAY
    assert c.last_error == "Your card was declined."
    assert (c.amount_due, c.currency, c.opened_at) == (1900, "usd", T0)
    assert kinds == ["CASE_OPENED", "RETRY_SCHEDULED"]


def test_an_unknown_price_falls_back_to_the_default_policy() -> None:
    state, _ = fold([failed(price_id="price_unknown")])
    assert case(state).plan_id is None
    assert case(state).next_attempt_at == T0 + CATALOG.default_plan.dunning.retry_after_days[0] * DAY


def test_action_required_needs_the_customer_and_is_not_retried_automatically() -> None:
    state, kinds = fold([ev("invoice.payment_action_required", T0)])
    assert case(state).state == "action_required"
    assert case(state).next_attempt_at is None
    assert kinds == ["CASE_OPENED"]
    # A later failure puts it back on the automatic schedule.
    state, kinds = fold([failed(T0 + 60)], state)
    assert (case(state).state, case(state).next_attempt_at) == ("open", T0 + DAY)
    assert kinds == ["ATTEMPT_FAILED", "RETRY_SCHEDULED"]


def test_each_attempt_moves_the_schedule_and_the_last_one_schedules_the_escalation() -> None:
    state, _ = fold([failed()])
    for n, days in enumerate((1, 3, 5, 7), start=1):
        state, kinds = fold([attempt(n, T0 + days * DAY)], state)
        assert kinds == []  # the scheduler announces its own attempts
        assert (case(state).state, case(state).attempt_count) == ("retrying", n)
    c = case(state)
    assert c.last_attempt_at == T0 + 7 * DAY
    assert c.next_attempt_at == T0 + 7 * DAY + 7 * DAY  # grace_days after the last retry


def test_a_failure_after_a_retry_is_an_attempt_failed_with_the_next_retry_scheduled() -> None:
    state, _ = fold([failed(), attempt(1, T0 + DAY)])
    state, kinds = fold([failed(T0 + DAY + 5, failure_message="Insufficient funds")], state)
    assert kinds == ["ATTEMPT_FAILED", "RETRY_SCHEDULED"]
    assert (case(state).state, case(state).last_error, case(state).next_attempt_at) == (
        "retrying", "Insufficient funds", T0 + 3 * DAY
    )


def test_escalation_and_a_later_payment_recover_the_case_and_ask_for_access_back() -> None:
    state, _ = fold([failed(), *[attempt(n, T0 + d * DAY) for n, d in enumerate((1, 3, 5, 7), 1)]])
    state, kinds = fold([ev("dunning.escalated", T0 + 14 * DAY, status="suspended")], state)
    assert (case(state).state, case(state).escalated_at, case(state).next_attempt_at) == (
        "escalated", T0 + 14 * DAY, T0 + 21 * DAY  # still retried, every grace_days
    )
    state, _ = fold([attempt(5, T0 + 21 * DAY)], state)
    assert (case(state).state, case(state).attempt_count, case(state).next_attempt_at) == ("escalated", 5, T0 + 28 * DAY)
    state, kinds = fold([ev("invoice.paid", T0 + 15 * DAY)], state)
    assert kinds == ["RECOVERED"]
    assert (case(state).state, case(state).closed_at, case(state).restored_at) == ("recovered", T0 + 15 * DAY, None)
    state, _ = fold([ev("dunning.restored", T0 + 15 * DAY + 30, status="active")], state)
    assert case(state).restored_at == T0 + 15 * DAY + 30


def test_a_payment_recovers_an_open_case_and_nothing_reopens_it() -> None:
    state, kinds = fold([failed(), ev("invoice.payment_succeeded", T0 + 100)])
    assert kinds == ["CASE_OPENED", "RETRY_SCHEDULED", "RECOVERED"]
    assert (case(state).state, case(state).next_attempt_at) == ("recovered", None)
    # A failure delivered late, even one stamped later, and a stale attempt change nothing.
    state, kinds = fold([failed(T0 + 50), failed(T0 + 200), attempt(1, T0 + DAY)], state)
    assert case(state).state == "recovered" and kinds == []


def test_a_paid_invoice_without_a_case_opens_nothing() -> None:
    state, kinds = fold([ev("invoice.paid", T0)])
    assert state.cases == {} and kinds == []


def test_a_deleted_subscription_closes_its_unfinished_cases_only() -> None:
    state, _ = fold([failed(), failed(T0, invoice_id="in_2"), ev("invoice.paid", T0 + 5, invoice_id="in_2")])
    state, kinds = fold([ev("customer.subscription.deleted", T0 + 10, invoice_id="", status="canceled")], state)
    assert kinds == ["CLOSED"]
    assert (state.cases["in_1"].state, state.cases["in_1"].closed_at) == ("closed", T0 + 10)
    assert state.cases["in_2"].state == "recovered"


def test_duplicates_change_nothing_and_announce_nothing() -> None:
    first = failed()
    state, _ = fold([first, attempt(1, T0 + DAY)])
    before = dict(state.cases)
    state, kinds = fold([first, attempt(1, T0 + DAY), ev("dunning.escalated", T0 + 20 * DAY)], state)
    state2, kinds2 = fold([ev("dunning.escalated", T0 + 20 * DAY, event_id="again")], state)
    assert kinds == [] and kinds2 == []
    assert case(state2).escalated_at == T0 + 20 * DAY
    assert before["in_1"].attempt_count == 1


def test_an_older_failure_around_a_retry_fills_facts_but_moves_nothing() -> None:
    state, _ = fold([failed(T0 + 10, price_id=""), attempt(1, T0 + DAY + 10)])
    # The original failure, earlier and with the price, arrives after the retry.
    state, kinds = fold([failed(T0, failure_message="old")], state)
    c = case(state)
    assert kinds == []
    assert (c.state, c.attempt_count, c.last_error, c.plan_id) == ("retrying", 1, "Your card was declined.", "pro")
    assert c.opened_at == T0 and c.next_attempt_at == T0 + 3 * DAY  # the schedule counts from the first failure


def test_the_cases_do_not_depend_on_the_order_of_webhooks_before_a_retry() -> None:
    events = [failed(T0), failed(T0 + 3600, failure_message="second"), ev("invoice.payment_action_required", T0 + 7200)]
    expected, _ = fold(events)
    for _ in range(10):
        shuffled = random.sample(events, len(events))
        got, _ = fold(shuffled)
        assert got.cases == expected.cases


def test_bad_events_are_invalid() -> None:
    with pytest.raises(handlers.InvalidEvent):
        fold([failed(invoice_id="")])
    with pytest.raises(handlers.InvalidEvent):
        fold([failed(created=-1)])


def due(state: str, attempts: int) -> DueCase:
    return DueCase("dc_in_1", "in_1", "cus_1", "sub_1", None, None, "pro", None, state, attempts, 1900, "usd")


def test_the_next_step_is_a_retry_then_the_escalation_or_a_restore() -> None:
    policy = CATALOG.plan("pro").dunning
    assert next_step(due("open", 0), policy).name == "attempt-1"  # type: ignore[union-attr]
    assert next_step(due("retrying", 3), policy).name == "attempt-4"  # type: ignore[union-attr]
    assert next_step(due("retrying", 4), policy).name == "escalate"  # type: ignore[union-attr]
    assert next_step(due("recovered", 4), policy).name == "restore"  # type: ignore[union-attr]
    assert next_step(due("escalated", 4), policy).name == "attempt-5"  # type: ignore[union-attr]
    assert next_step(due("retrying", 4), policy.model_copy(update={"escalate_after_last": False})) is None
