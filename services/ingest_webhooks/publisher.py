"""The port through which the ingester puts messages on the bus, and its Kafka adapter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.ingest_webhooks.handlers import OutgoingMessage
from shared.kafka import PublishFailed
from shared.metrics import EVENTS_PUBLISHED, PUBLISH_LATENCY


class Publisher(Protocol):
    async def publish_all(self, messages: Sequence[OutgoingMessage], timeout_s: float) -> None:
        """Return once the broker acknowledged every message; else raise PublishFailed."""


class KafkaPublisher:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def publish_all(self, messages: Sequence[OutgoingMessage], timeout_s: float) -> None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                # Enqueue every message first, so they share produce requests, then await the acks.
                acks = [
                    await self._producer.send(m.topic, m.value, key=m.key, headers=list(m.headers))
                    for m in messages
                ]
                await asyncio.gather(*acks)
        except TimeoutError as exc:
            raise PublishFailed(f"no acknowledgement from the broker in {timeout_s:g} s") from exc
        except KafkaError as exc:
            raise PublishFailed(f"broker refused the message: {type(exc).__name__}") from exc
        elapsed = time.perf_counter() - started
        for m in messages:
            PUBLISH_LATENCY.labels(m.topic).observe(elapsed)
            EVENTS_PUBLISHED.labels(m.topic, m.event_type).inc()
