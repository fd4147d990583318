"""`paymentsvc dev --with-prometheus`: the real Prometheus beside the dev stack.

It runs Debian's `prometheus` binary (the package that also gives the tests their
`promtool`) on a free 127.0.0.1 port, with a generated configuration that scrapes
every service's /metrics and loads the production alert rules
(infra/prometheus/alerts.yaml, package data here as `prometheus_alerts.yaml`), so a
developer sees the metrics and the alerts' states as production would. Its data lives
in the dev log directory and starts empty on every run, like the embedded broker's log.
The dev stack stops it by its pid.
"""

from __future__ import annotations

import importlib.resources
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from shared.devbroker import die_with_parent, free_port, stop_process
from shared.errors import DependencyUnavailable

SCRAPE_INTERVAL = "5s"  # production scrapes less often; a developer wants to see changes


def alert_rules_path() -> Path:
    return Path(str(importlib.resources.files("paymentsvc") / "prometheus_alerts.yaml"))


def prometheus_config(targets: Mapping[str, str], rules: Path) -> dict[str, object]:
    """One scrape job per service (`job` is the service name), `targets` as name -> host:port."""
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": name, "metrics_path": "/metrics", "static_configs": [{"targets": [address]}]}
            for name, address in targets.items()
        ],
    }


class DevPrometheus:
    """One Prometheus process with a generated configuration. Not for production."""

    def __init__(self, targets: Mapping[str, str], log_dir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.targets = dict(targets)
        self.log_dir = log_dir
        self.log_path = log_dir / "prometheus.log"
        self.config_path = log_dir / "prometheus.yml"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Write the configuration and start Prometheus (call from the main thread: the
        child dies with the thread that forked it). Raises DependencyUnavailable when the
        binary is missing; `wait_ready` then waits for it."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise DependencyUnavailable(
                "prometheus", "PATH", "not installed | install it with: apt-get install prometheus (or make tools)"
            )
        rules = alert_rules_path()
        if not rules.is_file():
            raise DependencyUnavailable("prometheus", str(rules), "the alert rules are missing from the package")
        data = self.log_dir / "prometheus-data"
        shutil.rmtree(data, ignore_errors=True)  # the series of an earlier run's stack mean nothing now
        # JSON is YAML: Prometheus reads it as its configuration file.
        self.config_path.write_text(json.dumps(prometheus_config(self.targets, rules), indent=2))
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1d",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the dev stack, which stops it in order
                preexec_fn=die_with_parent,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until /-/ready answers 200; raises DependencyUnavailable if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = self._process.returncode if self._process else None
                raise DependencyUnavailable("prometheus", self.url, f"exited with {code}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise DependencyUnavailable("prometheus", self.url, f"not ready in {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the Prometheus we started (by its pid) and wait for it to exit."""
        process, self._process = self._process, None
        stop_process(process, timeout)
