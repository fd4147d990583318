"""A network namespace of the test's own: nothing of the machine answers there.

Where a test must see a machine without Postgres and Redis (a newcomer's laptop) on a
machine that has them, it runs its subject in a new network namespace with only the
loopback interface up. That needs root, `unshare` and `ip`: CI has them.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def network_namespace() -> list[str] | None:
    """A command prefix that runs in a new network namespace with loopback up, or None where it cannot."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if os.geteuid() != 0 or unshare is None or ip is None:
        return None
    prefix = [unshare, "--net", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh"]
    if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode != 0:
        return None
    return prefix


def require_network_namespace() -> list[str]:
    """The prefix, or a skip (a developer's machine) / a failure (CI, which has what it takes)."""
    prefix = network_namespace()
    if prefix is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root with unshare and ip: the network namespace must be available")
        pytest.skip("needs root, unshare and ip (a network namespace of its own)")
    return prefix


def without_ci(env: dict[str, str]) -> dict[str, str]:
    """The environment for a pytest run inside the namespace: not CI, whose session insists on
    the machine's services; there the session takes embedded ones, as on a laptop."""
    return {k: v for k, v in env.items() if k != "CI"}
