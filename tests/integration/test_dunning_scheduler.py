"""The dunning projection and scheduler on the real Postgres, with a fake Stripe server that
counts Invoice.pay requests. Events are applied through the real BatchProcessor; the
scheduler's decisions are fed back to it, as the log would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from payment.v1 import events_pb2
from services.dunning.events import notice_sender
from services.dunning.scheduler import Scheduler, SchedulerConfig, StripeInvoices
from shared.catalog import Catalog, load_catalog
from shared.config import DEFAULT_CATALOG_PATH
from shared.db import make_pool
from shared.outbox import OutboxRelay
from tests.conftest import random_id
from tests.integration.test_dunning_support import (
    DAY,
    Applier,
    Clock,
    FakeStripe,
    RecordingPublisher,
    failure,
    fake_stripe,
    paid,
)

pytestmark = pytest.mark.integration
CATALOG: Catalog = load_catalog(DEFAULT_CATALOG_PATH)
T0 = 1_767_225_600


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Any]:
    pool = make_pool(database_url, max_size=6)
    await pool.open(wait=True)
    yield pool
    await pool.close()


@pytest.fixture
async def stripe_fake() -> AsyncIterator[FakeStripe]:
    async with fake_stripe() as fake:
        yield fake


def scheduler(
    pool: Any, fake: FakeStripe, publisher: RecordingPublisher, clock: Clock, breaker_clock: Clock | None = None,
    **config: Any,
) -> Scheduler:
    config.setdefault("owner", random_id("replica-"))
    return Scheduler(
        pool, StripeInvoices("sk_test_fake", fake.url, timeout_s=5), publisher, CATALOG,
        clock=clock, config=SchedulerConfig(**config), breaker_clock=breaker_clock or Clock(0),
    )


def rows(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


def cases(url: str) -> dict[str, tuple[Any, ...]]:
    found = rows(url, "SELECT invoice_id, state, attempt_count, extract(epoch FROM next_attempt_at)::bigint FROM dunning_cases")
    return {r[0]: r[1:] for r in found}


async def test_the_projection_opens_retries_recovers_and_emits_notices_only_live(
    pool: Any, database_url: str
) -> None:
    live, quiet = RecordingPublisher(), RecordingPublisher()
    apply = Applier(pool, CATALOG, live)
    first = failure("in_a", T0)
    await apply([first, first, failure("in_b", T0 + 5)])  # a duplicate in the batch
    await apply([first])  # and redelivered later
    assert cases(database_url) == {"in_a": ("open", 0, T0 + DAY), "in_b": ("open", 0, T0 + 5 + DAY)}
    assert [events_pb2.DunningEvent.Kind.Name(n.kind) for n in live.dunning] == ["CASE_OPENED", "RETRY_SCHEDULED"] * 2
    await apply([paid("in_a", T0 + 100)])
    assert cases(database_url)["in_a"][0] == "recovered"
    assert live.dunning[-1].kind == events_pb2.DunningEvent.RECOVERED
    # A replaying projection writes the same way but publishes nothing.
    replaying = Applier(pool, CATALOG, quiet, replay=True)
    replaying.processor.consumer = "dunning-replay-check"
    await replaying([failure("in_c", T0)])
    assert quiet.dunning == []


async def ticks_until_idle(*replicas: Any, rounds: int = 20) -> None:
    """Tick every replica twice at once, round after round, until a round takes no step.

    How many due cases one concurrent round takes depends on timing: a tick whose
    snapshot predates another tick's claim selects that case too, finds it claimed and
    takes a smaller share. So the test does not count on one round's capacity; it asks
    that all rounds together take each step exactly once.
    """
    for _ in range(rounds):
        reports = await asyncio.gather(*(r.tick() for r in replicas * 2))
        if not any(r.attempts or r.escalations or r.restorations for r in reports):
            return
    raise AssertionError(f"the replicas were still taking steps after {rounds} rounds")


async def test_two_scheduler_replicas_make_every_due_attempt_exactly_once(
    pool: Any, database_url: str, stripe_fake: FakeStripe
) -> None:
    clock = Clock(T0)
    publisher = RecordingPublisher()
    apply = Applier(pool, CATALOG, publisher)
    invoices = [f"in_{i:02d}_{random_id()}" for i in range(24)]
    await apply([failure(inv, T0) for inv in invoices])
    a = scheduler(pool, stripe_fake, publisher, clock, batch_size=7)
    b = scheduler(pool, stripe_fake, publisher, clock, batch_size=7)
    assert (await a.tick()).attempts == []  # nothing due yet
    clock.advance(DAY)
    # The round that ends this is idle: until the projection applies the decisions,
    # further ticks repeat none of them.
    await ticks_until_idle(a, b)
    assert stripe_fake.calls == {inv: 1 for inv in invoices}
    assert sorted(stripe_fake.keys) == sorted(f"dunning-dc_{inv}-1" for inv in invoices)
    attempts = [d for d in publisher.decisions if d.event_type == "dunning.attempt_made"]
    assert sorted(d.invoice_id for d in attempts) == sorted(invoices)
    await apply(publisher.decisions)
    assert {c[:2] for c in cases(database_url).values()} == {("retrying", 1)}
    # The next retry, two days later, again exactly once.
    clock.advance(2 * DAY)
    await ticks_until_idle(a, b)
    assert stripe_fake.calls == {inv: 2 for inv in invoices}


async def test_a_stripe_outage_opens_the_breaker_burns_nothing_and_attempts_resume(
    pool: Any, database_url: str, stripe_fake: FakeStripe
) -> None:
    clock = Clock(T0 + DAY)
    publisher = RecordingPublisher()
    apply = Applier(pool, CATALOG, publisher)
    await apply([failure(f"in_out{i}", T0) for i in range(5)])
    breaker_clock = Clock(0)
    s = scheduler(pool, stripe_fake, publisher, clock, breaker_clock, breaker_threshold=2, breaker_ttl_s=30)
    stripe_fake.mode = "down"
    report = await s.tick()
    assert len(report.skipped_unavailable) == 5 and report.attempts == []
    assert stripe_fake.requests == 2  # two outages open the breaker; the rest never left
    assert s.breaker.state == "opened"
    assert publisher.decisions == []
    assert rows(database_url, "SELECT count(*) FROM dunning_steps") == [(0,)]  # nothing claimed stays
    assert {c[:2] for c in cases(database_url).values()} == {("open", 0)}
    # The breaker is open now: no request reaches Stripe at all, even though it is back.
    stripe_fake.mode = "ok"
    breaker_clock.advance(29)
    report = await s.tick()
    assert len(report.skipped_unavailable) == 5 and stripe_fake.requests == 2
    # Its cool-down is over: a trial call goes through, succeeds and closes it.
    breaker_clock.advance(1)
    assert s.breaker.state == "half-opened"
    report = await s.tick()
    assert len(report.attempts) == 5 and sum(stripe_fake.calls.values()) == 5
    assert s.breaker.state == "closed"
    await apply(publisher.decisions)
    assert {c[:2] for c in cases(database_url).values()} == {("retrying", 1)}


async def test_a_decline_is_an_attempt_and_webhooks_around_the_retry_in_any_order_move_the_case_once(
    pool: Any, database_url: str, stripe_fake: FakeStripe
) -> None:
    clock = Clock(T0 + DAY)
    publisher = RecordingPublisher()
    apply = Applier(pool, CATALOG, publisher)
    original = failure("in_x", T0)
    await apply([original])
    stripe_fake.mode = "decline"
    s = scheduler(pool, stripe_fake, publisher, clock)
    assert len((await s.tick()).attempts) == 1
    (attempt,) = publisher.decisions
    assert (attempt.attempt_count, attempt.failure_message) == (1, "Your card was declined.")
    after_retry = failure("in_x", T0 + DAY + 10, failure_message="Insufficient funds")
    # The retry's failure webhook twice, the original failure again, the attempt twice.
    await apply([after_retry, original, attempt])
    await apply([attempt, after_retry])
    assert cases(database_url)["in_x"] == ("retrying", 1, T0 + 3 * DAY)
    assert rows(database_url, "SELECT last_error FROM dunning_cases") == [("Insufficient funds",)]
    assert (await s.tick()).attempts == []  # the next retry is not due before day 3
    clock.advance(2 * DAY)
    stripe_fake.mode = "ok"
    assert len((await s.tick()).attempts) == 1
    await apply([paid("in_x", T0 + 3 * DAY + 5), publisher.decisions[-1], after_retry])
    assert cases(database_url)["in_x"][:2] == ("recovered", 2)
    assert stripe_fake.calls["in_x"] == 2


async def test_after_the_last_retry_and_the_grace_the_case_escalates_and_a_payment_restores_access(
    pool: Any, database_url: str, stripe_fake: FakeStripe
) -> None:
    clock = Clock(T0)
    publisher = RecordingPublisher()
    apply = Applier(pool, CATALOG, publisher)
    await apply([failure("in_e", T0)])
    s = scheduler(pool, stripe_fake, publisher, clock)
    for day in (1, 3, 5, 7):
        clock.now = T0 + day * DAY
        assert len((await s.tick()).attempts) == 1
        await apply(publisher.decisions[-1:])
    clock.now = T0 + 13 * DAY
    assert (await s.tick()).escalations == []  # grace: 7 days after the last retry
    clock.now = T0 + 14 * DAY
    assert len((await s.tick()).escalations) == 1
    escalated = publisher.decisions[-1]
    assert (escalated.event_type, escalated.status, escalated.source) == (
        "dunning.escalated", "suspended", events_pb2.EVENT_SOURCE_DUNNING
    )
    await apply([escalated])
    assert cases(database_url)["in_e"][0] == "escalated"
    assert (await s.tick()).escalations == []
    await apply([paid("in_e", T0 + 15 * DAY)])
    clock.now = T0 + 15 * DAY
    report = await s.tick()
    assert len(report.restorations) == 1 and publisher.decisions[-1].event_type == "dunning.restored"
    await apply(publisher.decisions[-1:])
    assert (await s.tick()).restorations == []
    assert stripe_fake.calls["in_e"] == 4
    kinds = [events_pb2.DunningEvent.Kind.Name(n.kind) for n in publisher.dunning]
    assert kinds.count("ATTEMPT_MADE") == 4 and kinds.count("ESCALATED") == 1 and kinds[-1] == "RECOVERED"


async def test_a_publish_failure_keeps_the_claim_until_it_expires_then_retries_with_the_same_key(
    pool: Any, database_url: str, stripe_fake: FakeStripe
) -> None:
    clock = Clock(T0 + DAY)
    publisher = RecordingPublisher()
    apply = Applier(pool, CATALOG, publisher)
    await apply([failure("in_p", T0)])
    s = scheduler(pool, stripe_fake, publisher, clock, claim_ttl_s=60)
    publisher.fail = True
    assert (await s.tick()).publish_failed != []
    publisher.fail = False
    assert (await s.tick()).attempts == []  # still claimed
    clock.advance(61)
    assert len((await s.tick()).attempts) == 1
    assert stripe_fake.keys == ["dunning-dc_in_p-1", "dunning-dc_in_p-1"]
    assert len(publisher.decisions) == 1


async def test_notices_survive_a_broker_outage_through_the_outbox(pool: Any, database_url: str) -> None:
    publisher = RecordingPublisher(fail=True)
    apply = Applier(pool, CATALOG, publisher)
    await apply([failure("in_outage", T0)])
    assert publisher.dunning == [], "nothing could be published"
    assert rows(database_url, "SELECT count(*) FROM outbox")[0][0] == 2, "but the notices are kept"
    publisher.fail = False
    await OutboxRelay(pool, "dunning", notice_sender(publisher)).flush()
    assert [events_pb2.DunningEvent.Kind.Name(n.kind) for n in publisher.dunning] == ["CASE_OPENED", "RETRY_SCHEDULED"]
    assert rows(database_url, "SELECT count(*) FROM outbox")[0][0] == 0


async def test_a_stop_during_a_tick_waits_for_one_stripe_call_and_releases_the_rest(
    pool: Any, database_url: str, stripe_fake: FakeStripe
) -> None:
    stop = asyncio.Event()

    class StopsAfterTheFirst(RecordingPublisher):
        async def decision(self, event: events_pb2.PaymentEvent) -> None:
            await super().decision(event)
            stop.set()  # SIGTERM arrives while the first attempt is being taken

    clock = Clock(T0 + DAY)
    publisher = StopsAfterTheFirst()
    await Applier(pool, CATALOG, RecordingPublisher())([failure(f"in_stop{i}_{random_id()}", T0) for i in range(5)])
    s = scheduler(pool, stripe_fake, publisher, clock)
    report = await s.tick(stop)
    assert len(report.attempts) == 1 and report.released_on_stop == 4
    assert sum(stripe_fake.calls.values()) == 1
    # The released steps are claimable at once (no claim to expire): the next tick takes them.
    report = await s.tick()
    assert len(report.attempts) == 4 and sum(stripe_fake.calls.values()) == 5
