"""`python -m paymentsvc.preflight`: are Postgres and Redis reachable? One line each if not.

Used by `make dev` and `make test` before anything else runs. Exits 2 when a
dependency is down, naming it and the command that starts it.
"""

from __future__ import annotations

import asyncio
import os
import sys

from shared import db
from shared.errors import DependencyUnavailable


def main() -> int:
    from paymentsvc.devstack import check_redis

    database_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    failed = False
    # The server, not the service database: `migrate` creates that one.
    admin_url = db.conninfo.make_conninfo(database_url, dbname="postgres")
    for check in (lambda: db.check(admin_url), lambda: asyncio.run(check_redis(redis_url))):
        try:
            check()
        except DependencyUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed = True
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
