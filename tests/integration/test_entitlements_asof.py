"""CheckEntitlement as of a moment, against the real Postgres: a subscription's whole
life (signup, renewal, failed payment, grace, reduced, suspended, recovered, canceled)
is projected by the real entitlements projection, once in order and once shuffled into
random batches. At every moment between two events, `as_of` that moment must be what
the live answer was when the projection had applied exactly the events created until
then, identical for both databases, and what the catalog says it should be."""

from __future__ import annotations

import os
import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
import pytest

from payment.v1 import events_pb2
from services.api_grpc import page_tokens
from services.api_grpc.decisions import Decision, Facts
from services.api_grpc.errors import InvalidArgument
from services.api_grpc.queries import Queries
from services.api_grpc.service import PaymentApi
from services.api_grpc.validation import SubjectIds
from services.entitlements.projection import EntitlementsProjection
from shared.catalog import apply_catalog
from shared.db import make_pool
from tests.conftest import random_id
from tests.integration.test_entitlements_projection import DAY, Ids, apply_batch, event, sub_event
from tests.integration.test_entitlements_worker import CATALOG

pytestmark = pytest.mark.integration
T0 = 1_893_456_000  # 2030-01-01T00:00:00Z
P1, P2, P3 = T0 + 30 * DAY, T0 + 60 * DAY, T0 + 90 * DAY
BASIC = {"price_id": "price_basic_monthly"}
HOUR = 3600


def lifecycle(ids: Ids) -> list[events_pb2.PaymentEvent]:
    """A basic subscription's life; user and family are named only by the checkout."""
    failed = P1 + 2 * HOUR

    def dunning(kind: str, created: int, status: str) -> events_pb2.PaymentEvent:
        return events_pb2.PaymentEvent(
            event_type=kind, event_id=random_id("evt_dun_"), created=created, customer_id=ids.customer,
            subscription_id=ids.sub, status=status, source=events_pb2.EVENT_SOURCE_DUNNING,
        )

    return [
        event(ids, "checkout.session.completed", T0 + 5, user_id=ids.user, subscription_id=ids.sub),
        sub_event(ids, "created", T0 + 10, status="active", period_start=T0, period_end=P1, **BASIC),  # signup
        event(ids, "invoice.paid", T0 + 20, subscription_id=ids.sub, period_start=T0, period_end=P1),
        sub_event(ids, "updated", P1 + 60, status="active", period_start=P1, period_end=P2, **BASIC),  # renewal
        event(ids, "invoice.payment_failed", failed, subscription_id=ids.sub, period_start=P1, period_end=P2),
        sub_event(ids, "updated", failed + 1, status="past_due", period_start=P1, period_end=P2, **BASIC),
        dunning("dunning.escalated", failed + 15 * DAY, "suspended"),  # grace 7 days, reduced, then suspended
        event(ids, "invoice.paid", failed + 16 * DAY, subscription_id=ids.sub, period_start=P1, period_end=P2),
        dunning("dunning.restored", failed + 16 * DAY + 5, "active"),  # recovered
        sub_event(ids, "updated", P2 + 60, status="active", period_start=P2, period_end=P3, **BASIC),
        sub_event(ids, "deleted", P2 + 10 * DAY, status="canceled", period_start=P2, period_end=P3, **BASIC),
    ]


# (moment, feature) -> (allowed, reason, plan, access level); the catalog's basic plan:
# past_due: grace 7 days, then reduced; api_calls needs full, export_pdf reduced.
FAILED = P1 + 2 * HOUR
EXPECTED = [
    (T0 - DAY, "api_calls", (True, "free_plan", "free", "full")),  # before the first event
    (T0 - DAY, "export_pdf", (False, "no_entitlement", "", "blocked")),
    (T0 + 15, "api_calls", (True, "granted", "basic", "full")),  # signed up
    (P1 + 120, "api_calls", (True, "granted", "basic", "full")),  # renewed
    (FAILED + 3 * DAY, "api_calls", (True, "grace", "basic", "grace")),  # failed payment: grace
    (FAILED + 9 * DAY, "api_calls", (True, "free_plan", "free", "full")),  # reduced: basic's api_calls gone
    (FAILED + 9 * DAY, "export_pdf", (True, "granted", "basic", "reduced")),
    (FAILED + 15 * DAY + 60, "export_pdf", (False, "suspended", "basic", "blocked")),  # suspended
    (FAILED + 16 * DAY + 60, "api_calls", (True, "granted", "basic", "full")),  # recovered
    (P2 + 10 * DAY + 60, "export_pdf", (False, "revoked", "basic", "blocked")),  # canceled
    (P2 + 10 * DAY + 60, "api_calls", (True, "free_plan", "free", "full")),
]


class Clock:
    def __init__(self) -> None:
        self.now = float(T0)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def apis(database_url: str, second_database_url: str) -> AsyncIterator[tuple[PaymentApi, PaymentApi, Clock]]:
    """Two APIs without a cache, on two databases, sharing a clock."""
    clock = Clock()
    pools, apis = [], []
    for url in (database_url, second_database_url):
        with psycopg.connect(url, autocommit=True) as conn:
            apply_catalog(conn, CATALOG)
        pool = make_pool(url, max_size=2)
        await pool.open(wait=True)
        pools.append(pool)
        tokens = page_tokens.PageTokens(page_tokens.derive_key("test"))
        apis.append(PaymentApi(Facts.of(CATALOG), Queries(pool, 2.0), None, None, None, tokens, clock=clock))  # type: ignore[arg-type]
    try:
        yield apis[0], apis[1], clock
    finally:
        for pool in pools:
            await pool.close()


def shown(d: Decision) -> tuple[Any, ...]:
    return tuple(d)


def moments(events: Sequence[events_pb2.PaymentEvent]) -> list[int]:
    """Just before the first event, between every two, at each event, and long after."""
    times = sorted({e.created for e in events})
    between = [(a + b) // 2 for a, b in zip(times, times[1:], strict=False)]
    return sorted({times[0] - 1, *between, *times, times[-1] + 30 * DAY})


# 2290711475 once put a dunning decision before every event of its subscription.
@pytest.mark.parametrize("kept_seed", [2290711475, None])
async def test_as_of_each_moment_of_a_lifecycle_is_the_answer_given_then_in_order_or_shuffled(
    apis: tuple[PaymentApi, PaymentApi, Clock], database_url: str, second_database_url: str, kept_seed: int | None
) -> None:
    in_order, shuffled, clock = apis
    ids = Ids()
    events = lifecycle(ids)
    seed = kept_seed or int(os.environ.get("SHUFFLE_SEED") or random.randrange(2**32))
    print(f"shuffle seed {seed} (rerun with SHUFFLE_SEED={seed})")
    rng = random.Random(seed)
    mixed = events[:]
    rng.shuffle(mixed)
    # Our scheduler publishes its decisions on the customer's partition after the case
    # exists, so one never precedes every event of its subscription (the projection drops
    # a decision about an unknown subscription): keep that one order, shuffle the rest.
    first_sub = next(i for i, e in enumerate(mixed) if e.event_type.startswith("customer.subscription."))
    early = [e for e in mixed[:first_sub] if e.event_type.startswith("dunning.")]
    mixed = [e for e in mixed if e not in early]
    mixed[first_sub - len(early) + 1:first_sub - len(early) + 1] = early
    projection = EntitlementsProjection(CATALOG, None)
    while mixed:  # random batches, in a random order
        n = rng.randint(1, 4)
        await apply_batch(second_database_url, projection, mixed[:n])
        mixed = mixed[n:]
    subject = SubjectIds(ids.user, "")
    pending = sorted(events, key=lambda e: (e.created, e.event_id))
    checked = 0
    for moment in moments(events):
        due = [e for e in pending if e.created <= moment]
        pending = pending[len(due):]
        if due:
            await apply_batch(database_url, projection, due)
        clock.now = moment + 0.5  # live answers at the moment; as_of needs it in the past
        for feature in ("api_calls", "export_pdf", "storage_mb"):
            live, _ = await in_order.check(subject, feature, 5.0)
            past = await shuffled.check_as_of(subject, feature, moment, 5.0)
            same = await in_order.check_as_of(subject, feature, moment, 5.0)
            assert shown(same.decision) == shown(live), ("in order, as of vs live", moment - T0, feature)
            assert shown(past.decision) == shown(same.decision), ("shuffled vs in order", moment - T0, feature)
            assert past.evidence == same.evidence
            checked += 1
    assert checked == 3 * len(moments(events))
    clock.now = P3 + 100 * DAY
    for moment, feature, expected in EXPECTED:
        d = (await shuffled.check_as_of(subject, feature, moment, 5.0)).decision
        assert (d.allowed, d.reason, d.plan_id, d.access_level) == expected, (moment - T0, feature, d)


async def test_as_of_names_the_events_it_rests_on_and_explains_the_rule(
    apis: tuple[PaymentApi, PaymentApi, Clock], database_url: str
) -> None:
    api, _, clock = apis
    ids = Ids()
    events = lifecycle(ids)
    await apply_batch(database_url, EntitlementsProjection(CATALOG, None), events)
    clock.now = P3
    subject = SubjectIds(ids.user, "")
    grace = await api.check_as_of(subject, "api_calls", FAILED + 3 * DAY, 5.0)
    ids_until = [e.event_id for e in sorted(events, key=lambda e: (e.created, e.event_id))
                 if e.created <= FAILED + 3 * DAY and e.event_type.startswith(("customer.subscription", "invoice.paid"))]
    assert list(grace.evidence) == ids_until
    d = grace.decision
    assert (d.rule, d.source, d.clock) == ("past_due: grace 7 days, then reduced", f"subscription:{ids.sub}", "")
    assert d.grace_until == FAILED + 1 + 7 * DAY  # past_due since its event, grace 7 days
    assert d.decided_by_event_id == events[5].event_id and d.plan_version.startswith("sha256:")
    reduced = (await api.check_as_of(subject, "export_pdf", FAILED + 9 * DAY, 5.0)).decision
    assert (reduced.rule, reduced.clock, reduced.access_level) == ("past_due: grace 7 days, then reduced",
                                                                   "grace_ended", "reduced")
    before = await api.check_as_of(subject, "api_calls", T0 - 1, 5.0)
    assert (before.decision.reason, before.decision.rule, before.evidence) == ("free_plan", "default_plan: free", ())
    with pytest.raises(InvalidArgument):
        await api.check_as_of(subject, "api_calls", int(clock.now) + 10, 5.0)


async def test_list_access_changes_pages_through_a_time_range_with_their_events(
    apis: tuple[PaymentApi, PaymentApi, Clock], database_url: str
) -> None:
    api, _, clock = apis
    ids = Ids()
    events = lifecycle(ids)
    await apply_batch(database_url, EntitlementsProjection(CATALOG, None), events)
    clock.now = time.time()
    subject = SubjectIds(ids.user, "")
    rows, token = [], ""
    while True:
        page = await api.list_access_changes(subject, 0, 0, 2, token, 5.0)
        rows += page.rows
        token = page.next_page_token
        if not token:
            break
    by_event = {e.event_id: e for e in events}
    assert [(r["from_level"], r["to_level"], r["status"]) for r in rows] == [
        ("blocked", "full", "active"), ("full", "grace", "past_due"), ("grace", "blocked", "suspended"),
        ("blocked", "full", "active"), ("full", "blocked", "canceled")]
    assert [r["changed_at"] for r in rows] == [by_event[r["event_id"]].created for r in rows]
    assert all(r["plan_id"] == "basic" and r["subscription_id"] == ids.sub for r in rows)
    window = await api.list_access_changes(subject, P1, P2, 50, "", 5.0)
    assert [r["to_level"] for r in window.rows] == ["grace", "blocked", "full"]
