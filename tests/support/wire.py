"""Statements and round trips of one batch's transaction, counted on the wire.

libpq's protocol trace of a connection shows each statement the client sends
(`Execute` in the extended protocol, `Query` in the simple one) and each round trip
(`ReadyForQuery`, one per pipeline or lone statement). `batch_cost` traces the one
connection of a pool of size 1 while `run` processes a batch, and counts what lies
between the batch's BEGIN and its COMMIT.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from psycopg_pool import AsyncConnectionPool

T = TypeVar("T")
MESSAGE = re.compile(r"^([FB])\t\d+\t(\w+)")  # a message's first line: sender, length, type
TRACE_FLAGS = 0b11  # PQTRACE_SUPPRESS_TIMESTAMPS | PQTRACE_REGRESS_MODE


@dataclass(frozen=True)
class WireCost:
    statements: int
    round_trips: int


def transaction_cost(trace: str) -> WireCost:
    """Statements and round trips of the first transaction in a libpq trace."""
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


async def batch_cost(pool: AsyncConnectionPool, run: Callable[[], Awaitable[T]]) -> tuple[WireCost, T]:
    """(the cost of the transaction `run` makes on the pool's one connection, its result)."""
    assert pool.max_size == 1, "trace the one connection the batch will use"
    with tempfile.TemporaryFile("w+") as trace:
        async with pool.connection() as conn:
            conn.pgconn.trace(trace.fileno())
            conn.pgconn.set_trace_flags(TRACE_FLAGS)
        try:
            result = await run()
        finally:
            async with pool.connection() as conn:
                conn.pgconn.untrace()
        trace.seek(0)
        return transaction_cost(trace.read()), result
