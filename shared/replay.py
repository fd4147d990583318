"""Rebuilding a projection from the log: `paymentsvc replay`.

- `rebuild`: migrate a fresh schema, copy the catalog into it from the live
  schema, and apply the topic from offset 0 into it with side effects off
  (no Redis, no Stripe, nothing emitted), with a progress bar.
- `verify`: row counts and a checksum per projection table, rebuilt vs live.
- `swap`: catch the rebuild up to the live worker, then, holding the lock every
  live batch takes (shared), finish the catch-up to the live high-water marks
  exactly and copy the rebuilt rows over the live ones in one transaction. The
  live worker waits for that transaction and then carries on from the same
  high-water marks, so no event is lost or applied twice across the switch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from shared import db
from shared.consumer import database_offsets, run_replay
from shared.errors import ConfigurationError
from shared.migrate import migrate_up
from shared.progress import event_bar
from shared.projection import Projection
from shared.worker import QUERIES, BatchProcessor, DeadLetter

CATALOG_TABLES = ("pricing_zones", "plans", "plan_prices", "plan_features")
# Columns whose value is the wall clock of the write, not a fact from the log; and the
# trace context kept for telemetry (migration 0010), which rows written before it lack.
VOLATILE_COLUMNS = frozenset({"applied_at", "processed_at", "traceparent"})


@dataclass(frozen=True)
class ProjectionSpec:
    """What replay needs to know about one projection."""

    name: str
    topic: str
    tables: tuple[str, ...]
    make: Callable[[], Projection[Any]]  # a projection with side effects off


class ReplayTargetError(ConfigurationError):
    """The schema named by --into cannot be used so (exists already, missing, reserved)."""


class _NoDeadLetters:
    """During a rebuild a poison message is only counted: the live worker dead-lettered it already."""

    def __init__(self) -> None:
        self.count = 0

    async def send(self, letters: Sequence[DeadLetter], consumer: str) -> None:
        self.count += len(letters)


def _check_schema_name(schema: str) -> None:
    if not schema.isidentifier() or schema.lower() in {"public", "pg_catalog", "information_schema"}:
        raise ReplayTargetError(f"{schema!r} cannot be a rebuild target: pick a new lower-case identifier")


def prepare_schema(database_url: str, schema: str) -> None:
    """Create `schema` with every migration, and the live catalog copied in."""
    _check_schema_name(schema)
    with db.connect(database_url) as conn:
        exists = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
        if exists:
            raise ReplayTargetError(f"schema {schema} already exists; rebuild into a new one")
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    migrate_up(database_url, schema=schema, create_database=False)
    with db.connect(database_url) as conn, conn.transaction():
        for table in CATALOG_TABLES:
            conn.execute(
                sql.SQL("INSERT INTO {}.{} SELECT * FROM public.{}").format(
                    sql.Identifier(schema), sql.Identifier(table), sql.Identifier(table)
                )
            )


async def rebuild(
    database_url: str, bootstrap: str, spec: ProjectionSpec, schema: str, *, progress: str = "auto",
    until: dict[int, int] | None = None, prepare: bool = True,
) -> dict[str, float]:
    """Apply `spec.topic` from its start (or the schema's marks) into `schema`. Returns figures."""
    if prepare:
        prepare_schema(database_url, schema)
    pool = db.make_pool(database_url, schema=schema, max_size=2, name=f"replay-{spec.name}")
    await pool.open(wait=True)
    letters = _NoDeadLetters()
    started = time.perf_counter()
    try:
        processor = BatchProcessor(spec.make(), pool, letters, replay=True)
        with event_bar(progress) as bar:
            # The total stays unknown (None) until the first batch has read the log's end.
            task = bar.add_task(f"replay {spec.name} into {schema}", total=None)

            def report(total: int, done: dict[int, int], ends: dict[int, int]) -> None:
                reached, end = sum(done.values()), sum(ends.values())
                rate = total / max(time.perf_counter() - started, 1e-6)
                bar.update(task, completed=reached, total=end, rate=rate, lag=end - reached)

            done = await run_replay(processor, pool, bootstrap, spec.topic, asyncio.Event(), until=until, progress=report)
    finally:
        await pool.close()
    elapsed = time.perf_counter() - started
    applied = float(sum(done.values()))
    return {"seconds": elapsed, "offsets": applied, "events_per_s": applied / elapsed if elapsed else 0.0, "poison": letters.count}


def table_fingerprints(conn: psycopg.Connection[Any], schema: str, tables: Sequence[str]) -> dict[str, tuple[int, str]]:
    """(row count, md5 over the rows in a canonical order) per table, volatile columns left out."""
    result = {}
    for table in tables:
        columns = [
            row[0]
            for row in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
                "ORDER BY ordinal_position",
                (schema, table),
            )
            if row[0] not in VOLATILE_COLUMNS
        ]
        if not columns:
            raise ValueError(f"no table {schema}.{table}")
        row_text = sql.SQL("concat_ws('|', {})").format(
            sql.SQL(", ").join(sql.SQL("coalesce({}::text, '∅')").format(sql.Identifier(c)) for c in columns)
        )
        query = sql.SQL("SELECT count(*), coalesce(md5(string_agg(r, E'\\n' ORDER BY r)), '') FROM (SELECT {} AS r FROM {}.{}) t").format(
            row_text, sql.Identifier(schema), sql.Identifier(table)
        )
        count, digest = conn.execute(query).fetchone()  # type: ignore[misc]
        result[table] = (int(count), str(digest))
    return result


def verify(database_url: str, spec: ProjectionSpec, schema: str, live_schema: str = "public") -> list[str]:
    """The differences between the rebuilt and the live projection; empty when equal."""
    with db.connect(database_url) as conn:
        if not conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone():
            raise ReplayTargetError(f"no schema {schema} to verify: rebuild it first (paymentsvc replay {spec.name} --into {schema})")
        rebuilt = table_fingerprints(conn, schema, spec.tables)
        live = table_fingerprints(conn, live_schema, spec.tables)
    return [
        f"{table}: live {live[table][0]} rows ({live[table][1][:8]}), rebuilt {rebuilt[table][0]} rows ({rebuilt[table][1][:8]})"
        for table in spec.tables
        if live[table] != rebuilt[table]
    ]


async def swap(database_url: str, bootstrap: str, spec: ProjectionSpec, schema: str, *, progress: str = "auto") -> dict[str, int]:
    """Catch `schema` up to the live worker and copy it over the live tables, atomically."""
    live_pool = db.make_pool(database_url, max_size=1, name=f"swap-{spec.name}")
    await live_pool.open(wait=True)
    try:
        for _ in range(5):  # catch up while the live worker keeps going; then finish under the lock
            live_marks = await database_offsets(live_pool, spec.name, spec.topic)
            await rebuild(database_url, bootstrap, spec, schema, progress=progress, until=live_marks, prepare=False)
    finally:
        await live_pool.close()
    async with await psycopg.AsyncConnection.connect(database_url) as conn, conn.transaction():
        await conn.execute(QUERIES["lock_consumer_exclusive"], {"consumer": spec.name})
        cursor = await conn.execute(QUERIES["committed_offsets"], {"consumer": spec.name, "topic": spec.topic})
        final_marks = {int(p): int(o) for p, o in await cursor.fetchall()}
        # The live worker is blocked now; apply the last few events on a separate connection.
        await rebuild(database_url, bootstrap, spec, schema, progress="never", until=final_marks, prepare=False)
        return await _copy_over(conn, spec, schema)


async def _copy_over(conn: psycopg.AsyncConnection[Any], spec: ProjectionSpec, schema: str) -> dict[str, int]:
    copied = {}
    tables = sql.SQL(", ").join(sql.Identifier("public", t) for t in spec.tables)
    await conn.execute(sql.SQL("TRUNCATE {}").format(tables))
    for table in spec.tables:
        cursor = await conn.execute(
            sql.SQL("INSERT INTO public.{} SELECT * FROM {}.{}").format(
                sql.Identifier(table), sql.Identifier(schema), sql.Identifier(table)
            )
        )
        copied[table] = cursor.rowcount
    for bookkeeping in ("processed_events", "consumer_offsets"):
        await conn.execute(sql.SQL("DELETE FROM public.{} WHERE consumer = %s").format(sql.Identifier(bookkeeping)), (spec.name,))
        await conn.execute(
            sql.SQL("INSERT INTO public.{} SELECT * FROM {}.{} WHERE consumer = %s").format(
                sql.Identifier(bookkeeping), sql.Identifier(schema), sql.Identifier(bookkeeping)
            ),
            (spec.name,),
        )
    return copied
