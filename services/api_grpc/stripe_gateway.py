"""Stripe calls of the API, through the official SDK, a circuit breaker and a deadline.

Transient failures (connection errors, timeouts, 429, 5xx) count against the breaker
and become Unavailable; when the breaker is open, Stripe is not called at all. A
request Stripe rejects (4xx) becomes InvalidArgument or FailedPrecondition with
Stripe's message, and does not count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import stripe

from services.api_grpc.errors import FailedPrecondition, InvalidArgument, Unavailable
from shared.breaker import Breaker, BreakerOpen

T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError | TimeoutError):
        return True
    if isinstance(exc, stripe.StripeError):
        return (exc.http_status or 500) >= 500
    return False


def make_client(secret_key: str, api_base: str = "") -> stripe.StripeClient:
    """An SDK client on aiohttp, without SDK retries: the caller's deadline and the
    breaker decide, and idempotency keys make the caller's own retries safe."""
    kwargs: dict[str, Any] = {}
    if api_base:
        kwargs["base_addresses"] = {"api": api_base}
    return stripe.StripeClient(
        secret_key, http_client=stripe.AIOHTTPClient(), max_network_retries=0, **kwargs
    )


class StripeGateway:
    def __init__(self, client: stripe.StripeClient, breaker: Breaker) -> None:
        self._client = client
        self.breaker = breaker

    async def create_customer(self, params: dict[str, Any], idempotency_key: str, timeout: float) -> Any:
        v1 = self._client.v1
        return await self._call(
            lambda: v1.customers.create_async(params, {"idempotency_key": idempotency_key}),  # type: ignore[arg-type]
            timeout,
        )

    async def create_payment_intent(
        self, params: dict[str, Any], idempotency_key: str, timeout: float
    ) -> Any:
        v1 = self._client.v1
        return await self._call(
            lambda: v1.payment_intents.create_async(params, {"idempotency_key": idempotency_key}),  # type: ignore[arg-type]
            timeout,
        )

    async def create_checkout_session(
        self, params: dict[str, Any], idempotency_key: str, timeout: float
    ) -> Any:
        v1 = self._client.v1
        options = {"idempotency_key": idempotency_key} if idempotency_key else {}
        return await self._call(
            lambda: v1.checkout.sessions.create_async(params, options),  # type: ignore[arg-type]
            timeout,
        )

    async def _call(self, fn: Callable[[], Awaitable[T]], timeout: float) -> T:
        async def timed() -> T:
            async with asyncio.timeout(timeout):
                return await fn()

        try:
            result = await self.breaker.call(timed)
        except BreakerOpen as exc:
            raise Unavailable("Stripe is unavailable (circuit open); retry later") from exc
        except stripe.CardError as exc:
            raise FailedPrecondition(f"Stripe declined: {exc.user_message or exc.code}") from exc
        except stripe.InvalidRequestError as exc:
            raise InvalidArgument(f"Stripe rejected the request: {exc.user_message or exc}") from exc
        except Exception as exc:
            if is_transient(exc):
                raise Unavailable(f"Stripe is unavailable: {type(exc).__name__}") from exc
            raise
        # Plain dicts: StripeObjects refuse dict methods such as .get().
        to_dict = getattr(result, "to_dict", None)
        return to_dict() if callable(to_dict) else result

    async def close(self) -> None:
        http = getattr(self._client, "_requestor", None)
        client = getattr(http, "_client", None)
        if client is not None and hasattr(client, "close_async"):
            await client.close_async()
