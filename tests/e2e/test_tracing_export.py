"""Tracing as production runs it: `paymentsvc serve` processes configured only by OTEL_*
variables export one webhook's trace over OTLP to a receiver of this test, and their
JSON log lines carry its ids.

Real processes (the ingester and the entitlements worker) on the session's broker, a
fresh database and a private redis-server; the receiver decodes OTLP/HTTP protobuf.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from paymentsvc.dev.samples import sample_event
from paymentsvc.dev.webhooks import encode_event
from shared.config import Topics
from tests.e2e.test_sigterm import SECRET, environment, service
from tests.integration.test_ingest_webhooks import signed_headers
from tests.support.processes import PrivateRedis
from tests.support.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


class Receiver:
    """An OTLP/HTTP trace receiver: (service.name, span name, trace id hex) of every span."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []
        self.url = ""

    async def export(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in message.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append((attributes.get("service.name", ""), span.name, span.trace_id.hex()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    def of(self, trace_id: str) -> set[tuple[str, str]]:
        return {(svc, name) for svc, name, trace in self.spans if trace == trace_id}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", found.export)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    found.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield found
    finally:
        await runner.cleanup()


async def test_served_processes_export_one_webhooks_trace_over_otlp_and_log_its_ids(
    receiver: Receiver, broker: str, topics: Topics, database_url: str, private_redis: PrivateRedis, tmp_path: Path,
) -> None:
    env = environment(broker, topics, database_url, private_redis.url) | {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "200", "LOG_FORMAT": "json", "SHUTDOWN_DELAY_S": "0",
    }
    ingester, worker = service("ingest_webhooks", env, tmp_path), service("entitlements", env, tmp_path)
    trace_id = secrets.token_hex(16)
    header = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    try:
        for s in (ingester, worker):
            s.start()
        await asyncio.gather(*(asyncio.to_thread(s.wait_ready) for s in (ingester, worker)))
        url = f"http://127.0.0.1:{env['INGEST_PORT']}/webhooks/stripe"
        body = encode_event(sample_event("customer.subscription.created"))
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=body, headers=signed_headers(body, SECRET) | {"traceparent": header}) as r:
                assert r.status == 200, await r.text()
            # A bad signature is answered inside the request span too, and logged there.
            async with session.post(url, data=body, headers=signed_headers(body, "whsec_wrong") | {"traceparent": header}) as r:
                assert r.status == 400

        expected = {
            ("paymentsvc-ingest_webhooks", "POST /webhooks/stripe"),
            ("paymentsvc-ingest_webhooks", f"send {topics.payment_events}"),
            ("paymentsvc-entitlements", f"process {topics.payment_events}"),
            ("paymentsvc-entitlements", "entitlements transaction"),
        }
        await eventually(lambda: expected <= receiver.of(trace_id), timeout=60,
                         what=f"the spans of trace {trace_id} at the receiver")
    finally:
        for s in (ingester, worker):
            s.stop()
    rejected = [json.loads(line) for line in ingester.log_path.read_text().splitlines()
                if line.startswith("{") and '"webhook rejected"' in line]
    assert rejected and rejected[-1]["trace_id"] == trace_id and len(rejected[-1]["span_id"]) == 16, rejected
