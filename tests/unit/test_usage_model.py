"""The usage domain without I/O: periods, answers, records and events."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from domain.usage import model, repository
from domain.usage.model import Outcome, Period, Policy, Request
from payment.v1 import events_pb2
from services.api_grpc.errors import InvalidArgument
from services.api_grpc.usage import check_amount
from services.usage.projection import UsageProjection


def ts(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


def policy(**kw: object) -> Policy:
    base: dict[str, object] = dict(
        feature_code="api_calls", plan_id="free", pool_type="user", pool_id="u1", member=None, limit=10,
        hard=True, allow_release=False, member_cap=-1, period=Period(ts(2031, 1, 1), ts(2031, 2, 1)), user_id="u1",
    )
    base.update(kw)
    return Policy(**base)  # type: ignore[arg-type]


def test_a_calendar_month_runs_from_the_first_to_the_first_of_the_next_month() -> None:
    assert model.period_for("month", ts(2031, 2, 14, 12)) == Period(ts(2031, 2, 1), ts(2031, 3, 1))
    assert model.period_for("day", ts(2031, 2, 14, 12)) == Period(ts(2031, 2, 14), ts(2031, 2, 15))
    assert model.period_for("none", 0) == Period(model.NONE_START, model.NONE_END)


def test_a_billing_period_rolls_forward_while_the_renewal_is_not_projected_and_falls_back_to_the_month() -> None:
    start, end = ts(2031, 1, 10), ts(2031, 2, 10)
    assert model.billing_period(ts(2031, 1, 20), start, end) == Period(start, end)
    rolled = model.billing_period(ts(2031, 2, 11), start, end)
    assert rolled.start == end and rolled.end == end + (end - start)
    assert model.billing_period(ts(2031, 1, 20), None, None) == Period(ts(2031, 1, 1), ts(2031, 2, 1))


def test_remaining_is_the_tighter_of_the_pool_and_the_member_cap_and_never_negative() -> None:
    assert model.remaining(10, 4) == 6
    assert model.remaining(10, 4, member_cap=1, member_used=1) == 0
    assert model.remaining(-1, 99) == -1
    assert model.remaining(10, 12) == 0


def test_a_soft_limit_answer_reports_the_overage() -> None:
    request = Request("k", policy(hard=False), 5, 1)
    a = model.answer(Outcome(True, 13, 5, 0, False, request))
    assert (a.over_soft_limit, a.overage, a.remaining, a.hard) == (True, 3, 0, False)
    assert model.outcome_label(Outcome(True, 13, 5, 0, False, request)) == "over_soft_limit"


def test_a_record_round_trips_and_rebuilds_the_same_event() -> None:
    request = Request("key-1", policy(), 3, 1234, {"file": "a"})
    outcome = Outcome(True, 7, 3, 0, True, request)
    again = model.parse_record(model.done_record(outcome))
    assert again == outcome
    event = model.usage_event(again)
    assert event == model.usage_event(outcome)
    assert event.event_id == model.event_id_for("key-1") != model.event_id_for("key-2")
    assert (event.amount, event.used_after, event.limit, event.period_start) == (3, 7, 10, request.policy.period.start)
    assert not model.needs_publish(outcome)


@pytest.mark.parametrize("amount", [0, 2**53 + 1, -(2**53) - 1])
def test_amounts_that_are_zero_or_beyond_two_to_the_53_are_invalid(amount: int) -> None:
    with pytest.raises(InvalidArgument):
        check_amount(amount)


def test_batch_totals_sum_pools_and_members_in_order() -> None:
    events = [
        events_pb2.UsageEvent(subject_type="family", subject_id="f", user_id="a", feature_code="seats",
                              amount=1, period_start=0, period_end=9, limit=6),
        events_pb2.UsageEvent(subject_type="family", subject_id="f", user_id="b", feature_code="seats",
                              amount=1, period_start=0, period_end=9, limit=6),
        events_pb2.UsageEvent(subject_type="family", subject_id="f", user_id="a", feature_code="seats",
                              amount=-1, period_start=0, period_end=9, limit=6),
    ]
    t = repository.totals(events)
    assert t.pools == {("family", "f", "seats", 0): (9, 1, 6)}
    assert t.members == {("f", "a", "seats", 0): 0, ("f", "b", "seats", 0): 1}


def test_the_projection_rejects_an_event_it_can_never_apply() -> None:
    bad = events_pb2.UsageEvent(event_id="e", idempotency_key="k", subject_type="team", subject_id="x",
                                feature_code="f", period_start=0, period_end=1)
    with pytest.raises(ValueError, match="bad subject"):
        UsageProjection().decode(bad.SerializeToString(), {})
    with pytest.raises(ValueError, match="not a payment.v1.UsageEvent"):
        UsageProjection().decode(b"\xff\xff", {})
