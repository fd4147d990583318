"""Server interceptors, one concern each (the grpc-interceptor habit).

Order, outermost first (server.py): Tracing, ExceptionMapping, Metrics, RequestLog, Auth,
RateLimit, Deadline. Inner layers raise domain errors; ExceptionMapping alone turns
exceptions into status codes, and Metrics / RequestLog learn the code an exception
will get from the same function (`status_of`).

Only unary-unary methods of payment.v1.PaymentService are wrapped: health checking
and reflection pass through untouched (and need no API key).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
import psycopg
import redis.exceptions
from psycopg_pool import PoolTimeout
from redis.asyncio import Redis

from services.api_grpc.context import CALLER
from services.api_grpc.errors import (
    ApiError,
    DeadlineExceeded,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
)
from shared import tracing
from shared.breaker import Breaker, BreakerOpen
from shared.config import ApiKey
from shared.metrics import (
    API_HANDLED,
    API_LATENCY,
    API_RATE_LIMIT_FAIL_OPEN,
    API_RATE_LIMITED,
)

log = logging.getLogger("api_grpc")
SERVICE_PREFIX = "/payment.v1.PaymentService/"

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]

# The scope each method needs. Anything not listed needs `admin`: a new method is
# closed until someone decides otherwise.
SCOPES: dict[str, str] = {
    "CheckEntitlement": "read",
    "BulkCheckEntitlements": "read",
    "ListEntitlements": "read",
    "ListSubscriptions": "read",
    "ListAccessChanges": "read",
    "GetPayment": "read",
    "GetPaymentsByCustomer": "read",
    "ListPayments": "read",
    "ListUsage": "read",
    "CheckQuota": "read",
    "CreatePayment": "write",
    "CreateCheckoutSession": "write",
    "IncrementUsage": "write",
    "UpdatePaymentStatus": "admin",
}


def short_name(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client message for an exception (the one mapping)."""
    if isinstance(exc, ApiError):
        return exc.code, exc.message
    if isinstance(exc, psycopg.OperationalError | PoolTimeout):
        return grpc.StatusCode.UNAVAILABLE, "the database is unavailable; retry later"
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return grpc.StatusCode.UNAVAILABLE, "the cache is unavailable; retry later"
    if isinstance(exc, BreakerOpen):
        return grpc.StatusCode.UNAVAILABLE, f"{exc.name} is unavailable; retry later"
    return grpc.StatusCode.INTERNAL, "internal error"


class UnaryInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the unary-unary handlers of PaymentService in `intercept`.

    grpc.aio asks every interceptor for the handler on every call; the wrapped handler is
    built once per method (and inner handler) and reused.
    """

    _wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]]

    async def intercept(
        self, method: Handler, request: Any, context: grpc.aio.ServicerContext, name: str
    ) -> Any:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full_name = handler_call_details.method
        try:
            cache = self._wrapped
        except AttributeError:
            cache = self._wrapped = {}
        known = cache.get(full_name)
        if known is not None and known[0] is handler:
            return known[1]
        if handler is None or handler.unary_unary is None or not full_name.startswith(SERVICE_PREFIX):
            return handler
        inner, name, intercept = handler.unary_unary, short_name(full_name), self.intercept

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await intercept(inner, request, context, name)

        result = grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        if len(cache) < 1000:
            cache[full_name] = (handler, result)
        return result


# Server errors by the semantic conventions of gRPC spans; the rest are the caller's.
_SERVER_ERRORS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})


class Tracing(UnaryInterceptor):
    """One SERVER span per call, continuing the caller's `traceparent` metadata, current
    for everything the call does (the events it publishes carry its context).

    Explicit rather than opentelemetry-instrumentation-grpc's interceptor: this one
    reuses the chain's per-method wrapping and sets attributes only on a kept span, so
    an unsampled call costs an id and a context switch (README, "Tracing")."""

    async def intercept(
        self, method: Handler, request: Any, context: grpc.aio.ServicerContext, name: str
    ) -> Any:
        parent = tracing.extract_headers(context.invocation_metadata() or ())
        with tracing.tracer().start_as_current_span(
            f"{SERVICE_PREFIX[1:]}{name}", context=parent, kind=tracing.SpanKind.SERVER,
            record_exception=False, set_status_on_exception=False,
        ) as span:
            code = grpc.StatusCode.OK
            try:
                return await method(request, context)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[assignment]
                raise
            except BaseException as exc:
                code = status_of(exc)[0] if isinstance(exc, Exception) else grpc.StatusCode.CANCELLED
                raise
            finally:
                if span.is_recording():
                    span.set_attribute("rpc.system", "grpc")
                    span.set_attribute("rpc.service", SERVICE_PREFIX[1:-1])
                    span.set_attribute("rpc.method", name)
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code in _SERVER_ERRORS:
                        span.set_status(tracing.Status(tracing.StatusCode.ERROR, code.name))


class ExceptionMapping(UnaryInterceptor):
    """Domain and driver errors -> status codes with their message; anything else ->
    INTERNAL with an error id that is logged with the traceback (never sent)."""

    async def intercept(
        self, method: Handler, request: Any, context: grpc.aio.ServicerContext, name: str
    ) -> Any:
        try:
            return await method(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            code, message = status_of(exc)
            trailers: tuple[tuple[str, str], ...] = ()
            if isinstance(exc, RateLimited):
                trailers = (("retry-after", str(max(1, math.ceil(exc.retry_after_s)))),)
            if code == grpc.StatusCode.INTERNAL:
                error_id = uuid.uuid4().hex[:12]
                log.error("unhandled error in %s (error id %s)", name, error_id, exc_info=exc)
                message = f"internal error (error id {error_id})"
            await context.abort(code, message, trailing_metadata=trailers)


class Metrics(UnaryInterceptor):
    """Handled total by method and code, and latency by method (label children bound
    once, not looked up per call)."""

    def __init__(self) -> None:
        self._handled: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._latency: dict[str, Any] = {}

    async def intercept(
        self, method: Handler, request: Any, context: grpc.aio.ServicerContext, name: str
    ) -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await method(request, context)
        except BaseException as exc:
            code = status_of(exc)[0] if isinstance(exc, Exception) else grpc.StatusCode.CANCELLED
            raise
        finally:
            elapsed = time.perf_counter() - started
            handled = self._handled.get((name, code))
            if handled is None:
                handled = self._handled[(name, code)] = API_HANDLED.labels(name, code.name)
            handled.inc()
            latency = self._latency.get(name)
            if latency is None:
                latency = self._latency[name] = API_LATENCY.labels(name)
            latency.observe(elapsed)


class RequestLog(UnaryInterceptor):
    """One structured line per call: method, code, duration and the key's name. Never the
    key, the request or the response (they may hold card data or a client_secret).

    Successes are logged at DEBUG (the metrics count them), failures at INFO, INTERNAL
    at WARNING: at thousands of calls per second a line per success costs more CPU than
    the call."""

    async def intercept(
        self, method: Handler, request: Any, context: grpc.aio.ServicerContext, name: str
    ) -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await method(request, context)
        except BaseException as exc:
            code = status_of(exc)[0] if isinstance(exc, Exception) else grpc.StatusCode.CANCELLED
            raise
        finally:
            if code is grpc.StatusCode.OK:
                level = logging.DEBUG
            elif code is grpc.StatusCode.INTERNAL:
                level = logging.WARNING
            else:
                level = logging.INFO
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "rpc",
                    extra={
                        "method": name,
                        "code": code.name,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                        "key": CALLER.get(),
                    },
                )


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _find(token: bytes, secrets: Sequence[tuple[bytes, ApiKey]]) -> ApiKey | None:
    found = None
    for secret, key in secrets:
        if hmac.compare_digest(token, secret):
            found = key
    return found


class Auth(UnaryInterceptor):
    """`authorization: Bearer <key>` against the configured keys, then the method's scope."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._keys = tuple(keys)
        self._secrets = [(key.secret.get_secret_value().encode(), key) for key in self._keys]

    async def intercept(
        self, method: Handler, request: Any, context: grpc.aio.ServicerContext, name: str
    ) -> Any:
        token = bearer_token(context.invocation_metadata())
        if token is None:
            raise Unauthenticated("missing API key: send `authorization: Bearer <key>`")
        key = _find(token.encode(), self._secrets)
        if key is None:
            raise Unauthenticated("unknown API key")
        CALLER.set(key.name)
        needed = SCOPES.get(name, "admin")
        if needed not in key.scopes:
            raise PermissionDenied(f"{name} needs the {needed!r} scope")
        return await method(request, context)


_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local want = tonumber(ARGV[3]) or 1
local allowed = 0
local wait = 0
if tokens >= 1 then
  allowed = math.min(want, math.floor(tokens))
  tokens = tokens - allowed
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(wait)}
"""


class RateLimit(UnaryInterceptor):
    """A token bucket per API key in Redis (refilled at `rate`/s up to `burst`; one
    script call, atomic). Redis down or its breaker open: fail open, and count it.

    Each replica takes tokens from the shared bucket in small leases rather than one
    per call: up to `rate * lease_s` tokens (at most `max_lease`, at least 1) in one
    script call, spent locally until used up or `lease_s` old (then dropped). The
    limit stays global; the cost is at most one lease per key and replica admitted
    early or thrown away. One refill at a time per key (the others wait for it).
    """

    def __init__(
        self,
        client: Redis,
        breaker: Breaker,
        *,
        rate: float = 1000.0,
        burst: float = 2000.0,
        prefix: str = "",
        timeout_s: float = 0.2,
        lease_s: float = 0.05,
        max_lease: int = 100,
        per_key: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        self._script = client.register_script(_TOKEN_BUCKET)
        self._breaker = breaker
        self._rate, self._burst = rate, burst
        self._per_key = dict(per_key or {})  # caller name -> (rate, burst), overriding the default
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._lease_s = lease_s
        self._max_lease = max_lease
        self._leases: dict[str, list[float]] = {}  # caller -> [tokens left, valid until]
        self._refills: dict[str, asyncio.Future[tuple[bool, float]]] = {}

    async def intercept(
        self, method: Handler, request: Any, context: grpc.aio.ServicerContext, name: str
    ) -> Any:
        caller = CALLER.get()
        lease = self._leases.get(caller)
        if lease is None or lease[0] < 1 or time.monotonic() >= lease[1]:
            allowed, wait = await self._admit(caller)
            if not allowed:
                API_RATE_LIMITED.labels(caller).inc()
                raise RateLimited(f"rate limit of {self._limit(caller)[0]:g}/s exceeded for this API key", wait)
        else:
            lease[0] -= 1
        return await method(request, context)

    def _limit(self, caller: str) -> tuple[float, float]:
        return self._per_key.get(caller, (self._rate, self._burst))

    def _lease_size(self, caller: str) -> int:
        rate, burst = self._limit(caller)
        return max(1, min(self._max_lease, int(min(burst, rate * self._lease_s))))

    async def _admit(self, caller: str) -> tuple[bool, float]:
        while True:
            refill = self._refills.get(caller)
            if refill is None:
                refill = self._refills[caller] = asyncio.ensure_future(self._refill(caller))
            allowed, wait = await asyncio.shield(refill)
            if not allowed:
                return False, wait
            lease = self._leases.get(caller)
            if lease is None:  # failed open
                return True, 0.0
            if lease[0] >= 1 and time.monotonic() < lease[1]:
                lease[0] -= 1
                return True, 0.0

    async def _refill(self, caller: str) -> tuple[bool, float]:
        try:
            granted, wait = await self._take(caller, self._lease_size(caller))
            if granted < 0:
                self._leases.pop(caller, None)
                return True, 0.0
            if granted == 0:
                return False, wait
            self._leases[caller] = [float(granted), time.monotonic() + self._lease_s]
            return True, 0.0
        finally:
            self._refills.pop(caller, None)

    async def _take(self, caller: str, want: int = 1) -> tuple[int, float]:
        """(tokens granted, seconds to wait when none); (-1, 0) when failing open."""

        async def run() -> Any:
            async with asyncio.timeout(self._timeout_s):
                return await self._script(
                    keys=[f"{self._prefix}rl:{caller}"], args=[*self._limit(caller), want]
                )

        try:
            granted, wait = await self._breaker.call(run)
        except Exception:  # fail open: the limiter must not take the API down with Redis
            API_RATE_LIMIT_FAIL_OPEN.inc()
            return -1, 0.0
        return int(granted), float(wait)


class Deadline(UnaryInterceptor):
    """Runs the call within the client's deadline; DEADLINE_EXCEEDED when it runs out."""

    async def intercept(
        self, method: Handler, request: Any, context: grpc.aio.ServicerContext, name: str
    ) -> Any:
        remaining = context.time_remaining()
        if remaining is None:
            return await method(request, context)
        timeout = asyncio.timeout(max(0.0, remaining))
        try:
            async with timeout:
                return await method(request, context)
        except TimeoutError:
            if timeout.expired():
                raise DeadlineExceeded(f"the deadline ran out during {name}") from None
            raise
