"""The one worker runtime: decode -> dedupe -> apply in a transaction -> commit offsets.

`BatchProcessor.process` turns a batch of raw Kafka messages into one Postgres
transaction that holds the projection's changes, the inbox rows of the applied
events and the per-partition high-water marks. Order of effects, so that a
crash at any point loses nothing and applies nothing twice:

1. decode every message; an undecodable one is a poison message;
2. in one transaction: claim the event ids in the inbox (only the ones this
   transaction inserts are new), apply the new events, advance the offsets;
   a `PoisonEvent` from the projection rolls back, moves that event to the
   poison list and retries the rest;
3. commit; then publish the poison messages to `<topic>.dlq` and wait for acks;
4. run the projection's after-commit work (e.g. Redis);
5. only then may the caller commit the Kafka offsets (`BatchResult.next_offsets`).

Batches of one processor and its lanes (`BatchProcessor.lanes`: partition groups of the
live worker applied concurrently) take a turn just before their commit and keep it
through the dead letters and the after-commit work, so after-commit work runs in the
order the transactions committed: a later batch that read what an earlier one wrote
(e.g. the same subject's entitlements) never has its Redis answer overwritten by the
earlier one's.

Only poison is dead-lettered: a message that cannot be decoded, or an event the
projection positively rejects by raising `PoisonEvent` (invalid by the contract).
Any other exception, a dependency down or a bug of ours, propagates: the caller
stops the line on that batch (backs off, retries it, is not ready, alerts; see
shared/consumer.py). Nothing was committed, and the inbox makes the retry safe
even if a commit did succeed before the connection broke.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from shared import tracing
from shared.metrics import WORKER_BATCH_SECONDS, WORKER_EVENTS
from shared.projection import ApplyContext, Envelope, PoisonEvent, Projection
from shared.sqlfile import load_queries
from shared.values import value

M = TypeVar("M")
QUERIES = load_queries(Path(__file__).parent / "sql" / "worker.sql")
TopicPartitionKey = tuple[str, int]
# The lane (partition group) of the live loop whose task runs a batch; 0 outside lanes.
LANE: ContextVar[int] = ContextVar("paymentsvc_worker_lane", default=0)


@value
class RawMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    message: RawMessage
    error: str
    error_class: str


@dataclass(slots=True)
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    next_offsets: dict[TopicPartitionKey, int] = field(default_factory=dict)


class TooManyDeadLetters(RuntimeError):
    """Most of a batch is poison: more likely a broken deploy than bad messages.

    Raised before anything is committed, so the loop treats it as transient and
    pauses (and the metric shows it) instead of draining the topic to the DLQ.
    """


class DeadLetterSink(Protocol):
    async def send(self, letters: Sequence[DeadLetter], consumer: str) -> None:
        """Return once every letter is acknowledged; raise to make the batch transient."""


class BatchProcessor(Generic[M]):
    def __init__(
        self,
        projection: Projection[M],
        pool: AsyncConnectionPool,
        dead_letters: DeadLetterSink,
        *,
        replay: bool = False,
        clock: Callable[[], float] = time.time,
        max_dead_letter_ratio: float = 0.5,
        dead_letter_allowance: int = 10,
    ) -> None:
        self.projection = projection
        self.consumer = projection.name
        self._pool = pool
        self._dead_letters = dead_letters
        self._replay = replay
        self._clock = clock
        self._statistics = TableStatistics(pool)
        self._max_ratio = max_dead_letter_ratio
        self._allowance = dead_letter_allowance
        # Held from just before a transaction commits to the end of its after-commit
        # work; shared with the lanes (see the module docstring).
        self._commit_turn = asyncio.Lock()
        self._lane_projections: dict[int, Projection[M]] = {}

    def lane_count(self, wanted: int) -> int:
        """How many partition groups this processor may apply concurrently: `wanted` if its
        projection opts in (`for_lane()`: an instance for another lane, itself when it
        keeps no state between batches), else 1."""
        return max(1, wanted) if hasattr(self.projection, "for_lane") else 1

    def _lane_projection(self) -> Projection[M]:
        """The projection of the lane running this batch (`LANE`); lane 0's is `projection`.

        A lane is one task of the live loop: its batches never overlap, so a projection's
        state between batches (e.g. the cache marks entitlements clears) stays per lane."""
        lane = LANE.get()
        if lane == 0:
            return self.projection
        projection = self._lane_projections.get(lane)
        if projection is None:
            projection = self._lane_projections[lane] = self.projection.for_lane()  # type: ignore[attr-defined]
        return projection

    async def process(self, messages: Sequence[RawMessage]) -> BatchResult:
        """Apply one batch. See the module docstring for what is committed when.

        Traced as one `process <topic>` span (CONSUMER), a child of the first message's
        producer context (so a batch continues at least one trace, and parent-based
        sampling follows it) and linked to the producer context of every message
        (the messaging conventions for batches); the transaction and the after-commit
        work are its children.
        """
        topic = messages[0].topic if messages else ""
        with tracing.tracer().start_as_current_span(
            f"process {topic}", context=tracing.extract_headers(messages[0].headers) if messages else None,
            kind=tracing.SpanKind.CONSUMER,
        ) as span:
            if span.is_recording():  # extracting every context costs; only for a kept span
                for link in tracing.links_of([m.headers for m in messages]):
                    span.add_link(link.context)
                span.set_attribute("messaging.system", "kafka")
                span.set_attribute("messaging.operation.type", "process")
                span.set_attribute("messaging.destination.name", topic)
                span.set_attribute("messaging.consumer.group.name", f"paymentsvc-{self.consumer}")
                span.set_attribute("messaging.batch.message_count", len(messages))
            with cyclic_gc_paused():
                return await self._process(messages)

    async def _process(self, messages: Sequence[RawMessage]) -> BatchResult:
        started = time.perf_counter()
        result = BatchResult(next_offsets=_next_offsets(messages))
        events = self._decode(messages, result.dead_letters)
        self._check_dead_letters(result.dead_letters, messages)
        ctx = ApplyContext(consumer=self.consumer, replay=self._replay, now=self._clock())
        projection = self._lane_projection()
        outcome = await self._apply_isolating_poison(projection, messages, events, ctx, result)
        try:  # committed: this batch holds the commit turn (_transaction_in_span)
            if result.dead_letters:
                await self._dead_letters.send(result.dead_letters, self.consumer)
            with tracing.tracer().start_as_current_span(f"{self.consumer} after_commit"):
                await projection.after_commit(outcome, ctx)
        finally:
            self._commit_turn.release()
        await self._statistics.maybe_analyze()
        WORKER_EVENTS.labels(self.consumer, "applied").inc(result.applied)
        WORKER_EVENTS.labels(self.consumer, "duplicate").inc(result.duplicates)
        WORKER_EVENTS.labels(self.consumer, "dead_lettered").inc(len(result.dead_letters))
        WORKER_BATCH_SECONDS.labels(self.consumer).observe(time.perf_counter() - started)
        return result

    def _decode(self, messages: Sequence[RawMessage], poison: list[DeadLetter]) -> list[Envelope[M]]:
        events = []
        for m in messages:
            headers = dict(m.headers)
            try:
                event_id, event_type, message = self.projection.decode(m.value, headers)
            except Exception as exc:  # undecodable: poison, never fatal
                poison.append(DeadLetter(m, f"cannot decode: {exc}"[:1000], type(exc).__name__))
                continue
            traceparent = _text(headers.get("traceparent")) or ""
            events.append(Envelope(event_id, event_type, message, m.topic, m.partition, m.offset, m.key, traceparent))
        return events

    def _check_dead_letters(self, letters: list[DeadLetter], messages: Sequence[RawMessage]) -> None:
        """A few poison messages are dead-lettered; most of a batch stops the worker."""
        if len(letters) > max(self._allowance, self._max_ratio * len(messages)):
            raise TooManyDeadLetters(
                f"{len(letters)} of {len(messages)} messages would go to the DLQ "
                f"(first: {letters[0].error_class}: {letters[0].error[:200]})"
            )

    async def _apply_isolating_poison(
        self, projection: Projection[M], messages: Sequence[RawMessage], events: list[Envelope[M]], ctx: ApplyContext, result: BatchResult
    ) -> Any:
        by_position = {(m.topic, m.partition, m.offset): m for m in messages}
        while True:
            try:
                return await self._transaction(projection, events, messages, ctx, result)
            except PoisonEvent as poison:
                bad = [e for e in events if e.event_id == poison.event_id]
                if not bad:
                    raise  # a projection bug: it named an event it was not given
                events = [e for e in events if e.event_id != poison.event_id]
                for e in bad:
                    message = by_position[(e.topic, e.partition, e.offset)]
                    result.dead_letters.append(DeadLetter(message, poison.reason[:1000], "PoisonEvent"))
                self._check_dead_letters(result.dead_letters, messages)

    async def _transaction(
        self, projection: Projection[M], events: list[Envelope[M]], messages: Sequence[RawMessage], ctx: ApplyContext, result: BatchResult
    ) -> Any:
        unique = list({e.event_id: e for e in reversed(events)}.values())[::-1]  # first wins
        with tracing.tracer().start_as_current_span(f"{self.consumer} transaction") as span:
            if span.is_recording():
                span.set_attribute("db.system.name", "postgresql")
                span.set_attribute("messaging.batch.message_count", len(events))
            return await self._transaction_in_span(projection, unique, events, messages, ctx, result)

    async def _transaction_in_span(
        self, projection: Projection[M], unique: list[Envelope[M]], events: list[Envelope[M]], messages: Sequence[RawMessage],
        ctx: ApplyContext, result: BatchResult,
    ) -> Any:
        turn = False
        try:
            async with self._pool.connection() as conn, conn.transaction():
                if not self._replay:  # a rebuild writes another schema; only live batches race a swap
                    await conn.execute(QUERIES["lock_consumer"], {"consumer": self.consumer}, prepare=True)
                new_ids = await self._claim(conn, unique)
                new_events = [e for e in unique if e.event_id in new_ids]
                outcome = await projection.apply(conn, new_events, ctx) if new_events else None
                await self._advance(conn, events, messages)
                # The commit and the after-commit work in commit order (module docstring);
                # _process releases the turn after the after-commit work.
                await self._commit_turn.acquire()
                turn = True
        except BaseException:
            if turn:  # the commit failed
                self._commit_turn.release()
            raise
        result.applied = len(new_events)
        result.duplicates = len(events) - len(new_events)
        return outcome

    async def _claim(self, conn: Any, events: list[Envelope[M]]) -> set[str]:
        if not events:
            return set()
        params = {
            "consumer": self.consumer,
            "event_ids": [e.event_id for e in events],
            "topics": [e.topic for e in events],
            "partitions": [e.partition for e in events],
            "offsets": [e.offset for e in events],
        }
        cursor = await conn.execute(QUERIES["claim_events"], params, prepare=True)
        return {row[0] for row in await cursor.fetchall()}

    async def _advance(self, conn: Any, events: list[Envelope[M]], messages: Sequence[RawMessage]) -> None:
        newest: dict[TopicPartitionKey, tuple[int, str]] = {}
        for e in events:
            created = int(getattr(e.message, "created", 0) or 0)
            key = (e.topic, e.partition)
            if created and (key not in newest or (created, e.event_id) > newest[key]):
                newest[key] = (created, e.event_id)
        offsets = _next_offsets(messages)
        tails = {(m.topic, m.partition): dict(m.headers).get("event-id") for m in messages
                 if m.offset + 1 == offsets[(m.topic, m.partition)]}
        keys = sorted(offsets)
        await conn.execute(
            QUERIES["advance_offsets"],
            {
                "consumer": self.consumer,
                "topics": [k[0] for k in keys],
                "partitions": [k[1] for k in keys],
                "next_offsets": [offsets[k] for k in keys],
                "last_event_ids": [newest[k][1] if k in newest else None for k in keys],
                "last_event_created": [newest[k][0] if k in newest else None for k in keys],
                "tail_event_ids": [_text(tails.get(k)) for k in keys],
            },
            prepare=True,
        )


_gc_pauses = 0  # batches running in this process with the collector paused
_gc_resume = False  # whether the first of them found it enabled
_gc_ends_in_pause = 0  # batches ended while others kept the collector paused
_gc_young_runs = 0  # collections of the young generations since the last full one
# Overlapping batches (the live worker's lanes, a rebuild's lanes in one process) may keep
# the collector paused for good: every this many batch ends under a pause, the young
# generations are collected anyway (where a batch's objects are, the collector being off
# while it ran), and every GC_FULL_EVERY of those, all generations. A full collection
# walks every object of the process (in bench/project.py, the generated events too):
# one every 8 batches cost the live worker's lanes 40 % more CPU per event.
GC_COLLECT_EVERY = 8
GC_FULL_EVERY = 16


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused while a batch runs (and while any other batch
    of this process runs), then enabled again as it was.

    A batch allocates a few hundred thousand short-lived objects (events, rows, params),
    freed by reference counting; with the default thresholds the collector ran hundreds
    of times per batch and, in its older generations, walked every object the process
    holds: 20 % of the entitlements worker's CPU in bench/project.py, where the process
    also holds the generated events (docs/performance.md, issue 12 section 7). Paused,
    it runs about once per batch, after it. A batch's own cycles wait for its end. Batches
    that overlap without a gap (lanes in one process) would keep it paused for good, so
    every GC_COLLECT_EVERY batch ends under a pause collect the young generations, and
    every GC_FULL_EVERY such collections all of them.
    `paymentsvc serve` raises the thresholds for the whole process (runner.py); the
    replay CLI and the benchmarks did not.
    """
    global _gc_pauses, _gc_resume, _gc_ends_in_pause, _gc_young_runs
    if _gc_pauses == 0:
        _gc_resume = gc.isenabled()
        gc.disable()
    _gc_pauses += 1
    try:
        yield
    finally:
        _gc_pauses -= 1
        if _gc_pauses == 0:
            _gc_ends_in_pause = 0
            if _gc_resume:
                gc.enable()
        elif _gc_resume:
            _gc_ends_in_pause += 1
            if _gc_ends_in_pause >= GC_COLLECT_EVERY:
                _gc_ends_in_pause = 0
                _gc_young_runs += 1
                if _gc_young_runs >= GC_FULL_EVERY:
                    _gc_young_runs = 0
                    gc.collect()
                else:
                    gc.collect(1)


class TableStatistics:
    """Keeps planner statistics of the projection's tables fresh where autovacuum does not.

    The projection's batch queries look rows up by lists of ids. A table that was
    never analyzed has no statistics, and the planner then reads it whole on every
    batch, so a worker slows down as its tables grow (measured by bench/project.py
    on a server with autovacuum off: 2,500 -> 700 events/s over 200k events). Where
    the server's autovacuum is on, this does nothing.
    """

    def __init__(self, pool: AsyncConnectionPool, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._every_s = every_s
        self._clock = clock
        self._next = 0.0
        self._needed: bool | None = None

    async def maybe_analyze(self) -> list[str]:
        """ANALYZE the tables that changed enough, at most every `every_s`. Returns them."""
        if self._needed is False or self._clock() < self._next:
            return []
        self._next = self._clock() + self._every_s
        async with self._pool.connection() as conn:
            if self._needed is None:
                row = await (await conn.execute(QUERIES["autovacuum_enabled"])).fetchone()
                self._needed = not (row and row[0])
                if not self._needed:
                    return []
            stale = [r[0] for r in await (await conn.execute(QUERIES["stale_tables"])).fetchall()]
            for table in stale:
                await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
        return stale


def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8", "replace") if value else None


def _next_offsets(messages: Sequence[RawMessage]) -> dict[TopicPartitionKey, int]:
    offsets: dict[TopicPartitionKey, int] = {}
    for m in messages:
        key = (m.topic, m.partition)
        offsets[key] = max(offsets.get(key, 0), m.offset + 1)
    return offsets


# ---------------------------------------------------------------- the consume loop


@dataclass(frozen=True)
class LoopPolicy:
    """How the loop batches and backs off. Frozen: decided at startup."""

    max_batch: int = 500
    max_wait_ms: int = 200
    # Partition groups the live worker applies concurrently, one batch each in flight, for
    # a projection that opts in (BatchProcessor.lanes); at most one per partition owned.
    # 1: one batch at a time over all its partitions.
    lanes: int = 3
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
