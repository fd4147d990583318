"""A batch of the dunning projection costs the same statements whatever the number of
its cases: the changed cases are upserted in one statement (shared.db.json_rows), not
one per case. Counted on the wire (tests/support/wire.py), for the batch's transaction.
"""

from __future__ import annotations

import pytest

from shared.catalog import Catalog
from shared.db import make_pool
from tests.integration.test_dunning_support import Applier, failure
from tests.support.wire import WireCost, batch_cost

pytestmark = pytest.mark.integration

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


async def test_statements_per_batch_do_not_grow_with_the_number_of_cases(db: str, catalog: Catalog) -> None:
    pool = make_pool(db, min_size=1, max_size=1)
    await pool.open(wait=True)
    apply = Applier(pool, catalog, publisher=None)
    batches = 0

    async def run(cases: int) -> WireCost:
        nonlocal batches
        batches += 1
        events = [failure(f"in_{batches}_{i}", T0 + i, customer=f"cus_{batches}_{i}") for i in range(cases)]
        cost, _ = await batch_cost(pool, lambda: apply(events))
        return cost

    try:
        await run(1)  # the first batch also prepares statements and reads settings
        small, large = await run(2), await run(60)
        async with pool.connection() as conn:
            opened = await (await conn.execute("SELECT count(*) FROM dunning_cases")).fetchone()
    finally:
        await pool.close()

    print(f"statements per batch: {small} for 2 cases, {large} for 60")
    assert opened == (63,)
    assert large.statements == small.statements, (small, large)
    assert large.round_trips == small.round_trips, (small, large)
