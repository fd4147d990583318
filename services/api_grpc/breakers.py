"""Circuit breakers (the `purgatory` library) around Stripe and Redis.

A breaker opens after `threshold` transient failures in a row and then refuses calls
at once (BreakerOpen) for `reset_after_s`; the next call after that is a trial
(half-open): its success closes the breaker, its failure opens it again. Only
transient failures count: a 4xx from Stripe or a Redis script error is the caller's
problem, not the dependency's health.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

T = TypeVar("T")


class BreakerOpen(RuntimeError):
    """The breaker is open: the dependency was not called."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the {name} circuit breaker is open")
        self.name = name


class Breaker:
    def __init__(
        self,
        name: str,
        is_transient: Callable[[BaseException], bool],
        *,
        threshold: int = 5,
        reset_after_s: float = 10.0,
    ) -> None:
        self.name = name
        # Anything that is not transient is "excluded": it neither counts nor trips.
        self._factory = AsyncCircuitBreakerFactory(
            default_threshold=threshold,
            default_ttl=reset_after_s,
            exclude=[(BaseException, lambda exc: not is_transient(exc))],
        )

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` through the breaker; BreakerOpen without calling it when open."""
        breaker = await self._factory.get_breaker(self.name)
        try:
            async with breaker:
                return await fn()
        except OpenedState as exc:
            raise BreakerOpen(self.name) from exc

    async def state(self) -> str:
        """closed, opened or half-opened (for tests and /status)."""
        breaker = await self._factory.get_breaker(self.name)
        return breaker.context.state
