"""Webhook ingest throughput and latency, against a bare aiohttp handler.

Starts Tansu, the real ingester (`paymentsvc serve ingest_webhooks`, as
production runs it) and a baseline server that only reads the body and answers
200, each in its own process. The same load generator (this process, aiohttp,
one connection per in-flight request) posts the same pre-signed realistic
events to each, at several concurrency levels, for a fixed time. It prints
events/s, p50 and p99 until the answer (for the ingester: until the broker
acknowledged both messages) and the ratio of the ingester to the baseline.

    .venv/bin/python bench/ingest.py [--seconds 5] [--levels 4,16,64] [--processes N]

With `--processes N`, like for like: `serve ingest_webhooks --processes N` against N
bare servers sharing one port (SO_REUSEPORT), loaded by N client processes, each with
its share of the connections.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from paymentsvc.dev.samples import SAMPLE_TYPES, sample_event  # noqa: E402
from paymentsvc.dev.webhooks import encode_event, sign  # noqa: E402
from shared.config import Topics  # noqa: E402
from shared.devbroker import DevBroker, ensure_topics, free_port  # noqa: E402

SECRET = "whsec_bench"


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def make_requests(count: int) -> list[tuple[bytes, dict[str, str]]]:
    now = int(time.time())
    out = []
    for i in range(count):
        body = encode_event(sample_event(SAMPLE_TYPES[i % len(SAMPLE_TYPES)]))
        out.append((body, {"Content-Type": "application/json", "Stripe-Signature": sign(body, SECRET, now)}))
    return out


async def _timed(
    url: str, requests: list[tuple[bytes, dict[str, str]]], concurrency: int, seconds: float
) -> tuple[list[float], int, float]:
    """(latencies, errors, elapsed) of `concurrency` connections posting for `seconds`."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(offset: int) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < deadline:
                body, headers = requests[i % len(requests)]
                i += concurrency
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, errors, elapsed


def _client(url: str, requests: list[tuple[bytes, dict[str, str]]], concurrency: int, seconds: float, out: Any) -> None:
    out.put(asyncio.run(_timed(url, requests, concurrency, seconds)))


async def load(
    url: str, requests: list[tuple[bytes, dict[str, str]]], concurrency: int, seconds: float, clients: int = 1
) -> dict[str, float]:
    """`concurrency` requests in flight, from this process or from `clients` processes."""
    if clients == 1:
        latencies, errors, elapsed = await _timed(url, requests, concurrency, seconds)
    else:
        # Spawned: a child forked from inside a running loop (Python 3.11) cannot run its own.
        ctx = mp.get_context("spawn")
        queue: Any = ctx.Queue()
        share = max(1, concurrency // clients)
        procs = [ctx.Process(target=_client, args=(url, requests, share, seconds, queue)) for _ in range(clients)]
        for proc in procs:
            proc.start()
        parts = [await asyncio.to_thread(queue.get, True, seconds + 60) for _ in procs]
        for proc in procs:
            proc.join()
        latencies = [x for part in parts for x in part[0]]
        errors = sum(part[1] for part in parts)
        elapsed = max(part[2] for part in parts)
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "errors": errors,
        "n": len(latencies),
    }


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def main() -> None:
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # refused probes while Tansu starts
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--levels", default="4,16,64")
    parser.add_argument("--processes", type=int, default=1, help="N ingester and N baseline processes, N clients")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    n = args.processes

    async with DevBroker() as broker:
        topics = Topics()
        await ensure_topics(broker.bootstrap_servers, topics.all(), partitions=3)
        ingest_port, bare_port = free_port(), free_port()
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "STRIPE_WEBHOOK_SECRETS": SECRET,
            "INGEST_PORT": str(ingest_port),
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}",
        }
        ingester = start([sys.executable, "-m", "paymentsvc.cli", "serve", "ingest_webhooks", "--processes", str(n)], env)
        bares = [start([sys.executable, str(ROOT / "bench" / "bare_server.py"), str(bare_port)], env) for _ in range(n)]
        try:
            wait_http(f"http://127.0.0.1:{ingest_port}/health/ready")
            wait_http(f"http://127.0.0.1:{bare_port}/nothing")
            requests = make_requests(2000)
            if n > 1:
                print(f"{n} ingester processes against {n} baseline processes, {n} client processes")
            print(f"{'in flight':>9} | {'baseline ev/s':>13} {'p50 ms':>7} {'p99 ms':>7} | "
                  f"{'ingest ev/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} | {'ratio':>5}")
            for level in levels:
                # warm both, then measure baseline and ingester back to back
                await load(f"http://127.0.0.1:{bare_port}/webhooks/stripe", requests, level, 0.5, n)
                await load(f"http://127.0.0.1:{ingest_port}/webhooks/stripe", requests, level, 0.5, n)
                base = await load(f"http://127.0.0.1:{bare_port}/webhooks/stripe", requests, level, args.seconds, n)
                real = await load(f"http://127.0.0.1:{ingest_port}/webhooks/stripe", requests, level, args.seconds, n)
                print(f"{level:>9} | {base['rps']:>13.0f} {base['p50_ms']:>7.2f} {base['p99_ms']:>7.2f} | "
                      f"{real['rps']:>11.0f} {real['p50_ms']:>7.2f} {real['p99_ms']:>7.2f} {real['errors']:>6.0f} | "
                      f"{real['rps'] / base['rps']:>5.2f}")
        finally:
            for process in (ingester, *bares):
                process.terminate()
                process.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
