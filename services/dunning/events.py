"""The messages the dunning service publishes, and the port it publishes them through.

* On payment-events: the scheduler's decisions as `PaymentEvent`s with source
  EVENT_SOURCE_DUNNING (dunning.attempt_made, dunning.escalated, dunning.restored),
  keyed by customer. The dunning projection and the entitlements worker apply them
  from the log, so a replay rebuilds their effects without repeating them.
* On dunning-events: every step as a `DunningEvent`, for notification services.

Event ids are derived from the case and the step, so a step published twice (a
scheduler that crashed after publishing and retried) is deduplicated by the inboxes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from aiokafka import AIOKafkaProducer

from payment.v1 import events_pb2
from services.dunning.model import ATTEMPT_MADE, ESCALATED, RESTORED, Notice
from services.dunning.repository import DueCase
from shared.config import Topics
from shared.kafka import event_headers, publish


class Publisher(Protocol):
    """Where the dunning service's messages go. Both methods return once acknowledged
    and raise (e.g. shared.kafka.PublishFailed) otherwise."""

    async def decision(self, event: events_pb2.PaymentEvent) -> None: ...

    async def notices(self, events: Sequence[events_pb2.DunningEvent]) -> None: ...


class KafkaPublisher:
    """Publisher on the broker, with the headers the ingester sets."""

    def __init__(self, producer: AIOKafkaProducer, topics: Topics, timeout_s: float = 10.0) -> None:
        self._producer = producer
        self._topics = topics
        self._timeout_s = timeout_s

    async def decision(self, event: events_pb2.PaymentEvent) -> None:
        await publish(
            self._producer, self._topics.payment_events, event.SerializeToString(),
            key=event.customer_id.encode(), headers=event_headers(event.event_id, event.event_type, "PaymentEvent", occurred_at=event.created),
            event_type=event.event_type, timeout_s=self._timeout_s,
        )

    async def notices(self, events: Sequence[events_pb2.DunningEvent]) -> None:
        """Publish in order, each acknowledged before the next (per-key order holds)."""
        for e in events:
            kind = events_pb2.DunningEvent.Kind.Name(e.kind)
            await publish(
                self._producer, self._topics.dunning_events, e.SerializeToString(),
                key=e.customer_id.encode(), headers=event_headers(e.event_id, kind, "DunningEvent", occurred_at=e.created),
                event_type=kind, timeout_s=self._timeout_s,
            )


# ---------------------------------------------------------------- decisions


def decision_event(
    event_type: str, case: DueCase, created: int, *, attempt: int = 0, status: str = "",
    error: str = "", reason: str = "",
) -> events_pb2.PaymentEvent:
    """A scheduler decision about `case`, as a PaymentEvent on payment-events."""
    step = {ATTEMPT_MADE: f"attempt-{attempt}", ESCALATED: "escalate", RESTORED: "restore"}[event_type]
    return events_pb2.PaymentEvent(
        event_type=event_type,
        event_id=f"dunning-{case.case_id}-{step}",
        created=created,
        customer_id=case.customer_id,
        source=events_pb2.EVENT_SOURCE_DUNNING,
        user_id=case.user_id or "",
        family_id=case.family_id or "",
        plan_id=case.plan_id or "",
        price_id=case.price_id or "",
        subscription_id=case.subscription_id or "",
        object_type="invoice",
        object_id=case.invoice_id,
        invoice_id=case.invoice_id,
        amount=case.amount_due or 0,
        currency=case.currency or "",
        status=status,
        attempt_count=attempt,
        failure_message=error,
        reason=reason,
    )


def decision_notice(
    kind: str, case: DueCase, created: int, *, attempt: int = 0, state: str = "", error: str = ""
) -> events_pb2.DunningEvent:
    """The dunning-events message of a scheduler decision (ATTEMPT_MADE, ESCALATED)."""
    return events_pb2.DunningEvent(
        event_id=f"dunning-{case.case_id}-{kind.lower()}-{attempt}",
        kind=events_pb2.DunningEvent.Kind.Value(kind),
        case_id=case.case_id,
        invoice_id=case.invoice_id,
        customer_id=case.customer_id,
        subscription_id=case.subscription_id or "",
        user_id=case.user_id or "",
        family_id=case.family_id or "",
        attempt=attempt,
        state=state or case.state,
        error=error,
        created=created,
        amount=case.amount_due or 0,
        currency=case.currency or "",
        plan_id=case.plan_id or "",
    )


def notice_event(notice: Notice) -> events_pb2.DunningEvent:
    """The dunning-events message of a step the projection applied."""
    case = notice.case
    return events_pb2.DunningEvent(
        event_id=f"{notice.source_event_id}:{notice.kind.lower()}",
        kind=events_pb2.DunningEvent.Kind.Value(notice.kind),
        case_id=case.case_id,
        invoice_id=case.invoice_id,
        customer_id=case.customer_id,
        subscription_id=case.subscription_id or "",
        user_id=case.user_id or "",
        family_id=case.family_id or "",
        attempt=case.attempt_count,
        next_attempt_at=case.next_attempt_at or 0,
        state=case.state,
        error=case.last_error or "",
        created=notice.created,
        amount=case.amount_due or 0,
        currency=case.currency or "",
        plan_id=case.plan_id or "",
    )


def notice_sender(publisher: Publisher) -> Callable[[list[bytes]], Awaitable[None]]:
    """The outbox relay's `send` for dunning notices staged as serialized DunningEvents."""

    async def send(payloads: list[bytes]) -> None:
        await publisher.notices([events_pb2.DunningEvent.FromString(p) for p in payloads])

    return send
