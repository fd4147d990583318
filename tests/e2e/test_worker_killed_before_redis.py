"""The entitlements worker SIGKILLed between its commit and its Redis write (issue 11, item 2).

Real processes: `paymentsvc serve entitlements` and `serve api_grpc` on the session's
broker, a fresh database and a private redis-server that the worker reaches through a
proxy. The proxy swallows what the worker sends, so the worker commits and then waits
on a Redis write that never arrives; the kill lands there. After a
restart, the API answers from the new state. Then `paymentsvc entitlements
rebuild-cache` is run as an operator runs it, over a Redis made stale by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from redis import Redis

from payment.v1 import service_pb2, service_pb2_grpc
from paymentsvc.dev.samples import sample_event
from services.ingest_webhooks.normalize import normalize
from shared.catalog import apply_catalog, load_catalog
from shared.config import DEFAULT_CATALOG_PATH, Topics
from shared.devbroker import free_port
from shared.kafka import event_headers
from tests.conftest import random_id
from tests.support.net import BlackholeProxy
from tests.support.processes import ROOT, PrivateRedis, Service
from tests.support.wait import eventually_sync

pytestmark = pytest.mark.e2e

API_KEY = "e2e-cache-key"
T0 = int(time.time())  # the subscription must be current for the API to grant it


@pytest.fixture
def proxy(private_redis: PrivateRedis) -> Iterator[BlackholeProxy]:
    proxy = BlackholeProxy(private_redis.port)
    try:
        yield proxy
    finally:
        proxy.close()


async def publish(producer: AIOKafkaProducer, topic: str, event_type: str, customer: str, user: str, **kw: object) -> str:
    event = sample_event(event_type, customer_id=customer, user_id=user, subscription_id=f"sub_{customer}", **kw)
    normalized = normalize(event)
    assert normalized is not None
    headers = event_headers(normalized.event_id, normalized.event_type, "PaymentEvent")
    await (await producer.send(topic, normalized.SerializeToString(), key=customer.encode(), headers=headers))
    return normalized.event_id


def applied(database_url: str, event_id: str) -> bool:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT 1 FROM processed_events WHERE event_id = %s", (event_id,)).fetchone() is not None


def api_plan(port: int, user: str) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = service_pb2_grpc.PaymentServiceStub(channel).CheckEntitlement(
            service_pb2.CheckEntitlementRequest(subject=service_pb2.Subject(user_id=user), feature_code="projects"),
            metadata=(("authorization", f"Bearer {API_KEY}"),),
            timeout=5,
        )
    return str(answer.plan_id)


def cached_plan(redis_url: str, user: str) -> str | None:
    client = Redis.from_url(redis_url)
    try:
        field = client.hget(f"ent:user:{user}", "projects")
    finally:
        client.close()
    return None if field is None else str(orjson.loads(field)["plan_id"])  # type: ignore[arg-type]


async def test_a_worker_killed_between_commit_and_redis_leaves_no_stale_answer_after_restart(
    broker: str, topics: Topics, database_url: str, private_redis: PrivateRedis,
    producer: AIOKafkaProducer, proxy: BlackholeProxy, tmp_path: Path,
) -> None:
    with psycopg.connect(database_url) as conn:
        apply_catalog(conn, load_catalog(DEFAULT_CATALOG_PATH))
    worker_port, grpc_port, api_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url, "REDIS_URL": private_redis.url, "KAFKA_BOOTSTRAP_SERVERS": broker,
        "KAFKA_TOPIC_PREFIX": topics.prefix, "API_KEYS": f"{API_KEY}=read", "ENTITLEMENTS_PORT": str(worker_port),
        "GRPC_PORT": str(grpc_port), "GRPC_HTTP_PORT": str(api_port),
        "TOKEN_SIGNING_KEYS": "e2e-signing-key-0123456789abcdef0123",
    }
    worker = Service("entitlements", worker_port, {**env, "REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"},
                     tmp_path / "worker.log")
    api = Service("api_grpc", api_port, env, tmp_path / "api.log")
    customer, user = random_id("cus_"), random_id("user_")
    try:
        worker.start()
        api.start()
        worker.wait_ready()
        api.wait_ready()
        await publish(producer, topics.payment_events, "customer.subscription.created", customer, user,
                      status="active", created=T0)
        eventually_sync(lambda: api_plan(grpc_port, user) == "basic", timeout=60, what="the basic answer")

        # The worker's Redis writes vanish: it commits the upgrade, then waits on Redis; killed there.
        proxy.blackhole = True
        upgrade = await publish(producer, topics.payment_events, "customer.subscription.updated", customer,
                                user, status="active", price_id="price_pro_monthly", created=T0 + 60)
        eventually_sync(lambda: applied(database_url, upgrade), timeout=60, what="the upgrade's commit")
        worker.kill()
        proxy.blackhole = False
        assert cached_plan(private_redis.url, user) == "basic", "the kill should have left Redis stale"

        worker.start()
        worker.wait_ready()
        eventually_sync(lambda: api_plan(grpc_port, user) == "pro", timeout=60, what="the API to answer pro")
        assert cached_plan(private_redis.url, user) == "pro"

        # An operator's rebuild: a stale answer and an answer of a subject without rows.
        client = Redis.from_url(private_redis.url)
        try:
            client.hset(f"ent:user:{user}", "projects", orjson.dumps({"plan_id": "stale"}))
            client.hset("ent:user:nobody", "projects", orjson.dumps({"plan_id": "ghost"}))
        finally:
            client.close()
        done = subprocess.run(
            [sys.executable, "-m", "paymentsvc.cli", "entitlements", "rebuild-cache"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip().splitlines()[-1] == "rewrote the Redis answers of 2 subject(s) from Postgres"
        assert "rebuild entitlements cache" in done.stderr  # the progress bar
        assert cached_plan(private_redis.url, user) == "pro"
        assert cached_plan(private_redis.url, "nobody") is None
    finally:
        worker.stop()
        api.stop()
