"""Disputes through the entitlements projection, against the real Postgres.

A dispute names no customer: the ingester keys it by its payment, while the charge it
disputes is keyed by its customer. The two can therefore be applied at the same moment by
two partitions' batches; they must not lose each other's writes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from payment.v1 import events_pb2
from paymentsvc.dev.samples import dispute_event, sample_event
from services.entitlements.projection import EntitlementsProjection
from services.ingest_webhooks.normalize import normalize
from shared.catalog import Catalog
from shared.projection import ApplyContext
from tests.integration.test_entitlements_projection import apply_batch, envelopes, query
from tests.support import stripe_fixtures
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

T0 = 1_767_225_600
IDS: dict[str, Any] = {"payment_intent_id": "pi_Disputed", "charge_id": "ch_Disputed", "amount": 1000}


def normalized(payload: dict[str, Any]) -> events_pb2.PaymentEvent:
    event = normalize(payload)
    assert event is not None
    return event


def charge(event_type: str, created: int, **kw: Any) -> events_pb2.PaymentEvent:
    return normalized(
        sample_event(event_type, created=created, customer_id="cus_Disputed", event_id=f"evt_{event_type}_{created}", **IDS, **kw)
    )


def dispute(event_type: str, created: int, **kw: Any) -> events_pb2.PaymentEvent:
    return normalized(
        dispute_event(
            event_type,
            created=created,
            event_id=f"evt_{event_type}_{created}",
            charge_id=IDS["charge_id"],
            payment_intent_id=IDS["payment_intent_id"],
            **kw,
        )
    )


def payment(db: str) -> tuple[object, ...]:
    [row] = query(
        db,
        "SELECT customer_id, status, amount, amount_refunded, status_reason FROM payments WHERE payment_id = %s",
        IDS["payment_intent_id"],
    )
    return row


async def test_the_real_dispute_payload_makes_its_customers_payment_disputed(db: str, catalog: Catalog) -> None:
    """supabase_charge_dispute_created.json disputes the charge of
    supabase_charge_refunded.json's customer; here the charge is not yet refunded."""
    real = normalized(stripe_fixtures.event("supabase_charge_dispute_created.json"))
    real.event_id = "evt_real_dispute"  # upstream copied the refund's envelope, id included
    paid = normalized(
        sample_event(
            "charge.succeeded",
            created=real.created - 60,
            customer_id="cus_J7Mkgr8mvbl1eK",
            charge_id=real.charge_id,
            payment_intent_id=real.payment_intent_id,
            amount=1000,
        )
    )
    projection = EntitlementsProjection(catalog, None)
    await apply_batch(db, projection, [paid])
    await apply_batch(db, projection, [real])

    rows = query(
        db, "SELECT customer_id, status, amount, status_reason FROM payments WHERE charge_id = %s", real.charge_id
    )
    assert rows == [
        ("cus_J7Mkgr8mvbl1eK", "disputed", 1000, "dispute dp_1MLuxQJDPojXS6LNrukJCBBG warning_needs_response: general")
    ]


async def test_a_lost_dispute_then_a_late_charge_event_in_two_batches_keeps_both(db: str, catalog: Catalog) -> None:
    projection = EntitlementsProjection(catalog, None)
    await apply_batch(db, projection, [dispute("charge.dispute.created", T0 + 1), dispute("charge.dispute.closed", T0 + 2, status="lost")])
    await apply_batch(db, projection, [charge("charge.succeeded", T0)])
    customer, status, amount, refunded, reason = payment(db)
    assert (customer, status, amount, refunded) == ("cus_Disputed", "disputed", 1000, 0)
    assert isinstance(reason, str) and " lost: " in reason


async def test_two_partitions_batches_about_one_payment_run_one_after_the_other(db: str, catalog: Catalog) -> None:
    """The refund's batch holds its transaction open; the dispute's batch (another
    partition, another connection) must wait for it and then read the refund, not
    overwrite the row with what it read before the refund committed."""
    projection = EntitlementsProjection(catalog, None)
    await apply_batch(db, projection, [charge("charge.succeeded", T0)])
    ctx = ApplyContext(consumer="entitlements", replay=False, now=time.time())

    async with await psycopg.AsyncConnection.connect(db) as holder:
        refund_pid = holder.info.backend_pid
        async with holder.transaction():
            await projection.apply(holder, envelopes([charge("charge.refunded", T0 + 1, amount_refunded=300)]), ctx)
            second = asyncio.create_task(apply_batch(db, projection, [dispute("charge.dispute.created", T0 + 2)]))

            async def dispute_waits_for_the_refund() -> bool:
                async with await psycopg.AsyncConnection.connect(db) as probe:
                    cur = await probe.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND %s = ANY(pg_blocking_pids(pid))",
                        (refund_pid,),
                    )
                    row = await cur.fetchone()
                    return row is not None and row[0] == 1

            await eventually(dispute_waits_for_the_refund, what="the dispute's batch waits for the refund's")
            assert not second.done()
        await second

    customer, status, amount, refunded, reason = payment(db)
    assert (customer, status, amount, refunded) == ("cus_Disputed", "disputed", 1000, 300)
