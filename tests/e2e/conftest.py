"""Fixtures of the e2e tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.processes import PrivateRedis


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of the test's own: the services' unprefixed keys stay away from other tests."""
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.destroy()
