"""Commands that become events: the PaymentEvents the API publishes, built by pure
functions, and the port that publishes them.

Event ids of commands are derived from the caller's idempotency key, so a retried
command publishes the same event and the worker's inbox drops the duplicate.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer

from payment.v1 import events_pb2
from services.api_grpc.errors import Unavailable
from shared.kafka import PublishFailed, event_headers, payment_event_key, publish

PAYMENT_CREATED = "payment.created"
PAYMENT_STATUS_UPDATED = "payment.status_updated"


def event_id_for(event_type: str, idempotency_key: str) -> str:
    """A stable event id for the command with this idempotency key."""
    if not idempotency_key:
        return f"api_{uuid.uuid4().hex}"
    digest = hashlib.sha256(f"{event_type}\x00{idempotency_key}".encode()).hexdigest()
    return f"api_{digest[:32]}"


def headers(event: events_pb2.PaymentEvent, traceparent: str = "") -> list[tuple[str, bytes]]:
    """The headers the ingester sets on payment-events.

    The trace context is the current one: the RPC's server span (interceptors.CallInterceptor),
    which already continues the caller's `traceparent`, so `traceparent` is not needed
    and kept only for the callers' signature.
    """
    del traceparent
    return event_headers(event.event_id, event.event_type, "PaymentEvent", occurred_at=event.created)


@dataclass(frozen=True, slots=True)
class NewPayment:
    idempotency_key: str
    user_id: str
    family_id: str
    customer_id: str
    amount: int
    currency: str
    description: str
    metadata: Mapping[str, str]
    actor: str


def payment_created(command: NewPayment, intent: Any) -> events_pb2.PaymentEvent:
    """payment.created for a PaymentIntent; `created` is the intent's, so a retry that
    Stripe answers with the same intent yields the very same event."""
    return events_pb2.PaymentEvent(
        event_type=PAYMENT_CREATED,
        event_id=event_id_for(PAYMENT_CREATED, command.idempotency_key),
        created=int(intent["created"]),
        customer_id=command.customer_id,
        user_id=command.user_id,
        family_id=command.family_id,
        source=events_pb2.EVENT_SOURCE_API,
        object_type="payment_intent",
        object_id=intent["id"],
        payment_intent_id=intent["id"],
        amount=command.amount,
        currency=command.currency,
        status="pending",
        description=command.description,
        metadata=dict(command.metadata),
        actor=command.actor,
        livemode=bool(intent.get("livemode") or False),
    )


def payment_status_updated(
    payment: Mapping[str, Any], status: str, reason: str, idempotency_key: str, actor: str, now: int
) -> events_pb2.PaymentEvent:
    """payment.status_updated for a stored payment row; the worker applies it."""
    return events_pb2.PaymentEvent(
        event_type=PAYMENT_STATUS_UPDATED,
        event_id=event_id_for(PAYMENT_STATUS_UPDATED, idempotency_key),
        created=now,
        customer_id=payment.get("customer_id") or "",  # empty for a guest's payment
        user_id=payment.get("user_id") or "",
        family_id=payment.get("family_id") or "",
        source=events_pb2.EVENT_SOURCE_API,
        object_type="payment_intent" if payment.get("payment_intent_id") else "charge",
        object_id=payment["payment_id"],
        payment_intent_id=payment.get("payment_intent_id") or "",
        charge_id=payment.get("charge_id") or "",
        amount=int(payment["amount"]),
        currency=payment["currency"],
        status=status,
        reason=reason,
        actor=actor,
    )


class EventBus(Protocol):
    async def publish(self, event: events_pb2.PaymentEvent, traceparent: str, timeout: float) -> None:
        """Return once the broker acknowledged (acks=all); else raise Unavailable."""


class KafkaEventBus:
    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    async def publish(self, event: events_pb2.PaymentEvent, traceparent: str, timeout: float) -> None:
        try:
            await publish(
                self._producer,
                self._topic,
                event.SerializeToString(),
                key=payment_event_key(event).encode(),
                headers=headers(event, traceparent),
                event_type=event.event_type,
                timeout_s=timeout,
            )
        except PublishFailed as exc:
            raise Unavailable(f"the event bus did not acknowledge: {exc}") from exc
