"""What the gRPC ratio benchmarks (bench/grpc_checks.py, bench/usage.py) share: their
server processes, ours and the trivial handler's, N of each on one port each with
`--processes N`, and the load on them from N client processes.

Like for like: N API processes share one port (SO_REUSEPORT and a shared
prometheus_client multiprocess directory, as `paymentsvc serve api_grpc --processes N`
runs its children), N trivial handlers share another, and the load comes from N
client processes with 4 connections each, every connection its own (a local
subchannel pool), since the kernel spreads connections over the listeners, not calls.
With N=1: one process per side and one connection, as before `--processes` existed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import uvloop

from payment.v1 import service_pb2_grpc

# In the environment, so that the spawned server processes (--processes) share it.
KEY = os.environ.setdefault("BENCH_API_KEY", "bench-" + secrets.token_hex(4))
METADATA = (("authorization", f"Bearer {KEY}"),)
START_TIMEOUT = 60.0
_listening: Any = None  # in a server process: where to say that it listens


def listening() -> None:
    """To be called by a server process once its server listens (after `server.start()`)."""
    _listening.put(os.getpid())


async def trivial_server(servicer: service_pb2_grpc.PaymentServiceServicer, port: int) -> None:
    """The baseline: a grpc.aio server with only `servicer`, on a port it may share."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    service_pb2_grpc.add_PaymentServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    listening()
    await server.wait_for_termination()


def _serve(kind: str, run: Callable[..., Awaitable[None]], started: Any, *args: Any) -> None:
    import logging

    global _listening
    _listening = started
    from paymentsvc.runner import tune_gc

    logging.disable(logging.INFO)
    # Ours as `paymentsvc serve` runs it (BENCH_DEFAULT_GC=1: the interpreter's defaults, to
    # price them). The trivial handler keeps the defaults: with serve's threshold it ran
    # slower here (lower QPS in 4 runs of 4, docs/performance.md), and a handicapped
    # baseline would flatter the ratios.
    if kind != "trivial" and os.environ.get("BENCH_DEFAULT_GC") != "1":
        tune_gc()
    uvloop.run(run(*args))


@contextmanager
def servers(
    n: int, trivial: Callable[[int], Awaitable[None]], trivial_port: int,
    api: Callable[..., Awaitable[None]], api_port: int, api_args: tuple[Any, ...],
) -> Iterator[None]:
    """N processes of `trivial(trivial_port)` and N of `api(api_port, *api_args, reuse_port)`
    (reuse_port: N > 1), their pids printed for py-spy; stopped on leaving. Entered once every
    one of them listens (each calls `listening()`): a connection made earlier would be
    refused, or with N > 1 go to the processes already up and unbalance the load.

    With N > 1 spawned, so that prometheus_client is imported after PROMETHEUS_MULTIPROC_DIR
    is set (this process imported it already); `trivial` and `api` must then be module-level
    functions of a module the children can import (the benchmark run as a script is)."""
    metrics_dir = None
    if n > 1:
        metrics_dir = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    ctx = mp.get_context("spawn" if n > 1 else "fork")
    started: Any = ctx.Queue()
    procs = [ctx.Process(target=_serve, args=("trivial", trivial, started, trivial_port)) for _ in range(n)] + [
        ctx.Process(target=_serve, args=("api", api, started, api_port, *api_args, n > 1)) for _ in range(n)
    ]
    try:
        for proc in procs:
            proc.start()
        print(f"server pids: trivial {[p.pid for p in procs[:n]]}, api {[p.pid for p in procs[n:]]}", flush=True)
        up: set[int] = set()
        deadline = time.monotonic() + START_TIMEOUT
        while len(up) < len(procs):
            dead = [f"{p.pid} (exit {p.exitcode})" for p in procs if not p.is_alive()]
            if dead:
                raise RuntimeError(f"server processes exited before the load: {', '.join(dead)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server processes not listening after {START_TIMEOUT:.0f} s: "
                                   f"{[p.pid for p in procs if p.pid not in up]}")
            try:
                up.add(started.get(timeout=0.2))
            except queue.Empty:
                pass
        yield
    finally:
        for proc in procs:
            if proc.pid is not None:
                proc.terminate()
                proc.join()
        if metrics_dir is not None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(metrics_dir, ignore_errors=True)


def channels(port: int, connections: int) -> list[grpc.aio.Channel]:
    # A local subchannel pool: each channel its own connection, for SO_REUSEPORT to spread.
    return [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(connections)]


def summary(lat: list[float], seconds: float) -> dict[str, float]:
    lat = sorted(lat)
    q = statistics.quantiles(lat, n=100)
    return {"qps": len(lat) / seconds, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}


Load = Callable[[int, Any, int, float, int], Awaitable[list[float]]]


def _client(load: Load, port: int, kind: Any, inflight: int, seconds: float, connections: int, out: Any) -> None:
    out.put(uvloop.run(load(port, kind, inflight, seconds, connections)))


def measure(load: Load, port: int, kind: Any, inflight: int, seconds: float, clients: int = 1) -> dict[str, float]:
    """`inflight` calls at all times, from `clients` processes (4 connections each if more
    than one), each running `load(port, kind, its share of inflight, seconds, connections)`,
    which returns the latencies of the calls it made."""
    queue: Any = mp.Queue()
    procs = [mp.Process(target=_client, args=(load, port, kind, inflight // clients, seconds,
                                              1 if clients == 1 else 4, queue))
             for _ in range(clients)]
    for proc in procs:
        proc.start()
    lat = [x for _ in procs for x in queue.get(timeout=seconds + 60)]  # a client that died raises here
    for proc in procs:
        proc.join()
    return summary(lat, seconds)
