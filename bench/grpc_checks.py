"""Benchmark of CheckEntitlement and BulkCheckEntitlements (cache warm) against a trivial
grpc.aio handler, under the same load generator running in a separate process.

    .venv/bin/python bench/grpc_checks.py [--seconds 5] [--no-near-cache] [--processes N]

Needs the machine's Postgres and Redis (DATABASE_URL / REDIS_URL). It migrates a
`paymentsvc_bench` database (no broker: nothing is published), writes warm entitlement
hashes for 50 subjects into Redis under a bench prefix, and prints QPS, p50 and p99 for
64 in flight, the ratios to the trivial handler, and the latency at 4 in flight.

The API server runs as in production: the full interceptor chain with the Redis rate
limiter (a limit too high to bite), the production Redis client (no socket timeout),
`paymentsvc serve`'s GC settings (BENCH_DEFAULT_GC=1 keeps the interpreter's
defaults, to price them; the trivial handler keeps them always) and, unless --no-near-cache, the near cache with its
change-feed subscription (near_cache.py; entries re-read from Redis after 1 s). The
server processes' pids are printed first, for py-spy. On a 2-core machine the client
shares the CPUs with the server: run it on a quiet machine, and more than once.

With `--processes N`, like for like: N API processes share one port (SO_REUSEPORT and a
shared prometheus_client multiprocess directory, as `paymentsvc serve api_grpc
--processes N` runs them), N trivial handlers share another, and the load comes from N
client processes with 4 connections each (the kernel spreads connections, not calls);
bench/grpc_harness.py, which bench/usage.py shares.
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
from psycopg import conninfo
from pydantic import SecretStr

from bench import grpc_harness
from bench.grpc_harness import KEY, METADATA
from payment.v1 import service_pb2, service_pb2_grpc
from shared.config import ApiKey, Settings

FEATURES = ["projects", "api_calls", "storage_mb", "ai_credits", "seats", "export_pdf", "priority_support"]


class Trivial(service_pb2_grpc.PaymentServiceServicer):
    async def CheckEntitlement(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.CheckEntitlementResponse(allowed=True)

    async def BulkCheckEntitlements(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.BulkCheckEntitlementsResponse(
            results=[service_pb2.CheckEntitlementResponse(allowed=True) for _ in request.feature_codes]
        )


async def _trivial(port: int) -> None:
    await grpc_harness.trivial_server(Trivial(), port)


async def _real(port: int, db_url: str, redis_url: str, prefix: str, no_near: bool, reuse_port: bool) -> None:
    from services.api_grpc import cache, page_tokens
    from services.api_grpc.bootstrap import redis_breaker, redis_client
    from services.api_grpc.decisions import Facts
    from services.api_grpc.near_cache import NearCache
    from services.api_grpc.queries import Queries
    from services.api_grpc.server import RateLimitConfig, build_server
    from services.api_grpc.service import PaymentApi
    from shared.catalog import load_catalog
    from shared.config import DEFAULT_CATALOG_PATH
    from shared.db import open_pool
    from shared.tracing import setup as setup_tracing

    setup_tracing("api_grpc")  # as the runner does: the OTEL_* variables of this run decide

    class NoBus:
        async def publish(self, *args: Any) -> None:
            raise RuntimeError("the benchmark publishes nothing")

    pool = await open_pool(db_url)
    redis = redis_client(redis_url)  # as `serve` makes it: no socket timeout
    breaker = redis_breaker()
    near = None if no_near else NearCache()
    entitlements = cache.EntitlementCache(redis, breaker, prefix, near=near)
    entitlements.start()
    api = PaymentApi(
        Facts.of(load_catalog(DEFAULT_CATALOG_PATH)), Queries(pool), entitlements,
        NoBus(), None, page_tokens.PageTokens(page_tokens.derive_key("bench")),
    )
    keys = (ApiKey("bench", SecretStr(KEY), frozenset({"read"})),)
    server = build_server(api, keys, port=port, redis=redis, redis_breaker=breaker,
                          rate_limit=RateLimitConfig(rate=1e6, burst=1e6, prefix=prefix), reuse_port=reuse_port)
    await server.start()
    grpc_harness.listening()
    await server.grpc_server.wait_for_termination()


async def _load(port: int, bulk: bool, inflight: int, seconds: float, connections: int = 1) -> list[float]:
    channels = grpc_harness.channels(port, connections)
    stubs = [service_pb2_grpc.PaymentServiceStub(channel) for channel in channels]
    stub = stubs[0]
    md = METADATA
    features = (FEATURES * 8)[:50]
    latencies: list[float] = []

    async def worker(n: int) -> None:
        stub = stubs[n % len(stubs)]
        i = n
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            subject = service_pb2.Subject(family_id=f"fam{i % 50}")
            started = time.perf_counter()
            if bulk:
                await stub.BulkCheckEntitlements(
                    service_pb2.BulkCheckEntitlementsRequest(subjects=[subject], feature_codes=features), metadata=md)
            else:
                await stub.CheckEntitlement(
                    service_pb2.CheckEntitlementRequest(subject=subject, feature_code=FEATURES[i % 7]), metadata=md)
            latencies.append(time.perf_counter() - started)
            i += 1

    # Warm up the channels and the cache, then measure.
    for n in range(50):
        await stubs[n % len(stubs)].BulkCheckEntitlements(service_pb2.BulkCheckEntitlementsRequest(
            subjects=[service_pb2.Subject(family_id=f"fam{n}")], feature_codes=FEATURES), metadata=md)
    del stub
    await asyncio.gather(*(worker(n) for n in range(inflight)))
    for channel in channels:
        await channel.close()
    return latencies


def measure(port: int, bulk: bool, inflight: int, seconds: float, clients: int = 1) -> dict[str, float]:
    """`inflight` calls at all times, from `clients` processes (4 connections each if more than one)."""
    return grpc_harness.measure(_load, port, bulk, inflight, seconds, clients)


async def warm_redis(redis_url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    now = int(time.time())
    for n in range(50):
        fields = {f: orjson.dumps({"allowed": True, "status": "active", "access_level": "full", "plan_id": "pro",
                                   "expires_at": now + 86400, "usage_limit": None, "limit_period": "none",
                                   "decided_by_event_id": "evt_bench", "grace_until": None, "after_grace": None})
                  for f in FEATURES}
        fields["_watermark"] = orjson.dumps({"created": now, "event_id": "evt_bench"})
        await redis.hset(f"{prefix}ent:family:fam{n}", mapping=fields)  # type: ignore[arg-type]
        await redis.expire(f"{prefix}ent:family:fam{n}", 600)
    await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-near-cache", action="store_true", help="every check reads Redis")
    parser.add_argument("--processes", type=int, default=1, help="N API and N trivial server processes, N clients")
    args = parser.parse_args()
    n = args.processes
    from shared.devbroker import free_port
    from shared.migrate import migrate_up

    settings = Settings()
    db_url = conninfo.make_conninfo(settings.database_url.get_secret_value(), dbname="paymentsvc_bench")
    migrate_up(db_url, create_database=True)
    redis_url = settings.redis_url.get_secret_value()
    prefix = f"bench:{secrets.token_hex(4)}:"
    asyncio.run(warm_redis(redis_url, prefix))
    ports = {"trivial": free_port(), "api": free_port()}
    each = f" x{n} processes" if n > 1 else ""
    with grpc_harness.servers(n, _trivial, ports["trivial"], _real, ports["api"],
                              (db_url, redis_url, prefix, args.no_near_cache)):
        for label, bulk in (("CheckEntitlement", False), ("BulkCheckEntitlements x50", True)):
            base = measure(ports["trivial"], bulk, 64, args.seconds, n)
            real = measure(ports["api"], bulk, 64, args.seconds, n)
            low = measure(ports["api"], bulk, 4, args.seconds, min(n, 4))
            print(f"{label} @64{each}: trivial {base['qps']:.0f} qps p50 {base['p50_ms']:.2f} p99 {base['p99_ms']:.2f} ms | "
                  f"api {real['qps']:.0f} qps p50 {real['p50_ms']:.2f} p99 {real['p99_ms']:.2f} ms | "
                  f"QPS ratio {real['qps'] / base['qps']:.2f}, p99 ratio {real['p99_ms'] / base['p99_ms']:.2f}")
            print(f"{label} @4{each}: api p50 {low['p50_ms']:.2f} ms p99 {low['p99_ms']:.2f} ms")


if __name__ == "__main__":
    main()
