"""The HTTP edge: POST /webhooks/stripe. Translates HTTP to the handler and back.

Answers:
- 200 once every message of the event is acknowledged by the broker (acks=all),
  including a verified body we cannot normalize: it is archived on
  `stripe-raw-events`, dead-lettered to `payment-events.dlq` with the reason, and
  answered `archived_unnormalized` (Stripe retries any 4xx for three days and then
  disables the endpoint; `paymentsvc renormalize` recovers the event after a fix);
- 400 for a missing, bad or stale signature, or a body that is not UTF-8;
- 413 for a body over the limit, 415 for a content type other than JSON, 405 for
  another method;
- 503 with Retry-After when the broker does not acknowledge within the timeout,
  so Stripe retries. Never a 2xx for an event that is not on the bus.
Response bodies never echo the payload or a secret.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson
from aiohttp import web

from services.ingest_webhooks.handlers import Delivery, parse, plan_delivery
from services.ingest_webhooks.publisher import Publisher
from services.ingest_webhooks.verify import SignatureVerifier, WebhookRejected
from shared import tracing
from shared.config import Topics
from shared.kafka import PublishFailed
from shared.metrics import (
    WEBHOOKS_RECEIVED,
    WEBHOOKS_REJECTED,
    WEBHOOKS_UNAVAILABLE,
    WEBHOOKS_UNNORMALIZED,
    WEBHOOKS_UNPROJECTED,
    WEBHOOKS_VERIFIED,
)

log = logging.getLogger("ingest_webhooks")
WEBHOOK_PATH = "/webhooks/stripe"
RETRY_AFTER_S = "5"


@dataclass(frozen=True)
class IngestConfig:
    topics: Topics
    max_body_bytes: int
    publish_timeout_s: float


def _answer(body: dict[str, str], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise WebhookRejected(413, "body_too_large", f"the body is over {limit} bytes")
    # The whole body, however many pieces it arrives in (`read(n)` returns the first
    # piece only: a body split across TCP segments would fail its signature check).
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise WebhookRejected(413, "body_too_large", f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_content_type(request: web.Request) -> None:
    try:
        content_type = request.content_type
    except (IndexError, ValueError) as exc:  # aiohttp's parser fails on e.g. ";0*"
        raise WebhookRejected(415, "malformed_content_type", "the Content-Type header is malformed") from exc
    if content_type != "application/json":
        raise WebhookRejected(415, "wrong_content_type", "the content type must be application/json")


async def _accept(request: web.Request, verifier: SignatureVerifier, config: IngestConfig) -> Delivery:
    """Read, verify and parse the request into a Delivery, or raise WebhookRejected."""
    body = await _read_body(request, config.max_body_bytes)
    _check_content_type(request)
    verifier.verify(body, request.headers.get("Stripe-Signature"))
    WEBHOOKS_VERIFIED.inc()
    # The messages carry the request span's context (their produce spans' children).
    return plan_delivery(parse(body), body, config.topics)


def make_webhook_handler(verifier: SignatureVerifier, publisher: Publisher, config: IngestConfig):  # type: ignore[no-untyped-def]
    span_name = f"POST {WEBHOOK_PATH}"

    async def receive(request: web.Request) -> web.Response:
        # The request span continues the trace of the caller's `traceparent`, if any. Made
        # current by hand, as the API's interceptor does: `start_as_current_span` adds two
        # generator-based context managers to every request.
        span = tracing.tracer().start_span(
            span_name, context=tracing.extract_headers(request.headers), kind=tracing.SpanKind.SERVER
        )
        token = tracing.activate(span)
        try:
            response = await _receive(request)
            if span.is_recording():
                span.set_attribute("http.request.method", "POST")
                span.set_attribute("http.route", WEBHOOK_PATH)
                span.set_attribute("http.response.status_code", response.status)
                if response.status >= 500:
                    span.set_status(tracing.Status(tracing.StatusCode.ERROR))
            return response
        except Exception as exc:  # as start_as_current_span records it (not a cancellation)
            if span.is_recording():
                span.record_exception(exc)
                span.set_status(tracing.Status(tracing.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            tracing.deactivate(token)
            span.end()

    async def _receive(request: web.Request) -> web.Response:
        WEBHOOKS_RECEIVED.inc()
        try:
            delivery = await _accept(request, verifier, config)
        except WebhookRejected as rejected:
            WEBHOOKS_REJECTED.labels(rejected.reason).inc()
            log.info("webhook rejected", extra={"reason": rejected.reason, "status": rejected.status})
            return _answer({"error": rejected.reason, "message": rejected.message}, rejected.status)

        try:
            await publisher.publish_all(delivery.messages, config.publish_timeout_s)
        except PublishFailed as exc:
            WEBHOOKS_UNAVAILABLE.inc()
            log.warning("broker unavailable; answering 503", extra={"event_id": delivery.event_id, "error": str(exc)})
            return _answer(
                {"error": "unavailable", "message": "the event could not be stored; retry later"},
                503,
                {"Retry-After": RETRY_AFTER_S},
            )

        if delivery.outcome == "archived_unnormalized":
            WEBHOOKS_UNNORMALIZED.labels(delivery.event_type, delivery.reason).inc()
            # Logged here, once the raw event is durable: a Stripe retry of a 503 is
            # not yet a verified, archived event.
            log.warning(
                "verified event could not be normalized; archived and dead-lettered",
                extra={
                    "event_id": delivery.event_id,
                    "event_type": delivery.event_type,
                    "reason": delivery.reason,
                    "error": delivery.error,
                },
            )
            return _answer(
                {"status": delivery.outcome, "event_id": delivery.event_id, "reason": delivery.reason}
            )
        if delivery.outcome == "archived":
            WEBHOOKS_UNPROJECTED.labels(delivery.event_type).inc()
        return _answer({"status": delivery.outcome, "event_id": delivery.event_id})

    return receive


def make_app(verifier: SignatureVerifier, publisher: Publisher, config: IngestConfig) -> web.Application:
    """The ingester's routes; the caller adds the health routes and runs it."""
    # client_max_size guards any other route; the webhook route enforces its own limit.
    app = web.Application(client_max_size=config.max_body_bytes)
    app.router.add_post(WEBHOOK_PATH, make_webhook_handler(verifier, publisher, config))
    return app
