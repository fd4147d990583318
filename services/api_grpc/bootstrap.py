"""Composition root of the api_grpc service: pool, Redis, producer, Stripe, catalog,
the grpc.aio server and the HTTP health/metrics site.

`serve` runs until `stop` is set, then reports NOT_SERVING, lets calls in flight finish,
and closes everything in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

from aiohttp import web
from redis.asyncio import Redis

from domain.usage.counters import Counters
from services.api_grpc import cache, page_tokens, stripe_gateway
from services.api_grpc.commands import KafkaEventBus
from services.api_grpc.decisions import Facts
from services.api_grpc.near_cache import NearCache
from services.api_grpc.queries import Queries
from services.api_grpc.server import RateLimitConfig, build_server
from services.api_grpc.service import PaymentApi
from services.api_grpc.usage import KafkaUsageBus, UsageApi, UsageStore
from shared.breaker import Breaker
from shared.catalog import load_catalog
from shared.config import Settings, parse_rate_limit
from shared.db import open_pool
from shared.devbroker import wait_for_broker
from shared.errors import ConfigurationError
from shared.health import add_health_routes, postgres_probe, redis_probe, start_site
from shared.kafka import kafka_probe, make_producer
from shared.redis_mux import MultiplexedRedis

log = logging.getLogger("api_grpc")


def redis_client(url: str) -> Redis:
    """The API's Redis client: no socket timeout, a 1 s connect timeout.

    With a socket timeout, redis-py sends every command under `asyncio.wait_for`, which
    starts a task per command on Python 3.11 (about 8 µs of CPU per round trip). Every
    call the API makes bounds itself instead, with an `asyncio.timeout` scope (no task):
    the entitlement reads and fills (cache.py, at most cache.CALL_TIMEOUT_S), the
    increment script (usage.py, the same), the quota read (1 s), the rollback and the
    confirm of a retried key (2 s), the rate limiter's refill (0.2 s), the change feed's
    subscribe and ping (near_cache.py) and the health probe (shared/health.py, 2 s).
    A new call on this client needs a bound of its own
    (tests/integration/test_redis_bounds.py holds each one against a Redis that never
    answers)."""
    return Redis.from_url(url, socket_timeout=None, socket_connect_timeout=1.0)


def counters_client(url: str) -> MultiplexedRedis | Redis:
    """The usage counters' Redis (IncrementUsage's script, CheckQuota's MGET, the
    rollback and confirm): one connection, its commands pipelined (shared/redis_mux.py),
    about 75 µs less of the event loop per round trip than redis-py's connection per
    call. Bounded at the same sites as `redis_client`'s calls; a rediss:// (TLS) or
    unix:// URL keeps redis-py's client."""
    if urlsplit(url).scheme == "redis":
        return MultiplexedRedis(url, connect_timeout_s=1.0)
    return redis_client(url)


def redis_breaker(threshold: int = 5, reset_after_s: float = 5.0) -> Breaker:
    return Breaker("redis", cache.is_transient, threshold=threshold, reset_after_s=reset_after_s)


def stripe_breaker(threshold: int = 5, reset_after_s: float = 30.0) -> Breaker:
    return Breaker("stripe", stripe_gateway.is_transient, threshold=threshold, reset_after_s=reset_after_s)


def rate_limits(settings: Settings) -> RateLimitConfig:
    """API_RATE_LIMIT for every key, and each API_KEYS entry's own `:rate/burst`."""
    rate, burst = parse_rate_limit(settings.api_rate_limit, "API_RATE_LIMIT")
    per_key = tuple((k.name, *k.rate_limit) for k in settings.api_keys if k.rate_limit)
    return RateLimitConfig(rate=rate, burst=burst, per_key=per_key)


def token_keys(settings: Settings) -> list[bytes]:
    """The page and consistency token keys: TOKEN_SIGNING_KEYS, the first signs."""
    if not settings.token_signing_keys:
        raise ConfigurationError(
            "TOKEN_SIGNING_KEYS is not set: the API signs page and consistency tokens with it "
            "(comma-separated, at least 32 characters each, the first signs; `paymentsvc dev` sets one)"
        )
    return [page_tokens.derive_key(k.get_secret_value()) for k in settings.token_signing_keys]


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Serve gRPC on grpc_port and health/metrics on grpc_http_port until `stop`."""
    catalog = load_catalog(settings.catalog_path)
    await wait_for_broker(settings.kafka_bootstrap_servers, timeout=settings.startup_timeout_s)
    pool = await open_pool(settings.database_url.get_secret_value(), max_size=10, name="api_grpc",
                           statement_timeout_ms=settings.db_statement_timeout_ms)
    redis = redis_client(settings.redis_url.get_secret_value())
    counters = counters_client(settings.redis_url.get_secret_value())
    producer = make_producer(
        settings.kafka_bootstrap_servers, request_timeout_ms=int(settings.publish_timeout_s * 1000),
        linger_ms=settings.api_publish_linger_ms,
    )
    await producer.start()
    gateway = None
    if settings.stripe_secret_key is not None:
        client = stripe_gateway.make_client(
            settings.stripe_secret_key.get_secret_value(), settings.stripe_api_base
        )
        gateway = stripe_gateway.StripeGateway(client, stripe_breaker())
    breaker = redis_breaker()
    # A near cache per replica, invalidated by the entitlements worker's change feed
    # and bounded in age (see near_cache.py): most checks then need no Redis round trip.
    entitlements = cache.EntitlementCache(redis, breaker, near=NearCache())
    api = PaymentApi(
        Facts.of(catalog),
        Queries(pool),
        entitlements,
        KafkaEventBus(producer, settings.topics.payment_events),
        gateway,
        page_tokens.PageTokens(*token_keys(settings)),
    )
    usage = UsageApi(
        api.facts, api, UsageStore(pool), Counters(counters),
        KafkaUsageBus(producer, settings.topics.usage_events, settings.publish_timeout_s), api.tokens,
        publish_timeout_s=settings.publish_timeout_s,
    )
    server = build_server(
        api, settings.api_keys, host=settings.bind_host, port=settings.grpc_port,
        redis=redis, redis_breaker=breaker, rate_limit=rate_limits(settings), usage=usage,
        reuse_port=settings.reuse_port,
    )
    app = web.Application()
    probes = {"postgres": postgres_probe(pool), "redis": redis_probe(redis), "kafka": kafka_probe(producer)}
    add_health_routes(app, "api_grpc", settings, probes, stop)
    try:
        await server.start()
        entitlements.start()
        runner = await start_site(app, settings.bind_host, settings.grpc_http_port, reuse_port=settings.reuse_port)
        log.info("listening", extra={"grpc": f"{settings.bind_host}:{server.port}"})
        try:
            await stop.wait()
        finally:
            log.info("stopping: not ready and NOT_SERVING; still serving for SHUTDOWN_DELAY_S, then finishing the calls in flight",
                     extra={"delay_s": settings.shutdown_delay_s, "deadline_s": settings.shutdown_timeout_s})
            await server.health.enter_graceful_shutdown()
            await asyncio.sleep(settings.shutdown_delay_s)
            started = time.monotonic()
            await server.stop(settings.shutdown_timeout_s)
            # Increments whose callers were cancelled still settle (keep or roll back).
            await usage.drain(max(1.0, settings.shutdown_timeout_s - (time.monotonic() - started)))
            await runner.cleanup()
    finally:
        await entitlements.aclose()
        if gateway is not None:
            await gateway.close()
        await producer.stop()
        await counters.aclose()
        await redis.aclose()
        await pool.close()
