"""`paymentsvc dev --embedded` as a newcomer with no Postgres and no Redis runs it (issue 18).

The machine's Postgres and Redis are deliberately out of reach: DATABASE_URL and
REDIS_URL name a port that refuses every connection, and no broker or Stripe is
configured. The stack starts its own Postgres, Redis, Tansu and localstripe, and
every service must become ready; a webhook sent with `paymentsvc send-webhook` must
come out of the gRPC API. After Ctrl-C no process of the tree and no port is left.

A second run on the same directory shows what an embedded run keeps: the Postgres
cluster (no initdb, the catalog still there), but not the projections (the broker
forgot the events that built them) and not Redis.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
import redis

from payment.v1 import service_pb2, service_pb2_grpc
from paymentsvc.devstack import DEV_API_KEY, DEV_WEBHOOK_SECRET
from paymentsvc.devstores import default_url, postgres_answers, redis_answers
from shared.devbroker import free_port
from tests.conftest import random_id
from tests.support.net import listening, refusing_port
from tests.support.netns import require_network_namespace, without_ci
from tests.support.processes import ROOT
from tests.support.wait import eventually_sync

pytestmark = pytest.mark.e2e

PORTS = ("GRPC_PORT", "GRPC_HTTP_PORT", "INGEST_PORT", "ENTITLEMENTS_PORT", "USAGE_PORT", "DUNNING_PORT")
# Anything that would lead the stack to a service of the machine, or to our test session's.
NOT_INHERITED = ("STRIPE_", "API_KEYS", "KAFKA_", "DATABASE_URL", "REDIS_URL", "TEST_ADMIN_DATABASE_URL")


def process_tree(root: int) -> set[int]:
    """`root` and every live descendant, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        tree.update(children)
        frontier.extend(children)
    return tree


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health/ready", timeout=2) as answer:
            return bool(answer.status == 200 and json.loads(answer.read()) == {"status": "ready"})
    except OSError:
        return False


def plan_of(grpc_port: int, user: str) -> tuple[bool, str]:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        answer = service_pb2_grpc.PaymentServiceStub(channel).CheckEntitlement(
            service_pb2.CheckEntitlementRequest(subject=service_pb2.Subject(user_id=user), feature_code="projects"),
            metadata=(("authorization", f"Bearer {DEV_API_KEY}"),),
            timeout=5,
        )
    return bool(answer.allowed), str(answer.plan_id)


class EmbeddedDevRun:
    """One `paymentsvc dev --embedded` until stop(), which checks that it left nothing behind."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str, flags: tuple[str, ...] = ("--embedded",)) -> None:
        self.env, self.log_dir = env, log_dir
        self.output = log_dir / f"{name}.out"
        (log_dir / "stack.json").unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "paymentsvc.cli", "dev", *flags, "--log-dir", str(log_dir)],
            cwd=ROOT, env=env, stdout=open(self.output, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        self.stack: dict = eventually_sync(self._started, timeout=120, what="the dev stack's stack.json")  # type: ignore[type-arg]

    def _started(self) -> dict | None:  # type: ignore[type-arg]
        """stack.json once it lists the embedded stores (they are added to it last)."""
        if self.process.poll() is not None:
            raise AssertionError(f"paymentsvc dev exited {self.process.returncode}:\n{self.text()[-3000:]}")
        try:
            stack = json.loads((self.log_dir / "stack.json").read_text())
        except (FileNotFoundError, ValueError):  # not yet, or being written
            return None
        return stack if "embedded" in stack else None

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def said(self, words: str) -> bool:
        """Whether the console output says `words`, however the terminal wrapped it."""
        return words in " ".join(self.text().split())

    def ports(self) -> list[int]:
        urls = [*self.stack["services"].values(), self.stack["stripe_api_base"], self.stack["kafka_bootstrap_servers"],
                self.stack["embedded"]["postgres"]["url"], self.stack["embedded"]["redis"]["url"]]
        return [int(url.rsplit(":", 1)[1].split("/")[0]) for url in urls] + [int(self.env["GRPC_PORT"])]

    def send(self, customer: str, user: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "paymentsvc.cli", "send-webhook", "customer.subscription.created",
             "--customer", customer, "--user", user, "--secret", DEV_WEBHOOK_SECRET,
             "--to", f"{self.stack['services']['ingest_webhooks']}/webhooks/stripe"],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0 and done.stdout.startswith("200"), done.stdout + done.stderr

    def stop(self) -> None:
        """Ctrl-C, then: a clean exit, no process of its tree alive, none of its ports answering."""
        tree, ports = process_tree(self.process.pid), self.ports()
        # Every child: 5 services, Tansu, localstripe, postgres (with its own backends), redis.
        assert len(tree) >= 10, tree
        self.process.send_signal(signal.SIGINT)
        try:
            assert self.process.wait(60) == 0, self.text()[-3000:]
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        eventually_sync(lambda: not any(alive(pid) for pid in tree), timeout=15, what="every process of the tree gone")
        left = [port for port in ports if listening(port)]
        assert not left, f"still listening after Ctrl-C: {left}"


@pytest.fixture
def log_dir() -> Iterator[Path]:
    """Not pytest's tmp_path: as root the embedded Postgres runs as another user, who must get in."""
    path = Path(tempfile.mkdtemp(prefix="dev-embedded-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_embedded_dev_runs_a_webhook_to_the_api_without_the_machines_postgres_and_redis_and_leaves_nothing(
    log_dir: Path,
) -> None:
    with refusing_port() as nowhere:
        env = {k: v for k, v in os.environ.items() if not k.startswith(NOT_INHERITED)}
        env.update(
            DATABASE_URL=f"postgresql://postgres@127.0.0.1:{nowhere}/paymentsvc",
            REDIS_URL=f"redis://127.0.0.1:{nowhere}/0",
            **{p: str(free_port()) for p in PORTS},
        )
        grpc_port = int(env["GRPC_PORT"])
        customer, user = random_id("cus_"), random_id("user_")

        first = EmbeddedDevRun(env, log_dir, "run1")
        try:
            embedded = first.stack["embedded"]
            assert str(nowhere) not in embedded["postgres"]["url"] + embedded["redis"]["url"]
            assert first.said("postgres: embedded (--embedded; DATABASE_URL ignored), a new cluster")
            assert first.said("redis: embedded (--embedded; REDIS_URL ignored), starts empty")
            for name, url in first.stack["services"].items():
                assert ready(url), f"{name} is not ready at {url}"
            first.send(customer, user)
            assert eventually_sync(lambda: plan_of(grpc_port, user) == (True, "basic"), timeout=60,
                                   what="the subscription answered by the gRPC API", interval=0.5)
            marker = redis.Redis.from_url(embedded["redis"]["url"])
            try:
                marker.set("dev-embedded-marker", "1")
            finally:
                marker.close()
        finally:
            first.stop()

        second = EmbeddedDevRun(env, log_dir, "run2")
        try:
            assert second.said("the cluster kept from the last run")
            with psycopg.connect(second.stack["embedded"]["postgres"]["url"]) as conn:
                plans = conn.execute("SELECT count(*) FROM plans").fetchone()
                subscriptions = conn.execute("SELECT count(*) FROM subscriptions").fetchone()
            assert plans is not None and plans[0] > 0  # the catalog is operator data: kept
            assert subscriptions == (0,)  # built from the first run's log, which is gone
            client = redis.Redis.from_url(second.stack["embedded"]["redis"]["url"])
            try:
                assert client.exists("dev-embedded-marker", f"ent:user:{user}") == 0  # Redis keeps nothing
            finally:
                client.close()
            assert plan_of(grpc_port, user) == (True, "free")  # no subscription: the free plan
        finally:
            second.stop()


DEFAULTS_ANSWER = postgres_answers(default_url("database_url")) or redis_answers(default_url("redis_url"))


@pytest.mark.skipif(DEFAULTS_ANSWER, reason="a Postgres or Redis answers at its default address on this machine "
                    "(the next test runs this one in a network namespace of its own where it can)")
def test_automatic_plain_paymentsvc_dev_on_a_machine_with_nothing_at_the_defaults_starts_its_own(log_dir: Path) -> None:
    """`make dev` as a newcomer without Postgres and Redis: no flag, no variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(NOT_INHERITED)}
    env.update({p: str(free_port()) for p in PORTS})
    customer, user = random_id("cus_"), random_id("user_")
    run = EmbeddedDevRun(env, log_dir, "run", flags=())
    try:
        assert run.said("postgres: embedded (DATABASE_URL unset and nothing answers at its default), a new cluster")
        assert run.said("redis: embedded (REDIS_URL unset and nothing answers at its default)")
        run.send(customer, user)
        assert eventually_sync(lambda: plan_of(int(env["GRPC_PORT"]), user) == (True, "basic"), timeout=60,
                               what="the subscription answered by the gRPC API", interval=0.5)
    finally:
        run.stop()


def test_automatic_the_newcomer_test_passes_in_a_network_namespace_where_nothing_answers(log_dir: Path) -> None:
    """The test above, where it can run on any machine: in a network namespace of its own, no
    server of the machine answers anywhere, so the rule's automatic branch is taken for real."""
    prefix = require_network_namespace()
    env = without_ci({k: v for k, v in os.environ.items() if not k.startswith(NOT_INHERITED)})
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "automatic_plain",
         str(Path(__file__).relative_to(ROOT))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "1 passed" in output, output[-4000:]
    assert "stores: postgres embedded" in output  # the inner session had no Postgres either
