"""Usage thresholds without I/O: which increments cross which catalog alert, once per
period, for pools and members, and the same whichever way the log is cut into batches."""

from __future__ import annotations

import itertools

from hypothesis import example, given
from hypothesis import strategies as st

from payment.v1 import events_pb2
from services.usage import thresholds
from services.usage.thresholds import CounterKey, Crossing
from shared.catalog import parse_catalog

CATALOG = parse_catalog("""\
defaults:
  access_policy: {active: full}
plans:
  free:
    name: Free
    tier: 0
    default: true
    features:
      api_calls: {limit: 10, period: month, alerts: [80%, 100%, 12]}
      storage: {limit: 10, period: none, allow_release: true, alerts: [50%]}
      quiet: {limit: 10, period: month}
  pro:
    name: Pro
    tier: 1
    family_pool: true
    features:
      credits: {limit: 100, period: month, member_cap: 10, alerts: [80%, 50]}
""")
JAN, FEB = 1_924_992_000, 1_927_670_400
_ids = itertools.count()


def usage(amount: int, *, feature: str = "api_calls", subject: str = "u1", plan: str = "free", limit: int = 10,
          period: int = JAN, family: str = "", member: str = "", cap: int | None = None) -> events_pb2.UsageEvent:
    n = next(_ids)
    return events_pb2.UsageEvent(
        event_id=f"usage_{n}", idempotency_key=f"k{n}", subject_type="family" if family else "user",
        subject_id=family or subject, user_id=member or subject, family_id=family, feature_code=feature,
        amount=amount, period_start=period, period_end=period + 86_400 * 31, created_ms=n, limit=limit,
        plan_id=plan, member_cap=cap,
    )


def fired(crossings: list[Crossing]) -> list[tuple[str, str, int, str, int]]:
    return [(c.scope, c.member_id, c.period_start, c.threshold, c.usage) for c in crossings]


def test_an_increment_landing_exactly_on_a_threshold_fires_it_and_one_below_does_not() -> None:
    events = [usage(7), usage(1), usage(2)]
    assert fired(thresholds.crossings(events, {}, CATALOG)) == [("pool", "", JAN, "80%", 8), ("pool", "", JAN, "100%", 10)]
    assert thresholds.crossings([usage(7)], {}, CATALOG) == []


def test_one_increment_crossing_several_thresholds_fires_each_once_with_the_usage_after_it() -> None:
    assert fired(thresholds.crossings([usage(13)], {}, CATALOG)) == [
        ("pool", "", JAN, "80%", 13), ("pool", "", JAN, "100%", 13), ("pool", "", JAN, "12", 13),
    ]


def test_the_counter_before_the_batch_counts_and_a_threshold_already_passed_does_not_fire_again() -> None:
    key: CounterKey = ("pool", "user", "u1", "", "api_calls", JAN)
    assert fired(thresholds.crossings([usage(2)], {key: 8}, CATALOG)) == [("pool", "", JAN, "100%", 10)]


def test_a_release_under_a_threshold_and_a_new_crossing_in_the_same_period_fire_once() -> None:
    events = [usage(5, feature="storage"), usage(-3, feature="storage"), usage(4, feature="storage")]
    assert fired(thresholds.crossings(events, {}, CATALOG)) == [("pool", "", JAN, "50%", 5)]


def test_a_new_period_starts_afresh() -> None:
    events = [usage(8), usage(8, period=FEB)]
    assert fired(thresholds.crossings(events, {}, CATALOG)) == [("pool", "", JAN, "80%", 8), ("pool", "", FEB, "80%", 8)]


def test_features_without_alerts_and_events_without_a_plan_fire_nothing() -> None:
    assert thresholds.crossings([usage(10, feature="quiet"), usage(10, plan="")], {}, CATALOG) == []
    assert thresholds.watched([usage(10, feature="quiet"), usage(10, plan="")], CATALOG) == set()


def test_a_family_pool_fires_for_the_pool_and_for_the_member_against_its_cap() -> None:
    events = [usage(8, feature="credits", plan="pro", limit=100, family="f1", member="a", cap=10),
              usage(10, feature="credits", plan="pro", limit=100, family="f1", member="b", cap=10),
              usage(40, feature="credits", plan="pro", limit=100, family="f1", member="c")]  # no cap carried
    assert fired(thresholds.crossings(events, {}, CATALOG)) == [
        ("member", "a", JAN, "80%", 8),
        ("member", "b", JAN, "80%", 10),
        ("pool", "", JAN, "50", 58),
    ]


def test_the_published_event_carries_the_crossing_and_a_stable_id() -> None:
    (c,) = thresholds.crossings([usage(9)], {}, CATALOG)
    e = thresholds.crossed_event(c)
    assert (e.scope, e.subject_id, e.feature_code, e.period_start, e.threshold, e.threshold_units, e.usage, e.limit) == (
        "pool", "u1", "api_calls", JAN, "80%", 8, 9, 10)
    assert e.crossing_event_id == c.event_id and e.plan_id == "free"
    again = thresholds.crossings([usage(9)], {}, CATALOG)[0]
    assert thresholds.crossed_event(again).event_id == e.event_id  # another increment, same key: same id


def _in_batches(events: list[events_pb2.UsageEvent], cuts: list[int]) -> list[Crossing]:
    """What the worker records when the log arrives cut at `cuts`: the counters carried
    from batch to batch, a key recorded once (the table's primary key)."""
    counters: dict[CounterKey, int] = {}
    recorded: dict[tuple[object, ...], Crossing] = {}
    bounds = [0, *sorted(set(cuts)), len(events)]
    for lo, hi in itertools.pairwise(bounds):
        batch = events[lo:hi]
        for c in thresholds.crossings(batch, counters, CATALOG):
            recorded.setdefault(c.key, c)
        for e in batch:
            key: CounterKey = ("pool", e.subject_type, e.subject_id, "", e.feature_code, e.period_start)
            counters[key] = max(0, counters.get(key, 0) + e.amount)
    return list(recorded.values())


@given(st.lists(st.integers(-6, 6), max_size=25), st.lists(st.integers(0, 25), max_size=6))
@example([5, -3, 4], [1])  # back under 50% and over it again across a batch boundary
@example([8, 0, 2], [])
def test_each_threshold_fires_once_iff_the_running_usage_reaches_it_however_the_log_is_batched(
    amounts: list[int], cuts: list[int]
) -> None:
    events = [usage(a, feature="storage") for a in amounts]
    whole = thresholds.crossings(events, {}, CATALOG)
    assert _in_batches(events, [c for c in cuts if c <= len(events)]) == whole
    running, peak = 0, 0
    for a in amounts:
        running = max(0, running + a)
        peak = max(peak, running)
    assert [c.threshold for c in whole] == (["50%"] if peak >= 5 else [])
    assert all(c.usage >= c.units for c in whole)
