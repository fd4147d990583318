"""The Go service's configuration and metrics, as a team coming from it would use them
(issue 17, item 2): the real API and entitlements worker run as `paymentsvc serve NAME`,
configured only with the Go service's variable names and a config.yaml in its shape (none
of our own names for what the Go service had), driven over gRPC, and /metrics scraped for
the Go service's metric names with exact values.

Real processes on the session's broker, a fresh database, a private redis-server (the
services' keys are unprefixed) and localstripe for CreatePayment.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from payment.v1 import service_pb2, service_pb2_grpc
from paymentsvc.dev.samples import customer_lifecycle
from services.ingest_webhooks.normalize import normalize
from shared.catalog import apply_catalog, load_catalog
from shared.config import DEFAULT_CATALOG_PATH, Topics
from shared.devbroker import free_port
from shared.devstripe import DEV_SECRET_KEY, LocalStripe
from shared.kafka import event_headers, payment_event_key
from tests.conftest import random_id
from tests.support.processes import PrivateRedis, Service
from tests.support.wait import eventually_sync

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

API_KEY = "go-dropin-" + random_id()
OURS = ("DATABASE_URL", "REDIS_URL", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRETS", "GRPC_PORT", "GRPC_HTTP_PORT",
        "BIND_HOST", "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPIC_PREFIX", "STRIPE_API_BASE", "LOG_FORMAT", "CONFIG_FILE")

GO_CONFIG = """\
app:
  name: payment-service
grpc:
  reflection: true
events:
  brokers: [{broker}]
  topic_prefix: "{prefix}"
billing:
  provider: stripe
  api_base: {stripe}
  webhook_secret: whsec_go_dropin_verysecret
log:
  level: info
  format: json
metrics:
  enabled: true
  port: 9100
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return round(value(after, name, **labels) - value(before, name, **labels), 6)


@pytest.fixture
def stripe() -> Iterator[LocalStripe]:
    server = LocalStripe()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def go_env(
    broker: str, topics: Topics, database_url: str, private_redis: PrivateRedis, stripe: LocalStripe, tmp_path: Path
) -> dict[str, str]:
    with psycopg.connect(database_url) as conn:
        apply_catalog(conn, load_catalog(DEFAULT_CATALOG_PATH))
    config = tmp_path / "config.yaml"
    config.write_text(GO_CONFIG.format(broker=broker, prefix=topics.prefix, stripe=stripe.api_base))
    redis_addr = private_redis.url.removeprefix("redis://").split("/", 1)[0]
    env = {k: v for k, v in os.environ.items() if k not in OURS}
    return {
        **env,
        # The Go service's names.
        "POSTGRES_DSN": database_url, "REDIS_ADDR": redis_addr, "STRIPE_SECRET": DEV_SECRET_KEY,
        "GRPC_ADDRESS": f"127.0.0.1:{free_port()}", "HEALTH_PORT": str(free_port()), "LOG_LEVEL": "info",
        "CONFIG_FILE": str(config),
        # What the Go service had no name for.
        "API_KEYS": f"{API_KEY}=read+write", "TOKEN_SIGNING_KEYS": "go-dropin-signing-key-0123456789abcdef",
        "ENTITLEMENTS_PORT": str(free_port()),
    }


async def test_a_go_configured_stack_serves_and_exports_the_go_services_metrics(
    go_env: dict[str, str], topics: Topics, producer: AIOKafkaProducer, tmp_path: Path
) -> None:
    health_port = int(go_env["HEALTH_PORT"])
    api = Service("api_grpc", health_port, go_env, tmp_path / "api_grpc.log")
    worker = Service("entitlements", int(go_env["ENTITLEMENTS_PORT"]), go_env, tmp_path / "entitlements.log")
    # One customer with an active basic subscription (checkout, subscription, first invoice).
    events = [normalize(e) for _, e in customer_lifecycle(int(time.time()) - 3600)[:3]]
    user = events[0].user_id
    for e in events:
        headers = event_headers(e.event_id, e.event_type, "PaymentEvent")
        await producer.send(topics.payment_events, e.SerializeToString(), key=payment_event_key(e).encode(), headers=headers)
    await producer.flush()
    api.start()
    worker.start()
    try:
        api.wait_ready()
        worker.wait_ready()
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/status", timeout=5) as answer:
            shown = json.loads(answer.read())
        config = shown.get("config", shown)
        assert config["grpc_port"] == int(go_env["GRPC_ADDRESS"].rsplit(":", 1)[1])
        assert config["grpc_http_port"] == health_port and config["log_format"] == "json"

        channel = grpc.insecure_channel(go_env["GRPC_ADDRESS"])
        stub = service_pb2_grpc.PaymentServiceStub(channel)
        auth = (("authorization", f"Bearer {API_KEY}"),)

        def check(user_id: str) -> service_pb2.CheckEntitlementResponse:
            request = service_pb2.CheckEntitlementRequest(
                subject=service_pb2.Subject(user_id=user_id), feature_code="export_pdf"
            )
            answer: service_pb2.CheckEntitlementResponse = stub.CheckEntitlement(request, metadata=auth, timeout=5)
            return answer

        # The worker projects the subscription into Postgres and Redis; the API then grants it.
        eventually_sync(lambda: check(user).allowed, timeout=90, what="the projected subscription granted")
        before = scrape(health_port)
        assert check(user).reason == "granted"                 # from the cache
        stranger = random_id("user_")
        assert not check(stranger).allowed                     # not in Redis: Postgres, then cached
        assert not check(stranger).allowed                     # now from the cache
        created = stub.CreatePayment(
            service_pb2.CreatePaymentRequest(
                subject=service_pb2.Subject(user_id=user), amount=1999, currency="usd",
                idempotency_key=random_id(),
            ),
            metadata=auth, timeout=10,
        )
        assert created.payment.status == "pending"
        with pytest.raises(grpc.RpcError):                   # Stripe knows no such customer
            stub.CreatePayment(
                service_pb2.CreatePaymentRequest(
                    subject=service_pb2.Subject(user_id=user), customer_id="cus_nobody", amount=500,
                    currency="jpy", idempotency_key=random_id(),
                ),
                metadata=auth, timeout=10,
            )
        channel.close()
        after = scrape(health_port)

        assert delta(before, after, "entitlement_checks_total") == 3
        assert delta(before, after, "entitlement_cache_hits_total") == 2
        assert delta(before, after, "entitlement_cache_misses_total") == 1
        assert delta(before, after, "entitlement_check_duration_seconds_count") == 3
        assert delta(before, after, "entitlement_check_duration_seconds_bucket", le="10.0") == 3
        assert delta(before, after, "cache_hits_total") == 2
        assert delta(before, after, "cache_misses_total") == 1
        assert delta(before, after, "db_query_duration_seconds_count") >= 1  # the stranger's read
        assert delta(before, after, "payment_total") == 2
        assert delta(before, after, "payment_success_total") == 1
        assert delta(before, after, "payment_failed_total") == 1
        assert delta(before, after, "payment_duration_seconds_count") == 2
        # 19.99 dollars and 500 yen (a zero-decimal currency: 500 as it is).
        assert delta(before, after, "payment_amount_dollars_sum") == 519.99
        assert delta(before, after, "payment_amount_dollars_bucket", le="25.0") == 1
        assert delta(before, after, "payment_amount_dollars_bucket", le="500.0") == 2
        assert value(after, "circuit_breaker_state", breaker="stripe") == 0
        assert value(after, "circuit_breaker_state", breaker="redis") == 0
        assert ("db_connections_active", ()) in after
        # Ours are still there beside them.
        assert value(after, "paymentsvc_api_handled_total", method="CheckEntitlement", code="OK") >= 3

        # The worker's own /metrics carries the names too (its pool's connections in use).
        assert ("db_connections_active", ()) in scrape(int(go_env["ENTITLEMENTS_PORT"]))

        # The file's keys that mean nothing here were reported once, and no secret was logged.
        log = api.log_tail(400)
        assert log.count("metrics.port ignored") == 1 and log.count("app.name ignored") == 1
        for secret in ("verysecret", DEV_SECRET_KEY):
            assert secret not in log
    finally:
        api.stop()
        worker.stop()
