"""CPU time of the entitlements worker per batch, without a broker: bench/project.py's
events fed from memory to `BatchProcessor.process` (Postgres and Redis real), the CPU
time of this process per batch and per phase of a batch.

Kafka's fetch and the group join are left out, so what it measures is the Python of a
batch (the part issue 12 found the worker bound by) and the wall time it waits on
Postgres and Redis. CPU time (`time.process_time`) moves much less than wall time on a
shared machine, so two trees can be compared by running it in each, back to back:

    .venv/bin/python bench/batch_cpu.py [--customers 5000] [--events FILE] [--phases]

`--events FILE` reads the events from FILE, writing it first if it does not exist, so
that two trees apply the very same events. `--phases` wraps the batch's steps (load,
fold, diff, save, read-back, answers, Redis) with timers: a few µs each, not per event.
Fresh database and Redis prefix, dropped and deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import pickle
import secrets
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "gen")]

import project  # noqa: E402  (bench/project.py: the events, the database)

import services.entitlements.projection as projection_module  # noqa: E402
import services.entitlements.repository as repository_module  # noqa: E402
import shared.worker as worker_module  # noqa: E402
from services.entitlements.projection import EntitlementsProjection  # noqa: E402
from shared import db  # noqa: E402
from shared.catalog import load_catalog  # noqa: E402
from shared.config import DEFAULT_CATALOG_PATH  # noqa: E402
from shared.worker import BatchProcessor, DeadLetter, RawMessage  # noqa: E402

BATCH = 500
PARTITIONS = 3
CPU: dict[str, float] = {}
WALL: dict[str, float] = {}


class NoDeadLetters:
    async def send(self, letters: Sequence[DeadLetter], consumer: str) -> None:
        raise AssertionError(f"the bench's events are valid; dead letters: {letters[:3]}")


def timed(owner: Any, name: str, label: str) -> None:
    """Wrap owner.name to add its CPU and wall time to CPU[label] and WALL[label]."""
    fn = getattr(owner, name)

    def add(cpu: float, wall: float) -> None:
        CPU[label] = CPU.get(label, 0.0) + time.process_time() - cpu
        WALL[label] = WALL.get(label, 0.0) + time.perf_counter() - wall

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                add(cpu, wall)
    else:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                add(cpu, wall)
    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)


def time_phases() -> None:
    projection = projection_module.EntitlementsProjection
    for owner, name, label in [
        (repository_module, "load_state", "load_state (load, rows -> models)"),
        (projection, "_fold", "fold (handlers)"),
        (repository_module, "diff", "diff"),
        (repository_module, "save", "save (params, JSON, writes)"),
        (repository_module, "read_subjects", "read_subjects"),
        (projection_module, "redis_answers", "redis_answers"),
        (projection, "_write", "Redis write"),
        (worker_module.BatchProcessor, "_decode", "decode"),
        (worker_module.BatchProcessor, "_claim", "inbox claim"),
        (worker_module.BatchProcessor, "_advance", "offsets"),
    ]:
        if hasattr(owner, name):
            timed(owner, name, label)


def raw_messages(messages: list[project.Message]) -> list[RawMessage]:
    """The bench's messages, on PARTITIONS partitions by key, in order within each."""
    offsets = [0] * PARTITIONS
    raws = []
    for key, value, headers in messages:
        partition = zlib.crc32(key) % PARTITIONS
        raws.append(RawMessage("payment-events", partition, offsets[partition], key, value, tuple(headers)))
        offsets[partition] += 1
    return raws


async def run(url: str, messages: list[project.Message], prefix: str) -> list[float]:
    """CPU seconds of each batch."""
    catalog = load_catalog(DEFAULT_CATALOG_PATH)
    redis = Redis.from_url(project.REDIS_URL)
    pool = db.make_pool(url, max_size=4, name="bench-batch-cpu")
    await pool.open(wait=True)
    try:
        processor = BatchProcessor(EntitlementsProjection(catalog, redis, prefix), pool, NoDeadLetters())
        raws = raw_messages(messages)
        per_batch = []
        for i in range(0, len(raws), BATCH):
            cpu = time.process_time()
            await processor.process(raws[i : i + BATCH])
            per_batch.append(time.process_time() - cpu)
        return per_batch
    finally:
        await pool.close()
        await project.delete_keys(redis, prefix)
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--events", type=Path, help="the events' file: read, or written first")
    parser.add_argument("--phases", action="store_true", help="also the CPU and wall time of each step")
    args = parser.parse_args()
    if args.events and args.events.exists():
        messages = pickle.loads(args.events.read_bytes())
    else:
        messages = project.make_messages(args.customers)
        if args.events:
            args.events.write_bytes(pickle.dumps(messages))
    if args.phases:
        time_phases()
    catalog = load_catalog(DEFAULT_CATALOG_PATH)
    tag = secrets.token_hex(4)
    dbname = f"paymentsvc_bench_{tag}"
    try:
        url = project.create_database(dbname, catalog)
        wall = time.perf_counter()
        per_batch = asyncio.run(run(url, messages, f"bench:{tag}:"))
        wall = time.perf_counter() - wall
    finally:
        project.drop_database(dbname)
    n, batches, cpu = len(messages), len(per_batch), sum(per_batch)
    fifth = max(1, batches // 5)
    print(f"{n:,} events in {batches} batches of {BATCH}: CPU {cpu:.2f} s = {1e6 * cpu / n:.0f} µs/event "
          f"= {1e3 * cpu / batches:.1f} ms/batch (first fifth {1e3 * sum(per_batch[:fifth]) / fifth:.1f}, "
          f"last fifth {1e3 * sum(per_batch[-fifth:]) / fifth:.1f}); wall {wall:.1f} s = {n / wall:,.0f} ev/s")
    for label, seconds in sorted(CPU.items(), key=lambda item: -item[1]):
        print(f"  {label:36} CPU {1e3 * seconds / batches:5.1f} ms/batch   wall {1e3 * WALL[label] / batches:6.1f} ms/batch")


if __name__ == "__main__":
    main()
