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
import weakref
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from shared.metrics import BREAKER_OPEN, GO_CIRCUIT_BREAKER_STATE, gauge_function

T = TypeVar("T")
State = Literal["closed", "opened", "half-opened"]
# The Go service's circuit_breaker_state values.
GO_STATE_VALUES: dict[State, float] = {"closed": 0.0, "opened": 1.0, "half-opened": 2.0}


def _go_state(ref: weakref.ref[Breaker]) -> float:
    breaker = ref()
    return 0.0 if breaker is None else GO_STATE_VALUES[breaker.state]


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
        # Read at scrape time: half-open is a matter of the clock, not of a call. A weak
        # reference, so the gauge never keeps a breaker alive (the newest of a name shows).
        ref = weakref.ref(self)
        gauge_function(GO_CIRCUIT_BREAKER_STATE.labels(name), lambda: _go_state(ref))

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
