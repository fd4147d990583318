"""The entitlements projection: payment events -> customers, subscriptions, entitlements,
access changes and payments in Postgres, and entitlement answers in Redis.

It implements shared/projection.py's contract; shared/worker.py runs it. `apply` loads
the state of the batch's customers in one pipeline, applies the events in order with
the pure handlers (handlers.py: the ordering rules and grace semantics), writes the rows
that changed, and reads back the entitlements of the subjects that changed. Once the
transaction has committed, `after_commit` writes those answers to Redis.

Redis layout (skipped entirely in replay mode): see domain/entitlements.py, the read
model's contract, which also builds the answers.

Change feed: in the same atomic step as the hashes (one Lua script, atomic as MULTI/EXEC),
after them, the batch's keys (newline-separated) are PUBLISHed on `{prefix}ent:changes`,
so that near caches in the API replicas (services/api_grpc/near_cache.py) evict them; a
delete after a failed write is published too (best effort).

A subject without any row has no key: readers fall back to Postgres, then to the
catalog's default plan. If writing Redis fails, its keys are deleted (best effort) so
that readers do not trust stale answers, the failure is counted and logged, and
nothing is raised: Postgres is the truth.

Redis follows Postgres after any crash: every batch marks its subjects in
`cache_refresh_pending` inside its own transaction, and the mark is cleared (in the
next batch's transaction) only once Redis holds the new answer. A kill between the
commit and the Redis write, or a failed write, leaves the marks; the worker rewrites
marked subjects from Postgres when it starts (`refresh_pending`) and in its next
batches. `paymentsvc entitlements rebuild-cache` marks every subject and does the same.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection
from redis.asyncio import Redis

from domain.entitlements import (
    REDIS_TTL_S,
    changes_channel,
    redis_answers,
)
from payment.v1 import events_pb2
from services.entitlements import handlers, repository
from services.entitlements.model import Changes, State, SubjectKey
from services.entitlements.repository import BatchKeys
from shared import tracing
from shared.catalog import Catalog
from shared.metrics import ACCESS_CHANGES, CATALOG_MISSES, REDIS_PROJECTION_FAILURES
from shared.projection import ApplyContext, Envelope, PoisonEvent, decode_payment_event

log = logging.getLogger(__name__)

# after_commit must not hold the worker's loop on a hung Redis.
REDIS_TIMEOUT_S = 2.0
# Marked subjects rewritten per transaction, by a batch or by refresh_pending.
REFRESH_BATCH = 500

PaymentEnvelope = Envelope[events_pb2.PaymentEvent]

# KEYS: the subjects' answer keys. ARGV: the TTL, the change feed's channel and its
# message, then per key its number of fields n and n field / value pairs (n = 0: the
# subject has no rows, its key is deleted). redis-py sends it by its SHA (EVALSHA) and
# loads it again after a Redis restart.
_WRITE_ANSWERS = """
local ttl = ARGV[1]
local at = 4
for k = 1, #KEYS do
  local n = tonumber(ARGV[at])
  redis.call('DEL', KEYS[k])
  if n > 0 then
    redis.call('HSET', KEYS[k], unpack(ARGV, at + 1, at + 2 * n))
    redis.call('EXPIRE', KEYS[k], ttl)
  end
  at = at + 1 + 2 * n
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return #KEYS
"""


@dataclass(frozen=True, slots=True)
class MissSeen:
    """A catalog miss met in a batch, for the metric and the warning."""

    price_id: str
    subscription_id: str | None
    event_id: str


@dataclass(frozen=True)
class EntitlementsBatch:
    """What `apply` hands to `after_commit`.

    `answers`: Redis key -> hash fields to write (an empty hash: delete the key).
    """

    answers: dict[str, dict[str, bytes]]
    catalog_misses: tuple[MissSeen, ...]
    new_access_levels: tuple[str, ...]
    subjects: frozenset[SubjectKey] = frozenset()  # marked pending by this batch ...
    pending_txid: int | None = None  # ... in this transaction
    pending_left: bool = False  # marks of earlier batches may remain


class EntitlementsProjection:
    """Projection[PaymentEvent] named "entitlements"; see the module docstring."""

    name = "entitlements"

    def __init__(self, catalog: Catalog, redis: Redis | None, redis_prefix: str = "") -> None:
        self._catalog = catalog
        self._redis = redis
        self._prefix = redis_prefix
        # Marks the last batch set and whose answers reached Redis: cleared by the next batch.
        self._written: tuple[frozenset[SubjectKey], int] | None = None
        # Whether marks of earlier batches (or an earlier process) may remain.
        self._pending_left = True

    def for_lane(self) -> EntitlementsProjection:
        """An instance for another lane of the live worker (shared/worker.py `LANE`): the
        cache marks above are per lane, each lane clearing its own last batch's. The lanes'
        batches lock what they share (`lock_batch_keys`, the marks' rows, sorted), and the
        runtime runs their after_commit in commit order, so Redis follows Postgres per
        subject as with one lane."""
        return EntitlementsProjection(self._catalog, self._redis, self._prefix)

    def decode(
        self, value: bytes, headers: dict[str, bytes]
    ) -> tuple[str, str, events_pb2.PaymentEvent]:
        """(event_id, event_type, event); ValueError if it is no PaymentEvent we can key."""
        return decode_payment_event(value)

    async def apply(
        self, conn: AsyncConnection[Any], events: list[PaymentEnvelope], ctx: ApplyContext
    ) -> EntitlementsBatch:
        """Apply `events` in order inside the caller's transaction.

        Raises PoisonEvent for an event the handlers reject (before anything is
        written); database errors propagate as transient.
        """
        before = await repository.load_state(conn, BatchKeys.of(e.message for e in events))
        after, misses = self._fold(events, before.copy())
        writes = repository.diff(before, after)
        await repository.save(conn, writes)
        levels = tuple(change.to_level for change in writes.access_changes_new)
        if self._redis is None or ctx.replay:
            return EntitlementsBatch({}, tuple(misses), levels)
        if self._written:
            await repository.clear_cache_pending(conn, self.name, *self._written)
        subjects = set(writes.subjects)
        pending_left = False
        if self._pending_left:
            taken = await repository.take_cache_pending(conn, self.name, REFRESH_BATCH)
            subjects.update(taken)
            pending_left = len(taken) >= REFRESH_BATCH
        txid = await repository.mark_cache_pending(conn, self.name, subjects)
        rows = await repository.read_subjects(conn, subjects)
        answers = redis_answers(rows, subjects, self._catalog, self._prefix)
        return EntitlementsBatch(answers, tuple(misses), levels, frozenset(subjects), txid, pending_left)

    def _fold(
        self, events: Sequence[PaymentEnvelope], state: State
    ) -> tuple[State, list[MissSeen]]:
        misses: list[MissSeen] = []
        # Each subscription is derived once per batch, from its final inputs, instead of
        # after each of its events (handlers._subscription_changes: the same rows).
        state.defer_derivations = True
        for envelope in events:
            changes = self._changes(envelope, state)
            state.apply(changes)
            if changes.catalog_misses:
                misses += [
                    MissSeen(m.price_id, m.last_subscription_id, envelope.event_id)
                    for m in changes.catalog_misses
                ]
        state.apply(handlers.derive_deferred(state, self._catalog))
        state.defer_derivations = False
        return state, misses

    def _changes(self, envelope: PaymentEnvelope, state: State) -> Changes:
        try:
            return handlers.apply(envelope.message, state, self._catalog)
        except handlers.InvalidEvent as exc:
            # The event breaks the contract: it would fail on every retry. Poison.
            # Any other exception is a bug of ours: it propagates and stops the line
            # (shared/consumer.py) instead of draining events of that type to the DLQ.
            raise PoisonEvent(envelope.event_id, f"{type(exc).__name__}: {exc}") from exc

    async def after_commit(self, result: EntitlementsBatch | None, ctx: ApplyContext) -> None:
        """Count and log what the batch met, then write its Redis answers. Never raises
        for Redis: on failure the keys are deleted (best effort) and the failure counted."""
        if result is None:  # the runtime had no new event to apply
            return
        _report(result)
        if self._redis is None or ctx.replay or not result.answers:
            return
        self._written = None  # the marks this batch's transaction cleared are gone
        try:
            with tracing.tracer().start_as_current_span("redis write entitlements", kind=tracing.SpanKind.CLIENT) as span:
                if span.is_recording():
                    span.set_attribute("db.system.name", "redis")
                    span.set_attribute("db.operation.batch.size", len(result.answers))
                async with asyncio.timeout(REDIS_TIMEOUT_S):
                    await self._write(self._redis, result.answers, changes_channel(self._prefix))
            if result.pending_txid is not None:
                self._written = (result.subjects, result.pending_txid)
            self._pending_left = result.pending_left
        except Exception as exc:  # a cache: Postgres already holds the truth
            self._pending_left = True  # this batch's marks stay; a later batch rewrites them
            REDIS_PROJECTION_FAILURES.inc()
            log.warning(
                "could not write entitlements to Redis; readers fall back to Postgres",
                extra={"subjects": len(result.answers), "error": f"{type(exc).__name__}: {exc}"},
            )
            await self._forget(self._redis, list(result.answers), changes_channel(self._prefix))

    @staticmethod
    async def _write(redis: Redis, answers: dict[str, dict[str, bytes]], channel: str) -> None:
        # One script, atomic as MULTI/EXEC was: a reader sees a subject's old hash or its
        # new one, never half of it, and the change feed's message goes out once the new
        # hashes are in place. One command and one reply instead of three commands per
        # key, each answered twice (QUEUED, then in EXEC's reply), all parsed in Python:
        # 2.4 ms of client CPU for 250 subjects against 10-11 ms (docs/performance.md).
        args: list[str | int | bytes] = [REDIS_TTL_S, channel, "\n".join(answers)]
        for fields in answers.values():
            args.append(len(fields))
            for item in fields.items():
                args += item
        await redis.register_script(_WRITE_ANSWERS)(keys=list(answers), args=args)

    @staticmethod
    async def _forget(redis: Redis, keys: list[str], channel: str) -> None:
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.delete(*keys)
                    pipe.publish(channel, "\n".join(keys))
                    await pipe.execute()
        except Exception:  # best effort: the TTL bounds how long a stale answer lives
            log.debug("could not delete stale entitlement keys", exc_info=True)


async def refresh_pending(
    conn: AsyncConnection[Any],
    redis: Redis,
    catalog: Catalog,
    prefix: str = "",
    progress: Callable[[int], None] | None = None,
) -> int:
    """Rewrite the Redis answer of every marked subject from Postgres; how many.

    Each chunk is one transaction that locks its marks (SKIP LOCKED: a running batch
    keeps its own), reads the rows, writes Redis and clears the marks. A failed Redis
    write rolls the chunk back and raises: the marks stay.
    """
    consumer = EntitlementsProjection.name
    done = 0
    while True:
        async with conn.transaction():
            subjects = await repository.take_cache_pending(conn, consumer, REFRESH_BATCH)
            if not subjects:
                return done
            rows = await repository.read_subjects(conn, subjects)
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                await EntitlementsProjection._write(
                    redis, redis_answers(rows, subjects, catalog, prefix), changes_channel(prefix)
                )
            await repository.drop_cache_pending(conn, consumer, subjects)
        done += len(subjects)
        if progress:
            progress(done)


async def mark_cached_subjects(conn: AsyncConnection[Any], redis: Redis, prefix: str = "") -> int:
    """Mark every subject that has an answer in Redis (rows or not); how many keys."""
    consumer = EntitlementsProjection.name
    head = f"{prefix}ent:"
    keys = 0
    chunk: list[SubjectKey] = []
    async for raw in redis.scan_iter(match=f"{head}*", count=1000):
        key = raw.decode() if isinstance(raw, bytes) else raw
        subject_type, _, subject_id = key.removeprefix(head).partition(":")
        if subject_id:
            chunk.append((subject_type, subject_id))
            keys += 1
        if len(chunk) >= REFRESH_BATCH:
            await repository.mark_cache_pending(conn, consumer, chunk)
            chunk = []
    await repository.mark_cache_pending(conn, consumer, chunk)
    return keys


def _report(result: EntitlementsBatch) -> None:
    for miss in result.catalog_misses:
        CATALOG_MISSES.labels(miss.price_id).inc()
        log.warning(
            "price %s is not in the catalog: it grants nothing",
            miss.price_id,
            extra={
                "price_id": miss.price_id,
                "subscription_id": miss.subscription_id,
                "event_id": miss.event_id,
            },
        )
    for level in result.new_access_levels:
        ACCESS_CHANGES.labels(level).inc()


# ---------------------------------------------------------------- Redis answers
