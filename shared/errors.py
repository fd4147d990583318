"""Errors that cross module boundaries.

`DependencyUnavailable` is what a command or service raises when Postgres, Redis
or the broker cannot be reached. The CLI prints its message as one line, with
the command that starts the dependency, instead of a traceback.
"""

from __future__ import annotations

START_HINTS = {
    "postgres": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "redis": (
        'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
        "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
    ),
    "kafka": "unset KAFKA_BOOTSTRAP_SERVERS to use the embedded Tansu broker, or start your cluster",
}


class DependencyUnavailable(RuntimeError):
    """A dependency (postgres, redis, kafka) did not answer."""

    def __init__(self, dependency: str, where: str, detail: str, hint: str | None = None) -> None:
        self.dependency = dependency
        self.where = where
        self.detail = detail
        if hint is None:
            hint = START_HINTS.get(dependency, "")
        message = f"{dependency} at {where} is unavailable: {detail}"
        if hint:
            message += f" | {hint}" if hint.startswith("run ") else f" | start it with: {hint}"
        super().__init__(message)


class ConfigurationError(ValueError):
    """The configuration is invalid; the message says which setting and why."""
