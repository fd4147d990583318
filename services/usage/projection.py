"""The usage projection: usage-events -> usage_records and the per-period aggregates
(usage_aggregates for pools, usage_member_aggregates for members of a family pool).

It implements shared/projection.py's contract; shared/worker.py runs it, so each batch is
applied in one transaction with its inbox rows (effectively once). The events carry
amounts already decided and clamped by the API's Lua script, so `apply` only records
and sums them. Redis is not touched here: the API changes the counters before it
publishes, and `paymentsvc usage rebuild-cache` rebuilds them from these tables.

Thresholds (catalog `alerts`, services/usage/thresholds.py): `apply` reads the batch's
watched counters before adding to them (locked), folds the new increments in log order
into the crossings, and records them in usage_thresholds (its key refuses a second
crossing in a period). The new ones are staged in the transactional outbox in the same
transaction, each under the `traceparent` of the usage event that crossed it, and
`after_commit` asks the relay to publish them on usage-thresholds: at
least once, never in replay, and not at all without a relay (the table is still written,
so a replay rebuilds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError
from psycopg import AsyncConnection

from domain.usage import repository
from payment.v1 import events_pb2
from services.usage import repository as threshold_repository
from services.usage import thresholds
from shared.catalog import Catalog
from shared.outbox import OutboxRelay, stage
from shared.projection import ApplyContext, Envelope

UsageEnvelope = Envelope[events_pb2.UsageEvent]
EVENT_TYPE = "usage.recorded"


def check(event: events_pb2.UsageEvent) -> None:
    """ValueError for an event that can never be applied (it is dead-lettered)."""
    if not event.event_id or not event.idempotency_key:
        raise ValueError("UsageEvent without event_id or idempotency_key")
    if event.subject_type not in ("user", "family") or not event.subject_id:
        raise ValueError(f"UsageEvent {event.event_id}: bad subject {event.subject_type!r}/{event.subject_id!r}")
    if not event.feature_code:
        raise ValueError(f"UsageEvent {event.event_id} without feature_code")
    if event.period_end <= event.period_start:
        raise ValueError(f"UsageEvent {event.event_id}: period_end is not after period_start")


@dataclass(frozen=True, slots=True)
class UsageBatch:
    """What `apply` hands to `after_commit`."""

    recorded: int
    crossed: tuple[thresholds.Crossing, ...]


class UsageProjection:
    """Projection[UsageEvent] named "usage"; see the module docstring. Without a catalog
    no threshold is watched (the increments are still recorded)."""

    name = "usage"

    def __init__(self, catalog: Catalog | None = None, relay: OutboxRelay | None = None) -> None:
        self._catalog = catalog
        self._relay = relay

    def decode(self, value: bytes, headers: dict[str, bytes]) -> tuple[str, str, events_pb2.UsageEvent]:
        try:
            event = events_pb2.UsageEvent.FromString(value)
        except DecodeError as exc:
            raise ValueError(f"not a payment.v1.UsageEvent: {exc}") from exc
        check(event)
        return event.event_id, EVENT_TYPE, event

    async def apply(self, conn: AsyncConnection[Any], events: list[UsageEnvelope], ctx: ApplyContext) -> UsageBatch:
        """Record the batch and the thresholds it crosses inside the caller's transaction;
        database errors propagate (transient)."""
        messages = [e.message for e in events]
        watched = thresholds.watched(messages, self._catalog) if self._catalog is not None else set()
        before = await threshold_repository.counters_before(conn, watched) if watched else {}
        new_ids = set(await repository.record(conn, messages))
        if not watched or self._catalog is None:
            return UsageBatch(len(new_ids), ())
        new = [m for m in messages if m.event_id in new_ids]
        crossed = await threshold_repository.record(conn, thresholds.crossings(new, before, self._catalog))
        if crossed and self._relay is not None and not ctx.replay:
            # Each crossing continues the trace of the usage event that crossed it (issue 14),
            # not the batch span's, which follows only the batch's first message.
            causes = {e.event_id: e.traceparent for e in events}
            await stage(conn, self.name, [thresholds.crossed_event(c).SerializeToString() for c in crossed],
                        [causes.get(c.event_id, "") for c in crossed])
        return UsageBatch(len(new_ids), tuple(crossed))

    async def after_commit(self, result: UsageBatch | None, ctx: ApplyContext) -> None:
        """Publish the staged crossings (live only). Never raises: the relay's background
        run retries what is left staged."""
        if result is None or not result.crossed or ctx.replay or self._relay is None:
            return
        await self._relay.flush_quietly()
