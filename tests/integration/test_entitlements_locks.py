"""What the entitlements worker locks, against the real Postgres.

Events about one payment can arrive on two partitions (a dispute is keyed by its payment,
the charge by its customer), so batches of two partitions may write one payment at once.
A batch locks the payment and grant rows it loads (row locks, which live in the rows) and
inserts the ones it did not find only if nobody inserted them meanwhile: it takes nothing
per id from the server's lock table (max_locks_per_transaction x max_connections entries
for every session together), so a batch of any size cannot fill it
(docs/performance.md, issue 12 section 9). test_disputes.py covers a payment both batches
find; here neither finds it, and the locks a batch holds are counted.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from services.entitlements.projection import EntitlementsProjection
from services.entitlements.repository import ConcurrentInsert
from shared.catalog import Catalog
from shared.projection import ApplyContext
from tests.integration.test_disputes import IDS, T0, charge, dispute, payment
from tests.integration.test_entitlements_projection import Ids, apply_batch, envelopes, story
from tests.support.wait import eventually

pytestmark = pytest.mark.integration


async def _blocked_by(db: str, pid: int) -> bool:
    async with await psycopg.AsyncConnection.connect(db) as probe:
        cur = await probe.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND %s = ANY(pg_blocking_pids(pid))",
            (pid,),
        )
        row = await cur.fetchone()
        return row is not None and row[0] == 1


async def test_two_partitions_batches_inserting_one_payment_give_the_sequential_result(
    db: str, catalog: Catalog
) -> None:
    """Neither batch finds the payment. The refund's batch (its customer's partition)
    inserts it and holds its transaction open; the dispute's batch (the payment's own
    partition) must not overwrite that row with what it read before the refund committed
    (no customer, no amount): it waits, fails, and retried as the runtime retries a
    batch, it merges the refund's row."""
    projection = EntitlementsProjection(catalog, None)
    ctx = ApplyContext(consumer="entitlements", replay=False, now=time.time())
    attempts: list[BaseException | None] = []

    async def dispute_batch() -> None:
        while True:  # shared/consumer.py retries every failure of a batch
            try:
                await apply_batch(db, projection, [dispute("charge.dispute.created", T0 + 2)])
            except ConcurrentInsert as exc:
                attempts.append(exc)
                continue
            attempts.append(None)
            return

    async with await psycopg.AsyncConnection.connect(db) as holder:
        refund_pid = holder.info.backend_pid
        async with holder.transaction():
            await projection.apply(
                holder, envelopes([charge("charge.refunded", T0 + 1, amount_refunded=300)]), ctx
            )
            second = asyncio.create_task(dispute_batch())
            await eventually(lambda: _blocked_by(db, refund_pid), what="the dispute's insert waits for the refund's")
            assert not second.done()
        await asyncio.wait_for(second, 30)

    assert isinstance(attempts[0], ConcurrentInsert), attempts
    assert attempts[-1] is None
    customer, status, amount, refunded, reason = payment(db)
    assert (customer, status, amount, refunded) == ("cus_Disputed", "disputed", 1000, 300)
    assert isinstance(reason, str) and reason.startswith("dispute ")


async def test_the_first_to_insert_a_payment_wins_when_the_second_already_wrote_its_own(
    db: str, catalog: Catalog
) -> None:
    """The other order: the dispute's batch (payment's partition) inserts first and holds
    its transaction; the charge's batch (customer's partition) fails, then merges both."""
    projection = EntitlementsProjection(catalog, None)
    ctx = ApplyContext(consumer="entitlements", replay=False, now=time.time())
    failures = 0

    async def charge_batch() -> None:
        nonlocal failures
        while True:
            try:
                await apply_batch(db, projection, [charge("charge.succeeded", T0)])
                return
            except ConcurrentInsert:
                failures += 1

    async with await psycopg.AsyncConnection.connect(db) as holder:
        pid = holder.info.backend_pid
        async with holder.transaction():
            await projection.apply(holder, envelopes([dispute("charge.dispute.created", T0 + 2)]), ctx)
            second = asyncio.create_task(charge_batch())
            await eventually(lambda: _blocked_by(db, pid), what="the charge's insert waits for the dispute's")
        await asyncio.wait_for(second, 30)

    assert failures == 1
    customer, status, amount, refunded, _reason = payment(db)
    assert (customer, status, amount, refunded) == ("cus_Disputed", "disputed", IDS["amount"], 0)


async def _locks_held_by_a_batch(db: str, projection: EntitlementsProjection, customers: int) -> dict[str, int]:
    """pg_locks of the batch's backend by lock type, while its transaction is still open."""
    ctx = ApplyContext(consumer="entitlements", replay=False, now=time.time())
    events = [e for _ in range(customers) for e in story(Ids())]
    async with await psycopg.AsyncConnection.connect(db) as conn:
        async with conn.transaction():
            await projection.apply(conn, envelopes(events), ctx)
            async with await psycopg.AsyncConnection.connect(db) as probe:
                cur = await probe.execute(
                    "SELECT locktype, count(*) FROM pg_locks WHERE pid = %s GROUP BY locktype",
                    (conn.info.backend_pid,),
                )
                held: dict[str, Any] = dict(await cur.fetchall())
    return {str(k): int(v) for k, v in held.items()}


async def test_the_locks_a_batch_holds_do_not_grow_with_the_batch(db: str, catalog: Catalog) -> None:
    """No advisory lock at all (there was one per customer, payment and charge id: up to 3
    per event), and as many lock-table entries for 40 customers' stories as for 2: the
    relations the batch touches, its transaction ids. Row locks are not in pg_locks."""
    projection = EntitlementsProjection(catalog, None)
    await _locks_held_by_a_batch(db, projection, 1)  # the first batch also creates the catalog's plans
    small = await _locks_held_by_a_batch(db, projection, 2)
    large = await _locks_held_by_a_batch(db, projection, 40)
    print(f"locks held by a batch: {small} for 2 customers' stories, {large} for 40")
    assert "advisory" not in small and "advisory" not in large, (small, large)
    assert large == small, (small, large)
    assert sum(large.values()) <= 100, large
