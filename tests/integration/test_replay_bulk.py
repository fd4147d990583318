"""The rebuild's bulk path (issue 12, item 4): partitions in concurrent lanes, indexes built
after the load, asynchronous commits. The replay == live tests of test_entitlements_worker.py
run a one-lane spec; these run the entitlements projection's own lanes and deferred indexes.
"""

from __future__ import annotations

import asyncio
import dataclasses

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from paymentsvc.dev.samples import dispute_event, sample_event
from services.entitlements.bootstrap import DEFERRED_INDEXES, REPLAY_LANES, TABLES
from services.ingest_webhooks.normalize import normalize
from shared import replay
from shared.catalog import apply_catalog
from shared.config import Topics
from shared.db import make_pool
from tests.integration.test_entitlements_worker import (
    CATALOG,
    entitlements_worker,
    processed,
    publish,
    spec,
    stories,
    until_processed,
)

pytestmark = pytest.mark.integration
T0 = 1_767_225_600


@pytest.fixture
def live_db(database_url: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        apply_catalog(conn, CATALOG)
    return database_url


def indexes(database_url: str, schema: str) -> set[tuple[str, str, str]]:
    """(table, index, definition without the schema) of the projection's and the inbox's tables."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = ANY(%s)",
            (schema, [*TABLES, "processed_events", "consumer_offsets"]),
        ).fetchall()
    return {(table, name, definition.replace(f" {schema}.", " ")) for table, name, definition in rows}


def disputed_charges(n: int) -> list:  # type: ignore[type-arg]
    """Charges keyed by their customer and disputes keyed by their payment: the same payment
    row reached from two partitions, which lanes may apply at the same moment."""
    events = []
    for i in range(n):
        ids = {"payment_intent_id": f"pi_Bulk{i}", "charge_id": f"ch_Bulk{i}", "amount": 1000}
        events.append(normalize(sample_event("charge.succeeded", created=T0 + i, customer_id=f"cus_Bulk{i}",
                                             event_id=f"evt_bulk_charge_{i}", **ids)))
        events.append(normalize(dispute_event("charge.dispute.created", created=T0 + i + 60, event_id=f"evt_bulk_dispute_{i}",
                                              charge_id=ids["charge_id"], payment_intent_id=ids["payment_intent_id"])))
    assert all(e is not None for e in events)
    return events


async def test_a_rebuild_in_lanes_with_deferred_indexes_equals_live_and_ends_with_every_live_index(
    broker: str, topics: Topics, live_db: str, producer: AIOKafkaProducer
) -> None:
    events = stories(9) + disputed_charges(6)
    async with entitlements_worker(broker, topics.payment_events, live_db):
        await publish(producer, topics.payment_events, events)
        await until_processed(live_db, len(events))
    bulk = dataclasses.replace(spec(topics.payment_events), lanes=REPLAY_LANES, deferred_indexes=DEFERRED_INDEXES)
    figures = await replay.rebuild(live_db, broker, bulk, "rebuild_bulk", progress="never")
    assert figures["lanes"] == 3  # the topic's three partitions, one per lane
    assert figures["offsets"] == len(events)
    assert replay.verify(live_db, bulk, "rebuild_bulk") == []
    assert indexes(live_db, "rebuild_bulk") == indexes(live_db, "public")
    # A catch-up round (the schema holds marks) keeps the indexes: it drops none.
    await replay.rebuild(live_db, broker, bulk, "rebuild_bulk", progress="never", prepare=False)
    assert indexes(live_db, "rebuild_bulk") == indexes(live_db, "public")


async def test_a_swap_of_a_bulk_rebuild_in_lanes_during_live_traffic_loses_no_event_and_applies_none_twice(
    broker: str, topics: Topics, live_db: str, producer: AIOKafkaProducer
) -> None:
    bulk = dataclasses.replace(spec(topics.payment_events), lanes=REPLAY_LANES, deferred_indexes=DEFERRED_INDEXES)
    first, second = stories(6), stories(6)
    async with entitlements_worker(broker, topics.payment_events, live_db) as progress:
        await publish(producer, topics.payment_events, first)
        await until_processed(live_db, len(first))

        async def trickle() -> None:
            for i in range(0, len(second), 11):
                await publish(producer, topics.payment_events, second[i : i + 11])
                await progress.until_finished(len(first) + min(i + 11, len(second)))

        sender = asyncio.create_task(trickle())
        await replay.rebuild(live_db, broker, bulk, "rebuild_bulk_b", progress="never")
        await replay.swap(live_db, broker, bulk, "rebuild_bulk_b", progress="never")
        await sender
        await until_processed(live_db, len(first) + len(second))
    await replay.rebuild(live_db, broker, bulk, "rebuild_bulk_check", progress="never")
    assert replay.verify(live_db, bulk, "rebuild_bulk_check") == []
    assert processed(live_db) == len(first) + len(second)


def test_an_index_that_is_unique_or_missing_is_never_deferred_and_nothing_is_dropped(live_db: str) -> None:
    replay.prepare_schema(live_db, "defer_x")
    before = indexes(live_db, "defer_x")
    for names in (("payments_user", "payments_charge_id_key"), ("payments_user", "payments_by_nothing")):
        with pytest.raises(replay.ReplayTargetError, match="cannot defer"):
            replay.drop_deferred_indexes(live_db, "defer_x", names)
    assert indexes(live_db, "defer_x") == before
    definitions = replay.drop_deferred_indexes(live_db, "defer_x", ("payments_user",))
    assert {i[1] for i in before} - {i[1] for i in indexes(live_db, "defer_x")} == {"payments_user"}
    replay.create_indexes(live_db, definitions)
    assert indexes(live_db, "defer_x") == before


async def test_a_rebuild_pool_commits_asynchronously_and_takes_only_plain_settings(database_url: str) -> None:
    pool = make_pool(database_url, max_size=1, schema="replay_y", settings=replay.BULK_SETTINGS)
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            shown = await (await conn.execute("SHOW synchronous_commit")).fetchone()
            timeout = await (await conn.execute("SHOW statement_timeout")).fetchone()
        assert shown == ("off",) and timeout == ("30s",)
    finally:
        await pool.close()
    with pytest.raises(ValueError, match="plain server setting"):
        make_pool(database_url, settings={"synchronous_commit": "off -c search_path=evil"})
