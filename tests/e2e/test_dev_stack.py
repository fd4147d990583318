"""`paymentsvc dev` as a newcomer runs it, driven through localstripe as a user would.

The stack runs as a child process tree on free ports, against a fresh database,
with the session's broker and a topic prefix of its own. It starts its own
localstripe (no STRIPE_SECRET_KEY is set) and registers the ingester there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import stripe
from redis.asyncio import Redis

from payment.v1 import events_pb2
from paymentsvc.devstack import DEV_WEBHOOK_SECRET
from shared.devbroker import free_port
from tests.kafka_helpers import eventually, headers_of, read_topic

pytestmark = pytest.mark.e2e
READY_WITHIN_S = 60


@pytest.fixture
def dev_stack(tmp_path: Path, database_url: str, broker: str) -> Iterator[dict]:  # type: ignore[type-arg]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "API_KEYS"))}
    prefix = f"e2e{os.urandom(3).hex()}."
    env.update(
        DATABASE_URL=database_url,
        KAFKA_BOOTSTRAP_SERVERS=broker,
        KAFKA_TOPIC_PREFIX=prefix,
        **{name: str(free_port()) for name in ("GRPC_PORT", "GRPC_HTTP_PORT", "INGEST_PORT", "ENTITLEMENTS_PORT", "USAGE_PORT", "DUNNING_PORT")},
    )
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "paymentsvc.cli", "dev", "--log-dir", str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    stack_file = tmp_path / "stack.json"
    try:
        while not stack_file.exists():
            if process.poll() is not None or time.monotonic() - started > READY_WITHIN_S:
                output = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(f"dev stack not ready within {READY_WITHIN_S} s:\n{output[-3000:]}")
            time.sleep(0.2)
        stack = json.loads(stack_file.read_text())
        stack["ready_after_s"] = time.monotonic() - started
        stack["prefix"] = prefix
        stack["database_url"] = database_url
        stack["redis_url"] = env.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        yield stack
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("the dev stack did not stop on Ctrl-C")


def get_json(url: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_the_dev_stack_is_ready_within_a_minute_and_localstripe_events_reach_payment_events(
    dev_stack: dict,  # type: ignore[type-arg]
) -> None:
    assert dev_stack["ready_after_s"] < READY_WITHIN_S
    for url in dev_stack["services"].values():
        assert get_json(f"{url}/health/ready") == (200, {"status": "ready"})

    client = stripe.StripeClient("sk_test_e2e", base_addresses={"api": dev_stack["stripe_api_base"]})
    user_id = f"user_{os.urandom(4).hex()}"
    customer = client.v1.customers.create(params={"email": "e2e@example.com", "metadata": {"user_id": user_id}})
    # localstripe has no Prices; a Plan with the catalog's price id stands in for one.
    plan = client.v1.plans.create(
        params={"id": "price_basic_monthly", "amount": 900, "currency": "usd", "interval": "month", "product": {"name": "Basic"}}
    )
    payment_method = client.v1.payment_methods.create(
        params={"type": "card", "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}}
    )
    client.v1.payment_methods.attach(payment_method.id, params={"customer": customer.id})
    client.v1.customers.update(customer.id, params={"invoice_settings": {"default_payment_method": payment_method.id}})
    subscription = client.v1.subscriptions.create(
        params={"customer": customer.id, "items": [{"plan": plan.id}], "metadata": {"user_id": user_id}}
    )

    topic = f"{dev_stack['prefix']}payment-events"
    # localstripe sends its webhooks in no particular order, each after about a second.
    async def subscription_created() -> list:  # type: ignore[type-arg]
        records = await read_topic(dev_stack["kafka_bootstrap_servers"], topic, expect=0)
        events = [events_pb2.PaymentEvent.FromString(r.value) for r in records]
        return [(r, e) for r, e in zip(records, events, strict=True) if e.event_type == "customer.subscription.created"]

    found = await eventually(subscription_created, 30, interval=0.5)
    assert found, "no customer.subscription.created reached payment-events"
    records = [found[0][0]]
    created = [found[0][1]]
    event = created[0]
    assert (event.customer_id, event.subscription_id, event.user_id) == (customer.id, subscription.id, user_id)
    assert event.price_id == plan.id and event.status == "active"
    assert records[0].key == customer.id.encode()
    assert all(headers_of(r)["event-id"].startswith("evt_") for r in records)

    # The entitlements worker projects it: the subscription and the basic plan's features.
    async def projected() -> tuple | None:  # type: ignore[type-arg]
        with psycopg.connect(dev_stack["database_url"]) as conn:
            return conn.execute(
                "SELECT s.status, s.plan_id, count(e.*) FROM subscriptions s JOIN entitlements e"
                " ON e.source_id = s.subscription_id AND e.status = 'active'"
                " WHERE s.subscription_id = %s GROUP BY 1, 2",
                (subscription.id,),
            ).fetchone()

    row = await eventually(projected, 30)
    assert row is not None and row[:2] == ("active", "basic") and row[2] > 0
    redis = Redis.from_url(dev_stack["redis_url"])
    try:
        cached = await redis.hget(f"ent:user:{user_id}", "export_pdf")
        assert cached is not None and json.loads(cached)["allowed"] is True
    finally:
        await redis.aclose()

    with urllib.request.urlopen(f"{dev_stack['services']['ingest_webhooks']}/metrics") as response:  # noqa: ASYNC210
        assert "paymentsvc_webhooks_verified_total" in response.read().decode()
    assert DEV_WEBHOOK_SECRET not in json.dumps(get_json(f"{dev_stack['services']['ingest_webhooks']}/status")[1])


def test_send_webhook_signs_and_posts_an_event_the_dev_stack_accepts(dev_stack: dict) -> None:  # type: ignore[type-arg]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_")}
    result = subprocess.run(
        [sys.executable, "-m", "paymentsvc.cli", "send-webhook", "invoice.payment_failed",
         "--to", f"{dev_stack['services']['ingest_webhooks']}/webhooks/stripe"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("200 ") and '"published"' in result.stdout
    wrong = subprocess.run(
        [sys.executable, "-m", "paymentsvc.cli", "send-webhook", "invoice.paid", "--secret", "whsec_wrong",
         "--to", f"{dev_stack['services']['ingest_webhooks']}/webhooks/stripe"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert wrong.returncode == 1 and wrong.stdout.startswith("400 ")
