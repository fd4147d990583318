"""SIGTERM, as an orchestrator sends it, to each service run as `paymentsvc serve NAME`
(issue 11, item 8): not ready at once, work in flight finished, exit code 0, nothing lost.

Real processes on the session's broker, a fresh database and a private redis-server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from paymentsvc.dev.samples import customer_lifecycle
from services.ingest_webhooks.normalize import normalize
from shared.catalog import apply_catalog, load_catalog
from shared.config import DEFAULT_CATALOG_PATH, Topics
from shared.devbroker import DevBroker, ensure_topics, free_port
from shared.kafka import event_headers, payment_event_key
from tests.integration.test_ingest_webhooks import signed_headers
from tests.kafka_helpers import read_topic
from tests.support.net import listening
from tests.support.processes import PrivateRedis, Service
from tests.support.wait import eventually_sync

pytestmark = pytest.mark.e2e

SECRET = "whsec_sigterm_test"
DELAY_S = 3.0  # SHUTDOWN_DELAY_S: long enough to see the 503 before the listener closes
PORTS = {
    "ingest_webhooks": "INGEST_PORT",
    "entitlements": "ENTITLEMENTS_PORT",
    "usage": "USAGE_PORT",
    "dunning": "DUNNING_PORT",
    "api_grpc": "GRPC_HTTP_PORT",
}


def environment(broker: str, topics: Topics, database_url: str, redis_url: str) -> dict[str, str]:
    with psycopg.connect(database_url) as conn:
        apply_catalog(conn, load_catalog(DEFAULT_CATALOG_PATH))
    return {
        **os.environ,
        "DATABASE_URL": database_url, "REDIS_URL": redis_url, "KAFKA_BOOTSTRAP_SERVERS": broker,
        "KAFKA_TOPIC_PREFIX": topics.prefix, "STRIPE_WEBHOOK_SECRETS": SECRET,
        "STRIPE_SECRET_KEY": "sk_test_sigterm", "STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}",
        "API_KEYS": "sigterm=read", "TOKEN_SIGNING_KEYS": "sigterm-signing-key-0123456789abcdef",
        "GRPC_PORT": str(free_port()), "SHUTDOWN_DELAY_S": str(DELAY_S), "SHUTDOWN_TIMEOUT_S": "20",
        **{variable: str(free_port()) for variable in PORTS.values()},
    }


def service(name: str, env: dict[str, str], tmp_path: Path) -> Service:
    return Service(name, int(env[PORTS[name]]), env, tmp_path / f"{name}.log")


def ready_status(port: int) -> tuple[int, str] | None:
    """(HTTP status, body status) of /health/ready; None when nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as answer:
            return answer.status, json.loads(answer.read())["status"]
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["status"]
    except OSError:
        return None


def terminated(s: Service, timeout: float = 40.0) -> int:
    assert s.process is not None
    s.process.wait(timeout)
    code = s.process.returncode
    s.process = None
    return code


@pytest.mark.parametrize("name", ["ingest_webhooks", "api_grpc"])
def test_a_serving_service_turns_not_ready_first_then_exits_0(
    name: str, broker: str, topics: Topics, database_url: str, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    s = service(name, environment(broker, topics, database_url, private_redis.url), tmp_path)
    s.start()
    try:
        s.wait_ready()
        assert s.process is not None
        s.process.send_signal(signal.SIGTERM)
        eventually_sync(lambda: ready_status(s.health_port) == (503, "stopping"), what="not ready, still listening")
        assert terminated(s) == 0, s.log_tail()
    finally:
        s.stop()


@pytest.mark.parametrize("name", ["entitlements", "usage", "dunning"])
def test_a_worker_stops_on_sigterm_with_exit_0(
    name: str, broker: str, topics: Topics, database_url: str, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    s = service(name, environment(broker, topics, database_url, private_redis.url), tmp_path)
    s.start()
    try:
        s.wait_ready()
        assert s.process is not None
        s.process.send_signal(signal.SIGTERM)
        assert terminated(s) == 0, s.log_tail()
        assert "stopping: not ready, finishing the batch in flight" in s.log_tail(80)
    finally:
        s.stop()


def _post(port: int, body: bytes, headers: dict[str, str]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(
        f"POST /webhooks/stripe HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body
    )
    return sock


async def test_a_webhook_waiting_for_its_acknowledgement_at_sigterm_is_answered_and_published(
    topics: Topics, database_url: str, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """The broker is frozen, so the request waits for acks=all when SIGTERM comes; it is
    answered 200 after the listener has closed, once the broker answers. (A request
    whose body is still arriving at the deadline is cut off by aiohttp: nothing was
    acknowledged to Stripe, which sends it again.)"""
    async with DevBroker() as own:
        await ensure_topics(own.bootstrap_servers, topics.all(), partitions=3)
        env = {**environment(own.bootstrap_servers, topics, database_url, private_redis.url), "PUBLISH_TIMEOUT_S": "30"}
        s = service("ingest_webhooks", env, tmp_path)
        _, event = customer_lifecycle(int(time.time()))[0]
        body = json.dumps(event).encode()
        s.start()
        try:
            s.wait_ready()
            own.pause()
            try:
                sock = _post(s.health_port, body, signed_headers(body, SECRET))
                assert s.process is not None
                s.process.send_signal(signal.SIGTERM)
                eventually_sync(lambda: ready_status(s.health_port) == (503, "stopping"), what="not ready")
                eventually_sync(lambda: not listening(s.health_port), timeout=DELAY_S + 30, what="the listener closed")
            finally:
                own.resume()
            answer = sock.recv(65536).decode()
            sock.close()
            assert answer.startswith("HTTP/1.1 200"), answer or s.log_tail()
            assert '"published"' in answer
            assert terminated(s) == 0, s.log_tail()
        finally:
            s.stop()
        records = await read_topic(own.bootstrap_servers, topics.payment_events, expect=1)
    assert [r.key for r in records] == [event["data"]["object"]["customer"].encode()]


def processed(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM processed_events").fetchone()
    return int(row[0]) if row else 0


async def test_a_worker_sigtermed_mid_stream_loses_nothing_and_applies_nothing_twice(
    broker: str, topics: Topics, database_url: str, private_redis: PrivateRedis,
    producer: AIOKafkaProducer, tmp_path: Path,
) -> None:
    env = environment(broker, topics, database_url, private_redis.url)
    worker = service("entitlements", env, tmp_path)
    events: list[Any] = []
    start = int(time.time()) - 90 * 86_400
    for c in range(60):
        events += [normalize(e) for _, e in customer_lifecycle(start + c * 3600)]
    for e in events:
        headers = event_headers(e.event_id, e.event_type, "PaymentEvent")
        await producer.send(topics.payment_events, e.SerializeToString(), key=payment_event_key(e).encode(), headers=headers)
    await producer.flush()
    worker.start()
    try:
        eventually_sync(lambda: processed(database_url) > 0, timeout=90, what="the worker to apply a first batch")
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        assert terminated(worker) == 0, worker.log_tail()
        stopped_at = processed(database_url)
        worker.start()
        eventually_sync(lambda: processed(database_url) == len(events), timeout=120,
                        what=f"all {len(events)} events applied (stopped at {stopped_at})")
    finally:
        worker.stop()
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(DISTINCT event_id), count(*) FROM processed_events").fetchone()
    assert row == (len(events), len(events))
