"""One trace from a webhook to the projection, and from a gRPC call to its usage event.

The real ingester app, the real entitlements worker loop and the real gRPC server run
in this process on the session broker, Postgres and Redis; spans go to the SDK's
InMemorySpanExporter through `shared.tracing.setup`, the function the runner calls.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from redis.asyncio import Redis

from payment.v1 import events_pb2, service_pb2
from paymentsvc.dev.samples import sample_event
from paymentsvc.dev.webhooks import encode_event
from services.dunning.events import KafkaPublisher as DunningPublisher
from services.dunning.events import notice_sender
from services.dunning.projection import DunningProjection
from services.dunning.scheduler import Scheduler, SchedulerConfig, StripeInvoices
from services.usage import thresholds
from services.usage.projection import UsageProjection
from shared import tracing
from shared.config import Topics
from shared.db import make_pool
from shared.kafka import make_producer
from shared.outbox import OutboxRelay
from shared.worker import BatchProcessor, RawMessage
from tests.integration.test_api_grpc import WRITE, auth
from tests.integration.test_dunning_scheduler import CATALOG, T0
from tests.integration.test_dunning_support import (
    DAY,
    Clock,
    NoDeadLetters,
    RecordingPublisher,
    failure,
    fake_stripe,
)
from tests.integration.test_entitlements_worker import CATALOG as USAGE_CATALOG
from tests.integration.test_entitlements_worker import entitlements_worker, live_db  # noqa: F401 - fixture
from tests.integration.test_ingest_webhooks import Ingester, signed_headers, start_ingester
from tests.integration.test_usage_api import Stack, inc, stack, usage_server  # noqa: F401 - fixture
from tests.kafka_helpers import headers_of, read_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Tracing set up as a process would be, with every span kept and exported here."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    monkeypatch.setattr(tracing, "_tracer", tracing.tracer())  # restored after the test
    exporter = InMemorySpanExporter()
    provider = tracing.setup("test", exporter=exporter, install_global=False)
    assert provider is not None
    yield exporter
    provider.shutdown()


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


def parent_id(span: ReadableSpan) -> str:
    assert span.parent is not None, span.name
    return format(span.parent.span_id, "016x")


def named(found: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in found if s.name == name]


@pytest.fixture
async def ingester(broker: str, topics: Topics) -> AsyncIterator[Ingester]:
    async for running in start_ingester(broker, topics):
        yield running


async def test_one_webhook_is_one_trace_from_the_request_to_the_entitlements_transaction(
    spans: InMemorySpanExporter, ingester: Ingester, broker: str, topics: Topics, live_db: str,  # noqa: F811
    redis_url: str, redis_prefix: str,
) -> None:
    header, trace_id, caller_span = traceparent()
    event = sample_event("customer.subscription.created")
    body = encode_event(event)
    status, answer = await ingester.post(body, signed_headers(body) | {"traceparent": header})
    assert (status, answer["status"]) == (200, "published"), answer

    redis = Redis.from_url(redis_url)
    try:
        async with entitlements_worker(broker, topics.payment_events, live_db, redis, redis_prefix) as progress:
            await progress.until_finished(1)
    finally:
        await redis.aclose()
    found = spans.get_finished_spans()

    [request] = named(found, "POST /webhooks/stripe")
    assert request.kind is SpanKind.SERVER
    assert hex_ids(request)[0] == trace_id and parent_id(request) == caller_span

    [produce] = named(found, f"send {topics.payment_events}")
    assert produce.kind is SpanKind.PRODUCER
    assert hex_ids(produce)[0] == trace_id and parent_id(produce) == hex_ids(request)[1]
    [raw] = named(found, f"send {topics.stripe_raw_events}")
    assert parent_id(raw) == hex_ids(request)[1]

    # The message carries the produce span's context, not the request's or the caller's.
    [record] = await read_topic(broker, topics.payment_events, expect=1)
    assert headers_of(record)["traceparent"] == f"00-{trace_id}-{hex_ids(produce)[1]}-01"

    [batch] = named(found, f"process {topics.payment_events}")
    assert batch.kind is SpanKind.CONSUMER
    assert hex_ids(batch)[0] == trace_id and parent_id(batch) == hex_ids(produce)[1]
    assert [link.context.span_id for link in batch.links] == [produce.context.span_id]  # type: ignore[union-attr]

    [transaction] = named(found, "entitlements transaction")
    assert hex_ids(transaction)[0] == trace_id and parent_id(transaction) == hex_ids(batch)[1]
    [after_commit] = named(found, "entitlements after_commit")
    assert parent_id(after_commit) == hex_ids(batch)[1]
    [redis_write] = named(found, "redis write entitlements")
    assert hex_ids(redis_write)[0] == trace_id and parent_id(redis_write) == hex_ids(after_commit)[1]


async def test_increment_usage_is_a_server_span_of_the_callers_trace_and_its_event_continues_it(
    spans: InMemorySpanExporter, stack: Stack,  # noqa: F811
) -> None:
    header, trace_id, caller_span = traceparent()
    user = f"user_{secrets.token_hex(6)}"
    async with usage_server(stack) as served:
        answer = await served.stub.IncrementUsage(inc(user, amount=3), metadata=auth(WRITE) + (("traceparent", header),))
        with pytest.raises(grpc.aio.AioRpcError):  # no key: the caller's error, not the server's
            await served.stub.CheckQuota(service_pb2.CheckQuotaRequest(), metadata=(("traceparent", header),))
    assert answer.allowed
    found = spans.get_finished_spans()
    [refused] = named(found, "payment.v1.PaymentService/CheckQuota")
    assert refused.attributes is not None and refused.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert refused.status.status_code is StatusCode.UNSET and hex_ids(refused)[0] == trace_id

    [server] = named(found, "payment.v1.PaymentService/IncrementUsage")
    assert server.kind is SpanKind.SERVER
    assert hex_ids(server)[0] == trace_id and parent_id(server) == caller_span
    assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == 0

    [produce] = [s for s in named(found, f"send {stack.topics.usage_events}") if hex_ids(s)[0] == trace_id]
    assert parent_id(produce) == hex_ids(server)[1]
    records = await read_topic(stack.broker, stack.topics.usage_events, expect=1)
    carried = [headers_of(r)["traceparent"] for r in records if r.key == user.encode()]
    assert carried == [f"00-{trace_id}-{hex_ids(produce)[1]}-01"]


async def test_with_no_otel_variable_nothing_is_exported_but_the_callers_trace_and_decision_still_travel(
    monkeypatch: pytest.MonkeyPatch, ingester: Ingester, topics: Topics, broker: str,
) -> None:
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(tracing, "_tracer", tracing.tracer())
    provider = tracing.setup("test", install_global=False)
    assert provider is not None
    assert provider.sampler.get_description().startswith("ParentBased{root:AlwaysOffSampler,")
    header, trace_id, caller_span = traceparent()  # sampled by the caller
    body = encode_event(sample_event("customer.subscription.created"))
    status, _ = await ingester.post(body, signed_headers(body) | {"traceparent": header})
    assert status == 200
    [record] = await read_topic(broker, topics.payment_events, expect=1)
    carried = headers_of(record)["traceparent"]
    # our span's id, and the caller's decision (sampled) passed on, not reset to 00
    assert carried.startswith(f"00-{trace_id}-") and carried.endswith("-01")
    assert caller_span not in carried


async def test_a_dunning_case_keeps_its_trace_its_notices_and_scheduler_steps_continue_it(
    spans: InMemorySpanExporter, database_url: str, broker: str, topics: Topics,
) -> None:
    header, trace_id, caller_span = traceparent()
    invoice = f"in_{secrets.token_hex(6)}"
    pool = make_pool(database_url, max_size=4)
    await pool.open(wait=True)
    producer = make_producer(broker)
    await producer.start()
    try:
        publisher = DunningPublisher(producer, topics)
        # The flush after the commit fails (broker down): the notices stay in the outbox...
        failing = OutboxRelay(pool, "dunning", notice_sender(RecordingPublisher(fail=True)))
        processor = BatchProcessor(DunningProjection(CATALOG, failing), pool, NoDeadLetters())
        failed = failure(invoice, T0)
        message = RawMessage(topics.payment_events, 0, 0, failed.customer_id.encode(), failed.SerializeToString(),
                             headers=(("traceparent", header.encode()),))
        await processor.process([message])  # opens the case
        # ... and the background relay publishes them later, outside any span.
        assert await OutboxRelay(pool, "dunning", notice_sender(publisher)).flush() == 2
        async with fake_stripe() as stripe_fake:
            scheduler = Scheduler(pool, StripeInvoices("sk_test_fake", stripe_fake.url, timeout_s=5), publisher,
                                  CATALOG, clock=Clock(T0 + DAY), config=SchedulerConfig(owner="tracing-test"))
            report = await scheduler.tick()
        assert report.attempts, report
    finally:
        await producer.stop()
        await pool.close()
    found = spans.get_finished_spans()

    # The notices the projection staged are published under the trace of the event.
    notices = await read_topic(broker, topics.dunning_events, expect=3)
    assert {headers_of(r)["traceparent"].split("-")[1] for r in notices} == {trace_id}
    # The scheduler's step continues it, from the traceparent stored with the case.
    [step] = named(found, "dunning attempt")
    assert hex_ids(step)[0] == trace_id and parent_id(step) == caller_span
    [decision] = await read_topic(broker, topics.payment_events, expect=1)
    [produce] = [s for s in named(found, f"send {topics.payment_events}") if parent_id(s) == hex_ids(step)[1]]
    assert headers_of(decision)["traceparent"] == f"00-{trace_id}-{hex_ids(produce)[1]}-01"


async def test_a_threshold_crossing_continues_the_trace_of_the_usage_event_that_crossed_it(
    spans: InMemorySpanExporter, database_url: str, broker: str, topics: Topics,
) -> None:
    """Issue 14: a caused event continues its cause. The crossing event is not the first of
    its batch, so the batch span (the first message's trace) is not the one to carry."""
    first_header, first_trace, _ = traceparent()
    header, trace_id, _ = traceparent()
    user = f"user_{secrets.token_hex(6)}"

    def usage(n: int, amount: int, carried: str) -> RawMessage:
        event = events_pb2.UsageEvent(
            event_id=f"ue_{secrets.token_hex(6)}", idempotency_key=f"idem_{secrets.token_hex(6)}",
            subject_type="user", subject_id=user, user_id=user, feature_code="api_calls", amount=amount,
            period_start=1_924_992_000, period_end=1_927_670_400, created_ms=1_924_992_000_000 + n,
            limit=1000, plan_id="free",
        )
        return RawMessage(topics.usage_events, 0, n, user.encode(), event.SerializeToString(),
                          headers=(("traceparent", carried.encode()),))

    pool = make_pool(database_url, max_size=4)
    await pool.open(wait=True)
    producer = make_producer(broker)
    await producer.start()
    try:
        staged = OutboxRelay(pool, UsageProjection.name, thresholds.sender(producer, topics.usage_thresholds))
        processor = BatchProcessor(UsageProjection(USAGE_CATALOG, staged), pool, NoDeadLetters())
        await processor.process([usage(0, 100, first_header), usage(1, 800, header)])  # 900 of 1000: 80%
    finally:
        await producer.stop()
        await pool.close()
    [crossed] = await read_topic(broker, topics.usage_thresholds, expect=1)
    assert events_pb2.UsageThresholdCrossed.FromString(crossed.value).threshold == "80%"
    carried = headers_of(crossed)["traceparent"].split("-")[1]
    assert carried == trace_id != first_trace
