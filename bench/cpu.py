"""CPU time per call of the serving process, around the ratio benchmarks.

    .venv/bin/python bench/cpu.py grpc_checks|usage|ingest [that benchmark's arguments]

Runs the named benchmark as it runs alone, and around each of its measured phases
reads `utime + stime` of every process it started (and theirs) from /proc/<pid>/stat.
The process that spent the most CPU in a phase (the broker aside) is the one serving
it: the trivial or bare baseline in a baseline phase, ours in ours. Prints, after the
benchmark's own lines, a line per phase: the calls answered and the serving process's
CPU per call, with the broker's (Tansu) beside it where there is one.

On a shared machine throughput moves with everyone else's load; the CPU a process
spends per call moves much less (it is not charged for the time it waits for a core),
which makes it the figure to compare before and after a change (docs/performance.md).
Phases shorter than a second (the warm-ups) are not reported. The load generators'
processes start inside a phase and are not counted. One process per side only
(`--processes 1`, the default): spawned children could not import the benchmark
under the name it is loaded by here.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
BENCHES = {"grpc_checks": "measure", "usage": "measure", "ingest": "load"}


def _descendants() -> dict[int, tuple[str, float]]:
    """pid -> (command, CPU seconds) of every live descendant of this process."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
        parents[int(entry)] = int(fields[1])
        stats[int(entry)] = [raw[raw.index("(") + 1:raw.rindex(")")], *fields]
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - mine
        mine |= frontier
    # utime and stime are fields 14 and 15 of /proc/<pid>/stat (1-based; comm is 2).
    return {pid: (stats[pid][0], (int(stats[pid][12]) + int(stats[pid][13])) / TICK) for pid in mine if pid in stats}


REPORT: list[str] = []


def _report(label: str, calls: float, seconds: float, before: dict[int, tuple[str, float]]) -> None:
    if seconds < 1 or calls <= 0:
        return
    after = _descendants()
    spent = {pid: (after[pid][0], after[pid][1] - cpu) for pid, (_, cpu) in before.items() if pid in after}
    broker = {pid: d for pid, d in spent.items() if "tansu" in d[0]}
    serving = max((pid for pid in spent if pid not in broker), key=lambda pid: spent[pid][1], default=None)
    if serving is None:
        return
    line = (f"CPU {label}: {calls:.0f} calls, serving pid {serving} {spent[serving][1]:.2f} s "
            f"= {spent[serving][1] / calls * 1e6:.0f} µs/call")
    for pid, (_, cpu) in broker.items():
        line += f"; broker pid {pid} {cpu / calls * 1e6:.0f} µs/call"
    REPORT.append(line)
    print(line, flush=True)


def _wrap_measure(measure: Callable[..., dict[str, float]]) -> Callable[..., dict[str, float]]:
    """grpc_checks.measure(port, bulk, inflight, seconds, clients) and
    usage.measure(port, method, inflight, seconds, clients)."""

    def measured(port: int, kind: bool | str, inflight: int, seconds: float, clients: int = 1) -> dict[str, float]:
        before = _descendants()
        result = measure(port, kind, inflight, seconds, clients)
        label = kind if isinstance(kind, str) else ("bulk" if kind else "check")
        _report(f"port {port} {label} @{inflight}", result["qps"] * seconds, seconds, before)
        return result

    return measured


def _wrap_load(load: Callable[..., Any]) -> Callable[..., Any]:
    """ingest.load(url, requests, concurrency, seconds, clients)."""

    async def measured(url: str, requests: Any, concurrency: int, seconds: float, clients: int = 1) -> Any:
        before = _descendants()
        result = await load(url, requests, concurrency, seconds, clients)
        _report(f"{url.split('/')[2]} @{concurrency}", result["n"], seconds, before)
        return result

    return measured


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        raise SystemExit(f"usage: {sys.argv[0]} {'|'.join(BENCHES)} [the benchmark's arguments]")
    name = sys.argv[1]
    if "--processes" in sys.argv and sys.argv[sys.argv.index("--processes") + 1] != "1":
        raise SystemExit("cpu.py measures one process per side: leave --processes at 1")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    wrap = _wrap_load if BENCHES[name] == "load" else _wrap_measure
    setattr(module, BENCHES[name], wrap(getattr(module, BENCHES[name])))
    sys.argv = [str(ROOT / "bench" / f"{name}.py"), *sys.argv[2:]]
    started = time.monotonic()
    outcome = module.main()
    if asyncio.iscoroutine(outcome):
        asyncio.run(outcome)
    print(f"cpu.py: {len(REPORT)} phases measured in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
