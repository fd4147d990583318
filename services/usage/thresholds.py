"""Usage thresholds (catalog `alerts`): which increments of a batch cross one, as a
plain function of the events in log order, the counters before the batch and the
catalog. No I/O and no clock, so a replay of usage-events finds the same crossings.

The rule (docs/catalog.md, "Alerts"): a threshold fires the first time a period's
counter reaches it (`before < units <= after`), once per period. A counter going
back under it (a release) and crossing it again fires nothing: the caller's
table, keyed by `Crossing.key`, refuses the second row, and `crossings` itself
keeps only the first crossing of a key within the batch.

Counters are the pool's (scope `pool`: the subject charged, user or family) and,
inside a family pool with a member cap, the member's (scope `member`), each with
its own limit: percentages are of the pool's limit or of the member cap.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from payment.v1 import events_pb2
from shared.catalog import Catalog, Feature
from shared.kafka import OutgoingMessage, event_headers, publish_all

EVENT_TYPE = "usage.threshold_crossed"
# (scope, subject type, subject id, member id or "", feature, period start)
CounterKey = tuple[str, str, str, str, str, int]


@dataclass(frozen=True, slots=True)
class Crossing:
    scope: str
    subject_type: str
    subject_id: str
    member_id: str
    feature_code: str
    period_start: int
    period_end: int
    threshold: str
    units: int
    usage: int
    limit: int  # -1: none
    plan_id: str
    event_id: str  # the usage event that crossed it
    user_id: str
    family_id: str
    created_ms: int

    @property
    def key(self) -> tuple[str, str, str, str, str, int, str]:
        return (self.scope, self.subject_type, self.subject_id, self.member_id, self.feature_code,
                self.period_start, self.threshold)

    @property
    def alert_id(self) -> str:
        """Stable: the same crossing, published twice or rebuilt, has the same id."""
        raw = "\x00".join(str(part) for part in self.key).encode()
        return "thr_" + hashlib.sha256(raw).hexdigest()[:32]


def _feature(catalog: Catalog, event: events_pb2.UsageEvent) -> Feature | None:
    plan = catalog.plans.get(event.plan_id) if event.plan_id else None
    feature = plan.features.get(event.feature_code) if plan is not None else None
    return feature if feature is not None and feature.alerts else None


def _counters(event: events_pb2.UsageEvent) -> list[tuple[CounterKey, int]]:
    """The counters an event changes, each with the limit it is measured against."""
    pool: CounterKey = ("pool", event.subject_type, event.subject_id, "", event.feature_code, event.period_start)
    out = [(pool, event.limit)]
    if event.subject_type == "family" and event.user_id and event.HasField("member_cap"):
        member: CounterKey = ("member", "family", event.subject_id, event.user_id, event.feature_code,
                              event.period_start)
        out.append((member, event.member_cap))
    return out


def watched(events: Iterable[events_pb2.UsageEvent], catalog: Catalog) -> set[CounterKey]:
    """The counters of the batch that have thresholds: their values before the batch
    are what `crossings` needs."""
    return {key for e in events if _feature(catalog, e) is not None for key, _ in _counters(e)}


def crossings(
    events: Sequence[events_pb2.UsageEvent], before: Mapping[CounterKey, int], catalog: Catalog
) -> list[Crossing]:
    """The thresholds the events cross, in log order, each key once. `before` holds the
    watched counters' values before the batch (a missing one is 0)."""
    running = dict(before)
    seen: set[tuple[str, str, str, str, str, int, str]] = set()
    out: list[Crossing] = []
    keys = watched(events, catalog)
    for event in events:
        feature = _feature(catalog, event)
        for key, limit in _counters(event):
            if key not in keys:
                continue
            prev = running.get(key, 0)
            now = max(0, prev + event.amount)
            running[key] = now
            if feature is None or event.amount <= 0:
                continue
            for spec, units in feature.thresholds(limit if limit >= 0 else None):
                if not prev < units <= now:
                    continue
                crossing = Crossing(
                    key[0], key[1], key[2], key[3], key[4], key[5], event.period_end, spec, units, now, limit,
                    event.plan_id, event.event_id, event.user_id, event.family_id, event.created_ms,
                )
                if crossing.key not in seen:
                    seen.add(crossing.key)
                    out.append(crossing)
    return out


def crossed_event(c: Crossing) -> events_pb2.UsageThresholdCrossed:
    return events_pb2.UsageThresholdCrossed(
        event_id=c.alert_id, scope=c.scope, subject_type=c.subject_type, subject_id=c.subject_id,
        user_id=c.member_id or c.user_id, family_id=c.family_id, feature_code=c.feature_code, plan_id=c.plan_id,
        period_start=c.period_start, period_end=c.period_end, threshold=c.threshold, threshold_units=c.units,
        usage=c.usage, limit=c.limit, crossing_event_id=c.event_id, created_ms=c.created_ms,
    )


def sender(producer: AIOKafkaProducer, topic: str, timeout_s: float = 10.0) -> Callable[[list[bytes]], Awaitable[None]]:
    """The outbox relay's `send` for staged UsageThresholdCrossed payloads: one produce
    batch, keyed by the subject, acknowledged before the relay deletes them."""

    async def send(payloads: list[bytes]) -> None:
        messages = []
        for payload in payloads:
            e = events_pb2.UsageThresholdCrossed.FromString(payload)
            headers = event_headers(e.event_id, EVENT_TYPE, "UsageThresholdCrossed", occurred_at=e.created_ms / 1000)
            messages.append(OutgoingMessage(topic, e.subject_id.encode(), payload, tuple(headers), EVENT_TYPE))
        await publish_all(producer, messages, timeout_s)

    return send
