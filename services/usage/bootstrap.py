"""Composition root of the usage worker: the projection on the shared loop, and a
watchdog that rebuilds the Redis counters when it finds them gone (Redis emptied or
restarted), so increments are refused only until the worker has caught up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from psycopg import AsyncConnection
from redis.asyncio import Redis

from domain.usage.model import Keys
from services.usage import rebuild, thresholds
from services.usage.projection import UsageProjection
from shared import db
from shared.catalog import load_catalog
from shared.config import Settings
from shared.devbroker import wait_for_broker
from shared.health import redis_probe
from shared.kafka import make_producer
from shared.outbox import OutboxRelay
from shared.replay import ProjectionSpec
from shared.workerapp import serve_projection

log = logging.getLogger("usage")
WATCH_EVERY_S = 10.0

# Every table this projection writes; replay rebuilds and verifies exactly these.
TABLES = ("usage_records", "usage_aggregates", "usage_member_aggregates", "usage_thresholds")


def _redis(settings: Settings) -> Redis:
    return Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=5, socket_connect_timeout=2)


def connector(settings: Settings) -> Any:
    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[AsyncConnection[Any]]:
        conn = await AsyncConnection.connect(settings.database_url.get_secret_value(), autocommit=True)
        try:
            yield conn
        finally:
            await conn.close()

    return connect


async def rebuild_cache(
    settings: Settings, redis: Redis, *, settle_s: float | None = None, on_phase: Callable[[str], None] | None = None
) -> rebuild.Figures:
    """`paymentsvc usage rebuild-cache`: see services/usage/rebuild.py."""
    catalog = load_catalog(settings.catalog_path)
    connect = connector(settings)
    caught_up = rebuild.worker_caught_up(connect, settings.kafka_bootstrap_servers, settings.topics.usage_events)
    async with connect() as conn:
        return await rebuild.rebuild(
            conn, redis, catalog, caught_up=caught_up,
            settle_s=settings.publish_timeout_s + 2.0 if settle_s is None else settle_s,
            on_phase=on_phase,
        )


async def _watch(settings: Settings, redis: Redis, stop: asyncio.Event) -> None:
    ready = Keys().ready
    while not stop.is_set():
        try:
            if not await redis.exists(ready):
                log.warning("usage counters missing in Redis: rebuilding them from Postgres")
                await rebuild_cache(settings, redis)
        except rebuild.RebuildRunning as exc:  # another replica (or the CLI) is at it
            log.info("usage counters missing, but %s: waiting for it", exc)
        except Exception:  # retried at the next tick; increments stay refused meanwhile
            log.exception("usage counter rebuild failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), WATCH_EVERY_S)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Project usage-events until `stop`, and publish the thresholds crossed on
    usage-thresholds through the outbox; see shared/workerapp.py for the lifecycle."""
    catalog = load_catalog(settings.catalog_path)
    await wait_for_broker(settings.kafka_bootstrap_servers, timeout=settings.startup_timeout_s)
    redis = _redis(settings)
    producer = make_producer(settings.kafka_bootstrap_servers)
    await producer.start()
    pool = await db.open_pool(settings.database_url.get_secret_value(), max_size=2, name="paymentsvc-usage-outbox",
                              statement_timeout_ms=settings.db_statement_timeout_ms)
    relay = OutboxRelay(pool, UsageProjection.name,
                        thresholds.sender(producer, settings.topics.usage_thresholds, settings.publish_timeout_s))
    watchdog = asyncio.create_task(_watch(settings, redis, stop))
    try:
        # A TaskGroup: if either part fails, the other is cancelled and the error raised.
        async with asyncio.TaskGroup() as group:
            group.create_task(serve_projection(
                settings, stop, UsageProjection(catalog, relay),
                topic=settings.topics.usage_events,
                port=settings.usage_port,
                extra_probes={"redis": redis_probe(redis)},
            ))
            group.create_task(relay.run(stop))
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        await pool.close()
        await producer.stop()
        await redis.aclose()


def replay_spec(settings: Settings) -> ProjectionSpec:
    """The projection as a rebuild runs it: thresholds recorded, nothing published."""
    catalog = load_catalog(settings.catalog_path)
    return ProjectionSpec(
        name="usage",
        topic=settings.topics.usage_events,
        tables=TABLES,
        make=lambda: UsageProjection(catalog, None),
    )
