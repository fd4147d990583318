"""IncrementUsage's event and Kafka record, built the cheaper way (issue 13), are the bytes
the earlier code built: each `reference_*` below is that code as it was, kept here to
compare against. The event id is a contract (the worker's inbox drops copies by it)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from domain.usage import model
from domain.usage.counters import Counters
from domain.usage.model import Outcome, Period, Policy, Request
from payment.v1 import events_pb2
from services.api_grpc.usage import KafkaUsageBus
from shared import tracing
from shared.kafka import CE_SOURCES, OutgoingMessage

# ---------------------------------------------------------------- the code as it was


def reference_event_id(idempotency_key: str) -> str:
    return "usage_" + hashlib.sha256(b"usage\x00" + idempotency_key.encode()).hexdigest()[:32]


def reference_usage_event(outcome: Outcome) -> events_pb2.UsageEvent:
    r = outcome.request
    p = r.policy
    return events_pb2.UsageEvent(
        event_id=reference_event_id(r.idempotency_key), idempotency_key=r.idempotency_key,
        subject_type=p.pool_type, subject_id=p.pool_id, user_id=p.member or p.user_id, family_id=p.family_id,
        feature_code=p.feature_code, amount=outcome.applied, period_start=p.period.start,
        period_end=p.period.end, created_ms=r.created_ms, metadata=dict(r.metadata), used_after=outcome.used,
        limit=p.limit, over_soft_limit=not p.hard and p.limit >= 0 and outcome.used > p.limit, plan_id=p.plan_id,
        member_cap=p.member_cap if p.member is not None and p.member_cap >= 0 else None,
    )


def reference_rfc3339(unix_seconds: float) -> str:
    return datetime.fromtimestamp(unix_seconds, UTC).isoformat().replace("+00:00", "Z")


def reference_event_headers(event_id: str, event_type: str, message: str, occurred_at: float) -> list[Any]:
    return [
        ("event-id", event_id.encode()),
        ("event-type", event_type.encode()),
        ("schema-version", b"1"),
        ("content-type", f"application/x-protobuf; messageType=payment.v1.{message}".encode()),
        *tracing.trace_headers(),
        ("ce_specversion", b"1.0"),
        ("ce_id", event_id.encode()),
        ("ce_source", CE_SOURCES[message].encode()),
        ("ce_type", f"payment.v1.{message}.{event_type}".encode()),
        ("ce_time", reference_rfc3339(occurred_at or time.time()).encode()),
    ]


def reference_message(topic: str, event: events_pb2.UsageEvent) -> OutgoingMessage:
    headers = reference_event_headers(event.event_id, "usage.recorded", "UsageEvent", event.created_ms / 1000)
    return OutgoingMessage(topic, event.subject_id.encode(), event.SerializeToString(), tuple(headers),
                           "usage.recorded")


# ---------------------------------------------------------------- requests of every shape

MONTH = Period(1_896_652_800, 1_899_331_200)  # 2030-02


def policy(**kw: Any) -> Policy:
    base: dict[str, Any] = dict(
        feature_code="api_calls", plan_id="free", pool_type="user", pool_id="u1", member=None, limit=1000,
        hard=True, allow_release=False, member_cap=-1, period=MONTH, user_id="u1", family_id="",
    )
    base.update(kw)
    return Policy(**base)


POLICIES = {
    "user, hard": policy(),
    "family pool, no member": policy(plan_id="pro", pool_type="family", pool_id="fam1", user_id="", family_id="fam1",
                                     limit=500_000, period=Period(1_896_000_000, 1_898_592_000)),
    "family member with a cap, soft": policy(
        feature_code="ai_credits", plan_id="pro", pool_type="family", pool_id="fam1", member="u7", limit=5000,
        hard=False, member_cap=2500, user_id="u7", family_id="fam1"),
    "family member, no cap": policy(pool_type="family", pool_id="fam2", member="u8", user_id="u8", family_id="fam2"),
    "unlimited, releasable, period none": policy(
        feature_code="projects", limit=model.UNLIMITED, allow_release=True,
        period=Period(model.NONE_START, model.NONE_END)),
    "soft, limit 0": policy(hard=False, limit=0),
}
METADATA: list[dict[str, str]] = [{}, {"file": "a.txt"}, {"z": "1", "a": "2", "ünï": "cødé ✓"}]
# (allowed, used, applied, member_used): allowed, over a soft limit, denied, a clamped release
OUTCOMES = [(True, 7, 3, 0), (True, 1003, 3, 2501), (False, 999, 0, 0), (True, 0, -2, 0)]
CREATED_MS = [1_900_000_000_000, 1_900_000_000_700, 1_900_000_000_001, 1_896_652_800_999]


def cases() -> Iterator[tuple[str, Request, tuple[bool, int, int, int]]]:
    for name, p in POLICIES.items():
        for i, metadata in enumerate(METADATA):
            for j, shape in enumerate(OUTCOMES):
                amount = shape[2] if shape[2] else 5
                key = f"key-{name}-{i}-{j}" if j % 2 else f"ключ/{i}{j}:✓"
                created = CREATED_MS[(i + j) % len(CREATED_MS)]
                yield f"{name}/{i}/{j}", Request(key, p, amount, created, dict(metadata)), shape


def record(request: Request, shape: tuple[bool, int, int, int], state: bytes = b"P") -> bytes:
    """The record as the increment script writes it."""
    allowed, used, applied, member_used = shape
    return b"|".join([state, b"1" if allowed else b"0", str(used).encode(), str(applied).encode(),
                      str(member_used).encode(), request.context()])


CASES = list(cases())


# ---------------------------------------------------------------- the event


def test_the_event_id_is_sha256_of_usage_nul_and_the_key_as_it_always_was() -> None:
    assert model.event_id_for("k1") == "usage_" + hashlib.sha256(b"usage\x00k1").hexdigest()[:32]
    assert model.event_id_for("k1") == "usage_b454432d506178a12d1b16d8ea777f36"  # pinned (main computed it): never changes
    for key in ["", "a", "key-1", "ключ ✓", "x" * 255, "usage\x00", *(f"run{i}" for i in range(200))]:
        assert model.event_id_for(key) == reference_event_id(key), key
    assert model.event_id_for("a") == model.event_id_for("a") != model.event_id_for("b")  # the prefix is not consumed


@pytest.mark.parametrize(("request_", "shape"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_new_step_builds_the_event_the_decoded_record_built(request_: Request, shape: tuple[bool, int, int, int]) -> None:
    raw = record(request_, shape)
    kept = model.parse_record(raw, request_)  # a new step: the request the call holds
    decoded = model.parse_record(raw)  # what it was: the context decoded back
    assert kept == decoded and kept.request is request_
    event = model.usage_event(kept)
    expected = reference_usage_event(decoded)
    assert event == expected
    assert event.SerializeToString() == expected.SerializeToString()
    assert event.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


@pytest.mark.parametrize(("request_", "shape"), [c[1:] for c in CASES[::5]], ids=[c[0] for c in CASES[::5]])
def test_the_kafka_record_of_an_event_is_the_one_built_before(request_: Request, shape: tuple[bool, int, int, int]) -> None:
    event = model.usage_event(model.parse_record(record(request_, shape), request_))
    bus = KafkaUsageBus(None, "usage-events")  # type: ignore[arg-type]
    random.seed(13)  # the fresh traceparent outside any span
    message = bus._message(event)
    random.seed(13)
    assert message == reference_message("usage-events", event)


# ---------------------------------------------------------------- the counters' step


class Script:
    """The increment script's reply without Redis: a record once, then that record."""

    def __init__(self, shape: tuple[bool, int, int, int]) -> None:
        self.shape = shape
        self.records: dict[str, bytes] = {}

    async def __call__(self, keys: list[str], args: list[Any]) -> list[bytes]:
        stored = self.records.get(keys[2])
        if stored is not None:
            return [b"dup", stored]
        allowed, used, applied, member_used = self.shape
        stored = self.records[keys[2]] = b"P|%d|%d|%d|%d|%s" % (allowed, used, applied, member_used, args[6])
        return [b"new", stored]


class ScriptRedis:
    def __init__(self, script: Script) -> None:
        self.script = script

    def register_script(self, source: str) -> Script:
        return self.script


@pytest.mark.parametrize(("request_", "shape"), [c[1:] for c in CASES[::3]], ids=[c[0] for c in CASES[::3]])
def test_a_replayed_record_is_decoded_and_rebuilds_the_very_event_of_the_new_step(
    request_: Request, shape: tuple[bool, int, int, int]
) -> None:
    counters = Counters(ScriptRedis(Script(shape)))  # type: ignore[arg-type]
    first = asyncio.run(counters.increment(request_, 1_900_000_000.0))
    assert not first.replayed and first.outcome.request is request_  # not decoded back
    # a retry: another Request object (another clock), the first one's record
    retry = Request(request_.idempotency_key, request_.policy, request_.amount, request_.created_ms + 5000,
                    dict(request_.metadata))
    again = asyncio.run(counters.increment(retry, 1_900_000_005.0))
    assert again.replayed and again.record == first.record
    assert again.outcome == first.outcome and again.outcome.request is not retry  # the first request, decoded
    assert model.usage_event(again.outcome).SerializeToString() == model.usage_event(first.outcome).SerializeToString()
