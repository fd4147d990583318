"""The port through which the ingester puts messages on the bus, and its Kafka adapter."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from aiokafka import AIOKafkaProducer

from services.ingest_webhooks.handlers import OutgoingMessage
from shared.kafka import PublishFailed, publish


class Publisher(Protocol):
    async def publish_all(self, messages: Sequence[OutgoingMessage], timeout_s: float) -> None:
        """Return once the broker acknowledged every message; else raise PublishFailed."""


class KafkaPublisher:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def publish_all(self, messages: Sequence[OutgoingMessage], timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(
                    *(
                        publish(
                            self._producer,
                            m.topic,
                            m.value,
                            key=m.key,
                            headers=m.headers,
                            event_type=m.event_type,
                            timeout_s=timeout_s,
                        )
                        for m in messages
                    )
                )
        except TimeoutError as exc:
            raise PublishFailed(f"no acknowledgement from the broker in {timeout_s:g} s") from exc
