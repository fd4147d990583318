"""A batch of the entitlements worker costs a fixed number of SQL statements and round
trips, whatever the number of its events: the writes are set-based (one statement per
table), so the cost of a batch cannot quietly grow back to one statement per row.
Counted on the wire (tests/support/wire.py), for the batch's transaction only.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from payment.v1 import events_pb2
from services.entitlements.projection import EntitlementsProjection
from shared.catalog import Catalog
from shared.db import make_pool
from shared.worker import BatchProcessor, DeadLetter, RawMessage
from tests.integration.test_entitlements_projection import Ids, story
from tests.support.wire import WireCost, batch_cost

pytestmark = pytest.mark.integration


class RefuseDeadLetters:
    async def send(self, letters: Sequence[DeadLetter], consumer: str) -> None:
        raise AssertionError(f"no event of these stories is poison: {letters}")


def messages(events: Sequence[events_pb2.PaymentEvent], first_offset: int) -> list[RawMessage]:
    return [
        RawMessage("payment-events", 0, first_offset + i, e.customer_id.encode(), e.SerializeToString())
        for i, e in enumerate(events)
    ]


async def test_statements_per_batch_do_not_grow_with_the_batch(db: str, catalog: Catalog) -> None:
    pool = make_pool(db, min_size=1, max_size=1)
    await pool.open(wait=True)
    processor = BatchProcessor(EntitlementsProjection(catalog, redis=None), pool, RefuseDeadLetters())
    offset = 0

    async def run(customers: int) -> WireCost:
        nonlocal offset
        events = [e for _ in range(customers) for e in story(Ids())]
        cost, result = await batch_cost(pool, lambda: processor.process(messages(events, offset)))
        assert result.applied == len(events)
        offset += len(events)
        return cost

    try:
        await run(1)  # the first batch also prepares statements and reads settings
        small, large = await run(2), await run(40)
    finally:
        await pool.close()

    print(f"statements per batch: {small} for 2 customers, {large} for 40")
    assert large.statements == small.statements, (small, large)
    assert large.round_trips == small.round_trips, (small, large)
    # lock, inbox claim, 2 load pipelines, one write pipeline, offsets, Redis marks, read-back
    assert large.round_trips <= 10, large
    assert large.statements <= 30, large
