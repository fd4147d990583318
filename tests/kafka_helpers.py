"""Reading topics back in tests, without a consumer group (joins take ~5 s on Tansu)."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from tests.support.wait import eventually  # re-exported: one way to wait for a condition

__all__ = ["eventually", "headers_of", "read_topic"]


async def read_topic(bootstrap: str, topic: str, *, expect: int, timeout: float = 15.0) -> list[ConsumerRecord]:
    """Every record of `topic` from offset 0, waiting until at least `expect` arrived.

    With expect=0 it reads for a short while and returns what is there, to show absence.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if partitions is None:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - no public way
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if expect == 0:
            # Absence: the log end offsets say it at once, no need to poll.
            ends = await consumer.end_offsets(tps)
            if not any(ends.values()):
                return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + (timeout if expect else 1.5)
        while time.monotonic() < deadline and (expect == 0 or len(records) < expect):
            batch = await consumer.getmany(timeout_ms=200)
            for messages in batch.values():
                records.extend(messages)
        return records
    finally:
        await consumer.stop()


def headers_of(record: ConsumerRecord) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


