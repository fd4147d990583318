"""shared.devbroker.start_and_wait: how the dev stack's and the tests' own servers start.

Real child processes (a Python one-liner), no fakes: they are cheap and start in
milliseconds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from shared.devbroker import start_and_wait


class Refused(Exception):
    pass


def test_a_child_that_answers_is_returned_running(tmp_path: Path) -> None:
    marker = tmp_path / "up"
    command = [sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(30)"]
    process = start_and_wait(command, tmp_path / "child.log", marker.exists, Refused, timeout=20)
    try:
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()


def test_a_child_that_exits_raises_with_its_status_and_log(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "print('bad flag'); raise SystemExit(3)"]
    with pytest.raises(Refused, match=r"exited with 3; see .*child\.log"):
        start_and_wait(command, tmp_path / "child.log", lambda: False, Refused, timeout=20)
    assert "bad flag" in (tmp_path / "child.log").read_text()


def test_a_child_that_never_answers_is_stopped_at_the_deadline(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    command = [sys.executable, "-c", f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(30)"]
    with pytest.raises(Refused, match="no answer in 3 s"):
        start_and_wait(command, tmp_path / "child.log", lambda: False, Refused, timeout=3)
    pid = int(pid_file.read_text())  # it ran for 3 s: long enough to write it
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped
