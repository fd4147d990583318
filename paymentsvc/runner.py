"""Running one service as production would: `paymentsvc serve NAME`.

Each service package has a `bootstrap` module, its composition root, with
`async def serve(settings, stop)`. `serve` runs until `stop` is
set (SIGTERM or SIGINT), then shuts down in order and returns.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from shared import tracing
from shared.config import SERVICE_NAMES, Settings
from shared.errors import ConfigurationError


def load(name: str) -> ModuleType:
    if name not in SERVICE_NAMES:
        raise ConfigurationError(f"unknown service {name!r}; known: {', '.join(SERVICE_NAMES)}")
    return importlib.import_module(f"services.{name}.bootstrap")


async def run_until_signalled(name: str, settings: Settings) -> None:
    """Run one service until SIGINT or SIGTERM."""
    module = load(name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    provider = tracing.setup(name)  # one per process, from the OTEL_* variables
    try:
        await module.serve(settings, stop)
    finally:
        if provider is not None:
            tracing.shutdown(provider)  # exports the spans still batched, within a bound


def tune_gc() -> None:
    """The collector as `serve` sets it (also by the benchmarks' servers, to measure what
    production runs)."""
    # Everything imported so far lives for the whole process: move it out of the
    # collector's sight, and collect the young generation less often. A request
    # allocates many short-lived objects (JSON, models, protobuf); with the
    # default threshold of 700 a collection ran every few requests.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def run(name: str, settings: Settings) -> None:
    """Blocking entry point, on uvloop where it is installed (30-50 % faster here)."""
    tune_gc()
    try:
        import uvloop

        uvloop.run(run_until_signalled(name, settings))
    except ImportError:
        asyncio.run(run_until_signalled(name, settings))


# ---------------------------------------------------------------- several processes
# The services that answer requests can run as N processes sharing their ports with
# SO_REUSEPORT (the kernel spreads new connections over the listeners), each with its
# own event loop, pools and producer: a Python process uses one core, so this is how
# one host's cores are used. The workers scale by replicas in their consumer group.
MULTI_PROCESS_SERVICES = ("api_grpc", "ingest_webhooks")
_SERVING_PORTS = {"api_grpc": ("grpc_port", "grpc_http_port"), "ingest_webhooks": ("ingest_port",)}
log = logging.getLogger("paymentsvc.runner")


def _check_ports_free(name: str, settings: Settings) -> None:
    """Refuse to start on a port someone holds: with SO_REUSEPORT on, a bind next to a
    stale listener of the same user would succeed and share its traffic silently."""
    for field in _SERVING_PORTS[name]:
        port = getattr(settings, field)
        with socket.socket() as sock:
            try:
                sock.bind((settings.bind_host, port))
            except OSError as exc:
                raise ConfigurationError(f"{field.upper()} {settings.bind_host}:{port} is in use ({exc.strerror})") from None


def _metrics_dir() -> tuple[Path, bool]:
    """PROMETHEUS_MULTIPROC_DIR if the operator set one (emptied: prometheus_client
    requires a clean directory per run), else a fresh temporary one removed at exit."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return path, False
    return Path(tempfile.mkdtemp(prefix="paymentsvc-metrics-")), True


def supervise(name: str, settings: Settings, processes: int) -> int:
    """Run `processes` children of `paymentsvc serve NAME` on the same ports; return the exit status.

    SIGTERM or SIGINT is passed on to every child, which drains as a single process
    does (not ready, SHUTDOWN_DELAY_S, calls in flight); the status is 0 when all exit 0.
    A child that exits on its own is a failure of the whole: the others are stopped
    the same way and the status is the child's (1 if it exited 0), so the orchestrator
    restarts the pod rather than a half-sized server living on unnoticed.
    """
    from prometheus_client import multiprocess

    from shared.devbroker import die_with_parent

    if name not in MULTI_PROCESS_SERVICES:
        raise ConfigurationError(
            f"--processes applies to {', '.join(MULTI_PROCESS_SERVICES)}; scale {name} by replicas in its consumer group"
        )
    _check_ports_free(name, settings)
    metrics_dir, owned = _metrics_dir()
    env = {**os.environ, "REUSE_PORT": "true", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda sig, _frame: stopping.append(sig))
    signal.signal(signal.SIGINT, lambda sig, _frame: stopping.append(sig))
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "paymentsvc", "serve", name], env=env, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        for _ in range(processes)
    ]
    log.info("started", extra={"serving": name, "pids": [c.pid for c in children]})
    status = 0
    try:
        while not stopping:
            exited = [c for c in children if c.poll() is not None]
            if exited:
                child = exited[0]
                status = child.returncode if child.returncode > 0 else 1
                log.error("a child exited on its own; stopping the others",
                          extra={"serving": name, "pid": child.pid, "returncode": child.returncode})
                break
            time.sleep(0.1)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        # Each child bounds its own drain; this only catches one that hangs past it.
        deadline = time.monotonic() + settings.shutdown_delay_s + settings.shutdown_timeout_s + 10
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("a child did not stop in time; killed", extra={"serving": name, "pid": child.pid})
                child.kill()
                child.wait()
            if child.returncode != 0 and status == 0:
                status = child.returncode if child.returncode > 0 else 1
            multiprocess.mark_process_dead(child.pid, str(metrics_dir))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        if owned:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return status
