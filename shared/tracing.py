"""W3C trace context for messages we publish.

`configure` installs an SDK tracer provider (no exporter unless the standard
OTEL_* environment asks for one elsewhere). `current_traceparent` renders the
active span as the `traceparent` header value that goes on every message.
"""

from __future__ import annotations

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider


def configure(service: str) -> None:
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    trace.set_tracer_provider(TracerProvider(resource=Resource.create({"service.name": service})))


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def current_traceparent() -> str:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")
