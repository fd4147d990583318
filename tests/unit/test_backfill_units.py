"""The backfill's pure parts and its run loop, on an in-memory `StripeState` (a fake of the
port; tests/integration/test_backfill.py runs it against localstripe and the broker)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import stripe

from payment.v1 import events_pb2
from services.ingest_webhooks.backfill import (
    DAY,
    Backoff,
    Checkpoint,
    Options,
    Page,
    StripeReader,
    backfill,
    snapshot,
    snapshot_type,
)
from shared.config import Topics
from shared.errors import ConfigurationError, DependencyUnavailable
from shared.kafka import OutgoingMessage

NOW = 1_800_000_000
CUSTOMER = {"id": "cus_1", "object": "customer", "email": "a@example.com", "metadata": {"user_id": "u_1"}}


def subscription(status: str = "active", sub_id: str = "sub_1", customer: str = "cus_1", **extra: Any) -> dict[str, Any]:
    item = {"id": "si_1", "price": {"id": "price_basic_monthly", "unit_amount": 900, "currency": "usd"}, "quantity": 1,
            "current_period_start": NOW - DAY, "current_period_end": NOW + 29 * DAY}
    return {"id": sub_id, "object": "subscription", "customer": customer, "status": status,
            "items": {"object": "list", "data": [item]}, "metadata": {}, **extra}


def invoice(status: str, invoice_id: str = "in_1", created: int = NOW - DAY, **extra: Any) -> dict[str, Any]:
    return {"id": invoice_id, "object": "invoice", "customer": "cus_1", "status": status, "created": created,
            "amount_due": 900, "amount_paid": 900 if status == "paid" else 0, "currency": "usd", "subscription": "sub_1",
            "attempt_count": 1 if status in ("paid", "open") else 0, **extra}


def charge(status: str, charge_id: str = "ch_1", **extra: Any) -> dict[str, Any]:
    return {"id": charge_id, "object": "charge", "customer": "cus_1", "status": status, "created": NOW - DAY,
            "amount": 900, "amount_refunded": 0, "currency": "usd", **extra}


@pytest.mark.parametrize(
    ("kind", "obj", "expected"),
    [
        ("subscription", subscription("active"), "customer.subscription.updated"),
        ("subscription", subscription("trialing"), "customer.subscription.updated"),
        ("subscription", subscription("past_due"), "customer.subscription.updated"),
        ("subscription", subscription("canceled"), "customer.subscription.deleted"),
        ("invoice", invoice("paid"), "invoice.paid"),
        ("invoice", invoice("open"), "invoice.payment_failed"),
        ("invoice", invoice("open", attempt_count=0, attempted=False), None),
        ("invoice", invoice("draft"), None),
        ("invoice", invoice("void"), None),
        ("charge", charge("succeeded"), "charge.succeeded"),
        ("charge", charge("succeeded", amount_refunded=100), "charge.refunded"),
        ("charge", charge("failed"), "charge.failed"),
        ("charge", charge("pending"), None),
    ],
)
def test_each_object_is_stated_by_the_stripe_event_type_of_its_current_state(kind: str, obj: dict[str, Any], expected: str | None) -> None:
    assert snapshot_type(kind, obj) == expected


def test_an_object_kind_without_a_snapshot_is_refused() -> None:
    with pytest.raises(ValueError, match="no snapshot for a 'customer'"):
        snapshot_type("customer", CUSTOMER)


def test_a_snapshot_is_normalized_like_a_webhook_with_the_customer_expanded_and_the_read_time() -> None:
    event = snapshot("customer.subscription.updated", subscription(), CUSTOMER, NOW, "2024-06-20")
    assert (event.event_type, event.created, event.source) == (
        "customer.subscription.updated", NOW, events_pb2.EVENT_SOURCE_STRIPE_BACKFILL
    )
    assert (event.customer_id, event.user_id, event.customer_email) == ("cus_1", "u_1", "a@example.com")
    assert (event.subscription_id, event.status, event.price_id) == ("sub_1", "active", "price_basic_monthly")
    assert event.period_end == NOW + 29 * DAY
    assert event.event_id.startswith("backfill:sub_1:")


def test_the_same_state_read_at_another_time_has_the_same_id_and_a_changed_state_a_new_one() -> None:
    first = snapshot("customer.subscription.updated", subscription(), CUSTOMER, NOW, "")
    later = snapshot("customer.subscription.updated", subscription(), CUSTOMER, NOW + 3600, "")
    changed = snapshot("customer.subscription.updated", subscription(cancel_at_period_end=True), CUSTOMER, NOW, "")
    assert first.event_id == later.event_id != changed.event_id
    assert later.created == NOW + 3600


def test_a_snapshot_loses_a_same_second_tie_to_any_stripe_event() -> None:
    """Projections order by (created, event_id): within the second of the read, the
    webhook may be the newer one, so it must win."""
    event = snapshot("customer.subscription.updated", subscription(sub_id="sub_zzzzzzzzzzzzzz"), CUSTOMER, NOW, "")
    assert (NOW, event.event_id) < (NOW, "evt_0000000000000000")


# --- the run loop on a fake Stripe ----------------------------------------------------


class FakeStripe:
    """Customers and their objects in memory, listed like Stripe (pages, starting_after).
    `fail_after` makes every read after that many raise, as if Stripe went away."""

    def __init__(self, customers: list[dict[str, Any]], objects: dict[tuple[str, str], list[dict[str, Any]]], fail_after: int | None = None) -> None:
        self._customers, self._objects, self._fail_after = customers, objects, fail_after
        self.reads: list[tuple[str, str | None]] = []
        self.retries = 0

    def _page(self, items: Sequence[dict[str, Any]], starting_after: str | None, limit: int) -> Page:
        if self._fail_after is not None and len(self.reads) > self._fail_after:
            raise DependencyUnavailable("stripe", "fake", "gone")
        start = 0 if starting_after is None else [i["id"] for i in items].index(starting_after) + 1
        chunk = list(items[start:start + limit])
        return Page(chunk, start + limit < len(items), NOW, "2024-06-20")

    async def customers(self, starting_after: str | None, limit: int) -> Page:
        self.reads.append(("customers", starting_after))
        return self._page(self._customers, starting_after, limit)

    async def customer(self, customer_id: str) -> Page:
        self.reads.append(("customer", customer_id))
        return self._page([c for c in self._customers if c["id"] == customer_id], None, 1)

    async def objects(self, kind: str, customer_id: str, starting_after: str | None, limit: int) -> Page:
        self.reads.append((kind, customer_id))
        return self._page(self._objects.get((kind, customer_id), []), starting_after, limit)


class Collect:
    def __init__(self) -> None:
        self.batches: list[list[OutgoingMessage]] = []

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        self.batches.append(list(messages))


def fleet(n: int) -> FakeStripe:
    customers = [{"id": f"cus_{i:03}", "object": "customer", "metadata": {"user_id": f"u_{i}"}} for i in range(n)]
    objects = {("subscription", c["id"]): [subscription(sub_id=f"sub_{c['id']}", customer=c["id"])] for c in customers}
    return FakeStripe(customers, objects)


async def test_a_run_publishes_page_by_page_and_a_finished_run_leaves_no_checkpoint(tmp_path: Path) -> None:
    sink, checkpoint = Collect(), Checkpoint(tmp_path / "cp")
    report = await backfill(fleet(7), sink, Topics(), Options(apply=True, page_size=3), checkpoint=checkpoint, now=NOW)
    assert [len(b) for b in sink.batches] == [3, 3, 1]
    assert (report.customers, report.events, report.finished) == (7, 7, True)
    assert not checkpoint.path.exists()
    keys = [m.key for b in sink.batches for m in b]
    assert keys == [f"cus_{i:03}".encode() for i in range(7)]  # keyed by customer, like the ingester


async def test_an_interrupted_run_resumes_after_the_last_page_the_broker_acknowledged(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path / "cp")
    broken = fleet(7)
    broken._fail_after = 12  # 1 + 3 reads per customer: page 2 fails part-way
    with pytest.raises(DependencyUnavailable):
        await backfill(broken, Collect(), Topics(), Options(apply=True, page_size=3), checkpoint=checkpoint, now=NOW)
    assert checkpoint.read() == "cus_002"
    healthy, sink = fleet(7), Collect()
    report = await backfill(healthy, sink, Topics(), Options(apply=True, page_size=3), checkpoint=checkpoint, now=NOW)
    assert report.resumed_after == "cus_002" and report.customers == 4
    assert healthy.reads[0] == ("customers", "cus_002")
    assert not checkpoint.path.exists()


async def test_a_page_the_broker_did_not_acknowledge_is_not_checkpointed(tmp_path: Path) -> None:
    class DownOnSecondPage(Collect):
        async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
            if self.batches:
                raise DependencyUnavailable("kafka", "fake", "not acknowledged")
            await super().publish(messages)

    checkpoint = Checkpoint(tmp_path / "cp")
    with pytest.raises(DependencyUnavailable, match="kafka"):
        await backfill(fleet(7), DownOnSecondPage(), Topics(), Options(apply=True, page_size=3), checkpoint=checkpoint, now=NOW)
    assert checkpoint.read() == "cus_002"


async def test_a_dry_run_publishes_nothing_and_keeps_no_checkpoint(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path / "cp")
    checkpoint.write("cus_005")
    report = await backfill(fleet(7), None, Topics(), Options(page_size=3), checkpoint=checkpoint, now=NOW)
    assert (report.customers, report.events, report.resumed_after) == (7, 7, None)
    assert checkpoint.read() == "cus_005", "a dry run neither uses nor clears an apply run's checkpoint"
    assert report.lines(False, "payment-events")[-1] == (
        "would publish 7 snapshot event(s) to payment-events (dry run: nothing published; --apply publishes)"
    )


async def test_old_invoices_are_left_out_and_odd_objects_are_counted_not_published() -> None:
    state = FakeStripe(
        [CUSTOMER],
        {
            ("invoice", "cus_1"): [
                invoice("paid", "in_new"), invoice("draft", "in_draft"),
                invoice("paid", "in_bad", amount_paid="900"),  # a string where Stripe sends an integer
                invoice("paid", "in_old", created=NOW - 200 * DAY),
            ],
            ("charge", "cus_1"): [charge("pending")],
        },
    )
    report = await backfill(state, None, Topics(), Options(recent_days=90), now=NOW)
    assert dict(report.by_type) == {"invoice.paid": 1}
    assert dict(report.skipped) == {"invoice draft": 1, "charge pending": 1}
    assert list(report.unnormalizable) == ["in_bad"] and "amount_paid" in report.unnormalizable["in_bad"]
    assert report.customers_without_state == 0


async def test_customers_of_a_page_are_read_a_few_at_a_time_and_published_in_page_order() -> None:
    class Slow(FakeStripe):
        in_flight = peak = 0

        async def objects(self, kind: str, customer_id: str, starting_after: str | None, limit: int) -> Page:
            Slow.in_flight += 1
            Slow.peak = max(Slow.peak, Slow.in_flight)
            await asyncio.sleep(0.001 * (hash(customer_id) % 5))  # reads finish out of order
            Slow.in_flight -= 1
            return await super().objects(kind, customer_id, starting_after, limit)

    base = fleet(20)
    state, sink = Slow(base._customers, base._objects), Collect()
    await backfill(state, sink, Topics(), Options(apply=True, page_size=10, concurrency=4), now=NOW)
    assert Slow.peak == 4
    assert [m.key for b in sink.batches for m in b] == [f"cus_{i:03}".encode() for i in range(20)]


async def test_one_customer_is_read_alone() -> None:
    state = fleet(5)
    report = await backfill(state, None, Topics(), Options(customer_id="cus_003"), now=NOW)
    assert report.customers == 1
    assert {r for r in state.reads if r[0] in ("customers", "customer")} == {("customer", "cus_003")}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"customer_id": "u_1"}, "--customer must be a Stripe customer id"),
        ({"recent_days": -1}, "--recent-days must be 0 or more"),
        ({"page_size": 101}, "--page-size must be within 1..100"),
        ({"concurrency": 0}, "--concurrency must be within 1..32"),
    ],
)
def test_bad_options_are_refused_with_the_option_named(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Options(**options)


def test_a_checkpoint_that_holds_no_customer_id_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cp").write_text("garbage\n")
    with pytest.raises(ConfigurationError, match="holds no customer id"):
        Checkpoint(tmp_path / "cp").read()


# --- retries (the SDK's errors, no network) -------------------------------------------


async def test_rate_limits_are_retried_with_backoff_until_the_attempts_run_out() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    reader = StripeReader(stripe.StripeClient("sk_test_unused"), Backoff(first_s=1, max_s=4, attempts=3), sleep)
    calls = 0

    async def limited_twice() -> str:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise stripe.RateLimitError("Too many requests", http_status=429)
        return "ok"

    assert (await reader._call(limited_twice))[0] == "ok"  # noqa: SLF001 - the retry policy alone
    assert reader.retries == 2 and 0.5 <= slept[0] <= 1 and 1 <= slept[1] <= 2

    async def always_limited() -> str:
        raise stripe.RateLimitError("Too many requests", http_status=429)

    with pytest.raises(DependencyUnavailable, match="RateLimitError after 4 attempts"):
        await reader._call(always_limited)  # noqa: SLF001
    assert all(s <= 4 for s in slept)


async def test_an_error_that_retrying_cannot_fix_stops_at_once() -> None:
    reader = StripeReader(stripe.StripeClient("sk_test_unused"), Backoff(attempts=5))

    async def refused() -> str:
        raise stripe.AuthenticationError("Invalid API Key provided", http_status=401)

    with pytest.raises(DependencyUnavailable, match="AuthenticationError"):
        await reader._call(refused)  # noqa: SLF001
    assert reader.retries == 0


class Answer:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


def test_the_read_time_is_the_answers_date_less_the_round_trip_rounded_up() -> None:
    """The Date header is whole seconds at most the answer's time; the objects were read
    at some point of the round trip before it. So the second taken is no later than the
    read, and every change after the read has a `created` at or after it."""
    reader = StripeReader(stripe.StripeClient("sk_test_unused"))
    date = {"Date": "Mon, 07 Dec 2026 05:41:08 GMT"}
    at = 1_796_622_068
    assert reader._read_at(Answer(date), 0.004) == at - 1  # noqa: SLF001
    assert reader._read_at(Answer(date), 1.5) == at - 2  # noqa: SLF001
    with pytest.raises(DependencyUnavailable, match="without a Date header"):
        reader._read_at(Answer({}), 0.1)  # noqa: SLF001
