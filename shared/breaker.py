"""A small circuit breaker around a dependency (Stripe, Redis), with an injectable clock.

A breaker opens after `threshold` counted failures in a row and then refuses calls at
once (BreakerOpen, the dependency is not called) for `reset_after_s`; the next call after
that is a trial (half-opened): its success closes the breaker, a counted failure opens it
again for another `reset_after_s`. Only failures for which `counts(exc)` is true count:
a 4xx from Stripe or a Redis script error is the caller's problem, not the dependency's
health; such an answer proves the dependency is up, so it counts as a success.

Time is read from `clock` (time.monotonic by default), so tests drive the cool-down with
a fake clock instead of sleeping through it. This replaces the `purgatory` library, whose
cool-down reads the wall clock and cannot be driven.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from shared.metrics import BREAKER_OPEN

T = TypeVar("T")
State = Literal["closed", "opened", "half-opened"]


class BreakerOpen(RuntimeError):
    """The breaker is open: the dependency was not called."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the {name} circuit breaker is open")
        self.name = name


def _always(_: BaseException) -> bool:
    return True


class Breaker:
    def __init__(
        self,
        name: str,
        counts: Callable[[BaseException], bool] = _always,
        *,
        threshold: int = 5,
        reset_after_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1:
            raise ValueError(f"breaker {name}: threshold must be at least 1, got {threshold}")
        if reset_after_s < 0:
            raise ValueError(f"breaker {name}: reset_after_s must not be negative, got {reset_after_s}")
        self.name = name
        self._open_gauge = BREAKER_OPEN.labels(name)
        self._open_gauge.set(0)  # the series exists before the first failure
        self.threshold = threshold
        self.reset_after_s = reset_after_s
        self._counts = counts
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None

    @property
    def state(self) -> State:
        """closed, opened or half-opened (the next call is a trial)."""
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.reset_after_s:
            return "half-opened"
        return "opened"

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` through the breaker; BreakerOpen without calling it when open."""
        if self.state == "opened":
            raise BreakerOpen(self.name)
        try:
            result = await fn()
        except BaseException as exc:
            if isinstance(exc, Exception) and self._counts(exc):
                self._failed()
            else:
                # Cancellation says nothing about the dependency; a non-counted error
                # is an answer from it.
                if not isinstance(exc, Exception):
                    raise
                self._succeeded()
            raise
        self._succeeded()
        return result

    def _failed(self) -> None:
        if self._opened_at is not None:  # a failed trial: open again
            self._opened_at = self._clock()
            return
        self._failures += 1
        if self._failures >= self.threshold:
            self._opened_at = self._clock()
            self._open_gauge.set(1)

    def _succeeded(self) -> None:
        self._failures = 0
        if self._opened_at is not None:
            self._opened_at = None
            self._open_gauge.set(0)
