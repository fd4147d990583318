"""A failed renewal's whole life against localstripe: retries, escalation, recovery.

In process: the ingester (registered as localstripe's webhook endpoint), the entitlements
worker, the dunning worker and its scheduler with a clock the test moves. localstripe
answers Invoice.pay but sends no invoice.payment_failed, so the test posts those itself,
signed, through the ingester.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest
import stripe

from paymentsvc.dev.samples import sample_event
from services.dunning.events import KafkaPublisher
from services.dunning.scheduler import Scheduler, SchedulerConfig, StripeInvoices
from shared.catalog import apply_catalog
from shared.config import Topics
from shared.db import make_pool
from shared.devstripe import DEV_SECRET_KEY, LocalStripe
from shared.kafka import make_producer
from tests.conftest import random_id
from tests.integration.test_dunning_support import DAY, Clock
from tests.integration.test_dunning_worker import CATALOG, dunning_worker
from tests.integration.test_entitlements_worker import entitlements_worker
from tests.integration.test_ingest_webhooks import SECRET, start_ingester
from tests.kafka_helpers import eventually

pytestmark = pytest.mark.e2e
PRICE = "price_basic_monthly"


def one(url: str, query: str, *params: Any) -> Any:
    with psycopg.connect(url) as conn:
        row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        return row


async def wait_for(url: str, query: str, expected: Any, *params: Any, timeout: float = 30) -> None:
    async def done() -> bool:
        return one(url, query, *params) == expected

    assert await eventually(done, timeout), f"{query} -> {one(url, query, *params)}, expected {expected}"


def card(client: stripe.StripeClient, customer: str, number: str) -> None:
    pm = client.v1.payment_methods.create(
        params={"type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"}}
    )
    client.v1.payment_methods.attach(pm.id, params={"customer": customer})
    client.v1.customers.update(customer, params={"invoice_settings": {"default_payment_method": pm.id}})


async def test_a_failed_invoice_is_retried_escalated_and_recovered_with_access_restored(
    broker: str, topics: Topics, database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        apply_catalog(conn, CATALOG)
    user = random_id("user_")
    ls = LocalStripe()
    await asyncio.to_thread(ls.start)
    producer = make_producer(broker)
    await producer.start()
    pool = make_pool(database_url, max_size=2)
    await pool.open(wait=True)
    try:
        async for ingester in start_ingester(broker, topics):
            ls.register_webhook("wh_dunning", ingester.url, SECRET)
            async with entitlements_worker(broker, topics.payment_events, database_url), dunning_worker(
                broker, topics, database_url, producer
            ):
                await lifecycle(ls, ingester, producer, topics, pool, database_url, user)
    finally:
        await pool.close()
        await producer.stop()
        ls.stop()


async def lifecycle(ls: LocalStripe, ingester: Any, producer: Any, topics: Topics, pool: Any, db: str, user: str) -> None:
    client = stripe.StripeClient(DEV_SECRET_KEY, base_addresses={"api": ls.api_base}, max_network_retries=0)

    def setup() -> tuple[str, str, str]:
        customer = client.v1.customers.create(params={"metadata": {"user_id": user}})
        card(client, customer.id, "4000000000000341")
        client.v1.plans.create(
            params={"id": PRICE, "amount": 900, "currency": "usd", "interval": "month", "product": {"name": "Basic"}}
        )
        sub = client.v1.subscriptions.create(
            params={"customer": customer.id, "items": [{"plan": PRICE}], "metadata": {"user_id": user}}
        )
        invoice = client.v1.invoices.list(params={"customer": customer.id}).data[0]
        assert invoice.status == "open"
        return customer.id, sub.id, invoice.id

    customer, sub, invoice = await asyncio.to_thread(setup)
    await wait_for(db, "SELECT count(*) > 0 FROM subscriptions WHERE subscription_id = %s", (True,), sub)
    clock = Clock(time.time())
    start = int(clock.now)
    scheduler = Scheduler(
        pool, StripeInvoices(DEV_SECRET_KEY, ls.api_base), KafkaPublisher(producer, topics), CATALOG,
        clock=clock, config=SchedulerConfig(owner="e2e"),
    )

    async def post_failure(created: int, attempt_count: int) -> None:
        event = sample_event(
            "invoice.payment_failed", customer_id=customer, user_id=user, invoice_id=invoice,
            subscription_id=sub, price_id=PRICE, created=created, attempt_count=attempt_count,
        )
        status, answer = await ingester.post_event(event)
        assert status == 200, answer
        await wait_for(db, "SELECT last_event_id FROM dunning_cases WHERE invoice_id = %s", (event["id"],), invoice)

    await post_failure(start, 1)
    case_q = "SELECT state, attempt_count FROM dunning_cases WHERE invoice_id = %s"
    assert one(db, case_q, invoice) == ("open", 0)
    for n, day in enumerate((1, 3, 5, 7), start=1):
        clock.now = start + day * DAY
        assert len((await scheduler.tick()).attempts) == 1
        await wait_for(db, case_q, ("retrying", n), invoice)
        await post_failure(int(clock.now) + 10, n + 1)

    clock.now = start + 14 * DAY
    assert len((await scheduler.tick()).escalations) == 1
    await wait_for(db, "SELECT status FROM subscriptions WHERE subscription_id = %s", ("suspended",), sub)
    ents = "SELECT array_agg(DISTINCT status) FROM entitlements WHERE source_id = %s"
    await wait_for(db, ents, (["suspended"],), sub)
    await wait_for(db, case_q, ("escalated", 4), invoice)  # the two workers apply it independently

    await asyncio.to_thread(card, client, customer, "4242424242424242")
    clock.now = start + 21 * DAY
    assert len((await scheduler.tick()).attempts) == 1
    # localstripe's invoice.payment_succeeded comes through the ingester.
    await wait_for(db, "SELECT state FROM dunning_cases WHERE invoice_id = %s", ("recovered",), invoice)
    assert len((await scheduler.tick()).restorations) == 1
    await wait_for(db, "SELECT status, access_level FROM subscriptions WHERE subscription_id = %s", ("active", "full"), sub)
    await wait_for(db, ents, (["active"],), sub)
