"""Rebuilding a projection from the log: `paymentsvc replay`.

- `rebuild`: migrate a fresh schema, copy the catalog into it from the live
  schema, and apply the topic from offset 0 into it with side effects off
  (no Redis, no Stripe, nothing emitted), with a progress bar. Built for bulk:
  large batches, asynchronous commits, partitions applied by concurrent lanes
  where the projection allows, indexes nobody reads during the load built after it.
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from shared import db
from shared.consumer import Progress, database_offsets, run_replay, topic_partitions
from shared.errors import ConfigurationError
from shared.migrate import migrate_up
from shared.progress import event_bar
from shared.projection import Projection
from shared.worker import QUERIES, BatchProcessor, DeadLetter, LoopPolicy

CATALOG_TABLES = ("pricing_zones", "plans", "plan_prices", "plan_features")
# A rebuild's batches: per-batch costs (round trips, statements, commits) are paid once
# per BULK_BATCH events instead of once per 500 as live.
BULK_BATCH = 2_000
# Nobody reads the schema until the swap, and a lost commit loses its marks with its rows
# (one transaction), so a rebuild resumes exactly; the swap's own commit is synchronous
# and flushes the WAL before it.
BULK_SETTINGS = {"synchronous_commit": "off"}
# The inbox's age index serves only its pruning, which a rebuild does not run.
RUNTIME_DEFERRED_INDEXES = ("processed_events_age",)
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
    # How many groups of partitions a rebuild may apply at once, each on its own
    # connection: more than 1 only where batches of different partitions may commit
    # concurrently, as the live replicas of a consumer group do.
    lanes: int = 1
    # Secondary indexes of the schema that neither the projection's batches nor the
    # runtime read: a fresh rebuild builds them once, after the load.
    deferred_indexes: tuple[str, ...] = ()


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
    until: dict[int, int] | None = None, prepare: bool = True, lanes: int | None = None,
    batch: int = BULK_BATCH, settings: Mapping[str, str] = BULK_SETTINGS,
) -> dict[str, float]:
    """Apply `spec.topic` from its start (or the schema's marks) into `schema`. Returns figures.

    Built for bulk (docs/performance.md, "The replay"): batches of `BULK_BATCH`, commits
    without waiting for the WAL flush (`BULK_SETTINGS`), the partitions split over
    `lanes` (default `spec.lanes`) concurrent loops on their own connections, and, into
    a schema without marks (a load from offset 0), `spec.deferred_indexes` built once
    after the load. `batch`, `settings` and `lanes` are there to compare (bench/project.py).
    A crash of the rebuild or of the server is safe for what it leaves: each transaction
    holds its rows with its inbox rows and marks, and a lost asynchronous commit loses
    all of them together. But the schema of an interrupted fresh rebuild lacks its
    deferred indexes: drop it and rebuild (`prepare_schema` refuses a schema that exists).
    """
    if prepare:
        prepare_schema(database_url, schema)
    deferred = []
    if _holds_no_marks(database_url, schema, spec.name):  # a load from offset 0, not a catch-up
        deferred = drop_deferred_indexes(database_url, schema, (*RUNTIME_DEFERRED_INDEXES, *spec.deferred_indexes))
    partitions = await topic_partitions(bootstrap, spec.topic)
    count = max(1, min(lanes or spec.lanes, len(partitions)))
    groups = [partitions[i::count] for i in range(count)]
    pool = db.make_pool(
        database_url, schema=schema, max_size=len(groups) + 1, name=f"replay-{spec.name}", settings=settings
    )
    await pool.open(wait=True)
    letters = _NoDeadLetters()
    started = time.perf_counter()
    policy = LoopPolicy(max_batch=batch)
    try:
        with event_bar(progress) as bar:
            # The total stays unknown (None) until the first batch has read the log's end.
            task = bar.add_task(f"replay {spec.name} into {schema}", total=None)
            totals: dict[int, int] = {}
            reached: dict[int, int] = {}
            ends_seen: dict[int, int] = {}

            def reporter(lane: int) -> Progress:
                def report(total: int, done: dict[int, int], ends: dict[int, int]) -> None:
                    totals[lane] = total
                    reached.update(done)
                    ends_seen.update({p: ends.get(p, 0) for p in done})
                    rate = sum(totals.values()) / max(time.perf_counter() - started, 1e-6)
                    end = sum(ends_seen.values())
                    bar.update(task, completed=sum(reached.values()), total=end, rate=rate, lag=end - sum(reached.values()))

                return report

            lane_runs = [
                run_replay(
                    BatchProcessor(spec.make(), pool, letters, replay=True), pool, bootstrap, spec.topic,
                    asyncio.Event(), policy, until=until, progress=reporter(lane), partitions=group,
                )
                for lane, group in enumerate(groups)
            ]
            done: dict[int, int] = {}
            for lane_done in await asyncio.gather(*lane_runs):
                done.update(lane_done)
    finally:
        await pool.close()
    loaded = time.perf_counter()
    if deferred:
        await asyncio.to_thread(create_indexes, database_url, deferred)
    elapsed = time.perf_counter() - started
    applied = float(sum(done.values()))
    return {
        "seconds": elapsed, "offsets": applied, "events_per_s": applied / elapsed if elapsed else 0.0,
        "poison": letters.count, "index_seconds": elapsed - (loaded - started), "lanes": len(groups),
    }


def _holds_no_marks(database_url: str, schema: str, consumer: str) -> bool:
    with db.connect(database_url) as conn:
        query = sql.SQL("SELECT 1 FROM {} WHERE consumer = %s LIMIT 1").format(sql.Identifier(schema, "consumer_offsets"))
        return conn.execute(query, (consumer,)).fetchone() is None


def drop_deferred_indexes(database_url: str, schema: str, names: Sequence[str]) -> list[str]:
    """Drop the named indexes of `schema`; their definitions, to build them after the load.

    Raises ReplayTargetError for a name the schema lacks (a migration renamed it: the
    list would silently stop deferring) or for a unique index (ON CONFLICT needs it).
    """
    if not names:
        return []
    with db.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisunique FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = ANY(%s)",
            (schema, list(names)),
        ).fetchall()
        found = {str(name): (str(definition), bool(unique)) for name, definition, unique in rows}
        missing = sorted(set(names) - set(found))
        unique = sorted(name for name, (_, is_unique) in found.items() if is_unique)
        if missing or unique:
            raise ReplayTargetError(
                f"cannot defer indexes of {schema}: missing {missing}, unique {unique} (a migration renamed one: "
                "fix the projection's deferred_indexes; or an interrupted rebuild dropped them: drop the schema and rebuild)"
            )
        for name in names:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(schema, name)))
    return [found[name][0] for name in names]


def create_indexes(database_url: str, definitions: Sequence[str]) -> None:
    """Build indexes from their `pg_get_indexdef` definitions (schema-qualified)."""
    with db.connect(database_url) as conn:
        for definition in definitions:
            conn.execute(definition.encode())


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
