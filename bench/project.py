"""Entitlements worker throughput and replay, against a bare read-and-decode consumer.

Preloads a fresh Tansu topic with realistic payment events: every customer goes
through the same 10-event lifecycle (checkout, subscription created, first
invoice paid, renewal past_due with a failed invoice, recovered, paid by charge
and payment intent, canceled), built as the ingester builds them (`sample_event`
-> `normalize` -> protobuf, keyed by customer id, with the ingester's headers)
and ordered by event time across customers, as Stripe would send them. Then,
in one run and on the same topic:

* baseline: a consumer without a group that only reads every message and
  decodes it as a PaymentEvent;
* floor: the physical floor of any projection of these events: the same read
  and decode, then one row per event into an indexed table, one batched insert
  (`unnest`) and one transaction per batch of 500, committed before the next;
* worker: the real live path (`run_live` driving `BatchProcessor` over
  `EntitlementsProjection` with Postgres and Redis, dead letters to Kafka),
  from its first batch to the database commit of the last message; the ~5 s
  group join on Tansu comes before the first batch and is not counted;
* replay: `shared.replay.rebuild` of the same topic into a new schema.

It prints events/s of each, the ratio of the worker to the baseline and to the
floor, the time a replay of 1M events takes (measured with --customers 100000,
else at the rate measured), the preload rate, and the rates over the first and the last fifth of the events (a per-batch cost that grows
with the tables shows there; the mix differs too: checkouts and first invoices
come first, renewals and cancellations last; `--steady` spreads the starts over 40
lifecycles, so that every fifth holds the same mix and only the tables grow). It checks that the live tables
are complete and equal to the rebuilt ones. The worker and the replay each stop
after --time-limit seconds; a phase cut short reports its rate so far, marked
"partial". Everything runs in a fresh database (dropped at the end), a Tansu
started for the run and under a unique Redis key prefix (deleted at the end),
also on an error or SIGTERM.

The Postgres server is the machine's; its settings count (the host line shows
whether autovacuum, and so automatic ANALYZE, is on).

    .venv/bin/python bench/project.py [--customers 20000] [--partitions 3] [--steady]
                                      [--time-limit 150] [--skip-replay]
                                      [--replay-time-limit S] [--replay-lanes N]
                                      [--replay-processes N] [--replay-unlogged] [--replay-defer-indexes]
                                      [--replay-modes ROUNDS]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import platform
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg import sql
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from payment.v1 import events_pb2  # noqa: E402
from paymentsvc.dev.samples import LIFECYCLE_STEPS, customer_lifecycle  # noqa: E402
from services.entitlements.bootstrap import (  # noqa: E402
    DEFERRED_INDEXES,
    LOCKS_PER_EVENT,
    READER_INDEXES,
    REPLAY_LANES,
    TABLES,
)
from services.entitlements.projection import EntitlementsProjection  # noqa: E402
from services.ingest_webhooks.normalize import normalize  # noqa: E402
from shared import db  # noqa: E402
from shared.catalog import Catalog, apply_catalog, load_catalog  # noqa: E402
from shared.config import DEFAULT_CATALOG_PATH, Topics  # noqa: E402
from shared.consumer import KafkaDeadLetters, log_end_offsets, run_live  # noqa: E402
from shared.devbroker import DevBroker, ensure_topics  # noqa: E402
from shared.kafka import (
    event_headers,  # noqa: E402
    make_producer,  # noqa: E402
)
from shared.migrate import migrate_up  # noqa: E402
from shared.replay import ProjectionSpec, prepare_schema, rebuild, verify  # noqa: E402
from shared.worker import BatchProcessor, BatchResult, LoopPolicy, RawMessage  # noqa: E402

ADMIN_URL = os.environ.get("BENCH_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
DAY = 86_400
MONTH = 30 * DAY
EVENTS_PER_CUSTOMER = LIFECYCLE_STEPS
PRICE_ID = "price_basic_monthly"
SEND_CHUNK = 5_000
# --steady: starts spread over 40 lifecycles (of two months each), so that every fifth of
# the run but the first 2.5 % holds the same mix of events (new, renewing, canceling customers)
STEADY_SPREAD_S = 40 * 2 * MONTH
# (floor, goal) of each figure, from the issue that set them (issue 12)
WORKER_GOAL = (6_000.0, 10_000.0)  # events/s of one worker process, live
FLAT_GOAL = (0.8, 0.95)  # rate over the last fifth of the events / over the first fifth
REPLAY_GOAL_S = (180.0, 120.0)  # seconds for 1M events
FLOOR_RATIO_GOAL = (0.2, 0.3)  # worker / the batched-insert floor

Message = tuple[bytes, bytes, list[tuple[str, bytes]]]  # key, value, headers
Marks = list[tuple[float, int]]  # (perf_counter, events done), from (start, 0)


# ---------------------------------------------------------------- events


def make_messages(customers: int, spread_s: int = MONTH) -> list[Message]:
    """Every customer's lifecycle, starts spread over `spread_s`, ordered by event time."""
    base = int(time.time()) - spread_s - 120 * DAY  # the whole history lies in the past
    spacing = max(1, spread_s // customers)
    timeline: list[tuple[int, int, int, dict[str, Any]]] = []
    for c in range(customers):
        for step, (created, event) in enumerate(customer_lifecycle(base + c * spacing, price_id=PRICE_ID)):
            timeline.append((created, c, step, event))
    timeline.sort(key=lambda t: t[:3])
    messages = []
    for _, _, _, event in timeline:
        normalized = normalize(event)
        assert normalized is not None
        headers = event_headers(normalized.event_id, normalized.event_type, "PaymentEvent")
        messages.append((normalized.customer_id.encode(), normalized.SerializeToString(), headers))
    return messages


async def preload(bootstrap: str, topic: str, messages: Sequence[Message]) -> float:
    """Produce every message (acks=all, many sends in flight); seconds until the last ack."""
    producer = make_producer(bootstrap, request_timeout_ms=60_000)
    await producer.start()
    try:
        started = time.perf_counter()
        for i in range(0, len(messages), SEND_CHUNK):
            acks = [
                await producer.send(topic, value, key=key, headers=headers)
                for key, value, headers in messages[i : i + SEND_CHUNK]
            ]
            await asyncio.gather(*acks)
        return time.perf_counter() - started
    finally:
        await producer.stop()


# ---------------------------------------------------------------- the three readers


async def read_decoded(
    bootstrap: str, topic: str, partitions: int, expected: int, timeout_s: float,
    sink: Callable[[list[events_pb2.PaymentEvent]], Awaitable[None]] | None = None,
) -> tuple[float, int]:
    """Read every message from the start without a group, decode each as a PaymentEvent
    and hand each batch to `sink` (awaited before the next batch is read). (seconds from
    the first batch to the last one handled, messages read)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=500
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        read, started = 0, None
        deadline = time.monotonic() + timeout_s
        while read < expected and time.monotonic() < deadline:
            records = await consumer.getmany(timeout_ms=200, max_records=500)
            if records and started is None:
                started = time.perf_counter()
            events = [events_pb2.PaymentEvent.FromString(r.value) for batch in records.values() for r in batch]
            if events and sink is not None:
                await sink(events)
            read += len(events)
        return time.perf_counter() - (started or time.perf_counter()), read
    finally:
        await consumer.stop()


FLOOR_TABLE = """
CREATE TABLE bench_floor (
    event_id text PRIMARY KEY,
    customer_id text NOT NULL,
    event_type text NOT NULL,
    created timestamptz NOT NULL
);
CREATE INDEX ON bench_floor (customer_id);
"""
FLOOR_INSERT = (
    "INSERT INTO bench_floor SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[])"
    " ON CONFLICT DO NOTHING"
)


async def floor(bootstrap: str, database_url: str, topic: str, partitions: int, expected: int, timeout_s: float) -> tuple[float, int]:
    """The physical floor of a projection: the baseline's reading and decoding, then one row
    per event into an indexed table with one batched insert and one transaction per batch
    (committed before the next batch is read, as the worker does). (seconds, events inserted)"""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(FLOOR_TABLE)

        async def insert(events: list[events_pb2.PaymentEvent]) -> None:
            async with conn.transaction():
                await conn.execute(
                    FLOOR_INSERT,
                    (
                        [e.event_id for e in events],
                        [e.customer_id for e in events],
                        [e.event_type for e in events],
                        [datetime.fromtimestamp(e.created, UTC) for e in events],
                    ),
                    prepare=True,
                )

        return await read_decoded(bootstrap, topic, partitions, expected, timeout_s, insert)


class Timed:
    """Wraps a processor's `process`: when the first batch came, how many are done."""

    def __init__(self, processor: BatchProcessor[Any], ends: dict[int, int]) -> None:
        self._process = processor.process
        self._ends = ends
        self.reached = {p: 0 for p in ends}
        self.first: float | None = None
        self.last: float | None = None
        self.applied = self.duplicates = self.dead_letters = self.batches = 0
        self.marks: Marks = []
        self.done = asyncio.Event()
        processor.process = self.process  # type: ignore[method-assign]

    async def process(self, messages: Sequence[RawMessage]) -> BatchResult:
        if self.first is None:
            self.first = time.perf_counter()
            self.marks.append((self.first, 0))
        result = await self._process(messages)  # returns once the transaction committed
        self.batches += 1
        self.applied += result.applied
        self.duplicates += result.duplicates
        self.dead_letters += len(result.dead_letters)
        for m in messages:
            self.reached[m.partition] = max(self.reached[m.partition], m.offset + 1)
        self.last = time.perf_counter()
        self.marks.append((self.last, self.messages))
        if all(self.reached[p] >= end for p, end in self._ends.items()):
            self.done.set()
        return result

    @property
    def seconds(self) -> float:
        return (self.last or 0.0) - (self.first or 0.0)

    @property
    def messages(self) -> int:
        return sum(self.reached.values())


def fifths(marks: Marks) -> tuple[float, float]:
    """events/s over the first and over the last fifth of the events done."""
    if len(marks) < 3:
        return 0.0, 0.0
    total = marks[-1][1]
    head = next(m for m in marks if m[1] >= total * 0.2)
    tail = [m for m in marks if m[1] <= total * 0.8][-1]

    def rate(a: tuple[float, int], b: tuple[float, int]) -> float:
        return (b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else 0.0

    return rate(marks[0], head), rate(tail, marks[-1])


async def worker(
    bootstrap: str, database_url: str, topic: str, catalog: Catalog, ends: dict[int, int],
    redis: Redis, redis_prefix: str, limit_s: float,
) -> Timed:
    """Run the live loop until every message is committed, or `limit_s` after its first batch."""
    pool = db.make_pool(database_url, max_size=4, name="bench-entitlements")  # as serve_projection
    await pool.open(wait=True)
    producer = make_producer(bootstrap)
    await producer.start()
    stop = asyncio.Event()
    try:
        projection = EntitlementsProjection(catalog, redis, redis_prefix)
        processor = BatchProcessor(projection, pool, KafkaDeadLetters(producer))
        timed = Timed(processor, ends)
        group = f"bench-{secrets.token_hex(4)}"
        task = asyncio.create_task(run_live(processor, pool, bootstrap, topic, group, stop, LoopPolicy(max_batch=500)))
        waiter = asyncio.create_task(timed.done.wait())
        joined_by = time.perf_counter() + 60  # the group join comes before the first batch
        while not (task.done() or waiter.done()):
            now = time.perf_counter()
            if now >= (timed.first + limit_s if timed.first is not None else joined_by):
                break  # cut short: report the rate so far
            await asyncio.wait([task, waiter], timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stop.set()
        await task  # raises whatever ended the loop early
        return timed
    finally:
        stop.set()
        await producer.stop()
        await pool.close()


class CpuSampler:
    """CPU seconds of the replay's lane processes and of its Postgres backends, from /proc.

    Backends come and go with their pools, so every few seconds each pid's utime + stime
    is read again; its last reading counts."""

    def __init__(self, database_url: str, broker_pid: int | None) -> None:
        self.database_url = database_url
        self.broker = [broker_pid] if broker_pid else []
        self.lanes: list[int] = []
        self.seen: dict[tuple[str, int], float] = {}
        self.first: dict[tuple[str, int], float] = {}  # the broker ran before
        self.own_start = os.times()

    def lane_pids(self, pids: list[int]) -> None:
        self.lanes.extend(pids)

    @staticmethod
    def cpu_seconds(pid: int) -> float | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def sample(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            backends = [int(row[0]) for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'replay-%'"
            )]
        for kind, pids in (("lane", self.lanes), ("backend", backends), ("broker", self.broker)):
            for pid in pids:
                seconds = self.cpu_seconds(pid)
                if seconds is not None:
                    self.first.setdefault((kind, pid), seconds)
                    self.seen[(kind, pid)] = seconds

    async def run(self, every_s: float = 2.0) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(every_s)

    def per_event(self, events: float) -> str:
        """CPU per event applied, of the lane processes and of the Postgres backends."""
        lanes = sum(v for (kind, _), v in self.seen.items() if kind == "lane")
        backends = sum(v for (kind, _), v in self.seen.items() if kind == "backend")
        if not events:
            return "CPU per event: no event"
        return (f"CPU per event: lane processes {lanes / events * 1e6:.0f} us, "
                f"Postgres backends {backends / events * 1e6:.0f} us")

    def cores(self, wall_s: float) -> str:
        own = os.times()
        parent = (own.user - self.own_start.user) + (own.system - self.own_start.system)
        lanes = sum(v for (kind, _), v in self.seen.items() if kind == "lane")
        backends = sum(v for (kind, _), v in self.seen.items() if kind == "backend")
        broker = sum(v - self.first.get(k, 0.0) for k, v in self.seen.items() if k[0] == "broker")
        load = os.getloadavg()[0]
        return (f"cores used: bench process {parent / wall_s:.2f}, lane processes {lanes / wall_s:.2f} "
                f"({len(self.lanes)}), Postgres backends {backends / wall_s:.2f}, broker {broker / wall_s:.2f}; "
                f"load average {load:.1f}")


async def replay(
    database_url: str, bootstrap: str, topic: str, catalog: Catalog, schema: str, n: int, limit_s: float,
    lanes: int | None, processes: int | None, unlogged: bool, broker_pid: int | None, defer_indexes: bool = False,
) -> dict[str, Any]:
    """`rebuild` into a new schema, as `paymentsvc replay` runs it (the projection's lanes,
    lane processes and deferred indexes, unless told otherwise); cut short after `limit_s`."""
    marks: Marks = []
    spec = ProjectionSpec(
        name="entitlements", topic=topic, tables=TABLES, make=functools.partial(EntitlementsProjection, catalog, None),
        lanes=REPLAY_LANES, deferred_indexes=READER_INDEXES if defer_indexes else DEFERRED_INDEXES, locks_per_event=LOCKS_PER_EVENT,
    )
    await asyncio.to_thread(prepare_schema, database_url, schema)  # migrations: not timed
    started = time.perf_counter()
    indexes = ""
    sampler = CpuSampler(database_url, broker_pid)
    sampling = asyncio.create_task(sampler.run())

    def clocked(applied: int) -> None:
        if not marks or applied != marks[-1][1]:
            marks.append((time.perf_counter(), applied))

    try:
        figures = await asyncio.wait_for(
            rebuild(database_url, bootstrap, spec, schema, progress="never", prepare=False, lanes=lanes,
                    processes=processes, unlogged=unlogged, on_progress=clocked, on_lane_processes=sampler.lane_pids),
            limit_s,
        )
        done, seconds, eps = int(figures["offsets"]), figures["seconds"], figures["events_per_s"]
        indexes = (f", {figures['lanes']:.0f} lanes in {figures['processes'] or 'this'} process(es), "
                   f"batches of {figures['batch']:,.0f}, "
                   f"first batch in after {figures['first_batch_seconds']:.1f} s, "
                   f"deferred indexes built in {figures['index_seconds']:.1f} s")
    except TimeoutError:
        done = marks[-1][1] if marks else 0
        seconds = time.perf_counter() - started
        eps = done / seconds
    finally:
        sampling.cancel()
    cores = sampler.cores(time.perf_counter() - started)
    print(f"replay applied {done:,} in {seconds:.1f} s{indexes}; {cores}; {sampler.per_event(done)}", flush=True)
    return {"replay": eps, "replay_done": done, "replay_complete": done >= n, "replay_fifths": fifths(marks),
            "replay_schema": schema, "spec": spec, "replay_cores": cores}


# --replay-modes: the bulk rebuild as `paymentsvc replay` runs it, then with other batch
# sizes; each into a fresh schema of the same database, from the same topic.
REPLAY_MODES: dict[str, dict[str, Any]] = {
    "bulk, 3 lanes in 3 processes (the default batch)": {"processes": 3},
    "3 processes, batches of 355 (the lock-table budget before section 9)": {"processes": 3, "batch": 355},
    "3 processes, batches of 4,000": {"processes": 3, "batch": 4_000},
}
# Measured before (docs/performance.md, section 5): 2 processes for the 3 lanes, and
# unlogged tables ({"processes": 3, "unlogged": True}): neither paid; lanes in this
# process ({"processes": 0}), reader indexes after the load ({"processes": 3, "deferred":
# READER_INDEXES}) and batches of 711: no gain.


async def replay_modes(
    database_url: str, bootstrap: str, topic: str, catalog: Catalog, tag: str, rounds: int, broker_pid: int | None
) -> dict[str, list[float]]:
    """Every mode of REPLAY_MODES in turn, `rounds` times (ABCD ABCD: the machine's drift
    falls on every mode alike); events/s of each run, index builds included."""
    rates: dict[str, list[float]] = {mode: [] for mode in REPLAY_MODES}
    for r in range(rounds):
        for i, (mode, options) in enumerate(REPLAY_MODES.items()):
            options = dict(options)
            spec = ProjectionSpec(
                name="entitlements", topic=topic, tables=TABLES, make=functools.partial(EntitlementsProjection, catalog, None),
                lanes=REPLAY_LANES, deferred_indexes=options.pop("deferred", DEFERRED_INDEXES),
                locks_per_event=LOCKS_PER_EVENT,
            )
            schema = f"bench_mode{i}_{r}_{tag}"
            await asyncio.to_thread(prepare_schema, database_url, schema)
            sampler = CpuSampler(database_url, broker_pid)
            sampling = asyncio.create_task(sampler.run())
            started = time.perf_counter()
            try:
                figures = await rebuild(database_url, bootstrap, spec, schema, progress="never", prepare=False,
                                        on_lane_processes=sampler.lane_pids, **options)
            finally:
                sampling.cancel()
            rates[mode].append(figures["events_per_s"])
            print(f"replay mode {mode!r}, round {r + 1}: {figures['events_per_s']:,.0f} ev/s "
                  f"(batches of {figures['batch']}, first batch in after {figures['first_batch_seconds']:.1f} s); "
                  f"{sampler.cores(time.perf_counter() - started)}; {sampler.per_event(figures['offsets'])}", flush=True)
    return rates


async def delete_keys(redis: Redis, prefix: str) -> int:
    deleted, batch = 0, []
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += await redis.delete(*batch)
            batch = []
    if batch:
        deleted += await redis.delete(*batch)
    return deleted


# ---------------------------------------------------------------- the run


async def run(args: argparse.Namespace, database_url: str, catalog: Catalog, messages: list[Message], tag: str) -> dict[str, Any]:
    # SIGTERM (like Ctrl-C) cancels the run, so that every `finally` below cleans up.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    figures: dict[str, Any] = {}
    n = len(messages)
    topic = Topics().payment_events
    redis_prefix = f"bench:{tag}:"
    redis = Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=2)
    try:
        async with DevBroker() as broker:
            bootstrap = broker.bootstrap_servers
            await ensure_topics(bootstrap, Topics().all(), partitions=args.partitions)

            seconds = await preload(bootstrap, topic, messages)
            figures["preload"] = n / seconds
            ends = await log_end_offsets(bootstrap, [TopicPartition(topic, p) for p in range(args.partitions)])
            figures["on_topic"] = sum(ends.values())
            print(f"preloaded {n:,} events in {seconds:.1f} s; end offsets {ends}", flush=True)

            seconds, read = await read_decoded(bootstrap, topic, args.partitions, n, timeout_s=120 + n / 1000)
            figures["baseline"] = read / seconds if seconds else 0.0
            figures["baseline_read"] = read
            print(f"baseline read and decoded {read:,} in {seconds:.1f} s", flush=True)

            seconds, inserted = await floor(bootstrap, database_url, topic, args.partitions, n, timeout_s=120 + n / 1000)
            figures["floor"] = inserted / seconds if seconds else 0.0
            print(f"floor read, decoded and inserted {inserted:,} in {seconds:.1f} s", flush=True)

            timed = await worker(bootstrap, database_url, topic, catalog, ends, redis, redis_prefix, args.time_limit)
            figures["worker"] = timed.messages / timed.seconds if timed.seconds else 0.0
            figures["worker_timed"] = timed
            figures["worker_fifths"] = fifths(timed.marks)
            figures["redis_keys"] = len([k async for k in redis.scan_iter(match=f"{redis_prefix}*", count=1000)])
            print(f"worker processed {timed.messages:,} in {timed.seconds:.1f} s ({timed.batches} batches)", flush=True)

            if not args.skip_replay:
                figures.update(await replay(
                    database_url, bootstrap, topic, catalog, f"bench_replay_{tag}", n,
                    args.replay_time_limit or args.time_limit, args.replay_lanes, args.replay_processes,
                    args.replay_unlogged, broker.pid, args.replay_defer_indexes,
                ))
            if args.replay_modes:
                figures["replay_modes"] = await replay_modes(
                    database_url, bootstrap, topic, catalog, tag, args.replay_modes, broker.pid
                )
    finally:
        try:
            figures["redis_deleted"] = await delete_keys(redis, redis_prefix)
        finally:
            await redis.aclose()
    return figures


def create_database(name: str, catalog: Catalog) -> str:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)
    migrate_up(url, create_database=False)
    with db.connect(url) as conn:
        apply_catalog(conn, catalog)
    return url


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


Check = tuple[str, str, bool | None]  # what, found, ok (None: not checked)


def checks(database_url: str, figures: dict[str, Any], customers: int, n: int) -> list[Check]:
    """The live tables are complete, and the rebuild equals them. Skipped where a phase was cut short."""
    timed = figures["worker_timed"]
    live_complete = timed.messages >= n
    with db.connect(database_url) as conn:

        def count(query: str) -> int:
            return int(conn.execute(query).fetchone()[0])  # type: ignore[index]

        subscriptions = count("SELECT count(*) FROM public.subscriptions")
        entitlements = count("SELECT count(*) FROM public.entitlements")
        processed = count("SELECT count(*) FROM public.processed_events WHERE consumer = 'entitlements'")
        payments = count("SELECT count(*) FROM public.payments")

    def whole(ok: bool) -> bool | None:
        return ok if live_complete else None

    found: list[Check] = [
        ("subscriptions == customers", f"{subscriptions:,} / {customers:,}", whole(subscriptions == customers)),
        ("entitlements rows > 0", f"{entitlements:,}", entitlements > 0),
        # The first payment comes with a customer's 8th event: a worker phase cut short
        # (the 1M run's) may end before any.
        ("payments rows > 0", f"{payments:,}", payments > 0 if live_complete or payments else None),
        ("processed_events == N", f"{processed:,} / {n:,}", whole(processed == n)),
        ("applied == N, none dead-lettered",
         f"{timed.applied:,} applied, {timed.duplicates} duplicates, {timed.dead_letters} dead letters",
         whole(timed.applied == n) if timed.dead_letters == 0 else False),
        ("Redis answers written", f"{figures['redis_keys']:,} keys", figures["redis_keys"] > 0),
    ]
    if "replay" in figures:
        if live_complete and figures["replay_complete"]:
            differences = verify(database_url, figures["spec"], figures["replay_schema"])
            found.append(("replay == live (shared.replay.verify)", repr(differences), not differences))
        else:
            found.append(("replay == live (shared.replay.verify)", "not run: a phase was cut short", None))
    return found


def host_line() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0].split()[0]  # type: ignore[index]
        autovacuum = conn.execute("SHOW autovacuum").fetchone()[0]  # type: ignore[index]
    return (f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
            f"{os.cpu_count()} cores{f' ({model})' if model else ''}; "
            f"Postgres {version} (autovacuum {autovacuum})")


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d} min"


def graded(value: float, bounds: tuple[float, float], fmt: str, show: Any = None) -> str:
    """'floor F, goal G: OK' (goal reached), 'FLOOR' (only the floor) or 'MISSED'.
    Lower-is-better figures are passed negated, with `show` to print them."""
    floor_value, goal = bounds
    verdict = "OK" if value >= goal else "FLOOR" if value >= floor_value else "MISSED"
    text = (lambda v: show(-v)) if show else fmt.format
    return f"floor {text(floor_value)}, goal {text(goal)}: {verdict}"


def report(figures: dict[str, Any], args: argparse.Namespace, n: int, generated_s: float) -> None:
    print()
    print(host_line())
    print(f"{args.customers:,} customers x {EVENTS_PER_CUSTOMER} events = {n:,} events "
          f"({figures.get('on_topic', 0):,} on the topic), {args.partitions} partitions, "
          f"{'steady mix' if args.steady else 'lifecycles started within a month'}; "
          f"generated in {generated_s:.1f} s; time limit per phase {args.time_limit:g} s")
    print()
    rows: list[tuple[str, str, str]] = [("preload (produce, acks=all)", f"{figures['preload']:,.0f} ev/s", "")]
    rows.append(("baseline: read + decode", f"{figures['baseline']:,.0f} ev/s", ""))
    timed = figures["worker_timed"]
    complete = timed.messages >= n
    partial = "" if complete else f" (partial: {timed.messages:,})"
    rows.append(("worker: entitlements, live", f"{figures['worker']:,.0f} ev/s{partial}",
                 graded(figures["worker"] if complete else 0.0, WORKER_GOAL, "{:,.0f}")))
    first, last = figures["worker_fifths"]
    rows.append(("  first / last fifth of the events", f"{first:,.0f} / {last:,.0f} ev/s", ""))
    rows.append(("  last fifth / first fifth", f"{last / first if first else 0.0:.2f}",
                 graded(last / first if first else 0.0, FLAT_GOAL, "{:.2f}")))
    ratio = figures["worker"] / figures["baseline"] if figures["baseline"] else 0.0
    rows.append(("ratio worker / baseline", f"{ratio:.4f}", ""))
    rows.append(("floor: read + decode + batched insert", f"{figures['floor']:,.0f} ev/s", ""))
    ratio = figures["worker"] / figures["floor"] if figures["floor"] else 0.0
    rows.append(("ratio worker / floor", f"{ratio:.2f}", graded(ratio, FLOOR_RATIO_GOAL, "{:.2f}")))
    if "replay" in figures:
        eps = figures["replay"]
        partial = "" if figures["replay_complete"] else f" (partial: {figures['replay_done']:,})"
        rows.append(("replay: rebuild", f"{eps:,.0f} ev/s{partial}", ""))
        first, last = figures["replay_fifths"]
        rows.append(("  first / last fifth of the events", f"{first:,.0f} / {last:,.0f} ev/s", ""))
        rows.append(("  last fifth / first fifth", f"{last / first if first else 0.0:.2f}", ""))
        eta = 1_000_000 / eps if eps else float("inf")
        measured = "measured" if n >= 1_000_000 and figures["replay_complete"] else "at that rate"
        rows.append((f"replay of 1M events ({measured})", minutes(eta) if eta != float("inf") else "never",
                     graded(-eta, (-REPLAY_GOAL_S[0], -REPLAY_GOAL_S[1]), "{}", minutes)))
    for mode, rates in figures.get("replay_modes", {}).items():
        rows.append((f"replay mode: {mode}", " / ".join(f"{rate:,.0f}" for rate in rates) + " ev/s", ""))
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}} | {'value':>32} | floor and goal")
    print(f"{'-' * width}-+-{'-' * 32}-+-{'-' * 34}")
    for name, value, goal in rows:
        print(f"{name:<{width}} | {value:>32} | {goal}")


def main() -> None:
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # refused probes while Tansu starts
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=150.0,
                        help="seconds the worker and the replay may each take (default 150)")
    parser.add_argument("--skip-replay", action="store_true")
    parser.add_argument("--steady", action="store_true",
                        help="a steady mix of events: customers' starts spread over 40 lifecycles instead of one "
                             "month, so the fifths compare the same work on tables of growing size")
    parser.add_argument("--replay-time-limit", type=float, default=None,
                        help="seconds the replay may take (default: --time-limit); for a 1M-event replay "
                             "behind a worker phase cut short")
    parser.add_argument("--replay-modes", type=int, default=0, metavar="ROUNDS",
                        help="then replay ROUNDS more times in each of REPLAY_MODES (batch sizes), "
                             "alternating, and print each mode's rates and CPU per event")
    parser.add_argument("--replay-lanes", type=int, default=None,
                        help="partition lanes of the replay (default: the projection's, REPLAY_LANES)")
    parser.add_argument("--replay-processes", type=int, default=None,
                        help="lane processes of the replay (0: lanes in the bench's process; default: as "
                             "paymentsvc replay decides, one per lane on 2 cores or more)")
    parser.add_argument("--replay-unlogged", action="store_true", help="the replay writes unlogged tables")
    parser.add_argument("--replay-defer-indexes", action="store_true",
                        help="the replay builds the reader indexes (READER_INDEXES) after its load")
    args = parser.parse_args()

    catalog = load_catalog(DEFAULT_CATALOG_PATH)
    started = time.perf_counter()
    messages = make_messages(args.customers, STEADY_SPREAD_S if args.steady else MONTH)
    generated_s = time.perf_counter() - started
    n = len(messages)
    print(f"generated {n:,} events in {generated_s:.1f} s", flush=True)

    tag = secrets.token_hex(4)
    dbname = f"paymentsvc_bench_{tag}"
    try:
        database_url = create_database(dbname, catalog)
        figures = asyncio.run(run(args, database_url, catalog, messages, tag))
        found = checks(database_url, figures, args.customers, n)
        report(figures, args, n, generated_s)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"interrupted: broker stopped, Redis keys deleted; dropping database {dbname}", file=sys.stderr)
        sys.exit(130)
    finally:
        drop_database(dbname)
    print()
    for what, value, ok in found:
        print(f"  {'ok  ' if ok else 'skip' if ok is None else 'FAIL'} {what}: {value}")
    print(f"  cleanup: database {dbname} dropped, {figures.get('redis_deleted', 0):,} Redis keys deleted")
    if any(ok is False for _, _, ok in found):
        sys.exit(1)


if __name__ == "__main__":
    main()
