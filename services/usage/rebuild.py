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

One rebuild at a time, across every replica and the CLI: a rebuild first takes the lease
`usage:rebuild:lease` (SET NX with an expiry, LEASE_S) and renews it while it works. Every
write it makes to Redis, from deleting `usage:ready` to setting it again, is fenced: a
script checks that the lease still holds this rebuild's token and writes in the same
atomic step. A rebuild that stalled past its lease (a paused process, a lost network) and
was overtaken can therefore not delete or overwrite what the newer one wrote: its next
write fails with LeaseLost and it stops. A rebuild that finds the lease taken raises
RebuildRunning (the worker's watchdog waits for the next tick; the CLI says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg import AsyncConnection
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from domain.usage import repository
from domain.usage.counters import IDEMPOTENCY_TTL_S
from domain.usage.model import (
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
LEASE_S = 30.0

# KEYS[1] the lease, ARGV[1] the token. Then ARGV[2] "del": delete KEYS[2..]; or "set":
# for each KEYS[i] (i >= 2) three ARGV: value, ttl in seconds (0: none), "1" for only-if-absent.
_FENCED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LEASE_LOST')
end
if ARGV[2] == 'del' then
  for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
  return #KEYS - 1
end
for i = 2, #KEYS do
  local j = 3 + (i - 2) * 3
  local ttl = tonumber(ARGV[j + 1])
  local args = {'SET', KEYS[i], ARGV[j]}
  if ttl > 0 then table.insert(args, 'EX'); table.insert(args, ttl) end
  if ARGV[j + 2] == '1' then table.insert(args, 'NX') end
  redis.call(unpack(args))
end
return #KEYS - 1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RebuildRunning(RuntimeError):
    """Another rebuild holds the lease."""


class LeaseLost(RuntimeError):
    """This rebuild's lease expired and another took it: it must not write again."""


class Lease:
    """The one-rebuild-at-a-time lease, and the fenced writes made under it."""

    def __init__(self, redis: Redis, keys: Keys, lease_s: float = LEASE_S) -> None:
        self.redis = redis
        self._key = keys.rebuild_lease
        self._lease_ms = int(lease_s * 1000)
        self.token = secrets.token_hex(16)
        self._fenced = redis.register_script(_FENCED)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._renewing: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lease:
        if not await self.redis.set(self._key, self.token, nx=True, px=self._lease_ms):
            left = await self.redis.pttl(self._key)
            raise RebuildRunning(
                f"another usage counter rebuild holds the lease ({self._key}, {max(left, 0) / 1000:.0f} s left)"
            )
        self._renewing = asyncio.create_task(self._keep())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        with contextlib.suppress(Exception):  # left to expire if Redis is gone
            await self._release(keys=[self._key], args=[self.token])

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            with contextlib.suppress(Exception):  # a missed renewal: the fence still holds
                if not await self._renew(keys=[self._key], args=[self.token, self._lease_ms]):
                    log.error("usage rebuild lease lost to another rebuild: this one stops at its next write")
                    return

    async def delete(self, keys: list[str]) -> None:
        await self._run([self._key, *keys], [self.token, "del"])

    async def set(self, writes: list[tuple[str, Any, int, bool]]) -> None:
        """(key, value, ttl in seconds or 0, only if absent) each, in one fenced step."""
        args: list[Any] = [self.token, "set"]
        for _, value, ttl, only_if_absent in writes:
            args += [value, ttl, "1" if only_if_absent else "0"]
        await self._run([self._key, *(w[0] for w in writes)], args)

    async def _run(self, keys: list[Any], args: list[Any]) -> None:
        try:
            await self._fenced(keys=keys, args=args)
        except ResponseError as exc:
            if "LEASE_LOST" in str(exc):
                raise LeaseLost("the rebuild lease was taken by another rebuild; this one stopped") from None
            raise


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
    lease_s: float = LEASE_S,
) -> Figures:
    """Rebuild the counters (see the module docstring). Raises TimeoutError if the worker
    does not catch up in time; `usage:ready` then stays unset (increments stay refused).
    Raises RebuildRunning if another rebuild holds the lease, LeaseLost if this one lost it."""
    keys = Keys(prefix)
    phase = on_phase or (lambda _: None)
    try:
        async with Lease(redis, keys, lease_s) as lease:
            return await _rebuild(conn, lease, catalog, keys, caught_up, settle_s, catch_up_timeout_s, clock, phase)
    except RebuildRunning:
        raise
    except BaseException:
        USAGE_CACHE_REBUILDS.labels("failed").inc()
        raise


async def _rebuild(
    conn: AsyncConnection[Any], lease: Lease, catalog: Catalog, keys: Keys, caught_up: CaughtUp | None,
    settle_s: float, catch_up_timeout_s: float, clock: Callable[[], float], phase: Callable[[str], None],
) -> Figures:
    await lease.delete([keys.ready])
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
    figures = await _restore(conn, lease, catalog, keys, clock())
    USAGE_CACHE_REBUILDS.labels("done").inc()
    log.info("usage counters rebuilt", extra={"counters": figures.counters, "members": figures.members,
                                               "idempotency_records": figures.idempotency_records})
    return figures


async def _restore(conn: AsyncConnection[Any], lease: Lease, catalog: Catalog, keys: Keys, now: float) -> Figures:
    redis = lease.redis
    q = repository.queries()
    pools = await (await conn.execute(q["running_aggregates"], {"now": now})).fetchall()
    members = await (await conn.execute(q["running_member_aggregates"], {"now": now})).fetchall()
    records = await (await conn.execute(q["recent_records"], {"since": now - IDEMPOTENCY_TTL_S})).fetchall()
    for pattern in (f"{keys.prefix}usage:c:*", f"{keys.prefix}usage:m:*"):
        batch = []
        async for key in redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= CHUNK:
                await lease.delete(batch)
                batch = []
        if batch:
            await lease.delete(batch)
    writes: list[tuple[str, Any, int, bool]] = []  # key, value, ttl (0: none), only if absent
    for st, sid, feature, start, end, used in pools:
        writes.append((keys.counter(st, sid, feature, int(start)), int(used), counter_ttl_s(Period(start, end), now), False))
    for family, user, feature, start, end, used in members:
        writes.append((keys.member(family, user, feature, int(start)), int(used), counter_ttl_s(Period(start, end), now), False))
    for row in records:
        writes.append((keys.idempotency(row[0]), _record(row, catalog, keys), IDEMPOTENCY_TTL_S, True))
    for i in range(0, len(writes), CHUNK):
        await lease.set(writes[i:i + CHUNK])
    await lease.set([(keys.ready, str(int(now)), 0, False)])
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
