"""Rebuilding the Redis usage counters from Postgres (`paymentsvc usage rebuild-cache`).

Order, so that no increment is lost or counted twice:

1. delete `usage:ready`: from now on every API replica refuses increments (UNAVAILABLE)
   and answers quotas from Postgres;
2. wait `settle_s` (the publish timeout and a margin): an increment whose script ran
   before step 1 has by then either been acknowledged by the broker or rolled back;
3. wait until the usage worker has applied everything on usage-events (its offsets in
   Postgres reach the topic's end offsets), so Postgres holds every counted increment;
4. replace every counter with the running periods' aggregates, restore the idempotency
   records of the last IDEMPOTENCY_TTL_S from usage_records (kept where Redis still has
   one), and set `usage:ready` again.

Run it after Redis was emptied or restarted; the usage worker also runs it by itself
when it sees `usage:ready` missing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg import AsyncConnection
from redis.asyncio import Redis

from services.usage import repository
from services.usage.counters import IDEMPOTENCY_TTL_S
from services.usage.model import (
    UNLIMITED,
    Keys,
    Outcome,
    Period,
    Policy,
    Request,
    counter_ttl_s,
    done_record,
)
from shared.catalog import Catalog
from shared.consumer import log_end_offsets
from shared.metrics import USAGE_CACHE_REBUILDS

log = logging.getLogger("usage")
CaughtUp = Callable[[], Awaitable[bool]]
CHUNK = 1000


@dataclass(frozen=True, slots=True)
class Figures:
    counters: int
    members: int
    idempotency_records: int


async def topic_end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await probe.start()
    try:
        await probe._client.force_metadata_update()  # noqa: SLF001 - no public refresh
        partitions = sorted(probe.partitions_for_topic(topic) or ())
    finally:
        await probe.stop()
    if not partitions:
        return {}
    return await log_end_offsets(bootstrap, [TopicPartition(topic, p) for p in partitions])


def worker_caught_up(connect: Callable[[], Any], bootstrap: str, topic: str) -> CaughtUp:
    """True once the usage worker's offsets in Postgres reach the topic's end offsets."""

    async def check() -> bool:
        ends = await topic_end_offsets(bootstrap, topic)
        async with connect() as conn:
            cursor = await conn.execute(repository.queries()["worker_positions"], {"topic": topic})
            positions = {int(p): int(o) for p, o in await cursor.fetchall()}
        return all(positions.get(p, 0) >= end for p, end in ends.items())

    return check


async def rebuild(
    conn: AsyncConnection[Any],
    redis: Redis,
    catalog: Catalog,
    *,
    prefix: str = "",
    caught_up: CaughtUp | None = None,
    settle_s: float = 12.0,
    catch_up_timeout_s: float = 300.0,
    clock: Callable[[], float] = time.time,
    on_phase: Callable[[str], None] | None = None,
) -> Figures:
    """Rebuild the counters (see the module docstring). Raises TimeoutError if the worker
    does not catch up in time; `usage:ready` then stays unset (increments stay refused)."""
    keys = Keys(prefix)
    phase = on_phase or (lambda _: None)
    try:
        await redis.delete(keys.ready)
        phase(f"increments refused; letting publishes in flight settle ({settle_s:.0f} s)")
        await asyncio.sleep(settle_s)
        if caught_up is not None:
            phase("waiting for the usage worker to apply usage-events")
            deadline = time.monotonic() + catch_up_timeout_s
            while not await caught_up():
                if time.monotonic() > deadline:
                    raise TimeoutError("the usage worker did not catch up with usage-events")
                await asyncio.sleep(0.5)
        phase("writing the counters from Postgres")
        figures = await _restore(conn, redis, catalog, keys, clock())
    except BaseException:
        USAGE_CACHE_REBUILDS.labels("failed").inc()
        raise
    USAGE_CACHE_REBUILDS.labels("done").inc()
    log.info("usage counters rebuilt", extra={"counters": figures.counters, "members": figures.members,
                                               "idempotency_records": figures.idempotency_records})
    return figures


async def _restore(conn: AsyncConnection[Any], redis: Redis, catalog: Catalog, keys: Keys, now: float) -> Figures:
    q = repository.queries()
    pools = await (await conn.execute(q["running_aggregates"], {"now": now})).fetchall()
    members = await (await conn.execute(q["running_member_aggregates"], {"now": now})).fetchall()
    records = await (await conn.execute(q["recent_records"], {"since": now - IDEMPOTENCY_TTL_S})).fetchall()
    for pattern in (f"{keys.prefix}usage:c:*", f"{keys.prefix}usage:m:*"):
        batch = []
        async for key in redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= CHUNK:
                await redis.delete(*batch)
                batch = []
        if batch:
            await redis.delete(*batch)
    writes: list[tuple[str, Any, int, bool]] = []  # key, value, ttl (0: none), only if absent
    for st, sid, feature, start, end, used in pools:
        writes.append((keys.counter(st, sid, feature, int(start)), int(used), counter_ttl_s(Period(start, end), now), False))
    for family, user, feature, start, end, used in members:
        writes.append((keys.member(family, user, feature, int(start)), int(used), counter_ttl_s(Period(start, end), now), False))
    for row in records:
        writes.append((keys.idempotency(row[0]), _record(row, catalog, keys), IDEMPOTENCY_TTL_S, True))
    for i in range(0, len(writes), CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for key, value, ttl, only_if_absent in writes[i:i + CHUNK]:
                pipe.set(key, value, ex=ttl or None, nx=only_if_absent)
            await pipe.execute()
    await redis.set(keys.ready, str(int(now)))
    return Figures(len(pools), len(members), len(records))


def _record(row: tuple[Any, ...], catalog: Catalog, keys: Keys) -> bytes:
    (key, st, sid, user_id, family_id, feature, amount, start, end, created_ms, metadata,
     used_after, limit, over) = row
    hard, cap, release, plan_id = _feature_rules(catalog, feature, int(limit), bool(over))
    member = user_id if st == "family" and user_id else None
    policy = Policy(feature, plan_id, st, sid, member, int(limit), hard, release, cap,
                    Period(int(start), int(end)), user_id, family_id)
    request = Request(key, policy, int(amount), int(created_ms), {str(k): str(v) for k, v in (metadata or {}).items()})
    # The member's counter after it is not recorded; the pool's stands in (it only
    # bounds `remaining` in the replayed answer).
    return done_record(Outcome(True, int(used_after), int(amount), int(used_after), True, request))


def _feature_rules(catalog: Catalog, feature: str, limit: int, over: bool) -> tuple[bool, int, bool, str]:
    """(hard, member_cap, allow_release, plan) of the catalog plan whose limit matches:
    usage_records keeps the limit but not the rest of the rule it was judged by."""
    for plan in sorted(catalog.plans.values(), key=lambda p: -p.tier):
        f = plan.features.get(feature)
        if f is not None and (f.limit if f.limit is not None else UNLIMITED) == limit:
            cap = f.member_cap if f.member_cap is not None else UNLIMITED
            return (f.enforcement == "hard" and not over), cap, f.allow_release, plan.id
    return (not over), UNLIMITED, False, ""
