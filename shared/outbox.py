"""A transactional outbox: what a projection must emit is published at least once.

`stage` writes payloads in the caller's transaction, next to the rows that
caused them, so they exist exactly when those rows do (and a replay, which
stages nothing, emits nothing). `OutboxRelay.flush` publishes what is staged
and deletes it in one transaction once `send` returned (the broker acknowledged):
a crash before the delete publishes again (consumers deduplicate by event id),
a crash before the publish only delays it. Run `flush` after each commit and
`run` in the background to pick up anything a failed flush left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from shared import tracing
from shared.sqlfile import load_queries

log = logging.getLogger("outbox")
QUERIES = load_queries(Path(__file__).parent / "sql" / "outbox.sql")
Send = Callable[[list[bytes]], Awaitable[None]]


async def stage(
    conn: AsyncConnection[Any], consumer: str, payloads: Sequence[bytes], traceparents: Sequence[str] | None = None
) -> None:
    """Stage `payloads` for `consumer` in the caller's transaction, in order.

    `traceparents` (one per payload, '' for none) name the trace that caused each; the
    relay publishes it under that context. By default, the current context."""
    if payloads:
        if traceparents is None:
            traceparents = [tracing.current_traceparent()] * len(payloads)
        params = {"consumer": consumer, "payloads": list(payloads), "traceparents": list(traceparents)}
        await conn.execute(QUERIES["stage"], params)


class OutboxRelay:
    def __init__(self, pool: AsyncConnectionPool, consumer: str, send: Send, batch: int = 500) -> None:
        self._pool = pool
        self._consumer = consumer
        self._send = send
        self._batch = batch

    async def flush(self) -> int:
        """Publish and delete everything staged; returns how many. Raises if `send` does
        (what was claimed stays staged for the next flush)."""
        total = 0
        while True:
            async with self._pool.connection() as conn, conn.transaction():
                cursor = await conn.execute(QUERIES["claim"], {"consumer": self._consumer, "limit": self._batch})
                rows = await cursor.fetchall()
                if not rows:
                    return total
                # In order, each run of rows under the trace that staged it.
                for traceparent, run in itertools.groupby(rows, key=lambda row: row[2]):
                    with tracing.continued(traceparent):
                        await self._send([bytes(payload) for _, payload, _ in run])
                await conn.execute(QUERIES["delete"], {"ids": [row[0] for row in rows]})
            total += len(rows)

    async def flush_quietly(self) -> None:
        """flush, logging instead of raising: the background `run` retries."""
        try:
            await self.flush()
        except Exception as exc:
            log.warning("outbox flush failed; will retry", extra={"consumer": self._consumer, "error": f"{type(exc).__name__}: {exc}"})

    async def run(self, stop: asyncio.Event, interval_s: float = 2.0) -> None:
        """Flush every `interval_s` until `stop`."""
        while not stop.is_set():
            await self.flush_quietly()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
