"""Every message on our topics is a CloudEvent in Kafka binary mode (docs/asyncapi.yaml).

Each producer path publishes to the real broker, and the records are read back with the
CloudEvents SDK's own Kafka binding (`cloudevents.core.bindings.kafka.from_binary`), as a
downstream team would, not with our header code. The existing headers stay as they were.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary
from cloudevents.core.formats.json import JSONFormat

from payment.v1 import events_pb2
from paymentsvc.dev.samples import new_id, sample_event
from paymentsvc.dev.webhooks import encode_event
from services.api_grpc.commands import KafkaEventBus
from services.api_grpc.usage import KafkaUsageBus
from services.dunning.events import KafkaPublisher as DunningPublisher
from shared.config import Topics
from shared.consumer import KafkaDeadLetters
from shared.worker import DeadLetter, RawMessage
from tests.integration.test_ingest_webhooks import Ingester, signed_headers, start_ingester
from tests.kafka_helpers import headers_of, read_topic

pytestmark = pytest.mark.integration

OUR_HEADERS = {"event-id", "event-type", "schema-version", "content-type", "traceparent"}


@pytest.fixture
async def ingester(broker: str, topics: Topics) -> AsyncIterator[Ingester]:
    async for ingester in start_ingester(broker, topics):
        yield ingester


def cloudevent(record: ConsumerRecord) -> BaseCloudEvent:
    """The record as the CloudEvents SDK reads it (binary mode: attributes in `ce_` headers)."""
    names = [name for name, _ in record.headers]
    assert len(names) == len(set(names)), f"a header appears twice: {names}"
    return from_binary(KafkaMessage(dict(record.headers), record.key, record.value), JSONFormat())


def assert_cloudevent(
    record: ConsumerRecord, *, id: str, source: str, type: str, time: datetime, content_type: str
) -> None:
    event = cloudevent(record)
    assert event.get_specversion() == "1.0"
    assert (event.get_id(), event.get_source(), event.get_type()) == (id, source, type)
    assert event.get_time() == time
    assert event.get_datacontenttype() == content_type
    assert headers_of(record)["ce_time"].endswith("Z")  # RFC 3339 in UTC, as the spec's examples


def at(unix_seconds: float) -> datetime:
    return datetime.fromtimestamp(unix_seconds, UTC)


async def test_the_ingesters_payment_event_and_raw_event_are_cloudevents_of_the_stripe_event(
    ingester: Ingester,
) -> None:
    created = int(time.time()) - 3600
    event = sample_event("invoice.paid", created=created)
    body = encode_event(event)
    status, _ = await ingester.post(body, signed_headers(body))
    assert status == 200

    [published] = await read_topic(ingester.bootstrap, ingester.topics.payment_events, expect=1)
    assert_cloudevent(
        published, id=event["id"], source="/paymentsvc/payment-events", type="payment.v1.PaymentEvent.invoice.paid",
        time=at(created), content_type="application/x-protobuf; messageType=payment.v1.PaymentEvent",
    )
    assert OUR_HEADERS <= set(headers_of(published))
    assert headers_of(published)["event-id"] == event["id"]
    assert events_pb2.PaymentEvent.FromString(published.value).event_id == event["id"]

    [raw] = await read_topic(ingester.bootstrap, ingester.topics.stripe_raw_events, expect=1)
    assert_cloudevent(
        raw, id=event["id"], source="/paymentsvc/stripe-raw-events", type="stripe.event.invoice.paid",
        time=at(created), content_type="application/json",
    )
    assert cloudevent(raw).get_data() == event  # JSON data: the SDK decodes it itself


async def test_a_body_that_is_not_an_event_is_archived_and_dead_lettered_as_a_cloudevent_of_its_digest(
    ingester: Ingester,
) -> None:
    body = b"this is not json"
    before = datetime.now(UTC).replace(microsecond=0)
    status, answer = await ingester.post(body, signed_headers(body))
    assert (status, answer["status"]) == (200, "archived_unnormalized")

    [raw] = await read_topic(ingester.bootstrap, ingester.topics.stripe_raw_events, expect=1)
    [dead] = await read_topic(ingester.bootstrap, ingester.topics.dlq(ingester.topics.payment_events), expect=1)
    for record in (raw, dead):
        ce = cloudevent(record)
        assert ce.get_id() == record.key.decode() and ce.get_id().startswith("sha256:")
        assert ce.get_type() == "stripe.event.unparsed"
        assert ce.get_source() == "/paymentsvc/stripe-raw-events"
        time_ = ce.get_time()
        assert time_ is not None and before <= time_ <= datetime.now(UTC)  # received now
    assert headers_of(dead)["error-class"] == "malformed_json"


async def test_api_commands_usage_and_dunning_messages_are_cloudevents(
    producer: AIOKafkaProducer, topics: Topics, broker: str
) -> None:
    created = 1_700_000_000
    command = events_pb2.PaymentEvent(
        event_id=new_id("api_"), event_type="payment.status_updated", customer_id=new_id("cus_"), created=created,
        source=events_pb2.EVENT_SOURCE_API,
    )
    await KafkaEventBus(producer, topics.payment_events).publish(command, "", timeout=10)
    usage = events_pb2.UsageEvent(event_id=new_id("use_"), subject_id=new_id("user_"), amount=3, created_ms=created * 1000 + 250)
    await KafkaUsageBus(producer, topics.usage_events).publish(usage, timeout=10)
    dunning = DunningPublisher(producer, topics)
    notice = events_pb2.DunningEvent(
        event_id=new_id("dun_"), kind=events_pb2.DunningEvent.CASE_OPENED, customer_id=command.customer_id, created=created + 1
    )
    await dunning.notices([notice])
    decision = events_pb2.PaymentEvent(
        event_id=new_id("dun_"), event_type="dunning.escalated", customer_id=command.customer_id, created=created + 2,
        source=events_pb2.EVENT_SOURCE_DUNNING,
    )
    await dunning.decision(decision)

    payments = {r.value: r for r in await read_topic(broker, topics.payment_events, expect=2)}
    protobuf = "application/x-protobuf; messageType=payment.v1.{}".format
    assert_cloudevent(
        payments[command.SerializeToString()], id=command.event_id, source="/paymentsvc/payment-events",
        type="payment.v1.PaymentEvent.payment.status_updated", time=at(created), content_type=protobuf("PaymentEvent"),
    )
    assert_cloudevent(
        payments[decision.SerializeToString()], id=decision.event_id, source="/paymentsvc/payment-events",
        type="payment.v1.PaymentEvent.dunning.escalated", time=at(created + 2), content_type=protobuf("PaymentEvent"),
    )
    [used] = await read_topic(broker, topics.usage_events, expect=1)
    assert_cloudevent(
        used, id=usage.event_id, source="/paymentsvc/usage-events", type="payment.v1.UsageEvent.usage.recorded",
        time=at(created + 0.25), content_type=protobuf("UsageEvent"),
    )
    [opened] = await read_topic(broker, topics.dunning_events, expect=1)
    assert_cloudevent(
        opened, id=notice.event_id, source="/paymentsvc/dunning-events", type="payment.v1.DunningEvent.CASE_OPENED",
        time=at(created + 1), content_type=protobuf("DunningEvent"),
    )
    for record in [*payments.values(), used, opened]:
        assert OUR_HEADERS <= set(headers_of(record))


async def test_a_workers_dead_letter_is_the_original_cloudevent_with_error_headers(
    producer: AIOKafkaProducer, topics: Topics, broker: str
) -> None:
    """A re-driven dead letter keeps its source and id, so consumers deduplicate it."""
    event = events_pb2.PaymentEvent(event_id=new_id("evt_"), event_type="invoice.paid", customer_id="cus_1", created=1_700_000_000)
    await KafkaEventBus(producer, topics.payment_events).publish(event, "", timeout=10)
    [original] = await read_topic(broker, topics.payment_events, expect=1)
    message = RawMessage(
        original.topic, original.partition, original.offset, original.key, original.value, tuple(original.headers)
    )
    await KafkaDeadLetters(producer).send([DeadLetter(message, "invalid by the contract", "invalid")], "test-consumer")

    [dead] = await read_topic(broker, topics.dlq(topics.payment_events), expect=1)
    assert cloudevent(dead).get_attributes() == cloudevent(original).get_attributes()
    assert headers_of(dead)["error-class"] == "invalid"
