"""The ingester's HTTP edge with an in-memory publisher.

The publisher here is a recording fake of the `Publisher` port (the real Kafka
adapter is exercised in tests/integration/test_ingest_webhooks.py). It lets
the property test run thousands of requests in seconds and see exactly what
would have been published.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from paymentsvc.dev.samples import SAMPLE_TYPES, sample_event
from paymentsvc.dev.webhooks import encode_event, sign
from services.ingest_webhooks.app import IngestConfig, make_app
from services.ingest_webhooks.verify import SignatureVerifier
from shared.config import Topics
from shared.kafka import OutgoingMessage, PublishFailed

SECRET = "whsec_unit"


class RecordingPublisher:
    def __init__(self) -> None:
        self.sent: list[OutgoingMessage] = []
        self.down = False

    async def publish_all(self, messages: Sequence[OutgoingMessage], timeout_s: float) -> None:
        if self.down:
            raise PublishFailed("down for the test")
        self.sent.extend(messages)


def build(publisher: RecordingPublisher) -> web.Application:
    return make_app(
        SignatureVerifier([SECRET], 300),
        publisher,
        IngestConfig(Topics(), max_body_bytes=64 * 1024, publish_timeout_s=1.0),
    )


@pytest.fixture
async def client_and_publisher():  # type: ignore[no-untyped-def]
    publisher = RecordingPublisher()
    client = TestClient(TestServer(build(publisher)))
    await client.start_server()
    yield client, publisher
    await client.close()


async def test_a_signed_event_is_published_to_both_topics_before_the_200(client_and_publisher) -> None:  # type: ignore[no-untyped-def]
    client, publisher = client_and_publisher
    body = encode_event(sample_event("invoice.paid"))
    response = await client.post(
        "/webhooks/stripe", data=body, headers={"Content-Type": "application/json", "Stripe-Signature": sign(body, SECRET)}
    )
    assert response.status == 200
    assert sorted(m.topic for m in publisher.sent) == ["payment-events", "stripe-raw-events"]


async def test_the_broker_down_gives_503_with_retry_after(client_and_publisher) -> None:  # type: ignore[no-untyped-def]
    client, publisher = client_and_publisher
    publisher.down = True
    body = encode_event(sample_event("charge.refunded"))
    response = await client.post(
        "/webhooks/stripe", data=body, headers={"Content-Type": "application/json", "Stripe-Signature": sign(body, SECRET)}
    )
    assert response.status == 503 and response.headers["Retry-After"]
    assert publisher.sent == []


async def test_a_content_type_with_a_charset_is_accepted(client_and_publisher) -> None:  # type: ignore[no-untyped-def]
    client, _ = client_and_publisher
    body = encode_event(sample_event("charge.succeeded"))
    response = await client.post(
        "/webhooks/stripe",
        data=body,
        headers={"Content-Type": "application/json; charset=utf-8", "Stripe-Signature": sign(body, SECRET)},
    )
    assert response.status == 200


@pytest.mark.parametrize("content_type", [";0*", ";", "/;=", "application/json/x"])
async def test_a_malformed_content_type_is_415_never_500(client_and_publisher, content_type: str) -> None:  # type: ignore[no-untyped-def]
    # ";0*" was found by the property test below: aiohttp's parser raised IndexError (a 500).
    client, publisher = client_and_publisher
    body = encode_event(sample_event("invoice.paid"))
    response = await client.post(
        "/webhooks/stripe", data=body, headers={"Content-Type": content_type, "Stripe-Signature": sign(body, SECRET)}
    )
    assert response.status == 415, await response.text()
    assert (await response.json())["error"] in ("malformed_content_type", "wrong_content_type")
    assert publisher.sent == []


async def test_the_found_content_type_is_rejected_as_malformed(client_and_publisher) -> None:  # type: ignore[no-untyped-def]
    client, _ = client_and_publisher
    response = await client.post("/webhooks/stripe", data=b"{}", headers={"Content-Type": ";0*"})
    assert response.status == 415
    assert await response.json() == {"error": "malformed_content_type", "message": "the Content-Type header is malformed"}


@pytest.mark.parametrize("signature", ["t={now},v1=\u00e9", "t={now},v1=" + "0" * 64 + "\u00ff", "t=\u0661\u0662,v1=00"])
async def test_a_non_ascii_stripe_signature_is_400(client_and_publisher, signature: str) -> None:  # type: ignore[no-untyped-def]
    client, publisher = client_and_publisher
    body = encode_event(sample_event("invoice.paid"))
    header = signature.format(now=int(time.time()))
    response = await client.post(
        "/webhooks/stripe", data=body, headers={"Content-Type": "application/json", "Stripe-Signature": header}
    )
    assert response.status == 400, await response.text()
    assert (await response.json())["error"] == "bad_signature"
    assert publisher.sent == []


headers_strategy = st.dictionaries(
    st.sampled_from(["Stripe-Signature", "Content-Type", "X-Other"]),
    st.one_of(
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255, blacklist_characters="\x7f"), max_size=80),
        st.builds(lambda t: f"t={t},v1=" + "0" * 64, st.integers(0, 2**40)),
        st.just("application/json"),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(st.binary(max_size=2048), st.builds(lambda t: encode_event(sample_event(t)), st.sampled_from(SAMPLE_TYPES))),
    headers=headers_strategy,
)
@example(body=b"{}", headers={"Content-Type": ";0*"})  # found by this test: was a 500
async def test_random_bodies_and_headers_never_crash_never_5xx_and_never_publish_unverified_input(
    client_and_publisher, body: bytes, headers: dict[str, str]  # type: ignore[no-untyped-def]
) -> None:
    client, publisher = client_and_publisher
    publisher.sent.clear()
    response = await client.post("/webhooks/stripe", data=body, headers=headers)
    assert response.status < 500
    assert publisher.sent == [], "nothing unverified is ever published"
    assert response.status in (400, 413, 415)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    event_type=st.sampled_from(SAMPLE_TYPES),
    drop=st.sampled_from(["customer", "id", "created", None]),
)
async def test_signed_events_with_missing_fields_are_always_answered_200_and_archived(
    client_and_publisher, event_type: str, drop: str | None  # type: ignore[no-untyped-def]
) -> None:
    client, publisher = client_and_publisher
    publisher.sent.clear()
    event = sample_event(event_type)
    if drop:
        event["data"]["object"].pop(drop, None)
    body = encode_event(event)
    response = await client.post(
        "/webhooks/stripe",
        data=body,
        headers={"Content-Type": "application/json", "Stripe-Signature": sign(body, SECRET, int(time.time()))},
    )
    assert response.status == 200, await response.text()
    topics = sorted(m.topic for m in publisher.sent)
    if (await response.json())["status"] == "archived_unnormalized":
        assert topics == ["payment-events.dlq", "stripe-raw-events"]
    else:
        assert topics == ["payment-events", "stripe-raw-events"]


@pytest.mark.parametrize("event_type", ["charge.succeeded", "payment_intent.succeeded", "charge.refunded"])
async def test_a_guest_payment_is_published_keyed_by_its_payment_intent(client_and_publisher, event_type: str) -> None:  # type: ignore[no-untyped-def]
    client, publisher = client_and_publisher
    publisher.sent.clear()
    event = sample_event(event_type, payment_intent_id="pi_Guest", charge_id="ch_Guest")
    event["data"]["object"]["customer"] = None
    body = encode_event(event)
    response = await client.post(
        "/webhooks/stripe", data=body, headers={"Content-Type": "application/json", "Stripe-Signature": sign(body, SECRET)}
    )
    assert response.status == 200
    assert {m.topic: m.key for m in publisher.sent}["payment-events"] == b"pi_Guest"
