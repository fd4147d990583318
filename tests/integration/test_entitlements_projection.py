"""The entitlements projection against the real Postgres and Redis.

Batches are applied the way shared/worker.py does: `apply` inside one transaction on
the caller's connection, then `after_commit`. Ids are random per test.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Sequence
from typing import Any

import orjson
import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg import sql
from redis.asyncio import Redis

from domain.entitlements import changes_channel, plan_version
from payment.v1 import events_pb2
from paymentsvc.dev.samples import sample_event
from services.entitlements.bootstrap import TABLES
from services.entitlements.projection import EntitlementsProjection
from services.ingest_webhooks.normalize import normalize
from shared.catalog import Catalog
from shared.projection import ApplyContext, Envelope, PoisonEvent
from tests.conftest import random_id
from tests.support.guests import guest_event

pytestmark = pytest.mark.integration

DAY = 86_400
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
P1 = T0 + 30 * DAY
P2 = P1 + 30 * DAY


class Ids:
    """The random ids of one customer's story."""

    def __init__(self) -> None:
        self.customer = random_id("cus_")
        self.user = random_id("user_")
        self.family = random_id("family_")
        self.sub = random_id("sub_")
        self.intent = random_id("pi_")
        self.charge = random_id("ch_")
        self.one_time_charge = random_id("ch_")


def event(
    ids: Ids, event_type: str, created: int, *, user_id: str | None = None, **kw: Any
) -> events_pb2.PaymentEvent:
    kw.setdefault("event_id", random_id("evt_"))
    normalized = normalize(
        sample_event(event_type, customer_id=ids.customer, created=created, user_id=user_id, **kw)
    )
    assert normalized is not None
    return normalized


def sub_event(ids: Ids, kind: str, created: int, **kw: Any) -> events_pb2.PaymentEvent:
    kw.setdefault("period_start", T0)
    kw.setdefault("period_end", P1)
    return event(ids, f"customer.subscription.{kind}", created, subscription_id=ids.sub, **kw)


def story(ids: Ids) -> list[events_pb2.PaymentEvent]:
    """A customer's life: trial, upgrade to a family plan, dunning, recovery, payments."""
    pro = {"price_id": "price_pro_monthly"}
    pay = {"payment_intent_id": ids.intent, "charge_id": ids.charge, "amount": 1900}
    return [
        sub_event(ids, "created", T0, status="trialing"),
        sub_event(ids, "updated", T0 + DAY, **pro),
        event(
            ids,
            "invoice.paid",
            T0 + DAY + 5,
            subscription_id=ids.sub,
            period_start=P1,
            period_end=P2,
        ),
        event(ids, "charge.succeeded", T0 + DAY + 1, **pay),
        event(ids, "payment_intent.succeeded", T0 + DAY + 2, **pay),
        sub_event(ids, "updated", T0 + 2 * DAY, status="past_due", **pro),
        sub_event(ids, "updated", T0 + 3 * DAY, **pro),
        event(ids, "charge.refunded", T0 + 5 * DAY, amount_refunded=900, **pay),
        event(
            ids,
            "charge.succeeded",
            T0 + 6 * DAY,
            plan_id="basic",
            charge_id=ids.one_time_charge,
            one_off=True,
        ),
        sub_event(ids, "updated", T0 + 7 * DAY, cancel_at_period_end=True, **pro),
        # The only events that name the user and family come late.
        event(
            ids,
            "checkout.session.completed",
            T0 + 8 * DAY,
            user_id=ids.user,
            family_id=ids.family,
            subscription_id=ids.sub,
        ),
    ]


def envelopes(events: Sequence[events_pb2.PaymentEvent]) -> list[Envelope[events_pb2.PaymentEvent]]:
    return [
        Envelope(e.event_id, e.event_type, e, "payment-events", 0, offset, e.customer_id.encode())
        for offset, e in enumerate(events)
    ]


async def apply_batch(
    url: str,
    projection: EntitlementsProjection,
    events: Sequence[events_pb2.PaymentEvent],
    *,
    replay: bool = False,
) -> None:
    ctx = ApplyContext(consumer="entitlements", replay=replay, now=time.time())
    async with await psycopg.AsyncConnection.connect(url) as conn:
        async with conn.transaction():
            result = await projection.apply(conn, envelopes(events), ctx)
    await projection.after_commit(result, ctx)


def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url) as conn:
        return {
            table: sorted(
                conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table))).fetchall(),
                key=repr,
            )
            for table in TABLES
        }


def truncate(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(map(sql.Identifier, TABLES))))


def query(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(statement, params).fetchall()  # type: ignore[arg-type]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- rows


async def test_a_customer_story_lands_in_every_table(db: str, catalog: Catalog) -> None:
    ids = Ids()
    await apply_batch(db, EntitlementsProjection(catalog, None), story(ids))

    [(status, plan, level, user, family, cancel)] = query(
        db,
        "SELECT status, plan_id, access_level, user_id, family_id, cancel_at_period_end"
        " FROM subscriptions WHERE subscription_id = %s",
        ids.sub,
    )
    assert (status, plan, level, user, family, cancel) == (
        "active",
        "pro",
        "full",
        ids.user,
        ids.family,
        True,
    )
    levels = query(
        db,
        "SELECT to_level FROM access_changes WHERE subscription_id = %s ORDER BY event_created",
        ids.sub,
    )
    assert [row[0] for row in levels] == ["full", "grace", "full"]
    family_rows = query(
        db,
        "SELECT DISTINCT status, expires_at FROM entitlements"
        " WHERE subject_type = 'family' AND subject_id = %s",
        ids.family,
    )
    # cancel_at_period_end: every row expires at the end of the current period
    assert [(s, int(e.timestamp())) for s, e in family_rows] == [("active", P1)]
    one_time = query(
        db,
        "SELECT count(*) FROM entitlements WHERE source_type = 'charge' AND subject_id = %s",
        ids.user,
    )
    assert one_time == [(5,)]
    [(payment_status, refunded, payment_user)] = query(
        db,
        "SELECT status, amount_refunded, user_id FROM payments WHERE payment_id = %s",
        ids.intent,
    )
    assert (payment_status, refunded, payment_user) == ("partially_refunded", 900, ids.user)


async def test_shuffled_and_split_batches_give_the_same_rows_as_the_in_order_run(
    db: str, catalog: Catalog
) -> None:
    stories = [story(Ids()), story(Ids())]
    events = [e for s in stories for e in s]
    projection = EntitlementsProjection(catalog, None)
    await apply_batch(db, projection, events)
    expected = dump(db)
    assert all(expected[table] for table in TABLES if table != "catalog_misses")

    rng = random.Random(20260101)
    for _ in range(4):
        truncate(db)
        order = events[:]
        rng.shuffle(order)
        cuts = sorted(rng.sample(range(1, len(order)), 4))
        for start, end in zip([0, *cuts], [*cuts, len(order)], strict=True):
            await apply_batch(db, projection, order[start:end])
        await apply_batch(db, projection, order[:3])  # redelivered, as after a crash
        assert dump(db) == expected


async def test_one_event_per_batch_gives_the_same_rows_as_one_batch(
    db: str, catalog: Catalog
) -> None:
    events = story(Ids())
    projection = EntitlementsProjection(catalog, None)
    await apply_batch(db, projection, events)
    expected = dump(db)
    truncate(db)

    for e in reversed(events):
        await apply_batch(db, projection, [e])
    assert dump(db) == expected


async def test_payments_stored_before_their_customer_is_mapped_are_backfilled(
    db: str, catalog: Catalog
) -> None:
    ids = Ids()
    projection = EntitlementsProjection(catalog, None)
    await apply_batch(
        db, projection, [event(ids, "payment_intent.succeeded", T0, payment_intent_id=ids.intent)]
    )
    await apply_batch(
        db, projection, [event(ids, "invoice.payment_failed", T0 + 1, user_id=ids.user)]
    )

    assert query(db, "SELECT user_id FROM payments WHERE payment_id = %s", ids.intent) == [
        (ids.user,)
    ]


async def test_a_payment_first_stored_by_its_charge_moves_to_its_payment_intent(
    db: str, catalog: Catalog
) -> None:
    ids = Ids()
    charge_only = event(ids, "charge.succeeded", T0, charge_id=ids.charge)
    charge_only.ClearField("payment_intent_id")
    projection = EntitlementsProjection(catalog, None)
    await apply_batch(db, projection, [charge_only])
    await apply_batch(
        db,
        projection,
        [
            event(
                ids,
                "payment_intent.succeeded",
                T0 + 1,
                payment_intent_id=ids.intent,
                charge_id=ids.charge,
            )
        ],
    )

    rows = query(
        db,
        "SELECT payment_id, charge_id, status FROM payments WHERE customer_id = %s",
        ids.customer,
    )
    assert rows == [(ids.intent, ids.charge, "succeeded")]


async def test_a_price_not_in_the_catalog_is_recorded_and_counted_and_grants_nothing(
    db: str, catalog: Catalog
) -> None:
    ids = Ids()
    price = random_id("price_missing_")
    before = metric("paymentsvc_catalog_misses_total", price_id=price)
    await apply_batch(
        db,
        EntitlementsProjection(catalog, None),
        [sub_event(ids, "created", T0, user_id=ids.user, price_id=price)],
    )

    assert query(
        db, "SELECT plan_id, price_id FROM subscriptions WHERE subscription_id = %s", ids.sub
    ) == [(None, price)]
    assert query(db, "SELECT count(*) FROM entitlements WHERE source_id = %s", ids.sub) == [(0,)]
    assert query(
        db, "SELECT last_subscription_id FROM catalog_misses WHERE price_id = %s", price
    ) == [(ids.sub,)]
    assert metric("paymentsvc_catalog_misses_total", price_id=price) == before + 1


async def test_access_changes_are_counted_by_new_level(db: str, catalog: Catalog) -> None:
    ids = Ids()
    before = metric("paymentsvc_access_changes_total", to_level="grace")
    events = [
        sub_event(ids, "created", T0, user_id=ids.user),
        sub_event(ids, "updated", P1, status="past_due"),
    ]
    await apply_batch(db, EntitlementsProjection(catalog, None), events)

    assert metric("paymentsvc_access_changes_total", to_level="grace") == before + 1


async def test_bad_data_is_a_poison_event_and_nothing_of_the_batch_is_written(
    db: str, catalog: Catalog
) -> None:
    ids = Ids()
    bad = event(ids, "payment_intent.succeeded", T0, user_id=ids.user)
    bad.currency = "dollars"
    good = sub_event(ids, "created", T0, user_id=ids.user)

    with pytest.raises(PoisonEvent) as raised:
        await apply_batch(db, EntitlementsProjection(catalog, None), [good, bad])
    assert raised.value.event_id == bad.event_id
    assert all(not rows for rows in dump(db).values())


def test_decode_rejects_what_it_cannot_key(catalog: Catalog) -> None:
    projection = EntitlementsProjection(catalog, None)
    good = events_pb2.PaymentEvent(event_id="evt_1", event_type="invoice.paid", customer_id="cus_1")

    assert projection.decode(good.SerializeToString(), {})[:2] == ("evt_1", "invoice.paid")
    for value in (b"\xff\xff\xff", events_pb2.PaymentEvent(event_id="evt_1").SerializeToString()):
        with pytest.raises(ValueError):
            projection.decode(value, {})


# ---------------------------------------------------------------- guest payments


def guest(ids: Ids, event_type: str, created: int, **kw: Any) -> events_pb2.PaymentEvent:
    """A payment made without a Stripe Customer (Payment Links, guest checkout)."""
    return guest_event(event_type, created, event_id=kw.pop("event_id", random_id("evt_")), **kw)


def guest_payment(url: str, payment_id: str) -> list[tuple[Any, ...]]:
    return query(
        url,
        "SELECT customer_id, user_id, status, amount_refunded FROM payments WHERE payment_id = %s",
        payment_id,
    )


async def test_the_guest_refund_flow_shuffled_and_redelivered_ends_refunded(
    db: str, catalog: Catalog
) -> None:
    ids = Ids()
    pay = {"payment_intent_id": ids.intent, "charge_id": ids.charge, "amount": 1000}
    flow = [
        guest(ids, "charge.succeeded", T0, **pay),
        guest(ids, "payment_intent.succeeded", T0 + 1, **pay),
        guest(ids, "charge.refunded", T0 + 2, amount_refunded=1000, **pay),
    ]
    seed = random.randrange(2**32)
    print(f"shuffle seed {seed}")
    events = flow * 2
    random.Random(seed).shuffle(events)
    projection = EntitlementsProjection(catalog, None)
    for one in events:  # one batch each, so every load goes through Postgres
        await apply_batch(db, projection, [one])

    assert guest_payment(db, ids.intent) == [(None, None, "refunded", 1000)]


@pytest.mark.parametrize("customer_first", [True, False])
async def test_a_guest_payment_later_attached_to_a_customer_joins_it(
    db: str, catalog: Catalog, customer_first: bool
) -> None:
    ids = Ids()
    pay = {"payment_intent_id": ids.intent, "charge_id": ids.charge, "amount": 1000}
    as_guest = guest(ids, "charge.succeeded", T0, **pay)
    with_customer = event(ids, "payment_intent.succeeded", T0 + 1, user_id=ids.user, **pay)
    projection = EntitlementsProjection(catalog, None)
    for one in [with_customer, as_guest] if customer_first else [as_guest, with_customer]:
        await apply_batch(db, projection, [one])

    assert guest_payment(db, ids.intent) == [(ids.customer, ids.user, "succeeded", 0)]


async def test_a_guest_grant_is_found_again_by_its_charge(db: str, catalog: Catalog) -> None:
    ids = Ids()
    bought = {"charge_id": ids.one_time_charge, "payment_intent_id": ids.intent, "plan_id": "basic",
              "user_id": ids.user}
    projection = EntitlementsProjection(catalog, None)
    await apply_batch(db, projection, [guest(ids, "charge.succeeded", T0, one_off=True, **bought)])
    # A later event of the same charge, in another batch: the stored grant must be loaded
    # (by the charge id, as it has no customer) so its granted_at stays the first one.
    later = guest(ids, "charge.succeeded", T0 + 5, one_off=True, **bought)
    await apply_batch(db, projection, [later])

    assert query(
        db,
        "SELECT customer_id, user_id, extract(epoch FROM granted_at)::bigint FROM one_time_grants"
        " WHERE source_id = %s",
        ids.one_time_charge,
    ) == [(None, ids.user, T0)]
    assert query(
        db,
        "SELECT count(*) FROM entitlements WHERE source_id = %s AND subject_id = %s",
        ids.one_time_charge,
        ids.user,
    ) == [(5,)]


# ---------------------------------------------------------------- Redis


async def redis_hash(redis: Redis, key: str) -> dict[str, Any]:
    return {k.decode(): orjson.loads(v) for k, v in (await redis.hgetall(key)).items()}


async def test_the_redis_hash_matches_postgres(
    db: str, catalog: Catalog, redis: Redis, redis_prefix: str
) -> None:
    ids = Ids()
    projection = EntitlementsProjection(catalog, redis, redis_prefix)
    await apply_batch(db, projection, story(ids))
    key = f"{redis_prefix}ent:family:{ids.family}"

    cached = await redis_hash(redis, key)
    rows = query(
        db,
        "SELECT feature_code, status, access_level, plan_id, expires_at, usage_limit, limit_period,"
        " enforcement, last_event_id FROM entitlements"
        " WHERE subject_type = 'family' AND subject_id = %s",
        ids.family,
    )
    assert set(cached) == {row[0] for row in rows} | {"_watermark"}
    for code, status, level, plan, expires, limit, period, enforcement, event_id in rows:
        assert cached[code] == {
            "allowed": status == "active",
            "status": status,
            "access_level": level,
            "plan_id": plan,
            "expires_at": int(expires.timestamp()),
            "usage_limit": limit,
            "limit_period": period,
            "enforcement": enforcement,
            "decided_by_event_id": event_id,
            "source": f"subscription:{ids.sub}",
            "grace_until": None,
            "after_grace": None,
            "level_after_grace": None,
            "rule": "active: full",  # the explanation (domain/entitlements.py rule_text)
            "plan_version": plan_version(catalog.plan(plan)),
        }
    assert set(cached["_watermark"]) == {"created", "event_id"}
    assert 0 < await redis.ttl(key) <= 24 * 3600
    user_hash = await redis_hash(redis, f"{redis_prefix}ent:user:{ids.user}")
    assert (
        user_hash["api_calls"]["source"] == f"charge:{ids.one_time_charge}"
    )  # the one-time purchase


async def test_a_grace_answer_tells_when_grace_ends_and_what_follows(
    db: str, catalog: Catalog, redis: Redis, redis_prefix: str
) -> None:
    ids = Ids()
    projection = EntitlementsProjection(catalog, redis, redis_prefix)
    events = [
        sub_event(ids, "created", T0, user_id=ids.user),
        sub_event(ids, "updated", P1, status="past_due"),
    ]
    await apply_batch(db, projection, events)

    cached = await redis_hash(redis, f"{redis_prefix}ent:user:{ids.user}")
    assert cached["api_calls"]["access_level"] == "grace" and cached["api_calls"]["allowed"]
    assert cached["api_calls"]["grace_until"] == P1 + 7 * DAY
    assert (cached["api_calls"]["after_grace"], cached["projects"]["after_grace"]) == (
        "suspended",
        "active",
    )
    # The level the grace period drops to is the writer's, from the plan's past_due rule.
    assert cached["projects"]["level_after_grace"] == catalog.plans["basic"].access_policy["past_due"].then


async def test_a_subject_that_loses_every_row_loses_its_key(
    db: str, catalog: Catalog, redis: Redis, redis_prefix: str
) -> None:
    ids = Ids()
    projection = EntitlementsProjection(catalog, redis, redis_prefix)
    await apply_batch(
        db,
        projection,
        [sub_event(ids, "created", T0, user_id=ids.user, price_id="price_pro_monthly")],
    )
    assert await redis.exists(f"{redis_prefix}ent:user:{ids.user}")

    # The family becomes known: a family-pool plan's rows move from the user to the family.
    await apply_batch(
        db,
        projection,
        [event(ids, "invoice.payment_failed", T0 + 1, user_id=ids.user, family_id=ids.family)],
    )
    assert not await redis.exists(f"{redis_prefix}ent:user:{ids.user}")
    assert (await redis_hash(redis, f"{redis_prefix}ent:family:{ids.family}"))["seats"]["allowed"]


async def test_the_change_feed_names_the_keys_of_a_batch_once_their_hashes_are_written(
    db: str, catalog: Catalog, redis: Redis, redis_prefix: str
) -> None:
    ids, other = Ids(), Ids()
    projection = EntitlementsProjection(catalog, redis, redis_prefix)
    await apply_batch(db, projection, [sub_event(other, "created", T0, user_id=other.user)])
    feed = redis.pubsub()
    await feed.subscribe(changes_channel(redis_prefix))
    try:
        assert (await feed.get_message(timeout=2))["type"] == "subscribe"  # type: ignore[index]
        # One subject gains rows, the other loses its key (its subscription is another's now).
        await apply_batch(db, projection, [
            sub_event(ids, "created", T0, user_id=ids.user, price_id="price_pro_monthly"),
            sub_event(other, "updated", T0 + 1, user_id=other.user, price_id="price_unknown"),
        ])
        message = await feed.get_message(ignore_subscribe_messages=True, timeout=5)
    finally:
        await feed.aclose()

    keys = {f"{redis_prefix}ent:user:{ids.user}", f"{redis_prefix}ent:user:{other.user}"}
    assert message is not None and set(message["data"].decode().split("\n")) == keys
    assert set(await redis_hash(redis, f"{redis_prefix}ent:user:{ids.user}")) == {
        *catalog.plans["pro"].features, "_watermark"
    }


async def test_replay_writes_postgres_and_skips_redis(
    db: str, catalog: Catalog, redis: Redis, redis_prefix: str
) -> None:
    ids = Ids()
    projection = EntitlementsProjection(catalog, redis, redis_prefix)
    await apply_batch(
        db, projection, [sub_event(ids, "created", T0, user_id=ids.user)], replay=True
    )

    assert query(db, "SELECT count(*) FROM entitlements WHERE subject_id = %s", ids.user) == [(5,)]
    assert [key async for key in redis.scan_iter(match=f"{redis_prefix}*")] == []


async def test_redis_down_raises_nothing_counts_the_failure_and_postgres_is_right(
    db: str, catalog: Catalog
) -> None:
    ids = Ids()
    down = Redis(host="127.0.0.1", port=closed_port(), socket_connect_timeout=0.5)
    before = metric("paymentsvc_redis_projection_failures_total")
    try:
        await apply_batch(
            db,
            EntitlementsProjection(catalog, down),
            [sub_event(ids, "created", T0, user_id=ids.user)],
        )
    finally:
        await down.aclose()

    assert metric("paymentsvc_redis_projection_failures_total") == before + 1
    rows = query(db, "SELECT DISTINCT status FROM entitlements WHERE subject_id = %s", ids.user)
    assert rows == [("active",)]
