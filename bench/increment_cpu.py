"""CPU time of IncrementUsage's own Python per call, in process, and a digest of what it
produced, so two trees can be compared on a shared machine (issue 13):

    .venv/bin/python bench/increment_cpu.py [--calls 20000] [--rounds 7] [--tracing none|sdk]
    .venv/bin/python bench/increment_cpu.py --e2e [--calls 20000] [--rounds 5] [--inflight 64]

Default: `PaymentServicer.IncrementUsage` behind the `CallInterceptor`, one call after
the other, with everything real (UsageApi, Counters, the model, KafkaUsageBus, enqueue,
the trace headers) except the two I/O ends: the increment script is answered in
process as the Lua script answers (`new`, its record) and the producer's `send` returns
a delivery future already resolved. What is left is the Python of a call. `--tracing
none` runs it as bench/usage.py's server does (no tracer provider: each event gets a
fresh traceparent); `sdk` as `paymentsvc serve` does with no exporter (tracing.setup:
unsampled SDK spans). The subject is bench/usage.py's: a pro family's pool, api_calls,
amount 1, no member, no metadata.

Each round is `--calls` calls; it prints the best round's `time.process_time` per call
and a digest of every record handed to the producer (topic, key, value, headers) and
every response. The clock and the random ids are seeded, so the digest is the same in
every run of one tree: two trees that put the same bytes on the wire (and draw the same
random ids in the same order) print the same.

`--e2e`: `UsageApi.increment` against the real Redis (REDIS_URL, a fresh prefix, deleted
at the end) and a Tansu broker of its own (shared.devbroker), `--inflight` calls at a
time, every one waiting for the broker's acknowledgement; prints the best round's CPU
time of this process per call (Tansu runs in a process of its own and is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import secrets
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from pydantic import SecretStr  # noqa: E402

from domain.usage.counters import Counters  # noqa: E402
from payment.v1 import service_pb2  # noqa: E402
from services.api_grpc import page_tokens  # noqa: E402
from services.api_grpc.decisions import Decision, Facts  # noqa: E402
from services.api_grpc.interceptors import CallInterceptor  # noqa: E402
from services.api_grpc.servicer import PaymentServicer  # noqa: E402
from services.api_grpc.usage import KafkaUsageBus, UsageApi  # noqa: E402
from services.api_grpc.validation import SubjectIds  # noqa: E402
from shared.catalog import load_catalog  # noqa: E402
from shared.config import DEFAULT_CATALOG_PATH, ApiKey  # noqa: E402

FACTS = Facts.of(load_catalog(DEFAULT_CATALOG_PATH))
KEY = "bench-key"
SUBJECTS = 50
T0 = 1_900_000_000.0  # 2030-03-17: a fixed clock, advanced 0.7 ms per call


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Entitled:
    """The pro plan, as the entitlement cache answers it for bench/usage.py's families."""

    async def check(self, subject: SubjectIds, feature_code: str, timeout: float) -> tuple[Decision, None]:
        return Decision(True, "granted", "pro", "active", 0, "full", "evt_1", 500_000, "billing_period"), None


class NoPeriod:
    async def billing_period(self, *args: Any) -> None:
        return None  # no subscription period stored: the calendar month


class InProcessScript:
    """The increment script's answer without Redis: the record the Lua script writes."""

    def __init__(self) -> None:
        self.used: dict[str, int] = {}

    async def __call__(self, keys: list[str], args: list[Any]) -> list[bytes]:
        used = self.used[keys[1]] = self.used.get(keys[1], 0) + int(args[0])
        return [b"new", b"P|1|%d|%d|0|%s" % (used, int(args[0]), args[6])]


class InProcessRedis:
    def __init__(self) -> None:
        self.script = InProcessScript()

    def register_script(self, source: str) -> Any:
        return self.script


class Acknowledged:
    partition = 0
    offset = 0


class DigestProducer:
    """`send` as aiokafka's: returns the delivery future, here already resolved; every
    record goes into the digest."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.loop = asyncio.get_running_loop()

    async def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None) -> Any:
        d = self.digest
        d.update(repr((topic, key, value, list(headers or ()))).encode())
        ack = self.loop.create_future()
        ack.set_result(Acknowledged())
        return ack


class Context:
    """What the servicer and the interceptor read of a grpc.aio context."""

    _metadata = (("authorization", f"Bearer {KEY}"),)

    def invocation_metadata(self) -> Any:
        return self._metadata

    def time_remaining(self) -> float:
        return 10.0

    def code(self) -> None:
        return None

    async def abort(self, code: Any, message: str, trailing_metadata: Any = ()) -> None:
        raise RuntimeError(f"{code}: {message}")


async def in_process(calls: int, rounds: int) -> None:
    clock = Clock()
    producer = DigestProducer()
    tokens = page_tokens.PageTokens(page_tokens.derive_key("bench"))
    usage = UsageApi(FACTS, Entitled(), NoPeriod(), Counters(InProcessRedis()), KafkaUsageBus(producer, "usage"),  # type: ignore[arg-type]
                     tokens, clock=clock)
    servicer = PaymentServicer(None, usage)  # type: ignore[arg-type]
    keys = (ApiKey("bench", SecretStr(KEY), frozenset({"read", "write"})),)
    handler = CallInterceptor(keys).wrap(servicer.IncrementUsage, "IncrementUsage")
    context = Context()
    requests = [
        service_pb2.IncrementUsageRequest(
            subject=service_pb2.Subject(family_id=f"fam{i % SUBJECTS}"), feature_code="api_calls", amount=1,
            idempotency_key=f"run-{i}",
        )
        for i in range(calls)
    ]
    responses = hashlib.sha256()
    best = float("inf")
    for r in range(rounds):
        for i, request in enumerate(requests):  # new keys each round: every call counts anew
            request.idempotency_key = f"run{r}-{i}"
        started = time.process_time()
        for i, request in enumerate(requests):
            clock.now = T0 + (r * calls + i) * 0.0007
            response = await handler(request, context)
            responses.update(response.SerializeToString())
        best = min(best, time.process_time() - started)
    print(f"in process: {calls} calls x {rounds} rounds, best {best / calls * 1e6:.1f} µs/call (process_time)")
    print(f"digest of the records {producer.digest.hexdigest()[:16]}, of the responses {responses.hexdigest()[:16]}")


async def end_to_end(calls: int, rounds: int, inflight: int) -> None:
    from redis.asyncio import Redis

    from shared.devbroker import DevBroker, ensure_topics
    from shared.kafka import make_producer

    prefix = f"bench:{secrets.token_hex(4)}:"
    redis = Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    counters = Counters(redis, prefix)
    await redis.set(counters.keys.ready, "1")
    try:
        async with DevBroker() as broker:
            await ensure_topics(broker.bootstrap_servers, ["usage"], partitions=3)
            producer = make_producer(broker.bootstrap_servers)
            await producer.start()
            try:
                tokens = page_tokens.PageTokens(page_tokens.derive_key("bench"))
                usage = UsageApi(FACTS, Entitled(), NoPeriod(), counters, KafkaUsageBus(producer, "usage"), tokens)  # type: ignore[arg-type]
                subjects = [SubjectIds("", f"fam{i}") for i in range(SUBJECTS)]
                best = float("inf")
                for r in range(rounds + 1):  # the first round warms the connections: not counted
                    n = calls if r else min(calls, 2000)
                    keys = iter(range(n))

                    async def worker(r: int = r, keys: Any = keys) -> None:
                        for i in keys:
                            await usage.increment(subjects[i % SUBJECTS], "api_calls", 1, f"run{r}-{i}", {}, 10.0)

                    started = time.process_time()
                    await asyncio.gather(*(worker() for _ in range(inflight)))
                    if r:
                        best = min(best, time.process_time() - started)
                print(f"end to end: {calls} calls x {rounds} rounds, {inflight} in flight, "
                      f"best {best / calls * 1e6:.1f} µs/call (process_time of this process)")
            finally:
                await producer.stop()
    finally:
        async for key in redis.scan_iter(f"{prefix}*", count=1000):
            await redis.delete(key)
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=0, help="default 7, with --e2e 5")
    parser.add_argument("--tracing", choices=("none", "sdk"), default="none")
    parser.add_argument("--e2e", action="store_true")
    parser.add_argument("--inflight", type=int, default=64)
    args = parser.parse_args()
    random.seed(13)  # the trace ids (ours and the SDK's come from `random`)
    if args.tracing == "sdk":
        os.environ.pop("OTEL_SDK_DISABLED", None)
        from shared.tracing import setup

        setup("api_grpc")  # no exporter variables: unsampled SDK spans, as `serve` runs by default
    import logging

    import uvloop

    from paymentsvc.runner import tune_gc

    logging.disable(logging.INFO)
    tune_gc()
    if args.e2e:
        uvloop.run(end_to_end(args.calls, args.rounds or 5, args.inflight))
    else:
        uvloop.run(in_process(args.calls, args.rounds or 7))


if __name__ == "__main__":
    main()
