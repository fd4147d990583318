"""Network helpers of the tests: a port that refuses connections, a server that accepts
and never answers, a small HTTP stub that counts the requests reaching it, and a proxy
that can swallow what clients send."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from aiohttp import web


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on the port now."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


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
class Silent:
    """A TCP server on 127.0.0.1:`port` that accepts every connection, reads what is sent
    and never answers (a hung Redis, a frozen peer): `connections` counts the accepts."""

    port: int = 0
    connections: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[Silent]:
    silent = Silent()
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.connections += 1
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    silent.port = server.sockets[0].getsockname()[1]
    try:
        yield silent
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


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


class BlackholeProxy:
    """A TCP proxy to 127.0.0.1:`upstream` that can swallow what clients send.

    With `blackhole` set, bytes from clients are read and dropped, never delivered:
    a write the client believes it sent never reaches the server (unlike a frozen
    server, whose kernel still buffers the bytes and delivers them on SIGCONT).
    Threads, so that tests may block while it runs.
    """

    def __init__(self, upstream: int) -> None:
        import threading

        self.upstream = upstream
        self.blackhole = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if not (from_client and self.blackhole):
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()
