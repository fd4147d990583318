"""The Redis side of entitlement reads: the projection's hashes, read and filled.

Layout (written by services/entitlements/projection.py): key
`{prefix}ent:{subject_type}:{subject_id}`, fields `<feature_code>` -> JSON answer and
`_watermark`. A key exists iff its hash has `_watermark`. A fill from Postgres writes
only when the key does not exist (one Lua script, atomic in Redis), so it never
overwrites a fresher hash the worker wrote meanwhile; the worker always deletes and
rewrites the whole hash, so a fill is in turn replaced by the next change.

With a near cache (near_cache.py), whole hashes are served from process memory while
the change feed is live and the entry is younger than its max age; otherwise the same
reads as without it (whole hashes, so that what is read can be cached).

Every call goes through the Redis circuit breaker and a timeout (the caller's, at most
CALL_TIMEOUT_S): a Redis that is down or slow makes `read` raise CacheUnavailable, and
readers use Postgres. The timeout is an `asyncio.timeout` scope, not the client's socket
timeout (which costs a task per command; bootstrap.redis_client).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import redis.exceptions
from redis.asyncio import Redis

from domain.entitlements import REDIS_TTL_S, WATERMARK_FIELD, parse_hash, redis_key
from services.api_grpc.near_cache import ChangeFeed, NearCache
from services.api_grpc.validation import SubjectKey
from shared.breaker import Breaker, BreakerOpen
from shared.metrics import API_NEAR_CACHE_READS

# Bound once: a labels() lookup costs about 2.5 µs, and every check counts one read.
_NEAR_HIT = API_NEAR_CACHE_READS.labels("hit")
_NEAR_MISS = API_NEAR_CACHE_READS.labels("miss")
_NEAR_BYPASS = API_NEAR_CACHE_READS.labels("bypass")

# A subject with no rows gets a hash with only the watermark: a cached "nothing", so
# that free-plan subjects do not go to Postgres on every check. Shorter-lived.
EMPTY_TTL_S = 300
# The longest one Redis call of the API waits when its caller has more time left: what
# the client's socket timeout gave before, so that a hung Redis still leaves a check the
# time to answer from Postgres. Also the bound of the increment script (usage.py).
CALL_TIMEOUT_S = 2.0
_FILL_IF_ABSENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""

Fields = dict[str, Any]


class CacheUnavailable(RuntimeError):
    """Redis did not answer (down, slow, or its breaker is open)."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError | TimeoutError | OSError)




class EntitlementCache:
    def __init__(self, client: Redis, breaker: Breaker, prefix: str = "", near: NearCache | None = None) -> None:
        self._client = client
        self._breaker = breaker
        self._prefix = prefix
        self._fill = client.register_script(_FILL_IF_ABSENT)
        self.near = near
        self.feed = ChangeFeed(client, near, prefix) if near is not None else None
        self._keys: dict[SubjectKey, str] = {}

    def start(self) -> None:
        """Start the near cache's change feed (also done by the first read)."""
        if self.feed is not None:
            self.feed.start()

    async def aclose(self) -> None:
        if self.feed is not None:
            await self.feed.aclose()

    @property
    def client(self) -> Redis:
        return self._client

    def key(self, subject: SubjectKey) -> str:
        key = self._keys.get(subject)
        if key is None:
            key = redis_key(self._prefix, subject)
            if len(self._keys) < 100_000:
                self._keys[subject] = key
        return key

    async def read_features(
        self, subjects: Sequence[SubjectKey], feature_code: str, timeout: float
    ) -> list[Fields | None]:
        """The answer of one feature (and the watermark) for each subject, in one
        MULTI so a user and their family are read from the same moment. With a near
        cache, whole hashes (a superset)."""
        if self.near is not None:
            return await self.read_all(subjects, timeout)
        fields = (feature_code, WATERMARK_FIELD)

        async def run() -> list[Any]:
            async with self._client.pipeline(transaction=len(subjects) > 1) as pipe:
                for subject in subjects:
                    pipe.hmget(self.key(subject), fields)
                return list(await pipe.execute())

        results = await self._guarded(run, timeout)
        names = [f.encode() for f in fields]
        return [
            parse_hash({n: v for n, v in zip(names, values, strict=True) if v is not None})
            for values in results
        ]

    async def read_all(self, subjects: Sequence[SubjectKey], timeout: float) -> list[Fields | None]:
        """Whole hashes of `subjects`, from one MULTI/EXEC: one consistent snapshot
        (or all from the near cache; a single miss reads them all again from Redis)."""
        near = self.near
        keys = [self.key(s) for s in subjects]
        if near is not None:
            usable = near.usable()
            if self.feed is not None and not usable:
                self.feed.start()
            cached = [near.get(k) for k in keys]
            if None not in cached:
                _NEAR_HIT.inc()
                return cached
            (_NEAR_MISS if usable else _NEAR_BYPASS).inc()
            token = near.begin(keys)
            hashes = None
            try:
                hashes = await self._read_all(keys, timeout)
            finally:
                near.finish(keys, token, hashes)
            return hashes
        return await self._read_all(keys, timeout)

    async def _read_all(self, keys: Sequence[str], timeout: float) -> list[Fields | None]:
        async def run() -> list[Any]:
            if len(keys) == 1:
                return [await self._client.hgetall(keys[0])]  # type: ignore[misc]
            async with self._client.pipeline(transaction=True) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                return list(await pipe.execute())

        return [parse_hash(raw) for raw in await self._guarded(run, timeout)]

    async def fill(self, fields_by_subject: Mapping[SubjectKey, Mapping[str, bytes]], timeout: float) -> None:
        """Write each subject's hash unless its key exists. Best effort: never raises."""

        async def run() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for subject, fields in fields_by_subject.items():
                    ttl = REDIS_TTL_S if len(fields) > 1 else EMPTY_TTL_S
                    args: list[Any] = [ttl]
                    for name, value in fields.items():
                        args += [name, value]
                    await self._fill(keys=[self.key(subject)], args=args, client=pipe)
                await pipe.execute()

        try:
            await self._guarded(run, timeout)
        except CacheUnavailable:
            pass  # the next miss fills it

    async def _guarded(self, fn: Any, timeout: float) -> Any:
        timeout = min(timeout, CALL_TIMEOUT_S)

        async def timed() -> Any:
            async with asyncio.timeout(timeout):
                return await fn()

        try:
            return await self._breaker.call(timed)
        except BreakerOpen as exc:
            raise CacheUnavailable(str(exc)) from exc
        except Exception as exc:
            if is_transient(exc):
                raise CacheUnavailable(f"redis: {type(exc).__name__}") from exc
            raise
