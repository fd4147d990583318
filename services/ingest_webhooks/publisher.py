"""The port through which the ingester puts messages on the bus, and its Kafka adapter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from aiokafka import AIOKafkaProducer

from shared.kafka import OutgoingMessage, publish_all


class Publisher(Protocol):
    async def publish_all(self, messages: Sequence[OutgoingMessage], timeout_s: float) -> None:
        """Return once the broker acknowledged every message; else raise PublishFailed."""


class KafkaPublisher:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def publish_all(self, messages: Sequence[OutgoingMessage], timeout_s: float) -> None:
        await publish_all(self._producer, messages, timeout_s)
