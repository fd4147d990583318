"""examples/consumer.py's decoding of one record: what it reads and what it skips."""

from __future__ import annotations

from aiokafka import ConsumerRecord

from examples.consumer import decode
from payment.v1 import events_pb2
from shared.kafka import event_headers


def record(value: bytes, headers: list[tuple[str, bytes]]) -> ConsumerRecord:  # type: ignore[type-arg]
    return ConsumerRecord(
        topic="payment-events", partition=0, offset=7, timestamp=0, timestamp_type=0, key=b"cus_1", value=value,
        checksum=None, serialized_key_size=5, serialized_value_size=len(value), headers=headers,
    )


def test_a_record_with_our_headers_is_read_as_a_cloudevent_with_its_payment_event() -> None:
    event = events_pb2.PaymentEvent(event_id="evt_1", event_type="invoice.paid", customer_id="cus_1", created=1_700_000_000)
    headers = event_headers(event.event_id, event.event_type, "PaymentEvent", occurred_at=event.created)

    received = decode(record(event.SerializeToString(), headers))

    assert received is not None
    assert (received.id, received.type, received.key) == ("evt_1", "payment.v1.PaymentEvent.invoice.paid", "cus_1")
    assert received.time is not None and received.time.timestamp() == 1_700_000_000
    assert received.event == event


def test_a_record_without_cloudevents_headers_or_with_an_undecodable_value_is_skipped() -> None:
    assert decode(record(b"", [("event-id", b"evt_1")])) is None
    headers = event_headers("evt_2", "invoice.paid", "PaymentEvent")
    assert decode(record(b"\xff\xff\xff", headers)) is None
    bad_time = [(k, b"yesterday" if k == "ce_time" else v) for k, v in headers]
    assert decode(record(b"", bad_time)) is None
