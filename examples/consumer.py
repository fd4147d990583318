"""A downstream consumer of `payment-events`, written the way another team would write it.

It knows only the published contract (docs/asyncapi.yaml): the topic, the protobuf
schema (proto/payment/v1/events.proto, compiled to `payment.v1.events_pb2`) and the
CloudEvents headers, read with the CloudEvents SDK. It imports nothing of the service.

- Its own consumer group, so it reads every event without taking any from our workers.
- Delivery is at least once: the same event can arrive twice (a producer retry, a
  re-publish). A duplicate has the same `ce_id`, and is skipped.
- Offsets are committed after the batch is handled, never before: a crash in between
  delivers the batch again, and the duplicate check absorbs it.
- Order holds per key (one customer's events), not across partitions; `ce_time` says
  when an event happened, for a handler that must not let older news overwrite newer.

Run it against the dev stack (`make dev` prints where each part listens):

    python examples/consumer.py --bootstrap 127.0.0.1:9092 --group billing-emails
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.structs import OffsetAndMetadata
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary
from cloudevents.core.formats.json import JSONFormat

from payment.v1 import events_pb2

log = logging.getLogger("example-consumer")


@dataclass(frozen=True, slots=True)
class Received:
    """One event as this team sees it: the CloudEvents attributes and the decoded payload."""

    id: str
    source: str
    type: str
    time: datetime | None
    key: str
    event: events_pb2.PaymentEvent


Handler = Callable[[Received], Awaitable[None]]


class SeenIds:
    """The ids handled lately, to skip duplicates.

    In memory and bounded, which is enough for an example: duplicates arrive close
    together (a retry, a redelivery after a crash). A consumer whose effect is a
    database write records `(ce_source, ce_id)` in the same transaction instead, so
    the check survives its restarts.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self._ids: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._capacity = capacity

    def __contains__(self, identity: tuple[str, str]) -> bool:
        return identity in self._ids

    def add(self, identity: tuple[str, str]) -> None:
        self._ids[identity] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)


def decode(record: ConsumerRecord) -> Received | None:
    """The record as a CloudEvent with its PaymentEvent; None (logged) when it is not one.

    Skipping is this example's policy for a record it cannot read; a team that must not
    miss one would dead-letter it, or stop.
    """
    headers = {name: value for name, value in record.headers or ()}
    where = f"{record.topic}[{record.partition}]@{record.offset}"
    if "ce_id" not in headers:
        log.warning("skipped %s: no CloudEvents headers", where)
        return None
    # The SDK reads the attributes (ce_* and content-type); the data is protobuf, which
    # its JSON format does not decode, so the value is parsed with the generated class.
    try:
        cloudevent = from_binary(KafkaMessage(headers, record.key, record.value or b""), JSONFormat())
        event = events_pb2.PaymentEvent.FromString(record.value or b"")
    except Exception as exc:  # the SDK's validation errors, protobuf's DecodeError: unreadable either way
        log.warning("skipped %s: %s: %s", where, type(exc).__name__, exc)
        return None
    key = record.key.decode() if record.key else ""
    return Received(cloudevent.get_id(), cloudevent.get_source(), cloudevent.get_type(), cloudevent.get_time(), key, event)


async def consume(bootstrap: str, topic: str, group: str, handle: Handler, stop: asyncio.Event) -> None:
    """Handle every event of `topic` once per group until `stop` is set.

    A batch's records of one partition are handled in order, then that partition's
    offset is committed. If `handle` raises, the error propagates with the partition's
    records uncommitted: whoever consumes it next starts again from the last commit.
    """
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # a new group starts from the beginning of the log
        client_id=f"{group}-consumer",
    )
    seen = SeenIds()
    await consumer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=500, max_records=500)
            for tp, records in batch.items():
                for record in records:
                    received = decode(record)
                    if received is None or (received.source, received.id) in seen:
                        continue
                    await handle(received)
                    seen.add((received.source, received.id))
                await consumer.commit({tp: OffsetAndMetadata(records[-1].offset + 1, "")})
    finally:
        await consumer.stop()


async def print_event(received: Received) -> None:
    """The example's handling: one JSON line per event."""
    e = received.event
    line = {
        "id": received.id, "type": received.type, "time": received.time.isoformat() if received.time else None,
        "customer": e.customer_id, "user": e.user_id, "status": e.status, "amount": e.amount, "currency": e.currency,
    }
    print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    parser.add_argument("--topic", default="payment-events")
    parser.add_argument("--group", default="example-consumer", help="this team's consumer group")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await consume(args.bootstrap, args.topic, args.group, print_event, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
