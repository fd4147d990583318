"""paymentsvc_circuit_breaker_open{breaker}: what the breaker alert reads
(infra/prometheus/alerts.yaml, PaymentsvcCircuitBreakerOpen), on a fake clock."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from shared.breaker import Breaker
from tests.support.clock import Clock


class Down(Exception):
    pass


class Peer:
    def __init__(self) -> None:
        self.error: BaseException | None = None

    async def __call__(self) -> str:
        if self.error is not None:
            raise self.error
        return "ok"


async def fail_times(b: Breaker, peer: Peer, n: int) -> None:
    for _ in range(n):
        with pytest.raises(Down):
            await b.call(peer)


async def test_the_open_gauge_says_1_from_opening_until_a_call_succeeds_again() -> None:
    clock, peer = Clock(), Peer()
    b = Breaker("gauge-peer", lambda exc: isinstance(exc, Down), threshold=2, reset_after_s=10, clock=clock)

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("paymentsvc_circuit_breaker_open", {"breaker": "gauge-peer"})

    assert gauge() == 0
    peer.error = Down()
    await fail_times(b, peer, 1)
    assert gauge() == 0
    await fail_times(b, peer, 1)
    assert (b.state, gauge()) == ("opened", 1)
    clock.advance(10)
    assert (b.state, gauge()) == ("half-opened", 1)  # not closed until a trial succeeds
    peer.error = None
    assert await b.call(peer) == "ok"
    assert (b.state, gauge()) == ("closed", 0)
