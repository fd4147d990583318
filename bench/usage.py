"""Benchmark of IncrementUsage and CheckQuota against a trivial grpc.aio handler under the
same load generator (a separate process), plus the bare Lua script for reference.

    .venv/bin/python bench/usage.py [--seconds 5] [--processes N] [--low-load 1,4,16]

Needs the machine's Postgres and Redis (DATABASE_URL / REDIS_URL); starts its own Tansu
broker. It migrates a `paymentsvc_bench` database, writes warm pro-plan entitlement
hashes for 50 families under a bench prefix (api_calls: 500,000 a month, a family pool),
marks the usage counters ready, and prints QPS and p99 at 64 in flight and the ratios
to the trivial handler. Every increment waits for the broker's acknowledgement
(acks=all). Goals: IncrementUsage >= 0.4 of trivial, CheckQuota >= 0.6. The API server
uses the production Redis client and `paymentsvc serve`'s GC settings (BENCH_DEFAULT_GC=1
keeps the interpreter's defaults, to price them; the trivial handler keeps them always).
The server processes' pids are printed first, for py-spy. The API's producer lingers as
API_PUBLISH_LINGER_MS says (default 0, as `serve`): `API_PUBLISH_LINGER_MS=5 bench/usage.py`
prices the batching it buys.

With `--processes N`, like for like, as bench/grpc_checks.py does (bench/grpc_harness.py):
N API processes share one port, N trivial handlers share another, and the load comes
from N client processes with 4 connections each (the kernel spreads connections, not
calls). The N API processes are N copies of this bench's own server (`_real`, the one
N=1 runs, so the figures for N and for 1 compare), not `paymentsvc serve api_grpc
--processes N` itself: serve has no Redis key prefix, so it would read and count under
the real key names instead of this run's throwaway prefix, and it adds the health and
metrics HTTP site. What `serve --processes N` gives each child, each copy has too: its
own Postgres pool, Redis client and Kafka producer, the gRPC port shared with
SO_REUSEPORT, and the metrics in one prometheus_client multiprocess directory. The bare
Lua line stays one process.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "gen")]

import orjson
import uvloop
from psycopg import conninfo
from pydantic import SecretStr

from bench import grpc_harness
from bench.grpc_harness import KEY, METADATA, summary
from payment.v1 import service_pb2, service_pb2_grpc
from shared.config import ApiKey, Settings

SUBJECTS = 50
INFLIGHT = 64


class Trivial(service_pb2_grpc.PaymentServiceServicer):
    async def IncrementUsage(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.IncrementUsageResponse(allowed=True, used=1)

    async def CheckQuota(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.CheckQuotaResponse(quotas=[service_pb2.Quota(feature_code=request.feature_code)])


async def _trivial(port: int) -> None:
    await grpc_harness.trivial_server(Trivial(), port)


async def _real(
    port: int, db_url: str, redis_url: str, prefix: str, bootstrap: str, topic: str, reuse_port: bool
) -> None:
    from domain.usage.counters import Counters
    from services.api_grpc import cache, page_tokens
    from services.api_grpc.bootstrap import counters_client, redis_breaker, redis_client
    from services.api_grpc.commands import KafkaEventBus
    from services.api_grpc.decisions import Facts
    from services.api_grpc.queries import Queries
    from services.api_grpc.server import RateLimitConfig, build_server
    from services.api_grpc.service import PaymentApi
    from services.api_grpc.usage import KafkaUsageBus, UsageApi, UsageStore
    from shared.catalog import load_catalog
    from shared.config import DEFAULT_CATALOG_PATH
    from shared.db import open_pool
    from shared.kafka import make_producer
    from shared.tracing import setup as setup_tracing

    setup_tracing("api_grpc")  # as the runner does: the OTEL_* variables of this run decide

    pool = await open_pool(db_url)
    redis = redis_client(redis_url)  # as `serve` makes it: no socket timeout
    producer = make_producer(bootstrap, linger_ms=Settings().api_publish_linger_ms)  # as `serve` makes it
    await producer.start()
    breaker = redis_breaker()
    tokens = page_tokens.PageTokens(page_tokens.derive_key("bench"))
    api = PaymentApi(
        Facts.of(load_catalog(DEFAULT_CATALOG_PATH)), Queries(pool), cache.EntitlementCache(redis, breaker, prefix),
        KafkaEventBus(producer, "unused"), None, tokens,
    )
    usage = UsageApi(api.facts, api, UsageStore(pool), Counters(counters_client(redis_url), prefix), KafkaUsageBus(producer, topic), tokens)
    keys = (ApiKey("bench", SecretStr(KEY), frozenset({"read", "write"})),)
    server = build_server(api, keys, port=port, redis=redis, redis_breaker=breaker,
                          rate_limit=RateLimitConfig(rate=1e6, burst=1e6, prefix=prefix), usage=usage,
                          reuse_port=reuse_port)
    await server.start()
    grpc_harness.listening()
    await server.grpc_server.wait_for_termination()


async def _load(port: int, method: str, inflight: int, seconds: float, connections: int = 1) -> list[float]:
    channels = grpc_harness.channels(port, connections)
    stubs = [service_pb2_grpc.PaymentServiceStub(channel) for channel in channels]
    md = METADATA
    latencies: list[float] = []
    run = secrets.token_hex(4)

    async def call(i: int, n: int) -> None:
        stub = stubs[n % len(stubs)]
        subject = service_pb2.Subject(family_id=f"fam{i % SUBJECTS}")
        if method == "increment":
            await stub.IncrementUsage(service_pb2.IncrementUsageRequest(
                subject=subject, feature_code="api_calls", amount=1, idempotency_key=f"{run}-{i}"), metadata=md)
        else:
            await stub.CheckQuota(service_pb2.CheckQuotaRequest(subject=subject, feature_code="api_calls"), metadata=md)

    async def worker(n: int) -> None:
        i = n * 10_000_000
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call(i, n)
            latencies.append(time.perf_counter() - started)
            i += 1

    for n in range(SUBJECTS):  # warm the channels and the policy caches
        await call(n + 99_000_000, n)
    await asyncio.gather(*(worker(n) for n in range(inflight)))
    for channel in channels:
        await channel.close()
    return latencies


def measure(port: int, method: str, inflight: int, seconds: float, clients: int = 1) -> dict[str, float]:
    """`inflight` calls at all times, from `clients` processes (4 connections each if more than one)."""
    return grpc_harness.measure(_load, port, method, inflight, seconds, clients)


async def bare_lua(redis_url: str, prefix: str, seconds: float) -> dict[str, float]:
    """The increment script alone, from one Python process with redis.asyncio, 64 in flight."""
    from redis.asyncio import Redis

    from domain.usage.counters import Counters
    from domain.usage.model import Period, Policy, Request

    redis = Redis.from_url(redis_url, max_connections=INFLIGHT)
    counters = Counters(redis, prefix)
    policy = Policy("api_calls", "pro", "family", "lua", None, 10**12, True, False, -1, Period(0, 2**40))
    latencies: list[float] = []
    run = secrets.token_hex(4)

    async def worker(n: int) -> None:
        i = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await counters.increment(Request(f"lua-{run}-{n}-{i}", policy, 1, 0), time.time())
            latencies.append(time.perf_counter() - started)
            i += 1

    await asyncio.gather(*(worker(n) for n in range(INFLIGHT)))
    await redis.aclose()
    return summary(latencies, seconds)


async def prepare_redis(redis_url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    from domain.usage.model import Keys

    redis = Redis.from_url(redis_url)
    now = int(time.time())
    for n in range(SUBJECTS):
        answer = {"allowed": True, "status": "active", "access_level": "full", "plan_id": "pro",
                  "expires_at": now + 86400, "usage_limit": 500_000, "limit_period": "month", "enforcement": "hard",
                  "decided_by_event_id": "evt_bench", "grace_until": None, "after_grace": None}
        fields = {"api_calls": orjson.dumps(answer), "_watermark": orjson.dumps({"created": now, "event_id": "evt_bench"})}
        await redis.hset(f"{prefix}ent:family:fam{n}", mapping=fields)  # type: ignore[arg-type]
        await redis.expire(f"{prefix}ent:family:fam{n}", 600)
    await redis.set(Keys(prefix).ready, "1", ex=600)
    await redis.aclose()


async def cleanup(redis_url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    keys = [k async for k in redis.scan_iter(match=f"{prefix}*", count=1000)]
    for i in range(0, len(keys), 1000):
        await redis.delete(*keys[i:i + 1000])
    await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--processes", type=int, default=1, help="N API and N trivial server processes, N clients")
    parser.add_argument("--low-load", default="", metavar="1,4,16",
                        help="also IncrementUsage's latency at these calls in flight (what a linger costs a quiet API)")
    args = parser.parse_args()
    n = args.processes
    from shared.devbroker import DevBroker, ensure_topics, free_port
    from shared.migrate import migrate_up

    settings = Settings()
    db_url = conninfo.make_conninfo(settings.database_url.get_secret_value(), dbname="paymentsvc_bench")
    migrate_up(db_url, create_database=True)
    redis_url = settings.redis_url.get_secret_value()
    prefix = f"bench:{secrets.token_hex(4)}:"
    topic = f"bench-{secrets.token_hex(4)}.usage-events"
    broker = DevBroker()
    asyncio.run(broker.start())
    each = f" x{n} processes" if n > 1 else ""
    try:
        asyncio.run(ensure_topics(broker.bootstrap_servers, [topic], partitions=3))
        asyncio.run(prepare_redis(redis_url, prefix))
        ports = {"trivial": free_port(), "api": free_port()}
        with grpc_harness.servers(n, _trivial, ports["trivial"], _real, ports["api"],
                                  (db_url, redis_url, prefix, broker.bootstrap_servers, topic)):
            for label, method, goal in (("IncrementUsage", "increment", 0.4), ("CheckQuota", "check", 0.6)):
                base = measure(ports["trivial"], method, INFLIGHT, args.seconds, n)
                real = measure(ports["api"], method, INFLIGHT, args.seconds, n)
                ratio = real["qps"] / base["qps"]
                print(f"{label} @{INFLIGHT}{each}: trivial {base['qps']:.0f} qps p99 {base['p99_ms']:.2f} ms | "
                      f"api {real['qps']:.0f} qps p99 {real['p99_ms']:.2f} ms | QPS ratio {ratio:.2f} "
                      f"(goal >= {goal}), p99 ratio {real['p99_ms'] / base['p99_ms']:.2f}", flush=True)
            for inflight in [int(x) for x in args.low_load.split(",") if x]:
                real = measure(ports["api"], "increment", inflight, args.seconds, n)
                print(f"IncrementUsage @{inflight}{each}: api {real['qps']:.0f} qps p50 {real['p50_ms']:.2f} ms "
                      f"p99 {real['p99_ms']:.2f} ms", flush=True)
            lua = uvloop.run(bare_lua(redis_url, prefix, args.seconds))
            print(f"bare Lua increment script @{INFLIGHT} (one process, redis.asyncio): {lua['qps']:.0f} /s "
                  f"p99 {lua['p99_ms']:.2f} ms")
    finally:
        broker.stop()
        asyncio.run(cleanup(redis_url, prefix))


if __name__ == "__main__":
    main()
