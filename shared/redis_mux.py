"""One Redis connection shared by every call of a process, its commands pipelined.

redis-py's asyncio client gives each concurrent command a connection of its own from a
pool: with 64 calls in flight, 64 sockets, and each command pays its own `write`, its
own readiness event and its own `read`, plus the pool's checkout and redis-py's retry
and parser layers. In a grpc.aio server that cost about 100 µs of the event loop per
round trip; the same round trip over one pipelined connection, about 25 µs
(docs/performance.md, issue 13). This is the auto-pipelining that ioredis and Lettuce
do by default:

- every command of a loop iteration is written in one `write` (flushed by a
  `call_soon`), and Redis answers a connection's commands in order, so each reply
  resolves the oldest waiting future;
- a caller that gives up (its own `asyncio.timeout`, a cancellation) leaves its future
  behind; its reply, when it comes, is read and dropped. The command may still run, as
  with any client once a command is sent;
- a lost connection fails every waiting call with redis' ConnectionError, and the next
  command connects again (within `connect_timeout_s`). Nothing is retried here: a
  caller decides whether its command may run twice;
- a reply overdue by more than `stall_after_s` means the connection is stuck (a peer
  gone without a FIN, a frozen server): the next command closes it, failing the calls
  still waiting, and connects again, as redis-py drops a connection whose command timed
  out. Callers bound their own calls and give up much sooner.

Only what the API's hot paths use: `execute_command`, `mget` and `register_script`
(EVALSHA, falling back to EVAL on NOSCRIPT), with redis-py's reply types for them
(RESP2, bytes) and redis-py's exceptions, so that callers written against redis-py
work unchanged. Big replies and blocking commands do not belong on it: one slow reply
holds up every call behind it.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

CRLF = b"\r\n"


def encode(args: Sequence[Any]) -> bytes:
    """One command in RESP: an array of bulk strings (str, bytes, int, float)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int | float) and not isinstance(arg, bool):
            data = repr(arg).encode()
        else:
            raise TypeError(f"a Redis argument is bytes, str, int or float, not {type(arg).__name__}")
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(CRLF)
    return b"".join(out)


class Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


def parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """The RESP2 reply at `pos` and the position after it; raises Incomplete. An error
    reply is returned as a ResponseError (not raised): it answers one command only."""
    end = buf.find(CRLF, pos)
    if end < 0:
        raise Incomplete
    kind = buf[pos]
    nxt = end + 2
    if kind == 0x24:  # $ bulk string
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, nxt
        if len(buf) < nxt + n + 2:
            raise Incomplete
        return buf[nxt:nxt + n], nxt + n + 2
    if kind == 0x3A:  # : integer
        return int(buf[pos + 1:end]), nxt
    if kind == 0x2A:  # * array
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, nxt
        items = []
        for _ in range(n):
            item, nxt = parse(buf, nxt)
            items.append(item)
        return items, nxt
    if kind == 0x2B:  # + simple string
        return buf[pos + 1:end], nxt
    if kind == 0x2D:  # - error
        message = buf[pos + 1:end].decode(errors="replace")
        return (NoScriptError if message.startswith("NOSCRIPT") else ResponseError)(message), nxt
    raise RedisConnectionError(f"Redis sent a reply this client cannot read (type byte {kind!r})")


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: MultiplexedRedis) -> None:
        self._owner = owner

    def data_received(self, data: bytes) -> None:
        self._owner._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lost(self, exc)


class Script:
    """A Lua script run by EVALSHA, loaded by EVAL when the server does not know it
    (redis-py's AsyncScript, for this client)."""

    def __init__(self, client: MultiplexedRedis, source: str) -> None:
        self._client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return await self._client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self._client.execute_command("EVAL", self.source, len(keys), *keys, *args)


class MultiplexedRedis:
    def __init__(self, url: str, *, connect_timeout_s: float = 1.0, stall_after_s: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            # rediss:// (TLS) would be a create_connection(ssl=...) away, but nothing here can
            # test it: such a URL keeps redis-py's client (bootstrap.counters_client).
            raise ValueError(f"MultiplexedRedis speaks redis://, not {parts.scheme}://")
        self._host = parts.hostname or "localhost"
        self._port = parts.port or 6379
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        self._hello: list[tuple[Any, ...]] = []
        if password:
            self._hello.append(("AUTH", user, password) if user else ("AUTH", password))
        db = parts.path.lstrip("/")
        if db and db != "0":
            self._hello.append(("SELECT", int(db)))
        self._connect_timeout_s = connect_timeout_s
        self._stall_after_s = stall_after_s
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._closed = False
        # Futures waiting for a reply, oldest first, with when each was written.
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._out: list[bytes] = []
        self._buffer = b""

    def __repr__(self) -> str:
        return f"MultiplexedRedis({self._host}:{self._port})"

    # ------------------------------------------------------------------ commands

    async def execute_command(self, *args: Any) -> Any:
        """Send one command and return its reply; raises ResponseError for an error
        reply, redis' ConnectionError when the connection fails."""
        if self._transport is None or self._stalled():
            await self._connect()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(encode(args))
        self._waiting.append((future, time.monotonic()))
        reply = await future
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def mget(self, keys: Sequence[Any]) -> list[bytes | None]:
        reply: list[bytes | None] = await self.execute_command("MGET", *keys)
        return reply

    def register_script(self, source: str) -> Script:
        return Script(self, source)

    async def ping(self) -> bool:
        return await self.execute_command("PING") == b"PONG"

    async def aclose(self) -> None:
        self._closed = True
        self._drop(RedisConnectionError("the client was closed"))

    # ------------------------------------------------------------------ connection

    def _stalled(self) -> bool:
        if self._waiting and time.monotonic() - self._waiting[0][1] > self._stall_after_s:
            self._drop(RedisConnectionError(
                f"Redis at {self._host}:{self._port} has not answered for {self._stall_after_s} s: reconnecting"
            ))
            return True
        return False

    async def _connect(self) -> None:
        if self._closed:
            raise RedisConnectionError("the client was closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                transport, protocol = await loop.create_connection(
                    lambda: _Protocol(self), self._host, self._port,
                )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(
                f"cannot connect to Redis at {self._host}:{self._port}: {type(exc).__name__} {exc}"
            ) from exc
        self._transport, self._protocol, self._buffer = transport, protocol, b""  # type: ignore[assignment]
        for command in self._hello:
            # Answered before any other command's reply: they are written first.
            await self.execute_command(*command)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is None:
            return  # dropped meanwhile: its waiters have failed
        self._transport.write(b"".join(out))

    def _received(self, protocol: _Protocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        buf = self._buffer + data if self._buffer else data
        pos = 0
        waiting = self._waiting
        try:
            while pos < len(buf):
                reply, pos = parse(buf, pos)
                if not waiting:
                    raise RedisConnectionError("Redis sent a reply nobody asked for")
                future = waiting.popleft()[0]
                if not future.done():
                    future.set_result(reply)
        except Incomplete:
            pass
        except (RedisConnectionError, ValueError) as exc:
            self._drop(exc if isinstance(exc, RedisConnectionError) else RedisConnectionError(str(exc)))
            return
        self._buffer = buf[pos:]

    def _lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is self._protocol:
            self._drop(RedisConnectionError(f"the connection to Redis at {self._host}:{self._port} was lost: {exc}"))

    def _drop(self, exc: RedisConnectionError) -> None:
        """Close the connection and fail every call waiting on it."""
        transport, self._transport, self._protocol = self._transport, None, None
        self._out, self._buffer = [], b""
        waiting, self._waiting = self._waiting, collections.deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(exc)
        if transport is not None:
            transport.abort()
