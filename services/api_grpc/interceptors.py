"""The server's one interceptor: every concern of a call in one pass.

In order, as seen by the call: tracing (a SERVER span continuing the caller's
`traceparent`), authentication and the method's scope, the per-key rate limit, the
client's deadline, the handler, then the mapping of exceptions to status codes, the
metrics and the log line. Inner code raises domain errors; `status_of` is the one
mapping, used for the status sent, the metric's code, the log and the span alike.

One interceptor rather than a chain of seven (the grpc-interceptor habit, one concern
each): grpc.aio asks each interceptor for the handler on every call and each layer
adds two coroutine frames to every await, about 45 µs of a 500 µs check (docs/
performance.md, issue 13). The concerns stay separate functions and objects
(`Authenticator`, `RateLimiter`); only the awaiting is done once.

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

# Server errors by the semantic conventions of gRPC spans; the rest are the caller's.
_SERVER_ERRORS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})
_OK = grpc.StatusCode.OK


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


def log_level(code: grpc.StatusCode) -> int:
    """Successes at DEBUG (the metrics count them), failures at INFO, INTERNAL at WARNING:
    at thousands of calls per second a line per success costs more CPU than the call."""
    if code is _OK:
        return logging.DEBUG
    return logging.WARNING if code is grpc.StatusCode.INTERNAL else logging.INFO


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


class Authenticator:
    """`authorization: Bearer <key>` against the configured keys, then the method's scope."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._keys = tuple(keys)
        self._secrets = [(key.secret.get_secret_value().encode(), key) for key in self._keys]

    def caller(self, metadata: Sequence[tuple[str, Any]] | None, method: str) -> str:
        """The name of the key that may call `method`; raises Unauthenticated or
        PermissionDenied."""
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated("missing API key: send `authorization: Bearer <key>`")
        key = _find(token.encode(), self._secrets)
        if key is None:
            raise Unauthenticated("unknown API key")
        needed = SCOPES.get(method, "admin")
        if needed not in key.scopes:
            raise PermissionDenied(f"{method} needs the {needed!r} scope")
        return key.name


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


class RateLimiter:
    """A token bucket per API key in Redis (refilled at `rate`/s up to `burst`; one
    script call, atomic). Redis down or its breaker open: fail open, and count it.

    Each replica takes tokens from the shared bucket in small leases rather than one
    per call: up to `rate * lease_s` tokens (at most `max_lease`, at least 1) in one
    script call, spent locally until used up or `lease_s` old (then dropped). The
    limit stays global; the cost is at most one lease per key and replica admitted
    early or thrown away. One refill at a time per key (the others wait for it).

    `take` spends from the lease without awaiting (most calls); `admit` refills.
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

    def take(self, caller: str) -> bool:
        """Spend one token of this replica's lease; False when it needs `admit`."""
        lease = self._leases.get(caller)
        if lease is None or lease[0] < 1 or time.monotonic() >= lease[1]:
            return False
        lease[0] -= 1
        return True

    async def admit(self, caller: str) -> None:
        """Refill the lease and spend one token; raises RateLimited when the bucket is empty."""
        allowed, wait = await self._admit(caller)
        if not allowed:
            API_RATE_LIMITED.labels(caller).inc()
            raise RateLimited(f"rate limit of {self._limit(caller)[0]:g}/s exceeded for this API key", wait)

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


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Every concern of a PaymentService call, with one await of the handler (module doc).

    - tracing: one SERVER span per call, continuing the caller's `traceparent` metadata,
      current for everything the call does (the events it publishes carry its context);
      attributes only on a kept span, so an unsampled call costs an id and a context
      switch (README, "Tracing");
    - auth: the key's name becomes `CALLER` for the handler and the log;
    - rate limit (when a limiter is given), then the client's deadline:
      DEADLINE_EXCEEDED when it runs out;
    - errors: domain and driver errors -> their status codes and messages; anything else
      -> INTERNAL with an error id that is logged with the traceback (never sent);
    - metrics: handled total by method and code, latency by method (label children
      bound once); a log line per call: method, code, duration and the key's name, never
      the key, the request or the response (they may hold card data or a client_secret).

    The wrapped handler is built once per method (and inner handler) and reused.
    """

    def __init__(self, keys: Sequence[ApiKey], limiter: RateLimiter | None = None) -> None:
        self._auth = Authenticator(keys)
        self._limiter = limiter
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full_name = handler_call_details.method
        known = self._wrapped.get(full_name)
        if known is not None and known[0] is handler:
            return known[1]
        if handler is None or handler.unary_unary is None or not full_name.startswith(SERVICE_PREFIX):
            return handler
        result = grpc.unary_unary_rpc_method_handler(
            self.wrap(handler.unary_unary, short_name(full_name)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        if len(self._wrapped) < 1000:
            self._wrapped[full_name] = (handler, result)
        return result

    def wrap(self, inner: Handler, name: str) -> Handler:
        """`inner` (the method `name`) with every concern around it, in one coroutine."""
        span_name = f"{SERVICE_PREFIX[1:]}{name}"
        service = SERVICE_PREFIX[1:-1]
        tracer = tracing.tracer  # looked up per call: `tracing.setup` may come after the server
        extract, activate, deactivate = tracing.extract_headers, tracing.activate, tracing.deactivate
        caller_of = self._auth.caller
        limiter = self._limiter
        latency = API_LATENCY.labels(name)
        handled: dict[grpc.StatusCode, Any] = {}
        server_kind = tracing.SpanKind.SERVER

        async def intercepted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            metadata = context.invocation_metadata() or ()
            code = _OK
            span = tracer().start_span(span_name, context=extract(metadata), kind=server_kind)
            token = activate(span)
            try:
                caller = caller_of(metadata, name)
                CALLER.set(caller)
                if limiter is not None and not limiter.take(caller):
                    await limiter.admit(caller)
                remaining = context.time_remaining()
                if remaining is None:
                    return await inner(request, context)
                timeout = asyncio.timeout(max(0.0, remaining))
                try:
                    async with timeout:
                        return await inner(request, context)
                except TimeoutError:
                    if timeout.expired():
                        raise DeadlineExceeded(f"the deadline ran out during {name}") from None
                    raise
            except grpc.aio.AbortError:  # the handler aborted the call itself
                code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[assignment]
                raise
            except Exception as exc:
                code, message = status_of(exc)
                trailers: tuple[tuple[str, str], ...] = ()
                if isinstance(exc, RateLimited):
                    trailers = (("retry-after", str(max(1, math.ceil(exc.retry_after_s)))),)
                if code is grpc.StatusCode.INTERNAL:
                    error_id = uuid.uuid4().hex[:12]
                    log.error("unhandled error in %s (error id %s)", name, error_id, exc_info=exc)
                    message = f"internal error (error id {error_id})"
                await context.abort(code, message, trailing_metadata=trailers)
            except BaseException:  # cancelled: the client left, its deadline ran out, or the server stops
                # grpc cancels the handler itself when the deadline passes, which under load may
                # come before our timeout fires: that call ran out of time, it was not abandoned.
                left = context.time_remaining()
                code = grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0 else grpc.StatusCode.CANCELLED
                raise
            finally:
                elapsed = time.perf_counter() - started
                counter = handled.get(code)
                if counter is None:
                    counter = handled[code] = API_HANDLED.labels(name, code.name)
                counter.inc()
                latency.observe(elapsed)
                level = log_level(code)
                if log.isEnabledFor(level):
                    log.log(level, "rpc", extra={
                        "method": name, "code": code.name, "duration_ms": round(elapsed * 1000, 2),
                        "key": CALLER.get(),
                    })
                if span.is_recording():
                    span.set_attribute("rpc.system", "grpc")
                    span.set_attribute("rpc.service", service)
                    span.set_attribute("rpc.method", name)
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code in _SERVER_ERRORS:
                        span.set_status(tracing.Status(tracing.StatusCode.ERROR, code.name))
                deactivate(token)
                span.end()

        return intercepted
