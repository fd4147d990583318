"""The shared health endpoints, with real and unreachable dependencies."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from shared.config import Settings
from shared.db import make_pool
from shared.devbroker import free_port
from shared.health import add_health_routes, postgres_probe, redis_probe

pytestmark = pytest.mark.integration


async def serve(probes, stopping: asyncio.Event | None = None) -> TestServer:  # type: ignore[no-untyped-def]
    app = web.Application()
    add_health_routes(app, "test", Settings(STRIPE_SECRET_KEY="sk_test_hidden"), probes, stopping)  # type: ignore[call-arg]
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def get(server: TestServer, path: str) -> tuple[int, dict | str]:  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as session, session.get(server.make_url(path)) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def test_ready_is_200_when_every_dependency_answers(database_url: str, redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    pool = make_pool(database_url, min_size=1)
    await pool.open(wait=True)
    server = await serve({"postgres": postgres_probe(pool), "redis": redis_probe(redis)})
    try:
        assert await get(server, "/health/ready") == (200, {"status": "ready"})
        status, body = await get(server, "/health")
        assert status == 200 and body["components"]["postgres"]["status"] == "up"  # type: ignore[index]
        assert body["components"]["redis"]["latency_ms"] >= 0  # type: ignore[index]
    finally:
        await server.close()
        await redis.aclose()
        await pool.close()


async def test_ready_is_503_and_names_the_dependency_that_is_down(redis_url: str) -> None:
    down_url = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    redis = Redis.from_url(redis_url)
    pool = make_pool(down_url, min_size=0)
    await pool.open(wait=False)
    server = await serve({"postgres": postgres_probe(pool), "redis": redis_probe(redis)})
    try:
        status, body = await get(server, "/health/ready")
        assert status == 503 and body["down"] == ["postgres"]  # type: ignore[index]
        assert (await get(server, "/health/live"))[0] == 200, "liveness does not depend on dependencies"
        status, metrics = await get(server, "/metrics")
        assert status == 200 and 'paymentsvc_dependency_up{dependency="postgres"} 0.0' in metrics  # type: ignore[operator]
    finally:
        await server.close()
        await redis.aclose()
        await pool.close()


async def test_status_shows_the_version_and_config_but_no_secret() -> None:
    server = await serve({})
    try:
        status, body = await get(server, "/status")
        assert status == 200 and body["service"] == "test" and body["uptime_s"] >= 0  # type: ignore[index]
        assert body["config"]["stripe_secret_key"] == "set"  # type: ignore[index]
        assert "sk_test_hidden" not in str(body)
    finally:
        await server.close()


async def test_ready_turns_503_stopping_the_moment_shutdown_begins_while_live_stays_200(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    stopping = asyncio.Event()
    server = await serve({"redis": redis_probe(redis)}, stopping)
    try:
        assert await get(server, "/health/ready") == (200, {"status": "ready"})
        stopping.set()  # what SIGTERM does to every service
        assert await get(server, "/health/ready") == (503, {"status": "stopping"})
        assert (await get(server, "/health/live"))[0] == 200
    finally:
        await server.close()
        await redis.aclose()
