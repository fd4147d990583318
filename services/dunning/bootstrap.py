"""Composition root of the dunning service: the projection worker and the scheduler.

`serve` runs both until `stop`: the projection (payment-events -> dunning_cases, notices
on dunning-events) through the shared worker runtime, and the scheduler loop (Stripe
retries and escalations, published as events). `replay_spec` is the projection alone,
with side effects off: no publisher, no scheduler, no Stripe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.dunning.events import KafkaPublisher, notice_sender
from services.dunning.projection import DunningProjection
from services.dunning.scheduler import Scheduler, SchedulerConfig, StripeInvoices
from shared import db
from shared.catalog import load_catalog
from shared.config import Settings
from shared.devbroker import wait_for_broker
from shared.errors import ConfigurationError
from shared.kafka import make_producer
from shared.outbox import OutboxRelay
from shared.replay import ProjectionSpec
from shared.workerapp import serve_projection

# Every table this projection writes; replay rebuilds and verifies exactly these.
# (dunning_steps is the live scheduler's ledger, like processed_events: not replayed.)
TABLES = ("dunning_cases",)

def scheduler_config(settings: Settings) -> SchedulerConfig:
    return SchedulerConfig(interval_s=settings.dunning_interval_s)


async def serve(
    settings: Settings, stop: asyncio.Event, *, clock: Callable[[], float] | None = None
) -> None:
    """Project payment-events and run the scheduler until `stop`.

    Raises ConfigurationError without a Stripe key: the scheduler's retries need one.
    """
    if settings.stripe_secret_key is None:
        raise ConfigurationError("the dunning service needs STRIPE_SECRET_KEY to retry invoices")
    catalog = load_catalog(settings.catalog_path)
    await wait_for_broker(settings.kafka_bootstrap_servers, timeout=settings.startup_timeout_s)
    producer = make_producer(settings.kafka_bootstrap_servers)
    await producer.start()
    pool = await db.open_pool(settings.database_url.get_secret_value(), max_size=2, name="paymentsvc-dunning-scheduler",
                               statement_timeout_ms=settings.db_statement_timeout_ms)
    try:
        publisher = KafkaPublisher(producer, settings.topics, settings.publish_timeout_s)
        payer = StripeInvoices(settings.stripe_secret_key.get_secret_value(), settings.stripe_api_base)
        scheduler = Scheduler(pool, payer, publisher, catalog, config=scheduler_config(settings), **({"clock": clock} if clock else {}))
        relay = OutboxRelay(pool, "dunning", notice_sender(publisher))
        projection = DunningProjection(catalog, relay)
        # A TaskGroup: if either part fails, the other is cancelled and the error raised.
        async with asyncio.TaskGroup() as group:
            group.create_task(
                serve_projection(
                    settings, stop, projection,
                    topic=settings.topics.payment_events, port=settings.dunning_port,
                )
            )
            group.create_task(scheduler.run(stop))
            group.create_task(relay.run(stop))
    finally:
        await pool.close()
        await producer.stop()


def replay_spec(settings: Settings) -> ProjectionSpec:
    """The projection as a rebuild runs it: nothing published, no Stripe."""
    catalog = load_catalog(settings.catalog_path)
    return ProjectionSpec(
        name="dunning",
        topic=settings.topics.payment_events,
        tables=TABLES,
        make=lambda: DunningProjection(catalog, None),
    )
