"""Building the grpc.aio server: servicer, interceptors, health checking, reflection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis

from payment.v1 import service_pb2, service_pb2_grpc
from services.api_grpc import interceptors
from services.api_grpc.service import PaymentApi
from services.api_grpc.servicer import PaymentServicer
from services.api_grpc.usage import UsageApi
from shared.breaker import Breaker
from shared.config import ApiKey

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["PaymentService"].full_name


@dataclass(frozen=True)
class RateLimitConfig:
    rate: float = 1000.0
    burst: float = 2000.0
    prefix: str = ""
    per_key: tuple[tuple[str, float, float], ...] = ()  # (key name, rate, burst) overrides


@dataclass
class Server:
    """A started-or-not server with its health servicer, to flip to NOT_SERVING on stop."""

    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def start(self) -> None:
        await self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, then let calls in flight finish for up to `grace_s`."""
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace_s)


def build_server(
    api: PaymentApi,
    keys: Sequence[ApiKey],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    redis: Redis | None = None,
    redis_breaker: Breaker | None = None,
    rate_limit: RateLimitConfig | None = RateLimitConfig(),
    usage: UsageApi | None = None,
    reuse_port: bool = False,
) -> Server:
    """The server bound to host:port (0: a free port, see `.port`); not started.

    With `reuse_port`, other processes may listen on the same port (`serve --processes N`);
    off by default, so that a port already taken fails the bind instead of being shared.

    Rate limiting needs `redis` and `redis_breaker`; pass rate_limit=None to turn it off.
    Without `usage`, the usage RPCs answer UNIMPLEMENTED.
    """
    limiter = None
    if rate_limit is not None and redis is not None and redis_breaker is not None:
        limiter = interceptors.RateLimiter(
            redis, redis_breaker, rate=rate_limit.rate, burst=rate_limit.burst, prefix=rate_limit.prefix,
            per_key={name: (rate, burst) for name, rate, burst in rate_limit.per_key},
        )
    chain = [interceptors.CallInterceptor(keys, limiter)]
    server = grpc.aio.server(interceptors=chain, options=[("grpc.so_reuseport", int(reuse_port))])
    service_pb2_grpc.add_PaymentServiceServicer_to_server(PaymentServicer(api, usage), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    return Server(server, health_servicer, bound)
