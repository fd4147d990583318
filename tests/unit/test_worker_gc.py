"""The shared worker pauses the cyclic garbage collector while batches run (shared/worker.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator

import pytest

from shared.worker import cyclic_gc_paused


@pytest.fixture(autouse=True)
def gc_enabled_again() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()


@contextlib.asynccontextmanager
async def a_batch_that_never_ends() -> AsyncIterator[None]:
    """One batch paused for the whole block, as the live worker's lanes always have one
    running: the pause never ends by itself. After the block it ends."""
    holder = asyncio.Event()

    async def long_batch() -> None:
        with cyclic_gc_paused():
            await holder.wait()

    keeper = asyncio.create_task(long_batch())
    await asyncio.sleep(0)
    try:
        yield
    finally:
        holder.set()
        await keeper


def test_the_collector_is_paused_inside_and_enabled_again_after() -> None:
    gc.enable()
    with cyclic_gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_an_exception_enables_it_again() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), cyclic_gc_paused():
        raise RuntimeError("a failed batch")
    assert gc.isenabled()


def test_a_collector_disabled_before_stays_disabled() -> None:
    gc.disable()
    with cyclic_gc_paused():
        pass
    assert not gc.isenabled()


async def test_overlapping_batches_keep_it_paused_until_the_last_ends() -> None:
    gc.enable()
    first_done, second_started = asyncio.Event(), asyncio.Event()
    seen: list[bool] = []

    async def first() -> None:
        with cyclic_gc_paused():
            await second_started.wait()
        first_done.set()

    async def second() -> None:
        with cyclic_gc_paused():
            second_started.set()
            await first_done.wait()
            seen.append(gc.isenabled())  # the first batch ended: still paused for this one
        seen.append(gc.isenabled())

    await asyncio.gather(first(), second())
    assert seen == [False, True]


async def test_batches_that_always_overlap_still_collect_cycles() -> None:
    """Lanes in one process: some batch is always running, so the pause never ends by
    itself; the cyclic garbage must still be collected, not kept for good."""
    gc.enable()
    gc.collect()
    collected_before = sum(stats["collected"] for stats in gc.get_stats())
    async with a_batch_that_never_ends():
        for _ in range(20):
            with cyclic_gc_paused():
                for _ in range(100):
                    cycle: list[object] = []
                    cycle.append(cycle)  # garbage only the cyclic collector frees
                    del cycle
        assert not gc.isenabled()  # the long batch still runs
        collected = sum(stats["collected"] for stats in gc.get_stats()) - collected_before
    assert gc.isenabled()
    assert collected >= 100  # at least one full collection ran while paused


async def test_always_overlapping_batches_collect_the_young_generations_and_rarely_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full collection walks every object of the process: under a pause that never ends
    (the live worker's lanes) only every GC_FULL_EVERY-th forced collection is full."""
    from shared import worker

    calls: list[tuple[int, ...]] = []
    monkeypatch.setattr(worker.gc, "collect", lambda *generation: calls.append(generation) or 0)
    monkeypatch.setattr(worker, "_gc_ends_in_pause", 0)
    monkeypatch.setattr(worker, "_gc_young_runs", 0)
    gc.enable()
    async with a_batch_that_never_ends():
        for _ in range(worker.GC_COLLECT_EVERY * worker.GC_FULL_EVERY):
            with cyclic_gc_paused():
                pass
    assert calls.count((1,)) == worker.GC_FULL_EVERY - 1
    assert calls.count(()) == 1
