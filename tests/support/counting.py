"""A test projection that counts how often each event was applied.

`applied(event_id, times)`: times must end at 1 for every event, whatever
crashed or was redelivered. Runs in-process, or as a worker process:

    python -m tests.support.counting BOOTSTRAP TOPIC DATABASE_URL
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import psycopg

from shared.consumer import BatchHealth, KafkaDeadLetters, LogCheck, LoopPolicy, run_live
from shared.db import make_pool
from shared.kafka import make_producer
from shared.projection import ApplyContext, Envelope, PoisonEvent
from shared.worker import BatchProcessor

SCHEMA = "CREATE TABLE IF NOT EXISTS applied (event_id text PRIMARY KEY, times int NOT NULL, pid int NOT NULL)"


class CountingProjection:
    name = "test-counter"
    # While set, an event with "bug": true raises a plain exception: a bug of ours, not poison.
    bug_active = False

    def decode(self, value: bytes, headers: dict[str, bytes]) -> tuple[str, str, dict[str, Any]]:
        body = json.loads(value)
        return str(body["id"]), "test", body

    async def apply(self, conn: psycopg.AsyncConnection[Any], events: list[Envelope[dict[str, Any]]], ctx: ApplyContext) -> None:
        import os

        for e in events:
            if e.message.get("poison"):
                raise PoisonEvent(e.event_id, "poison on purpose")
            if e.message.get("bug") and CountingProjection.bug_active:
                raise KeyError("a bug on purpose")
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO applied (event_id, times, pid) VALUES (%s, 1, %s) "
                "ON CONFLICT (event_id) DO UPDATE SET times = applied.times + 1",
                [(e.event_id, os.getpid()) for e in events],
            )

    async def after_commit(self, result: Any, ctx: ApplyContext) -> None:
        return None


async def run_worker(
    bootstrap: str, topic: str, database_url: str, stop: asyncio.Event, session_timeout_ms: int = 6000,
    health: BatchHealth | None = None, log_check: LogCheck | None = None,
) -> None:
    pool = make_pool(database_url, max_size=2)
    await pool.open(wait=True)
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        processor = BatchProcessor(CountingProjection(), pool, KafkaDeadLetters(producer))
        policy = LoopPolicy(max_batch=100, backoff_initial_s=0.2, backoff_max_s=1.0)
        await run_live(processor, pool, bootstrap, topic, "test-counter-group", stop, policy, session_timeout_ms, health, log_check)
    finally:
        await producer.stop()
        await pool.close()


def main() -> None:
    bootstrap, topic, database_url = sys.argv[1:4]
    stop = asyncio.Event()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await run_worker(bootstrap, topic, database_url, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
