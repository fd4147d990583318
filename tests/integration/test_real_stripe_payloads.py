"""Real Stripe payloads (tests/fixtures/stripe) through the ingester and the
entitlements projection: every one is answered 200, and each payment lands in
`payments` with the status its events say. Signatures are made by the stripe library."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from payment.v1 import events_pb2
from services.entitlements.projection import EntitlementsProjection
from services.ingest_webhooks.normalize import PROJECTED_TYPES
from shared.catalog import Catalog
from shared.config import Topics
from tests.integration.test_entitlements_projection import apply_batch, query
from tests.integration.test_ingest_webhooks import Ingester, signed_headers, start_ingester
from tests.kafka_helpers import headers_of, read_topic
from tests.support import stripe_fixtures

pytestmark = pytest.mark.integration

# payment id -> (customer, status, amount, amount_refunded), from reading the payloads.
EXPECTED_PAYMENTS = {
    # privatestorageio_charge_succeeded.json: a guest charge without a payment intent.
    "ch_3LxcbqBHXBAMm9bP1QIFhXee": (None, "succeeded", 100, 0),
    # supabase_charge_refunded.json: fully refunded (2500 of 2500).
    "pi_3Kl36gJDPojXS6LN02fQVtKR": ("cus_J7Mkgr8mvbl1eK", "refunded", 2500, 2500),
    # supabase_payment_intent_succeeded.json: a guest intent (its status field was edited upstream).
    "pi_1IqxJOJDPojXS6LN9uOebAea": (None, "succeeded", 1000, 0),
    # stripe_ruby_mock_payment_intent_payment_failed.json: a guest's declined card.
    "pi_000000000000000000000000": (None, "failed", 2000, 0),
    # supabase_charge_dispute_created.json: a dispute of a charge no other file holds, so
    # no customer and no amount are known (a dispute's sum is not the payment's).
    "pi_1IqtG9JDPojXS6LNOGnYrIqq": (None, "disputed", 0, 0),
}


@pytest.fixture
async def ingester(broker: str, topics: Topics) -> AsyncIterator[Ingester]:
    async for ingester in start_ingester(broker, topics):
        yield ingester


async def test_every_real_payload_is_answered_200_and_each_payment_reaches_payments_with_its_status(
    ingester: Ingester, db: str, catalog: Catalog
) -> None:
    answers = {}
    for name in stripe_fixtures.names():
        body = stripe_fixtures.raw(name)  # the exact upstream bytes, signed as they are
        status, answer = await ingester.post(body, signed_headers(body))
        answers[name] = (status, answer["status"])
    projected = set(stripe_fixtures.of_types(PROJECTED_TYPES))
    assert answers == {
        name: (200, "published" if name in projected else "archived") for name in stripe_fixtures.names()
    }

    records = await read_topic(ingester.bootstrap, ingester.topics.payment_events, expect=len(projected))
    assert len(records) == len(projected)
    events = [events_pb2.PaymentEvent.FromString(r.value) for r in records]
    for record, event in zip(records, events, strict=True):
        assert headers_of(record)["event-id"] == event.event_id
        assert record.key == (event.customer_id or event.payment_intent_id or event.charge_id).encode()
        if event.event_type == "charge.dispute.created":
            # Upstream copied the refund's envelope, event id included; the inbox would
            # rightly skip the second of two events with one id.
            event.event_id = "evt_real_dispute"
    await apply_batch(db, EntitlementsProjection(catalog, None), events)

    rows = query(
        db,
        "SELECT payment_id, customer_id, status, amount, amount_refunded FROM payments WHERE payment_id = ANY(%s)",
        list(EXPECTED_PAYMENTS),
    )
    assert {row[0]: row[1:] for row in rows} == EXPECTED_PAYMENTS


async def test_the_guest_refund_flow_of_real_shapes_shuffled_and_redelivered_ends_refunded(
    ingester: Ingester, db: str, catalog: Catalog
) -> None:
    """charge.succeeded -> payment_intent.succeeded -> charge.refunded of one guest
    payment, made from the real payloads by giving them one payment's ids."""
    import random

    charge = stripe_fixtures.event("privatestorageio_charge_succeeded.json")
    intent = stripe_fixtures.event("supabase_payment_intent_succeeded.json")
    refund = stripe_fixtures.event("supabase_charge_refunded.json")
    pi, ch = "pi_RealGuest", "ch_RealGuest"
    for n, (e, created) in enumerate(((charge, 100), (intent, 101), (refund, 102))):
        e["id"], e["created"] = f"evt_real_guest_{n}", created
        o = e["data"]["object"]
        o["customer"], o["amount"], o["currency"] = None, 2500, "usd"
        if o["object"] == "charge":
            o["id"], o["payment_intent"], o["invoice"] = ch, pi, None
        else:
            o["id"], o["latest_charge"] = pi, ch
    seed = random.randrange(2**32)
    print(f"shuffle seed {seed}")
    deliveries = [charge, intent, refund] * 2
    random.Random(seed).shuffle(deliveries)
    for e in deliveries:
        status, answer = await ingester.post_event(e)
        assert (status, answer["status"]) == (200, "published")

    records = await read_topic(ingester.bootstrap, ingester.topics.payment_events, expect=6)
    assert {r.key for r in records} == {pi.encode()}  # one payment, one partition
    projection = EntitlementsProjection(catalog, None)
    for record in records:
        await apply_batch(db, projection, [events_pb2.PaymentEvent.FromString(record.value)])
    assert query(db, "SELECT customer_id, status, amount_refunded FROM payments WHERE payment_id = %s", pi) == [
        (None, "refunded", 2500)
    ]
