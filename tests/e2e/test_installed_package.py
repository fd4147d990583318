"""`pip install .` gives a working service (issue 15): the wheel, installed into a fresh
virtualenv outside the checkout, runs `paymentsvc migrate` and `paymentsvc catalog load`
from another directory, finding its migrations, SQL and default catalog as package data.

Slow by nature (a wheel build and a dependency install from the package index, cached
by pip after the first run): one test, in the e2e tier.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import ADMIN_URL, random_id
from tests.support.processes import ROOT

pytestmark = pytest.mark.e2e


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} -> {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_wheel_installed_elsewhere_migrates_and_loads_the_catalog(tmp_path: Path) -> None:
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(ROOT)], tmp_path)
    [wheel] = list(wheels.glob("paymentsvc-*.whl"))
    run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)], tmp_path, timeout=900)

    name = random_id("paymentsvc_wheel_")
    url = psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(DATABASE_URL=url, PROGRESS_OUTPUT="never")
    paymentsvc = str(venv / "bin" / "paymentsvc")
    try:
        migrated = run([paymentsvc, "migrate"], elsewhere, env)
        loaded = run([paymentsvc, "catalog", "load"], elsewhere, env)
        where = run([str(venv / "bin" / "python"), "-c", "import shared, services; print(shared.__file__)"], elsewhere, env)
        with psycopg.connect(url) as conn:
            plans = conn.execute("SELECT count(*) FROM plans").fetchone()
            version = conn.execute("SELECT count(*) FROM _yoyo_migration").fetchone()
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert str(venv) in where and str(ROOT) not in where, "the installed package, not the checkout"
    migrations = len(list((ROOT / "migrations").glob("[0-9]*[0-9]_*[a-z].sql"))) - len(list((ROOT / "migrations").glob("*.rollback.sql")))
    assert version == (migrations,), (migrated, version)
    assert loaded.startswith("loaded ") and plans is not None and plans[0] >= 3, loaded
