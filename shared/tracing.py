"""OpenTelemetry tracing: one setup per process, and the W3C context on our messages.

`setup` is called once by the composition root (paymentsvc/runner.py) and reads only
the standard variables:

- `OTEL_SDK_DISABLED=true`: the API's no-op provider. No span ids are made; a message
  carries the incoming `traceparent` unchanged, or a fresh one (`trace_headers`).
- the exporter: `OTEL_TRACES_EXPORTER` (`otlp`, `console`, `none`); unset, `otlp` if
  `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, else
  none. `OTEL_EXPORTER_OTLP_PROTOCOL` picks `grpc` (default) or `http/protobuf`; the
  exporter reads its own `OTEL_EXPORTER_OTLP_*` variables (headers, timeout, ...).
- with no exporter nothing is exported, and the sampler is `parentbased_always_off`: a
  trace that starts here is dropped (non-recording spans: a request costs an id and a
  context switch, not a span, while the ids still travel in the headers and the JSON
  logs, `shared/logs.py`), and a caller's sampling decision is kept and passed on, so
  downstream services that trace still see the trace their caller chose to sample;
- with an exporter, `OTEL_TRACES_SAMPLER` (+ `_ARG`), default `parentbased_always_on`;
  `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` name the resource (default
  service name: `paymentsvc-<service>`); `OTEL_BSP_*` tune the batch processor.

Context crosses Kafka in the message headers `traceparent`/`tracestate` through the
global propagator (`OTEL_PROPAGATORS`, W3C trace context by default), and crosses the
database as a `traceparent` string (`current_traceparent`, `continued`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, Tracer

from shared.errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("tracing")

TRACE_HEADERS = ("traceparent", "tracestate")
_INSTRUMENTATION = "paymentsvc"
# A ProxyTracer: it creates no provider, and follows the global one once `setup` sets it.
_tracer: Tracer = trace.get_tracer(_INSTRUMENTATION)

__all__ = [
    "Link", "SpanKind", "TRACE_HEADERS", "activate", "continued", "current_traceparent", "deactivate",
    "extract_headers", "Status", "StatusCode", "links_of", "setup", "shutdown", "trace_headers", "tracer",
    "with_trace_headers",
]


def tracer() -> Tracer:
    """The tracer every span of ours comes from."""
    return _tracer


def _env(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def setup(service: str, *, exporter: object | None = None, install_global: bool = True) -> TracerProvider | None:
    """Configure tracing for this process from the OTEL_* variables; see the module doc.

    `exporter` (a SpanExporter, e.g. the SDK's InMemorySpanExporter in tests) is used
    instead of the one the variables name, through a SimpleSpanProcessor. Returns the
    provider (None when the SDK is disabled). Call it once per process, before serving;
    `install_global=False` leaves the OTel global provider alone (tests that call it
    more than once: the global can be set only once per process).
    """
    global _tracer
    environ = os.environ  # the SDK's own readers (sampler, resource, exporter) read it too
    if _env(environ, "OTEL_SDK_DISABLED").lower() == "true":
        return None
    # Imported here: a process that never sets tracing up never loads the SDK.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, _get_from_env_or_default

    attributes = {} if _env(environ, "OTEL_SERVICE_NAME") else {SERVICE_NAME: f"paymentsvc-{service}"}
    chosen = exporter if exporter is not None else _exporter_from_env(environ)
    # Nothing exported: drop the traces that start here (non-recording spans still carry
    # ids), but keep a caller's decision: ALWAYS_OFF would turn its sampled flag to 00 on
    # every message we publish, and parent-based consumers downstream would drop it.
    sampler = _get_from_env_or_default() if chosen is not None else ParentBased(ALWAYS_OFF)
    # shutdown_on_exit=False: `shutdown` below bounds the final export; the SDK's own exit
    # hook would wait for an unreachable collector again.
    provider = TracerProvider(sampler=sampler, resource=Resource.create(attributes), shutdown_on_exit=False)
    if isinstance(chosen, SpanExporter):
        processor = SimpleSpanProcessor(chosen) if exporter is not None else BatchSpanProcessor(chosen)
        provider.add_span_processor(processor)
    if install_global:
        trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer(_INSTRUMENTATION)
    log.debug("tracing set up", extra={"exporter": type(chosen).__name__ if chosen else "none",
                                       "sampler": sampler.get_description()})
    return provider


def shutdown(provider: TracerProvider, timeout_s: float = 2.0) -> None:
    """Export what is still batched, for at most `timeout_s`: a collector that does not
    answer must not hold a stopping process past its grace period (the exporter alone
    retries for about 7 s). Spans not exported by then are lost, and logged as such."""
    worker = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("spans not exported within the shutdown deadline; dropped", extra={"deadline_s": timeout_s})


def _exporter_from_env(environ: Mapping[str, str]) -> object | None:
    kind = _env(environ, "OTEL_TRACES_EXPORTER").lower()
    if not kind:
        endpoint = _env(environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")
        kind = "otlp" if endpoint else "none"
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind != "otlp":
        raise ConfigurationError(f"OTEL_TRACES_EXPORTER={kind!r} is not supported here: use otlp, console or none")
    protocol = (_env(environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env(environ, "OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
    return OTLPSpanExporter()


# ---------------------------------------------------------------- propagation


def _fresh_traceparent() -> str:
    # No context at all (the SDK disabled, or code outside any span): still give the
    # message a trace id of its own so its consumers can correlate their logs.
    # random.getrandbits, as the SDK's own id generator: os.urandom is a system call each.
    return f"00-{random.getrandbits(128) or 1:032x}-{random.getrandbits(64) or 1:016x}-00"


def trace_headers(traceparent: str = "", context: otel_context.Context | None = None) -> list[tuple[str, bytes]]:
    """`traceparent` (and `tracestate` when there is one) of `context` (default: the current
    one), through the global propagator; `traceparent` given explicitly is carried as is."""
    if traceparent:
        return [("traceparent", traceparent.encode())]
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    if "traceparent" not in carrier:
        carrier["traceparent"] = _fresh_traceparent()
    return [(name, carrier[name].encode()) for name in TRACE_HEADERS if name in carrier]


def with_trace_headers(
    headers: Sequence[tuple[str, bytes]], context: otel_context.Context | None = None
) -> tuple[tuple[str, bytes], ...]:
    """`headers` with their trace context replaced by `context`'s (default: the current one;
    a produce span's)."""
    kept = tuple(h for h in headers if h[0] not in TRACE_HEADERS)
    return kept + tuple(trace_headers(context=context))


class _HeaderGetter(Getter[Mapping[str, bytes | str]]):
    """Reads Kafka headers (bytes values, or str for HTTP/gRPC metadata)."""

    def get(self, carrier: Mapping[str, bytes | str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        return [value.decode("latin-1") if isinstance(value, bytes) else value]

    def keys(self, carrier: Mapping[str, bytes | str]) -> list[str]:
        return list(carrier)


_GETTER = _HeaderGetter()


def extract_headers(headers: Mapping[str, bytes | str] | Sequence[tuple[str, bytes | str]]) -> otel_context.Context:
    """The context a message's (or request's) headers carry; an empty one if none."""
    carrier = headers if isinstance(headers, Mapping) else dict(headers)
    return propagate.extract(carrier, getter=_GETTER)


def links_of(header_sets: Sequence[Sequence[tuple[str, bytes]]]) -> list[Link]:
    """One link per message that carries a valid context (messaging batch conventions)."""
    links = []
    for headers in header_sets:
        span_context = trace.get_current_span(extract_headers(headers)).get_span_context()
        if span_context.is_valid:
            links.append(Link(span_context))
    return links


def current_traceparent() -> str:
    """The current context as a `traceparent` string ('' outside a valid span), to store."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def activate(span: trace.Span) -> object:
    """Make `span` the current one; pass the token to `deactivate`. What
    `start_as_current_span` does without its two generator-based context managers
    (about 1.5 µs per RPC, interceptors.py)."""
    return otel_context.attach(trace.set_span_in_context(span))


def deactivate(token: object) -> None:
    otel_context.detach(token)  # type: ignore[arg-type]


@contextlib.contextmanager
def continued(traceparent: str | None) -> Iterator[None]:
    """Make a stored `traceparent` the current context (nothing when empty or invalid)."""
    if not traceparent:
        yield
        return
    token = otel_context.attach(extract_headers({"traceparent": traceparent}))
    try:
        yield
    finally:
        otel_context.detach(token)
