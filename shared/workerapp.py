"""Serving a projection as a worker process: the part every worker's bootstrap shares.

`serve_projection` opens the database pool and the dead-letter producer, serves
the health and metrics endpoints, and runs the live loop until `stop` is set.
A service's bootstrap builds its projection and calls it; nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from shared import db
from shared.config import Settings
from shared.consumer import BatchHealth, KafkaDeadLetters, LogCheck, LoopPolicy, run_live
from shared.devbroker import wait_for_broker
from shared.health import Probe, add_health_routes, postgres_probe, start_site
from shared.inbox import DAY_S, InboxPruner
from shared.kafka import kafka_probe, make_producer
from shared.projection import Projection
from shared.worker import BatchProcessor

log = logging.getLogger("worker")


async def serve_projection(
    settings: Settings,
    stop: asyncio.Event,
    projection: Projection[Any],
    *,
    topic: str,
    port: int,
    extra_probes: Mapping[str, Probe] | None = None,
    policy: LoopPolicy | None = None,
) -> None:
    """Run `projection` on `topic` as the consumer group `paymentsvc-<name>` until `stop`."""
    database_url = settings.database_url.get_secret_value()
    await wait_for_broker(settings.kafka_bootstrap_servers, timeout=settings.startup_timeout_s)
    policy = policy or LoopPolicy(lanes=settings.worker_lanes)
    # A connection per lane (a projection that opts in, BatchProcessor.lane_count), and
    # the statistics, the inbox pruner and the probe.
    lanes = policy.lanes if hasattr(projection, "for_lane") else 1
    pool = await db.open_pool(database_url, max_size=max(4, lanes + 2), name=f"paymentsvc-{projection.name}",
                              statement_timeout_ms=settings.db_statement_timeout_ms)
    producer = make_producer(settings.kafka_bootstrap_servers)
    await producer.start()
    runner = None
    try:
        health, log_check = BatchHealth(), LogCheck(projection.name)
        probes: dict[str, Probe] = {
            "postgres": postgres_probe(pool), "kafka": kafka_probe(producer), "batches": health.probe,
            "log": log_check.probe,
        }
        probes.update(extra_probes or {})
        app = web.Application()
        add_health_routes(app, projection.name, settings, probes, stop)
        runner = await start_site(app, settings.bind_host, port)
        processor = BatchProcessor(projection, pool, KafkaDeadLetters(producer, settings.publish_timeout_s))
        log.info("consuming", extra={"topic": topic, "consumer": projection.name, "health": f"http://{settings.bind_host}:{port}"})
        pruner = InboxPruner(pool, projection.name, retention_s=settings.inbox_retention_days * DAY_S)
        pruning = asyncio.create_task(pruner.run(stop, settings.inbox_prune_interval_s))
        live = asyncio.create_task(run_live(
            processor, pool, settings.kafka_bootstrap_servers, topic, f"paymentsvc-{projection.name}", stop,
            policy, health=health, log_check=log_check,
        ))
        try:
            await _drained(live, stop, settings.shutdown_timeout_s, projection.name)
        finally:
            pruning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pruning
    finally:
        if runner is not None:
            await runner.cleanup()
        await producer.stop()
        await pool.close()


async def _drained(live: asyncio.Task[None], stop: asyncio.Event, deadline_s: float, name: str) -> None:
    """Run the live loop until `stop`; then give the batch in flight `deadline_s` to commit.

    A batch still running at the deadline is cancelled: its transaction rolls back and
    its events are delivered again after the restart (the inbox makes that harmless).
    """
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({live, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not live.done():
            log.info("stopping: not ready, finishing the batch in flight",
                     extra={"consumer": name, "deadline_s": deadline_s})
            await asyncio.wait({live}, timeout=deadline_s)
    except BaseException:  # we were cancelled (a sibling task failed): so is the loop
        live.cancel()
        raise
    finally:
        stopping.cancel()
    if not live.done():
        log.warning("the batch in flight did not finish within the shutdown deadline: rolled back, "
                    "it is delivered again after the restart", extra={"consumer": name, "deadline_s": deadline_s})
        live.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await live
        return
    live.result()  # a failure of the loop is raised here
