"""The headers of our Kafka records, built the cheaper way (issue 13), are the bytes the
earlier code built: `ce_time` of whole milliseconds from the second's text, the constant
parts encoded once, the produce span's trace headers injected from an explicit context
instead of a current one (`reference_traced_headers`: the code as it was)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

from shared import kafka, tracing
from shared.kafka import CE_SOURCES, OutgoingMessage
from tests.unit.test_usage_event_bytes import reference_event_headers, reference_rfc3339


def reference_traced_headers(messages: Sequence[OutgoingMessage]) -> tuple[list[Any], list[list[Any]]]:
    current = trace.get_current_span()
    if not current.is_recording() and current.get_span_context().is_valid:
        return [], [list(m.headers) for m in messages]
    outside = not current.get_span_context().is_valid
    spans, headers = [], []
    for m in messages:
        carried = tracing.extract_headers(m.headers) if outside else None
        if carried is not None and not trace.get_current_span(carried).get_span_context().is_valid:
            carried = None
        span = kafka._produce_span(m.topic, carried)
        spans.append(span)
        if carried is not None and not span.get_span_context().is_valid:
            headers.append(list(m.headers))
            continue
        with trace.use_span(span, end_on_exit=False):
            headers.append(list(tracing.with_trace_headers(m.headers)))
    return spans, headers


# ---------------------------------------------------------------- headers


def test_ce_time_of_whole_milliseconds_is_rfc3339_as_before() -> None:
    rng = random.Random(13)
    samples = [rng.randrange(1, 2**32 * 1000) for _ in range(20_000)]
    samples += [1, 999, 1000, 1001, 59_999, 86_400_000, 1_900_000_000_000, 1_900_000_000_700, 2**32 * 1000 - 1,
                2**32 * 1000, 2**32 * 1000 + 1, 253_402_214_400_123]
    for ms in samples:
        assert kafka.ce_time(ms / 1000) == reference_rfc3339(ms / 1000).encode(), ms
    for seconds in [1_900_000_000.1234, 1_900_000_000.0001, 1e-4, 0.5, -1.5, 1_900_000_000, 1]:
        assert kafka.ce_time(seconds) == reference_rfc3339(seconds).encode(), seconds
    now = kafka.ce_time(0.0).decode()
    assert abs(datetime.fromisoformat(now.replace("Z", "+00:00")).timestamp() - time.time()) < 5


@pytest.mark.parametrize("message", sorted(CE_SOURCES))
def test_event_headers_are_the_ones_built_before_for_every_message(message: str) -> None:
    for event_type, occurred_at in [("usage.recorded", 1_900_000_000.7), ("charge.succeeded", 1_900_000_000),
                                    ("t", 1_900_000_000.123456), ("x.y", 1_900_000_000.0)]:
        for trace_ in (None, [("traceparent", b"00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-01")]):
            random.seed(7)
            built = kafka.event_headers("evt_1", event_type, message, occurred_at=occurred_at, trace=trace_)
            random.seed(7)
            expected = reference_event_headers("evt_1", event_type, message, occurred_at)
            if trace_ is not None:
                expected = [h for h in expected if h[0] != "traceparent"]
                expected[4:4] = trace_
            assert built == expected


# ---------------------------------------------------------------- trace headers of the produce span


@pytest.fixture
def restore_tracer(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(tracing, "_tracer", tracing.tracer())
    yield


def _tracer(kind: str) -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    if kind == "none":  # no provider at all: what the ProxyTracer hands every call to
        return trace.NoOpTracer(), exporter
    sampler = ParentBased(ALWAYS_OFF) if kind == "unsampled" else ALWAYS_ON
    provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


CALLER = f"00-{'ab' * 16}-{'cd' * 8}-01"


@pytest.mark.parametrize("kind", ["none", "unsampled", "recording"])
@pytest.mark.parametrize("where", ["outside any span", "in a span", "in a caller's span"])
@pytest.mark.parametrize("given", ["", CALLER, "00-" + "0" * 32 + "-" + "cd" * 8 + "-01", "garbage"])
def test_the_produce_spans_headers_are_the_ones_use_span_gave(
    kind: str, where: str, given: str, restore_tracer: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracer, exporter = _tracer(kind)
    monkeypatch.setattr(tracing, "_tracer", tracer)
    parent: Context | None = None
    if where == "in a caller's span":
        parent = tracing.extract_headers({"traceparent": CALLER})
    built: list[Any] = []
    for reference in (False, True):
        random.seed(11)  # our fresh traceparents and the SDK's ids alike
        span = tracer.start_span("call", context=parent) if where != "outside any span" else None
        token = tracing.activate(span) if span is not None else None
        try:
            headers = tuple(kafka.event_headers("evt_1", "usage.recorded", "UsageEvent", given,
                                                occurred_at=1_900_000_000.5))
            messages = [OutgoingMessage("usage-events", b"k", b"v", headers), OutgoingMessage("t2", None, b"", headers)]
            spans, out = (reference_traced_headers if reference else kafka.traced_headers)(messages)
            built.append((out, [s.get_span_context() for s in spans], [s.is_recording() for s in spans]))
            for s in spans:
                s.end()
        finally:
            if token is not None:
                tracing.deactivate(token)
            if span is not None:
                span.end()
    assert built[0] == built[1]
    assert [s.name for s in exporter.get_finished_spans()].count("send usage-events") in (0, 2)
