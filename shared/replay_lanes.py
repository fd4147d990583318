"""A rebuild's lanes, in this process or in lane processes (`shared.replay.rebuild`).

A lane is a group of partitions applied by one loop on its own consumer (assigned
partitions, no group) and connection. Lanes run as asyncio tasks of one process, which
overlaps one lane's waiting with another's Python, or spread over lane processes,
so that the Python of different partitions runs on different cores.

Lane processes are started with the "spawn" method: a fresh interpreter that imports
what it needs, never a fork of a process holding loops, pools or sockets. Each sends its
progress and its result to the parent over its own pipe; the parent reports them
(progress bar, figures). A lane process that raises, or dies (killed, crashed), fails the
rebuild with a `LaneFailed` naming it and its partitions, and the others are stopped
(SIGTERM: a lane finishes or abandons its current batch and exits). Every batch commits
its rows with its inbox rows and its marks, so what a stopped or killed lane leaves is
exact and a rebuild run again (`prepare=False`, `paymentsvc replay --resume`) carries
on from the marks.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from shared import db
from shared.consumer import run_replay
from shared.errors import ConfigurationError
from shared.worker import BatchProcessor, DeadLetter, LoopPolicy

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from shared.replay import ProjectionSpec

# `Progress` of shared.consumer, per lane: (lane, events applied by it, marks reached, ends).
LaneProgress = Callable[[int, int, dict[int, int], dict[int, int]], None]
PROCESSES_ENV = "PAYMENTSVC_REPLAY_PROCESSES"
# How long a stopped lane process may take to finish its batch before it is killed.
STOP_GRACE_S = 15.0


class LaneFailed(RuntimeError):
    """A lane process raised or died; the rebuild stopped. Running it again resumes from the marks."""


class NoDeadLetters:
    """During a rebuild a poison message is only counted: the live worker dead-lettered it already."""

    def __init__(self) -> None:
        self.count = 0

    async def send(self, letters: Sequence[DeadLetter], consumer: str) -> None:
        self.count += len(letters)


@dataclass(frozen=True)
class LaneJob:
    """What one lane process runs: pickled to it, so `spec.make` must pickle (no lambda)."""

    database_url: str
    bootstrap: str
    spec: ProjectionSpec
    schema: str
    lanes: tuple[tuple[int, tuple[int, ...]], ...]  # (lane number, its partitions)
    until: dict[int, int]
    batch: int
    settings: Mapping[str, str]


def default_processes(lanes: int) -> int:
    """Lane processes for `lanes` lanes: $PAYMENTSVC_REPLAY_PROCESSES, else one per lane (up to
    twice the cores) on a machine of two cores or more, else none.

    One per lane, not one per core: with 3 lanes on 2 cores, 2 processes would give one
    of them two lanes, two thirds of the work; 3 keep the split even and the scheduler
    shares the cores. 0 runs every lane in this process. Raises ConfigurationError for a
    value that is not a count."""
    configured = os.environ.get(PROCESSES_ENV, "").strip()
    if configured:
        if not configured.isdigit():
            raise ConfigurationError(f"{PROCESSES_ENV}={configured!r}: give a number of lane processes (0: none)")
        return min(int(configured), lanes)
    cores = os.cpu_count() or 1
    return min(lanes, 2 * cores) if cores >= 2 else 0


async def run_lanes(
    pool: Any, bootstrap: str, spec: ProjectionSpec, lanes: Sequence[tuple[int, Sequence[int]]],
    until: dict[int, int] | None, policy: LoopPolicy, letters: NoDeadLetters, progress: LaneProgress,
    stop: asyncio.Event,
) -> dict[int, int]:
    """Every lane as a task of this loop, on `pool`; the marks reached per partition."""

    def reporter(lane: int) -> Callable[[int, dict[int, int], dict[int, int]], None]:
        return lambda total, done, ends: progress(lane, total, done, ends)

    runs = [
        run_replay(
            BatchProcessor(spec.make(), pool, letters, replay=True), pool, bootstrap, spec.topic,
            stop, policy, until=until, progress=reporter(lane), partitions=list(partitions),
        )
        for lane, partitions in lanes
    ]
    done: dict[int, int] = {}
    for lane_done in await asyncio.gather(*runs):
        done.update(lane_done)
    return done


# ---------------------------------------------------------------- in a lane process


def lane_process_main(pipe: Connection, job: LaneJob) -> None:
    """The target of a lane process: run its lanes, send ("progress", ...) per batch, then ("done", ...).

    On an exception it sends ("error", traceback) and exits 1. SIGTERM and SIGINT stop
    it after the current batch (it then sends ("stopped", ...))."""
    try:
        done, poison, stopped = asyncio.run(_lane_process(pipe, job))
        pipe.send(("stopped" if stopped else "done", done, poison))
    except BaseException:
        with contextlib.suppress(OSError):
            pipe.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        pipe.close()


async def _lane_process(pipe: Connection, job: LaneJob) -> tuple[dict[int, int], int, bool]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    pool = db.make_pool(
        job.database_url, schema=job.schema, max_size=len(job.lanes) + 1, name=f"replay-{job.spec.name}",
        settings=job.settings,
    )
    await pool.open(wait=True)
    letters = NoDeadLetters()

    def progress(lane: int, total: int, done: dict[int, int], ends: dict[int, int]) -> None:
        pipe.send(("progress", lane, total, done, ends))  # a parent gone: BrokenPipeError ends the lane

    try:
        done = await run_lanes(
            pool, job.bootstrap, job.spec, job.lanes, job.until, LoopPolicy(max_batch=job.batch), letters, progress, stop
        )
    finally:
        await pool.close()
    return done, letters.count, stop.is_set()


# ---------------------------------------------------------------- in the parent


@dataclass
class _Lane:
    number: int
    lanes: tuple[tuple[int, tuple[int, ...]], ...]
    process: BaseProcess
    pipe: Connection
    result: tuple[dict[int, int], int] | None = None
    error: str | None = None

    @property
    def partitions(self) -> list[int]:
        return sorted(p for _, group in self.lanes for p in group)

    def describe(self) -> str:
        return f"lane process {self.number} (pid {self.process.pid}, partitions {self.partitions})"


async def run_lane_processes(
    database_url: str, bootstrap: str, spec: ProjectionSpec, schema: str,
    assignment: Sequence[Sequence[tuple[int, Sequence[int]]]], until: dict[int, int], batch: int,
    settings: Mapping[str, str], progress: LaneProgress, started: Callable[[list[int]], None] | None = None,
) -> tuple[dict[int, int], int]:
    """Run each element of `assignment` (lanes) in a spawned process; (marks reached, poison count).

    Raises LaneFailed when one raises or dies, after stopping the others; cancelling
    this (Ctrl-C, a timeout) stops them all too. `started` gets the lane processes' pids."""
    context = multiprocessing.get_context("spawn")
    running: list[_Lane] = []
    try:
        for number, lanes in enumerate(assignment):
            job = LaneJob(
                database_url, bootstrap, spec, schema, tuple((lane, tuple(group)) for lane, group in lanes), until, batch,
                dict(settings),
            )
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(
                target=lane_process_main, args=(writer, job), name=f"replay-{spec.name}-{number}", daemon=True
            )
            process.start()
            writer.close()  # the child holds the only writer: its exit is the pipe's end
            running.append(_Lane(number, job.lanes, process, reader))
        if started:
            started([lane.process.pid or 0 for lane in running])
        while any(lane.result is None for lane in running):
            waiting = [lane for lane in running if lane.result is None]
            await asyncio.to_thread(wait, [lane.pipe for lane in waiting] + [lane.process.sentinel for lane in waiting], 0.5)
            for lane in waiting:
                _drain(lane, progress)
                if lane.result is None and not lane.process.is_alive():
                    lane.process.join()
                    _drain(lane, progress)  # what it sent before it exited
                    if lane.result is None:
                        raise LaneFailed(_failure(lane))
                if lane.error is not None:
                    raise LaneFailed(_failure(lane))
        done: dict[int, int] = {}
        poison = 0
        for lane in running:
            assert lane.result is not None
            done.update(lane.result[0])
            poison += lane.result[1]
        return done, poison
    finally:
        await asyncio.shield(asyncio.to_thread(_stop_all, running))


def _drain(lane: _Lane, progress: LaneProgress) -> None:
    try:
        while lane.result is None and lane.error is None and lane.pipe.poll():
            message = lane.pipe.recv()
            if message[0] == "progress":
                progress(*message[1:])
            elif message[0] == "done":
                lane.result = (message[1], message[2])
            elif message[0] == "error":
                lane.error = str(message[1])
            else:  # "stopped" without being asked: a signal from outside
                lane.error = "it was stopped by a signal before it finished"
    except (EOFError, OSError):
        pass  # the process exited; its exit code says how


def _failure(lane: _Lane) -> str:
    if lane.error is not None:
        reason = f"it raised:\n{lane.error.rstrip()}"
    else:
        code = lane.process.exitcode
        reason = f"it was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"it exited with code {code}"
    return (
        f"replay lane failed: {lane.describe()}: {reason}\nThe other lanes were stopped; every batch committed "
        "with its marks, so running the rebuild again (paymentsvc replay ... --resume) carries on exactly."
    )


def _stop_all(lanes: Sequence[_Lane]) -> None:
    """SIGTERM every lane process still running, wait for it, SIGKILL what does not stop."""
    for lane in lanes:
        if lane.process.is_alive():
            with contextlib.suppress(OSError):
                lane.process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for lane in lanes:
        lane.process.join(max(0.0, deadline - time.monotonic()))
        if lane.process.is_alive():
            lane.process.kill()
            lane.process.join()
        lane.pipe.close()
