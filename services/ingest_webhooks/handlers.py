"""What to publish for one verified Stripe body: a pure function, no I/O.

Once the signature holds, the body is Stripe's, so it is never refused:

- a projected type: the raw event to `stripe-raw-events` and the normalized
  `PaymentEvent` to `payment-events`;
- a type we do not project: the raw event only (archived, counted, 200);
- anything we cannot normalize (a projected event our parser rejects, a body that is
  not JSON or not an event): the raw body to `stripe-raw-events` and to
  `payment-events.dlq` with the reason, answered 200 `archived_unnormalized`. Stripe
  would retry a 4xx for three days and then disable the endpoint, which would stop
  every event; after a parser fix `paymentsvc renormalize` publishes it instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from payment.v1 import events_pb2
from services.ingest_webhooks.normalize import (
    PROJECTED_TYPES,
    MalformedEvent,
    normalize,
    partition_key,
)
from shared.config import Topics
from shared.kafka import CE_SOURCES, OutgoingMessage, cloudevent_headers, event_headers
from shared.tracing import trace_headers

JSON_CONTENT_TYPE = b"application/json"

Outcome = Literal["published", "archived", "archived_unnormalized"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """The messages that must all be acknowledged before the request is answered."""

    event_id: str
    event_type: str
    outcome: Outcome
    messages: tuple[OutgoingMessage, ...]
    error: str = ""
    reason: str = ""  # why it could not be normalized: a short, bounded label


@dataclass(frozen=True, slots=True)
class _Unnormalizable(Exception):
    reason: str
    message: str


def parse(raw_body: bytes) -> Any:
    """The JSON of a verified body; `_UNPARSED` when it is not JSON (still archived)."""
    try:
        return orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        return _UNPARSED


_UNPARSED = object()


def _envelope(event: Any) -> tuple[str, str]:
    if event is _UNPARSED:
        raise _Unnormalizable("malformed_json", "the body is not valid JSON")
    if not isinstance(event, dict):
        raise _Unnormalizable("not_an_event", "the body is not a JSON object")
    event_id, event_type = event.get("id"), event.get("type")
    if not isinstance(event_id, str) or not event_id:
        raise _Unnormalizable("not_an_event", "the event has no id")
    if not isinstance(event_type, str) or not event_type:
        raise _Unnormalizable("not_an_event", "the event has no type")
    return event_id, event_type


def plan_delivery(event: Any, raw_body: bytes, topics: Topics, traceparent: str = "") -> Delivery:
    """Decide the messages for a verified body (`event` is `parse(raw_body)`). Never raises
    for the body's content: whatever it is, it is archived."""
    # Both messages carry the same context (the request's): built once.
    trace = tuple(trace_headers(traceparent))
    try:
        event_id, event_type = _envelope(event)
    except _Unnormalizable as exc:
        # No id to key it by: the body's digest keeps one body on one partition.
        key = "sha256:" + hashlib.sha256(raw_body).hexdigest()
        raw = _raw_message(key, "", "", 0, raw_body, topics, trace)
        return _unnormalized(raw, "", "unknown", exc.reason, exc.message, topics)
    created = event.get("created")
    occurred_at = created if isinstance(created, int) and created > 0 else 0
    raw = _raw_message(event_id, event_type, str(event.get("api_version") or ""), occurred_at, raw_body, topics, trace)
    if event_type not in PROJECTED_TYPES:
        return Delivery(event_id, event_type, "archived", (raw,))
    try:
        normalized = normalize(event)
    except MalformedEvent as exc:
        return _unnormalized(raw, event_id, event_type, "malformed_event", str(exc), topics)
    assert normalized is not None  # a projected type always normalizes or raises
    message = payment_event_message(normalized, topics, traceparent, trace=trace)
    return Delivery(event_id, event_type, "published", (raw, message))


def payment_event_message(
    normalized: events_pb2.PaymentEvent, topics: Topics, traceparent: str = "",
    *, trace: tuple[tuple[str, bytes], ...] | None = None,
) -> OutgoingMessage:
    """The `payment-events` message of a normalized event, as the ingester publishes it
    (and `paymentsvc renormalize` re-publishes it: same key, same event id). `trace`: the
    trace headers already built for this request (shared.kafka.event_headers)."""
    return OutgoingMessage(
        topic=topics.payment_events,
        key=partition_key(normalized).encode(),
        value=normalized.SerializeToString(),
        headers=tuple(event_headers(
            normalized.event_id, normalized.event_type, "PaymentEvent", traceparent,
            occurred_at=normalized.created, trace=trace,
        )),
        event_type=normalized.event_type,
    )


def _raw_message(
    key: str, event_type: str, api_version: str, occurred_at: int, raw_body: bytes, topics: Topics,
    trace: tuple[tuple[str, bytes], ...],
) -> OutgoingMessage:
    ids = (("event-id", key.encode()), ("event-type", event_type.encode())) if event_type else ()
    # A body that is not an event has no id or type of its own: its key (the body's
    # digest) is its id, and the receipt time its time (occurred_at 0 means now).
    cloudevent = cloudevent_headers(
        key, f"stripe.event.{event_type or 'unparsed'}", CE_SOURCES["StripeEvent"], occurred_at
    )
    return OutgoingMessage(
        topic=topics.stripe_raw_events,
        key=key.encode(),
        value=raw_body,
        headers=ids + (("content-type", JSON_CONTENT_TYPE), ("api-version", api_version.encode())) + trace + tuple(cloudevent),
        event_type=event_type or "unknown",
    )


def _unnormalized(
    raw: OutgoingMessage, event_id: str, event_type: str, reason: str, error: str, topics: Topics
) -> Delivery:
    dead = OutgoingMessage(
        topic=topics.dlq(topics.payment_events),
        key=raw.key,
        value=raw.value,
        headers=raw.headers
        + (
            ("error", error.encode()[:1000]),
            ("error-class", reason.encode()),
            ("failed-in", b"ingest_webhooks"),
        ),
        event_type=raw.event_type,
    )
    return Delivery(event_id, event_type, "archived_unnormalized", (raw, dead), error, reason)
