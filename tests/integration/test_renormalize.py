"""`paymentsvc renormalize` on the real broker and Postgres: an event our parser once
refused is archived and dead-lettered by the ingester, and after the fix it is
published with its own event id and applied once by the entitlements worker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from paymentsvc.dev.samples import sample_event
from services.ingest_webhooks import handlers
from services.ingest_webhooks.normalize import MalformedEvent
from services.ingest_webhooks.renormalize import Selection, renormalize
from shared.config import Topics
from shared.devbroker import free_port
from shared.errors import ConfigurationError, DependencyUnavailable
from tests.integration.test_entitlements_worker import entitlements_worker, fingerprints, live_db  # noqa: F401
from tests.integration.test_ingest_webhooks import Ingester, signed_headers, start_ingester
from tests.kafka_helpers import headers_of, read_topic

pytestmark = pytest.mark.integration
FIXTURES = Path(__file__).parent.parent / "fixtures" / "stripe"
GUEST_CHARGE = FIXTURES / "privatestorageio_charge_succeeded.json"


@pytest.fixture
async def ingester(broker: str, topics: Topics) -> AsyncIterator[Ingester]:
    async for ingester in start_ingester(broker, topics):
        yield ingester


def _broken(event: dict[str, Any]) -> Any:
    """A normalizer with a bug: it refuses every charge."""
    if event.get("type", "").startswith("charge."):
        raise MalformedEvent("malformed Stripe event: data.object: a deliberate bug for the test")
    return _real_normalize(event)


_real_normalize = handlers.normalize


def payments_of(url: str, charge_id: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT payment_id, customer_id, status, amount, last_event_id FROM payments WHERE charge_id = %s",
            (charge_id,),
        ).fetchall()


def processed(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM processed_events WHERE consumer = 'entitlements'").fetchone()
        return int(row[0]) if row else 0


async def test_an_event_dead_lettered_by_a_broken_normalizer_is_republished_after_the_fix_and_applied_once(
    ingester: Ingester, broker: str, topics: Topics, live_db: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    body = GUEST_CHARGE.read_bytes()  # a real guest charge: no customer, no payment intent
    event = orjson.loads(body)
    invoice = sample_event("invoice.paid")
    monkeypatch.setattr(handlers, "normalize", _broken)
    status, answer = await ingester.post(body, signed_headers(body))
    assert (status, answer["status"]) == (200, "archived_unnormalized")
    status, answer = await ingester.post_event(invoice)
    assert (status, answer["status"]) == (200, "published")
    monkeypatch.undo()  # the fix is deployed

    dry = await renormalize(broker, topics, Selection(from_dlq=True), apply=False)
    assert (dry.by_type, [m.headers[0] for m in dry.messages]) == (
        {"charge.succeeded": 1},
        [("event-id", event["id"].encode())],
    )
    assert len(await read_topic(broker, topics.payment_events, expect=1)) == 1  # the invoice only

    async with entitlements_worker(broker, topics.payment_events, live_db) as progress:
        await progress.until_finished(1)
        first = await renormalize(broker, topics, Selection(from_dlq=True), apply=True)
        assert len(first.messages) == 1
        await progress.until_finished(2)
        charge = event["data"]["object"]
        assert payments_of(live_db, charge["id"]) == [(charge["id"], None, "succeeded", 100, event["id"])]
        before = fingerprints(live_db), processed(live_db)

        second = await renormalize(broker, topics, Selection(event_ids=frozenset({event["id"]})), apply=True)
        assert len(second.messages) == 1
        await progress.until_finished(3)  # applied as a duplicate: the inbox has its id
        assert (fingerprints(live_db), processed(live_db)) == before

    republished = [r for r in await read_topic(broker, topics.payment_events, expect=3) if headers_of(r)["event-id"] == event["id"]]
    assert len(republished) == 2 and {r.key for r in republished} == {charge["id"].encode()}


async def test_a_time_range_selects_by_when_the_raw_event_was_archived(
    ingester: Ingester, broker: str, topics: Topics
) -> None:
    from datetime import UTC, datetime, timedelta

    status, _ = await ingester.post_event(sample_event("charge.refunded"))
    assert status == 200
    now = datetime.now(UTC)
    inside = await renormalize(broker, topics, Selection(since=now - timedelta(hours=1)), apply=False)
    outside = await renormalize(broker, topics, Selection(until=now - timedelta(hours=1)), apply=False)
    assert (len(inside.messages), len(outside.messages)) == (1, 0)


def test_a_bad_selection_is_a_clear_error() -> None:
    from datetime import UTC, datetime

    t = datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(ConfigurationError, match="bad range"):
        Selection(since=t, until=t)
    with pytest.raises(ConfigurationError, match="exactly one"):
        Selection()
    with pytest.raises(ConfigurationError, match="exactly one"):
        Selection(from_dlq=True, event_ids=frozenset({"evt_1"}))


async def test_an_unreachable_broker_is_a_dependency_error() -> None:
    with pytest.raises(DependencyUnavailable, match="kafka"):
        await renormalize(f"127.0.0.1:{free_port()}", Topics(), Selection(from_dlq=True), apply=False, timeout_s=2)


def paymentsvc(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-m", "paymentsvc.cli", "renormalize", *args],
        env=full_env, capture_output=True, text=True, timeout=120,
    )


async def test_the_command_dry_runs_by_default_and_applies_with_apply(
    ingester: Ingester, broker: str, topics: Topics
) -> None:
    event = sample_event("charge.failed")
    status, _ = await ingester.post_event(event)
    assert status == 200
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker, "KAFKA_TOPIC_PREFIX": topics.prefix}

    dry = await asyncio.to_thread(paymentsvc, "--event-id", event["id"], **env)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.strip().splitlines()
    assert "charge.failed 1" in lines[0] and event["id"] in lines[1]
    assert lines[-1].startswith(f"would publish 1 event(s) to {topics.payment_events}")

    applied = await asyncio.to_thread(paymentsvc, "--event-id", event["id"], "--apply", **env)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.strip().splitlines()[-1] == (
        f"published 1 event(s) to {topics.payment_events} with their original event ids"
    )
    assert len(await read_topic(broker, topics.payment_events, expect=2)) == 2


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--since", "2026-02-01", "--until", "2026-01-01"), ("bad range",)),
        (("--since", "yesterday"), ("bad range", "--since")),
        ((), ("exactly one",)),
    ],
)
def test_a_bad_range_is_a_one_line_error(args: tuple[str, ...], words: tuple[str, ...]) -> None:
    result = paymentsvc(*args, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(word in lines[0] for word in words)


def test_an_unreachable_broker_is_a_one_line_error() -> None:
    result = paymentsvc("--from-dlq", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    lines = [line for line in result.stderr.splitlines() if line.strip() and "reading the archive" not in line]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: kafka"), result.stderr
