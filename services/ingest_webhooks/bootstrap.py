"""Composition root of the webhook ingester: wires config, producer, app and health."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from services.ingest_webhooks.app import IngestConfig, make_app
from services.ingest_webhooks.publisher import KafkaPublisher
from services.ingest_webhooks.verify import SignatureVerifier
from shared.config import Settings
from shared.devbroker import wait_for_broker
from shared.errors import ConfigurationError
from shared.health import add_health_routes, start_site
from shared.kafka import kafka_probe, make_producer

log = logging.getLogger("ingest_webhooks")


def build_app(
    settings: Settings, publisher: KafkaPublisher, probes: dict, stopping: asyncio.Event | None = None,  # type: ignore[type-arg]
) -> web.Application:
    secrets = [s.get_secret_value() for s in settings.stripe_webhook_secrets]
    if not secrets:
        raise ConfigurationError("STRIPE_WEBHOOK_SECRETS is empty: the ingester cannot verify webhooks")
    verifier = SignatureVerifier(secrets, settings.stripe_webhook_tolerance_s)
    config = IngestConfig(settings.topics, settings.webhook_max_body_bytes, settings.publish_timeout_s)
    app = make_app(verifier, publisher, config)
    add_health_routes(app, "ingest_webhooks", settings, probes, stopping)
    return app


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Serve until `stop` is set. Then: not ready at once (the health routes watch
    `stop`), keep serving for SHUTDOWN_DELAY_S, stop listening, give requests in flight
    SHUTDOWN_TIMEOUT_S to be answered (each waits for its broker acknowledgement), and
    flush the producer."""
    await wait_for_broker(settings.kafka_bootstrap_servers, timeout=settings.startup_timeout_s)
    producer = make_producer(
        settings.kafka_bootstrap_servers, request_timeout_ms=int(settings.publish_timeout_s * 1000)
    )
    await producer.start()
    try:
        app = build_app(settings, KafkaPublisher(producer), {"kafka": kafka_probe(producer)}, stop)
        runner = await start_site(
            app, settings.bind_host, settings.ingest_port, settings.shutdown_timeout_s, reuse_port=settings.reuse_port
        )
        log.info("listening", extra={"url": f"http://{settings.bind_host}:{settings.ingest_port}"})
        try:
            await stop.wait()
            log.info("stopping: not ready; still serving for SHUTDOWN_DELAY_S, then answering the requests in flight",
                     extra={"delay_s": settings.shutdown_delay_s, "deadline_s": settings.shutdown_timeout_s})
            await asyncio.sleep(settings.shutdown_delay_s)
        finally:
            await runner.cleanup()
    finally:
        await producer.stop()
