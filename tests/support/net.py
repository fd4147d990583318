"""Network helpers of the tests: a port that refuses connections, and a small HTTP stub
that counts the requests reaching it."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from aiohttp import web


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses every connection for as long as the block runs:
    the socket is bound (so no other process can take the port) but never listens.
    Unlike a port that was merely free a moment ago, nothing can start answering on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


@dataclass
class CountingHttp:
    """Every request is counted and answered `status` with `body`."""

    url: str = ""
    requests: int = 0
    status: int = 503
    body: dict[str, object] = field(default_factory=lambda: {"error": {"type": "api_error", "message": "stub"}})


@contextlib.asynccontextmanager
async def counting_http(status: int = 503) -> AsyncIterator[CountingHttp]:
    stub = CountingHttp(status=status)

    async def answer(request: web.Request) -> web.Response:
        stub.requests += 1
        return web.json_response(stub.body, status=stub.status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    stub.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield stub
    finally:
        await runner.cleanup()
