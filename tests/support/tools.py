"""External tools some tests need (installed by `.ci/install-tools`, `make tools`).

`tool(name)` gives the path of the executable, looked up in the project's `.tools/`
first and then on PATH. When it is missing, the test is skipped with the reason on a
developer's machine, and fails under CI=true, where `.ci/run` installed every tool: a
CI that silently skips the checks it was meant to run would be green for nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEARCH = (ROOT / ".tools" / "bin", ROOT / ".tools" / "node_modules" / ".bin")


def find_tool(name: str) -> str | None:
    for folder in SEARCH:
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def tool(name: str) -> str:
    """Path of `name`; skips (or, under CI=true, fails) the calling test when absent."""
    found = find_tool(name)
    if found is not None:
        return found
    message = f"{name} is not installed: `make tools` (.ci/install-tools) installs it"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
