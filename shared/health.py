"""The HTTP health and metrics endpoints every service exposes.

- `/health`: every component with its status and probe latency (200, or 503 if any is down)
- `/health/live`: the process and its event loop answer (always 200 while they do)
- `/health/ready`: 200 only when every dependency answers, else 503; 503 `stopping` from
  the moment shutdown begins (SIGTERM), so load balancers stop sending before we stop
- `/metrics`: Prometheus text format; under `serve --processes N`, the sum of all the
  children's metrics (prometheus_client's multiprocess mode), whichever child answers
- `/status`: service, version, process id, uptime and the configuration without secrets

A service passes its probes as `name -> async callable`; a probe raises to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from shared.config import Settings
from shared.metrics import DEPENDENCY_UP, SERVICE_INFO, multiprocess, refresh_gauge_functions

Probe = Callable[[], Awaitable[object]]
PROBE_TIMEOUT_S = 2.0
GAUGE_REFRESH_S = 1.0


def _registry() -> CollectorRegistry:
    """What /metrics exposes: this process, or every child of `serve --processes N`."""
    if not multiprocess():
        return REGISTRY
    registry = CollectorRegistry()
    prometheus_multiprocess.MultiProcessCollector(registry)
    return registry


async def _refresh_gauges(_: web.Application) -> AsyncIterator[None]:
    """Write the callback gauges where the other children's /metrics can read them."""

    async def loop() -> None:
        while True:
            refresh_gauge_functions()
            await asyncio.sleep(GAUGE_REFRESH_S)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def _run_probe(name: str, probe: Probe) -> dict[str, object]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(probe(), PROBE_TIMEOUT_S)
        status, error = "up", None
    except Exception as exc:  # a probe's failure is reported, never raised
        status, error = "down", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    DEPENDENCY_UP.labels(name).set(1 if status == "up" else 0)
    result: dict[str, object] = {
        "status": status,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    if error:
        result["error"] = error[:200]
    return result


async def run_probes(probes: Mapping[str, Probe]) -> dict[str, dict[str, object]]:
    names = list(probes)
    results = await asyncio.gather(*(_run_probe(n, probes[n]) for n in names))
    return dict(zip(names, results, strict=True))


def add_health_routes(
    app: web.Application,
    service: str,
    settings: Settings,
    probes: Mapping[str, Probe],
    stopping: asyncio.Event | None = None,
) -> None:
    """Mount the health, metrics and status endpoints on `app`. Once `stopping` is set
    (the service's stop event), readiness answers 503 without probing."""
    started = time.time()
    SERVICE_INFO.labels(service, settings.service_version).set(1)
    registry = _registry()
    if multiprocess():
        app.cleanup_ctx.append(_refresh_gauges)

    async def health(_: web.Request) -> web.Response:
        components = await run_probes(probes)
        ok = all(c["status"] == "up" for c in components.values())
        return _json({"status": "up" if ok else "down", "components": components}, 200 if ok else 503)

    async def live(_: web.Request) -> web.Response:
        return _json({"status": "up"})

    async def ready(_: web.Request) -> web.Response:
        if stopping is not None and stopping.is_set():
            return _json({"status": "stopping"}, 503)
        components = await run_probes(probes)
        down = sorted(name for name, c in components.items() if c["status"] != "up")
        if down:
            return _json({"status": "not_ready", "down": down, "components": components}, 503)
        return _json({"status": "ready"})

    async def metrics(_: web.Request) -> web.Response:
        if multiprocess():
            refresh_gauge_functions()
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def status(_: web.Request) -> web.Response:
        return _json(
            {
                "service": service,
                "version": settings.service_version,
                "pid": os.getpid(),  # which process answered, under `serve --processes N`
                "uptime_s": round(time.time() - started, 1),
                "config": settings.public_view(),
            }
        )

    app.router.add_get("/health", health)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)


def postgres_probe(pool: AsyncConnectionPool) -> Probe:
    async def probe() -> None:
        async with pool.connection(timeout=PROBE_TIMEOUT_S) as conn:
            await conn.execute("SELECT 1")

    return probe


def redis_probe(client: Redis) -> Probe:
    async def probe() -> None:
        await client.ping()

    return probe


async def start_site(
    app: web.Application, host: str, port: int, shutdown_timeout_s: float = 5.0, reuse_port: bool = False
) -> web.AppRunner:
    """Serve `app` on host:port; returns the runner, to `cleanup()` on shutdown, which
    stops listening and gives requests in flight up to `shutdown_timeout_s` to finish.
    With `reuse_port`, other processes (`serve --processes N`) listen on the same port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port or None)
    await site.start()
    return runner
