"""Reading the rendered Kubernetes manifests of infra/k8s (tests/unit/test_k8s_manifests.py
checks them; tests/e2e/test_k8s_pod_constraints.py runs what they describe).

`render(overlay)` runs `kubectl kustomize` (found by tests.support.tools: skipped on a
laptop without it, failing under CI=true); the rest reads the parsed objects.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.tools import tool

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"

Doc = dict[str, Any]


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def render(overlay: str) -> str:
    result = run([tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)])
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return result.stdout


def parse(text: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(text) if d]


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(Kind/name, pod spec) of every Deployment and Job."""
    for d in docs:
        if d.get("kind") in ("Deployment", "Job"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]


def containers(pod: Doc) -> list[Doc]:
    return list(pod.get("initContainers") or []) + list(pod.get("containers") or [])


def config_map_data(docs: list[Doc], name: str) -> dict[str, str]:
    return dict(named(docs, "ConfigMap", name).get("data") or {})


def environment(docs: list[Doc], container: Doc) -> dict[str, str | SecretRef | None]:
    """The container's environment as the kubelet builds it: envFrom first, env over it.
    A secret is a SecretRef (never its value); another valueFrom is None."""
    env: dict[str, str | SecretRef | None] = {}
    for source in container.get("envFrom") or []:
        assert "configMapRef" in source, f"unexpected envFrom {source}"
        env.update(config_map_data(docs, source["configMapRef"]["name"]))
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = SecretRef(ref["name"], ref["key"])
        else:
            env[var["name"]] = None
    return env


def served_name(container: Doc) -> str | None:
    args = list(container.get("command") or []) + list(container.get("args") or [])
    return args[1] if len(args) == 2 and args[0] == "serve" else None


def deployments_by_service(docs: list[Doc]) -> dict[str, tuple[Doc, Doc]]:
    """service name -> (its Deployment, the container that serves it)."""
    found: dict[str, tuple[Doc, Doc]] = {}
    for d in of_kind(docs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            name = served_name(c)
            if name is not None:
                found[name] = (d, c)
    return found



def dockerfile_uid() -> int:
    users = re.findall(r"^\s*USER\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert users, "the Dockerfile sets no USER"
    return int(users[-1].split(":")[0])



def pre_stop_seconds(container: Doc) -> float:
    """The container's preStop `sleep`, 0 without one."""
    return float(((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0))
