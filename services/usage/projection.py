"""The usage projection: usage-events -> usage_records and the per-period aggregates
(usage_aggregates for pools, usage_member_aggregates for members of a family pool).

It implements shared/projection.py's contract; shared/worker.py runs it, so each batch is
applied in one transaction with its inbox rows (effectively once). The events carry
amounts already decided and clamped by the API's Lua script, so `apply` only records
and sums them. Redis is not touched here: the API changes the counters before it
publishes, and `paymentsvc usage rebuild-cache` rebuilds them from these tables.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError
from psycopg import AsyncConnection

from domain.usage import repository
from payment.v1 import events_pb2
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


class UsageProjection:
    """Projection[UsageEvent] named "usage"; see the module docstring."""

    name = "usage"

    def decode(self, value: bytes, headers: dict[str, bytes]) -> tuple[str, str, events_pb2.UsageEvent]:
        try:
            event = events_pb2.UsageEvent.FromString(value)
        except DecodeError as exc:
            raise ValueError(f"not a payment.v1.UsageEvent: {exc}") from exc
        check(event)
        return event.event_id, EVENT_TYPE, event

    async def apply(self, conn: AsyncConnection[Any], events: list[UsageEnvelope], ctx: ApplyContext) -> int:
        """Record the batch inside the caller's transaction; database errors propagate
        (transient). Returns how many increments were new."""
        return len(await repository.record(conn, [e.message for e in events]))

    async def after_commit(self, result: Any, ctx: ApplyContext) -> None:
        return None
