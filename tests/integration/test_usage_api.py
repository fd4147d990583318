"""Usage quotas end to end: the gRPC API on a real in-process server, the real Postgres,
a private redis-server of this module (so FLUSHDB touches nothing shared), the real
entitlements worker (for a pro family) and the real usage worker on the session broker."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import psycopg
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from domain.usage.counters import Counters
from domain.usage.model import Keys
from payment.v1 import events_pb2, service_pb2, service_pb2_grpc
from services.api_grpc import cache, page_tokens
from services.api_grpc.bootstrap import counters_client
from services.api_grpc.commands import KafkaEventBus
from services.api_grpc.decisions import Facts
from services.api_grpc.queries import Queries
from services.api_grpc.server import RateLimitConfig, Server, build_server
from services.api_grpc.service import PaymentApi
from services.api_grpc.usage import KafkaUsageBus, UsageApi, UsageBus, UsageStore
from services.api_grpc.validation import SubjectIds
from services.usage import rebuild, thresholds
from services.usage.bootstrap import connector
from services.usage.projection import UsageProjection
from shared.breaker import Breaker
from shared.catalog import apply_catalog
from shared.config import Settings, Topics
from shared.consumer import KafkaDeadLetters, LoopPolicy, run_live
from shared.db import make_pool
from shared.devbroker import DevBroker, ensure_topics
from shared.kafka import make_producer
from shared.outbox import OutboxRelay
from shared.redis_mux import MultiplexedRedis
from shared.worker import BatchProcessor
from tests.conftest import fresh_database, random_id
from tests.integration.test_api_grpc import KEYS, READ, WRITE, auth, private_redis
from tests.integration.test_entitlements_projection import Ids, event, metric, sub_event
from tests.integration.test_entitlements_worker import (
    CATALOG,
    entitlements_worker,
    publish,
    until_processed,
)
from tests.kafka_helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
DAY = 86_400
Code = grpc.StatusCode


@dataclass
class Stack:
    database_url: str
    topics: Topics
    redis_url: str
    prefix: str
    broker: str
    family: Ids  # a family on pro (family pool), active for 30 days


@contextlib.asynccontextmanager
async def usage_worker(broker: str, topic: str, database_url: str, thresholds_topic: str) -> AsyncIterator[None]:
    """The usage worker as bootstrap runs it: the catalog's thresholds, published on
    `thresholds_topic` through the outbox."""
    pool = make_pool(database_url, max_size=2)
    await pool.open(wait=True)
    producer = make_producer(broker)
    await producer.start()
    stop = asyncio.Event()
    relay = OutboxRelay(pool, UsageProjection.name, thresholds.sender(producer, thresholds_topic))
    processor = BatchProcessor(UsageProjection(CATALOG, relay), pool, KafkaDeadLetters(producer))
    task = asyncio.create_task(
        run_live(processor, pool, broker, topic, f"g-{random.getrandbits(32):x}", stop, LoopPolicy(max_batch=500), 6000)
    )
    relaying = asyncio.create_task(relay.run(stop, 0.5))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await asyncio.wait_for(relaying, 30)
        await producer.stop()
        await pool.close()


@pytest.fixture(scope="module")
async def stack(broker: str, template_database: str) -> AsyncIterator[Stack]:
    topics = Topics(prefix=f"t{secrets.token_hex(4)}.")
    await ensure_topics(broker, topics.all(), partitions=3)
    prefix = f"test:{secrets.token_hex(6)}:"
    now = int(time.time())
    family = Ids()
    events = [
        sub_event(family, "created", now - 60, status="active", price_id="price_pro_monthly",
                  period_start=now - 60, period_end=now + 30 * DAY),
        event(family, "checkout.session.completed", now - 30, user_id=family.user, family_id=family.family,
              subscription_id=family.sub),
    ]
    with private_redis() as redis_server, contextlib.ExitStack() as exits:
        redis_url = redis_server.url
        url = exits.enter_context(fresh_database(template_database))
        with psycopg.connect(url, autocommit=True) as conn:
            apply_catalog(conn, CATALOG)
        redis = Redis.from_url(redis_url)
        async with entitlements_worker(broker, topics.payment_events, url, redis, prefix) as progress, \
                usage_worker(broker, topics.usage_events, url, topics.usage_thresholds):
            producer = make_producer(broker)
            await producer.start()
            await publish(producer, topics.payment_events, events)
            await producer.stop()
            await until_processed(url, len(events))
            await progress.until_finished(len(events))  # Redis is written after the commit
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await rebuild.rebuild(conn, redis, CATALOG, prefix=prefix, settle_s=0)  # sets usage:ready
            yield Stack(url, topics, redis_url, prefix, broker, family)
        await redis.aclose()


@dataclass
class Served:
    stub: service_pb2_grpc.PaymentServiceStub
    usage: UsageApi
    redis: Redis
    counters: MultiplexedRedis | Redis  # the usage counters' client, as the API's bootstrap makes it


@contextlib.asynccontextmanager
async def usage_server(
    stack: Stack, *, broker: str | None = None, clock: Callable[[], float] = time.time, publish_timeout: float = 5.0,
) -> AsyncIterator[Served]:
    """One API replica. `broker` overrides where usage events go (a broker to take away)."""
    pool = make_pool(stack.database_url, max_size=4)
    await pool.open(wait=True, timeout=10)
    redis = Redis.from_url(stack.redis_url, socket_timeout=1.0, socket_connect_timeout=0.5)
    counters = counters_client(stack.redis_url)
    producer = make_producer(broker or stack.broker, request_timeout_ms=int(publish_timeout * 1000))
    await producer.start()
    breaker = Breaker("redis", cache.is_transient, threshold=3, reset_after_s=0.5)
    tokens = page_tokens.PageTokens(page_tokens.derive_key("test"))
    api = PaymentApi(
        Facts.of(CATALOG), Queries(pool, 1.0), cache.EntitlementCache(redis, breaker, stack.prefix),
        KafkaEventBus(producer, stack.topics.payment_events), None, tokens, clock=clock,
    )
    usage = UsageApi(
        api.facts, api, UsageStore(pool, 1.0), Counters(counters, stack.prefix),
        KafkaUsageBus(producer, stack.topics.usage_events, publish_timeout), tokens, clock=clock,
        publish_timeout_s=publish_timeout,
    )
    server: Server = build_server(api, KEYS, port=0, redis=redis, redis_breaker=breaker,
                                  rate_limit=RateLimitConfig(rate=100_000, burst=100_000, prefix=stack.prefix),
                                  usage=usage)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Served(service_pb2_grpc.PaymentServiceStub(channel), usage, redis, counters)
    finally:
        await channel.close()
        await server.stop(0.5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 10)
        await counters.aclose()
        await redis.aclose()
        await pool.close()


@pytest.fixture(scope="module")
async def served(stack: Stack) -> AsyncIterator[Served]:
    async with usage_server(stack) as s:
        yield s


def inc(user: str = "", family: str = "", feature: str = "api_calls", amount: int = 1, key: str | None = None,
        **kw: Any) -> service_pb2.IncrementUsageRequest:
    return service_pb2.IncrementUsageRequest(
        subject=service_pb2.Subject(user_id=user, family_id=family), feature_code=feature, amount=amount,
        idempotency_key=random_id("idem_") if key is None else key, **kw,
    )


async def quota(stub: service_pb2_grpc.PaymentServiceStub, user: str = "", family: str = "", feature: str = "api_calls",
                token: str = "") -> service_pb2.Quota:
    answer = await stub.CheckQuota(
        service_pb2.CheckQuotaRequest(subject=service_pb2.Subject(user_id=user, family_id=family),
                                      feature_code=feature, consistency_token=token),
        metadata=auth(READ),
    )
    assert len(answer.quotas) == 1
    return answer.quotas[0]


def recorded(url: str, subject_id: str, feature: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(used), 0) FROM usage_aggregates WHERE subject_id = %s AND feature_code = %s",
            (subject_id, feature),
        ).fetchone()
    return int(row[0]) if row else 0


async def until_recorded(url: str, subject_id: str, feature: str, expected: int, timeout: float = 40) -> None:
    async def done() -> bool:
        return recorded(url, subject_id, feature) == expected

    assert await eventually(done, timeout), f"{recorded(url, subject_id, feature)} recorded, expected {expected}"


async def expect_code(call: Any, code: grpc.StatusCode, contains: str = "") -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert contains in (info.value.details() or ""), info.value.details()


# ---------------------------------------------------------------- the core contract


async def test_fifty_concurrent_increments_at_a_hard_limit_never_cross_it_and_the_worker_records_the_sum(
    served: Served, stack: Stack
) -> None:
    user = random_id("user_")
    first = await served.stub.IncrementUsage(inc(user, amount=990), metadata=auth(WRITE))
    assert (first.allowed, first.used, first.limit, first.remaining, first.hard_limit) == (True, 990, 1000, 10, True)
    answers = await asyncio.gather(*(served.stub.IncrementUsage(inc(user), metadata=auth(WRITE)) for _ in range(50)))
    allowed = [a for a in answers if a.allowed]
    assert len(allowed) == 10
    assert max(a.used for a in answers) == 1000
    assert all(a.remaining == 0 for a in answers if not a.allowed)
    assert (await quota(served.stub, user)).used == 1000
    await until_recorded(stack.database_url, user, "api_calls", 990 + len(allowed))


async def test_batched_scripts_survive_a_script_flush_and_batched_reads_see_every_earlier_write(
    served: Served, stack: Stack
) -> None:
    """Concurrent increments share one pipeline and concurrent quota reads one MGET: a
    Redis that lost its scripts still counts each increment once, and every read issued
    after a write answered sees that write."""
    users = [random_id("user_") for _ in range(5)]
    await served.redis.script_flush()
    answers = await asyncio.gather(*(
        served.stub.IncrementUsage(inc(u, amount=n + 1), metadata=auth(WRITE)) for u in users for n in range(4)
    ))
    assert all(a.allowed for a in answers)
    assert [max(a.used for a in answers[i * 4:(i + 1) * 4]) for i in range(5)] == [10] * 5

    async def write_then_read(user: str) -> tuple[int, int]:
        written = await served.stub.IncrementUsage(inc(user, amount=2), metadata=auth(WRITE))
        return written.used, (await quota(served.stub, user)).used

    for written, read in await asyncio.gather(*(write_then_read(u) for u in users for _ in range(3))):
        assert read >= written
    assert [(await quota(served.stub, u)).used for u in users] == [16] * 5
    await until_recorded(stack.database_url, users[0], "api_calls", 16)


async def test_an_idempotency_key_retried_after_a_timeout_and_on_another_replica_counts_once(
    served: Served, stack: Stack
) -> None:
    user, key = random_id("user_"), random_id("idem_")
    with contextlib.suppress(grpc.aio.AioRpcError):  # the client gives up; the server may still count
        await served.stub.IncrementUsage(inc(user, amount=7, key=key), metadata=auth(WRITE), timeout=0.001)
    retried = await served.stub.IncrementUsage(inc(user, amount=7, key=key), metadata=auth(WRITE))
    async with usage_server(stack) as other:
        again = await other.stub.IncrementUsage(inc(user, amount=7, key=key), metadata=auth(WRITE))
    assert (retried.allowed, retried.used) == (True, 7)
    assert again == retried
    assert (await quota(served.stub, user)).used == 7
    await until_recorded(stack.database_url, user, "api_calls", 7)
    await expect_code(served.stub.IncrementUsage(inc(user, amount=8, key=key), metadata=auth(WRITE)),
                      Code.INVALID_ARGUMENT, "different increment")


async def test_a_broker_outage_answers_unavailable_and_leaves_the_counter_unchanged(
    served: Served, stack: Stack
) -> None:
    user = random_id("user_")
    await served.stub.IncrementUsage(inc(user, amount=3), metadata=auth(WRITE))
    key = random_id("idem_")
    async with DevBroker() as own:
        await ensure_topics(own.bootstrap_servers, [stack.topics.usage_events], partitions=1)
        async with usage_server(stack, broker=own.bootstrap_servers, publish_timeout=1.0) as replica:
            own.stop()
            await expect_code(replica.stub.IncrementUsage(inc(user, amount=2, key=key), metadata=auth(WRITE)),
                              Code.UNAVAILABLE)
    assert (await quota(served.stub, user)).used == 3
    retried = await served.stub.IncrementUsage(inc(user, amount=2, key=key), metadata=auth(WRITE))
    assert (retried.allowed, retried.used) == (True, 5)  # nothing was remembered for the key
    await until_recorded(stack.database_url, user, "api_calls", 5)


class GatedBus:
    """The replica's real Kafka bus, held at a gate: lets a test cancel the call while the
    publish is in flight (a timing no real client can be made to hit reliably)."""

    def __init__(self, inner: UsageBus) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.reached = asyncio.Event()

    async def publish(self, event: events_pb2.UsageEvent, timeout: float) -> None:
        self.reached.set()
        await self.gate.wait()
        await self.inner.publish(event, timeout)


async def cancelled_mid_publish(usage: UsageApi, user: str, amount: int) -> GatedBus:
    """Start an increment, cancel its caller while the publish waits at the gate."""
    bus = GatedBus(usage.bus)
    usage.bus = bus
    call = asyncio.create_task(
        usage.increment(SubjectIds(user, ""), "api_calls", amount, random_id("idem_"), {}, timeout=30.0)
    )
    await asyncio.wait_for(bus.reached.wait(), 30)
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call
    assert call.cancelled()
    return bus


async def test_an_increment_cancelled_while_publishing_keeps_its_count_when_the_event_lands(stack: Stack) -> None:
    user = random_id("user_")
    async with usage_server(stack) as replica:
        bus = await cancelled_mid_publish(replica.usage, user, 6)
        assert (await quota(replica.stub, user)).used == 6  # counted, not yet settled
        bus.gate.set()
        assert await replica.usage.drain(30) == 0
        assert (await quota(replica.stub, user)).used == 6
    await until_recorded(stack.database_url, user, "api_calls", 6)  # the event landed


async def test_an_increment_cancelled_while_publishing_is_rolled_back_when_the_event_does_not_land(
    stack: Stack,
) -> None:
    user = random_id("user_")
    failures = metric("paymentsvc_usage_publish_failures_total")
    async with DevBroker() as own:
        await ensure_topics(own.bootstrap_servers, [stack.topics.usage_events], partitions=1)
        async with usage_server(stack, broker=own.bootstrap_servers, publish_timeout=1.0) as replica:
            bus = await cancelled_mid_publish(replica.usage, user, 4)
            assert (await quota(replica.stub, user)).used == 4
            own.stop()
            bus.gate.set()
            assert await replica.usage.drain(30) == 0
            assert (await quota(replica.stub, user)).used == 0  # rolled back: nothing landed
    assert metric("paymentsvc_usage_publish_failures_total") == failures + 1
    assert recorded(stack.database_url, user, "api_calls") == 0


async def test_a_period_rollover_starts_at_zero_and_the_old_period_stays_listed(stack: Stack) -> None:
    t = [datetime(2031, 1, 31, 23, 59, tzinfo=UTC).timestamp()]
    user = random_id("user_")
    async with usage_server(stack, clock=lambda: t[0]) as s:
        january = await s.stub.IncrementUsage(inc(user, amount=5), metadata=auth(WRITE))
        t[0] += 120  # February
        fresh = await quota(s.stub, user)
        february = await s.stub.IncrementUsage(inc(user, amount=2), metadata=auth(WRITE))
    assert january.period_start == int(datetime(2031, 1, 1, tzinfo=UTC).timestamp())
    assert (fresh.used, fresh.period_start) == (0, january.period_end)
    assert (february.used, february.period_start) == (2, january.period_end)
    await until_recorded(stack.database_url, user, "api_calls", 7)
    async with usage_server(stack) as s2:
        first = await s2.stub.ListUsage(
            service_pb2.ListUsageRequest(subject=service_pb2.Subject(user_id=user), page_size=1), metadata=auth(READ)
        )
        second = await s2.stub.ListUsage(
            service_pb2.ListUsageRequest(subject=service_pb2.Subject(user_id=user), page_size=1,
                                         page_token=first.next_page_token), metadata=auth(READ)
        )
    assert [(p.period_start, p.used, p.limit) for p in first.periods] == [(february.period_start, 2, 1000)]
    assert [(p.period_start, p.used) for p in second.periods] == [(january.period_start, 5)]
    assert first.next_page_token and not second.next_page_token


async def test_bad_input_is_invalid_argument(served: Served) -> None:
    user = random_id("user_")
    for request, says in [
        (inc(user, amount=-1), "does not allow releases"),
        (inc(user, feature="teleport"), "unknown feature_code"),
        (inc(user, amount=2**53 + 1), "2^53"),
        (inc(""), "subject needs a user_id or a family_id"),
        (inc(user, amount=0), "must not be 0"),
        (inc(user, key=""), "idempotency_key is required"),
        (inc(user, feature="export_pdf"), "not metered"),
    ]:
        await expect_code(served.stub.IncrementUsage(request, metadata=auth(WRITE)), Code.INVALID_ARGUMENT, says)


async def test_soft_limits_report_overage_and_releases_never_go_below_zero(served: Served, stack: Stack) -> None:
    f = stack.family
    soft = await served.stub.IncrementUsage(inc(f.user, f.family, "ai_credits", 2500), metadata=auth(WRITE))
    assert (soft.allowed, soft.over_soft_limit, soft.hard_limit) == (True, False, False)
    # Other members, each within the cap of 2500: the pool goes over its soft limit of 5000.
    await served.stub.IncrementUsage(inc(random_id("user_"), f.family, "ai_credits", 2500), metadata=auth(WRITE))
    over = await served.stub.IncrementUsage(inc(random_id("user_"), f.family, "ai_credits", 100), metadata=auth(WRITE))
    assert (over.allowed, over.used, over.over_soft_limit, over.overage, over.limit) == (True, 5100, True, 100, 5000)
    capped = await served.stub.IncrementUsage(inc(f.user, f.family, "ai_credits", 1), metadata=auth(WRITE))
    assert (capped.allowed, capped.used, capped.remaining) == (False, 5100, 0)  # the member cap of 2500 is hard
    user = random_id("user_")
    await served.stub.IncrementUsage(inc(user, feature="projects", amount=2), metadata=auth(WRITE))
    released = await served.stub.IncrementUsage(inc(user, feature="projects", amount=-5), metadata=auth(WRITE))
    assert (released.allowed, released.used, released.remaining) == (True, 0, 3)
    await until_recorded(stack.database_url, user, "projects", 0)
    await until_recorded(stack.database_url, f.family, "ai_credits", 5100)


async def test_a_family_pool_counts_members_against_one_pool_with_a_cap_per_member(served: Served, stack: Stack) -> None:
    family, a, b = random_id("family_"), random_id("user_"), random_id("user_")
    f = stack.family  # on pro (a family pool); a fresh family id is on the free plan
    seat_a = await served.stub.IncrementUsage(inc(f.user, f.family, "seats", 1), metadata=auth(WRITE))
    second_a = await served.stub.IncrementUsage(inc(f.user, f.family, "seats", 1), metadata=auth(WRITE))
    seat_b = await served.stub.IncrementUsage(inc(b, f.family, "seats", 1), metadata=auth(WRITE))
    assert (seat_a.allowed, seat_a.used, seat_a.limit) == (True, 1, 6)
    assert (second_a.allowed, second_a.used) == (False, 1)
    assert (seat_b.allowed, seat_b.used) == (True, 2)
    await expect_code(served.stub.IncrementUsage(inc("", f.family, "seats", 1), metadata=auth(WRITE)),
                      Code.INVALID_ARGUMENT, "user_id is required")
    free = await served.stub.IncrementUsage(inc(a, family, "projects", 1), metadata=auth(WRITE))
    assert (free.limit, free.used) == (3, 1)  # free plan: counted per user
    await until_recorded(stack.database_url, f.family, "seats", 2)
    with psycopg.connect(stack.database_url) as conn:
        members = conn.execute(
            "SELECT user_id, used FROM usage_member_aggregates WHERE family_id = %s AND feature_code = 'seats' ORDER BY used, user_id",
            (f.family,),
        ).fetchall()
    assert sorted(members) == sorted([(f.user, 1), (b, 1)])


async def test_check_quota_lists_every_metered_feature_of_the_subject(served: Served, stack: Stack) -> None:
    f = stack.family
    answer = await served.stub.CheckQuota(
        service_pb2.CheckQuotaRequest(subject=service_pb2.Subject(user_id=f.user, family_id=f.family)),
        metadata=auth(READ),
    )
    by_feature = {q.feature_code: q for q in answer.quotas}
    assert set(by_feature) == {"api_calls", "ai_credits", "projects", "seats", "storage_mb"}
    assert by_feature["projects"].limit == -1 and by_feature["api_calls"].limit == 500_000


# ---------------------------------------------------------------- Redis loss and rebuild


async def test_after_flushdb_quotas_fall_back_to_postgres_and_a_rebuild_gives_the_same_answers(
    stack: Stack,
) -> None:
    f = stack.family
    user = random_id("user_")
    async with usage_server(stack) as s:
        key = random_id("idem_")
        first = await s.stub.IncrementUsage(inc(user, amount=40, key=key), metadata=auth(WRITE))
        await s.stub.IncrementUsage(inc(user, feature="storage_mb", amount=300), metadata=auth(WRITE))
        await s.stub.IncrementUsage(inc(f.user, f.family, "ai_credits", 10), metadata=auth(WRITE))
        await until_recorded(stack.database_url, user, "storage_mb", 300)
        await until_recorded(stack.database_url, user, "api_calls", 40)
        subjects = [(user, ""), (f.user, f.family)]

        async def answers() -> list[list[tuple[Any, ...]]]:
            out = []
            for u, fam in subjects:
                r = await s.stub.CheckQuota(
                    service_pb2.CheckQuotaRequest(subject=service_pb2.Subject(user_id=u, family_id=fam)),
                    metadata=auth(READ),
                )
                out.append([(q.feature_code, q.used, q.limit, q.period_start, q.period_end, q.hard_limit) for q in r.quotas])
            return out

        before = await answers()  # every fill of Redis it made was awaited by the call
        await s.redis.flushdb()  # the module's own redis-server, never the shared one
        during = await answers()
        await expect_code(s.stub.IncrementUsage(inc(user), metadata=auth(WRITE)), Code.UNAVAILABLE, "rebuilt")
        settings = Settings(database_url=SecretStr(stack.database_url))
        caught_up = rebuild.worker_caught_up(connector(settings), stack.broker, stack.topics.usage_events)
        async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as conn:
            figures = await rebuild.rebuild(conn, s.redis, CATALOG, prefix=stack.prefix, caught_up=caught_up, settle_s=0.2)
        assert figures.counters >= 3 and figures.idempotency_records >= 3
        after = await answers()
        retried = await s.stub.IncrementUsage(inc(user, amount=40, key=key), metadata=auth(WRITE))
    assert during == before
    assert after == before
    assert (retried.allowed, retried.used, retried.limit, retried.period_start) == (True, 40, 1000, first.period_start)
    assert recorded(stack.database_url, user, "api_calls") == 40


async def test_two_rebuilds_at_once_one_runs_and_the_other_is_refused(stack: Stack) -> None:
    keys = Keys(stack.prefix)
    redis = Redis.from_url(stack.redis_url)
    gate = asyncio.Event()

    async def caught_up() -> bool:  # holds the first rebuild inside its lease
        await gate.wait()
        return True

    try:
        async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as conn, \
                await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as other:
            first = asyncio.create_task(
                rebuild.rebuild(conn, redis, CATALOG, prefix=stack.prefix, caught_up=caught_up, settle_s=0)
            )
            await eventually(lambda: redis.exists(keys.rebuild_lease), what="the first rebuild holds the lease")
            with pytest.raises(rebuild.RebuildRunning, match="another usage counter rebuild holds the lease"):
                await rebuild.rebuild(other, redis, CATALOG, prefix=stack.prefix, settle_s=0)
            gate.set()
            figures = await first
        assert figures.counters >= 1
        assert await redis.exists(keys.ready) and not await redis.exists(keys.rebuild_lease)
    finally:
        await redis.aclose()


async def test_a_rebuild_overtaken_after_its_lease_expired_cannot_wipe_what_the_newer_one_wrote(stack: Stack) -> None:
    """The rebuild stalls past its lease; another takes the lease, writes the counters
    and sets usage:ready. The stalled one wakes: its next write is refused by the fence."""
    keys = Keys(stack.prefix)
    redis = Redis.from_url(stack.redis_url)
    counter = keys.counter("user", random_id("user_"), "api_calls", 0)

    async def overtaken() -> bool:
        await redis.set(keys.rebuild_lease, "the-newer-rebuild")  # as if ours had expired
        await redis.set(counter, 42)
        await redis.set(keys.ready, "1")
        return True

    try:
        async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as conn:
            with pytest.raises(rebuild.LeaseLost):
                await rebuild.rebuild(conn, redis, CATALOG, prefix=stack.prefix, caught_up=overtaken, settle_s=0)
        assert await redis.get(counter) == b"42"
        assert await redis.exists(keys.ready)
        assert await redis.get(keys.rebuild_lease) == b"the-newer-rebuild"  # not released by the loser
    finally:
        await redis.delete(keys.rebuild_lease, counter)
        await redis.aclose()


async def test_a_long_rebuild_renews_its_lease(stack: Stack) -> None:
    keys = Keys(stack.prefix)
    redis = Redis.from_url(stack.redis_url)
    gate = asyncio.Event()

    async def caught_up() -> bool:
        await gate.wait()
        return True

    try:
        async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as conn:
            running = asyncio.create_task(rebuild.rebuild(
                conn, redis, CATALOG, prefix=stack.prefix, caught_up=caught_up, settle_s=0, lease_s=3.0
            ))
            await eventually(lambda: redis.exists(keys.rebuild_lease), what="the lease is taken")
            lowest = [await redis.pttl(keys.rebuild_lease)]

            async def renewed() -> bool:
                left = await redis.pttl(keys.rebuild_lease)
                assert left > 0, "the lease expired during the rebuild"
                lowest[0] = min(lowest[0], left)
                return left > lowest[0] + 200

            await eventually(renewed, what="the lease's expiry moves forward")
            gate.set()
            await running
    finally:
        await redis.aclose()


async def test_a_check_after_a_write_reads_it_even_from_a_lagging_postgres(served: Served, stack: Stack) -> None:
    user = random_id("user_")
    written = await served.stub.IncrementUsage(inc(user, amount=11), metadata=auth(WRITE))
    ready = served.usage.counters.keys.ready
    await served.redis.delete(ready)  # Redis "lost": the read goes to Postgres, maybe before the worker
    try:
        seen = await quota(served.stub, user, token=written.consistency_token)
        assert seen.used >= 11
        await expect_code(quota(served.stub, user, token=written.consistency_token[:-2] + "xx"),
                          Code.INVALID_ARGUMENT, "consistency_token")
    finally:
        await served.redis.set(ready, "1")
    await until_recorded(stack.database_url, user, "api_calls", 11)


async def test_a_replay_of_usage_events_rebuilds_the_postgres_side(served: Served, stack: Stack) -> None:
    from services.usage.bootstrap import TABLES
    from shared import replay

    user = random_id("user_")
    for amount in (3, 4):
        await served.stub.IncrementUsage(inc(user, amount=amount), metadata=auth(WRITE))
    await until_recorded(stack.database_url, user, "api_calls", 7)
    spec = replay.ProjectionSpec(name="usage", topic=stack.topics.usage_events, tables=TABLES,
                                 make=lambda: UsageProjection(CATALOG, None))
    schema = f"rebuild_{secrets.token_hex(3)}"
    await replay.rebuild(stack.database_url, stack.broker, spec, schema, progress="never")
    with psycopg.connect(stack.database_url) as conn:
        live = replay.table_fingerprints(conn, "public", TABLES)
        rebuilt = replay.table_fingerprints(conn, schema, TABLES)
    # The live tables may have moved on meanwhile only if other tests wrote; compare this user's rows.
    with psycopg.connect(stack.database_url) as conn:
        rows = conn.execute(
            f"SELECT used FROM {schema}.usage_aggregates WHERE subject_id = %s", (user,)  # noqa: S608 - test schema name
        ).fetchall()
    assert rows == [(7,)]
    assert set(live) == set(rebuilt)
