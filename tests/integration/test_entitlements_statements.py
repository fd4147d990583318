"""A batch of the entitlements worker costs a fixed number of SQL statements and round
trips, whatever the number of its events: the writes are set-based (one statement per
table), so the cost of a batch cannot quietly grow back to one statement per row.

Counted on the wire: libpq's protocol trace of the worker's one connection shows each
statement the client sends (`Execute` in the extended protocol, `Query` in the simple
one) and each round trip (`ReadyForQuery`, one per pipeline or lone statement). Only the
batch's transaction is counted, from its BEGIN to its COMMIT.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from payment.v1 import events_pb2
from services.entitlements.projection import EntitlementsProjection
from shared.catalog import Catalog
from shared.db import make_pool
from shared.worker import BatchProcessor, DeadLetter, RawMessage
from tests.integration.test_entitlements_projection import Ids, story

pytestmark = pytest.mark.integration

MESSAGE = re.compile(r"^([FB])\t\d+\t(\w+)")  # a message's first line: sender, length, type


class RefuseDeadLetters:
    async def send(self, letters: Sequence[DeadLetter], consumer: str) -> None:
        raise AssertionError(f"no event of these stories is poison: {letters}")


@dataclass(frozen=True)
class WireCost:
    statements: int
    round_trips: int


def transaction_cost(trace: str) -> WireCost:
    """Statements and round trips of the one transaction in a libpq trace."""
    messages = [(m[1], m[2], line) for line in trace.splitlines() if (m := MESSAGE.match(line))]
    begin = next(i for i, (side, _, line) in enumerate(messages) if side == "F" and '"BEGIN"' in line)
    commit = next(i for i, (side, _, line) in enumerate(messages) if side == "F" and '"COMMIT"' in line)
    inside = messages[begin + 1 : commit]
    sent = [kind for side, kind, _ in inside if side == "F"]
    received = [kind for side, kind, _ in inside if side == "B"]
    return WireCost(
        statements=sum(kind in ("Execute", "Query") for kind in sent),
        round_trips=received.count("ReadyForQuery"),
    )


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
        with tempfile.TemporaryFile("w+") as trace:
            async with pool.connection() as conn:  # the pool's one connection: the batch's too
                conn.pgconn.trace(trace.fileno())
                conn.pgconn.set_trace_flags(0b11)  # PQTRACE_SUPPRESS_TIMESTAMPS | REGRESS_MODE
            try:
                result = await processor.process(messages(events, offset))
            finally:
                async with pool.connection() as conn:
                    conn.pgconn.untrace()
            trace.seek(0)
            cost = transaction_cost(trace.read())
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
