"""Kafka clients with the settings this project relies on.

Producers send with `acks=all` so that an acknowledged message survives a
broker failure, `linger_ms=0` by default because a lone send on a request path would
otherwise wait the whole linger (the API may trade that for batching:
API_PUBLISH_LINGER_MS), and a 1 MiB batch because aiokafka's 16 KiB
default collapses throughput under many concurrent sends (DESIGN.md).
Idempotence is off: the dev broker (Tansu) has no InitProducerId, and the
consumers deduplicate by event id anyway.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner, murmur2
from opentelemetry import trace
from opentelemetry.context import Context

from payment.v1 import events_pb2
from shared import tracing
from shared.metrics import EVENTS_PUBLISHED, PUBLISH_LATENCY

Headers = Sequence[tuple[str, bytes]]
SCHEMA_VERSION = b"1"


def event_headers(
    event_id: str, event_type: str, message: str, traceparent: str = "", *, occurred_at: float = 0.0,
    trace: Sequence[tuple[str, bytes]] | None = None,
) -> list[tuple[str, bytes]]:
    """The headers of every protobuf message on our topics (DESIGN.md, "Topics").

    `message` names the payment.v1 message type; `traceparent` is a W3C header
    value to carry as is; when empty, the current trace context is injected through
    the global propagator (`traceparent`, and `tracestate` if any; shared/tracing.py).
    `publish_all` replaces it with its produce span's context.
    `occurred_at` (Unix seconds) is when the event happened, for `ce_time` (now when 0).
    `trace`: the `trace_headers(traceparent)` the caller already built for another message
    of the same request (the ingester's two messages share them: one injection, not two).
    """
    type_, content_type, ce_type, ce_source = _constant_parts(event_type, message)
    id_ = event_id.encode()
    return [
        ("event-id", id_),
        ("event-type", type_),
        ("schema-version", SCHEMA_VERSION),
        ("content-type", content_type),
        *(tracing.trace_headers(traceparent) if trace is None else trace),
        *_cloudevent_headers(id_, ce_type, ce_source, occurred_at),
    ]


@functools.lru_cache(maxsize=1024)
def _constant_parts(event_type: str, message: str) -> tuple[bytes, bytes, bytes, bytes]:
    """The header values that depend on the kind of message only, encoded once: `event-type`,
    `content-type`, `ce_type`, `ce_source` (KeyError for a message not in CE_SOURCES)."""
    return (event_type.encode(), f"application/x-protobuf; messageType=payment.v1.{message}".encode(),
            f"payment.v1.{message}.{event_type}".encode(), CE_SOURCES[message].encode())


# CloudEvents binary mode for Kafka (docs/asyncapi.yaml): any CloudEvents SDK reads these
# without our code. `content-type` is the binding's datacontenttype and is set by the
# message's builder. The spec makes source + id an event's identity, so each stream has
# its own source: a Stripe event id is both a raw event and a normalized one, two events.
CE_SPECVERSION = b"1.0"
CE_SOURCES = {
    "PaymentEvent": "/paymentsvc/payment-events",
    "UsageEvent": "/paymentsvc/usage-events",
    "UsageThresholdCrossed": "/paymentsvc/usage-thresholds",
    "DunningEvent": "/paymentsvc/dunning-events",
    "StripeEvent": "/paymentsvc/stripe-raw-events",
}


def cloudevent_headers(event_id: str, ce_type: str, source: str, occurred_at: float = 0.0) -> list[tuple[str, bytes]]:
    """The required CloudEvents attributes plus `ce_time` (RFC 3339, UTC; now when
    `occurred_at` is 0), as `ce_`-prefixed headers."""
    return _cloudevent_headers(event_id.encode(), ce_type.encode(), source.encode(), occurred_at)


def _cloudevent_headers(event_id: bytes, ce_type: bytes, source: bytes, occurred_at: float) -> list[tuple[str, bytes]]:
    return [
        ("ce_specversion", CE_SPECVERSION),
        ("ce_id", event_id),
        ("ce_source", source),
        ("ce_type", ce_type),
        ("ce_time", ce_time(occurred_at)),
    ]


def ce_time(occurred_at: float) -> bytes:
    """`ce_time` of `occurred_at` (Unix seconds; now when 0): `rfc3339`, encoded."""
    if not occurred_at:
        return rfc3339(time.time()).encode()
    ms = round(occurred_at * 1000)
    if 0 < ms < _EXACT_MS and ms / 1000 == occurred_at:  # whole seconds or milliseconds (Stripe's `created`, `created_ms / 1000`)
        second, fraction = divmod(ms, 1000)
        return _whole_second(second) if not fraction else f"{_second_text(second)}.{fraction:03d}000Z".encode()
    return rfc3339(occurred_at).encode()


@functools.lru_cache(maxsize=1024)
def _whole_second(second: int) -> bytes:
    # A webhook's two messages share their `created` second: built once.
    return f"{_second_text(second)}Z".encode()


# Below 2^32 s (the year 2106) the float nearest to ms / 1000 is within 0.24 µs of it, so
# datetime rounds it to the very microsecond: rfc3339 prints `.fff000` of those ms.
_EXACT_MS = 2**32 * 1000


@functools.lru_cache(maxsize=64)
def _second_text(second: int) -> str:
    # rfc3339 of the whole second without its `Z`: computed once per second, not per event.
    return rfc3339(second)[:-1]


def rfc3339(unix_seconds: float) -> str:
    """`2026-12-07T05:40:00Z`, with a fraction only when the time has one."""
    return datetime.fromtimestamp(unix_seconds, UTC).isoformat().replace("+00:00", "Z")


class PublishFailed(RuntimeError):
    """The broker did not acknowledge a message in time. Nothing may be assumed sent."""


class KeyHashPartitioner:
    """aiokafka's default partitioner (murmur2 of the key, as the Java client does it, so
    a key lands on the same partition whichever client wrote it) with each key's hash
    remembered: aiokafka computes murmur2 in pure Python, 6-7 µs per send, and a
    customer's or a pool's key recurs. The partition count is applied per call, so a
    topic that grows partitions is followed at once. At most `max_keys` hashes are kept
    (then forgotten all at once)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._hashes: dict[bytes, int] = {}
        self._max_keys = max_keys

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return int(DefaultPartitioner()(key, all_partitions, available))
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= self._max_keys:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[hashed % len(all_partitions)]


def make_producer(
    bootstrap_servers: str, *, request_timeout_ms: int = 10_000, linger_ms: float = 0,
) -> AIOKafkaProducer:
    """An unstarted producer; `await producer.start()` in the composition root.
    `linger_ms`: how long a batch waits for company before it is sent (0: it leaves at
    once, or with the next request when one is in flight)."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        enable_idempotence=False,
        linger_ms=linger_ms,
        max_batch_size=1024 * 1024,
        max_request_size=2 * 1024 * 1024,
        request_timeout_ms=request_timeout_ms,
        client_id="paymentsvc",
        partitioner=KeyHashPartitioner(),
    )


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    event_type: str = ""


async def publish_all(
    producer: AIOKafkaProducer, messages: Sequence[OutgoingMessage], timeout_s: float = 10.0
) -> list[tuple[int, int]]:
    """Send messages and wait until the broker acknowledged every one.

    All are enqueued before any ack is awaited, so they share produce requests.
    Returns (partition, offset) of each. Raises PublishFailed if an
    acknowledgement is missing after `timeout_s` or the broker refuses a message;
    then nothing may be assumed sent.
    """
    started = time.perf_counter()
    spans, headers = traced_headers(messages)
    try:
        async with asyncio.timeout(timeout_s):
            acks = [
                await producer.send(m.topic, m.value, key=m.key, headers=h)
                for m, h in zip(messages, headers, strict=True)
            ]
            metadata = await asyncio.gather(*acks)
    except TimeoutError as exc:
        _end_spans(spans, "no acknowledgement")
        raise PublishFailed(f"no acknowledgement from the broker in {timeout_s:g} s") from exc
    except KafkaError as exc:
        _end_spans(spans, type(exc).__name__)
        raise PublishFailed(f"broker refused the message: {type(exc).__name__}") from exc
    except BaseException:
        _end_spans(spans, "cancelled")
        raise
    for span, md in zip(spans, metadata, strict=False):  # no spans when not traced
        _end_acknowledged(span, md)
    elapsed = time.perf_counter() - started
    for m in messages:
        _count_published(m, elapsed)
    return [(md.partition, md.offset) for md in metadata]


async def enqueue(producer: AIOKafkaProducer, message: OutgoingMessage) -> asyncio.Future[Any]:
    """Hand one message to the producer and return its delivery future, without
    waiting for the acknowledgement: no task, future or timeout of ours per message.

    The future resolves to the record's metadata once the broker acknowledged it
    (acks=all), or fails with a KafkaError when it did not within the producer's
    `request_timeout_ms` (aiokafka expires the batch); then nothing may be assumed sent.
    Cancelling the future does not stop the send. The produce span (as `publish_all`
    makes it) ends and the metrics count when the future resolves.

    Raises KafkaError when the message cannot be enqueued (no metadata for the topic,
    the buffer stays full): then it was not sent. Cancelled while waiting to enqueue,
    it was not sent either.
    """
    started = time.perf_counter()
    spans, headers = traced_headers([message])
    try:
        ack = await producer.send(message.topic, message.value, key=message.key, headers=headers[0])
    except KafkaError as exc:
        _end_spans(spans, type(exc).__name__)
        raise
    except BaseException:
        _end_spans(spans, "cancelled")
        raise
    ack.add_done_callback(functools.partial(_delivered, message, spans[0] if spans else None, started))
    return ack


def _delivered(message: OutgoingMessage, span: trace.Span | None, started: float, ack: asyncio.Future[Any]) -> None:
    if ack.cancelled() or ack.exception() is not None:
        if span is not None:
            _end_spans([span], "cancelled" if ack.cancelled() else type(ack.exception()).__name__)
        return
    if span is not None:
        _end_acknowledged(span, ack.result())
    _count_published(message, time.perf_counter() - started)


def _end_acknowledged(span: trace.Span, md: Any) -> None:
    if span.is_recording():
        span.set_attribute("messaging.destination.partition.id", str(md.partition))
        span.set_attribute("messaging.kafka.offset", md.offset)
    span.end()


# Label children bound once per topic and type: a labels() lookup costs about 3 µs.
_LATENCY: dict[str, Any] = {}
_PUBLISHED: dict[tuple[str, str], Any] = {}


def _count_published(message: OutgoingMessage, elapsed: float) -> None:
    latency = _LATENCY.get(message.topic)
    if latency is None:
        latency = _LATENCY[message.topic] = PUBLISH_LATENCY.labels(message.topic)
    latency.observe(elapsed)
    key = (message.topic, message.event_type)
    published = _PUBLISHED.get(key)
    if published is None:
        if len(_PUBLISHED) > 10_000:  # event types come from Stripe: bound the cache, not the metric
            _PUBLISHED.clear()
        published = _PUBLISHED[key] = EVENTS_PUBLISHED.labels(*key)
    published.inc()


def traced_headers(messages: Sequence[OutgoingMessage]) -> tuple[list[trace.Span], list[list[tuple[str, bytes]]]]:
    """The produce spans of `messages` (started) and their headers, each message carrying
    its own produce span's context.

    A child of a span that is not recorded is not recorded either (every built-in sampler
    decides by the parent or by the trace id): then no produce span is made and the
    messages keep the context their headers were built under, the caller's span.

    Outside any valid span, a message that carries a valid `traceparent` (given
    explicitly, as event_headers allows) gets a produce span that continues it, so its
    trace goes on instead of being replaced by an unrelated one.
    """
    current = trace.get_current_span()
    if not current.is_recording() and current.get_span_context().is_valid:
        return [], [list(m.headers) for m in messages]
    outside = not current.get_span_context().is_valid
    spans, headers = [], []
    for m in messages:
        carried = tracing.extract_headers(m.headers) if outside else None
        if carried is not None and not trace.get_current_span(carried).get_span_context().is_valid:
            carried = None
        span = _produce_span(m.topic, carried)
        spans.append(span)
        if carried is not None and not span.get_span_context().is_valid:
            headers.append(list(m.headers))  # no tracer to continue it with: carried as is
            continue
        # The current context with the produce span in it, given to the propagator rather than
        # made current (use_span): the same headers without an attach and a detach.
        headers.append(list(tracing.with_trace_headers(m.headers, trace.set_span_in_context(span))))
    return spans, headers


def _produce_span(topic: str, parent: Context | None = None) -> trace.Span:
    """A PRODUCER span for one message, child of `parent` or else of the current context
    (messaging conventions)."""
    span = tracing.tracer().start_span(f"send {topic}", context=parent, kind=trace.SpanKind.PRODUCER)
    if span.is_recording():  # attributes only where they are kept
        span.set_attribute("messaging.system", "kafka")
        span.set_attribute("messaging.operation.type", "send")
        span.set_attribute("messaging.destination.name", topic)
    return span


def _end_spans(spans: Sequence[trace.Span], error: str) -> None:
    for span in spans:
        if span.is_recording():
            span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end()


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
    """Send one message and wait for its acknowledgement; see publish_all."""
    message = OutgoingMessage(topic, key, value, tuple(headers), event_type)
    return (await publish_all(producer, [message], timeout_s))[0]


def kafka_probe(producer: AIOKafkaProducer):  # type: ignore[no-untyped-def]
    """Readiness probe: the producer's client can fetch cluster metadata."""

    async def probe() -> None:
        ok = await producer.client.force_metadata_update()
        if not ok:
            raise PublishFailed("no broker answered a metadata request")

    return probe


def payment_event_key(event: events_pb2.PaymentEvent) -> str:
    """The Kafka key of a payment-events message: the customer id, else the payment's own.

    A guest payment (no Stripe Customer) is keyed by its payment intent id, else its
    charge id, else its object id, so the charge, intent and checkout events of one
    payment share a partition and stay in order. Empty when the event has none.
    """
    return event.customer_id or event.payment_intent_id or event.charge_id or event.object_id
