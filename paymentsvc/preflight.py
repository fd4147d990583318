"""`python -m paymentsvc.preflight`: are Postgres and Redis reachable? One line each if not.

Used by `make dev` and `make test` before anything else runs. Exits 2 when a
dependency is down, naming it and the command that starts it. A store whose
variable (DATABASE_URL, REDIS_URL) is unset and whose default address does not
answer is not an error: `paymentsvc dev` and the test session start an embedded
one (paymentsvc/devstores.py), provided its wheel is installed.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable

from shared import db
from shared.errors import DependencyUnavailable


def main() -> int:
    from paymentsvc.devstack import check_redis
    from shared.devpostgres import postgres_bin_dir
    from shared.devredis import embedded_redis_binary

    database_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    # The server, not the service database: `migrate` creates that one.
    admin_url = db.conninfo.make_conninfo(database_url, dbname="postgres")
    checks: list[tuple[str, str, Callable[[], None], Callable[[], object]]] = [
        ("postgres", "DATABASE_URL", lambda: db.check(admin_url), postgres_bin_dir),
        ("redis", "REDIS_URL", lambda: asyncio.run(check_redis(redis_url)), embedded_redis_binary),
    ]
    failed = False
    for name, variable, check, embedded in checks:
        try:
            check()
        except DependencyUnavailable as exc:
            if not os.environ.get(variable):
                try:
                    embedded()
                    print(f"{name}: nothing answers at the default address; an embedded one will be started",
                          file=sys.stderr)
                    continue
                except DependencyUnavailable as missing:
                    print(f"error: {missing}", file=sys.stderr)
            print(f"error: {exc}", file=sys.stderr)
            failed = True
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
