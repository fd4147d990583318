"""Postgres access: pools, reachability checks and database creation.

No connection is made at import. The composition root of each service calls
`open_pool` and closes it on shutdown.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import orjson
import psycopg
from psycopg import conninfo, sql
from psycopg.types.json import Json
from psycopg_pool import AsyncConnectionPool

from shared.errors import DependencyUnavailable
from shared.metrics import GO_DB_CONNECTIONS_ACTIVE, GO_DB_QUERY_DURATION, gauge_function

# DB_STATEMENT_TIMEOUT_MS's default: far above any query of ours, well below "forever".
DEFAULT_STATEMENT_TIMEOUT_MS = 30_000


# Every pool of this process, for the Go service's db_connections_active, read at scrape
# time from psycopg_pool's own measures (weakly: a closed, dropped pool just leaves).
_POOLS: weakref.WeakSet[AsyncConnectionPool] = weakref.WeakSet()


def connections_in_use() -> int:
    """Connections handed out by this process's pools right now."""
    total = 0
    for pool in list(_POOLS):
        if pool.closed:  # a closed pool keeps counting its last connections as its size
            continue
        stats = pool.get_stats()
        total += stats.get("pool_size", 0) - stats.get("pool_available", 0)
    return total


gauge_function(GO_DB_CONNECTIONS_ACTIVE, connections_in_use)


@contextlib.asynccontextmanager
async def timed_connection(
    pool: AsyncConnectionPool, timeout: float
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """`pool.connection(timeout)`, observed in db_query_duration_seconds from the request
    for a connection to its return (as pgxpool's Query includes the acquire)."""
    started = time.perf_counter()
    try:
        async with pool.connection(timeout=timeout) as conn:
            yield conn
    finally:
        GO_DB_QUERY_DURATION.observe(time.perf_counter() - started)


def describe(url: str) -> str:
    """host:port/dbname of a URL, without user or password, for messages."""
    try:
        info = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable DATABASE_URL>"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def connect(url: str, *, autocommit: bool = True, **kwargs: object) -> psycopg.Connection:
    """A plain connection, or DependencyUnavailable with a one-line reason."""
    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=5, **kwargs)  # type: ignore[arg-type]
    except psycopg.ProgrammingError as exc:  # malformed URL
        raise DependencyUnavailable(
            "postgres", "DATABASE_URL", "the URL cannot be parsed", hint=""
        ) from exc
    except psycopg.OperationalError as exc:
        detail = _short(exc)
        if "does not exist" in detail:
            raise DependencyUnavailable(
                "postgres", describe(url), detail, hint="run `paymentsvc migrate` to create it"
            ) from exc
        raise DependencyUnavailable("postgres", describe(url), detail) from exc


def ensure_database(url: str) -> bool:
    """Create the database named in `url` if it does not exist. True if created.

    Connects to the server's `postgres` database to do so; needs CREATEDB.
    """
    try:
        target = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise DependencyUnavailable(
            "postgres", "DATABASE_URL", "the URL cannot be parsed", hint=""
        ) from exc
    dbname = str(target.get("dbname") or "")
    if not dbname or dbname == "postgres":
        return False
    admin_url = conninfo.make_conninfo(url, dbname="postgres")
    with connect(admin_url) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if exists:
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        return True


def check(url: str) -> None:
    """Raise DependencyUnavailable unless the database answers."""
    with connect(url) as conn:
        conn.execute("SELECT 1")


async def _configure(conn: psycopg.AsyncConnection) -> None:
    # Projection reads are single statements: autocommit avoids a BEGIN/COMMIT
    # round trip per call (DESIGN.md, "What was measured").
    await conn.set_autocommit(True)


def make_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    schema: str | None = None,
    name: str = "paymentsvc",
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
    settings: Mapping[str, str] | None = None,
) -> AsyncConnectionPool:
    """An unopened pool in autocommit mode; open it with `await pool.open(wait=True)`.

    `schema` puts that schema first on the search_path (used by replay). Every
    connection has `statement_timeout` (0: none), so a stuck query fails with
    QueryCanceled instead of holding a connection and a batch forever. `settings` are
    further server settings of every connection (a rebuild's `synchronous_commit`).
    """
    kwargs: dict[str, object] = {"connect_timeout": 5, "application_name": name}
    options = [f"-c statement_timeout={int(statement_timeout_ms)}"]
    for key, value in (settings or {}).items():
        if not key.replace("_", "").isalnum() or not value.replace("_", "").isalnum():
            raise ValueError(f"not a plain server setting: {key}={value}")
        options.append(f"-c {key}={value}")
    if schema:
        options.append(f"-c search_path={schema},public")
    kwargs["options"] = " ".join(options)
    pool = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs=kwargs,
        configure=_configure,
        check=AsyncConnectionPool.check_connection,
        open=False,
        name=name,
    )
    _POOLS.add(pool)
    return pool


async def open_pool(url: str, **kwargs: object) -> AsyncConnectionPool:
    """Open a pool, or raise DependencyUnavailable within about 10 s."""
    pool = make_pool(url, **kwargs)  # type: ignore[arg-type]
    try:
        await pool.open(wait=True, timeout=10)
    except Exception as exc:  # PoolTimeout hides the cause; probe for a readable one
        await pool.close()
        try:
            check(url)
        except DependencyUnavailable:
            raise
        raise DependencyUnavailable("postgres", describe(url), _short(exc)) from exc
    return pool


def json_rows(rows: Sequence[Mapping[str, Any]]) -> Json:
    """Rows as one JSON parameter, for a set-based write through
    `json_populate_recordset(NULL::table, %(rows)s)`: one statement for any number of rows.
    orjson writes it in C (datetimes as RFC 3339); a text array per column instead costs
    psycopg a Python loop per element (docs/performance.md, bench/write_shapes.py)."""
    return Json(rows, dumps=orjson.dumps)
