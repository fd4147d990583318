"""The inbox is bounded: event ids older than the window are pruned, in small batches.

`processed_events` holds one row per applied event so that a redelivered duplicate
is a no-op. An id must be remembered for as long as anything can bring the event
back: a redelivery or a rewind within the input topic's retention (Kafka's default
7 days), Stripe's own webhook retries (up to 3 days, each a new Kafka message with
the same event id), and `paymentsvc renormalize` over archived raw events. The
default window, `INBOX_RETENTION_DAYS=35`, covers all three with a wide margin;
raise it if the topics keep events longer, and do not renormalize events older than
the window (the entitlements projection absorbs them anyway: its rows are keyed by
the version of the event that last changed them, so an old event changes nothing).

The pruner runs beside the worker loop, never inside a batch: each pass deletes at
most `batch` rows per short transaction (ordered by the age index, so it never
scans the table), yields between transactions, and where the server's autovacuum
is off it vacuums the table after a pass that deleted rows, so the space is reused
and the table's size stays flat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

from shared.metrics import INBOX_PRUNED
from shared.worker import QUERIES

log = logging.getLogger("worker")

DAY_S = 86_400.0


@dataclass
class InboxPruner:
    pool: AsyncConnectionPool
    consumer: str
    retention_s: float = 35 * DAY_S
    batch: int = 5_000
    clock: Callable[[], float] = time.time

    async def prune(self) -> int:
        """Delete this consumer's inbox rows older than the window; how many."""
        cutoff = self.clock() - self.retention_s
        deleted = 0
        while True:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(
                    QUERIES["prune_inbox"], {"consumer": self.consumer, "cutoff": cutoff, "batch": self.batch}
                )
                n = cursor.rowcount
            deleted += n
            if n < self.batch:
                break
            await asyncio.sleep(0)  # let the worker's batches through between chunks
        if deleted:
            INBOX_PRUNED.labels(self.consumer).inc(deleted)
            await self._vacuum_if_needed()
        return deleted

    async def _vacuum_if_needed(self) -> None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(QUERIES["autovacuum_enabled"])).fetchone()
            await conn.rollback()  # VACUUM cannot run inside the transaction the query opened
            if row and row[0]:
                return
            await conn.set_autocommit(True)
            try:
                await conn.execute("VACUUM processed_events")
            finally:
                await conn.set_autocommit(False)

    async def run(self, stop: asyncio.Event, every_s: float = 300.0) -> None:
        """Prune every `every_s` until `stop`; a failure is logged and retried next time."""
        while not stop.is_set():
            try:
                deleted = await self.prune()
                if deleted:
                    log.info("pruned the inbox", extra={"consumer": self.consumer, "rows": deleted})
            except Exception as exc:  # the inbox only grows meanwhile
                log.warning("could not prune the inbox", extra={"consumer": self.consumer, "error": f"{type(exc).__name__}: {exc}"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
