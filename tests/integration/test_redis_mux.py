"""shared/redis_mux.py against the real Redis: one connection for every concurrent call,
each reply to its own caller (also when callers leave), redis-py's reply types for the
commands the API uses, NOSCRIPT handled, a lost connection failing its callers and the
next call connecting again, a stuck one dropped, the URL's database selected."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import urllib.parse
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from domain.usage.counters import Counters
from domain.usage.model import Period, Policy, Request
from shared.redis_mux import MultiplexedRedis
from tests.support.net import BlackholeProxy, silent_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@contextlib.asynccontextmanager
async def clients(redis_url: str) -> AsyncIterator[tuple[MultiplexedRedis, Redis]]:
    mux, plain = MultiplexedRedis(redis_url), Redis.from_url(redis_url)
    try:
        yield mux, plain
    finally:
        await mux.aclose()
        await plain.aclose()


async def test_concurrent_calls_share_one_connection_and_each_gets_its_own_reply(redis_url: str) -> None:
    async with clients(redis_url) as (mux, _):
        replies = await asyncio.gather(*(mux.execute_command("ECHO", f"call-{i}") for i in range(500)))
        assert replies == [f"call-{i}".encode() for i in range(500)]
        ids = await asyncio.gather(*(mux.execute_command("CLIENT", "ID") for _ in range(50)))
        assert len(set(ids)) == 1  # pipelined on one connection, not a pool


async def test_callers_that_leave_do_not_shift_the_replies_of_the_others(redis_url: str) -> None:
    async with clients(redis_url) as (mux, _):
        calls = [asyncio.ensure_future(mux.execute_command("ECHO", str(i))) for i in range(300)]
        await asyncio.sleep(0)  # all written in one flush
        for i in range(0, 300, 3):
            calls[i].cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
        for i, result in enumerate(results):
            if i % 3 == 0:
                assert isinstance(result, asyncio.CancelledError)
            else:
                assert result == str(i).encode()
        assert await mux.execute_command("ECHO", "after") == b"after"


async def test_replies_have_redis_pys_types_for_the_commands_the_api_uses(redis_url: str) -> None:
    key = f"mux:{secrets.token_hex(4)}"
    async with clients(redis_url) as (mux, plain):
        await plain.set(f"{key}:a", 12)
        for client in (mux, plain):
            assert await client.mget([f"{key}:a", f"{key}:none"]) == [b"12", None]
        source = "return {1, 'two', {3, false}, true, redis.call('GET', KEYS[1])}"
        expected = [1, b"two", [3, None], 1, b"12"]
        assert await mux.register_script(source)(keys=[f"{key}:a"]) == expected
        assert await plain.register_script(source)(keys=[f"{key}:a"]) == expected
        with pytest.raises(ResponseError, match="WRONGTYPE|wrong kind"):
            await mux.execute_command("LPUSH", f"{key}:a", "x")
        assert await mux.execute_command("GET", f"{key}:a") == b"12"  # an error answers one call only
        await plain.delete(f"{key}:a")


async def test_a_script_the_server_does_not_know_is_loaded_by_eval(redis_url: str) -> None:
    async with clients(redis_url) as (mux, plain):
        source = f"return '{secrets.token_hex(8)}'"  # new to this server: EVALSHA answers NOSCRIPT
        script = mux.register_script(source)
        assert (await plain.script_exists(script.sha)) == [False]
        assert await script() == source.split("'")[1].encode()
        assert (await plain.script_exists(script.sha)) == [True]  # EVAL cached it


async def test_a_killed_connection_fails_its_callers_and_the_next_call_connects_again(redis_url: str) -> None:
    async with clients(redis_url) as (mux, plain):
        own_id = await mux.execute_command("CLIENT", "ID")
        blocked = asyncio.ensure_future(mux.execute_command("BLPOP", f"mux:{secrets.token_hex(4)}", 5))
        await asyncio.sleep(0.1)
        await plain.execute_command("CLIENT", "KILL", "ID", own_id)
        with pytest.raises(RedisConnectionError, match="lost"):
            await asyncio.wait_for(blocked, 2)
        assert await mux.execute_command("CLIENT", "ID") != own_id
        assert await mux.ping()


async def test_a_stuck_connection_is_dropped_and_the_next_call_connects_again(redis_url: str) -> None:
    proxy = BlackholeProxy(urllib.parse.urlparse(redis_url).port or 6379)
    mux = MultiplexedRedis(f"redis://127.0.0.1:{proxy.port}/0", stall_after_s=0.3)
    try:
        assert await mux.ping()
        proxy.blackhole = True
        stuck = asyncio.ensure_future(mux.ping())
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):  # the caller's own bound
                await asyncio.shield(stuck)
        await asyncio.sleep(0.3)
        proxy.blackhole = False  # new connections pass; the old one stays swallowed
        assert await asyncio.wait_for(mux.ping(), 2)  # overdue reply: dropped, connected again
        with pytest.raises(RedisConnectionError, match="has not answered"):
            await stuck  # the call left behind was failed, not left hanging
    finally:
        await mux.aclose()
        proxy.close()


async def test_connecting_is_bounded_and_fails_with_a_connection_error() -> None:
    async with silent_server() as silent:  # accepts, never answers: only AUTH/SELECT would wait
        mux = MultiplexedRedis(silent.url.replace("/0", "/2"), connect_timeout_s=0.2)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await mux.ping()  # SELECT 2 is never answered: bounded by the caller
        await mux.aclose()
    refused = MultiplexedRedis("redis://127.0.0.1:1/0", connect_timeout_s=0.5)
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await refused.ping()


async def test_the_urls_database_is_selected(redis_url: str) -> None:
    parts = urllib.parse.urlsplit(redis_url)
    other = urllib.parse.urlunsplit(parts._replace(path="/3"))
    key = f"mux:{secrets.token_hex(4)}"
    async with clients(other) as (mux, plain):
        await mux.execute_command("SET", key, "in-3", "EX", 60)
        assert await plain.get(key) == b"in-3"
        async with Redis.from_url(redis_url) as db0:
            assert await db0.get(key) is None


async def test_the_usage_counters_count_alike_on_both_clients(redis_url: str) -> None:
    """The increment script and the quota's MGET give the same answers over either client."""
    prefix = f"mux:{secrets.token_hex(4)}:"
    async with clients(redis_url) as (mux, plain):
        await plain.set(f"{prefix}usage:ready", "1", ex=60)
        policy = Policy("api_calls", "pro", "user", "u1", None, 3, True, False, -1, Period(0, 2**40), "u1", "")
        steps = []
        for n, client in enumerate((mux, plain, mux, plain)):
            counters = Counters(client, prefix)
            steps.append(await counters.increment(Request(f"key-{n}", policy, 1, 0), 1.0))
        assert [s.outcome.allowed for s in steps] == [True, True, True, False]
        assert [s.outcome.used for s in steps] == [1, 2, 3, 3]
        again = await Counters(mux, prefix).increment(Request("key-1", policy, 1, 0), 1.0)
        assert again.replayed and again.record == steps[1].record
        counter, _ = Counters(mux, prefix).keys.of(policy)
        assert await Counters(mux, prefix).read([counter]) == await Counters(plain, prefix).read([counter]) == [3]
        keys = [k async for k in plain.scan_iter(match=f"{prefix}*")]
        await plain.delete(*keys)


def test_only_plain_redis_urls_are_multiplexed() -> None:
    from services.api_grpc.bootstrap import counters_client

    assert isinstance(counters_client("redis://127.0.0.1:6379/0"), MultiplexedRedis)
    for url in ("rediss://127.0.0.1:6380/0", "unix:///var/run/redis.sock"):
        assert isinstance(counters_client(url), Redis)  # redis-py's, untouched
        with pytest.raises(ValueError, match="speaks redis://"):
            MultiplexedRedis(url)
