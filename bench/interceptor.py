"""What the API's interceptor costs per call in Python, without the transport.

    .venv/bin/python bench/interceptor.py [--calls 20000] [--suspend 0,3] [--tree PATH]

grpc.aio's walk over the server's interceptors (as its Cython `_run_interceptor` does
it, once per call) and the wrapped handler of a trivial CheckEntitlement, driven by
`coroutine.send` in a loop: no event loop, no sockets, no other process. Tracing is set
up as the runner does it with nothing configured (unsampled spans with ids), the rate
limiter's lease is full (its Redis refill is a call in a hundred), and the handler
suspends `--suspend` times per call (IncrementUsage suspends at least twice: each
resume passes through every awaiting layer). Prints CPU µs per call (`process_time`),
the best and the median of 7 rounds: on a shared machine this is the figure that holds
still, where the ratio benchmarks move by +-0.2 (docs/performance.md, issue 13).

`--tree` measures another checkout's interceptors (a baseline worktree): before the
one pass (issue 13) they were a chain of seven, which this builds as server.py did.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--suspend", default="0,3", help="suspensions of the handler per call, comma-separated")
    parser.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent))
    args = parser.parse_args()
    sys.path[:0] = [args.tree, f"{args.tree}/gen"]

    import grpc
    from pydantic import SecretStr
    from redis.asyncio import Redis

    from payment.v1 import service_pb2
    from services.api_grpc import interceptors
    from services.api_grpc.bootstrap import redis_breaker
    from shared import tracing
    from shared.config import ApiKey

    logging.disable(logging.INFO)
    tracing.setup("bench")
    keys = [ApiKey("bench", SecretStr("bench-key"), frozenset({"read"}))]
    redis = Redis.from_url("redis://127.0.0.1:1/0")  # never connected: the lease is full
    chain: list[Any]
    if hasattr(interceptors, "CallInterceptor"):
        limiter = interceptors.RateLimiter(redis, redis_breaker(), rate=1e6, burst=1e6)
        limiter._leases["bench"] = [1e15, 1e18]
        chain, kind = [interceptors.CallInterceptor(keys, limiter)], "one pass"
    else:  # the chain of seven, as server.py built it before issue 13
        old: Any = interceptors
        limit = old.RateLimit(redis, redis_breaker(), rate=1e6, burst=1e6)
        limit._leases["bench"] = [1e15, 1e18]
        chain = [old.Tracing(), old.ExceptionMapping(), old.Metrics(), old.RequestLog(), old.Auth(keys), limit,
                 old.Deadline()]
        kind = "chain of 7"

    class Suspend:
        def __await__(self) -> Any:
            yield

    suspensions = 0

    async def check(request: Any, context: Any) -> Any:
        for _ in range(suspensions):
            await Suspend()
        return service_pb2.CheckEntitlementResponse(allowed=True)

    handler = grpc.unary_unary_rpc_method_handler(check)

    class Details:
        method = "/payment.v1.PaymentService/CheckEntitlement"
        invocation_metadata = (("authorization", "Bearer bench-key"),)

    class Context:
        def invocation_metadata(self) -> Any:
            return (("authorization", "Bearer bench-key"), ("user-agent", "grpc-python-asyncio"))

        def time_remaining(self) -> None:
            return None

        def code(self) -> None:
            return None

    async def walk(remaining: Any, details: Any) -> Any:
        interceptor = next(remaining, None)
        if interceptor is None:
            return handler
        return await interceptor.intercept_service(functools.partial(walk, remaining), details)

    async def call(request: Any, context: Any, details: Any) -> Any:
        found = await walk(iter(chain), details)
        return await found.unary_unary(request, context)

    def run(n: int) -> float:
        request, context, details = service_pb2.CheckEntitlementRequest(feature_code="projects"), Context(), Details()
        started = time.process_time()
        for _ in range(n):
            coroutine = call(request, context, details)
            try:
                while True:
                    coroutine.send(None)
            except StopIteration:
                pass
        return (time.process_time() - started) / n * 1e6

    print(f"{'interceptor':<12} | {'suspensions':>11} | {'best µs/call':>12} | {'median':>6}")
    for suspensions in (int(x) for x in args.suspend.split(",")):
        run(max(1, args.calls // 10))
        rounds = sorted(run(args.calls) for _ in range(7))
        print(f"{kind:<12} | {suspensions:>11} | {rounds[0]:>12.1f} | {rounds[3]:>6.1f}")


if __name__ == "__main__":
    main()
