"""Every benchmark runs in a small smoke mode, so a benchmark cannot rot unnoticed.

These are not measurements (figures from a loaded CI machine mean little): each
benchmark is run as an operator would run it, as a subprocess with tiny
arguments, and must exit 0 and print its ratio to the baseline measured in the
same run. An import error, a renamed API or a broken check fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SMOKE = [
    pytest.param(["bench/ingest.py", "--seconds", "0.5", "--levels", "4"], r"^\s+4 \|.*\|\s+\d+\.\d+$", id="ingest"),
    pytest.param(["bench/project.py", "--customers", "50", "--time-limit", "60"], r"^ratio worker / baseline\s+\|\s+\d", id="project"),
    pytest.param(["bench/grpc_checks.py", "--seconds", "0.5"], r"QPS ratio \d+\.\d+", id="grpc_checks"),
    # N processes of ours against N of the baseline (serve --processes N, SO_REUSEPORT).
    pytest.param(["bench/ingest.py", "--seconds", "0.5", "--levels", "4", "--processes", "2"],
                 r"^\s+4 \|.*\|\s+\d+\.\d+$", id="ingest-2-processes"),
    pytest.param(["bench/grpc_checks.py", "--seconds", "0.5", "--processes", "2"],
                 r"x2 processes: .*QPS ratio \d+\.\d+", id="grpc_checks-2-processes"),
    pytest.param(["bench/usage.py", "--seconds", "0.5"], r"QPS ratio \d+\.\d+", id="usage"),
    pytest.param(["bench/usage.py", "--seconds", "0.5", "--processes", "2"],
                 r"x2 processes: .*QPS ratio \d+\.\d+", id="usage-2-processes"),
    pytest.param(["bench/write_shapes.py", "--rows", "20", "--repeats", "2"], r"^json\s+\|.*\|\s+\d+\.\d+$", id="write_shapes"),
    pytest.param(["bench/tracing.py", "--n", "200"], r"^nothing set \(drop all\)\s+\|\s+\d+\.\d+", id="tracing"),
    # No baseline in the run: CPU per event, compared between two trees on one events file.
    pytest.param(["bench/batch_cpu.py", "--customers", "50", "--phases"], r"CPU [\d.]+ s = \d+ µs/event", id="batch_cpu"),
    pytest.param(["bench/interceptor.py", "--calls", "200"], r"^one pass\s+\|\s+3 \|\s+\d+\.\d+", id="interceptor"),
    # No baseline either: CPU per IncrementUsage call and a digest of its records, compared between two trees.
    pytest.param(["bench/increment_cpu.py", "--calls", "200", "--rounds", "2"],
                 r"^in process: 200 calls .* µs/call[\s\S]*^digest of the records [0-9a-f]{16}", id="increment_cpu"),
    pytest.param(["bench/increment_cpu.py", "--e2e", "--calls", "200", "--rounds", "1"],
                 r"^end to end: 200 calls .* µs/call", id="increment_cpu-e2e"),
    # CPU per call of the serving process around a ratio benchmark (the phases' lines).
    pytest.param(["bench/cpu.py", "usage", "--seconds", "1"], r"^CPU port \d+ increment @64: \d+ calls, .* µs/call", id="cpu-usage"),
]


@pytest.mark.parametrize(("argv", "ratio_line"), SMOKE)
def test_benchmark_runs_in_smoke_mode_and_prints_its_ratio(argv: list[str], ratio_line: str) -> None:
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{argv[0]} exited {done.returncode}:\n{output[-3000:]}"
    assert re.search(ratio_line, done.stdout, re.MULTILINE), f"{argv[0]} printed no ratio:\n{done.stdout[-3000:]}"
    assert "FAIL" not in done.stdout, done.stdout[-3000:]
