"""The shared worker pauses the cyclic garbage collector while batches run (shared/worker.py)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from shared.worker import cyclic_gc_paused


@pytest.fixture(autouse=True)
def gc_enabled_again() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()


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
