"""The budget of the usage hot path (issue 13): one Redis round trip per IncrementUsage
(the increment script: limit, counter and idempotency record together) and per
CheckQuota (one MGET), counted at the counters' client the server uses (one pipelined
connection, bootstrap.counters_client), so a second round trip added to either path
fails here. The rate limiter's lease refills (one script call per
lease of up to 100 calls, more often when a slow machine lets leases expire) are the
only other commands, and are told apart by their script."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from services.api_grpc.interceptors import _TOKEN_BUCKET
from tests.conftest import random_id
from tests.integration.test_api_grpc import WRITE, auth
from tests.integration.test_usage_api import Served, Stack, inc, quota, served, stack  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
CALLS = 100


async def test_an_increment_and_a_quota_check_each_make_one_redis_round_trip(
    served: Served, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    user = random_id("user_")
    await served.stub.IncrementUsage(inc(user), metadata=auth(WRITE))  # policy cached, scripts loaded
    await quota(served.stub, user)
    refill = hashlib.sha1(_TOKEN_BUCKET.encode()).hexdigest()
    sent: list[str] = []
    real = served.counters.execute_command

    async def counting(*args: Any, **kw: Any) -> Any:
        if not (args[0] == "EVALSHA" and args[1] == refill):  # the rate limiter's lease refill
            sent.append(str(args[0]))
        return await real(*args, **kw)

    monkeypatch.setattr(served.counters, "execute_command", counting)
    for _ in range(CALLS):
        await served.stub.IncrementUsage(inc(user), metadata=auth(WRITE))
    increments, sent[:] = list(sent), []
    for _ in range(CALLS):
        await quota(served.stub, user)
    checks = list(sent)
    assert increments == ["EVALSHA"] * CALLS, sorted(set(increments))
    assert checks == ["MGET"] * CALLS, sorted(set(checks))
