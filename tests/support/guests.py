"""A payment made without a Stripe Customer (Payment Links, guest checkout), as the ingester normalizes it."""

from __future__ import annotations

from typing import Any

from payment.v1 import events_pb2
from paymentsvc.dev.samples import sample_event
from services.ingest_webhooks.normalize import normalize


def guest_event(event_type: str, created: int, *, event_id: str, **kw: Any) -> events_pb2.PaymentEvent:
    kw.setdefault("user_id", None)
    payload = sample_event(event_type, created=created, event_id=event_id, **kw)
    payload["data"]["object"]["customer"] = None
    normalized = normalize(payload)
    assert normalized is not None and normalized.customer_id == ""
    return normalized
