"""`make test` on a machine without Postgres and Redis (issue 18, item 2), for real.

Inside a network namespace of its own nothing of the machine answers, so a pytest
session there must start embedded servers once, say so in its first line, and pass
tests that need Postgres, Redis and the broker. The subset is small (a minute); the
whole suite was run this way by hand (README, "the machine's, or embedded").
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.netns import require_network_namespace, without_ci
from tests.support.processes import ROOT

pytestmark = pytest.mark.e2e

SUBSET = (
    "tests/integration/test_catalog_load.py",  # Postgres, through the session's admin URL
    "tests/integration/test_entitlements_worker.py",  # Postgres, Redis and the broker
    "tests/integration/test_embedded_stores.py",  # the servers themselves, and a private Postgres
)
# The variables that name the machine's services: the inner session must find nothing.
SERVICE_VARIABLES = ("DATABASE_URL", "REDIS_URL", "TEST_ADMIN_DATABASE_URL", "BENCH_ADMIN_DATABASE_URL")


def test_a_session_with_nothing_answering_runs_on_embedded_servers_and_says_so_first() -> None:
    prefix = require_network_namespace()
    env = without_ci({k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES})
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    first = output.splitlines()[0]
    assert first.startswith("stores: postgres embedded at 127.0.0.1:"), output[:2000]
    assert "redis embedded at 127.0.0.1:" in first and "nothing answers at 127.0.0.1:5432/postgres" in first
    assert " passed" in output.splitlines()[-1] and "failed" not in output.splitlines()[-1]
