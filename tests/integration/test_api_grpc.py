"""The gRPC API on a real in-process server (port 0), the real Postgres and Redis, with
data projected by the real entitlements worker from events on the real broker.

Stripe: PaymentIntents go through the stripe SDK to localstripe. localstripe has no
Checkout Sessions, so CreateCheckoutSession is tested against an aiohttp stub of
POST /v1/checkout/sessions that records the form fields the SDK sent.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr
from redis.asyncio import Redis

from payment.v1 import events_pb2, service_pb2, service_pb2_grpc
from services.api_grpc import cache, page_tokens, stripe_gateway
from services.api_grpc.commands import KafkaEventBus
from services.api_grpc.decisions import Facts
from services.api_grpc.queries import Queries
from services.api_grpc.server import RateLimitConfig, Server, build_server
from services.api_grpc.service import PaymentApi
from shared.breaker import Breaker
from shared.catalog import apply_catalog
from shared.config import ApiKey, Topics
from shared.db import make_pool
from shared.devbroker import ensure_topics
from shared.devstripe import DEV_SECRET_KEY, LocalStripe
from shared.errors import DependencyUnavailable
from shared.kafka import make_producer
from tests.conftest import REDIS_URL, fresh_database, random_id
from tests.integration.test_entitlements_projection import Ids, event, story, sub_event
from tests.integration.test_entitlements_worker import (
    CATALOG,
    entitlements_worker,
    publish,
    until_processed,
)
from tests.kafka_helpers import headers_of, read_topic
from tests.support.clock import Clock
from tests.support.net import counting_http, refusing_port
from tests.support.private_postgres import PrivatePostgres
from tests.support.processes import PrivateRedis
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
DAY = 86_400
READ, WRITE, ADMIN = "k-read-" + secrets.token_hex(4), "k-write-" + secrets.token_hex(4), "k-admin-" + secrets.token_hex(4)
KEYS = (
    ApiKey("reader", SecretStr(READ), frozenset({"read"})),
    ApiKey("writer", SecretStr(WRITE), frozenset({"read", "write"})),
    ApiKey("admin", SecretStr(ADMIN), frozenset({"admin"})),
)
Code = grpc.StatusCode


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@dataclass
class Stack:
    database_url: str
    topics: Topics
    redis_url: str
    prefix: str
    broker: str
    live: Ids      # a family on pro, active until next month
    old: Ids       # the shared story: its pro access expired (cancel at period end, 2026-01)
    stripe_base: str


@pytest.fixture(scope="module")
async def stack(broker: str, template_database: str) -> AsyncIterator[Stack]:
    """One database and topic set for the module, filled by the real worker, which keeps
    running so that the events the API publishes are applied too."""
    topics = Topics(prefix=f"t{secrets.token_hex(4)}.")
    await ensure_topics(broker, topics.all(), partitions=3)
    prefix = f"test:{secrets.token_hex(6)}:"
    now = int(time.time())
    live, old = Ids(), Ids()
    events = story(old) + [
        sub_event(live, "created", now - 60, status="active", price_id="price_pro_monthly",
                  period_start=now - 60, period_end=now + 30 * DAY),
        event(live, "checkout.session.completed", now - 30, user_id=live.user, family_id=live.family,
              subscription_id=live.sub),
    ]
    redis_url = REDIS_URL
    redis = Redis.from_url(redis_url)
    with contextlib.ExitStack() as exits:
        url = exits.enter_context(fresh_database(template_database))
        with psycopg.connect(url, autocommit=True) as conn:
            apply_catalog(conn, CATALOG)
        stripe = LocalStripe()
        stripe.start()
        exits.callback(stripe.stop)
        async with entitlements_worker(broker, topics.payment_events, url, redis, prefix) as progress:
            producer = make_producer(broker)
            await producer.start()
            await publish(producer, topics.payment_events, events)
            await producer.stop()
            await until_processed(url, len(events))
            await progress.until_finished(len(events))  # Redis is written after the commit
            yield Stack(url, topics, redis_url, prefix, broker, live, old, stripe.api_base)
        keys = [k async for k in redis.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


@contextlib.asynccontextmanager
async def api_server(
    database_url: str,
    redis_url: str,
    prefix: str,
    broker: str,
    topic: str,
    *,
    stripe_base: str | None = None,
    stripe_breaker: Breaker | None = None,
    rate: RateLimitConfig | None = None,
    pool_timeout: float = 1.0,
) -> AsyncIterator[tuple[Server, service_pb2_grpc.PaymentServiceStub, PaymentApi]]:
    pool = make_pool(database_url, max_size=4)
    await pool.open(wait=True, timeout=10)
    redis = Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=0.5)
    producer = make_producer(broker)
    await producer.start()
    redis_breaker = Breaker("redis", cache.is_transient, threshold=3, reset_after_s=0.5)
    gateway = None
    if stripe_base is not None:
        gateway = stripe_gateway.StripeGateway(
            stripe_gateway.make_client(DEV_SECRET_KEY, stripe_base),
            stripe_breaker or Breaker("stripe", stripe_gateway.is_transient, threshold=3, reset_after_s=1),
        )
    api = PaymentApi(
        Facts.of(CATALOG), Queries(pool, pool_timeout), cache.EntitlementCache(redis, redis_breaker, prefix),
        KafkaEventBus(producer, topic), gateway, page_tokens.PageTokens(page_tokens.derive_key("test")),
    )
    server = build_server(
        api, KEYS, port=0, redis=redis, redis_breaker=redis_breaker,
        rate_limit=rate or RateLimitConfig(rate=10_000, burst=10_000, prefix=prefix),
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, service_pb2_grpc.PaymentServiceStub(channel), api
    finally:
        await channel.close()
        await server.stop(0.5)
        if gateway is not None:
            await gateway.close()
        await producer.stop()
        await redis.aclose()
        await pool.close()


@pytest.fixture(scope="module")
async def served(stack: Stack) -> AsyncIterator[tuple[Server, service_pb2_grpc.PaymentServiceStub, PaymentApi]]:
    async with api_server(
        stack.database_url, stack.redis_url, stack.prefix, stack.broker, stack.topics.payment_events,
        stripe_base=stack.stripe_base,
    ) as s:
        yield s


@pytest.fixture
def stub(served: tuple[Server, service_pb2_grpc.PaymentServiceStub, PaymentApi]) -> service_pb2_grpc.PaymentServiceStub:
    return served[1]


async def expect_code(call: Any, code: grpc.StatusCode, contains: str = "") -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert contains in (info.value.details() or "")
    return info.value


def subject(ids: Ids, user: bool = False) -> service_pb2.Subject:
    return service_pb2.Subject(user_id=ids.user if user else "", family_id=ids.family)


# ---------------------------------------------------------------- entitlements


async def test_check_entitlement_grants_a_live_pro_feature_with_why_and_freshness(stub, stack: Stack) -> None:
    answer = await stub.CheckEntitlement(
        service_pb2.CheckEntitlementRequest(subject=subject(stack.live, user=True), feature_code="priority_support"),
        metadata=auth(READ),
    )
    assert (answer.allowed, answer.reason, answer.plan_id, answer.status) == (True, "granted", "pro", "active")
    assert answer.access_level == "full" and answer.decided_by_event_id.startswith("evt_")
    assert answer.expires_at > time.time()
    assert answer.freshness.watermark > 0 and answer.freshness.watermark_event_id
    assert answer.freshness.lag_ms >= 0


async def test_an_expired_subscription_falls_back_to_the_free_plan_or_is_denied(stub, stack: Stack) -> None:
    free = await stub.CheckEntitlement(
        service_pb2.CheckEntitlementRequest(subject=subject(stack.old), feature_code="projects"), metadata=auth(READ)
    )
    assert (free.allowed, free.reason, free.plan_id, free.usage_limit) == (True, "free_plan", "free", 3)
    paid_only = await stub.CheckEntitlement(
        service_pb2.CheckEntitlementRequest(subject=subject(stack.old), feature_code="priority_support"),
        metadata=auth(READ),
    )
    assert (paid_only.allowed, paid_only.reason, paid_only.plan_id) == (False, "expired", "pro")


async def test_every_answer_explains_itself_and_as_of_answers_a_past_moment_with_its_events(
    stub, stack: Stack
) -> None:
    def ask(feature: str, as_of: int | None = None) -> service_pb2.CheckEntitlementRequest:
        request = service_pb2.CheckEntitlementRequest(subject=subject(stack.live, user=True), feature_code=feature)
        if as_of is not None:
            request.as_of = as_of
        return request

    now = await stub.CheckEntitlement(ask("priority_support"), metadata=auth(READ))
    e = now.explanation
    assert (e.rule, e.plan_id, e.source, e.deciding_event_id, e.clock) == (
        "active: full", "pro", f"subscription:{stack.live.sub}", now.decided_by_event_id, "")
    assert e.plan_version.startswith("sha256:") and now.as_of == 0 and not now.evidence_event_ids
    then = await stub.CheckEntitlement(ask("priority_support", int(time.time()) - 1), metadata=auth(READ))
    assert (then.allowed, then.reason, then.plan_id, then.access_level, then.decided_by_event_id) == (
        now.allowed, now.reason, now.plan_id, now.access_level, now.decided_by_event_id)
    assert then.explanation == now.explanation and then.expires_at == now.expires_at
    assert list(then.evidence_event_ids) == [now.decided_by_event_id]  # the subscription's one event
    before = await stub.CheckEntitlement(ask("projects", int(time.time()) - 3600), metadata=auth(READ))
    assert (before.reason, before.plan_id, before.explanation.rule, list(before.evidence_event_ids)) == (
        "free_plan", "free", "default_plan: free", [])
    await expect_code(stub.CheckEntitlement(ask("projects", int(time.time()) + 3600), metadata=auth(READ)),
                      Code.INVALID_ARGUMENT, "as_of")


async def test_list_access_changes_pages_a_subjects_changes_over_a_time_range(stub, stack: Stack) -> None:
    def page(token: str = "", since: int = 0, until: int = 0) -> Any:
        return stub.ListAccessChanges(
            service_pb2.ListAccessChangesRequest(subject=subject(stack.old), since=since, until=until, page_size=1,
                                                 page_token=token), metadata=auth(READ))

    changes, token = [], ""
    while True:
        answer = await page(token)
        changes += answer.changes
        token = answer.next_page_token
        if not token:
            break
    assert len(changes) >= 3 and changes[0].from_level == "blocked"
    assert [c.changed_at for c in changes] == sorted(c.changed_at for c in changes)
    assert all(c.subscription_id == stack.old.sub and c.event_id.startswith("evt_") for c in changes)
    assert all(a.to_level == b.from_level for a, b in zip(changes, changes[1:], strict=False))
    later = await page(since=changes[1].changed_at)
    assert later.changes[0] == changes[1]
    await expect_code(page(since=10, until=5), Code.INVALID_ARGUMENT, "since")


async def test_a_subject_without_rows_gets_the_free_plan_and_a_cache_fill(stub, stack: Stack) -> None:
    family = random_id("family_")
    request = service_pb2.CheckEntitlementRequest(subject=service_pb2.Subject(family_id=family), feature_code="api_calls")
    answer = await stub.CheckEntitlement(request, metadata=auth(READ))
    assert (answer.allowed, answer.reason, answer.usage_limit, answer.limit_period) == (True, "free_plan", 1000, "month")
    redis = Redis.from_url(stack.redis_url)
    try:
        assert await redis.exists(f"{stack.prefix}ent:family:{family}") == 1
    finally:
        await redis.aclose()
    denied = await stub.CheckEntitlement(
        service_pb2.CheckEntitlementRequest(subject=service_pb2.Subject(family_id=family), feature_code="seats"),
        metadata=auth(READ),
    )
    assert (denied.allowed, denied.reason) == (False, "no_entitlement")


async def test_a_postgres_fill_never_overwrites_a_fresher_worker_hash(served, stack: Stack) -> None:
    _, _, api = served
    family = random_id("family_")
    assert api.cache is not None
    key = api.cache.key(("family", family))
    await api.cache.client.hset(key, mapping={"_watermark": b'{"created":9,"event_id":"evt_w"}', "x": b"{}"})
    await api.cache.fill({("family", family): {"_watermark": b'{"created":0,"event_id":""}'}}, 1.0)
    assert await api.cache.client.hget(key, "_watermark") == b'{"created":9,"event_id":"evt_w"}'
    await api.cache.client.delete(key)


async def test_bulk_check_answers_subjects_times_features_in_request_order(stub, stack: Stack) -> None:
    features = ["priority_support", "projects", "seats"]
    answer = await stub.BulkCheckEntitlements(
        service_pb2.BulkCheckEntitlementsRequest(subjects=[subject(stack.live), subject(stack.old)], feature_codes=features),
        metadata=auth(READ),
    )
    got = [(r.subject.family_id, r.feature_code, r.allowed, r.reason) for r in answer.results]
    assert got == [
        (stack.live.family, "priority_support", True, "granted"),
        (stack.live.family, "projects", True, "granted"),
        (stack.live.family, "seats", True, "granted"),
        (stack.old.family, "priority_support", False, "expired"),
        (stack.old.family, "projects", True, "free_plan"),
        (stack.old.family, "seats", False, "expired"),
    ]
    assert answer.freshness.watermark > 0


async def test_list_entitlements_pages_with_tokens(stub, stack: Stack) -> None:
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListEntitlements(
            service_pb2.ListEntitlementsRequest(subject=subject(stack.live), page_size=2, page_token=token),
            metadata=auth(READ),
        )
        seen += [e.feature_code for e in page.entitlements]
        assert page.freshness.watermark > 0
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(CATALOG.plans["pro"].features) and len(seen) == len(set(seen))


async def test_list_subscriptions_by_user_or_family(stub, stack: Stack) -> None:
    by_family = await stub.ListSubscriptions(
        service_pb2.ListSubscriptionsRequest(subject=subject(stack.live)), metadata=auth(READ)
    )
    by_user = await stub.ListSubscriptions(
        service_pb2.ListSubscriptionsRequest(subject=service_pb2.Subject(user_id=stack.live.user)), metadata=auth(READ)
    )
    assert [s.subscription_id for s in by_family.subscriptions] == [stack.live.sub]
    assert [s.subscription_id for s in by_user.subscriptions] == [stack.live.sub]
    assert by_family.subscriptions[0].plan_id == "pro" and by_family.subscriptions[0].status == "active"


# ---------------------------------------------------------------- payments


async def test_get_payment_and_lists_with_filters_and_pages(stub, stack: Stack) -> None:
    got = await stub.GetPayment(service_pb2.GetPaymentRequest(payment_id=stack.old.intent), metadata=auth(READ))
    assert (got.payment.payment_id, got.payment.amount, got.payment.customer_id) == (stack.old.intent, 1900, stack.old.customer)
    assert got.freshness.watermark > 0
    first = await stub.GetPaymentsByCustomer(
        service_pb2.GetPaymentsByCustomerRequest(customer_id=stack.old.customer, page_size=1), metadata=auth(READ)
    )
    assert len(first.payments) == 1 and first.next_page_token
    second = await stub.GetPaymentsByCustomer(
        service_pb2.GetPaymentsByCustomerRequest(customer_id=stack.old.customer, page_size=1, page_token=first.next_page_token),
        metadata=auth(READ),
    )
    ids = {first.payments[0].payment_id, second.payments[0].payment_id}
    # The story has two payments: the subscription's, and a one-time purchase.
    assert stack.old.intent in ids and len(ids) == 2 and not second.next_page_token
    refunded = await stub.ListPayments(
        service_pb2.ListPaymentsRequest(customer_id=stack.old.customer, status="partially_refunded"), metadata=auth(READ)
    )
    assert [p.payment_id for p in refunded.payments] == [stack.old.intent]
    window = await stub.ListPayments(
        service_pb2.ListPaymentsRequest(subject=subject(stack.old), created_before=1), metadata=auth(READ)
    )
    assert list(window.payments) == []


async def test_get_payment_of_an_unknown_id_is_not_found(stub) -> None:
    await expect_code(stub.GetPayment(service_pb2.GetPaymentRequest(payment_id="pi_nope"), metadata=auth(READ)), Code.NOT_FOUND)


async def test_create_payment_goes_through_stripe_and_publishes_payment_created(stub, stack: Stack) -> None:
    key = random_id("idem_")
    request = service_pb2.CreatePaymentRequest(
        subject=subject(stack.live, user=True), amount=2500, currency="usd", idempotency_key=key,
        metadata={"order": "o-1"},  # no description: localstripe rejects the parameter
    )
    created = await stub.CreatePayment(request, metadata=auth(WRITE) + (("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"),))
    assert created.payment.status == "pending" and created.payment.payment_id.startswith("pi_")
    assert created.client_secret and created.payment.customer_id.startswith("cus_")
    records = await read_topic(stack.broker, stack.topics.payment_events, expect=1, timeout=10)
    ours = [r for r in records if headers_of(r).get("event-type") == "payment.created"]
    assert len(ours) == 1
    sent = events_pb2.PaymentEvent.FromString(ours[0].value)
    headers = headers_of(ours[0])
    assert headers["event-id"] == sent.event_id and headers["schema-version"] == "1"
    assert headers["content-type"].startswith("application/x-protobuf") and headers["traceparent"].startswith("00-" + "a" * 32)
    assert ours[0].key == sent.customer_id.encode()
    assert (sent.source, sent.payment_intent_id, sent.amount, sent.status) == (
        events_pb2.EVENT_SOURCE_API, created.payment.payment_id, 2500, "pending")
    assert sent.actor == "writer" and sent.user_id == stack.live.user
    # The worker applies it: the pending payment becomes readable.
    async def readable() -> service_pb2.GetPaymentResponse | None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            return await stub.GetPayment(service_pb2.GetPaymentRequest(payment_id=sent.payment_intent_id), metadata=auth(READ))
        return None

    got = await eventually(readable, timeout=30, what="the worker applying payment.created")
    assert got.payment.status == "pending"


async def test_update_payment_status_publishes_an_event_applied_by_the_worker(stub, stack: Stack) -> None:
    answer = await stub.UpdatePaymentStatus(
        service_pb2.UpdatePaymentStatusRequest(payment_id=stack.old.intent, status="disputed", reason="chargeback", idempotency_key=random_id()),
        metadata=auth(ADMIN),
    )
    assert answer.event_id.startswith("api_")

    async def disputed() -> service_pb2.GetPaymentResponse | None:
        got = await stub.GetPayment(service_pb2.GetPaymentRequest(payment_id=stack.old.intent), metadata=auth(READ))
        return got if got.payment.status == "disputed" else None

    got = await eventually(disputed, timeout=30, what="the worker applying payment.status_updated")
    assert got.payment.last_event_id == answer.event_id


async def test_update_payment_status_of_an_unknown_payment_is_not_found(stub) -> None:
    await expect_code(
        stub.UpdatePaymentStatus(service_pb2.UpdatePaymentStatusRequest(payment_id="pi_nope", status="failed"), metadata=auth(ADMIN)),
        Code.NOT_FOUND,
    )


@contextlib.asynccontextmanager
async def checkout_stub() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An HTTP stub of POST /v1/checkout/sessions (localstripe has no Checkout Sessions)."""
    seen: list[dict[str, str]] = []

    async def create(request: web.Request) -> web.Response:
        seen.append({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        return web.json_response({"id": "cs_test_1", "object": "checkout.session", "url": "https://checkout.test/cs_test_1"})

    app = web.Application()
    app.router.add_post("/v1/checkout/sessions", create)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


async def test_create_checkout_session_sends_plan_price_and_identity_to_stripe(stack: Stack) -> None:
    async with checkout_stub() as (base, seen), api_server(
        stack.database_url, stack.redis_url, stack.prefix, stack.broker, stack.topics.payment_events, stripe_base=base
    ) as (_, stub, _api):
        answer = await stub.CreateCheckoutSession(
            service_pb2.CreateCheckoutSessionRequest(
                subject=subject(stack.live, user=True), plan_id="basic",
                success_url="https://app.test/ok", cancel_url="https://app.test/no", idempotency_key=random_id(),
            ),
            metadata=auth(WRITE),
        )
    assert (answer.session_id, answer.url) == ("cs_test_1", "https://checkout.test/cs_test_1")
    form = seen[0]
    assert form["mode"] == "subscription" and form["line_items[0][price]"] == "price_basic_monthly"
    assert form["client_reference_id"] == stack.live.user
    assert form["metadata[user_id]"] == stack.live.user and form["metadata[family_id]"] == stack.live.family
    assert form["metadata[plan_id]"] == "basic" and form["subscription_data[metadata][family_id]"] == stack.live.family
    assert form["success_url"] == "https://app.test/ok" and form["cancel_url"] == "https://app.test/no"


# ---------------------------------------------------------------- bad arguments, auth


BAD_ARGUMENTS = [
    ("CheckEntitlement", service_pb2.CheckEntitlementRequest(feature_code="projects"), "user_id or a family_id"),
    ("CheckEntitlement", service_pb2.CheckEntitlementRequest(subject=service_pb2.Subject(user_id="u"), feature_code=""), "feature_code is required"),
    ("CheckEntitlement", service_pb2.CheckEntitlementRequest(subject=service_pb2.Subject(user_id="u"), feature_code="teleport"), "unknown feature_code"),
    ("BulkCheckEntitlements", service_pb2.BulkCheckEntitlementsRequest(feature_codes=["projects"]), "subjects must hold"),
    ("BulkCheckEntitlements", service_pb2.BulkCheckEntitlementsRequest(subjects=[service_pb2.Subject(user_id="u")]), "feature_codes must hold"),
    ("BulkCheckEntitlements", service_pb2.BulkCheckEntitlementsRequest(subjects=[service_pb2.Subject(user_id="u")] * 101, feature_codes=["projects"]), "subjects must hold"),
    ("ListEntitlements", service_pb2.ListEntitlementsRequest(subject=service_pb2.Subject(user_id="u"), page_size=501), "page_size"),
    ("ListEntitlements", service_pb2.ListEntitlementsRequest(subject=service_pb2.Subject(user_id="u"), page_token="garbage"), "page_token"),
    ("ListSubscriptions", service_pb2.ListSubscriptionsRequest(page_size=10), "user_id or a family_id"),
    ("ListSubscriptions", service_pb2.ListSubscriptionsRequest(subject=service_pb2.Subject(user_id="u"), page_size=-1), "page_size"),
    ("GetPayment", service_pb2.GetPaymentRequest(payment_id=""), "payment_id is required"),
    ("GetPaymentsByCustomer", service_pb2.GetPaymentsByCustomerRequest(customer_id=""), "customer_id is required"),
    ("ListPayments", service_pb2.ListPaymentsRequest(status="lost"), "status 'lost'"),
    ("ListPayments", service_pb2.ListPaymentsRequest(created_after=10, created_before=5), "created_after"),
    ("ListPayments", service_pb2.ListPaymentsRequest(page_token="x.y"), "page_token"),
]


@pytest.mark.parametrize(("method", "request_", "message"), BAD_ARGUMENTS)
async def test_bad_read_arguments_are_invalid_argument(stub, method: str, request_: Any, message: str) -> None:
    await expect_code(getattr(stub, method)(request_, metadata=auth(READ)), Code.INVALID_ARGUMENT, message)


BAD_WRITES = [
    ("CreatePayment", service_pb2.CreatePaymentRequest(amount=100, currency="usd"), "idempotency_key is required"),
    ("CreatePayment", service_pb2.CreatePaymentRequest(amount=0, currency="usd", idempotency_key="k"), "amount"),
    ("CreatePayment", service_pb2.CreatePaymentRequest(amount=100, currency="USD", idempotency_key="k"), "currency"),
    ("CreateCheckoutSession", service_pb2.CreateCheckoutSessionRequest(subject=service_pb2.Subject(user_id="u"), plan_id="free", success_url="https://a", cancel_url="https://b"), "free"),
    ("CreateCheckoutSession", service_pb2.CreateCheckoutSessionRequest(subject=service_pb2.Subject(user_id="u"), plan_id="gold", success_url="https://a", cancel_url="https://b"), "unknown plan_id"),
    ("CreateCheckoutSession", service_pb2.CreateCheckoutSessionRequest(subject=service_pb2.Subject(user_id="u"), plan_id="pro", cancel_url="https://b"), "success_url"),
]


@pytest.mark.parametrize(("method", "request_", "message"), BAD_WRITES)
async def test_bad_write_arguments_are_invalid_argument(stub, method: str, request_: Any, message: str) -> None:
    await expect_code(getattr(stub, method)(request_, metadata=auth(WRITE)), Code.INVALID_ARGUMENT, message)


async def test_bad_status_update_is_invalid_argument(stub) -> None:
    await expect_code(
        stub.UpdatePaymentStatus(service_pb2.UpdatePaymentStatusRequest(payment_id="pi_1", status="teleported"), metadata=auth(ADMIN)),
        Code.INVALID_ARGUMENT, "status 'teleported'",
    )


async def test_auth_missing_unknown_and_wrong_scope(stub) -> None:
    request = service_pb2.GetPaymentRequest(payment_id="pi_x")
    await expect_code(stub.GetPayment(request), Code.UNAUTHENTICATED, "missing API key")
    await expect_code(stub.GetPayment(request, metadata=auth("nope")), Code.UNAUTHENTICATED, "unknown API key")
    await expect_code(stub.GetPayment(request, metadata=(("authorization", "Basic x"),)), Code.UNAUTHENTICATED)
    await expect_code(stub.GetPayment(request, metadata=auth(ADMIN)), Code.PERMISSION_DENIED, "'read'")
    await expect_code(
        stub.CreatePayment(service_pb2.CreatePaymentRequest(), metadata=auth(READ)), Code.PERMISSION_DENIED, "'write'"
    )
    await expect_code(
        stub.UpdatePaymentStatus(service_pb2.UpdatePaymentStatusRequest(), metadata=auth(WRITE)), Code.PERMISSION_DENIED, "'admin'"
    )


async def test_usage_rpcs_are_unimplemented_with_a_clear_message(stub) -> None:
    await expect_code(stub.CheckQuota(service_pb2.CheckQuotaRequest(), metadata=auth(READ)), Code.UNIMPLEMENTED, "issue 6")
    await expect_code(stub.IncrementUsage(service_pb2.IncrementUsageRequest(), metadata=auth(WRITE)), Code.UNIMPLEMENTED, "issue 6")
    await expect_code(stub.ListUsage(service_pb2.ListUsageRequest(), metadata=auth(READ)), Code.UNIMPLEMENTED, "issue 6")


async def test_an_expired_deadline_is_deadline_exceeded(stub, stack: Stack) -> None:
    request = service_pb2.ListPaymentsRequest(customer_id=stack.old.customer)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListPayments(request, metadata=auth(READ), timeout=0.0001)
    assert info.value.code() == Code.DEADLINE_EXCEEDED


async def test_health_and_reflection_need_no_key(served) -> None:
    server = served[0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "payment.v1.PaymentService"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        async for response in responses:
            names = {s.name for s in response.list_services_response.service}
            assert "payment.v1.PaymentService" in names
            break


# ---------------------------------------------------------------- degraded mode, breakers, rate limit


@contextlib.contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of our own. The port is free when picked but may be taken before
    redis-server binds it (other tests run beside us): then it exits, and we start
    another on a new port."""
    for _ in range(5):
        server = PrivateRedis()
        try:
            server.start()
            break
        except DependencyUnavailable:
            server.destroy()
    else:
        raise RuntimeError("redis-server did not start on any of 5 free ports")
    try:
        yield server
    finally:
        server.destroy()


async def test_with_redis_stopped_mid_test_reads_answer_from_postgres(stack: Stack) -> None:
    with private_redis() as redis_server:
        async with api_server(stack.database_url, redis_server.url, stack.prefix, stack.broker, stack.topics.payment_events) as (_, stub, _api):
            request = service_pb2.CheckEntitlementRequest(subject=subject(stack.live), feature_code="seats")
            before = await stub.CheckEntitlement(request, metadata=auth(READ))
            redis_server.stop()
            for _ in range(5):  # through the failures that open the breaker, and after
                after = await stub.CheckEntitlement(request, metadata=auth(READ))
                assert (after.allowed, after.reason, after.decided_by_event_id) == (True, "granted", before.decided_by_event_id)
            bulk = await stub.BulkCheckEntitlements(
                service_pb2.BulkCheckEntitlementsRequest(subjects=[subject(stack.old)], feature_codes=["projects"]), metadata=auth(READ)
            )
            assert bulk.results[0].reason == "free_plan"
            listed = await stub.ListSubscriptions(service_pb2.ListSubscriptionsRequest(subject=subject(stack.live)), metadata=auth(READ))
            assert len(listed.subscriptions) == 1


async def test_with_postgres_stopped_checks_answer_from_redis_and_other_reads_are_unavailable(stack: Stack) -> None:
    pg = PrivatePostgres().init()
    pg.start()
    try:
        async with api_server(pg.url, stack.redis_url, stack.prefix, stack.broker, stack.topics.payment_events) as (_, stub, api):
            pg.stop()
            answer = await stub.CheckEntitlement(
                service_pb2.CheckEntitlementRequest(subject=subject(stack.live), feature_code="seats"), metadata=auth(READ), timeout=5
            )
            assert (answer.allowed, answer.reason) == (True, "granted")
            assert answer.freshness.watermark > 0  # the hash's own watermark
            await expect_code(
                stub.GetPayment(service_pb2.GetPaymentRequest(payment_id="pi_x"), metadata=auth(READ), timeout=5),
                Code.UNAVAILABLE,
            )
    finally:
        pg.destroy()


async def test_stripe_failing_opens_the_breaker_which_half_opens_and_closes_on_success(stack: Stack) -> None:
    clock = Clock()
    breaker = Breaker("stripe", stripe_gateway.is_transient, threshold=2, reset_after_s=30, clock=clock)
    request = service_pb2.CreatePaymentRequest(
        subject=subject(stack.live, user=True), customer_id="cus_x", amount=100, currency="usd", idempotency_key=random_id()
    )
    with refusing_port() as down:
        async with api_server(
            stack.database_url, stack.redis_url, stack.prefix, stack.broker, stack.topics.payment_events,
            stripe_base=f"http://127.0.0.1:{down}", stripe_breaker=breaker,
        ) as (_, stub, api), counting_http(status=200) as peer:
            for _ in range(2):
                await expect_code(stub.CreatePayment(request, metadata=auth(WRITE)), Code.UNAVAILABLE, "Stripe is unavailable")
            assert breaker.state == "opened"
            # Open: a Stripe that answers again is not even asked until the cool-down is over.
            assert api.stripe is not None
            api.stripe = stripe_gateway.StripeGateway(stripe_gateway.make_client(DEV_SECRET_KEY, peer.url), breaker)
            clock.advance(29)
            for _ in range(3):
                await expect_code(stub.CreatePayment(request, metadata=auth(WRITE)), Code.UNAVAILABLE, "circuit open")
            assert peer.requests == 0
            await api.stripe.close()
            # Stripe is back and the cool-down over: the next call is a trial that closes it.
            api.stripe = stripe_gateway.StripeGateway(stripe_gateway.make_client(DEV_SECRET_KEY, stack.stripe_base), breaker)
            clock.advance(1)
            assert breaker.state == "half-opened"
            created = await stub.CreatePayment(
                service_pb2.CreatePaymentRequest(subject=subject(stack.live, user=True), amount=100, currency="usd", idempotency_key=random_id()),
                metadata=auth(WRITE),
            )
            assert created.payment.status == "pending"
            assert breaker.state == "closed"
            await api.stripe.close()


async def test_a_client_over_its_rate_is_resource_exhausted_with_retry_after(stack: Stack) -> None:
    prefix = f"{stack.prefix}rl{secrets.token_hex(3)}:"
    async with api_server(
        stack.database_url, stack.redis_url, stack.prefix, stack.broker, stack.topics.payment_events,
        rate=RateLimitConfig(rate=1, burst=3, prefix=prefix),
    ) as (_, stub, _api):
        request = service_pb2.CheckEntitlementRequest(subject=subject(stack.live), feature_code="seats")
        for _ in range(3):
            await stub.CheckEntitlement(request, metadata=auth(READ))
        error = await expect_code(stub.CheckEntitlement(request, metadata=auth(READ)), Code.RESOURCE_EXHAUSTED, "rate limit")
        trailers = dict(error.trailing_metadata() or ())
        assert int(trailers["retry-after"]) >= 1
        # Another key has its own bucket.
        await stub.CheckEntitlement(request, metadata=auth(WRITE))


async def test_a_key_with_its_own_limit_is_held_to_it_while_the_others_keep_the_default(stack: Stack) -> None:
    prefix = f"{stack.prefix}rl{secrets.token_hex(3)}:"
    async with api_server(
        stack.database_url, stack.redis_url, stack.prefix, stack.broker, stack.topics.payment_events,
        rate=RateLimitConfig(rate=10_000, burst=10_000, prefix=prefix, per_key=(("reader", 1, 2),)),
    ) as (_, stub, _api):
        request = service_pb2.CheckEntitlementRequest(subject=subject(stack.live), feature_code="seats")
        for _ in range(2):
            await stub.CheckEntitlement(request, metadata=auth(READ))
        error = await expect_code(stub.CheckEntitlement(request, metadata=auth(READ)), Code.RESOURCE_EXHAUSTED, "1/s")
        assert int(dict(error.trailing_metadata() or ())["retry-after"]) >= 1
        for _ in range(10):  # the default is far away for the other keys
            await stub.CheckEntitlement(request, metadata=auth(WRITE))
