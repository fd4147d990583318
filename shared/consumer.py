"""Driving a BatchProcessor from Kafka: the live loop of every worker, and replay.

Live (`run_live`): a consumer group member. On assignment it seeks each
partition to the high-water mark the database holds for it (the database is
the source of truth; Kafka's committed offset is only used where the database
has none). It takes batches with `getmany`, processes each one, and commits the
Kafka offsets only after `process` returned, that is after the database
transaction, the dead letters and the after-commit work.

A transient failure (anything but a poison message, which `process` handles)
pauses the assigned partitions, backs off exponentially while still polling
(so the group does not evict us), and retries the same batch. Nothing is
committed meanwhile; the inbox makes the retry idempotent.

Lanes: for a projection that opts in (`BatchProcessor.lane_count`), the live loop
applies its partitions in `LoopPolicy.lanes` groups, one task each (`_Lanes`): a lane
fetches only its own partitions, has one batch in flight, and commits that batch's
offsets after its transaction; the lanes' transactions run concurrently on their own
pooled connections, so one lane's Python runs while another's batch waits on Postgres.
A partition is in one lane at a time, also across a rebalance, so it is applied in
order. A failing batch pauses every lane (the others finish the batch they hold and
take no new one) until it succeeds. A rebalance waits (a few seconds at most) for the
batches in flight; a batch still failing then is abandoned, committing nothing.

Replay (`run_replay`): no group. It assigns every partition, starts where the
target schema's high-water marks say (offset 0 for a fresh schema), and stops
once it has reached the end offsets it saw at start (or `until`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from psycopg_pool import AsyncConnectionPool

from shared.kafka import OutgoingMessage, publish_all
from shared.metrics import (
    WORKER_LAG,
    WORKER_LOG_MISMATCH,
    WORKER_PAUSED,
    WORKER_STALLED_SECONDS,
    WORKER_TRANSIENT_FAILURES,
)
from shared.worker import LANE, QUERIES, BatchProcessor, DeadLetter, LoopPolicy, RawMessage

log = logging.getLogger("worker")
DEFAULT_POLICY = LoopPolicy()
Progress = Callable[[int, dict[int, int], dict[int, int]], None]


class KafkaDeadLetters:
    """Dead letters go to `<topic>.dlq`, keyed as the original, with the error in headers."""

    def __init__(self, producer: AIOKafkaProducer, timeout_s: float = 10.0) -> None:
        self._producer = producer
        self._timeout_s = timeout_s

    async def send(self, letters: Sequence[DeadLetter], consumer: str) -> None:
        await publish_all(self._producer, [self._record(letter, consumer) for letter in letters], self._timeout_s)
        for letter in letters:
            log.warning(
                "dead-lettered a message",
                extra={"consumer": consumer, "topic": letter.message.topic, "partition": letter.message.partition,
                       "offset": letter.message.offset, "error": letter.error},
            )

    @staticmethod
    def _record(letter: DeadLetter, consumer: str) -> OutgoingMessage:
        m = letter.message
        headers = (
            *m.headers,
            ("error", letter.error.encode()[:1000]),
            ("error-class", letter.error_class.encode()),
            ("failed-in", consumer.encode()),
            ("original-topic", m.topic.encode()),
            ("original-partition", str(m.partition).encode()),
            ("original-offset", str(m.offset).encode()),
        )
        return OutgoingMessage(f"{m.topic}.dlq", m.key, m.value, headers, letter.error_class)


def _raw(records: dict[TopicPartition, list[Any]]) -> list[RawMessage]:
    messages = []
    for tp, batch in records.items():
        for r in batch:
            messages.append(
                RawMessage(tp.topic, tp.partition, r.offset, r.key, r.value or b"", tuple(r.headers or ()), r.timestamp or 0)
            )
    return messages


async def database_offsets(pool: AsyncConnectionPool, consumer: str, topic: str) -> dict[int, int]:
    async with pool.connection() as conn:
        cursor = await conn.execute(QUERIES["committed_offsets"], {"consumer": consumer, "topic": topic})
        return {int(p): int(o) for p, o in await cursor.fetchall()}


def mark_mismatch(mark: int, start: int, end: int) -> str | None:
    """Why a projection's high-water mark does not fit the partition's log, or None.

    A mark beyond the end: the log was recreated or reset (a new cluster, a deleted
    topic, a dev broker that forgot everything); consuming would wait at the mark
    and skip every new event below it. A log start beyond the mark: events the
    projection never applied were deleted (retention); consuming would skip them.
    """
    if mark > end:
        return f"the projection's mark {mark} is beyond the log's end {end} (the log was recreated or reset)"
    if start > mark:
        return f"the log starts at {start}, after the projection's mark {mark} (unapplied events were deleted)"
    return None


def foreign_tail(mark: int, stored: str, found: str) -> str | None:
    """Why the record just below `mark` shows a different log, or None.

    Offsets alone cannot tell a recreated topic whose new log happens to be as long as
    the old one (Tansu gives no topic ids). The record at mark - 1 is the last one the
    worker passed on this log; its event id was stored with the mark (`tail_event_id`).
    """
    if stored == found:
        return None
    return (
        f"the record below the projection's mark {mark} is {found}, not {stored} as when the mark was "
        "made (the topic was recreated, its offsets only line up)"
    )


@dataclass
class LogCheck:
    """Partitions whose marks do not fit the log; they are not consumed. A readiness probe."""

    consumer: str
    mismatches: dict[int, str] = field(default_factory=dict)

    async def probe(self) -> None:
        if self.mismatches:
            first = min(self.mismatches)
            raise RuntimeError(f"{len(self.mismatches)} partition(s) not consumed; {first}: {self.mismatches[first]}")


class _SeekToDatabase(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self, consumer: AIOKafkaConsumer, pool: AsyncConnectionPool, name: str, topic: str, bootstrap: str,
        check: LogCheck, lanes: _Lanes | None = None,
    ) -> None:
        self._consumer, self._pool, self._name, self._topic = consumer, pool, name, topic
        self._bootstrap, self._check, self._lanes = bootstrap, check, lanes

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Offsets are committed after every batch. A partition's lag and mismatch gauges
        # belong to its owner: left here, another replica's stale 1 would keep an alert
        # firing after the new owner found the partition fine.
        for tp in revoked:
            for gauge in (WORKER_LAG, WORKER_LOG_MISMATCH):
                with contextlib.suppress(KeyError):
                    gauge.remove(self._name, tp.topic, str(tp.partition))
        if self._lanes is not None:
            await self._lanes.revoked()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        # Nothing is fetched until each partition is checked and sought: getmany runs
        # while this listener awaits the database and the broker.
        self._consumer.pause(*assigned)
        try:
            offsets = await database_offsets(self._pool, self._name, self._topic)
            marked = [tp for tp in assigned if tp.partition in offsets]
            starts = await self._consumer.beginning_offsets(marked) if marked else {}
            ends = await log_end_offsets(self._bootstrap, marked) if marked else {}
        except Exception:
            # Kafka's committed offsets then (at most a redelivery, which the inbox absorbs).
            log.exception("could not check the marks against the log", extra={"consumer": self._name})
            self._consumer.resume(*assigned)
            return
        self._check.mismatches.clear()
        reasons = {
            tp: mark_mismatch(offsets[tp.partition], starts.get(tp, 0), ends.get(tp.partition, 0)) for tp in marked
        }
        below = {tp: offsets[tp.partition] - 1 for tp, r in reasons.items()
                 if r is None and offsets[tp.partition] > starts.get(tp, 0)}
        reasons.update(await self._foreign_tails(below))
        for tp in assigned:
            WORKER_LOG_MISMATCH.labels(self._name, tp.topic, str(tp.partition)).set(0)
            if tp not in marked:
                continue
            mark, start, end = offsets[tp.partition], starts.get(tp, 0), ends.get(tp.partition, 0)
            reason = reasons[tp]
            if reason is None:
                self._consumer.seek(tp, mark)
                continue
            self._check.mismatches[tp.partition] = reason
            WORKER_LOG_MISMATCH.labels(self._name, tp.topic, str(tp.partition)).set(1)
            log.error(
                "%s partition %d is not consumed: %s. Rebuild the projection from this log: "
                "paymentsvc replay %s --into rebuild_1 --swap",
                tp.topic, tp.partition, reason, self._name,
                extra={"consumer": self._name, "topic": tp.topic, "partition": tp.partition,
                       "mark": mark, "log_start": start, "log_end": end},
            )
        self._consumer.resume(*[tp for tp in assigned if tp.partition not in self._check.mismatches])
        log.info("partitions assigned", extra={"consumer": self._name, "partitions": sorted(tp.partition for tp in assigned)})


    async def _foreign_tails(self, below: dict[TopicPartition, int]) -> dict[TopicPartition, str | None]:
        """For each partition, whether the record at `below[tp]` (just under its mark) is
        the one stored with the mark; see foreign_tail. Best effort: a failure to look is
        logged and lets consumption go on, as before this check existed."""
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(QUERIES["committed_tails"], {"consumer": self._name, "topic": self._topic})
                stored = {int(p): str(t) for p, t in await cursor.fetchall()}
            wanted = {tp: offset for tp, offset in below.items() if tp.partition in stored}
            records = await records_at(self._bootstrap, wanted) if wanted else {}
        except Exception:
            log.warning("could not check the records below the marks", extra={"consumer": self._name}, exc_info=True)
            return {}
        found = {tp: dict(r.headers or ()).get("event-id") for tp, r in records.items()}
        return {
            tp: foreign_tail(below[tp] + 1, stored[tp.partition], event_id.decode("utf-8", "replace"))
            for tp, event_id in found.items()
            if event_id  # a record without our header: nothing to compare
        }


async def records_at(bootstrap: str, offsets: dict[TopicPartition, int], timeout: float = 10.0) -> dict[TopicPartition, Any]:
    """The record at each partition's given offset, where the log holds one."""
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await probe.start()
    try:
        probe.assign(list(offsets))
        for tp, offset in offsets.items():
            probe.seek(tp, offset)
        found: dict[TopicPartition, Any] = {}
        deadline = time.monotonic() + timeout
        while len(found) < len(offsets) and time.monotonic() < deadline:
            for tp, records in (await probe.getmany(timeout_ms=200)).items():
                for record in records:
                    if record.offset == offsets[tp]:
                        found[tp] = record
                        probe.pause(tp)
        return found
    finally:
        await probe.stop()


class Backoff:
    def __init__(self, policy: LoopPolicy) -> None:
        self._policy = policy
        self.delay = policy.backoff_initial_s

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self._policy.backoff_max_s)
        return delay


@dataclass
class BatchHealth:
    """Whether the worker's current batch keeps failing; its `probe` makes /health/ready say so."""

    error: str | None = None
    since: float | None = None
    clock: Callable[[], float] = time.monotonic
    # Per lane (shared.worker.LANE): (error, failing since). `error` and `since` are the
    # longest-failing lane's, so one lane's success does not hide another's failure.
    lanes: dict[int, tuple[str, float]] = field(default_factory=dict, repr=False)

    def failed(self, exc: BaseException, lane: int = 0) -> None:
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        self.lanes[lane] = (error, self.lanes[lane][1] if lane in self.lanes else self.clock())
        self._sync()

    def succeeded(self, lane: int = 0) -> None:
        self.lanes.pop(lane, None)
        self._sync()

    def _sync(self) -> None:
        if not self.lanes:
            self.error = self.since = None
            return
        self.error, self.since = min(self.lanes.values(), key=lambda failure: failure[1])

    def stalled_s(self) -> float:
        return 0.0 if self.since is None else self.clock() - self.since

    async def probe(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the current batch has failed for {self.stalled_s():.0f} s: {self.error}")


async def process_until_done(
    processor: BatchProcessor[Any],
    messages: list[RawMessage],
    policy: LoopPolicy,
    stop: asyncio.Event,
    keep_alive: Callable[[float], Awaitable[None]],
    health: BatchHealth | None = None,
) -> bool:
    """Process one batch, retrying every failure with backoff. False if stopped first.

    Poison (undecodable, or a `PoisonEvent` the projection raised) is dead-lettered
    inside `process`. Anything else that escapes is a dependency down or a bug; both
    stop the line here: the batch is retried, never dead-lettered, while the worker
    stays in the group, its readiness fails with the error, and the stalled-seconds
    gauge grows until an alert fires. The first failure of a batch logs its traceback.
    """
    backoff = Backoff(policy)
    health = health or BatchHealth()
    name = processor.consumer
    while not stop.is_set():
        try:
            await processor.process(messages)
            health.succeeded()
            WORKER_PAUSED.labels(name).set(0)
            WORKER_STALLED_SECONDS.labels(name).set(0)
            return True
        except Exception as exc:
            first = health.since is None
            health.failed(exc)
            WORKER_TRANSIENT_FAILURES.labels(name, type(exc).__name__).inc()
            WORKER_PAUSED.labels(name).set(1)
            WORKER_STALLED_SECONDS.labels(name).set(health.stalled_s())
            delay = backoff.next()
            log.log(
                logging.ERROR if first else logging.WARNING,
                "batch failed; retrying it, nothing is dead-lettered",
                exc_info=first,
                extra={"consumer": name, "error": health.error, "retry_in_s": delay,
                       "stalled_s": round(health.stalled_s(), 1)},
            )
            await keep_alive(delay)
    return False


async def run_live(
    processor: BatchProcessor[Any],
    pool: AsyncConnectionPool,
    bootstrap: str,
    topic: str,
    group_id: str,
    stop: asyncio.Event,
    policy: LoopPolicy = DEFAULT_POLICY,
    session_timeout_ms: int = 10_000,
    health: BatchHealth | None = None,
    log_check: LogCheck | None = None,
) -> None:
    """Consume `topic` as a member of `group_id` until `stop` is set.

    Partitions whose database marks do not fit the log (see `mark_mismatch`) stay
    paused and are reported through `log_check` until an operator rebuilds."""
    check = log_check or LogCheck(processor.consumer)
    health = health or BatchHealth()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=max(500, session_timeout_ms // 5),
        rebalance_timeout_ms=session_timeout_ms,
        max_poll_records=policy.max_batch,
        client_id=f"paymentsvc-{processor.consumer}",
    )
    count = processor.lane_count(policy.lanes)
    lanes = None
    if count > 1:
        # A rebalance waits this long for the batches in flight (within the group's
        # rebalance timeout, which is the session timeout here).
        lanes = _Lanes(consumer, processor, count, policy, stop, health, check, session_timeout_ms / 2000)
    consumer.subscribe(
        [topic], listener=_SeekToDatabase(consumer, pool, processor.consumer, topic, bootstrap, check, lanes)
    )
    await consumer.start()
    if lanes is not None:
        try:
            await lanes.run()
        finally:
            await consumer.stop()
        return

    async def keep_alive(seconds: float) -> None:
        # Keep polling (nothing is fetched while paused) so the group keeps us.
        assigned = list(consumer.assignment())
        consumer.pause(*assigned)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop.is_set():
            records = await consumer.getmany(timeout_ms=int(min(0.5, max(0.0, deadline - time.monotonic())) * 1000))
            # A rebalance meanwhile resumes the partitions it assigns: what came through
            # is given back, never dropped (its offsets would be skipped).
            _give_back(consumer, records)
        consumer.resume(*[tp for tp in assigned if tp.partition not in check.mismatches])

    try:
        while not stop.is_set():
            records = await consumer.getmany(timeout_ms=policy.max_wait_ms, max_records=policy.max_batch)
            # A partition whose marks do not fit its log is paused; records fetched
            # before the pause took effect are dropped too (never committed).
            messages = [m for m in _raw(records) if m.partition not in check.mismatches]
            if not messages:
                continue
            if not await process_until_done(processor, messages, policy, stop, keep_alive, health):
                break
            await _commit(consumer, messages, processor.consumer)
            await _report_lag(consumer, processor.consumer)
    finally:
        await consumer.stop()


class _Lanes:
    """The live loop's partition groups, each a task with one batch in flight (module docstring).

    Lane i owns every `count`-th of the sorted assigned partitions, starting at i, except a
    partition still in flight in another lane (after a rebalance moved it) and one whose
    marks do not fit its log. Only the lanes fetch, each its own partitions; records a lane
    took but may not apply (the mapping changed while it waited, or the worker is paused)
    are given back by seeking their partition to the first of them, so nothing fetched is
    ever skipped.
    """

    def __init__(
        self, consumer: AIOKafkaConsumer, processor: BatchProcessor[Any], count: int, policy: LoopPolicy,
        stop: asyncio.Event, health: BatchHealth, check: LogCheck, revoke_wait_s: float,
    ) -> None:
        self._consumer, self._processor, self._count, self._policy = consumer, processor, count, policy
        self._stop, self._health, self._check, self._revoke_wait_s = stop, health, check, revoke_wait_s
        self._name = processor.consumer
        self.generation = 0  # bumped by a rebalance: a batch of an older one commits no offsets
        self.in_flight: dict[TopicPartition, int] = {}  # partition -> the lane applying a batch of it
        self.failing: set[int] = set()  # lanes whose batch keeps failing: every lane is paused
        self._changed = asyncio.Event()  # a batch left the lanes, or one began failing

    def partitions(self, lane: int) -> list[TopicPartition]:
        assigned = sorted(self._consumer.assignment())
        return [
            tp for i, tp in enumerate(assigned)
            if i % self._count == lane and self.in_flight.get(tp, lane) == lane
            and tp.partition not in self._check.mismatches
        ]

    async def run(self) -> None:
        """Every lane until `stop`; a lane that raises (not a batch: the consumer) stops the
        others, whose batches in flight roll back, and is raised here."""
        tasks = [asyncio.create_task(self._lane(lane), name=f"{self._name}-lane-{lane}") for lane in range(self._count)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def revoked(self) -> None:
        """Before a rebalance: let the batches in flight finish (those not failing), for at
        most `revoke_wait_s`; any batch still running then belongs to the old assignment."""
        deadline = time.monotonic() + self._revoke_wait_s
        if self.in_flight:
            log.info("partitions revoked: the batches in flight finish first",
                     extra={"consumer": self._name, "lanes": sorted(set(self.in_flight.values()))})
        while any(lane not in self.failing for lane in self.in_flight.values()):
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        if self.in_flight:
            log.warning("partitions revoked with batches still in flight: they commit no offsets",
                        extra={"consumer": self._name, "lanes": sorted(set(self.in_flight.values()))})
        self.generation += 1

    async def _lane(self, lane: int) -> None:
        LANE.set(lane)  # this task's batches use this lane's projection (BatchProcessor)
        wait_s = self._policy.max_wait_ms / 1000
        while not self._stop.is_set():
            tps = [] if self.failing else self.partitions(lane)
            if not tps:
                await _sleep_unless(self._stop, wait_s)
                continue
            records = await self._consumer.getmany(*tps, timeout_ms=self._policy.max_wait_ms,
                                                   max_records=self._policy.max_batch)
            mine = set() if self.failing or self._stop.is_set() else set(self.partitions(lane))
            self._give_back({tp: batch for tp, batch in records.items() if tp not in mine})
            messages = _raw({tp: batch for tp, batch in records.items() if tp in mine})
            if not messages:
                continue
            taken = [tp for tp in records if tp in mine]
            generation = self.generation
            for tp in taken:
                self.in_flight[tp] = lane
            try:
                if await self._process(lane, messages, generation) and generation == self.generation:
                    await _commit(self._consumer, messages, self._name)
            finally:
                for tp in taken:
                    if self.in_flight.get(tp) == lane:
                        del self.in_flight[tp]
                self._changed.set()
            await _report_lag(self._consumer, self._name)

    async def _process(self, lane: int, messages: list[RawMessage], generation: int) -> bool:
        """`process_until_done` for one lane: True once the batch committed; False if
        stopped first, or abandoned because a rebalance came while it kept failing."""
        backoff = Backoff(self._policy)
        while not self._stop.is_set():
            if generation != self.generation:
                if lane in self.failing:
                    log.warning("abandoned a failing batch: its partitions were revoked; nothing committed, "
                                "their owner applies it", extra={"consumer": self._name, "lane": lane})
                self._recovered(lane)
                return False
            try:
                await self._processor.process(messages)
            except Exception as exc:
                first = lane not in self._health.lanes
                self._health.failed(exc, lane)
                self.failing.add(lane)
                self._changed.set()
                WORKER_TRANSIENT_FAILURES.labels(self._name, type(exc).__name__).inc()
                WORKER_PAUSED.labels(self._name).set(1)
                WORKER_STALLED_SECONDS.labels(self._name).set(self._health.stalled_s())
                delay = backoff.next()
                log.log(
                    logging.ERROR if first else logging.WARNING,
                    "batch failed; retrying it, nothing is dead-lettered, every lane is paused",
                    exc_info=first,
                    extra={"consumer": self._name, "lane": lane, "error": self._health.lanes[lane][0],
                           "retry_in_s": delay, "stalled_s": round(self._health.stalled_s(), 1)},
                )
                await self._keep_alive(delay, generation)
            else:
                self._recovered(lane)
                return True
        return False

    def _recovered(self, lane: int) -> None:
        paused = bool(self.failing)
        self._health.succeeded(lane)
        self.failing.discard(lane)
        if not self.failing:
            WORKER_PAUSED.labels(self._name).set(0)
            WORKER_STALLED_SECONDS.labels(self._name).set(0)
            if paused:  # the last failing batch is done: what _keep_alive paused goes on
                self._consumer.resume(
                    *[tp for tp in self._consumer.assignment() if tp.partition not in self._check.mismatches]
                )

    async def _keep_alive(self, seconds: float, generation: int) -> None:
        """Wait out a failed batch's backoff while polling (so the group keeps us), every
        partition paused; what a poll returns anyway (a rebalance resumes) is given back."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stop.is_set() and generation == self.generation:
            self._consumer.pause(*self._consumer.assignment())
            records = await self._consumer.getmany(timeout_ms=int(min(0.5, max(0.0, deadline - time.monotonic())) * 1000))
            self._give_back(records)

    def _give_back(self, records: dict[TopicPartition, list[Any]]) -> None:
        _give_back(self._consumer, records)


def _give_back(consumer: AIOKafkaConsumer, records: dict[TopicPartition, list[Any]]) -> None:
    """Fetched records not applied: their partitions go back to the first of them."""
    assigned = consumer.assignment()
    for tp, batch in records.items():
        if batch and tp in assigned:
            consumer.seek(tp, min(r.offset for r in batch))


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _commit(consumer: AIOKafkaConsumer, messages: list[RawMessage], name: str) -> None:
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    for m in messages:
        tp = TopicPartition(m.topic, m.partition)
        if tp not in offsets or offsets[tp].offset < m.offset + 1:
            offsets[tp] = OffsetAndMetadata(m.offset + 1, "")
    owned = {tp: o for tp, o in offsets.items() if tp in consumer.assignment()}
    try:
        if owned:
            await consumer.commit(owned)
    except (CommitFailedError, KafkaError) as exc:
        # The database holds the truth; a new owner seeks there, so this only costs redelivery.
        log.warning("offset commit failed", extra={"consumer": name, "error": type(exc).__name__})


async def _report_lag(consumer: AIOKafkaConsumer, name: str) -> None:
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is not None:
            position = await consumer.position(tp)
            WORKER_LAG.labels(name, tp.topic, str(tp.partition)).set(max(0, highwater - position))


async def run_replay(
    processor: BatchProcessor[Any],
    pool: AsyncConnectionPool,
    bootstrap: str,
    topic: str,
    stop: asyncio.Event,
    policy: LoopPolicy = DEFAULT_POLICY,
    until: dict[int, int] | None = None,
    progress: Progress | None = None,
    partitions: Sequence[int] | None = None,
) -> dict[int, int]:
    """Apply `topic` (only `partitions`, default all) from the target's high-water marks
    up to `until` (default: the end now).

    Returns the end offsets reached per partition.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=policy.max_batch)
    await consumer.start()
    try:
        if partitions is None:
            partitions = sorted(consumer.partitions_for_topic(topic) or await _partitions(consumer, topic))
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        ends = until if until is not None else await log_end_offsets(bootstrap, tps)
        starts = await database_offsets(pool, processor.consumer, topic)
        for tp in tps:
            consumer.seek(tp, starts.get(tp.partition, 0))
        done = {p: starts.get(p, 0) for p in partitions}
        total = 0
        if progress:
            progress(total, done, ends)

        async def keep_alive(seconds: float) -> None:
            await asyncio.sleep(seconds)

        while not stop.is_set() and any(done[p] < ends.get(p, 0) for p in partitions):
            records = await consumer.getmany(timeout_ms=policy.max_wait_ms, max_records=policy.max_batch)
            messages = [m for m in _raw(records) if m.offset < ends.get(m.partition, 0)]
            if messages and not await process_until_done(processor, messages, policy, stop, keep_alive):
                break
            for m in messages:
                done[m.partition] = max(done[m.partition], m.offset + 1)
            total += len(messages)
            if progress:
                progress(total, done, ends)
        return done
    finally:
        await consumer.stop()


async def log_end_offsets(bootstrap: str, tps: list[TopicPartition], timeout: float = 10.0) -> dict[int, int]:
    """The end offset of each partition, as fetch responses report it (their high watermark).

    Not ListOffsets: Tansu 0.6 answers it with a wrong offset once a producer has
    sent several records in one batch (seen here: 1 for a partition holding 10),
    while the high watermark of a fetch is right. On Kafka both agree.
    """
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=1)
    await probe.start()
    try:
        probe.assign(tps)
        await probe.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(probe.highwater(tp) is None for tp in tps):
            await probe.getmany(timeout_ms=100, max_records=1)
        listed = await probe.end_offsets(tps)
        return {tp.partition: max(probe.highwater(tp) or 0, listed.get(tp, 0)) for tp in tps}
    finally:
        await probe.stop()


async def topic_partitions(bootstrap: str, topic: str) -> list[int]:
    """The partition numbers of `topic`, sorted, from the cluster's metadata.

    A bare client: a consumer stopped before it consumed anything raises CancelledError
    from its own coordinator's task (aiokafka 0.12)."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        metadata = await client.fetch_all_metadata()
        partitions = metadata.partitions_for_topic(topic)
        if not partitions:
            raise KafkaError(f"topic {topic} has no partitions")
        return sorted(partitions)
    finally:
        await client.close()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()  # noqa: SLF001 - no public refresh
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise KafkaError(f"topic {topic} has no partitions")
    return set(partitions)
