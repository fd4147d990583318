"""`paymentsvc renormalize`: normalize archived raw Stripe events again, after a fix.

Every verified webhook is on `stripe-raw-events` (key: the Stripe event id) before it is
answered, and one that could not be normalized is also on `payment-events.dlq` (header
`failed-in: ingest_webhooks`). After a normalizer fix, an operator selects raw events

- by Stripe event id (`--event-id`, repeatable),
- by the time they were archived (`--since` / `--until`, the raw record's timestamp), or
- as everything the ingester dead-lettered (`--from-dlq`),

and publishes their normalized `PaymentEvent` to `payment-events` with the *same* event
id, key and headers the ingester would have used. The workers' inbox makes a second run,
or an event that had been published already, a no-op.

A dry run (the default) publishes nothing and reports what would be published. Events
that still cannot be normalized, and types that are not projected, are counted and
never published. The topics are read from offset 0 to their end as it was at the start
(Tansu has no offsets_for_times, so a time range is a filter over the whole topic).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from services.ingest_webhooks.handlers import payment_event_message
from services.ingest_webhooks.normalize import PROJECTED_TYPES, MalformedEvent, normalize
from shared.config import Topics
from shared.consumer import log_end_offsets
from shared.errors import ConfigurationError, DependencyUnavailable
from shared.kafka import OutgoingMessage, PublishFailed, make_producer, publish_all

FIRST_IDS_SHOWN = 5
INGESTER = b"ingest_webhooks"


@dataclass(frozen=True)
class Selection:
    """Which archived events to re-normalize: exactly one of ids, a time range, the DLQ."""

    event_ids: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None
    from_dlq: bool = False

    def __post_init__(self) -> None:
        modes = sum((bool(self.event_ids), self.since is not None or self.until is not None, self.from_dlq))
        if modes != 1:
            raise ConfigurationError("select by --event-id, by --since/--until, or --from-dlq (exactly one)")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ConfigurationError(
                f"bad range: --since {self.since.isoformat()} is not before --until {self.until.isoformat()}"
            )

    def wants(self, record: ConsumerRecord) -> bool:
        if self.from_dlq:
            return dict(record.headers).get("failed-in") == INGESTER
        if self.event_ids:
            return _event_id(record) in self.event_ids
        at = record.timestamp / 1000
        return (self.since is None or at >= self.since.timestamp()) and (
            self.until is None or at < self.until.timestamp()
        )


def _event_id(record: ConsumerRecord) -> str:
    """A raw record's key is its Stripe event id (the body's digest when it had none)."""
    return record.key.decode(errors="replace") if record.key else ""


def parse_time(value: str, option: str) -> datetime:
    """An ISO-8601 time; a naive one is UTC. ConfigurationError names the option."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigurationError(f"bad range: {option} {value!r} is not an ISO-8601 time") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


@dataclass
class Plan:
    """What a run found: the messages to publish and what it left out, and why."""

    messages: list[OutgoingMessage] = field(default_factory=list)
    by_type: Counter[str] = field(default_factory=Counter)
    unnormalizable: dict[str, str] = field(default_factory=dict)  # event id -> reason
    not_projected: int = 0
    unreadable: int = 0
    scanned: int = 0

    def lines(self, applied: bool, topic: str) -> list[str]:
        counts = ", ".join(f"{kind} {n}" for kind, n in sorted(self.by_type.items())) or "-"
        ids = [m.headers[0][1].decode() for m in self.messages[:FIRST_IDS_SHOWN]]
        lines = [
            f"scanned {self.scanned} archived record(s); selected {len(self.messages)} to publish: {counts}",
            f"first ids: {', '.join(ids) or '-'}",
        ]
        if self.unnormalizable:
            first = next(iter(self.unnormalizable.items()))
            lines.append(
                f"still unnormalizable: {len(self.unnormalizable)} (not published), e.g. {first[0]}: {first[1]}"
            )
        if self.not_projected or self.unreadable:
            lines.append(f"skipped: {self.not_projected} of a type not projected, {self.unreadable} unreadable")
        verb = "published" if applied else "would publish"
        tail = "" if applied else " (dry run: nothing published; --apply publishes)"
        lines.append(f"{verb} {len(self.messages)} event(s) to {topic} with their original event ids{tail}")
        return lines


def plan(records: Iterable[ConsumerRecord], selection: Selection, topics: Topics) -> Plan:
    """The normalized messages for the selected records, one per event id (the first seen)."""
    result = Plan()
    seen: set[str] = set()
    for record in records:
        result.scanned += 1
        if not selection.wants(record):
            continue
        try:
            event = orjson.loads(record.value)
            event_id, event_type = event["id"], event["type"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            result.unreadable += 1
            continue
        if event_id in seen:
            continue
        seen.add(event_id)
        if event_type not in PROJECTED_TYPES:
            result.not_projected += 1
            continue
        try:
            normalized = normalize(event)
        except MalformedEvent as exc:
            result.unnormalizable[event_id] = str(exc)
            continue
        assert normalized is not None  # a projected type normalizes or raises
        result.messages.append(payment_event_message(normalized, topics))
        result.by_type[event_type] += 1
    return result


Progress = Callable[[int, int], None]  # (records read, records to read)


async def read_archive(
    bootstrap: str, topic: str, progress: Progress | None = None, timeout_s: float = 10.0
) -> list[ConsumerRecord]:
    """Every record of `topic` up to its end at the start of the call.

    Raises DependencyUnavailable when the broker cannot be reached, ConfigurationError
    when the topic does not exist.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()  # a failed start leaves the client open
        raise DependencyUnavailable("kafka", bootstrap, str(exc) or type(exc).__name__) from None
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - no public refresh
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise ConfigurationError(f"topic {topic} does not exist on {bootstrap}; run: paymentsvc topics create")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        ends = await log_end_offsets(bootstrap, tps, timeout_s)
        total = sum(ends.values())
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord] = []
        done = {tp.partition: 0 for tp in tps}
        while any(done[p] < ends.get(p, 0) for p in done):
            batch = await consumer.getmany(timeout_ms=500)
            for tp, messages in batch.items():
                wanted = [m for m in messages if m.offset < ends.get(tp.partition, 0)]
                records.extend(wanted)
                if wanted:
                    done[tp.partition] = max(done[tp.partition], wanted[-1].offset + 1)
            if progress is not None:
                progress(sum(done.values()), total)
        return records
    except KafkaError as exc:
        raise DependencyUnavailable("kafka", bootstrap, f"reading {topic}: {exc}") from None
    finally:
        await consumer.stop()


async def renormalize(
    bootstrap: str,
    topics: Topics,
    selection: Selection,
    *,
    apply: bool,
    progress: Progress | None = None,
    timeout_s: float = 10.0,
) -> Plan:
    """Select, normalize and (with `apply`) publish; returns what was found.

    Publishing waits for acks=all of every message; DependencyUnavailable if it fails.
    """
    source = topics.dlq(topics.payment_events) if selection.from_dlq else topics.stripe_raw_events
    found = plan(await read_archive(bootstrap, source, progress, timeout_s), selection, topics)
    if apply and found.messages:
        await _publish(bootstrap, found.messages, timeout_s)
    return found


async def _publish(bootstrap: str, messages: Sequence[OutgoingMessage], timeout_s: float) -> None:
    producer = make_producer(bootstrap)
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        raise DependencyUnavailable("kafka", bootstrap, str(exc) or type(exc).__name__) from None
    try:
        await publish_all(producer, messages, timeout_s)
    except PublishFailed as exc:
        raise DependencyUnavailable("kafka", bootstrap, f"events not acknowledged: {exc}") from None
    finally:
        await producer.stop()
