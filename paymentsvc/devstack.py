"""`paymentsvc dev`: the whole stack in one process tree, on embedded defaults.

It picks Postgres and Redis (the machine's, or embedded ones it starts: see
paymentsvc/devstores.py), checks them, migrates, loads the catalog, starts Tansu (unless
KAFKA_BOOTSTRAP_SERVERS is set) and localstripe (unless STRIPE_SECRET_KEY is
set), then runs every built service as a child `paymentsvc serve NAME` and
waits for each one's /health/ready. Ctrl-C stops the children, then the
broker and localstripe, then the embedded stores, each by its own pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from paymentsvc.devprometheus import DevPrometheus
from shared import db, migrate
from shared.config import SERVICE_PORTS, Settings
from shared.devbroker import broker_for, die_with_parent
from shared.devstripe import DEV_SECRET_KEY, LocalStripe
from shared.errors import DependencyUnavailable

if TYPE_CHECKING:
    from paymentsvc.devstores import DevStores

# Stated in the README. Only `paymentsvc dev` uses them, and only when unset.
DEV_WEBHOOK_SECRET = "whsec_paymentsvc_dev"
DEV_API_KEY = "dev-key"
DEV_TOKEN_SIGNING_KEY = "paymentsvc-dev-token-signing-key-not-secret"
READY_TIMEOUT_S = 60.0

console = Console(stderr=True)


async def check_redis(url: str) -> None:
    client = Redis.from_url(url, socket_connect_timeout=3)
    try:
        await client.ping()
    except Exception as exc:
        where = url.split("@")[-1].removeprefix("redis://")
        raise DependencyUnavailable("redis", where, str(exc).splitlines()[0]) from exc
    finally:
        await client.aclose()


# Written by operators and migrations, not projected from the log: kept across runs.
KEPT_TABLES = ("plans", "pricing_zones", "plan_prices", "plan_features")
DEV_REDIS_PATTERNS = ("ent:*", "usage:*")


async def reset_projections(database_url: str, redis_url: str) -> tuple[int, int]:
    """Clear everything built from the log (tables, inbox, marks, Redis answers); (tables, keys).

    Only `paymentsvc dev` with its embedded broker calls this: that broker's log
    starts empty on every run, and projections (and their high-water marks) left by
    an earlier log would make the workers wait at marks beyond the new log's end.
    """
    from psycopg import sql

    with db.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
            "AND table_type = 'BASE TABLE' AND table_name NOT LIKE %s AND NOT (table_name = ANY(%s))",
            ("%yoyo%", list(KEPT_TABLES)),
        ).fetchall()
        tables = sorted(str(r[0]) for r in rows)
        if tables:
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(map(sql.Identifier, tables))))
    client = Redis.from_url(redis_url, socket_connect_timeout=3)
    deleted = 0
    try:
        for pattern in DEV_REDIS_PATTERNS:
            keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
            for i in range(0, len(keys), 1000):
                deleted += await client.delete(*keys[i : i + 1000])
    finally:
        await client.aclose()
    return len(tables), deleted


def dev_environment(env: dict[str, str]) -> dict[str, str]:
    """The environment with dev defaults for what a newcomer has not set."""
    env = dict(env)
    env.setdefault("STRIPE_WEBHOOK_SECRETS", DEV_WEBHOOK_SECRET)
    env.setdefault("API_KEYS", f"{DEV_API_KEY}=read+write+admin")
    env.setdefault("TOKEN_SIGNING_KEYS", DEV_TOKEN_SIGNING_KEY)
    return env


def _wait_ready(port: int, deadline: float, process: subprocess.Popen[bytes]) -> bool:
    url = f"http://127.0.0.1:{port}/health/ready"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def _stop_children(children: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in children.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in children.values():
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


async def run_dev(log_dir: Path, with_prometheus: bool = False, embedded: bool = False) -> None:
    from paymentsvc.devstores import dev_stores

    env = dev_environment(dict(os.environ))
    log_dir.mkdir(parents=True, exist_ok=True)
    # Outermost, so the stores stop last, after every service that uses them.
    with dev_stores(env, log_dir, force=embedded) as stores:
        for note in stores.notes:
            console.print(note, soft_wrap=True)  # one line each, paths unbroken
        await _run_dev(env, log_dir, stores, with_prometheus)


async def _run_dev(env: dict[str, str], log_dir: Path, stores: DevStores, with_prometheus: bool = False) -> None:
    os.environ.update(env)
    settings = Settings()
    database_url = settings.database_url.get_secret_value()

    db.ensure_database(database_url)
    applied = migrate.migrate_up(database_url)
    await check_redis(settings.redis_url.get_secret_value())
    from shared.catalog import apply_catalog, load_catalog

    catalog = load_catalog(settings.catalog_path)
    with db.connect(database_url) as conn:
        counts = apply_catalog(conn, catalog)
    console.print(f"postgres {db.describe(database_url)}: {applied} migration(s) applied, catalog {counts}")
    fresh = not settings.kafka_bootstrap_servers  # the embedded broker starts with an empty log
    if fresh:
        tables, keys = await reset_projections(database_url, settings.redis_url.get_secret_value())
        console.print(
            f"projections start fresh: the embedded broker forgets its log, so {tables} table(s) "
            f"and {keys} Redis key(s) from an earlier run were cleared"
        )

    log_dir.mkdir(parents=True, exist_ok=True)
    stripe: LocalStripe | None = None
    if settings.stripe_secret_key is None:
        stripe = LocalStripe(log_dir=log_dir)
        stripe.start()
        env["STRIPE_SECRET_KEY"] = DEV_SECRET_KEY
        env["STRIPE_API_BASE"] = stripe.api_base
    try:
        async with broker_for(settings, log_dir=log_dir) as bootstrap:
            env["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
            await _run_services(settings, env, stripe, log_dir, fresh, with_prometheus, stores=stores)
    finally:
        if stripe:
            stripe.stop()


async def _run_services(
    settings: Settings, env: dict[str, str], stripe: LocalStripe | None, log_dir: Path, fresh: bool,
    with_prometheus: bool = False,
    stores: DevStores | None = None,
) -> None:
    children: dict[str, subprocess.Popen[bytes]] = {}
    names = list(SERVICE_PORTS)
    prometheus: DevPrometheus | None = None
    try:
        for name in names:
            log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
            children[name] = subprocess.Popen(
                [sys.executable, "-m", "paymentsvc.cli", "serve", name],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches us; we stop them in order
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        table = Table(title="paymentsvc dev")
        for column in ("service", "listens on", "ready", "log"):
            table.add_column(column)
        for name in names:
            port = getattr(settings, SERVICE_PORTS[name])
            ready = await asyncio.to_thread(_wait_ready, port, deadline, children[name])
            listens = f"http://127.0.0.1:{port}"
            if name == "api_grpc":
                listens = f"grpc 127.0.0.1:{settings.grpc_port}, {listens}"
            table.add_row(name, listens, "yes" if ready else "NO", str(log_dir / f"{name}.log"))
            if not ready:
                raise DependencyUnavailable(name, f"127.0.0.1:{port}", f"not ready; see {log_dir / (name + '.log')}")
        for row in stores.rows if stores else ():
            table.add_row(*row)
        table.add_row("kafka", env["KAFKA_BOOTSTRAP_SERVERS"], "yes", "embedded: its log starts empty" if fresh else "")
        if fresh:
            table.add_row("projections", "postgres + redis", "fresh", "cleared at start: built from this run's log only")
        if stripe:
            table.add_row("localstripe", stripe.api_base, "yes", str(stripe.log_path))
            if "ingest_webhooks" in names:
                stripe.register_webhook(
                    "paymentsvc",
                    f"http://127.0.0.1:{settings.ingest_port}/webhooks/stripe",
                    settings.stripe_webhook_secrets[0].get_secret_value(),
                )
        if with_prometheus:
            prometheus = await _start_prometheus(settings, names, log_dir, table)
        console.print(table)
        _write_stack_file(log_dir / "stack.json", settings, names, env, stripe)
        if prometheus:
            _add_to_stack_file(log_dir / "stack.json", "prometheus", {"url": prometheus.url, "pid": prometheus.pid})
        if stores:
            _add_stores_to_stack_file(log_dir / "stack.json", stores)
        console.print("Ctrl-C stops everything.")
        await _wait_for_signal_or_exit(children)
    finally:
        if prometheus:
            prometheus.stop()
        _stop_children(children)


async def _start_prometheus(settings: Settings, names: list[str], log_dir: Path, table: Table) -> DevPrometheus:
    """`--with-prometheus`: the real Prometheus scraping every service, with the alert rules."""
    targets = {n: f"127.0.0.1:{getattr(settings, SERVICE_PORTS[n])}" for n in names}
    prometheus = DevPrometheus(targets, log_dir)
    prometheus.start()  # from this thread: the child dies with the one that forked it
    try:
        await asyncio.to_thread(prometheus.wait_ready)
    except BaseException:
        prometheus.stop()
        raise
    table.add_row("prometheus", prometheus.url, "yes", f"{prometheus.log_path}; scrapes every service, loads the alerts")
    return prometheus


def _add_to_stack_file(path: Path, key: str, value: object) -> None:
    stack = json.loads(path.read_text())
    stack[key] = value
    path.write_text(json.dumps(stack, indent=2))


def _write_stack_file(
    path: Path, settings: Settings, names: list[str], env: dict[str, str], stripe: LocalStripe | None
) -> None:
    """Where everything listens, for scripts and tests (no secrets)."""
    stack = {
        "services": {n: f"http://127.0.0.1:{getattr(settings, SERVICE_PORTS[n])}" for n in names},
        "kafka_bootstrap_servers": env["KAFKA_BOOTSTRAP_SERVERS"],
        "stripe_api_base": stripe.api_base if stripe else env.get("STRIPE_API_BASE", ""),
        "pid": os.getpid(),
    }
    path.write_text(json.dumps(stack, indent=2))


def _add_stores_to_stack_file(path: Path, stores: DevStores) -> None:
    """The embedded Postgres and Redis (URLs without secrets, pids), under "embedded"."""
    stack = json.loads(path.read_text())
    stack["embedded"] = stores.stack()
    # Replaced whole, so a script that polls for the key never reads half a file.
    part = path.with_suffix(".part")
    part.write_text(json.dumps(stack, indent=2))
    part.replace(path)


async def _wait_for_signal_or_exit(children: dict[str, subprocess.Popen[bytes]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    while not stop.is_set():
        if os.getppid() != parent:  # orphaned (e.g. `make` was killed): stop too
            break
        for name, process in children.items():
            if process.poll() is not None:
                raise DependencyUnavailable(name, "dev stack", f"exited with {process.returncode}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    console.print("stopping")
