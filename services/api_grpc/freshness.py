"""The projection's freshness for every read answer, cached ~100 ms per process.

One Postgres query per 100 ms at most, shared by concurrent callers (single flight).
When Postgres cannot answer, `get` returns None (and does not retry for a while), so
that answers Redis can serve still go out, with the subject's own watermark instead.

A value past its 100 ms is still answered, aged (its lag grows by its age), while one
refresh runs behind it, for up to STALE_S: a call never waits for the watermark query
unless there is no value that young. Otherwise the calls that arrive while the query
runs, ten times a second, would each wait for a Postgres round trip: about 1-3 % of the
checks, the p99 of CheckEntitlement (docs/performance.md, issue 13).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from services.api_grpc.queries import Watermark

TTL_S = 0.1
STALE_S = 1.0  # the oldest value answered while its refresh runs
RETRY_AFTER_FAILURE_S = 2.0
QUERY_TIMEOUT_S = 0.25


class FreshnessCache:
    def __init__(
        self, fetch: Callable[[float], Awaitable[Watermark | None]], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._value: Watermark | None = None
        self._valid_until = 0.0
        self._fetched_at = 0.0
        self._inflight: asyncio.Future[Watermark | None] | None = None

    def put(self, value: Watermark | None) -> None:
        """A watermark read in some other query's snapshot: fresh enough to reuse."""
        now = self._clock()
        self._value, self._fetched_at, self._valid_until = value, now, now + TTL_S

    async def get(self, timeout: float) -> Watermark | None:
        now = self._clock()
        if now < self._valid_until:
            return self._aged(now)
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._refresh(min(timeout, QUERY_TIMEOUT_S)))
        if self._value is not None and now - self._fetched_at < STALE_S:
            return self._aged(now)
        inflight = self._inflight
        return await asyncio.shield(inflight)

    def _aged(self, now: float) -> Watermark | None:
        # The lag grows while the cached value ages.
        if self._value is None:
            return None
        extra = int((now - self._fetched_at) * 1000)
        return Watermark(self._value.created, self._value.event_id, self._value.lag_ms + extra)

    async def _refresh(self, timeout: float) -> Watermark | None:
        try:
            value = await self._fetch(timeout)
        except Exception:  # Postgres down: answer without it for a while
            self._value = None
            self._valid_until = self._clock() + RETRY_AFTER_FAILURE_S
            return None
        finally:
            self._inflight = None
        self.put(value)
        return value
