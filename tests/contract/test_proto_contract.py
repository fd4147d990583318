"""`buf lint` and `buf breaking` over proto/, so a breaking change fails the build.

The baseline of `buf breaking` (proto/README.md, "What CI checks"):

- `BUF_BREAKING_AGAINST` (a commit) when set: a CI that knows the previous tip of main
  (a push's "before" commit) names it, and a push of several commits is checked whole;
- on a branch: where it left main (`git merge-base HEAD main`, or `origin/main`), so
  fields main added since are not taken for deletions;
- on main itself (CI's clone, whose HEAD is main): the commit before HEAD. Its proto/
  is the proto/ of the last commit before HEAD that touched it, so the two choices are
  the same check.

The working tree is compared, so an uncommitted change is checked too. A shallow clone
without the baseline commit fails under CI with the remedy, and skips elsewhere.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.support.tools import ROOT, tool

PROTO = ROOT / "proto"


def git(*args: str) -> str:
    """stdout of a git command in the repository, stripped; "" when it fails."""
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


def buf(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("buf"), *map(str, args)], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )


def no_baseline(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def baseline_commit() -> str:
    """The commit whose proto/ the working tree must stay compatible with (module doc)."""
    explicit = os.environ.get("BUF_BREAKING_AGAINST", "")
    if explicit:
        found = git("rev-parse", "--verify", "--quiet", f"{explicit}^{{commit}}")
        if not found:
            no_baseline(f"BUF_BREAKING_AGAINST={explicit} is not a commit of this clone (git fetch it)")
        return found
    head = git("rev-parse", "HEAD")
    if not head:
        pytest.skip("not a git checkout: no previous proto/ to compare with")
    for main in ("main", "origin/main"):
        tip = git("rev-parse", "--verify", "--quiet", f"{main}^{{commit}}")
        base = git("merge-base", "HEAD", tip) if tip and tip != head else ""
        if base and base != head:
            return base
    parent = git("rev-parse", "--verify", "--quiet", "HEAD~1^{commit}")
    if parent:
        return parent
    if git("rev-parse", "--is-shallow-repository") == "true":
        no_baseline("a shallow clone without the commit before HEAD: `git fetch --deepen=1` (or clone with depth 2)")
    pytest.skip("HEAD is the first commit: no previous proto/ to compare with")
    raise AssertionError("unreachable")


def proto_at(commit: str, into: Path) -> Path | None:
    """proto/ as it was at `commit`, extracted under `into`; None when it had none."""
    done = subprocess.run(["git", "archive", commit, "proto"], cwd=ROOT, capture_output=True, check=False)
    if done.returncode != 0:
        return None
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        archive.extractall(into, filter="data")
    return into / "proto"


def copy_of_proto(tmp_path: Path) -> Path:
    copy = tmp_path / "proto"
    shutil.copytree(PROTO, copy)
    return copy


def test_the_protos_pass_buf_lint_with_the_listed_exceptions() -> None:
    done = buf("lint", PROTO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_protos_make_no_breaking_change_against_the_baseline_commit(tmp_path: Path) -> None:
    commit = baseline_commit()
    previous = proto_at(commit, tmp_path)
    if previous is None:
        pytest.skip(f"{commit[:12]} has no proto/: nothing to stay compatible with")
    done = buf("breaking", PROTO, "--against", previous)
    assert done.returncode == 0, f"breaking changes against {commit[:12]}:\n{done.stdout}{done.stderr}"


def test_a_renumbered_field_is_caught_as_breaking(tmp_path: Path) -> None:
    changed = copy_of_proto(tmp_path)
    events = changed / "payment" / "v1" / "events.proto"
    source = events.read_text()
    assert source.count("string user_id = 2;") == 1
    events.write_text(source.replace("string user_id = 2;", "string user_id = 99;"))

    done = buf("breaking", changed, "--against", PROTO)
    assert done.returncode != 0
    assert 'field "2" with name "user_id" on message "PaymentEvent" was deleted' in done.stdout, done.stdout


def test_an_added_field_is_not_breaking_so_the_check_is_not_simply_failing(tmp_path: Path) -> None:
    changed = copy_of_proto(tmp_path)
    events = changed / "payment" / "v1" / "events.proto"
    source = events.read_text()
    events.write_text(source.replace("  string dispute_id = 57;", "  string dispute_id = 57;\n  string added_later = 58;"))
    assert events.read_text() != source

    done = buf("breaking", changed, "--against", PROTO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_lint_exceptions_are_scoped_so_a_new_violation_still_fails(tmp_path: Path) -> None:
    changed = copy_of_proto(tmp_path)
    events = changed / "payment" / "v1" / "events.proto"
    events.write_text(events.read_text().replace("  string dispute_id = 57;", "  string dispute_id = 57;\n  string newField = 58;"))

    done = buf("lint", changed)
    assert done.returncode != 0
    assert "newField" in done.stdout, done.stdout
