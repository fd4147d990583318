"""`paymentsvc serve NAME --processes N` (issue 13, item 4): N processes on one port
(SO_REUSEPORT), each taking calls; one /metrics summing them; SIGTERM drains all of
them and exits 0; a child that dies takes the whole server down with a failure status.

Real processes on the session's broker, a fresh database and a private redis-server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from prometheus_client.mmap_dict import MmapedDict

from payment.v1 import service_pb2, service_pb2_grpc
from paymentsvc.dev.samples import customer_lifecycle
from shared.config import Topics
from tests.e2e.test_sigterm import SECRET, environment, ready_status, service
from tests.integration.test_ingest_webhooks import signed_headers
from tests.support.processes import PrivateRedis, Service
from tests.support.wait import eventually_sync

pytestmark = pytest.mark.e2e

PROCESSES = 2
CALLS = 40
# Each call on a connection of its own: SO_REUSEPORT spreads connections, not calls.
COUNTED = {"ingest_webhooks": "paymentsvc_webhooks_received_total", "api_grpc": "paymentsvc_api_handled_total"}


def children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command may hold spaces and parentheses: the fields follow the last ')'.
            if int(stat.rpartition(")")[2].split()[1]) == parent:
                found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def calls_per_pid(metrics_dir: Path, metric: str) -> Counter[int]:
    """What each child counted, from its own file of the multiprocess directory."""
    counts: Counter[int] = Counter()
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == metric:
                counts[pid] += int(value)
    return counts


def scraped(port: int, metric: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(metric + "{") or
               line.startswith(metric + " "))


def call_each_on_a_new_connection(name: str, env: dict[str, str]) -> None:
    if name == "ingest_webhooks":
        _, event = customer_lifecycle(int(time.time()))[0]
        body = json.dumps(event).encode()
        for _ in range(CALLS):  # urllib opens a connection per request
            request = urllib.request.Request(
                f"http://127.0.0.1:{env['INGEST_PORT']}/webhooks/stripe", data=body, headers=signed_headers(body, SECRET)
            )
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status == 200
        return
    for _ in range(CALLS):
        # A local subchannel pool: a channel of its own gets a connection of its own.
        with grpc.insecure_channel(f"127.0.0.1:{env['GRPC_PORT']}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            answer = service_pb2_grpc.PaymentServiceStub(ch).CheckEntitlement(
                service_pb2.CheckEntitlementRequest(subject=service_pb2.Subject(user_id="u_processes"), feature_code="projects"),
                metadata=(("authorization", "Bearer sigterm"),), timeout=10,
            )
            assert answer.plan_id


def start(name: str, env: dict[str, str], tmp_path: Path) -> tuple[Service, list[int]]:
    s = service(name, env, tmp_path)
    s.args = ("--processes", str(PROCESSES))
    s.start()
    s.wait_ready()
    assert s.process is not None
    parent = s.process.pid
    eventually_sync(lambda: len(children(parent)) == PROCESSES, what=f"{PROCESSES} children")
    return s, children(parent)


@pytest.mark.parametrize("name", ["ingest_webhooks", "api_grpc"])
def test_n_processes_share_the_port_each_take_calls_and_all_drain_on_sigterm_with_exit_0(
    name: str, broker: str, topics: Topics, database_url: str, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    env = {**environment(broker, topics, database_url, private_redis.url), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    s, pids = start(name, env, tmp_path)
    try:
        # Every child must be ready before the first call, or the first one takes them all.
        eventually_sync(lambda: set(pids_answering(s)) >= set(pids), timeout=60, what="every child ready")
        call_each_on_a_new_connection(name, env)
        counts = calls_per_pid(metrics_dir, COUNTED[name])
        assert set(counts) == set(pids), f"calls per pid {dict(counts)}, children {pids}"
        assert all(n > 0 for n in counts.values()), dict(counts)
        # One scrape of the shared port counts the calls of every child.
        assert scraped(s.health_port, COUNTED[name]) == sum(counts.values()) >= CALLS

        assert s.process is not None
        s.process.send_signal(signal.SIGTERM)
        eventually_sync(lambda: ready_status(s.health_port) == (503, "stopping"), what="not ready, still listening")
        s.process.wait(60)
        assert s.process.returncode == 0, s.log_tail()
        assert not any(alive(pid) for pid in pids)
    finally:
        s.stop()


def pids_answering(s: Service) -> set[int]:
    """The children that answer /status (which process answers is the kernel's choice)."""
    seen = set()
    for _ in range(20):
        with urllib.request.urlopen(f"http://127.0.0.1:{s.health_port}/status", timeout=5) as answer:
            seen.add(json.loads(answer.read())["pid"])
    return seen


def test_a_child_that_dies_stops_the_others_and_the_parent_exits_non_zero(
    broker: str, topics: Topics, database_url: str, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    env = {**environment(broker, topics, database_url, private_redis.url), "SHUTDOWN_DELAY_S": "0"}
    s, pids = start("ingest_webhooks", env, tmp_path)
    try:
        os.kill(pids[0], signal.SIGKILL)
        assert s.process is not None
        s.process.wait(60)
        assert s.process.returncode == 1, s.log_tail()
        assert not alive(pids[1])
        assert "a child exited on its own" in s.log_tail(80)
    finally:
        s.stop()


def serve_processes(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paymentsvc", "serve", name, "--processes", "2"],
        env=env, capture_output=True, text=True, timeout=60,
    )


def test_a_worker_refuses_processes_and_says_how_it_scales() -> None:
    done = serve_processes("usage", {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert done.returncode == 2, done.stderr
    assert "scale usage by replicas in its consumer group" in done.stderr


def test_processes_refuse_a_port_that_is_taken_instead_of_sharing_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "INGEST_PORT": str(port)}
        done = serve_processes("ingest_webhooks", env)
    assert done.returncode == 2, done.stderr
    assert f"INGEST_PORT 127.0.0.1:{port} is in use" in done.stderr
