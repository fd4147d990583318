"""Redis follows Postgres after any crash (issue 11, item 2), against the real Postgres and Redis.

Batches run as shared/worker.py runs them (`apply` in a transaction, then
`after_commit`); a process killed between the two is a batch whose `after_commit`
never runs, and a restart is a new projection object on the same database.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from redis.asyncio import Redis

from domain.entitlements import redis_answers, redis_key
from services.entitlements import repository
from services.entitlements.projection import EntitlementsProjection, refresh_pending
from shared.catalog import Catalog
from shared.projection import ApplyContext
from tests.integration.test_entitlements_projection import P1, T0, Ids, envelopes, sub_event
from tests.support.net import refusing_port

pytestmark = pytest.mark.integration

PRO = {"price_id": "price_pro_monthly"}


async def commit_only(url: str, projection: EntitlementsProjection, events: list[Any]) -> Any:
    """The batch's transaction commits; the process dies before after_commit."""
    ctx = ApplyContext(consumer="entitlements", replay=False, now=time.time())
    async with await psycopg.AsyncConnection.connect(url) as conn:
        async with conn.transaction():
            result = await projection.apply(conn, envelopes(events), ctx)
    return result, ctx


async def run_batch(url: str, projection: EntitlementsProjection, events: list[Any]) -> None:
    result, ctx = await commit_only(url, projection, events)
    await projection.after_commit(result, ctx)


async def cached_plan(redis: Redis, prefix: str, user: str) -> str | None:
    import orjson

    field = await redis.hget(redis_key(prefix, ("user", user)), "projects")  # type: ignore[misc]
    return None if field is None else str(orjson.loads(field)["plan_id"])


async def expected(url: str, catalog: Catalog, prefix: str, user: str) -> dict[str, dict[str, bytes]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        rows = await repository.read_subjects(conn, [("user", user)])
    return redis_answers(rows, [("user", user)], catalog, prefix)


async def pending(url: str) -> set[tuple[str, str]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cursor = await conn.execute("SELECT subject_type, subject_id FROM cache_refresh_pending")
        return {(r[0], r[1]) for r in await cursor.fetchall()}


async def test_a_batch_killed_between_commit_and_redis_is_rewritten_when_the_worker_starts(
    db: str, catalog: Catalog, redis: Redis, redis_prefix: str
) -> None:
    ids = Ids()
    first = EntitlementsProjection(catalog, redis, redis_prefix)
    await run_batch(db, first, [sub_event(ids, "created", T0, user_id=ids.user, status="active")])
    assert await cached_plan(redis, redis_prefix, ids.user) == "basic"

    await commit_only(db, first, [sub_event(ids, "updated", T0 + 60, user_id=ids.user, **PRO)])  # then killed
    assert await cached_plan(redis, redis_prefix, ids.user) == "basic", "the fault did not happen"
    assert ("user", ids.user) in await pending(db)

    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:  # the restarted worker
        assert await refresh_pending(conn, redis, catalog, redis_prefix) >= 1
    assert await cached_plan(redis, redis_prefix, ids.user) == "pro"
    key = redis_key(redis_prefix, ("user", ids.user))
    assert {k.decode(): v for k, v in (await redis.hgetall(key)).items()} == (  # type: ignore[misc]
        await expected(db, catalog, redis_prefix, ids.user)
    )[key]
    assert await pending(db) == set()


async def test_a_failed_redis_write_is_rewritten_by_the_next_batch_of_any_subject(
    db: str, catalog: Catalog, redis: Redis, redis_prefix: str
) -> None:
    ids, other = Ids(), Ids()
    projection = EntitlementsProjection(catalog, redis, redis_prefix)
    await run_batch(db, projection, [sub_event(ids, "created", T0, user_id=ids.user, status="active")])

    with refusing_port() as port:
        down = Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        projection._redis = down  # Redis unreachable for one batch (in-process: a real refused port)
        try:
            await run_batch(db, projection, [sub_event(ids, "updated", T0 + 60, user_id=ids.user, **PRO)])
        finally:
            projection._redis = redis
            await down.aclose()
    assert await cached_plan(redis, redis_prefix, ids.user) == "basic", "the write should have failed"

    # The next batch is about someone else; it still rewrites the subject left behind.
    await run_batch(db, projection, [sub_event(other, "created", T0, user_id=other.user, status="active")])
    assert await cached_plan(redis, redis_prefix, ids.user) == "pro"
    assert await cached_plan(redis, redis_prefix, other.user) == "basic"


async def test_marks_are_cleared_once_redis_holds_the_answer(
    db: str, catalog: Catalog, redis: Redis, redis_prefix: str
) -> None:
    a, b, c = Ids(), Ids(), Ids()
    projection = EntitlementsProjection(catalog, redis, redis_prefix)
    await run_batch(db, projection, [sub_event(a, "created", T0, user_id=a.user, status="active")])
    assert ("user", a.user) in await pending(db)  # cleared by the next batch's transaction
    await run_batch(db, projection, [sub_event(b, "created", T0, user_id=b.user, status="active")])
    await run_batch(db, projection, [sub_event(c, "created", T0, user_id=c.user, period_end=P1, status="active")])
    left = await pending(db)
    assert ("user", a.user) not in left and ("user", b.user) not in left
    assert ("user", c.user) in left


async def test_a_worker_clears_only_the_marks_it_set(
    db: str, catalog: Catalog, redis: Redis, redis_prefix: str
) -> None:
    """Replica A wrote a subject; replica B then committed a newer change of it and died
    before Redis. A's next batch must not clear B's mark."""
    ids, other = Ids(), Ids()
    replica_a = EntitlementsProjection(catalog, redis, redis_prefix)
    replica_b = EntitlementsProjection(catalog, redis, redis_prefix)
    await run_batch(db, replica_a, [sub_event(ids, "created", T0, user_id=ids.user, status="active")])
    await commit_only(db, replica_b, [sub_event(ids, "updated", T0 + 60, user_id=ids.user, **PRO)])
    replica_a._pending_left = False  # A has seen no failure of its own
    await run_batch(db, replica_a, [sub_event(other, "created", T0, user_id=other.user, status="active")])
    assert ("user", ids.user) in await pending(db)
