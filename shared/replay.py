"""Rebuilding a projection from the log: `paymentsvc replay`.

- `rebuild`: migrate a fresh schema, copy the catalog into it from the live
  schema, and apply the topic from offset 0 into it with side effects off
  (no Redis, no Stripe, nothing emitted), with a progress bar. Built for bulk:
  large batches (sized to the server's lock table), asynchronous commits, partitions
  applied by lanes where the projection allows, each lane in its own process
  (shared/replay_lanes.py), indexes nobody reads during the load built after it. A
  rebuild that failed or was interrupted carries on from its marks (`prepare=False`).
- `verify`: row counts and a checksum per projection table, rebuilt vs live.
- `swap`: catch the rebuild up to the live worker, then, holding the lock every
  live batch takes (shared), finish the catch-up to the live high-water marks
  exactly and copy the rebuilt rows over the live ones in one transaction. The
  live worker waits for that transaction and then carries on from the same
  high-water marks, so no event is lost or applied twice across the switch.
"""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from aiokafka import TopicPartition
from psycopg import sql

from shared import db
from shared.consumer import database_offsets, log_end_offsets, topic_partitions
from shared.errors import ConfigurationError
from shared.migrate import migrate_up
from shared.progress import event_bar
from shared.projection import Projection
from shared.replay_lanes import (
    LaneProgress,
    NoDeadLetters,
    default_processes,
    run_lane_processes,
    run_lanes,
)
from shared.worker import QUERIES, LoopPolicy

CATALOG_TABLES = ("pricing_zones", "plans", "plan_prices", "plan_features")
# A rebuild's batches: per-batch costs (round trips, statements, commits) are paid once
# per BULK_BATCH events instead of once per 500 as live; fewer where the server's lock
# table is small (`bulk_batch`).
BULK_BATCH = 2_000
# The share of the server's lock table (max_locks_per_transaction x (max_connections +
# max_prepared_transactions), shared by every session) that the concurrent batches of a
# rebuild may fill with their transaction locks (`ProjectionSpec.locks_per_event`). When it
# is full, any session's next lock fails with "out of shared memory": the live worker's too.
LOCK_TABLE_SHARE = 0.5
# Nobody reads the schema until the swap, and a lost commit loses its marks with its rows
# (one transaction), so a rebuild resumes exactly; the swap's own commit is synchronous
# and flushes the WAL before it.
BULK_SETTINGS = {"synchronous_commit": "off"}
# The inbox's age index serves only its pruning, which a rebuild does not run.
RUNTIME_DEFERRED_INDEXES = ("processed_events_age",)
# The table of a rebuild schema listing the indexes dropped for its load and not yet built.
PENDING_INDEXES = "replay_pending_indexes"
# Below this many events left to apply, lanes run in this process: starting lane
# processes (an interpreter each, importing the service: about a second) costs more.
PROCESS_MIN_EVENTS = 20_000
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
    # Transaction locks a batch holds per event until it commits, at most: a rebuild's
    # lanes commit at once, so their batches are sized to fit the lock table (`bulk_batch`).
    locks_per_event: float = 0.0


class ReplayTargetError(ConfigurationError):
    """The schema named by --into cannot be used so (exists already, missing, reserved)."""


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
    batch: int | None = None, settings: Mapping[str, str] = BULK_SETTINGS, processes: int | None = None,
    on_progress: Callable[[int], None] | None = None, on_lane_processes: Callable[[list[int]], None] | None = None,
    unlogged: bool = False,
) -> dict[str, float]:
    """Apply `spec.topic` from its start (or the schema's marks) into `schema`. Returns figures.

    Built for bulk (docs/performance.md, "The replay"): batches of `BULK_BATCH` (fewer
    events where the lanes' locks would not fit the server's lock table: `bulk_batch`), commits
    without waiting for the WAL flush (`BULK_SETTINGS`), the partitions split over
    `lanes` (default `spec.lanes`) loops on their own consumers and connections, and, into
    a schema without marks (a load from offset 0), `spec.deferred_indexes` built once
    after the load. The lanes run in `processes` spawned lane processes (shared.replay_lanes;
    0: as tasks of this process); by default one per lane on a machine of two cores or
    more ($PAYMENTSVC_REPLAY_PROCESSES overrides; `default_processes`), but in this process when fewer than
    `PROCESS_MIN_EVENTS` are left to apply or `spec.make` does not pickle (a lambda).
    `unlogged` makes a fresh load write unlogged tables (no WAL; a server crash empties
    them, marks included, so the rebuild starts over; the swap copies the rows into the
    live, logged tables, so they never need to turn logged).
    `batch`, `settings`, `lanes`, `processes` and `unlogged` are there to compare (bench/project.py);
    `on_progress` gets the events applied so far, `on_lane_processes` the lane processes' pids.

    Raises LaneFailed when a lane process raises or dies (the others are stopped). A
    crash of the rebuild, of a lane or of the server is safe for what it leaves: each
    transaction holds its rows with its inbox rows and marks, and a lost asynchronous
    commit loses all of them together; so a rebuild run again with `prepare=False` (what
    the swap's catch-up does, and `paymentsvc replay --resume`) carries on exactly, and
    builds the deferred indexes the interrupted one had dropped (the schema lists them).
    """
    if prepare:
        prepare_schema(database_url, schema)
    elif not _schema_exists(database_url, schema):
        raise ReplayTargetError(f"no schema {schema} to resume: rebuild it (paymentsvc replay {spec.name} --into {schema})")
    if _holds_no_marks(database_url, schema, spec.name) and not _pending_indexes(database_url, schema):
        # a load from offset 0, not a catch-up (nor a load started over after a crash emptied unlogged tables)
        drop_deferred_indexes(database_url, schema, (*RUNTIME_DEFERRED_INDEXES, *spec.deferred_indexes))
        if unlogged:
            set_unlogged(database_url, schema, (*spec.tables, "processed_events", "consumer_offsets"))
    partitions = await topic_partitions(bootstrap, spec.topic)
    count = max(1, min(lanes or spec.lanes, len(partitions)))
    groups = [(lane, partitions[lane::count]) for lane in range(count)]
    ends = until if until is not None else await log_end_offsets(bootstrap, [TopicPartition(spec.topic, p) for p in partitions])
    marks = _marks(database_url, schema, spec)
    left = sum(max(0, ends.get(p, 0) - marks.get(p, 0)) for p in partitions)
    if processes is None:
        processes = default_processes(count) if left >= PROCESS_MIN_EVENTS and _pickles(spec) else 0
    processes = min(processes, count)
    if batch is None:
        batch = bulk_batch(database_url, spec, count)
    started = time.perf_counter()
    with event_bar(progress) as bar:
        # The total stays unknown (None) until the first batch has read the log's end.
        task = bar.add_task(f"replay {spec.name} into {schema}", total=None)
        totals: dict[int, int] = {}
        reached: dict[int, int] = {}
        ends_seen: dict[int, int] = {}
        first_batch: list[float] = []  # when the first batch was in: what starting the lanes cost

        def report(lane: int, total: int, done: dict[int, int], ends: dict[int, int]) -> None:
            totals[lane] = total
            reached.update(done)
            ends_seen.update({p: ends.get(p, 0) for p in done})
            applied = sum(totals.values())
            if applied and not first_batch:
                first_batch.append(time.perf_counter())
            rate = applied / max(time.perf_counter() - started, 1e-6)
            end = sum(ends_seen.values())
            bar.update(task, completed=sum(reached.values()), total=end, rate=rate, lag=end - sum(reached.values()))
            if on_progress:
                on_progress(applied)

        if processes:
            assignment = [[group for group in groups if group[0] % processes == i] for i in range(processes)]
            done, poison = await run_lane_processes(
                database_url, bootstrap, spec, schema, assignment, ends, batch, settings, report, on_lane_processes
            )
        else:
            done, poison = await _run_here(database_url, bootstrap, spec, schema, groups, ends, batch, settings, report)
    loaded = time.perf_counter()
    await asyncio.to_thread(build_deferred_indexes, database_url, schema)
    elapsed = time.perf_counter() - started
    applied = float(sum(max(0, done[p] - marks.get(p, 0)) for p in done))
    return {
        "seconds": elapsed, "offsets": applied, "events_per_s": applied / elapsed if elapsed else 0.0,
        "poison": poison, "index_seconds": elapsed - (loaded - started), "lanes": len(groups),
        "processes": processes, "batch": batch, "first_batch_seconds": (first_batch[0] if first_batch else loaded) - started,
    }


async def _run_here(
    database_url: str, bootstrap: str, spec: ProjectionSpec, schema: str, groups: Sequence[tuple[int, Sequence[int]]],
    until: dict[int, int], batch: int, settings: Mapping[str, str], report: LaneProgress,
) -> tuple[dict[int, int], int]:
    """Every lane as a task of this process's loop, each with its own connection of one pool."""
    pool = db.make_pool(
        database_url, schema=schema, max_size=len(groups) + 1, name=f"replay-{spec.name}", settings=settings
    )
    await pool.open(wait=True)
    letters = NoDeadLetters()
    try:
        done = await run_lanes(pool, bootstrap, spec, groups, until, LoopPolicy(max_batch=batch), letters, report, asyncio.Event())
    finally:
        await pool.close()
    return done, letters.count


def bulk_batch(database_url: str, spec: ProjectionSpec, lanes: int) -> int:
    """`BULK_BATCH`, or fewer events so that `lanes` batches at once hold at most
    `LOCK_TABLE_SHARE` of the server's lock table (at least 100)."""
    if not spec.locks_per_event:
        return BULK_BATCH
    with db.connect(database_url) as conn:
        row = conn.execute(
            "SELECT current_setting('max_locks_per_transaction')::int "
            "* (current_setting('max_connections')::int + current_setting('max_prepared_transactions')::int)"
        ).fetchone()
    table = int(row[0]) if row else 0
    return max(100, min(BULK_BATCH, int(table * LOCK_TABLE_SHARE / lanes / spec.locks_per_event)))


def set_unlogged(database_url: str, schema: str, tables: Sequence[str]) -> None:
    with db.connect(database_url) as conn, conn.transaction():
        for table in tables:
            conn.execute(sql.SQL("ALTER TABLE {} SET UNLOGGED").format(sql.Identifier(schema, table)))


def _pending_indexes(database_url: str, schema: str) -> bool:
    with db.connect(database_url) as conn:
        return bool(conn.execute("SELECT to_regclass(%s)", (f"{schema}.{PENDING_INDEXES}",)).fetchone()[0])  # type: ignore[index]


def _pickles(spec: ProjectionSpec) -> bool:
    try:
        pickle.dumps(spec)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


def _marks(database_url: str, schema: str, spec: ProjectionSpec) -> dict[int, int]:
    with db.connect(database_url) as conn:
        query = sql.SQL("SELECT kafka_partition, next_offset FROM {} WHERE consumer = %s AND topic = %s").format(
            sql.Identifier(schema, "consumer_offsets")
        )
        return {int(p): int(o) for p, o in conn.execute(query, (spec.name, spec.topic)).fetchall()}


def _schema_exists(database_url: str, schema: str) -> bool:
    with db.connect(database_url) as conn:
        return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is not None


def _holds_no_marks(database_url: str, schema: str, consumer: str) -> bool:
    with db.connect(database_url) as conn:
        query = sql.SQL("SELECT 1 FROM {} WHERE consumer = %s LIMIT 1").format(sql.Identifier(schema, "consumer_offsets"))
        return conn.execute(query, (consumer,)).fetchone() is None


def drop_deferred_indexes(database_url: str, schema: str, names: Sequence[str]) -> list[str]:
    """Drop the named indexes of `schema`; their definitions, to build them after the load.

    The definitions are kept in the schema's `PENDING_INDEXES` table in the same
    transaction, so a rebuild interrupted before it built them builds them when run
    again (`build_deferred_indexes`). Raises ReplayTargetError for a name the schema
    lacks (a migration renamed it: the list would silently stop deferring) or for a
    unique index (ON CONFLICT needs it).
    """
    if not names:
        return []
    with db.connect(database_url) as conn, conn.transaction():
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
                "fix the projection's deferred_indexes)"
            )
        pending = sql.Identifier(schema, PENDING_INDEXES)
        conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (definition text NOT NULL)").format(pending))
        for name in names:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(schema, name)))
            conn.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(pending), (found[name][0],))
    return [found[name][0] for name in names]


def build_deferred_indexes(database_url: str, schema: str) -> int:
    """Build the indexes `drop_deferred_indexes` left pending in `schema`, in one transaction; how many."""
    with db.connect(database_url) as conn, conn.transaction():
        if not conn.execute("SELECT to_regclass(%s)", (f"{schema}.{PENDING_INDEXES}",)).fetchone()[0]:  # type: ignore[index]
            return 0
        pending = sql.Identifier(schema, PENDING_INDEXES)
        definitions = [str(row[0]) for row in conn.execute(sql.SQL("SELECT definition FROM {}").format(pending))]
        for definition in definitions:
            conn.execute(definition.encode())
        conn.execute(sql.SQL("DROP TABLE {}").format(pending))
    return len(definitions)


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
