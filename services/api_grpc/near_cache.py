"""A near cache of entitlement hashes in each API replica, kept correct by the
projection's change feed and bounded in staleness by a maximum age.

What is cached: the decoded Redis hash of a subject (`domain.entitlements.parse_hash` of `HGETALL
{prefix}ent:{type}:{id}`), keyed by that Redis key, with the monotonic time it was
read. The data only, never a decision: `expires_at` and `grace_until` are still
evaluated against the clock on every call (decisions.decide). Absent keys are not
cached (a miss goes to Redis, then Postgres, as before). At most `max_entries`
subjects, least recently used evicted first.

The change feed: when the entitlements worker writes a batch's hashes (one Lua script,
atomic like MULTI/EXEC; live mode only), the same script then PUBLISHes the batch's
keys, newline-separated, on `{prefix}ent:changes` (CHANGES_CHANNEL). `ChangeFeed`
subscribes in each replica (a background task with a reconnect loop) and evicts those
keys.

Why an answer is never staler than it would be from Redis by more than `max_age_s`:

1. Every entry is younger than `max_age_s`; older ones are re-read from Redis. This
   holds whatever happens to the feed (a publish that failed after the write, a
   message lost): it is the hard bound.
2. Within that bound, invalidation makes it much tighter. Redis delivers a PUBLISH
   after the write it follows (same worker connection, in order), and to this
   replica's subscription in order with PING replies. A read of Redis that *started*
   after the invalidation of its key was processed here sees the new hash. A read
   that started before may return the old hash after the invalidation was processed
   (the read's reply and the message come on different connections): so each read
   takes a token (`begin`) and `finish` drops the result when its key was invalidated
   after the token (`_invalidated` tracks only keys with a read in flight, so it stays
   small). After the feed reconnects, results of reads begun before are dropped too.
3. The near cache is used only while the subscription is known to be live: subscribed
   and heard from (a message or the reply to our PING) within `liveness_s`. When it is
   not, every call bypasses the near cache (reads Redis, caches nothing) and the cache
   is emptied, because invalidations may have been missed; it is used again once the
   subscription is re-established (which empties it once more).

So with the feed up, a change is reflected as soon as the replica has processed its
message (typically well under a millisecond after the worker's write); with the feed
down or silent, answers come straight from Redis after at most `liveness_s`; and in
every case no cached entry is served past `max_age_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from redis.asyncio import Redis

from domain.entitlements import changes_channel

log = logging.getLogger("api_grpc.near_cache")

MAX_ENTRIES = 50_000
MAX_AGE_S = 1.0
LIVENESS_S = 1.0
PING_EVERY_S = 0.25
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 2.0
CALL_TIMEOUT_S = 1.0  # subscribe, ping, close: each answered in well under a millisecond

Fields = dict[str, Any]


def decode_keys(data: bytes | str) -> list[str]:
    text = data.decode() if isinstance(data, bytes) else data
    return [k for k in text.split("\n") if k]


class NearCache:
    """The LRU of decoded subject hashes and its rules (see the module docstring).

    Synchronous and single-threaded (the event loop's thread); `clock` is monotonic.
    """

    def __init__(
        self,
        *,
        max_entries: int = MAX_ENTRIES,
        max_age_s: float = MAX_AGE_S,
        liveness_s: float = LIVENESS_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self.liveness_s = liveness_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Fields]] = OrderedDict()
        self._subscribed = False
        self._heard_at = -math.inf
        self._seq = 0
        self._reset_seq = 0
        self._reading: dict[str, int] = {}
        self._invalidated: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------ the feed's side

    def subscribed(self) -> None:
        """The subscription is (re-)established: start afresh."""
        self._reset()
        self._subscribed = True
        self._heard_at = self._clock()

    def unsubscribed(self) -> None:
        """The subscription is lost: bypass until `subscribed`."""
        self._subscribed = False
        self._reset()

    def heard(self) -> None:
        """Any sign of life on the subscription (a message, a PING reply)."""
        self._heard_at = self._clock()

    def invalidate(self, keys: Iterable[str]) -> None:
        self._seq += 1
        for key in keys:
            self._entries.pop(key, None)
            if key in self._reading:
                self._invalidated[key] = self._seq

    def _reset(self) -> None:
        self._entries.clear()
        self._seq += 1
        self._reset_seq = self._seq

    # ------------------------------------------------------------ the readers' side

    def usable(self) -> bool:
        return self._subscribed and self._clock() - self._heard_at <= self.liveness_s

    def get(self, key: str) -> Fields | None:
        """The cached hash, if the cache is usable and the entry young enough."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not self.usable():
            self._entries.clear()
            return None
        if self._clock() - entry[0] > self.max_age_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def begin(self, keys: Sequence[str]) -> int:
        """Before reading `keys` from Redis: a token for `finish`."""
        for key in keys:
            self._reading[key] = self._reading.get(key, 0) + 1
        return self._seq

    def finish(self, keys: Sequence[str], token: int, values: Sequence[Fields | None] | None) -> None:
        """After the read (values None: it failed). Caches what is still known current."""
        store = values is not None and token >= self._reset_seq and self.usable()
        now = self._clock()
        for i, key in enumerate(keys):
            if store and values is not None:
                value = values[i]
                if value is not None and self._invalidated.get(key, -1) <= token:
                    self._entries[key] = (now, value)
                    self._entries.move_to_end(key)
            left = self._reading[key] - 1
            if left:
                self._reading[key] = left
            else:
                del self._reading[key]
                self._invalidated.pop(key, None)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class ChangeFeed:
    """Subscribes to the change channel and keeps `near` informed; reconnects forever."""

    def __init__(
        self, client: Redis, near: NearCache, prefix: str = "", ping_every_s: float = PING_EVERY_S,
        call_timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        self._client = client
        self._call_timeout_s = call_timeout_s
        self._near = near
        self.channel = changes_channel(prefix)
        self._ping_every_s = ping_every_s
        self._task: asyncio.Task[None] | None = None
        self._was_subscribed = False
        self.pubsub: Any = None  # the current subscription's PubSub (diagnostics, tests)

    def start(self) -> None:
        """Start the background task (idempotent; needs a running loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="near-cache-feed")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._near.unsubscribed()

    async def _run(self) -> None:
        backoff = RECONNECT_MIN_S
        while True:
            self._was_subscribed = False
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("near-cache change feed lost; bypassing the near cache",
                            extra={"error": f"{type(exc).__name__}: {exc}"})
            self._near.unsubscribed()
            backoff = RECONNECT_MIN_S if self._was_subscribed else min(RECONNECT_MAX_S, backoff * 2)
            await asyncio.sleep(backoff)

    async def _listen(self) -> None:
        pubsub = self.pubsub = self._client.pubsub()
        # Every await is bounded here (the API's client has no socket timeout, see
        # bootstrap.redis_client): a Redis that accepts and never answers fails the
        # subscription within `call_timeout_s`, and the loop reconnects.
        bound = self._call_timeout_s
        try:
            async with asyncio.timeout(bound):
                await pubsub.subscribe(self.channel)
            heard = time.monotonic()
            next_ping = time.monotonic() + self._ping_every_s
            while True:
                now = time.monotonic()
                if now - heard > self._near.liveness_s:
                    raise TimeoutError("the change feed is silent")
                if now >= next_ping:
                    async with asyncio.timeout(bound):
                        await pubsub.ping()
                    next_ping = now + self._ping_every_s
                wait = max(0.01, next_ping - time.monotonic())
                async with asyncio.timeout(wait + bound):  # get_message's own timeout covers the read only
                    message = await pubsub.get_message(timeout=wait)
                if message is None:
                    continue
                kind = message["type"]
                kind = kind.decode() if isinstance(kind, bytes) else kind
                if kind == "subscribe":
                    self._near.subscribed()
                    self._was_subscribed = True
                    heard = time.monotonic()
                    continue
                heard = time.monotonic()
                self._near.heard()
                if kind == "message":
                    self._near.invalidate(decode_keys(message["data"]))
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(bound):
                    await pubsub.aclose()
