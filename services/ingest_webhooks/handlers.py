"""What to publish for one verified Stripe event: a pure function, no I/O.

- A projected type: the raw event to `stripe-raw-events` and the normalized
  `PaymentEvent` to `payment-events`.
- A type we do not project: the raw event only (archived, counted, 200).
- A projected type we cannot normalize: the raw event, plus the raw event on
  `payment-events.dlq` with the error, and the request is answered 400 so that
  Stripe retries; after a parser fix a retry or a re-normalization of
  `stripe-raw-events` recovers it. Nothing is lost either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from services.ingest_webhooks.normalize import (
    PROJECTED_TYPES,
    MalformedEvent,
    normalize,
    partition_key,
)
from services.ingest_webhooks.verify import WebhookRejected
from shared.config import Topics
from shared.kafka import OutgoingMessage, event_headers

JSON_CONTENT_TYPE = b"application/json"

Outcome = Literal["published", "archived", "dead_lettered"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """The messages that must all be acknowledged before the request is answered."""

    event_id: str
    event_type: str
    outcome: Outcome
    messages: tuple[OutgoingMessage, ...]
    error: str = ""


def _envelope(event: Any) -> tuple[str, str]:
    if not isinstance(event, dict):
        raise WebhookRejected(400, "malformed_event", "the body is not a JSON object")
    event_id, event_type = event.get("id"), event.get("type")
    if not isinstance(event_id, str) or not event_id:
        raise WebhookRejected(400, "malformed_event", "the event has no id")
    if not isinstance(event_type, str) or not event_type:
        raise WebhookRejected(400, "malformed_event", "the event has no type")
    return event_id, event_type


def plan_delivery(event: Any, raw_body: bytes, topics: Topics, traceparent: str = "") -> Delivery:
    """Decide the messages for a verified event. Raises WebhookRejected for a non-event."""
    event_id, event_type = _envelope(event)
    trace = (("traceparent", traceparent.encode()),) if traceparent else ()
    base_headers = (("event-id", event_id.encode()), ("event-type", event_type.encode()))
    raw = OutgoingMessage(
        topic=topics.stripe_raw_events,
        key=event_id.encode(),
        value=raw_body,
        headers=base_headers
        + (("content-type", JSON_CONTENT_TYPE), ("api-version", str(event.get("api_version") or "").encode()))
        + trace,
        event_type=event_type,
    )
    if event_type not in PROJECTED_TYPES:
        return Delivery(event_id, event_type, "archived", (raw,))
    try:
        normalized = normalize(event)
    except MalformedEvent as exc:
        return Delivery(event_id, event_type, "dead_lettered", (raw, _dead_letter(raw, str(exc), topics)), str(exc))
    assert normalized is not None  # a projected type always normalizes or raises
    published = OutgoingMessage(
        topic=topics.payment_events,
        key=partition_key(normalized).encode(),
        value=normalized.SerializeToString(),
        headers=tuple(event_headers(event_id, event_type, "PaymentEvent", traceparent)),
        event_type=event_type,
    )
    return Delivery(event_id, event_type, "published", (raw, published))


def _dead_letter(raw: OutgoingMessage, error: str, topics: Topics) -> OutgoingMessage:
    return OutgoingMessage(
        topic=topics.dlq(topics.payment_events),
        key=raw.key,
        value=raw.value,
        headers=raw.headers
        + (("error", error.encode()[:1000]), ("error-class", b"MalformedEvent"), ("failed-in", b"ingest_webhooks")),
        event_type=raw.event_type,
    )
