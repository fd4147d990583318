"""IncrementUsage's publish without a task of its own: the call waits for the producer's
delivery future, and what follows from the delivery (keep, or roll back) hangs on that
future, whether or not the call is still there. Fakes for Redis and the bus, no I/O."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError
from prometheus_client import REGISTRY

from domain.usage.counters import Step
from domain.usage.model import Outcome, Request
from payment.v1 import events_pb2
from services.api_grpc import page_tokens
from services.api_grpc.decisions import Decision, Facts
from services.api_grpc.errors import Unavailable
from services.api_grpc.usage import UsageApi
from services.api_grpc.validation import SubjectIds
from shared.catalog import load_catalog
from shared.config import DEFAULT_CATALOG_PATH

FACTS = Facts.of(load_catalog(DEFAULT_CATALOG_PATH))
SUBJECT = SubjectIds("u1", "")


class Entitled:
    async def check(self, subject: SubjectIds, feature_code: str, timeout: float) -> tuple[Decision, None]:
        return Decision(True, "granted", "free", "active", 0, "full", "evt_1", 1000, "month"), None


class FakeCounters:
    def __init__(self) -> None:
        self.used = 0
        self.rolled_back: list[Step] = []

    async def increment(self, request: Request, now: float) -> Step:
        self.used += request.amount
        return Step(Outcome(True, self.used, request.amount, 0, False, request), b"P|record", False)

    async def rollback(self, step: Step) -> bool:
        self.rolled_back.append(step)
        self.used -= step.outcome.applied
        return True


class FakeBus:
    """`send` hands back a delivery future the test resolves; `handed` is set once it has."""

    def __init__(self) -> None:
        self.acks: list[asyncio.Future[Any]] = []
        self.handed = asyncio.Event()
        self.hold = asyncio.Event()
        self.hold.set()

    async def send(self, event: events_pb2.UsageEvent) -> asyncio.Future[Any]:
        await self.hold.wait()
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        self.handed.set()
        return ack

    async def publish(self, event: events_pb2.UsageEvent, timeout: float) -> None:
        raise AssertionError("a bus with `send` is never asked to publish")


def usage_api() -> tuple[UsageApi, FakeCounters, FakeBus]:
    counters, bus = FakeCounters(), FakeBus()
    api = UsageApi(FACTS, Entitled(), None, counters, bus, page_tokens.PageTokens(page_tokens.derive_key("t")))  # type: ignore[arg-type]
    return api, counters, bus


def increment(api: UsageApi, key: str = "k1", timeout: float = 5.0) -> asyncio.Task[Any]:
    return asyncio.create_task(api.increment(SUBJECT, "api_calls", 3, key, {}, timeout))


def failures() -> float:
    return REGISTRY.get_sample_value("paymentsvc_usage_publish_failures_total") or 0.0


async def test_an_acknowledged_increment_starts_no_task_of_its_own_and_keeps_its_count() -> None:
    api, counters, bus = usage_api()
    loop = asyncio.get_running_loop()
    started: list[Any] = []

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        started.append(coro)
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(counting)  # type: ignore[arg-type]
    try:
        call = increment(api)
        for _ in range(100):  # not wait_for: that would start a task of the test's own
            if bus.acks:
                break
            await asyncio.sleep(0)
        bus.acks[0].set_result("metadata")
        done = await call
    finally:
        loop.set_task_factory(None)
    assert (done.answer.allowed, done.answer.used) == (True, 3)
    assert len(started) == 1  # the call's own; the old path also settled each increment in a task
    assert counters.rolled_back == [] and api._in_flight == set() and api._settling == set()


async def test_a_delivery_that_fails_while_the_call_waits_is_rolled_back_before_the_answer() -> None:
    api, counters, bus = usage_api()
    before = failures()
    call = increment(api)
    await asyncio.wait_for(bus.handed.wait(), 5)
    bus.acks[0].set_exception(KafkaTimeoutError())
    with pytest.raises(Unavailable, match="did not acknowledge"):
        await call
    assert len(counters.rolled_back) == 1 and counters.used == 0  # undone before the answer
    assert failures() == before + 1
    assert await api.drain(1.0) == 0 and len(counters.rolled_back) == 1


@pytest.mark.parametrize("lands", [True, False])
async def test_a_call_cancelled_while_its_event_is_in_flight_still_settles(lands: bool) -> None:
    api, counters, bus = usage_api()
    call = increment(api)
    await asyncio.wait_for(bus.handed.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert counters.used == 3 and not bus.acks[0].cancelled()  # the delivery goes on
    if lands:
        bus.acks[0].set_result("metadata")
    else:
        bus.acks[0].set_exception(KafkaTimeoutError())
    assert await api.drain(1.0) == 0
    assert counters.used == (3 if lands else 0)
    assert len(counters.rolled_back) == (0 if lands else 1)


async def test_a_call_past_its_deadline_answers_unavailable_and_the_count_settles_on_its_own() -> None:
    api, counters, bus = usage_api()
    call = increment(api, timeout=0.2)
    await asyncio.wait_for(bus.handed.wait(), 5)
    with pytest.raises(Unavailable, match="settles on its own"):
        await call
    bus.acks[0].set_exception(KafkaTimeoutError())
    assert await api.drain(1.0) == 0
    assert counters.used == 0 and len(counters.rolled_back) == 1


async def test_a_call_cancelled_before_its_event_was_handed_over_is_rolled_back() -> None:
    api, counters, bus = usage_api()
    bus.hold.clear()  # the producer's buffer is full: send waits
    call = increment(api)
    for _ in range(100):
        if counters.used:
            break
        await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await api.drain(1.0) == 0
    assert counters.used == 0 and len(counters.rolled_back) == 1 and bus.acks == []
