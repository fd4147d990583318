"""Schema migrations: numbered plain-SQL files in `migrations/`, run by yoyo.

Each `NNNN_name.sql` has a `NNNN_name.rollback.sql`. `migrations/declared/schema.sql` is
the declared schema that the migrations must produce; a test checks it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import conninfo
from yoyo import get_backend, read_migrations

from shared.config import PACKAGE_DATA
from shared.db import DependencyUnavailable, describe, ensure_database

MIGRATIONS_DIR = PACKAGE_DATA / "migrations"


def _yoyo_url(url: str, schema: str | None) -> str:
    info = conninfo.conninfo_to_dict(url)
    user = info.get("user", "postgres")
    password = f":{info['password']}" if info.get("password") else ""
    host = info.get("host", "127.0.0.1")
    port = info.get("port", 5432)
    query = f"?schema={schema}" if schema else ""
    return f"postgresql+psycopg://{user}{password}@{host}:{port}/{info.get('dbname', '')}{query}"


def _backend(url: str, schema: str | None):  # type: ignore[no-untyped-def]
    try:
        yoyo_url = _yoyo_url(url, schema)
    except psycopg.ProgrammingError as exc:
        raise DependencyUnavailable("postgres", "DATABASE_URL", "the URL cannot be parsed", hint="") from exc
    try:
        return get_backend(yoyo_url)
    except psycopg.OperationalError as exc:
        raise DependencyUnavailable("postgres", describe(url), str(exc).splitlines()[0]) from exc


def migrate_up(url: str, *, schema: str | None = None, create_database: bool = True) -> int:
    """Apply every pending migration. Returns how many were applied."""
    if create_database:
        ensure_database(url)
    backend = _backend(url, schema)
    try:
        migrations = read_migrations(str(MIGRATIONS_DIR))
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return len(pending)
    finally:
        backend.connection.close()


def migrate_down(url: str, *, steps: int | None = None, schema: str | None = None) -> int:
    """Roll back the last `steps` migrations (all when None). Returns how many."""
    backend = _backend(url, schema)
    try:
        migrations = read_migrations(str(MIGRATIONS_DIR))
        with backend.lock():
            applied = backend.to_rollback(migrations)
            if steps is not None:
                applied = applied[:steps]
            backend.rollback_migrations(applied)
        return len(applied)
    finally:
        backend.connection.close()


def create_migration(name: str, directory: Path = MIGRATIONS_DIR) -> tuple[Path, Path]:
    """Write the next numbered pair of empty migration files and return them."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError("a migration name is lower-case letters, digits and underscores")
    numbers = [int(p.name[:4]) for p in directory.glob("[0-9][0-9][0-9][0-9]_*.sql")]
    number = max(numbers, default=0) + 1
    stem = f"{number:04d}_{name}"
    up = directory / f"{stem}.sql"
    down = directory / f"{stem}.rollback.sql"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    up.write_text(f"-- {stem} ({stamp}). Also update migrations/declared/schema.sql.\n")
    down.write_text(f"-- undo {stem}\n")
    return up, down
