"""The real Stripe event payloads in tests/fixtures/stripe (provenance in its README).

Bytes are kept exactly as upstream published them. Event ids are NOT unique across
files (upstream copied some): key anything by file name, never by event id.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import orjson

DIRECTORY = Path(__file__).resolve().parent.parent / "fixtures" / "stripe"


@cache
def names() -> tuple[str, ...]:
    return tuple(sorted(p.name for p in DIRECTORY.glob("*.json")))


def raw(name: str) -> bytes:
    return (DIRECTORY / name).read_bytes()


def event(name: str) -> dict[str, Any]:
    """A fresh parsed copy, safe to mutate."""
    parsed: dict[str, Any] = orjson.loads(raw(name))
    return parsed


def of_types(types: frozenset[str] | set[str]) -> list[str]:
    return [name for name in names() if event(name)["type"] in types]
