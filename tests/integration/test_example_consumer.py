"""examples/consumer.py against the real broker, fed by the real ingester.

Webhooks go through the ingester (verified, normalized, published with its headers);
the example reads them back in a consumer group of its own, as another team would.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from examples.consumer import Received, consume
from paymentsvc.dev.samples import sample_event
from shared.config import Topics
from tests.conftest import random_id
from tests.integration.test_ingest_webhooks import Ingester, start_ingester
from tests.kafka_helpers import eventually
from tests.support.tools import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture
async def ingester(broker: str, topics: Topics) -> AsyncIterator[Ingester]:
    async for ingester in start_ingester(broker, topics):
        yield ingester


async def post_events(ingester: Ingester, types: list[str]) -> list[dict]:  # type: ignore[type-arg]
    events = [sample_event(event_type) for event_type in types]
    for event in events:
        status, answer = await ingester.post_event(event)
        assert (status, answer["status"]) == (200, "published")
    return events


async def committed_total(bootstrap: str, group: str, topic: str) -> int:
    """The sum of the group's committed offsets on `topic`: how many records it is past."""
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await probe.start()
    try:
        partitions = probe.partitions_for_topic(topic) or set()
        return sum([(await probe.committed(TopicPartition(topic, p))) or 0 for p in partitions])
    finally:
        await probe.stop()


async def test_the_example_handles_each_event_once_with_its_cloudevent_attributes_and_commits_after(
    ingester: Ingester,
) -> None:
    events = await post_events(ingester, ["invoice.paid", "customer.subscription.created", "charge.refunded"])
    status, _ = await ingester.post_event(events[0])  # Stripe delivers one again: published twice
    assert status == 200
    topic, group = ingester.topics.payment_events, random_id("example-")

    handled: list[Received] = []

    async def handle(received: Received) -> None:
        handled.append(received)

    async def past_all_four() -> bool:  # four records, one a duplicate
        return await committed_total(ingester.bootstrap, group, topic) == 4

    stop = asyncio.Event()
    consumer = asyncio.create_task(consume(ingester.bootstrap, topic, group, handle, stop))
    try:
        await eventually(past_all_four, interval=0.5, what="the group's commits past all 4 records")
    finally:
        stop.set()
        await consumer

    assert sorted(r.id for r in handled) == sorted(e["id"] for e in events)  # the duplicate once
    for received in handled:
        sent = next(e for e in events if e["id"] == received.id)
        assert received.source == "/paymentsvc/payment-events"
        assert received.type == f"payment.v1.PaymentEvent.{sent['type']}"
        assert received.time is not None and received.time.timestamp() == sent["created"]
        assert received.event.event_id == sent["id"] and received.event.event_type == sent["type"]
        assert received.key == received.event.customer_id


async def test_the_example_runs_as_a_program_printing_one_json_line_per_event_and_stops_on_sigterm(
    ingester: Ingester,
) -> None:
    events = await post_events(ingester, ["invoice.paid", "invoice.payment_failed"])
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "consumer.py"), "--bootstrap", ingester.bootstrap,
         "--topic", ingester.topics.payment_events, "--group", random_id("example-cli-")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        lines = [await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60) for _ in events]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    printed = [json.loads(line) for line in lines]
    assert sorted(p["id"] for p in printed) == sorted(e["id"] for e in events)
    assert {p["type"] for p in printed} == {f"payment.v1.PaymentEvent.{e['type']}" for e in events}
