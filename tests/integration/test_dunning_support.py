"""Helpers of the dunning tests: a fake Stripe that counts Invoice.pay calls, a recording
publisher, a movable clock, and applying events through the real BatchProcessor."""

from __future__ import annotations

import collections
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from payment.v1 import events_pb2
from services.dunning.events import notice_sender
from services.dunning.projection import DunningProjection
from shared.catalog import Catalog
from shared.outbox import OutboxRelay
from shared.worker import BatchProcessor, DeadLetter, RawMessage
from tests.support.clock import Clock

__all__ = ["Clock"]

DAY = 86_400


@dataclass
class RecordingPublisher:
    decisions: list[events_pb2.PaymentEvent] = field(default_factory=list)
    dunning: list[events_pb2.DunningEvent] = field(default_factory=list)
    fail: bool = False

    async def decision(self, event: events_pb2.PaymentEvent) -> None:
        if self.fail:
            raise RuntimeError("broker down")
        self.decisions.append(event)

    async def notices(self, events: Sequence[events_pb2.DunningEvent]) -> None:
        if self.fail:
            raise RuntimeError("broker down")
        self.dunning.extend(events)


@dataclass
class FakeStripe:
    """POST /v1/invoices/{id}/pay: `mode` is ok (paid), decline (402) or down (503)."""

    mode: str = "ok"
    requests: int = 0  # every request that reached the server, whatever the mode
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    keys: list[str] = field(default_factory=list)
    url: str = ""

    async def pay(self, request: web.Request) -> web.Response:
        invoice = request.match_info["invoice"]
        self.requests += 1
        if self.mode == "down":
            return web.json_response({"error": {"type": "api_error", "message": "down"}}, status=503)
        self.calls[invoice] += 1
        self.keys.append(request.headers.get("Idempotency-Key", ""))
        if self.mode == "decline":
            error = {"type": "card_error", "code": "card_declined", "message": "Your card was declined."}
            return web.json_response({"error": error}, status=402)
        return web.json_response({"id": invoice, "object": "invoice", "status": "paid"})


@asynccontextmanager
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    fake = FakeStripe()
    app = web.Application()
    app.router.add_post("/v1/invoices/{invoice}/pay", fake.pay)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()


class NoDeadLetters:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def send(self, letters: Sequence[DeadLetter], consumer: str) -> None:
        self.letters.extend(letters)


class Applier:
    """Applies events as the live worker does (inbox, transaction, after_commit)."""

    def __init__(self, pool: AsyncConnectionPool, catalog: Catalog, publisher: Any, *, replay: bool = False) -> None:
        relay = OutboxRelay(pool, "dunning", notice_sender(publisher)) if publisher is not None else None
        self.processor = BatchProcessor(DunningProjection(catalog, relay), pool, NoDeadLetters(), replay=replay)
        self._offsets = itertools.count()

    async def __call__(self, events: Sequence[events_pb2.PaymentEvent]) -> None:
        messages = [
            RawMessage("payment-events", 0, next(self._offsets), e.customer_id.encode(), e.SerializeToString())
            for e in events
        ]
        await self.processor.process(messages)


def failure(invoice: str, created: int, customer: str = "cus_d", **kw: Any) -> events_pb2.PaymentEvent:
    kw.setdefault("event_id", f"evt_fail_{invoice}_{created}")
    return events_pb2.PaymentEvent(
        event_type="invoice.payment_failed", created=created, customer_id=customer, invoice_id=invoice,
        subscription_id=kw.pop("subscription_id", f"sub_{invoice}"), price_id="price_basic_monthly",
        amount=900, currency="usd", failure_message=kw.pop("failure_message", "Your card was declined."),
        source=events_pb2.EVENT_SOURCE_STRIPE_WEBHOOK, **kw,
    )


def paid(invoice: str, created: int, customer: str = "cus_d") -> events_pb2.PaymentEvent:
    return events_pb2.PaymentEvent(
        event_type="invoice.paid", event_id=f"evt_paid_{invoice}_{created}", created=created,
        customer_id=customer, invoice_id=invoice, subscription_id=f"sub_{invoice}", amount=900, currency="usd",
    )
