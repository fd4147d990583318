"""Composition root of the entitlements worker: catalog, Redis, projection, the shared loop."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

import psycopg
from redis.asyncio import Redis

from domain.entitlements import redis_key
from services.entitlements import repository
from services.entitlements.projection import (
    EntitlementsProjection,
    mark_cached_subjects,
    refresh_pending,
)
from shared.catalog import Catalog, load_catalog
from shared.config import Settings
from shared.health import redis_probe
from shared.replay import ProjectionSpec
from shared.workerapp import serve_projection

log = logging.getLogger(__name__)

# Every table this projection writes; replay rebuilds and verifies exactly these.
TABLES = (
    "customers",
    "subscriptions",
    "subscription_history",
    "paid_periods",
    "paid_period_events",
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
        await _refresh_at_start(settings, redis, catalog)
        projection = EntitlementsProjection(catalog, redis)
        await serve_projection(
            settings, stop, projection,
            topic=settings.topics.payment_events,
            port=settings.entitlements_port,
            extra_probes={"redis": redis_probe(redis)},
        )
    finally:
        await redis.aclose()


async def _refresh_at_start(settings: Settings, redis: Redis, catalog: Catalog) -> None:
    """Rewrite the answers an earlier process committed but may not have written to Redis."""
    try:
        async with await psycopg.AsyncConnection.connect(
            settings.database_url.get_secret_value(), connect_timeout=5, autocommit=True
        ) as conn:
            refreshed = await refresh_pending(conn, redis, catalog)
        if refreshed:
            log.info("rewrote Redis answers left pending by an earlier process", extra={"subjects": refreshed})
    except Exception as exc:  # the first batches retry; Postgres stays the truth meanwhile
        log.warning(
            "could not rewrite pending Redis answers at start; the next batches will",
            extra={"error": f"{type(exc).__name__}: {exc}"},
        )


async def rebuild_cache(
    settings: Settings,
    redis: Redis,
    subject: tuple[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Rewrite the Redis answers of every subject (or one) from Postgres; how many subjects.

    Safe while the worker runs: subjects are marked as a batch marks them, and each chunk
    locks its marks, so a running batch and the rebuild never write one subject at once.
    """
    catalog = load_catalog(settings.catalog_path)
    url = settings.database_url.get_secret_value()
    async with await psycopg.AsyncConnection.connect(url, connect_timeout=5, autocommit=True) as conn:
        async with conn.transaction():
            await repository.mark_all_cache_pending(conn, EntitlementsProjection.name, subject)
            if subject is None:
                await mark_cached_subjects(conn, redis)  # keys of subjects without rows go too
            elif await redis.exists(redis_key("", subject)):
                await repository.mark_cache_pending(conn, EntitlementsProjection.name, [subject])
        total = await repository.count_cache_pending(conn, EntitlementsProjection.name)
        return await refresh_pending(
            conn, redis, catalog, progress=(lambda done: progress(done, total)) if progress else None
        )


# Batches of different partitions may commit at once (live replicas do): the ones that
# share a payment or grant lock its row, or fail and retry if both insert it
# (repository.load_state, save). So a rebuild applies partitions concurrently.
REPLAY_LANES = 3
# Indexes for readers (the API, operators), never read by a batch: a rebuild may build
# them after its load (ProjectionSpec.deferred_indexes). Kept: the ones the load queries
# and backfill_payment_identity filter by.
READER_INDEXES = (
    "customers_user", "customers_family",
    "subscriptions_user", "subscriptions_family", "subscriptions_unknown_price",
    "payments_user", "payments_family", "payments_status", "payments_created",
)
# It does not: deferring them showed no gain at 50,000 events (3 same-run comparisons,
# mixed) nor at 1M (the replay's time and its Postgres CPU per event alike with and without
# them), docs/performance.md, section 5. `READER_INDEXES` turns it back on.
DEFERRED_INDEXES: tuple[str, ...] = ()
# Entries of the server's lock table a batch takes per event: none. A batch locks the
# payment and grant rows it loads (row locks live in the rows) and takes a fixed number of
# relation locks, whatever its size; the per-id advisory locks (`lock_batch_keys`, up to 3
# per event) are gone (docs/performance.md, issue 12 section 9). So `bulk_batch` gives
# BULK_BATCH on any server.
LOCKS_PER_EVENT = 0.0


def replay_spec(settings: Settings) -> ProjectionSpec:
    """The projection as a rebuild runs it: no Redis, nothing emitted."""
    catalog = load_catalog(settings.catalog_path)
    return ProjectionSpec(
        name="entitlements",
        topic=settings.topics.payment_events,
        tables=TABLES,
        # A partial, not a lambda: it pickles, so a rebuild may run its lanes in processes.
        make=functools.partial(EntitlementsProjection, catalog, None),
        lanes=REPLAY_LANES,
        deferred_indexes=DEFERRED_INDEXES,
        locks_per_event=LOCKS_PER_EVENT,
    )
