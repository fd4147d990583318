"""Composition root of the entitlements worker: catalog, Redis, projection, the shared loop."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from services.entitlements.projection import EntitlementsProjection
from shared.catalog import load_catalog
from shared.config import Settings
from shared.health import redis_probe
from shared.replay import ProjectionSpec
from shared.workerapp import serve_projection

# Every table this projection writes; replay rebuilds and verifies exactly these.
TABLES = (
    "customers",
    "subscriptions",
    "subscription_history",
    "paid_periods",
    "one_time_grants",
    "access_changes",
    "entitlements",
    "payments",
    "catalog_misses",
)


def _redis(settings: Settings) -> Redis:
    return Redis.from_url(
        settings.redis_url.get_secret_value(), socket_timeout=2, socket_connect_timeout=2, health_check_interval=30
    )


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Project payment-events until `stop`; see shared/workerapp.py for the lifecycle."""
    catalog = load_catalog(settings.catalog_path)
    redis = _redis(settings)
    try:
        projection = EntitlementsProjection(catalog, redis)
        await serve_projection(
            settings, stop, projection,
            topic=settings.topics.payment_events,
            port=settings.entitlements_port,
            extra_probes={"redis": redis_probe(redis)},
        )
    finally:
        await redis.aclose()


def replay_spec(settings: Settings) -> ProjectionSpec:
    """The projection as a rebuild runs it: no Redis, nothing emitted."""
    catalog = load_catalog(settings.catalog_path)
    return ProjectionSpec(
        name="entitlements",
        topic=settings.topics.payment_events,
        tables=TABLES,
        make=lambda: EntitlementsProjection(catalog, None),
    )
