"""Pure parts of the gRPC API: page tokens, validation and the entitlement decision."""

from __future__ import annotations

import math
import tracemalloc

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from payment.v1 import service_pb2
from services.api_grpc import validation
from services.api_grpc.decisions import Decision, Facts, decide, evaluate, free_plan, require_known
from services.api_grpc.errors import InvalidArgument
from services.api_grpc.page_tokens import PageTokens, derive_key, query_fingerprint
from services.api_grpc.queries import Watermark
from services.api_grpc.servicer import BulkResults, PaymentServicer, check_response
from services.api_grpc.validation import SubjectIds
from shared.catalog import load_catalog
from shared.config import DEFAULT_CATALOG_PATH

FACTS = Facts.of(load_catalog(DEFAULT_CATALOG_PATH))
NOW = 1_800_000_000
TOKENS = PageTokens(derive_key("db-url"))
Q = query_fingerprint("payments", {"status": None})


def answer(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "allowed": True, "status": "active", "access_level": "full", "plan_id": "pro",
        "expires_at": NOW + 100, "usage_limit": None, "limit_period": "none",
        "decided_by_event_id": "evt_1", "grace_until": None, "after_grace": None,
    }
    return {**base, **kw}


def test_a_page_token_round_trips_its_cursor() -> None:
    token = TOKENS.encode(Q, ["2026-01-01T00:00:00+00:00", "pi_1"])
    assert TOKENS.decode(token, Q) == ["2026-01-01T00:00:00+00:00", "pi_1"]
    assert TOKENS.decode("", Q) is None


def test_replicas_with_the_same_configuration_accept_each_others_tokens() -> None:
    token = TOKENS.encode(Q, ["x"])
    assert PageTokens(derive_key("db-url")).decode(token, Q) == ["x"]
    with pytest.raises(InvalidArgument):
        PageTokens(derive_key("other")).decode(token, Q)


@pytest.mark.parametrize("bad", ["garbage", "a.b", "!!!.###", "x" * 3000])
def test_a_malformed_token_is_invalid_argument(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        TOKENS.decode(bad, Q)


def test_a_tampered_token_or_one_for_another_query_is_refused() -> None:
    token = TOKENS.encode(Q, ["x"])
    body, sig = token.split(".")
    forged = TOKENS.encode(Q, ["y"]).split(".")[0] + "." + sig
    with pytest.raises(InvalidArgument, match="altered"):
        TOKENS.decode(forged, Q)
    with pytest.raises(InvalidArgument, match="another query"):
        TOKENS.decode(token, query_fingerprint("payments", {"status": "failed"}))


@pytest.mark.parametrize(("value", "expected"), [(0, 50), (1, 1), (500, 500)])
def test_page_size_defaults_and_bounds(value: int, expected: int) -> None:
    assert validation.page_size(value) == expected


@pytest.mark.parametrize("value", [-1, 501])
def test_page_size_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(InvalidArgument, match="page_size"):
        validation.page_size(value)


@pytest.mark.parametrize("value", ["USD", "us", "usdd", "", "u$d"])
def test_a_bad_currency_is_refused(value: str) -> None:
    with pytest.raises(InvalidArgument, match="currency"):
        validation.currency(value)


@pytest.mark.parametrize("value", [0, -5, 100_000_000])
def test_a_bad_amount_is_refused(value: int) -> None:
    with pytest.raises(InvalidArgument, match="amount"):
        validation.amount(value)


def test_subject_needs_an_id_and_bulk_is_capped() -> None:
    with pytest.raises(InvalidArgument):
        validation.subject("", "")
    with pytest.raises(InvalidArgument, match="spaces"):
        validation.subject(" u", "")
    assert validation.subject("u", "f").keys() == [("user", "u"), ("family", "f")]
    validation.bulk_shape(100, 100)
    with pytest.raises(InvalidArgument):
        validation.bulk_shape(101, 1)
    with pytest.raises(InvalidArgument):
        validation.bulk_shape(1, 0)


def _decide_as_before(answers: list[dict[str, object] | None], code: str, now: float) -> Decision:
    """decide() as it was written before its single pass and the catalog's free answers
    built once (db6dce3): the oracle of the property below."""
    evaluated = [evaluate(a, code, FACTS.catalog, now, FACTS.metered) for a in answers if a is not None]
    allowed = [d for d in evaluated if d.allowed]
    if allowed:
        return max(allowed, key=lambda d: (math.inf if d.usage_limit == -1 else d.usage_limit,
                                           math.inf if d.expires_at == 0 else d.expires_at))
    fallback = free_plan(FACTS.catalog, code, FACTS.metered)
    if fallback is not None:
        if not evaluated:
            return fallback
        denied = evaluated[0]
        rule = f"{fallback.rule} (after {denied.rule})" if denied.rule else fallback.rule
        return fallback._replace(decided_by_event_id=denied.decided_by_event_id, rule=rule,
                                 clock=denied.clock, grace_until=denied.grace_until)
    if evaluated:
        return evaluated[0]
    return Decision(False, "no_entitlement", "", "", 0, "blocked", "", 0, "")


_ANSWERS = st.none() | st.builds(
    answer,
    allowed=st.booleans(),
    status=st.sampled_from(["active", "past_due", "canceled", ""]),
    access_level=st.sampled_from(["full", "grace", "reduced", "blocked"]),
    plan_id=st.sampled_from(["pro", "basic", ""]),
    expires_at=st.sampled_from([None, 0, NOW - 1, NOW + 100, NOW + 200]),
    usage_limit=st.sampled_from([None, -1, 0, 10, 100]),
    decided_by_event_id=st.sampled_from(["evt_1", "evt_2", ""]),
    grace_until=st.sampled_from([None, NOW - 5, NOW + 5]),
    after_grace=st.sampled_from([None, "active", "suspended"]),
    rule=st.sampled_from(["", "paid", "past_due: grace 7 days"]),
)


@given(st.lists(_ANSWERS, max_size=3), st.sampled_from(sorted(FACTS.known) + ["not_in_any_plan"]))
@example([None], "projects")  # the default plan alone
@example([answer(allowed=False, rule="paid"), None], "projects")  # the default plan explained by a refusal
@example([answer(usage_limit=10), answer(usage_limit=10, decided_by_event_id="evt_2")], "projects")  # a tie: the first
@example([answer(usage_limit=10), answer(usage_limit=100)], "projects")  # the best, not the first
def test_decide_is_what_it_was_before_its_single_pass(answers: list[dict[str, object] | None], code: str) -> None:
    assert decide(answers, code, FACTS, NOW) == _decide_as_before(answers, code, NOW)


def test_no_entitlement_falls_back_to_the_free_plan_when_it_has_the_feature() -> None:
    free = decide([None], "projects", FACTS, NOW)
    assert (free.allowed, free.reason, free.plan_id, free.usage_limit) == (True, "free_plan", "free", 3)
    none = decide([None], "priority_support", FACTS, NOW)
    assert (none.allowed, none.reason) == (False, "no_entitlement")


def test_an_unknown_feature_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="unknown feature_code"):
        require_known("teleport", FACTS.known)


def test_a_granted_answer_is_allowed_until_it_expires() -> None:
    granted = decide([answer()], "priority_support", FACTS, NOW)
    assert (granted.allowed, granted.reason, granted.decided_by_event_id) == (True, "granted", "evt_1")
    expired = decide([answer(expires_at=NOW - 1)], "priority_support", FACTS, NOW)
    assert (expired.allowed, expired.reason, expired.status) == (False, "expired", "expired")


def test_an_expired_paid_feature_the_free_plan_has_falls_back_and_names_the_event() -> None:
    decision = decide([answer(expires_at=NOW - 1, decided_by_event_id="evt_9")], "projects", FACTS, NOW)
    assert (decision.allowed, decision.reason, decision.decided_by_event_id) == (True, "free_plan", "evt_9")


def test_grace_is_allowed_until_grace_until_then_after_grace_applies() -> None:
    grace = answer(access_level="grace", grace_until=NOW + 10, after_grace="suspended", level_after_grace="reduced")
    assert decide([grace], "priority_support", FACTS, NOW).reason == "grace"
    after = decide([grace], "priority_support", FACTS, NOW + 10)
    assert (after.allowed, after.status, after.access_level) == (False, "suspended", "reduced")
    kept = answer(access_level="grace", grace_until=NOW, after_grace="active", level_after_grace="reduced")
    assert (decide([kept], "export_pdf", FACTS, NOW).allowed, decide([kept], "export_pdf", FACTS, NOW).access_level) == (
        True, "reduced")


def test_the_level_after_grace_is_the_writers_not_guessed_from_the_plan() -> None:
    """The writer stores the level of the subscription's own rule; the reader takes it."""
    grace = answer(access_level="grace", grace_until=NOW, after_grace="active", level_after_grace="full")
    assert decide([grace], "export_pdf", FACTS, NOW).access_level == "full"
    cached_before_upgrade = answer(access_level="grace", grace_until=NOW, after_grace="suspended")
    assert decide([cached_before_upgrade], "priority_support", FACTS, NOW).access_level == "blocked"


def test_unlimited_and_unmetered_limits_follow_the_proto_convention() -> None:
    assert decide([answer(usage_limit=None)], "projects", FACTS, NOW).usage_limit == -1
    assert decide([answer(usage_limit=None)], "export_pdf", FACTS, NOW).usage_limit == 0


def test_the_best_allowed_answer_of_user_and_family_wins() -> None:
    denied = answer(allowed=False, status="revoked", plan_id="basic")
    allowed = answer(plan_id="pro", usage_limit=6)
    assert decide([denied, allowed], "seats", FACTS, NOW).plan_id == "pro"


@pytest.mark.parametrize(
    ("amount", "currency", "dollars"), [(1999, "usd", 19.99), (500, "jpy", 500.0), (500, "JPY", 500.0), (1, "eur", 0.01)]
)
def test_payment_amount_dollars_is_in_the_major_unit_as_the_go_service_reported_it(
    amount: int, currency: str, dollars: float
) -> None:
    from services.api_grpc.service import major_units

    assert major_units(amount, currency) == dollars


def test_a_decision_carries_the_writers_rule_and_says_how_the_clock_changed_it() -> None:
    rule = "past_due: grace 7 days, then reduced"
    grace = answer(access_level="grace", grace_until=NOW + 10, after_grace="suspended", level_after_grace="reduced",
                   rule=rule, plan_version="sha256:x", source="subscription:sub_1")
    during = decide([grace], "priority_support", FACTS, NOW)
    assert (during.rule, during.plan_version, during.source, during.clock) == (rule, "sha256:x", "subscription:sub_1", "")
    assert decide([grace], "priority_support", FACTS, NOW + 10).clock == "grace_ended"
    assert during.grace_until == decide([grace], "priority_support", FACTS, NOW + 10).grace_until == NOW + 10
    assert decide([answer(expires_at=NOW - 1, rule="active: full")], "priority_support", FACTS, NOW).clock == "expired"
    free = decide([], "projects", FACTS, NOW)
    assert (free.rule, free.source) == ("default_plan: free", "")
    assert free.plan_version == decide([], "api_calls", FACTS, NOW).plan_version != ""


def test_the_free_plan_after_refused_paid_access_keeps_the_refused_rule_and_clock() -> None:
    """The downgrade is explained: the refused answer's rule, clock and grace_until stay."""
    rule = "past_due: grace 7 days, then reduced"
    ended = answer(plan_id="basic", access_level="grace", grace_until=NOW - 10, after_grace="suspended",
                   level_after_grace="blocked", rule=rule, source="subscription:sub_1", decided_by_event_id="evt_9")
    free = decide([ended], "projects", FACTS, NOW)
    assert (free.allowed, free.reason, free.plan_id) == (True, "free_plan", "free")
    assert (free.rule, free.clock, free.grace_until) == (f"default_plan: free (after {rule})", "grace_ended", NOW - 10)
    assert (free.decided_by_event_id, free.source) == ("evt_9", "")
    expired = decide([answer(plan_id="basic", expires_at=NOW - 1, rule="active: full")], "projects", FACTS, NOW)
    assert (expired.rule, expired.clock) == ("default_plan: free (after active: full)", "expired")
    assert decide([], "projects", FACTS, NOW).rule == "default_plan: free"


def _reference_check(decision: Decision, code: str, subject: SubjectIds, mark: Watermark | None) -> bytes:
    """The answer built the plain way, message objects copied in: what the wire carried before."""
    fresh = service_pb2.Freshness() if mark is None else service_pb2.Freshness(
        watermark=mark.created, watermark_event_id=mark.event_id, lag_ms=mark.lag_ms)
    return service_pb2.CheckEntitlementResponse(
        allowed=decision.allowed, reason=decision.reason, plan_id=decision.plan_id, status=decision.status,
        expires_at=decision.expires_at, access_level=decision.access_level,
        decided_by_event_id=decision.decided_by_event_id, usage_limit=decision.usage_limit,
        limit_period=decision.limit_period, freshness=fresh, feature_code=code,
        subject=service_pb2.Subject(user_id=subject.user_id, family_id=subject.family_id),
        explanation=service_pb2.Explanation(
            rule=decision.rule, plan_id=decision.plan_id, plan_version=decision.plan_version, source=decision.source,
            deciding_event_id=decision.decided_by_event_id, clock=decision.clock),
        grace_until=decision.grace_until,
    ).SerializeToString()


DECISIONS = [
    Decision(True, "granted", "pro", "active", 1_900_000_000, "full", "evt_1", -1, "none", "paid", "h1", "subscription", ""),
    Decision(False, "expired", "basic", "canceled", 0, "none", "evt_2", 10, "month", "", "", "", "expired", 5),
]


@pytest.mark.parametrize("mark", [None, Watermark(1_800_000_000, "evt_9", 42)])
def test_a_check_answer_built_in_place_has_the_bytes_of_one_built_from_messages(mark: Watermark | None) -> None:
    subject = SubjectIds("u_1", "fam_1")
    for decision in DECISIONS:
        assert check_response(decision, "projects", subject, mark).SerializeToString() == _reference_check(
            decision, "projects", subject, mark)


async def test_a_bulk_answer_built_in_place_has_the_bytes_of_one_built_from_messages() -> None:
    subjects = [SubjectIds("u_1", ""), SubjectIds("", "fam_2")]
    codes = ["projects", "seats", "api_calls"]
    decisions = [DECISIONS[i % 2] for i in range(len(subjects) * len(codes))]
    mark = Watermark(1_800_000_000, "evt_9", 42)

    class Api:
        async def bulk_check(self, subjects: object, codes: object, timeout: float) -> tuple[list[Decision], Watermark]:
            return decisions, mark

    class Context:
        def time_remaining(self) -> None:
            return None

    request = service_pb2.BulkCheckEntitlementsRequest(
        subjects=[service_pb2.Subject(user_id=s.user_id, family_id=s.family_id) for s in subjects], feature_codes=codes)
    answer = await PaymentServicer(Api()).BulkCheckEntitlements(request, Context())  # type: ignore[arg-type]
    expected = service_pb2.BulkCheckEntitlementsResponse(
        results=[service_pb2.CheckEntitlementResponse.FromString(_reference_check(d, c, s, None))
                 for d, (s, c) in zip(decisions, [(s, c) for s in subjects for c in codes], strict=True)],
        freshness=service_pb2.Freshness(watermark=mark.created, watermark_event_id=mark.event_id, lag_ms=mark.lag_ms),
    )
    assert answer.SerializeToString() == expected.SerializeToString()


def _reference_results(decisions: list[Decision], subjects: list[SubjectIds], codes: list[str]) -> bytes:
    pairs = [(s, c) for s in subjects for c in codes]
    return service_pb2.BulkCheckEntitlementsResponse(results=[
        service_pb2.CheckEntitlementResponse.FromString(_reference_check(d, c, s, None))
        for d, (s, c) in zip(decisions, pairs, strict=True)]).SerializeToString()


def test_kept_bulk_results_are_the_bytes_built_fresh_and_follow_a_changed_decision() -> None:
    results = BulkResults()
    subjects, codes = [SubjectIds("u_1", "fam_1")], ["projects", "seats"]
    first = results.encode([DECISIONS[0], DECISIONS[1]], subjects, codes)
    assert results.encode([DECISIONS[0], DECISIONS[1]], subjects, codes) == first == _reference_results(
        [DECISIONS[0], DECISIONS[1]], subjects, codes)
    # The same subject and feature with another decision (say, the subscription lapsed):
    # the kept bytes of the old decision are not served.
    swapped = results.encode([DECISIONS[1], DECISIONS[0]], subjects, codes)
    assert swapped == _reference_results([DECISIONS[1], DECISIONS[0]], subjects, codes) != first
    # Another subject with the same decision and feature gets its own subject, and a
    # user within a family is not the family alone.
    for other in ([SubjectIds("", "fam_2")], [SubjectIds("", "fam_1")], [SubjectIds("u_1", "")]):
        assert results.encode([DECISIONS[0]], other, ["projects"]) == _reference_results(
            [DECISIONS[0]], other, ["projects"])
    # Two subjects: each subject's codes together, in request order.
    two = [SubjectIds("u_1", ""), SubjectIds("", "fam_2")]
    decisions = [DECISIONS[0], DECISIONS[1], DECISIONS[1], DECISIONS[0]]
    assert results.encode(decisions, two, codes) == _reference_results(decisions, two, codes)
    with pytest.raises(ValueError, match="3 decisions for 2 subjects x 2 codes"):
        results.encode(decisions[:3], two, codes)


def test_kept_bulk_results_stay_within_their_byte_budget() -> None:
    results = BulkResults(max_bytes=3_000)
    subjects = [SubjectIds(f"u_{n}", "") for n in range(10)]
    decisions = [DECISIONS[n % 2] for n in range(10)]
    assert results.encode(decisions, subjects, ["projects"]) == _reference_results(decisions, subjects, ["projects"])
    assert 0 < results.counted_bytes <= 3_000
    assert len(results) < 10  # emptied on the way
    assert results.encode(decisions[:2], subjects[:2], ["projects"]) == _reference_results(
        decisions[:2], subjects[:2], ["projects"])
    assert results.counted_bytes <= 3_000


@pytest.mark.parametrize("rule_length", [100, 200, 20_000])  # bodies under 128 bytes, over, and over 16 KB
def test_kept_bulk_results_frame_long_bodies(rule_length: int) -> None:
    """The length prefix takes one, two and three bytes."""
    decisions = [DECISIONS[0]._replace(rule="r" * rule_length), DECISIONS[1]]
    subjects, codes = [SubjectIds("u_1", "fam_1")], ["projects", "seats"]
    results = BulkResults()
    for _ in range(2):  # built, then kept
        assert results.encode(decisions, subjects, codes) == _reference_results(decisions, subjects, codes)


def test_kept_bulk_results_count_at_least_what_they_hold() -> None:
    """The byte budget is an upper bound of the memory held, for the heaviest ids the API
    accepts (255 characters beyond ASCII), a subject and a Decision of their own per entry,
    and for the shortest."""
    results = BulkResults(max_bytes=10**12)
    codes = ["projects"]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(500):
            subject = SubjectIds("\U0001F600" * 250 + f"{n:05d}", "\u4e2d" * 250 + f"{n:05d}")
            if n % 2:
                subject = SubjectIds(f"u_{n}", "")
            decisions = [DECISIONS[0]._replace(decided_by_event_id=f"evt_{n}_{c}") for c in codes]
            results.encode(decisions, [subject], codes)
            del subject, decisions
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(results) == 500
    assert held <= results.counted_bytes, (held, results.counted_bytes)
