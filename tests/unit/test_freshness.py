"""The freshness cache answers every read without waiting for Postgres while it holds a
value young enough: past its TTL the value is answered aged (its lag grown by its age)
while one refresh runs behind it; only with no value younger than STALE_S does a call
wait for the query. A fake fetch and a fake clock, no I/O."""

from __future__ import annotations

import asyncio

from services.api_grpc.freshness import STALE_S, FreshnessCache
from services.api_grpc.queries import Watermark
from tests.support.clock import Clock


class Fetch:
    """The watermark query, answered only when the test releases it."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.value = Watermark(100, "evt_1", 5)

    async def __call__(self, timeout: float) -> Watermark:
        self.calls += 1
        await self.release.wait()
        return self.value


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_value_past_its_ttl_is_answered_aged_at_once_while_one_refresh_runs() -> None:
    clock, fetch = Clock(1000.0), Fetch()
    cache = FreshnessCache(fetch, clock=clock)
    fetch.release.set()
    assert await cache.get(1.0) == Watermark(100, "evt_1", 5)
    fetch.release.clear()
    fetch.value = Watermark(200, "evt_2", 1)
    clock.advance(0.25)  # past TTL_S (0.1), a fraction exact in binary
    # The query is held: each of these would hang if a call waited for it.
    answers = [await asyncio.wait_for(cache.get(1.0), 0.5) for _ in range(3)]
    assert answers == [Watermark(100, "evt_1", 5 + 250)] * 3  # aged by 250 ms, the lag grown
    assert fetch.calls == 2  # the first fill and one refresh, shared
    fetch.release.set()
    await settle()
    assert await cache.get(1.0) == Watermark(200, "evt_2", 1)


async def test_with_no_value_young_enough_a_call_waits_for_the_query() -> None:
    clock, fetch = Clock(1000.0), Fetch()
    cache = FreshnessCache(fetch, clock=clock)
    fetch.release.set()
    await cache.get(1.0)
    fetch.release.clear()
    clock.advance(STALE_S + 0.1)
    call = asyncio.ensure_future(cache.get(1.0))
    await settle()
    assert not call.done()  # waiting for the refresh
    fetch.value = Watermark(300, "evt_3", 2)
    fetch.release.set()
    assert await asyncio.wait_for(call, 1.0) == Watermark(300, "evt_3", 2)
