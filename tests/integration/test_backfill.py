"""`paymentsvc backfill` against localstripe, into the real broker, the real entitlements
worker and the real gRPC API.

A few hundred customers are made in localstripe in mixed states (active, trialing,
past_due, canceled, without a subscription, some with a one-off payment), without any
webhook endpoint, so the projections start empty as at a cut-over. The backfill reads them
through a small HTTP proxy in front of localstripe, which

- answers 429 to every Nth request (Stripe's rate limit; the reader must back off),
- can answer 503 to everything after a number of requests (an interruption), and
- reports a subscription still in its trial as `trialing`: localstripe has no trialing
  status (a subscription created with `trial_end` stays `incomplete` there), and Stripe
  reports `trialing`. Nothing else of localstripe's answer is changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest
import stripe
from aiohttp import web
from aiokafka import AIOKafkaProducer
from psycopg import sql
from redis.asyncio import Redis

from payment.v1 import service_pb2
from services.entitlements.bootstrap import TABLES
from services.ingest_webhooks.backfill import (
    Backoff,
    Checkpoint,
    KafkaSink,
    Options,
    StripeReader,
    backfill,
)
from shared.catalog import apply_catalog
from shared.config import Topics
from shared.devstripe import DEV_SECRET_KEY, LocalStripe
from shared.errors import DependencyUnavailable
from shared.kafka import OutgoingMessage
from tests.conftest import random_id
from tests.integration.test_api_grpc import READ, api_server, auth
from tests.integration.test_dunning_worker import dunning_worker
from tests.integration.test_dunning_worker import until_processed as dunning_until_processed
from tests.integration.test_entitlements_worker import (
    CATALOG,
    entitlements_worker,
    processed,
)
from tests.integration.test_ingest_webhooks import Ingester, start_ingester
from tests.integration.test_operator_commands import Env, last_line, run
from tests.kafka_helpers import read_topic
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
MONTHLY, YEARLY = "price_basic_monthly", "price_basic_yearly"
DAY = 86_400
# Per state, how many customers (a few hundred in all).
MIX = {"active": 70, "trialing": 40, "past_due": 40, "canceled": 40, "none": 50, "one_off": 30}


@dataclass
class Customer:
    customer_id: str
    user: str
    state: str  # a key of MIX
    subscription_id: str | None = None


class InMemoryLocalStripe(LocalStripe):
    """localstripe without its store on disk: it pickles the whole store to
    /tmp/localstripe.pickle on every write (to reload it on a restart without
    --from-scratch), which makes building a few hundred customers quadratic (minutes)."""

    def command(self) -> list[str]:
        launcher = (
            "import sys; import localstripe.resources as r; r.Store.dump_to_disk = lambda self: None; "
            "from localstripe.server import start; sys.argv[0] = 'localstripe'; start()"
        )
        return [sys.executable, "-c", launcher, "--port", str(self.port), "--from-scratch"]


@dataclass
class Fleet:
    stripe: LocalStripe
    customers: list[Customer]

    def client(self) -> stripe.StripeClient:
        return stripe.StripeClient(DEV_SECRET_KEY, base_addresses={"api": self.stripe.api_base}, max_network_retries=0)


def _make(client: stripe.StripeClient, state: str) -> Customer:
    user = random_id("user_")
    card = "pm_card_chargeCustomerFail" if state == "none" else "pm_card_visa"
    customer = client.v1.customers.create(
        params={"metadata": {"user_id": user}, "email": f"{user}@example.com", "payment_method": card,
                "invoice_settings": {"default_payment_method": card}}
    )
    made = Customer(customer.id, user, state)
    if state in ("none", "one_off"):
        if state == "one_off":
            client.v1.payment_intents.create(
                params={"amount": 2500, "currency": "usd", "customer": customer.id, "payment_method": "pm_card_visa",
                        "confirm": True, "metadata": {"user_id": user}}
            )
        return made
    params: dict[str, Any] = {"customer": customer.id, "items": [{"plan": MONTHLY}]}
    if state == "trialing":
        params["trial_end"] = int(time.time()) + 14 * DAY
    sub = client.v1.subscriptions.create(params=params)  # type: ignore[arg-type]
    made.subscription_id = sub.id
    if state == "canceled":
        client.v1.subscriptions.cancel(sub.id)
    elif state == "past_due":
        # A renewal that fails: the card starts to decline, and a move to yearly bills at once.
        client.v1.customers.update(customer.id, params={"invoice_settings": {"default_payment_method": "pm_card_chargeCustomerFail"}})
        item = sub["items"]["data"][0]["id"]
        client.v1.subscriptions.update(sub.id, params={"items": [{"id": item, "plan": YEARLY}]})
    return made


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    ls = InMemoryLocalStripe()
    ls.start()
    try:
        fleet = Fleet(ls, [])
        client = fleet.client()
        for price, interval, amount in ((MONTHLY, "month", 900), (YEARLY, "year", 9000)):
            client.v1.plans.create(
                params={"id": price, "amount": amount, "currency": "usd", "interval": interval, "product": {"name": "Basic"}}  # type: ignore[typeddict-item]
            )
        states = [state for state, n in MIX.items() for _ in range(n)]
        # A few threads overlap the round trips; localstripe keeps its own order per request.
        with ThreadPoolExecutor(4) as pool:
            fleet.customers = list(pool.map(lambda s: _make(client, s), states))
        statuses = {c.subscription_id: c.state for c in fleet.customers if c.subscription_id}
        seen = {s.id: s.status for s in client.v1.subscriptions.list(params={"status": "all", "limit": 100}).auto_paging_iter()}
        expected = {"active": "active", "trialing": "incomplete", "past_due": "past_due", "canceled": "canceled"}
        assert {sid: seen[sid] for sid in statuses} == {sid: expected[s] for sid, s in statuses.items()}
        yield fleet
    finally:
        ls.stop()


# --- the proxy ------------------------------------------------------------------------


@dataclass
class StripeProxy:
    upstream: str
    rate_limit_every: int = 0  # answer 429 to every Nth request (0: never)
    fail_after: int | None = None  # answer 503 to every request after this many
    url: str = ""
    requests: int = 0
    throttled: int = 0
    paths: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.paths.append(request.path)
        if self.fail_after is not None and self.requests > self.fail_after:
            return web.json_response({"error": {"type": "api_error", "message": "down"}}, status=503)
        if self.rate_limit_every and self.requests % self.rate_limit_every == 0:
            self.throttled += 1
            error = {"type": "invalid_request_error", "code": "rate_limit", "message": "Too many requests"}
            return web.json_response({"error": error}, status=429)
        async with aiohttp.ClientSession() as session, session.request(
            request.method, self.upstream + request.path_qs, data=await request.read(),
            headers={k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")},
        ) as answer:
            body = await answer.read()
            headers = {"Date": answer.headers["Date"], "Content-Type": answer.headers.get("Content-Type", "application/json")}
            return web.Response(body=_as_stripe(body), status=answer.status, headers=headers)


def _as_stripe(body: bytes) -> bytes:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    objects = data.get("data") if isinstance(data, dict) and data.get("object") == "list" else [data]
    for obj in objects if isinstance(objects, list) else []:
        if isinstance(obj, dict) and obj.get("object") == "subscription" and obj.get("status") == "incomplete" and (obj.get("trial_end") or 0) > time.time():
            obj["status"] = "trialing"
    return orjson.dumps(data)


@contextlib.asynccontextmanager
async def stripe_proxy(upstream: str, **kw: Any) -> AsyncIterator[StripeProxy]:
    proxy = StripeProxy(upstream, **kw)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    proxy.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield proxy
    finally:
        await runner.cleanup()


FAST = Backoff(first_s=0.01, max_s=0.05, attempts=6)


@contextlib.asynccontextmanager
async def reader(url: str, backoff: Backoff = FAST) -> AsyncIterator[StripeReader]:
    r = StripeReader.connect(DEV_SECRET_KEY, url, backoff)
    try:
        yield r
    finally:
        await r.close()


@contextlib.asynccontextmanager
async def kafka_sink(broker: str) -> AsyncIterator[KafkaSink]:
    sink = KafkaSink(broker)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop()


class BeforeFirstPublish:
    """A sink that runs `first` (a live change) after the backfill read Stripe and before
    its first snapshot reaches the broker: the live webhook is applied before the older
    snapshot."""

    def __init__(self, sink: KafkaSink, first: Callable[[], Awaitable[None]]) -> None:
        self._sink, self._first = sink, first
        self.published: list[OutgoingMessage] = []

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        if not self.published:
            await self._first()
        self.published.extend(messages)
        await self._sink.publish(messages)


# --- helpers --------------------------------------------------------------------------


def webhook(client: stripe.StripeClient, event_type: str, subscription_id: str, created: int, **changes: Any) -> dict[str, Any]:
    """A Stripe event around the subscription as Stripe holds it now (with `changes`)."""
    found = client.v1.subscriptions.retrieve(subscription_id)
    assert found.last_response is not None
    obj = dict(found.last_response.data)  # type: ignore[arg-type]
    obj.update(changes)
    return {"id": random_id("evt_"), "object": "event", "type": event_type, "created": created,
            "api_version": "2024-06-20", "livemode": False, "data": {"object": obj}}


def row(url: str, query: str, *params: Any) -> Any:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchone()  # type: ignore[arg-type]


def rows_without(url: str, customer: Customer) -> dict[str, set[str]]:
    """Every row of the entitlements projection that does not mention `customer`."""
    with psycopg.connect(url) as conn:
        return {
            table: {
                text
                for (text,) in conn.execute(sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(table)))
                if not any(mark in text for mark in (customer.customer_id, str(customer.subscription_id), customer.user))
            }
            for table in TABLES
        }


SUB_ROW = "SELECT status, last_event_id, last_event_created FROM subscriptions WHERE subscription_id = %s"


async def post(ingester: Ingester, event: dict[str, Any]) -> None:
    status, answer = await ingester.post_event(event)
    assert (status, answer.get("status")) == (200, "published"), answer


async def expect_api_answers(stub: Any, fleet: Fleet, overrides: dict[str, str]) -> None:
    """Every customer: the subscription the API lists and its answer for a Basic feature."""
    for c in fleet.customers:
        subject = service_pb2.Subject(user_id=c.user)
        subs = await stub.ListSubscriptions(service_pb2.ListSubscriptionsRequest(subject=subject), metadata=auth(READ))
        check = await stub.CheckEntitlement(
            service_pb2.CheckEntitlementRequest(subject=subject, feature_code="export_pdf"), metadata=auth(READ)
        )
        state = overrides.get(c.customer_id, c.state)
        if c.subscription_id is None:
            assert list(subs.subscriptions) == [], c
            assert (check.allowed, check.reason) == (False, "no_entitlement"), (c, check)
            continue
        assert [(s.subscription_id, s.status, s.customer_id) for s in subs.subscriptions] == [
            (c.subscription_id, state, c.customer_id)
        ], c
        (sub,) = subs.subscriptions
        assert sub.plan_id == "basic" and sub.price_id == (YEARLY if c.state == "past_due" else MONTHLY), (c, sub)
        assert sub.current_period_end > sub.current_period_start > 0, (c, sub)
        granted = state in ("active", "trialing", "past_due")
        assert (check.allowed, check.plan_id) == (granted, "basic"), (c, check)
        if state == "past_due":
            assert check.access_level == "grace", (c, check)


# --- tests ----------------------------------------------------------------------------


async def test_a_backfill_of_a_few_hundred_customers_makes_the_api_answer_for_each_around_live_webhooks(
    fleet: Fleet, broker: str, topics: Topics, database_url: str, redis_url: str, redis_prefix: str,
    producer: AIOKafkaProducer,
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        apply_catalog(conn, CATALOG)
    client = fleet.client()
    subscribers = [c for c in fleet.customers if c.state == "active"]
    late, live = subscribers[0], subscribers[1]  # read before and changed after the backfill's read
    redis = Redis.from_url(redis_url)
    try:
        async with (
            entitlements_worker(broker, topics.payment_events, database_url, redis, redis_prefix) as progress,
            stripe_proxy(fleet.stripe.api_base, rate_limit_every=9) as proxy,
            kafka_sink(broker) as kafka,
            contextlib.asynccontextmanager(start_ingester)(broker, topics) as ingester,
            dunning_worker(broker, topics, database_url, producer),
        ):
            async def cancel_after_the_read() -> None:
                # The backfill read `live` as active; now it is canceled, and Stripe's
                # webhook for it is applied before the (older) snapshot arrives.
                await _in_thread(lambda: client.v1.subscriptions.cancel(live.subscription_id))  # type: ignore[arg-type]
                event = webhook(client, "customer.subscription.deleted", live.subscription_id, int(time.time()))  # type: ignore[arg-type]
                await post(ingester, event)
                await eventually(lambda: row(database_url, SUB_ROW, live.subscription_id), what="the live webhook applied")

            sink = BeforeFirstPublish(kafka, cancel_after_the_read)
            async with reader(proxy.url) as r:
                first = await backfill(r, sink, topics, Options(apply=True), now=int(time.time()))
            assert first.customers == len(fleet.customers) and first.finished
            assert first.retries >= proxy.throttled > 0, "the 429s were retried"
            assert first.events == len(sink.published)
            assert first.customers_without_state == MIX["none"]
            await progress.until_finished(first.events + 1, timeout=60)

            status, event_id, _ = row(database_url, SUB_ROW, live.subscription_id)
            assert (status, event_id.startswith("evt_")) == ("canceled", True), "the older snapshot did not overwrite"

            # A webhook created before the read, delivered late: older than the snapshot.
            _, snapshot_id, read_at = row(database_url, SUB_ROW, late.subscription_id)
            assert snapshot_id.startswith("backfill:")
            stale = webhook(client, "customer.subscription.updated", late.subscription_id,  # type: ignore[arg-type]
                            int(read_at.timestamp()) - 60, status="past_due")
            before = processed(database_url)
            await post(ingester, stale)
            await eventually(lambda: processed(database_url) == before + 1, what="the late webhook processed")
            assert row(database_url, SUB_ROW, late.subscription_id)[:2] == ("active", snapshot_id)

            async with api_server(database_url, redis_url, redis_prefix, broker, topics.payment_events) as (_, stub, _api):
                await expect_api_answers(stub, fleet, {live.customer_id: "canceled"})
                payments = await stub.GetPaymentsByCustomer(
                    service_pb2.GetPaymentsByCustomerRequest(customer_id=next(c for c in fleet.customers if c.state == "one_off").customer_id),
                    metadata=auth(READ),
                )
                assert [(p.amount, p.status) for p in payments.payments] == [(2500, "succeeded")]

            # The dunning worker read the same snapshots: each past_due subscription's failed
            # renewal (an open, attempted invoice) is an open case, as its webhook would have made.
            await dunning_until_processed(database_url, first.events + 2)
            with psycopg.connect(database_url) as conn:
                cases = conn.execute("SELECT subscription_id, state FROM dunning_cases").fetchall()
            assert sorted(cases) == sorted((c.subscription_id, "open") for c in fleet.customers if c.state == "past_due")

            # Again: only the subscription that changed in Stripe since the first read is
            # news; every other snapshot has the same id and is skipped by the inbox.
            others, done = rows_without(database_url, live), processed(database_url)
            async with reader(proxy.url) as r:
                second = await backfill(r, kafka, topics, Options(apply=True), now=int(time.time()))
            await progress.until_finished(first.events + 2 + second.events, timeout=60)
            moved = Counter({"customer.subscription.deleted": 1})
            assert second.by_type == first.by_type + moved - Counter({"customer.subscription.updated": 1})
            assert processed(database_url) == done + 1
            assert rows_without(database_url, live) == others
            assert row(database_url, SUB_ROW, live.subscription_id)[0] == "canceled"
    finally:
        await redis.aclose()


async def test_an_interrupted_backfill_resumes_after_its_checkpoint_and_publishes_the_rest(
    fleet: Fleet, broker: str, topics: Topics, tmp_path: Path
) -> None:
    checkpoint = Checkpoint(tmp_path / "backfill.checkpoint")
    options = Options(apply=True, page_size=25)
    async with reader(fleet.stripe.api_base) as r:
        everything = await backfill(r, None, topics, Options(page_size=25), now=int(time.time()))
    async with kafka_sink(broker) as kafka:
        # Stripe goes away part-way: the reads fail after 200 requests, past the retries.
        async with stripe_proxy(fleet.stripe.api_base, fail_after=200) as proxy, reader(proxy.url, Backoff(0.01, 0.02, 2)) as r:
            with pytest.raises(DependencyUnavailable, match="stripe"):
                await backfill(r, kafka, topics, options, checkpoint=checkpoint, now=int(time.time()))
        stopped_after = checkpoint.read()
        assert stopped_after is not None and stopped_after.startswith("cus_")
        # Stripe's list order (the fleet was made by several threads, in any order).
        listed = [c.id for c in fleet.client().v1.customers.list(params={"limit": 100}).auto_paging_iter()]
        done = listed.index(stopped_after) + 1
        assert 0 < done < len(fleet.customers) and done % 25 == 0

        async with reader(fleet.stripe.api_base) as r:
            rest = await backfill(r, kafka, topics, options, checkpoint=checkpoint, now=int(time.time()))
    assert rest.resumed_after == stopped_after and rest.customers == len(fleet.customers) - done
    assert not checkpoint.path.exists(), "a finished run starts over next time"
    records = await read_topic(broker, topics.payment_events, expect=everything.events)
    ids = {dict(r.headers)["event-id"].decode() for r in records}
    assert len(ids) == everything.events == sum(everything.by_type.values())
    assert all(i.startswith("backfill:") for i in ids)


async def test_a_dry_run_for_one_customer_reads_only_it_and_publishes_nothing(
    fleet: Fleet, broker: str, topics: Topics, tmp_path: Path
) -> None:
    one = next(c for c in fleet.customers if c.state == "past_due")
    async with stripe_proxy(fleet.stripe.api_base) as proxy, reader(proxy.url) as r:
        found = await backfill(
            r, None, topics, Options(customer_id=one.customer_id), checkpoint=Checkpoint(tmp_path / "cp"), now=int(time.time())
        )
    assert found.customers == 1
    assert found.by_type == Counter({"customer.subscription.updated": 1, "invoice.paid": 1, "invoice.payment_failed": 1,
                                     "charge.succeeded": 1, "charge.failed": 1})
    assert set(proxy.paths) == {f"/v1/customers/{one.customer_id}", "/v1/subscriptions", "/v1/invoices", "/v1/charges"}
    assert await read_topic(broker, topics.payment_events, expect=0) == []
    assert not (tmp_path / "cp").exists()
    assert found.lines(False, topics.payment_events)[-1].endswith("(dry run: nothing published; --apply publishes)")


async def _in_thread(call: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(call)


async def test_the_cli_publishes_one_customer_with_apply_and_refuses_an_unknown_one_in_one_line(
    fleet: Fleet, broker: str, topics: Topics, database_url: str
) -> None:
    env = Env(broker, topics, database_url, "redis://127.0.0.1:6379/0",
              {"STRIPE_SECRET_KEY": DEV_SECRET_KEY, "STRIPE_API_BASE": fleet.stripe.api_base})
    one = next(c for c in fleet.customers if c.state == "active")
    found = await asyncio.to_thread(run, env, "backfill", "--customer", one.customer_id)
    assert (found.returncode, "Traceback" in found.stderr) == (0, False), found.stderr
    counts = "charge.succeeded 1, customer.subscription.updated 1, invoice.paid 1"
    assert found.stdout.splitlines() == [
        f"read 1 customer(s), 0 with nothing to publish; snapshots: {counts}",
        f"would publish 3 snapshot event(s) to {topics.payment_events} (dry run: nothing published; --apply publishes)",
    ]
    assert "backfill: customers" in found.stderr  # the progress, on stderr
    applied = await asyncio.to_thread(run, env, "backfill", "--customer", one.customer_id, "--apply")
    assert applied.stdout.splitlines()[-1] == f"published 3 snapshot event(s) to {topics.payment_events}", applied.stderr
    records = await read_topic(broker, topics.payment_events, expect=3)
    assert sorted(dict(r.headers)["event-type"].decode() for r in records) == sorted(counts.replace(" 1", "").split(", "))
    assert {r.key for r in records} == {one.customer_id.encode()}
    missing = await asyncio.to_thread(run, env, "backfill", "--customer", "cus_doesnotexist")
    # The progress line is erased (ANSI) just before the error is printed.
    assert missing.returncode == 2 and last_line(missing.stderr).endswith("error: --customer cus_doesnotexist: no such customer in Stripe")


async def test_a_customer_deleted_after_it_was_listed_has_nothing_to_publish(fleet: Fleet) -> None:
    client = fleet.client()
    gone = await asyncio.to_thread(lambda: client.v1.customers.create(params={"metadata": {"user_id": random_id("user_")}}))
    await asyncio.to_thread(client.v1.customers.delete, gone.id)
    async with reader(fleet.stripe.api_base) as r:
        for kind in ("subscription", "invoice", "charge"):
            assert (await r.objects(kind, gone.id, None, 10)).objects == []
