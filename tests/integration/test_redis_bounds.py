"""The API's Redis client has no socket timeout (a socket timeout makes redis-py start a
task per command: bootstrap.redis_client), so every call the API makes carries its own
bound. Here each one meets a Redis that never answers, from the first byte (a server
that accepts and stays silent) or after the client is connected (a proxy to the real
Redis that starts swallowing what it is sent), and must come back within its bound with
the answer a dead Redis gets: a check falls back, the limiter fails open, an increment
is refused, a quota comes from Postgres, a rollback or confirm gives up, the probe says
down, the change feed drops the subscription and tries again."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from domain.usage.counters import Counters, Step
from domain.usage.model import Outcome, Period, Policy, Request
from payment.v1 import events_pb2
from services.api_grpc import cache, page_tokens
from services.api_grpc.bootstrap import counters_client, redis_breaker, redis_client
from services.api_grpc.cache import CacheUnavailable, EntitlementCache
from services.api_grpc.decisions import Decision, Facts
from services.api_grpc.errors import Unavailable
from services.api_grpc.interceptors import RateLimiter
from services.api_grpc.near_cache import ChangeFeed, NearCache
from services.api_grpc.usage import (
    CONFIRM_TIMEOUT_S,
    QUOTA_READ_TIMEOUT_S,
    ROLLBACK_TIMEOUT_S,
    UsageApi,
)
from services.api_grpc.validation import SubjectIds
from shared.catalog import load_catalog
from shared.config import DEFAULT_CATALOG_PATH
from shared.health import PROBE_TIMEOUT_S, redis_probe, run_probes
from shared.redis_mux import MultiplexedRedis
from tests.support.net import BlackholeProxy, silent_server
from tests.support.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FACTS = Facts.of(load_catalog(DEFAULT_CATALOG_PATH))
SLACK_S = 0.5  # a loaded 2-core machine: scheduling, not the bound under test
LONG_DEADLINE_S = 10.0  # a caller with time to spare: only the call's own bound may end it


class Entitled:
    async def check(self, subject: SubjectIds, feature_code: str, timeout: float) -> tuple[Decision, None]:
        return Decision(True, "granted", "free", "active", 0, "full", "evt_1", 1000, "month"), None


class PostgresUsage:
    """The quota's fallback: what the worker's aggregates say."""

    async def used(self, keys: Any, timeout: float) -> list[int]:
        return [7 for _ in keys]


class AcknowledgingBus:
    async def send(self, event: events_pb2.UsageEvent) -> asyncio.Future[Any]:
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ack.set_result("metadata")
        return ack


def usage_api(client: Redis | MultiplexedRedis) -> UsageApi:
    return UsageApi(FACTS, Entitled(), PostgresUsage(), Counters(client, "bounds:"), AcknowledgingBus(),  # type: ignore[arg-type]
                    page_tokens.PageTokens(page_tokens.derive_key("t")))


def pending_step() -> Step:
    policy = Policy("api_calls", "free", "user", "u1", None, 1000, True, False, -1, Period(0, 2**40), "u1", "")
    request = Request("key-1", policy, 1, 0)
    return Step(Outcome(True, 1, 1, 0, False, request), b"P|1|1|1|0|{}", True)


async def within(bound_s: float, call: Awaitable[Any]) -> tuple[float, Any]:
    """(seconds taken, result or exception) of `call`; fails the test instead of hanging."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(bound_s + SLACK_S + 2.0):
            result: Any = await call
    except TimeoutError:
        pytest.fail(f"unbounded: still waiting after {time.monotonic() - started:.1f} s")
    except Exception as exc:
        result = exc
    return time.monotonic() - started, result


@contextlib.asynccontextmanager
async def hung_redis(how: str, redis_url: str) -> AsyncIterator[tuple[Redis, MultiplexedRedis | Redis]]:
    """The API's own clients, to a Redis that never answers: redis-py's, and the usage
    counters' (bootstrap.counters_client: one pipelined connection)."""
    if how == "silent from the first byte":
        async with silent_server() as silent:
            client, counters = redis_client(silent.url), counters_client(silent.url)
            yield client, counters
            for each in (client, counters):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(each.aclose(), 1)
        return
    proxy = BlackholeProxy(urllib.parse.urlparse(redis_url).port or 6379)
    url = f"redis://127.0.0.1:{proxy.port}/0"
    client, counters = redis_client(url), counters_client(url)
    try:
        await asyncio.gather(*(client.ping() for _ in range(8)))  # connected, several connections pooled
        await counters.ping()  # connected
        proxy.blackhole = True
        yield client, counters
    finally:
        proxy.close()
        for each in (client, counters):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(each.aclose(), 1)


HOW = ["silent from the first byte", "silent once connected"]


@pytest.mark.parametrize("how", HOW)
async def test_every_call_of_the_api_on_a_hung_redis_ends_within_its_bound(how: str, redis_url: str) -> None:
    fail_open = REGISTRY.get_sample_value("paymentsvc_api_rate_limit_fail_open_total") or 0.0
    async with hung_redis(how, redis_url) as (client, counters):
        entitlements = EntitlementCache(client, redis_breaker())
        limiter = RateLimiter(client, redis_breaker(), prefix="bounds:")
        usage = usage_api(counters)
        subject = ("user", "u1")
        calls: dict[str, tuple[float, Awaitable[Any]]] = {
            "check (whole hashes)": (cache.CALL_TIMEOUT_S, entitlements.read_all([subject], LONG_DEADLINE_S)),
            "check (one feature)": (cache.CALL_TIMEOUT_S,
                                    entitlements.read_features([subject], "api_calls", LONG_DEADLINE_S)),
            "fill": (cache.CALL_TIMEOUT_S, entitlements.fill({subject: {"_watermark": b"{}"}}, LONG_DEADLINE_S)),
            "rate limit": (0.2, limiter.admit("k1")),
            "increment": (cache.CALL_TIMEOUT_S,
                          usage.increment(SubjectIds("u1", ""), "api_calls", 1, "key-1", {}, LONG_DEADLINE_S)),
            "quota": (QUOTA_READ_TIMEOUT_S, usage.check_quota(SubjectIds("u1", ""), "api_calls", "", LONG_DEADLINE_S)),
            "rollback": (ROLLBACK_TIMEOUT_S, usage._rollback(pending_step())),
            "confirm": (CONFIRM_TIMEOUT_S, usage._republish(pending_step())),
            "health probe": (PROBE_TIMEOUT_S, run_probes({"redis": redis_probe(client)})),
        }
        results = await asyncio.gather(*(within(bound, call) for bound, call in calls.values()))
        taken = {name: result for name, result in zip(calls, results, strict=True)}

    for name, (bound, _) in calls.items():
        seconds = taken[name][0]
        assert seconds <= bound + SLACK_S, f"{name}: {seconds:.2f} s against a bound of {bound} s"
    outcome = {name: result for name, (_, result) in taken.items()}
    assert isinstance(outcome["check (whole hashes)"], CacheUnavailable)
    assert isinstance(outcome["check (one feature)"], CacheUnavailable)
    assert outcome["fill"] is None  # best effort: never raises
    assert outcome["rate limit"] is None  # failed open, and counted
    assert (REGISTRY.get_sample_value("paymentsvc_api_rate_limit_fail_open_total") or 0.0) == fail_open + 1
    assert isinstance(outcome["increment"], Unavailable) and "cannot count" in str(outcome["increment"])
    assert [q.used for q in outcome["quota"]] == [7]  # from Postgres
    assert outcome["rollback"] is None  # logged, given up
    assert isinstance(outcome["confirm"], Unavailable)
    assert outcome["health probe"]["redis"]["status"] == "down"


@pytest.mark.parametrize("how", HOW)
async def test_the_change_feed_gives_up_a_subscription_that_is_never_answered_and_tries_again(
    how: str, redis_url: str,
) -> None:
    async with hung_redis(how, redis_url) as (client, _):
        near = NearCache()
        feed = ChangeFeed(client, near, "bounds:", call_timeout_s=0.3)
        attempts = 0
        real_listen = feed._listen

        async def counted() -> None:
            nonlocal attempts
            attempts += 1
            await real_listen()

        feed._listen = counted  # type: ignore[method-assign]
        feed.start()
        try:
            # Each attempt ends by its bound (0.3 s), then a backoff (0.1-0.4 s): three
            # in well under 5 s. An unbounded subscribe would stay at one for ever.
            await eventually(lambda: attempts >= 3, timeout=5.0, what="three subscription attempts")
            assert not near.usable()  # meanwhile every check bypasses the near cache
        finally:
            await asyncio.wait_for(feed.aclose(), 2)


async def test_the_api_client_starts_no_task_per_command(redis_url: str) -> None:
    """The saving itself: a socket timeout runs each send under asyncio.wait_for, a task
    per command on Python 3.11 (about 8 µs of CPU per round trip); the API's client has none."""
    loop = asyncio.get_running_loop()
    started: list[Any] = []

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        started.append(coro)
        return asyncio.Task(coro, loop=loop, **kw)

    tasks = {}
    for name, client in (("api", redis_client(redis_url)), ("socket timeout", Redis.from_url(redis_url, socket_timeout=2))):
        await client.ping()  # connected
        loop.set_task_factory(counting)  # type: ignore[arg-type]
        try:
            for _ in range(20):
                await client.get("bounds:absent")
        finally:
            loop.set_task_factory(None)
        tasks[name], started[:] = len(started), []
        await client.aclose()
    assert tasks == {"api": 0, "socket timeout": 20}
