"""Signing and posting sample events: `paymentsvc send-webhook`, tests and benchmarks."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import stripe

from services.ingest_webhooks.app import WEBHOOK_PATH
from shared.config import Settings


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """A Stripe-Signature header for `body`, made by the stripe library."""
    return stripe.WebhookSignature.generate_signature_header(
        body.decode("utf-8"), secret, timestamp or int(time.time())
    )


def encode_event(event: dict[str, Any]) -> bytes:
    # Stripe sends pretty-printed JSON; the bytes we sign are the bytes we post.
    return json.dumps(event, indent=2).encode()


def post_sample_event(
    settings: Settings,
    event_type: str,
    *,
    to: str | None = None,
    api_version: str | None = None,
    customer_id: str | None = None,
    user_id: str | None = None,
    secret: str | None = None,
) -> tuple[int, str]:
    """Build, sign and POST a realistic event. Returns (HTTP status, response body)."""
    from paymentsvc.dev.samples import NEW_API_VERSION, sample_event

    kwargs: dict[str, Any] = {"api_version": api_version or NEW_API_VERSION}
    if customer_id:
        kwargs["customer_id"] = customer_id
    if user_id:
        kwargs["user_id"] = user_id
    body = encode_event(sample_event(event_type, **kwargs))
    if secret is None:
        from paymentsvc.devstack import DEV_WEBHOOK_SECRET

        configured = settings.stripe_webhook_secrets
        secret = configured[0].get_secret_value() if configured else DEV_WEBHOOK_SECRET
    url = to or f"http://127.0.0.1:{settings.ingest_port}{WEBHOOK_PATH}"
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Stripe-Signature": sign(body, secret)},
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
