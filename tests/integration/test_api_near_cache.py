"""The near cache on a running API server, kept current by the real entitlements
worker's change feed. Asserted: what the near cache promises, counted by its metric
(paymentsvc_api_near_cache_reads_total), never the state between two steps of a race:
- a repeated check while no change arrived is a hit, until the maximum age (the near
  cache's clock is a fake one here, so only the test moves it);
- a change made through the worker evicts the entry (seen within a polled bound, with
  the clock standing still: only the feed can explain it);
- while the feed's subscription is broken every check bypasses the near cache, and it
  is used again once the feed is back by itself."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable

import grpc
import psycopg
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr
from redis.asyncio import Redis

from payment.v1 import service_pb2, service_pb2_grpc
from services.api_grpc import cache, near_cache, page_tokens
from services.api_grpc.decisions import Facts
from services.api_grpc.near_cache import NearCache
from services.api_grpc.queries import Queries
from services.api_grpc.server import build_server
from services.api_grpc.service import PaymentApi
from shared.breaker import Breaker
from shared.catalog import apply_catalog
from shared.config import ApiKey, Topics
from shared.db import make_pool
from shared.devbroker import ensure_topics
from shared.kafka import make_producer
from tests.conftest import REDIS_URL, fresh_database
from tests.integration.test_entitlements_projection import Ids, event, sub_event
from tests.integration.test_entitlements_worker import (
    CATALOG,
    entitlements_worker,
    publish,
    until_processed,
)
from tests.support.clock import Clock
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
DAY = 86_400
KEY = "k-read-" + secrets.token_hex(4)
MAX_AGE_S = 1.0


class NoBus:
    async def publish(self, *args: object) -> None:
        raise RuntimeError("nothing is published here")


def reads(result: str) -> float:
    return REGISTRY.get_sample_value("paymentsvc_api_near_cache_reads_total", {"result": result}) or 0.0


@contextlib.asynccontextmanager
async def served(
    database_url: str, prefix: str, clock: Clock
) -> AsyncIterator[tuple[service_pb2_grpc.PaymentServiceStub, cache.EntitlementCache]]:
    pool = make_pool(database_url, max_size=2)
    await pool.open(wait=True, timeout=10)
    redis = Redis.from_url(REDIS_URL, socket_timeout=1.0, socket_connect_timeout=0.5)
    breaker = Breaker("redis", cache.is_transient, threshold=3, reset_after_s=0.5)
    entitlements = cache.EntitlementCache(redis, breaker, prefix, near=NearCache(max_age_s=MAX_AGE_S, liveness_s=1e9, clock=clock))
    entitlements.start()
    api = PaymentApi(Facts.of(CATALOG), Queries(pool, 1.0), entitlements, NoBus(), None,  # type: ignore[arg-type]
                     page_tokens.PageTokens(page_tokens.derive_key("test")))
    server = build_server(api, (ApiKey("reader", SecretStr(KEY), frozenset({"read"})),), port=0, rate_limit=None)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield service_pb2_grpc.PaymentServiceStub(channel), entitlements
    finally:
        await channel.close()
        await server.stop(0.5)
        await entitlements.aclose()
        await redis.aclose()
        await pool.close()


async def test_the_feed_keeps_the_near_cache_current_and_a_broken_feed_bypasses_it(
    broker: str, template_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics(prefix=f"t{secrets.token_hex(4)}.")
    await ensure_topics(broker, topics.all(), partitions=1)
    prefix = f"test:{secrets.token_hex(6)}:"
    ids, now = Ids(), int(time.time())
    pro = {"price_id": "price_pro_monthly", "period_start": now - 60, "period_end": now + 30 * DAY}
    redis = Redis.from_url(REDIS_URL)
    producer = make_producer(broker)
    await producer.start()
    # The near cache's clock (max age; liveness is out of the way): only the test moves it.
    clock = Clock(1000.0)
    with fresh_database(template_database) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            apply_catalog(conn, CATALOG)
        async with entitlements_worker(broker, topics.payment_events, url, redis, prefix), served(url, prefix, clock) as (stub, ents):
            near = ents.near
            assert near is not None and ents.feed is not None
            key = ents.key(("family", ids.family))
            request = service_pb2.CheckEntitlementRequest(
                subject=service_pb2.Subject(family_id=ids.family), feature_code="priority_support"
            )

            async def allowed() -> bool:
                answer = await stub.CheckEntitlement(request, metadata=(("authorization", f"Bearer {KEY}"),))
                return answer.allowed

            async def counted(result: str) -> bool:
                """One check; whether it was counted as `result`."""
                before = reads(result)
                await allowed()
                return reads(result) == before + 1

            async def feed_caught_up() -> None:
                """Every change published so far has been processed by this replica: a
                marker published after them (Redis keeps one channel's order) is seen."""
                marker = f"{prefix}marker:{secrets.token_hex(4)}"
                near.finish([marker], near.begin([marker]), [{"marker": True}])
                await redis.publish(ents.feed.channel, marker)
                await eventually(lambda: near.get(marker) is None, timeout=30, what="the marker's eviction")

            await eventually(near.usable, timeout=30, what="the feed's subscription")
            await publish(producer, topics.payment_events, [
                sub_event(ids, "created", now - 60, status="active", **pro),
                event(ids, "checkout.session.completed", now - 30, user_id=ids.user, family_id=ids.family,
                      subscription_id=ids.sub),
            ])
            await until_processed(url, 2)
            await eventually(allowed, timeout=30, what="the grant")
            # The worker publishes its changes in the MULTI/EXEC that wrote them: once the
            # grant is readable, the marker comes after every change announcing it.
            await feed_caught_up()

            # No change arrives now: a repeated check is a hit, until the maximum age.
            await allowed()
            for _ in range(3):
                assert await counted("hit")
            clock.advance(MAX_AGE_S + 0.001)
            assert await counted("miss")  # too old: read Redis again (and cache it)
            assert await counted("hit")

            # A cancellation through the worker: the feed evicts the entry, the near
            # cache's clock standing still (so the maximum age cannot explain it).
            await publish(producer, topics.payment_events, [
                sub_event(ids, "deleted", now, status="canceled", **pro),
            ])
            await until_processed(url, 3)
            await eventually(lambda: _not(allowed()), timeout=30, what="the cancellation")
            await feed_caught_up()
            assert await allowed() is False
            assert await counted("hit")

            # Break the subscription (Redis drops the connection); the feed stays down for
            # RECONNECT_MIN_S, far longer than the checks below take.
            monkeypatch.setattr(near_cache, "RECONNECT_MIN_S", 5.0)
            host, port = ents.feed.pubsub.connection._writer.get_extra_info("sockname")[:2]  # type: ignore[union-attr]
            await redis.execute_command("CLIENT", "KILL", "ADDR", f"{host}:{port}")
            await eventually(lambda: not near.usable(), timeout=30, what="the feed noticing the kill")
            # While it is down, a change nobody announces is seen at once: the near cache is bypassed.
            granted = await redis.hget(key, "priority_support")
            assert granted is not None
            await redis.hset(key, "priority_support", granted.replace(b'"allowed":false', b'"allowed":true'))
            before = reads("bypass")
            assert await allowed() is True
            assert await allowed() is True
            assert reads("bypass") == before + 2 and len(near) == 0
            # The feed comes back by itself and the near cache is used again.
            await eventually(near.usable, timeout=30, what="the feed's reconnection")
            assert await allowed() is True
            assert await counted("hit")
    await producer.stop()
    keys = [k async for k in redis.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()


async def _not(value: Awaitable[bool]) -> bool:
    return not await value
