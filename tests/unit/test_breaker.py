"""shared.breaker on a fake clock: every transition, without sleeping."""

from __future__ import annotations

import asyncio

import pytest

from shared.breaker import Breaker, BreakerOpen
from tests.support.clock import Clock


class Down(Exception):
    pass


class Refused(Exception):
    """An answer from the dependency (a 4xx): not a sign of an outage."""


class Peer:
    """Counts the calls that reached it; fails with `error` while set."""

    def __init__(self) -> None:
        self.calls = 0
        self.error: BaseException | None = None

    async def __call__(self) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return "ok"


def breaker(clock: Clock, threshold: int = 3, reset_after_s: float = 10) -> Breaker:
    return Breaker("peer", lambda exc: isinstance(exc, Down), threshold=threshold, reset_after_s=reset_after_s, clock=clock)


async def fail_times(b: Breaker, peer: Peer, n: int) -> None:
    for _ in range(n):
        with pytest.raises(Down):
            await b.call(peer)


async def test_opens_after_threshold_failures_in_a_row_and_fails_fast_without_calling_the_peer() -> None:
    clock, peer = Clock(), Peer()
    b = breaker(clock)
    peer.error = Down()
    await fail_times(b, peer, 2)
    assert b.state == "closed"
    await fail_times(b, peer, 1)
    assert b.state == "opened" and peer.calls == 3
    peer.error = None
    for _ in range(5):
        with pytest.raises(BreakerOpen, match="the peer circuit breaker is open"):
            await b.call(peer)
    assert peer.calls == 3  # the open breaker never called it


async def test_after_the_cool_down_one_trial_closes_it_on_success() -> None:
    clock, peer = Clock(), Peer()
    b = breaker(clock)
    peer.error = Down()
    await fail_times(b, peer, 3)
    clock.advance(9.99)
    assert b.state == "opened"
    clock.advance(0.01)
    assert b.state == "half-opened"
    peer.error = None
    assert await b.call(peer) == "ok"
    assert b.state == "closed" and peer.calls == 4
    # Closed again with a clean count: it takes the whole threshold to open it again.
    peer.error = Down()
    await fail_times(b, peer, 2)
    assert b.state == "closed"


async def test_a_failed_trial_opens_it_again_for_a_whole_cool_down() -> None:
    clock, peer = Clock(), Peer()
    b = breaker(clock)
    peer.error = Down()
    await fail_times(b, peer, 3)
    clock.advance(15)
    await fail_times(b, peer, 1)  # the trial
    assert b.state == "opened" and peer.calls == 4
    clock.advance(9)
    assert b.state == "opened"
    clock.advance(1)
    assert b.state == "half-opened"


async def test_a_failure_that_does_not_count_is_an_answer_and_resets_the_count() -> None:
    clock, peer = Clock(), Peer()
    b = breaker(clock)
    peer.error = Down()
    await fail_times(b, peer, 2)
    peer.error = Refused()
    for _ in range(10):
        with pytest.raises(Refused):
            await b.call(peer)
    assert b.state == "closed"
    peer.error = Down()
    await fail_times(b, peer, 2)
    assert b.state == "closed"  # the refusals broke the run of failures


async def test_cancellation_neither_counts_nor_closes() -> None:
    clock, peer = Clock(), Peer()
    b = breaker(clock, threshold=1)
    peer.error = asyncio.CancelledError()
    for _ in range(3):
        with pytest.raises(asyncio.CancelledError):
            await b.call(peer)
    assert b.state == "closed"
    peer.error = Down()
    await fail_times(b, peer, 1)
    clock.advance(10)
    peer.error = asyncio.CancelledError()
    with pytest.raises(asyncio.CancelledError):
        await b.call(peer)  # a cancelled trial proves nothing
    assert b.state == "half-opened"


@pytest.mark.parametrize(("threshold", "reset"), [(0, 1.0), (1, -1.0)])
def test_a_nonsense_configuration_is_a_clear_error(threshold: int, reset: float) -> None:
    with pytest.raises(ValueError, match="breaker x"):
        Breaker("x", threshold=threshold, reset_after_s=reset)
