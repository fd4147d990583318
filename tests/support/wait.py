"""Waiting for a condition instead of for time.

`eventually` polls until the condition holds; its bound is generous (only a broken
system reaches it) and is never an assertion about speed.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    condition: Callable[[], T | Awaitable[T]], timeout: float = 30.0, interval: float = 0.02, what: str = ""
) -> T:
    """The condition's first truthy value; AssertionError if it is still falsy after
    `timeout` seconds. `condition` may be a plain or an async function."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or getattr(condition, '__name__', 'condition')}")
        await asyncio.sleep(interval)


def eventually_sync(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.02, what: str = "") -> T:
    """`eventually` for code outside an event loop (subprocesses, sockets)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or getattr(condition, '__name__', 'condition')}")
        time.sleep(interval)
