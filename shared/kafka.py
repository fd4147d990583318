"""Kafka clients with the settings this project relies on.

Producers send with `acks=all` so that an acknowledged message survives a
broker failure, `linger_ms=0` because a lone send on a request path would
otherwise wait the whole linger, and a 1 MiB batch because aiokafka's 16 KiB
default collapses throughput under many concurrent sends (DESIGN.md).
Idempotence is off: the dev broker (Tansu) has no InitProducerId, and the
consumers deduplicate by event id anyway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from shared import tracing
from shared.metrics import EVENTS_PUBLISHED, PUBLISH_LATENCY

Headers = Sequence[tuple[str, bytes]]
SCHEMA_VERSION = b"1"


def event_headers(event_id: str, event_type: str, message: str, traceparent: str = "") -> list[tuple[str, bytes]]:
    """The headers of every protobuf message on our topics (DESIGN.md, "Topics").

    `message` names the payment.v1 message type; `traceparent` is the W3C header
    value to carry (a new trace when empty).
    """
    return [
        ("event-id", event_id.encode()),
        ("event-type", event_type.encode()),
        ("schema-version", SCHEMA_VERSION),
        ("content-type", f"application/x-protobuf; messageType=payment.v1.{message}".encode()),
        ("traceparent", (traceparent or tracing.child_traceparent()).encode()),
    ]


class PublishFailed(RuntimeError):
    """The broker did not acknowledge a message in time. Nothing may be assumed sent."""


def make_producer(bootstrap_servers: str, *, request_timeout_ms: int = 10_000) -> AIOKafkaProducer:
    """An unstarted producer; `await producer.start()` in the composition root."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        enable_idempotence=False,
        linger_ms=0,
        max_batch_size=1024 * 1024,
        max_request_size=2 * 1024 * 1024,
        request_timeout_ms=request_timeout_ms,
        client_id="paymentsvc",
    )


async def publish(
    producer: AIOKafkaProducer,
    topic: str,
    value: bytes,
    *,
    key: bytes | None,
    headers: Headers = (),
    event_type: str = "",
    timeout_s: float = 10.0,
) -> tuple[int, int]:
    """Send one message and wait for the broker's acknowledgement.

    Returns (partition, offset). Raises PublishFailed if there is no
    acknowledgement within `timeout_s` or the broker refuses the message.
    """
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            metadata = await producer.send_and_wait(topic, value, key=key, headers=list(headers))
    except TimeoutError as exc:
        raise PublishFailed(f"no acknowledgement from the broker in {timeout_s:g} s") from exc
    except KafkaError as exc:
        raise PublishFailed(f"broker refused the message: {type(exc).__name__}") from exc
    PUBLISH_LATENCY.labels(topic).observe(time.perf_counter() - started)
    EVENTS_PUBLISHED.labels(topic, event_type).inc()
    return metadata.partition, metadata.offset


def kafka_probe(producer: AIOKafkaProducer):  # type: ignore[no-untyped-def]
    """Readiness probe: the producer's client can fetch cluster metadata."""

    async def probe() -> None:
        ok = await producer.client.force_metadata_update()
        if not ok:
            raise PublishFailed("no broker answered a metadata request")

    return probe
