"""Baseline for bench/ingest.py: an aiohttp handler that only reads the body and answers 200.

It listens with SO_REUSEPORT, so that `bench/ingest.py --processes N` runs N of them on one port.
"""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web


async def receive(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"status": "ok"})


def main() -> None:
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/webhooks/stripe", receive)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, reuse_port=True)


if __name__ == "__main__":
    main()
