"""Postgres and Redis for `paymentsvc dev`: the machine's, or embedded ones started for the run.

Which one, for each of the two:
- `paymentsvc dev --embedded`: embedded, whatever DATABASE_URL / REDIS_URL say;
- the variable is set: that server, as before (one that does not answer is an error);
- unset: the default address if a server answers there, else an embedded one.

What an embedded run keeps: the Postgres cluster lives in `LOG_DIR/postgres` (`.dev/`
for `make dev`) and is kept, so migrations and the catalog are applied incrementally
and a second start takes a second, not an initdb. Its projections are cleared at every
start, exactly as in the machine's Postgres, because the embedded broker forgets its
log (paymentsvc/devstack.py, reset_projections). Redis keeps nothing (no RDB, no AOF).
`make clean` removes `.dev/`, and so the cluster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from shared import db
from shared.config import Settings
from shared.devpostgres import EmbeddedPostgres
from shared.devredis import EmbeddedRedis
from shared.errors import DependencyUnavailable

DATABASE_NAME = "paymentsvc"


def default_url(name: str) -> str:
    """The default of a Settings URL (DATABASE_URL, REDIS_URL) by its field name."""
    default = Settings.model_fields[name].default
    return str(default.get_secret_value() if hasattr(default, "get_secret_value") else default)


def postgres_answers(url: str) -> bool:
    """Does a Postgres server answer at `url`'s host and port (its `postgres` database)?"""
    try:
        db.check(db.conninfo.make_conninfo(url, dbname="postgres"))
    except DependencyUnavailable:
        return False
    return True


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@dataclass(frozen=True)
class StoreChoice:
    """Whether to embed each store, and why, in words for the console."""

    embed_postgres: bool
    embed_redis: bool
    postgres_reason: str
    redis_reason: str


def choose_stores(
    env: dict[str, str],
    force: bool,
    postgres_up: Callable[[str], bool] = postgres_answers,
    redis_up: Callable[[str], bool] = redis_answers,
) -> StoreChoice:
    """Apply the rule of this module's docstring. Probes only the defaults, and only when unset."""

    def one(var: str, up: Callable[[str], bool], setting: str) -> tuple[bool, str]:
        if force:
            return True, "--embedded" + (f"; {var} ignored" if env.get(var) else "")
        if env.get(var):
            return False, f"{var}"
        default = default_url(setting)
        if up(default):
            return False, "the machine's (default address)"
        return True, f"{var} unset and nothing answers at its default"

    embed_postgres, postgres_reason = one("DATABASE_URL", postgres_up, "database_url")
    embed_redis, redis_reason = one("REDIS_URL", redis_up, "redis_url")
    return StoreChoice(embed_postgres, embed_redis, postgres_reason, redis_reason)


@dataclass
class DevStores:
    """The stores of one dev run: rows for the table of services, notes for the console, stack.json."""

    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def stack(self) -> dict[str, object]:
        """What stack.json says about the embedded stores (pids, for scripts and tests)."""
        embedded: dict[str, object] = {}
        if self.postgres:
            embedded["postgres"] = {"url": self.postgres.url_for(DATABASE_NAME), "pid": self.postgres.pid,
                                    "data": str(self.postgres.data)}
        if self.redis:
            embedded["redis"] = {"url": self.redis.url, "pid": self.redis.pid}
        return embedded


@contextlib.contextmanager
def dev_stores(env: dict[str, str], log_dir: Path, force: bool) -> Iterator[DevStores]:
    """Start the embedded stores the rule asks for and point `env` at them; stop them by pid after.

    Call it from the main thread: the servers stop when the thread that started them dies.
    """
    choice = choose_stores(env, force)
    stores = DevStores()
    try:
        if choice.embed_postgres:
            stores.postgres = EmbeddedPostgres(log_dir / "postgres")
            created = stores.postgres.init()
            stores.postgres.start()
            env["DATABASE_URL"] = stores.postgres.url_for(DATABASE_NAME)
            kept = "a new cluster" if created else "the cluster kept from the last run"
            stores.rows.append(("postgres", f"127.0.0.1:{stores.postgres.port}", "embedded", str(stores.postgres.log_path)))
            stores.notes.append(f"postgres: embedded ({choice.postgres_reason}), {kept} in {stores.postgres.data}")
        else:
            where = db.describe(env.get("DATABASE_URL") or default_url("database_url"))
            stores.rows.append(("postgres", where, "yes", choice.postgres_reason))
        if choice.embed_redis:
            stores.redis = EmbeddedRedis(log_dir / "redis")
            stores.redis.start()
            env["REDIS_URL"] = stores.redis.url
            stores.rows.append(("redis", f"127.0.0.1:{stores.redis.port}", "embedded", str(stores.redis.log_path)))
            stores.notes.append(f"redis: embedded ({choice.redis_reason}), starts empty and keeps nothing")
        else:
            where = (env.get("REDIS_URL") or default_url("redis_url")).split("@")[-1].removeprefix("redis://")
            stores.rows.append(("redis", where, "yes", choice.redis_reason))
        yield stores
    finally:
        if stores.redis:
            stores.redis.stop()
        if stores.postgres:
            stores.postgres.stop()
