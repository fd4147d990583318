"""shared/tracing.py's configuration from OTEL_* and its propagation, and trace ids in JSON logs."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator

import orjson
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared import tracing
from shared.errors import ConfigurationError
from shared.kafka import OutgoingMessage, event_headers, publish_all
from shared.logs import JsonFormatter


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(tracing, "_tracer", tracing.tracer())  # restored after each test
    yield


def provider(**kw: object) -> TracerProvider:
    made = tracing.setup("ingest_webhooks", install_global=False, **kw)  # type: ignore[arg-type]
    assert made is not None
    return made


def processors(made: TracerProvider) -> list[object]:
    return list(made._active_span_processor._span_processors)  # noqa: SLF001 - no public view


def test_with_no_variable_nothing_is_exported_and_every_span_is_dropped() -> None:
    made = provider()
    assert processors(made) == []
    assert made.sampler.get_description().startswith("ParentBased{root:AlwaysOffSampler,")
    assert made.resource.attributes["service.name"] == "paymentsvc-ingest_webhooks"
    with tracing.tracer().start_as_current_span("x") as span:
        assert not span.is_recording() and span.get_span_context().is_valid
        # a trace that starts here is not sampled (the sampled bit of the W3C flags is clear)
        assert int(tracing.current_traceparent().rsplit("-", 1)[1], 16) & 1 == 0


@pytest.mark.parametrize("flags", ["01", "00"])
def test_with_no_variable_a_callers_sampling_decision_is_passed_on_not_reset(flags: str) -> None:
    """Parent-based consumers downstream keep what the caller chose to sample."""
    provider()
    caller = f"00-{'ab' * 16}-{'cd' * 8}-{flags}"
    with tracing.tracer().start_as_current_span("x", context=tracing.extract_headers({"traceparent": caller})):
        carried = tracing.current_traceparent()
    assert carried.startswith(f"00-{'ab' * 16}-") and carried.endswith(f"-{flags}")


def test_an_otlp_endpoint_exports_with_the_sampler_and_service_name_of_the_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.01")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "payments-edge")
    made = provider()
    [processor] = processors(made)
    assert isinstance(processor.span_exporter, OTLPSpanExporter)  # type: ignore[attr-defined]
    assert "TraceIdRatioBased{0.01}" in made.sampler.get_description()
    assert made.resource.attributes["service.name"] == "payments-edge"
    made.shutdown()


def test_sdk_disabled_installs_nothing_and_an_unknown_exporter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.setup("x", install_global=False) is None
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigurationError):
        tracing.setup("x", install_global=False)


def test_headers_carry_the_current_span_through_the_propagator_and_a_fresh_id_outside_any() -> None:
    provider(exporter=InMemorySpanExporter())
    with tracing.tracer().start_as_current_span("x") as span:
        headers = dict(event_headers("evt_1", "t", "PaymentEvent"))
        context = span.get_span_context()
    # Sampled (and, for a root of ours, the W3C level 2 "random" bit: 03).
    assert headers["traceparent"] == f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}".encode()
    assert context.trace_flags.sampled
    outside = dict(event_headers("evt_1", "t", "PaymentEvent"))["traceparent"].decode()
    assert len(outside) == 55 and outside != headers["traceparent"].decode()
    # What a consumer extracts is what the producer injected.
    [link] = tracing.links_of([list(headers.items())])
    assert (link.context.trace_id, link.context.span_id) == (context.trace_id, context.span_id)


def test_a_stored_traceparent_is_continued() -> None:
    provider(exporter=InMemorySpanExporter())
    stored = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    with tracing.continued(stored), tracing.tracer().start_as_current_span("later") as span:
        assert span.get_span_context().trace_id == int("ab" * 16, 16)
        assert tracing.current_traceparent().startswith("00-" + "ab" * 16)
    assert tracing.current_traceparent() == ""


def test_a_json_log_line_inside_a_span_has_its_trace_and_span_ids() -> None:
    provider()  # dropped spans too: their ids join the logs of one request
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
    assert "trace_id" not in orjson.loads(JsonFormatter().format(record))
    with tracing.tracer().start_as_current_span("x") as span:
        line = orjson.loads(JsonFormatter().format(record))
    context = span.get_span_context()
    assert (line["trace_id"], line["span_id"]) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")


class _Hung(SpanExporter):
    """A collector that never answers."""

    def export(self, spans: object) -> SpanExportResult:
        time.sleep(30)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        pass


def test_shutdown_gives_up_on_a_collector_that_does_not_answer_within_its_deadline() -> None:
    made = TracerProvider(shutdown_on_exit=False)
    made.add_span_processor(BatchSpanProcessor(_Hung()))
    made.get_tracer("t").start_span("pending").end()
    started = time.monotonic()
    tracing.shutdown(made, timeout_s=0.3)
    assert time.monotonic() - started < 2


class _AckingProducer:
    """Just enough of AIOKafkaProducer for publish_all: every send is acknowledged."""

    def __init__(self) -> None:
        self.sent: list[list[tuple[str, bytes]]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future[object]:
        self.sent.append(list(headers or []))
        acked: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        acked.set_result(type("Metadata", (), {"partition": 0, "offset": len(self.sent) - 1})())
        return acked


@pytest.mark.parametrize("recorded", [True, False])
async def test_publish_all_outside_any_span_continues_an_explicit_traceparent(
    recorded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """event_headers carries a given traceparent as is; the produce span continues it
    instead of starting an unrelated trace (recorded, or with no OTEL variable at all)."""
    exporter = InMemorySpanExporter()
    if recorded:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    provider(exporter=exporter)
    given = "00-" + "ab" * 16 + "-" + "cd" * 8 + ("-01" if recorded else "-00")
    producer = _AckingProducer()
    headers = tuple(event_headers("evt_1", "t", "PaymentEvent", traceparent=given))
    await publish_all(producer, [OutgoingMessage("topic", b"k", b"v", headers)])  # type: ignore[arg-type]
    [sent] = producer.sent
    assert dict(sent)["traceparent"].decode().split("-")[1] == "ab" * 16
    if recorded:
        [produce] = exporter.get_finished_spans()
        assert produce.parent is not None and produce.parent.span_id == int("cd" * 8, 16)
        assert dict(sent)["traceparent"].decode() == f"00-{'ab' * 16}-{produce.context.span_id:016x}-01"  # type: ignore[union-attr]
