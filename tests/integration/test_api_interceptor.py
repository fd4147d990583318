"""The API's one interceptor on a real in-process grpc.aio server (port 0), in front of a
servicer that raises what a test asks for: every concern in one pass, each as the
chain of seven interceptors did it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psycopg
import pytest
import redis.exceptions
from prometheus_client import REGISTRY
from pydantic import SecretStr

from payment.v1 import service_pb2, service_pb2_grpc
from services.api_grpc import interceptors
from services.api_grpc.context import CALLER
from services.api_grpc.errors import NotFound, RateLimited
from shared.breaker import BreakerOpen
from shared.config import ApiKey

pytestmark = pytest.mark.integration
Code = grpc.StatusCode
READER = ApiKey("reader-" + __name__[-6:], SecretStr("k-reader-secret"), frozenset({"read"}))
INTERCEPTORS_FILE = interceptors.__file__


class Raising(service_pb2_grpc.PaymentServiceServicer):
    """GetPayment raises `self.error` (if any) after recording what the handler saw."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.sleep_s = 0.0
        self.calls = 0
        self.callers: list[str] = []
        self.interceptor_frames: list[int] = []

    async def GetPayment(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls += 1
        self.callers.append(CALLER.get())
        frame, frames = sys._getframe(), 0
        while frame is not None:  # every awaiting coroutine is on the stack while this runs
            frames += frame.f_code.co_filename == INTERCEPTORS_FILE
            frame = frame.f_back  # type: ignore[assignment]
        self.interceptor_frames.append(frames)
        if self.sleep_s:
            await asyncio.sleep(self.sleep_s)
        if self.error is not None:
            raise self.error
        return service_pb2.GetPaymentResponse(payment=service_pb2.Payment(payment_id=request.payment_id))


class FakeLimiter:
    """A RateLimiter without Redis: `take` spends `tokens`, then `admit` refuses."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.admits = 0

    def take(self, caller: str) -> bool:
        if self.tokens > 0:
            self.tokens -= 1
            return True
        return False

    async def admit(self, caller: str) -> None:
        self.admits += 1
        raise RateLimited("rate limit of 1/s exceeded for this API key", 2.5)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Raising, service_pb2_grpc.PaymentServiceStub, FakeLimiter]]:
    servicer, limiter = Raising(), FakeLimiter(10_000)
    server = grpc.aio.server(interceptors=[interceptors.CallInterceptor([READER], limiter)])  # type: ignore[arg-type]
    service_pb2_grpc.add_PaymentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield servicer, service_pb2_grpc.PaymentServiceStub(channel), limiter
    await server.stop(0)


AUTH = (("authorization", "Bearer k-reader-secret"),)


def handled(code: str) -> float:
    return REGISTRY.get_sample_value("paymentsvc_api_handled_total", {"method": "GetPayment", "code": code}) or 0.0


async def call(stub: service_pb2_grpc.PaymentServiceStub, **kw: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetPayment(service_pb2.GetPaymentRequest(payment_id="pi_1"), **kw)
    return info.value


async def test_the_handler_runs_under_one_frame_of_the_interceptor_and_sees_the_callers_name(served) -> None:
    servicer, stub, _ = served
    answer = await stub.GetPayment(service_pb2.GetPaymentRequest(payment_id="pi_1"), metadata=AUTH)
    assert answer.payment.payment_id == "pi_1"
    assert servicer.interceptor_frames == [1]  # the chain of seven had 14 (two per layer)
    assert servicer.callers == [READER.name]


@pytest.mark.parametrize(("error", "code", "message"), [
    (NotFound("no payment 'pi_1'"), Code.NOT_FOUND, "no payment 'pi_1'"),
    (psycopg.OperationalError("boom"), Code.UNAVAILABLE, "the database is unavailable; retry later"),
    (redis.exceptions.ConnectionError("boom"), Code.UNAVAILABLE, "the cache is unavailable; retry later"),
    (BreakerOpen("stripe"), Code.UNAVAILABLE, "stripe is unavailable; retry later"),
])
async def test_errors_become_their_status_code_and_message_and_are_counted_under_it(
    served, error: Exception, code: grpc.StatusCode, message: str
) -> None:
    servicer, stub, _ = served
    servicer.error = error
    before = handled(code.name)
    refused = await call(stub, metadata=AUTH)
    assert (refused.code(), refused.details()) == (code, message)
    assert handled(code.name) == before + 1
    assert servicer.calls == 1


async def test_an_unexpected_error_is_internal_with_an_id_logged_with_its_traceback_never_sent(
    served, caplog: pytest.LogCaptureFixture
) -> None:
    servicer, stub, _ = served
    servicer.error = KeyError("secret detail")
    before = handled("INTERNAL")
    with caplog.at_level(logging.INFO, logger="api_grpc"):
        refused = await call(stub, metadata=AUTH)
    assert refused.code() == Code.INTERNAL
    assert "secret detail" not in (refused.details() or "")
    error_id = (refused.details() or "").removeprefix("internal error (error id ").removesuffix(")")
    assert len(error_id) == 12
    [logged] = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged.levelno == logging.ERROR and logged.exc_info is not None
    [line] = [r for r in caplog.records if r.getMessage() == "rpc"]
    assert (line.levelno, line.code, line.key) == (logging.WARNING, "INTERNAL", READER.name)  # type: ignore[attr-defined]
    assert handled("INTERNAL") == before + 1


async def test_no_key_or_an_unknown_one_is_unauthenticated_before_the_handler(served) -> None:
    servicer, stub, _ = served
    assert (await call(stub)).code() == Code.UNAUTHENTICATED
    assert (await call(stub, metadata=(("authorization", "Bearer nope"),))).code() == Code.UNAUTHENTICATED
    assert servicer.calls == 0


async def test_a_method_outside_the_keys_scopes_is_permission_denied(served) -> None:
    servicer, stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.UpdatePaymentStatus(service_pb2.UpdatePaymentStatusRequest(), metadata=AUTH)
    assert info.value.code() == Code.PERMISSION_DENIED and "'admin'" in (info.value.details() or "")


async def test_an_empty_lease_asks_the_limiter_and_a_refusal_carries_retry_after(served) -> None:
    servicer, stub, limiter = served
    limiter.tokens = 1
    await stub.GetPayment(service_pb2.GetPaymentRequest(payment_id="pi_1"), metadata=AUTH)
    assert limiter.admits == 0  # spent from the lease, no await
    refused = await call(stub, metadata=AUTH)
    assert refused.code() == Code.RESOURCE_EXHAUSTED
    assert dict(refused.trailing_metadata() or ())["retry-after"] == "3"
    assert (limiter.admits, servicer.calls) == (1, 1)


async def test_a_handler_past_the_clients_deadline_is_deadline_exceeded_and_counted_so(served) -> None:
    servicer, stub, _ = served
    servicer.sleep_s = 5.0
    before = handled("DEADLINE_EXCEEDED")
    refused = await call(stub, metadata=AUTH, timeout=0.3)
    assert refused.code() == Code.DEADLINE_EXCEEDED
    for _ in range(500):  # the server's side finishes just after the client's (later under load)
        if handled("DEADLINE_EXCEEDED") == before + 1:
            break
        await asyncio.sleep(0.02)
    assert handled("DEADLINE_EXCEEDED") == before + 1
