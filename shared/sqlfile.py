"""Named SQL queries kept in `.sql` files instead of Python strings.

A file holds blocks that each start with a `-- name: NAME` line:

    -- name: upsert_zone
    INSERT INTO pricing_zones ... VALUES (%(zone_code)s, ...)

Lines before the first block may only be comments or blank (a file header).
The queries are run by psycopg, so a literal percent sign must be written `%%`,
comments included.
"""

from __future__ import annotations

import re
from pathlib import Path

_NAME_LINE = re.compile(r"^--\s*name:\s*(?P<name>\S*)\s*$")
_VALID_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def load_queries(path: Path) -> dict[str, str]:
    """Read `path` and return {name: sql} in file order.

    Raises ValueError (naming the file and line) for an invalid or duplicate name, a
    block without SQL, or SQL before the first `-- name:` line.
    """
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    name: str | None = None
    body: list[str] = []

    def finish() -> None:
        if name is None:
            return
        text = "\n".join(body).strip()
        if not _has_sql(text):
            raise ValueError(f"{path}:{first_line[name]}: query {name!r} has no SQL")
        queries[name] = text

    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = _NAME_LINE.match(line.strip())
        if match is None:
            if name is None and line.strip() and not line.strip().startswith("--"):
                raise ValueError(f"{path}:{number}: SQL before the first '-- name:' line")
            body.append(line)
            continue
        finish()
        name, body = match["name"], []
        if not _VALID_NAME.match(name):
            raise ValueError(f"{path}:{number}: invalid query name {name!r}")
        if name in first_line:
            raise ValueError(
                f"{path}:{number}: duplicate query name {name!r} (first at line {first_line[name]})"
            )
        first_line[name] = number
    finish()
    return queries


def _has_sql(text: str) -> bool:
    """True if `text` holds more than comments and blank lines."""
    return any(line.strip() and not line.strip().startswith("--") for line in text.splitlines())
