"""Every service and Job runs the way infra/k8s runs it (the prod overlay): its own command
and the environment its manifest gives it, as uid 10001 on a read-only root filesystem
with only /tmp writable. On SIGTERM a service drains well within its pod's
terminationGracePeriodSeconds (less the preStop, which runs before SIGTERM).

No cluster is needed. The rendered manifest gives the command and the environment.
Only the addresses (the test's broker, database and Redis, free ports) and the
secrets (the operator's Secret) are the test's. The process runs in a mount
namespace of its own, where the root filesystem and the checkout are remounted
read-only and /tmp is a fresh tmpfs, like the pod's emptyDir. It then drops to the
Dockerfile's uid. Needs root (to remount) and `kubectl` (to render).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.config import SERVICE_PORTS, Topics
from shared.devbroker import free_port
from tests.support.k8s import (
    ROOT,
    Doc,
    SecretRef,
    containers,
    deployments_by_service,
    dockerfile_uid,
    environment,
    named,
    parse,
    pre_stop_seconds,
    render,
)
from tests.support.processes import PrivateRedis

pytestmark = pytest.mark.e2e

# Mount a fresh /tmp, remount / and the checkout read-only (in this namespace only),
# prove the root is not writable, then become the image's user.
SANDBOX = r"""
set -eu
# A checkout under /tmp (a CI clone) would vanish under the fresh tmpfs: bind it back at
# its own path, from the working directory, which still reaches the hidden original
# (--no-canonicalize: resolved, "." would name the new, empty folder).
cd "$PAYMENTSVC_ROOT"
mount -t tmpfs -o size=64m,mode=1777 tmpfs /tmp
case "$PAYMENTSVC_ROOT" in
  /tmp/*) mkdir -p "$PAYMENTSVC_ROOT" && mount --no-canonicalize --bind . "$PAYMENTSVC_ROOT" ;;
esac
cd /
mount -o remount,bind,ro /
checkout=$(findmnt -no TARGET -T "$PAYMENTSVC_ROOT")
[ "$checkout" = / ] || mount -o remount,bind,ro "$checkout"
if touch /.k8s-rw-probe "$PAYMENTSVC_ROOT/.k8s-rw-probe" 2>/dev/null; then
  echo "the root filesystem is still writable" >&2; exit 97
fi
touch /tmp/.k8s-tmp-probe
as_user() { setpriv --reuid "$RUN_UID" --regid "$RUN_UID" --clear-groups -- "$@"; }
as_user test -r "$PAYMENTSVC_ROOT/pyproject.toml" || exit 96
exec setpriv --reuid "$RUN_UID" --regid "$RUN_UID" --clear-groups -- "$@"
"""
UNREADABLE = 96  # the checkout is not readable by the image's uid (a private parent folder)


@pytest.fixture(scope="module")
def prod() -> list[Doc]:
    return parse(render("prod"))


@pytest.fixture
def catalog_dir(prod: list[Doc]) -> Iterator[Path]:
    """The rendered catalog ConfigMap as files, outside /tmp (the sandbox mounts over it)."""
    folder = ROOT / ".scratch" / f"k8s-catalog-{secrets.token_hex(4)}"
    folder.mkdir(parents=True)
    data = next(d["data"] for d in prod if d["kind"] == "ConfigMap" and "plans.yaml" in d.get("data", {}))
    (folder / "plans.yaml").write_text(data["plans.yaml"])
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skips (fails under CI=true) without root, unshare and setpriv; skips where the
    checkout cannot be read by the image's uid, which says nothing about the manifests."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None:
        message = "needs root with unshare and setpriv (util-linux) to remount the filesystem read-only"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    log = tmp_path_factory.mktemp("sandbox") / "probe.log"
    code = sandboxed(["--help"], {"PATH": os.environ.get("PATH", "")}, log).wait(60)
    if code == UNREADABLE:
        pytest.skip(f"uid {dockerfile_uid()} cannot read the checkout at {ROOT} (a private parent folder)")
    assert code == 0, tail(log)


def pod_env(prod: list[Doc], container: Doc, overrides: dict[str, str]) -> dict[str, str]:
    """The container's environment from its manifest, secrets and addresses replaced."""
    manifest = environment(prod, container)
    env = {k: v for k, v in manifest.items() if isinstance(v, str)}
    missing = {k for k, v in manifest.items() if isinstance(v, SecretRef)} - set(overrides)
    assert not missing, f"the test gives no value for the secrets {missing}"
    keep = {k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ}
    return {**keep, "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent", **env, **overrides}


def addresses(broker: str, topics: Topics, database_url: str, redis_url: str, catalog: Path) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url, "REDIS_URL": redis_url, "KAFKA_BOOTSTRAP_SERVERS": broker,
        "KAFKA_TOPIC_PREFIX": topics.prefix, "CATALOG_PATH": str(catalog / "plans.yaml"),
        "BIND_HOST": "127.0.0.1", "GRPC_PORT": str(free_port()),
        **{setting.upper(): str(free_port()) for setting in SERVICE_PORTS.values()},
        # The operator's Secret.
        "STRIPE_WEBHOOK_SECRETS": "whsec_k8s_test", "STRIPE_SECRET_KEY": "sk_test_k8s",
        "STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}",
        "API_KEYS": "k8s=read", "TOKEN_SIGNING_KEYS": "k8s-test-signing-key-0123456789abcdef",
    }


def sandboxed(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", SANDBOX, "sandbox",
         sys.executable, "-m", "paymentsvc.cli", *argv],
        cwd="/",
        env={**env, "PAYMENTSVC_ROOT": str(ROOT), "RUN_UID": str(dockerfile_uid())},
        stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )


def tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-30:])


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def test_the_jobs_run_read_only_as_the_image_user(
    sandbox: None, prod: list[Doc], broker: str, database_url: str, catalog_dir: Path, tmp_path: Path
) -> None:
    topics = Topics(prefix=f"k8s{secrets.token_hex(3)}.")
    for job in ("migrate", "topics"):
        spec = named(prod, "Job", job)["spec"]["template"]["spec"]
        for container in containers(spec):
            argv = list(container.get("args") or [])
            env = pod_env(prod, container, addresses(broker, topics, database_url, "redis://unused", catalog_dir))
            log = tmp_path / f"{container['name']}.log"
            process = sandboxed(argv, env, log)
            assert process.wait(120) == 0, f"paymentsvc {' '.join(argv)}:\n{tail(log)}"
    assert f"created {len(topics.all())} topic(s)" in (tmp_path / "topics.log").read_text()
    assert "loaded " in (tmp_path / "catalog-load.log").read_text()


@pytest.mark.parametrize("name", list(SERVICE_PORTS))
def test_a_service_runs_read_only_as_the_image_user_and_drains_within_its_grace_period(
    sandbox: None, name: str, prod: list[Doc], broker: str, topics: Topics, database_url: str,
    private_redis: PrivateRedis, catalog_dir: Path, tmp_path: Path,
) -> None:
    deployment, container = deployments_by_service(prod)[name]
    env = pod_env(prod, container, addresses(broker, topics, database_url, private_redis.url, catalog_dir))
    port = int(env[SERVICE_PORTS[name].upper()])
    log = tmp_path / f"{name}.log"
    process = sandboxed(list(container["args"]), env, log)
    try:
        deadline = time.monotonic() + 90
        while not ready(port):
            assert process.poll() is None, f"{name} exited {process.returncode}:\n{tail(log)}"
            assert time.monotonic() < deadline, f"{name} not ready after 90 s:\n{tail(log)}"
            time.sleep(0.2)
        spec = deployment["spec"]["template"]["spec"]
        budget = spec["terminationGracePeriodSeconds"] - pre_stop_seconds(container)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(budget + 10)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert code == 0, tail(log)
    assert took < budget, f"{name} took {took:.1f} s to drain; its pod allows {budget:.0f} s after preStop"
    assert float(env["SHUTDOWN_DELAY_S"]) <= took, "the shutdown delay was not honoured"
