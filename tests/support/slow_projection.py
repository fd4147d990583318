"""A projection that takes its time per batch, for tests that must catch a rebuild's lane
process in the middle of its work. Module-level, so that it pickles into a lane process."""

from __future__ import annotations

import asyncio
from typing import Any


class SlowProjection:
    """`inner` (a projection), with `seconds` of sleep in every batch's transaction."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self._inner = inner
        self._seconds = seconds
        self.name = inner.name

    def decode(self, value: bytes, headers: dict[str, bytes]) -> Any:
        return self._inner.decode(value, headers)

    async def apply(self, conn: Any, events: list[Any], ctx: Any) -> Any:
        await asyncio.sleep(self._seconds)
        return await self._inner.apply(conn, events, ctx)

    async def after_commit(self, result: Any, ctx: Any) -> None:
        await self._inner.after_commit(result, ctx)


def slow(make: Any, seconds: float) -> SlowProjection:
    """For `ProjectionSpec.make` (with functools.partial): `make()` slowed down."""
    return SlowProjection(make(), seconds)
