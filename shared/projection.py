"""The contract between the shared worker runtime and a service's projection.

The runtime (shared/worker.py) consumes a topic, decodes each message into an
`Envelope`, drops the ones its inbox has seen, and hands the rest of a batch
to `Projection.apply` inside one Postgres transaction, in partition order.
It then records the inbox rows and the per-partition high-water marks in the
same transaction, commits, calls `Projection.after_commit` with what `apply`
returned, and only then commits the Kafka offsets.

A projection raises `PoisonEvent` for an event it can never apply (the runtime
dead-letters that event and applies the rest of the batch). Any other
exception from `apply` is treated as transient: the transaction rolls back,
nothing is committed, and the batch is retried with backoff. A replay
(`ctx.replay`) must not cause side effects: no Stripe calls, no emitted events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf.message import DecodeError
from psycopg import AsyncConnection

from payment.v1 import events_pb2
from shared.kafka import payment_event_key
from shared.values import value

M = TypeVar("M")


@value
class Envelope(Generic[M]):
    """One decoded message and where it came from."""

    event_id: str
    event_type: str
    message: M
    topic: str
    partition: int
    offset: int
    key: bytes | None
    traceparent: str = ""  # the producer's context (header), for work this event causes later


@dataclass(frozen=True, slots=True)
class ApplyContext:
    consumer: str
    replay: bool
    now: float  # the injected clock's reading for this batch (Unix seconds)


class PoisonEvent(Exception):
    """This event can never be applied; dead-letter it and move on."""

    def __init__(self, event_id: str, reason: str) -> None:
        super().__init__(reason)
        self.event_id = event_id
        self.reason = reason


class Projection(Protocol[M]):
    name: str  # the consumer name: inbox and offset rows are keyed by it

    def decode(self, value: bytes, headers: dict[str, bytes]) -> tuple[str, str, M]:
        """(event_id, event_type, message) or raise ValueError for an undecodable message."""

    async def apply(self, conn: AsyncConnection[Any], events: list[Envelope[M]], ctx: ApplyContext) -> Any:
        """Apply new events in order, inside the caller's transaction. Returns what
        after_commit needs (e.g. the subjects whose cache must be refreshed)."""

    async def after_commit(self, result: Any, ctx: ApplyContext) -> None:
        """Post-commit work that may fail without losing anything (e.g. Redis)."""


def decode_payment_event(value: bytes) -> tuple[str, str, events_pb2.PaymentEvent]:
    """(event_id, event_type, event) of a payment-events message, for `Projection.decode`.

    Raises ValueError for bytes that are no PaymentEvent, or one without the event id
    (the inbox key) or a partition key (`payment_event_key`).
    """
    try:
        event = events_pb2.PaymentEvent.FromString(value)
    except DecodeError as exc:
        raise ValueError(f"not a payment.v1.PaymentEvent: {exc}") from exc
    if not event.event_id:
        raise ValueError("PaymentEvent without event_id")
    if not payment_event_key(event):
        raise ValueError(f"PaymentEvent {event.event_id} without customer_id or payment id")
    return event.event_id, event.event_type, event

