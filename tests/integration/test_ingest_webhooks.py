"""The webhook ingester against the real broker: what it publishes and what it refuses."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY

from payment.v1 import events_pb2
from paymentsvc.dev.samples import (
    NEW_API_VERSION,
    OLD_API_VERSION,
    dispute_event,
    new_id,
    sample_event,
)
from paymentsvc.dev.webhooks import encode_event, sign
from services.ingest_webhooks.app import IngestConfig, make_app
from services.ingest_webhooks.normalize import DISPUTE_TYPES, PROJECTED_TYPES, normalize
from services.ingest_webhooks.publisher import KafkaPublisher
from services.ingest_webhooks.verify import SignatureVerifier
from shared.config import Topics
from shared.devbroker import DevBroker, ensure_topics
from shared.kafka import make_producer
from tests.kafka_helpers import headers_of, read_topic

pytestmark = pytest.mark.integration

SECRET = "whsec_current_test_secret"
OLD_SECRET = "whsec_previous_test_secret"


@dataclass
class Ingester:
    url: str
    topics: Topics
    bootstrap: str
    session: aiohttp.ClientSession

    async def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:  # type: ignore[type-arg]
        async with self.session.post(self.url, data=body, headers=headers) as response:
            return response.status, await response.json(content_type=None)

    async def post_event(self, event: dict, secret: str = SECRET) -> tuple[int, dict]:  # type: ignore[type-arg]
        body = encode_event(event)
        return await self.post(body, signed_headers(body, secret))


def signed_headers(body: bytes, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    return {"Content-Type": "application/json", "Stripe-Signature": sign(body, secret, timestamp)}


async def start_ingester(bootstrap: str, topics: Topics, publish_timeout_s: float = 10.0) -> AsyncIterator[Ingester]:
    producer = make_producer(bootstrap, request_timeout_ms=int(publish_timeout_s * 1000))
    await producer.start()
    app = make_app(
        SignatureVerifier([SECRET, OLD_SECRET], tolerance_s=300),
        KafkaPublisher(producer),
        IngestConfig(topics, max_body_bytes=1024 * 1024, publish_timeout_s=publish_timeout_s),
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Ingester(str(server.make_url("/webhooks/stripe")), topics, bootstrap, session)
    finally:
        await server.close()
        await producer.stop()


@pytest.fixture
async def ingester(broker: str, topics: Topics) -> AsyncIterator[Ingester]:
    async for ingester in start_ingester(broker, topics):
        yield ingester


async def assert_nothing_published(ingester: Ingester) -> None:
    for topic in (ingester.topics.payment_events, ingester.topics.stripe_raw_events):
        assert await read_topic(ingester.bootstrap, topic, expect=0) == []


async def test_every_projected_type_in_both_api_versions_is_published_as_the_expected_payment_event(
    ingester: Ingester,
) -> None:
    sent: dict[str, tuple[dict, bytes]] = {}  # type: ignore[type-arg]
    for event_type in sorted(PROJECTED_TYPES):
        for version in (OLD_API_VERSION, NEW_API_VERSION):
            event = (
                dispute_event(event_type, api_version=version, charge_id=new_id("ch_"), payment_intent_id=new_id("pi_"))
                if event_type in DISPUTE_TYPES
                else sample_event(event_type, api_version=version)
            )
            body = encode_event(event)
            status, answer = await ingester.post(body, signed_headers(body))
            assert (status, answer["status"]) == (200, "published"), (event_type, version, answer)
            sent[event["id"]] = (event, body)

    published = await read_topic(ingester.bootstrap, ingester.topics.payment_events, expect=len(sent))
    raw = await read_topic(ingester.bootstrap, ingester.topics.stripe_raw_events, expect=len(sent))
    assert len(published) == len(raw) == len(sent)

    for record in published:
        headers = headers_of(record)
        event, _ = sent[headers["event-id"]]
        got = events_pb2.PaymentEvent.FromString(record.value)
        expected = normalize(event)
        assert expected is not None
        for field in events_pb2.PaymentEvent.DESCRIPTOR.fields:
            assert getattr(got, field.name) == getattr(expected, field.name), (event["type"], field.name)
        assert got.event_id == event["id"] and got.event_type == event["type"]
        assert got.created == event["created"]
        if got.event_type in DISPUTE_TYPES:  # no customer on a dispute: keyed by its payment
            assert record.key == got.payment_intent_id.encode() and got.customer_id == ""
        else:
            assert record.key == got.customer_id.encode() and got.customer_id.startswith("cus_")
        assert headers["event-type"] == event["type"]
        assert headers["schema-version"] == "1"
        assert headers["content-type"].startswith("application/x-protobuf")
        assert headers["traceparent"].startswith("00-") and len(headers["traceparent"]) == 55

    for record in raw:
        event, body = sent[headers_of(record)["event-id"]]
        assert record.key == event["id"].encode()
        assert record.value == body, "the archive holds the exact bytes that were verified"


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_that_arrives_in_pieces_is_read_whole(ingester: Ingester, chunked: bool) -> None:
    """A real client's body can come in several TCP segments (or HTTP chunks): the
    signature is checked over all of it, not over the first piece."""
    body = encode_event(sample_event("invoice.paid"))
    host, port = ingester.url.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = "".join(f"{k}: {v}\r\n" for k, v in signed_headers(body).items())
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    writer.write(f"POST /webhooks/stripe HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n{head}\r\n".encode())
    pieces = [body[: len(body) // 2], body[len(body) // 2 :]]
    for n, piece in enumerate(pieces):
        writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
        await writer.drain()
        if n == 0:
            # A pause between the halves so that they reach the server as two reads. It
            # lets a reader that stops at the first piece fail; a correct one cannot.
            await asyncio.sleep(0.2)
    if chunked:
        writer.write(b"0\r\n\r\n")
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 200"), status_line


async def test_a_duplicate_delivery_is_answered_200_and_published_again_for_the_workers_to_dedupe(
    ingester: Ingester,
) -> None:
    event = sample_event("invoice.paid")
    body = encode_event(event)
    for _ in range(2):
        status, answer = await ingester.post(body, signed_headers(body))
        assert (status, answer["event_id"]) == (200, event["id"])
    records = await read_topic(ingester.bootstrap, ingester.topics.payment_events, expect=2)
    assert [headers_of(r)["event-id"] for r in records] == [event["id"], event["id"]]


async def test_an_event_signed_with_the_previous_secret_still_verifies_during_a_rollover(
    ingester: Ingester,
) -> None:
    status, _ = await ingester.post_event(sample_event("charge.succeeded"), secret=OLD_SECRET)
    assert status == 200


async def test_a_type_we_do_not_project_is_archived_but_not_put_on_payment_events(ingester: Ingester) -> None:
    event = sample_event("invoice.paid")
    event["type"] = "customer.tax_id.created"
    status, answer = await ingester.post_event(event)
    assert (status, answer["status"]) == (200, "archived")
    raw = await read_topic(ingester.bootstrap, ingester.topics.stripe_raw_events, expect=1)
    assert [headers_of(r)["event-id"] for r in raw] == [event["id"]]
    assert await read_topic(ingester.bootstrap, ingester.topics.payment_events, expect=0) == []


def unnormalized_count(event_type: str, reason: str) -> float:
    return REGISTRY.get_sample_value(
        "paymentsvc_webhooks_unnormalized_total", {"event_type": event_type, "reason": reason}
    ) or 0.0


async def test_a_verified_event_we_cannot_normalize_is_answered_200_archived_and_dead_lettered(
    ingester: Ingester,
) -> None:
    event = sample_event("invoice.payment_failed")
    del event["data"]["object"]["customer"]  # an invoice always has one: our parser refuses it
    before = unnormalized_count("invoice.payment_failed", "malformed_event")
    status, answer = await ingester.post_event(event)
    assert (status, answer["status"], answer["event_id"]) == (200, "archived_unnormalized", event["id"])
    assert unnormalized_count("invoice.payment_failed", "malformed_event") == before + 1
    dlq = await read_topic(ingester.bootstrap, Topics.dlq(ingester.topics.payment_events), expect=1)
    dead = headers_of(dlq[0])
    assert dead["event-id"] == event["id"] and "customer" in dead["error"]
    assert dead["failed-in"] == "ingest_webhooks"
    assert len(await read_topic(ingester.bootstrap, ingester.topics.stripe_raw_events, expect=1)) == 1
    assert await read_topic(ingester.bootstrap, ingester.topics.payment_events, expect=0) == []


@pytest.mark.parametrize(
    ("body", "reason"), [(b'{"id": "evt_1", ', "malformed_json"), (b"[1, 2]", "not_an_event")]
)
async def test_a_verified_body_that_is_no_event_is_archived_and_dead_lettered_not_refused(
    ingester: Ingester, body: bytes, reason: str
) -> None:
    before = unnormalized_count("unknown", reason)
    status, answer = await ingester.post(body, signed_headers(body))
    assert (status, answer["status"], answer["reason"]) == (200, "archived_unnormalized", reason)
    assert unnormalized_count("unknown", reason) == before + 1
    raw = await read_topic(ingester.bootstrap, ingester.topics.stripe_raw_events, expect=1)
    assert [r.value for r in raw] == [body]
    dlq = await read_topic(ingester.bootstrap, Topics.dlq(ingester.topics.payment_events), expect=1)
    assert dlq[0].value == body and headers_of(dlq[0])["error-class"] == reason


def _bad_requests() -> dict[str, tuple[int, str, bytes, dict[str, str]]]:
    event = sample_event("invoice.paid")
    body = encode_event(event)
    now = int(time.time())
    tampered = body.replace(b'"amount_paid": ', b'"amount_paid": 1')
    huge = encode_event({**event, "padding": "x" * (1024 * 1024)})
    return {
        "missing signature": (400, "missing_signature", body, {"Content-Type": "application/json"}),
        "garbage signature": (400, "bad_signature", body, {"Content-Type": "application/json", "Stripe-Signature": "nonsense"}),
        "unknown secret": (400, "bad_signature", body, signed_headers(body, "whsec_someone_else")),
        "stale timestamp": (400, "stale_timestamp", body, signed_headers(body, timestamp=now - 301)),
        "future timestamp": (400, "future_timestamp", body, signed_headers(body, timestamp=now + 900)),
        "tampered body": (400, "bad_signature", tampered, signed_headers(body)),
        "not utf-8": (400, "not_utf8", b'{"id": "\xff"}', {"Content-Type": "application/json", "Stripe-Signature": "t=1,v1=00"}),
        "huge body": (413, "body_too_large", huge, signed_headers(huge)),
        "wrong content type": (415, "wrong_content_type", body, {**signed_headers(body), "Content-Type": "text/plain"}),
    }


@pytest.mark.parametrize("case", sorted(_bad_requests()))
async def test_bad_input_gets_a_clear_4xx_and_publishes_nothing(ingester: Ingester, case: str) -> None:
    expected_status, reason, body, headers = _bad_requests()[case]
    status, answer = await ingester.post(body, headers)
    assert (status, answer["error"]) == (expected_status, reason)
    assert SECRET not in json.dumps(answer) and body[:200].decode(errors="ignore") not in answer["message"]
    await assert_nothing_published(ingester)


async def test_another_method_gets_405(ingester: Ingester) -> None:
    async with ingester.session.get(ingester.url) as response:
        assert response.status == 405


async def test_a_broker_that_does_not_answer_gets_503_and_the_same_delivery_succeeds_once_it_is_back() -> None:
    async with DevBroker() as private:
        topics = Topics(prefix="outage.")
        await ensure_topics(private.bootstrap_servers, topics.all(), partitions=1)
        async for ingester in start_ingester(private.bootstrap_servers, topics, publish_timeout_s=1.5):
            event = sample_event("invoice.payment_failed")
            body = encode_event(event)
            private.pause()
            try:
                started = time.monotonic()
                status, answer = await ingester.post(body, signed_headers(body))
                assert (status, answer["error"]) == (503, "unavailable")
                assert time.monotonic() - started < 5, "the 503 comes within the bounded time"
            finally:
                private.resume()
            status, _ = await ingester.post(body, signed_headers(body))
            assert status == 200
            records = await read_topic(private.bootstrap_servers, topics.payment_events, expect=1)
            assert event["id"] in {headers_of(r)["event-id"] for r in records}
