"""API_PUBLISH_LINGER_MS on a real (Tansu) broker: events that reach the producer one at a
time, as an API's increments do under load, leave in one produce request each without a
linger and in a few fuller requests with one. Counted at aiokafka's client."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest
from aiokafka.client import AIOKafkaClient

from shared.config import Settings
from shared.devbroker import ensure_topics
from shared.kafka import make_producer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
EVENTS = 60


async def produce_requests(broker: str, topic: str, linger_ms: float, monkeypatch: pytest.MonkeyPatch) -> int:
    requests = 0
    real = AIOKafkaClient.send

    def counting(self: AIOKafkaClient, node_id: int, request: Any, *args: Any, **kw: Any) -> Any:
        nonlocal requests
        requests += type(request).__name__.startswith("ProduceRequest")
        return real(self, node_id, request, *args, **kw)

    producer = make_producer(broker, linger_ms=linger_ms)
    await producer.start()
    try:
        monkeypatch.setattr(AIOKafkaClient, "send", counting)
        acks = []
        for n in range(EVENTS):  # one every millisecond: the broker answers each in between
            acks.append(await producer.send(topic, b"usage", key=f"pool-{n % 3}".encode()))
            await asyncio.sleep(0.001)
        await asyncio.gather(*acks)  # every one acknowledged (acks=all), lingering or not
        return requests
    finally:
        monkeypatch.undo()
        await producer.stop()


async def test_a_linger_sends_events_arriving_one_at_a_time_in_fewer_requests(
    broker: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = f"linger-{secrets.token_hex(4)}"
    await ensure_topics(broker, [topic], partitions=1)
    at_once = await produce_requests(broker, topic, 0, monkeypatch)
    lingering = await produce_requests(broker, topic, 20, monkeypatch)
    assert at_once >= EVENTS * 0.5, at_once  # without a linger nearly every event is its own request
    assert lingering <= at_once / 3, (lingering, at_once)


def test_the_api_setting_defaults_to_sending_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("API_PUBLISH_LINGER_MS", raising=False)
    assert Settings().api_publish_linger_ms == 0
    monkeypatch.setenv("API_PUBLISH_LINGER_MS", "5")
    assert Settings().api_publish_linger_ms == 5
    monkeypatch.setenv("API_PUBLISH_LINGER_MS", "-1")
    with pytest.raises(ValueError, match="api_publish_linger_ms"):
        Settings()
