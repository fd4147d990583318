"""localstripe, the stateful fake Stripe, for `paymentsvc dev` and the tests.

It runs as a child process on a free loopback port. The `stripe` SDK is pointed
at it through STRIPE_API_BASE, and it delivers signed webhooks to the URLs
registered with `register_webhook`. It has no Checkout Sessions and no Prices.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from shared.devbroker import free_port, start_and_wait, stop_process
from shared.errors import DependencyUnavailable

DEV_SECRET_KEY = "sk_test_paymentsvc_dev"


class LocalStripe:
    def __init__(self, port: int | None = None, log_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = (log_dir or Path(tempfile.gettempdir())) / f"localstripe-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout: float = 20.0) -> None:
        self._process = start_and_wait(
            self.command(),
            self.log_path,
            self._answers,
            lambda detail: DependencyUnavailable("localstripe", self.api_base, detail),
            timeout,
        )

    def _answers(self) -> bool:
        try:
            self._request("GET", "/v1/customers", auth=True)
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def command(self) -> list[str]:
        """The child's command line (a test may start localstripe differently)."""
        return [sys.executable, "-m", "localstripe", "--port", str(self.port), "--from-scratch"]

    def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        stop_process(process, timeout)

    def register_webhook(self, endpoint_id: str, url: str, secret: str, events: list[str] | None = None) -> None:
        """Make localstripe deliver its events to `url`, signed with `secret`."""
        fields: list[tuple[str, str]] = [("url", url), ("secret", secret)]
        for event in events or []:
            fields.append(("events[]", event))
        self._request("POST", f"/_config/webhooks/{endpoint_id}", data=fields)

    def _request(self, method: str, path: str, data: list[tuple[str, str]] | None = None, auth: bool = False) -> bytes:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        request = urllib.request.Request(self.api_base + path, data=body, method=method)
        if auth:
            request.add_header("Authorization", f"Bearer {DEV_SECRET_KEY}")
        with urllib.request.urlopen(request, timeout=5) as response:
            return bytes(response.read())

    def __enter__(self) -> LocalStripe:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
