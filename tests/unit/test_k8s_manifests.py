"""The Kubernetes manifests (infra/k8s) render, are valid, and agree with the code.

Offline, with no cluster: each overlay is rendered with `kubectl kustomize`, every
rendered resource is validated against the Kubernetes schemas (`kubernetes-validate
--strict`, its bundled schemas), the rendered objects are checked against
`shared.config` and the CLI below, and `checkov` scans them, failing on any finding
not in infra/k8s/checkov-allowlist.yaml. The tools come from `.ci/install-tools`
(`make tools`); without them these tests skip on a laptop and fail under CI=true.

Like tests/unit/test_compose.py, each check is a function that returns its problems,
so the tests further down can show that a broken manifest is caught.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from pydantic import AliasChoices

from paymentsvc.cli import app as cli_app
from shared.config import SERVICE_NAMES, SERVICE_PORTS, Settings
from tests.support.k8s import (
    K8S,
    ROOT,
    Doc,
    SecretRef,
    containers,
    deployments_by_service,
    dockerfile_uid,
    environment,
    named,
    of_kind,
    parse,
    pre_stop_seconds,
    render,
    run,
    served_name,
    workloads,
)
from tests.support.tools import tool

OVERLAYS = ("dev", "prod")
ALLOWLIST = K8S / "checkov-allowlist.yaml"
CATALOG = ROOT / "catalog" / "plans.yaml"
# The oldest Kubernetes the manifests support (the preStop `sleep` action is on by
# default from 1.30) and the newest the bundled schemas know.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Past the drain itself: closing the producer, the pools and the Redis client.
DRAIN_MARGIN_S = 5.0
SERVED = ("ingest_webhooks", "api_grpc")  # reached through a Service; the rest are workers
WITH_HPA = SERVED
# Text that only a real secret would contain: Stripe keys and signing secrets, a
# URL with a password.
SECRET_LOOKING = re.compile(r"\b(?:sk|rk)_(?:live|test)_\w+|\bwhsec_\w+|://[^/\s:@]+:[^@\s/]+@")


# --- the tools -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {overlay: parse(render(overlay)) for overlay in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def docs(request: pytest.FixtureRequest, rendered: dict[str, list[Doc]]) -> list[Doc]:
    return copy.deepcopy(rendered[request.param])


def validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    return run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)])


# --- what the code says: settings, the CLI ---------------------------------------------


def number(env: dict[str, str | SecretRef | None], name: str) -> float:
    value = env.get(name)
    if isinstance(value, str):
        return float(value)
    default = Settings.model_fields[name.lower()].default
    assert isinstance(default, int | float), name
    return float(default)


def settings_env_names() -> frozenset[str]:
    """The environment variables `Settings` reads: the field name upper-cased, or its aliases."""
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias or field.alias
        if alias is None:
            names.add(name.upper())
        elif isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names.update(c.upper() for c in alias.choices if isinstance(c, str))
    return frozenset(names)


def secret_env_names() -> frozenset[str]:
    """The variables of settings typed SecretStr (or a list of them)."""
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        if "SecretStr" not in str(field.annotation):
            continue
        alias = field.validation_alias or field.alias
        if isinstance(alias, AliasChoices):
            names.update(c.upper() for c in alias.choices if isinstance(c, str))
        else:
            names.add((alias if isinstance(alias, str) else name).upper())
    return frozenset(names)


def cli_command_exists(words: list[str]) -> bool:
    """Whether `paymentsvc WORDS...` names a command of the CLI (its options aside)."""
    # Typer bundles its own click: a group is whatever has subcommands.
    command: Any = typer.main.get_command(cli_app)
    for word in words:
        if not hasattr(command, "get_command"):
            return True  # the rest are the command's own arguments
        command = command.get_command(None, word)
        if command is None:
            return False
    return not hasattr(command, "get_command")


def port_number(container: Doc, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    return None


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- the checks: each returns its problems ---------------------------------------------


def service_problems(docs: list[Doc]) -> list[str]:
    """One Deployment per service, running `paymentsvc serve NAME`; a Service for those
    that are called, reaching a named container port."""
    problems = []
    by_service = deployments_by_service(docs)
    for d in of_kind(docs, "Deployment"):
        names = [served_name(c) for c in d["spec"]["template"]["spec"]["containers"]]
        problems += [f"Deployment/{d['metadata']['name']} serves unknown {n!r}"
                     for n in names if n is not None and n not in SERVICE_NAMES]
    problems += [f"no Deployment runs `serve {n}`" for n in SERVICE_NAMES if n not in by_service]
    for name in SERVED:
        if name not in by_service:
            continue
        deployment, container = by_service[name]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [s for s in of_kind(docs, "Service") if selects(s["spec"].get("selector") or {}, labels)]
        if not matching:
            problems.append(f"no Service selects the pods of {name}")
        for s in matching:
            for p in s["spec"]["ports"]:
                if port_number(container, p.get("targetPort", p["port"])) is None:
                    problems.append(f"Service/{s['metadata']['name']} targets a port {name} does not have")
    return problems


def probe_problems(docs: list[Doc]) -> list[str]:
    """Liveness, readiness and startup probes, and the Prometheus annotations, on the
    HTTP port the service's own setting names (SERVICE_PORTS)."""
    problems = []
    for name, (deployment, container) in deployments_by_service(docs).items():
        if name not in SERVICE_PORTS:
            continue
        where = f"Deployment/{deployment['metadata']['name']}"
        port = int(number(environment(docs, container), SERVICE_PORTS[name].upper()))
        if port_number(container, "http") != port:
            problems.append(f"{where}: its port `http` is not {SERVICE_PORTS[name].upper()}={port}")
        for probe, path in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready"),
                            ("startupProbe", "/health/live")):
            get = (container.get(probe) or {}).get("httpGet")
            if get is None:
                problems.append(f"{where}: no HTTP {probe}")
                continue
            if get.get("path") != path or port_number(container, get.get("port", "")) != port:
                problems.append(f"{where}: {probe} is not GET {path} on port {port}")
        annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
        expected = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}
        if any(annotations.get(k) != v for k, v in expected.items()):
            problems.append(f"{where}: Prometheus annotations are not {expected}")
    return problems


def security_problems(docs: list[Doc]) -> list[str]:
    """Every container: the Dockerfile's non-root uid, verifiably (runAsNonRoot), a
    read-only root filesystem with an emptyDir on /tmp, no privilege escalation, no
    capabilities, no API token."""
    problems = []
    uid = dockerfile_uid()
    for where, pod in workloads(docs):
        pod_ctx = pod.get("securityContext") or {}
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: mounts a service account token")
        empty_dirs = {v["name"] for v in pod.get("volumes") or [] if "emptyDir" in v}
        for c in containers(pod):
            ctx = {**pod_ctx, **(c.get("securityContext") or {})}
            at = f"{where} container {c['name']}"
            if ctx.get("runAsNonRoot") is not True:
                problems.append(f"{at}: runAsNonRoot is not true")
            if ctx.get("runAsUser") in (None, 0) or ctx.get("runAsUser") != uid:
                problems.append(f"{at}: runAsUser is {ctx.get('runAsUser')}, not the Dockerfile's {uid}")
            if ctx.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: the root filesystem is writable")
            if ctx.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{at}: capabilities are not all dropped")
            tmp = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/tmp"]
            if not tmp or tmp[0]["name"] not in empty_dirs:
                problems.append(f"{at}: /tmp is not an emptyDir")
    return problems


def resource_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for where, pod in workloads(docs):
        for c in containers(pod):
            resources = c.get("resources") or {}
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(kind) or {})
                if missing:
                    problems.append(f"{where} container {c['name']}: no {kind} for {sorted(missing)}")
    return problems


def secret_problems(docs: list[Doc], text: str) -> list[str]:
    """Secrets only by reference: no Secret object, every secret setting from a
    secretKeyRef, no secret setting in a ConfigMap, nothing that looks like one."""
    problems = [f"a Secret is rendered: {d['metadata']['name']}" for d in of_kind(docs, "Secret")]
    secret_names = secret_env_names()
    for where, pod in workloads(docs):
        for c in containers(pod):
            for var in c.get("env") or []:
                if var["name"] in secret_names and "secretKeyRef" not in var.get("valueFrom", {}):
                    problems.append(f"{where} container {c['name']}: {var['name']} is not from a secretKeyRef")
    for cm in of_kind(docs, "ConfigMap"):
        problems += [f"ConfigMap/{cm['metadata']['name']} holds the secret {key}"
                     for key in cm.get("data") or {} if key in secret_names]
    problems += [f"something secret-looking is written out: {m.group(0)[:12]}..."
                 for m in SECRET_LOOKING.finditer(text)]
    return problems


def drain_problems(docs: list[Doc]) -> list[str]:
    """terminationGracePeriodSeconds covers preStop + SHUTDOWN_DELAY_S + SHUTDOWN_TIMEOUT_S
    (+ a margin), so the kubelet never kills a drain; pods behind a Service wait in
    preStop and in SHUTDOWN_DELAY_S for the endpoint to be dropped everywhere."""
    problems = []
    for name, (deployment, container) in deployments_by_service(docs).items():
        where = f"Deployment/{deployment['metadata']['name']}"
        env = environment(docs, container)
        delay, timeout = number(env, "SHUTDOWN_DELAY_S"), number(env, "SHUTDOWN_TIMEOUT_S")
        pre_stop = pre_stop_seconds(container)
        grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        if grace < pre_stop + delay + timeout + DRAIN_MARGIN_S:
            problems.append(f"{where}: terminationGracePeriodSeconds {grace} < preStop {pre_stop} + "
                            f"SHUTDOWN_DELAY_S {delay} + SHUTDOWN_TIMEOUT_S {timeout} + {DRAIN_MARGIN_S}")
        if name in SERVED and (pre_stop <= 0 or delay <= 0):
            problems.append(f"{where}: behind a Service, but preStop sleep {pre_stop} s and SHUTDOWN_DELAY_S {delay}")
    return problems


def availability_problems(docs: list[Doc]) -> list[str]:
    """A PodDisruptionBudget per Deployment; an HPA (owning the replica count) for the
    API and the ingester; workers' replicas at most their topic's partitions."""
    problems = []
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(docs, "HorizontalPodAutoscaler")}
    pdbs = of_kind(docs, "PodDisruptionBudget")
    deployment_names = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    problems += [f"HPA targets no Deployment: {n}" for n in hpas if n not in deployment_names]
    for name, (deployment, container) in deployments_by_service(docs).items():
        dname = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if not any(selects(p["spec"]["selector"].get("matchLabels") or {}, labels) for p in pdbs):
            problems.append(f"Deployment/{dname}: no PodDisruptionBudget")
        if name in WITH_HPA:
            if dname not in hpas:
                problems.append(f"Deployment/{dname}: no HorizontalPodAutoscaler")
            elif "replicas" in deployment["spec"]:
                problems.append(f"Deployment/{dname}: sets replicas, which its HPA owns")
            continue
        partitions = number(environment(docs, container), "KAFKA_PARTITIONS")
        most = hpas[dname]["spec"]["maxReplicas"] if dname in hpas else deployment["spec"].get("replicas", 1)
        if most > partitions:
            problems.append(f"Deployment/{dname}: up to {most} replicas for {partitions:g} partitions")
    return problems


def job_problems(docs: list[Doc]) -> list[str]:
    """Jobs run `migrate`, then `catalog load` (after it, in the same pod), and
    `topics create`; every command of every container is a real CLI command."""
    problems = []
    steps: dict[tuple[str, ...], tuple[str, int]] = {}
    for where, pod in workloads(docs):
        for index, c in enumerate(containers(pod)):
            argv = list(c.get("command") or []) + list(c.get("args") or [])
            if not cli_command_exists(argv):
                problems.append(f"{where} container {c['name']}: `paymentsvc {' '.join(argv)}` is no command")
            if where.startswith("Job/"):
                steps[tuple(argv)] = (where, index)
    for wanted in (("migrate",), ("catalog", "load"), ("topics", "create")):
        if wanted not in steps:
            problems.append(f"no Job runs `paymentsvc {' '.join(wanted)}`")
    migrate, load = steps.get(("migrate",)), steps.get(("catalog", "load"))
    if migrate and load and (migrate[0] != load[0] or migrate[1] >= load[1]):
        problems.append("`catalog load` does not run after `migrate` in the same Job")
    return problems


def catalog_problems(docs: list[Doc]) -> list[str]:
    """The catalog ConfigMap is catalog/plans.yaml, mounted where CATALOG_PATH points."""
    problems = []
    catalog = CATALOG.read_text()
    holders = {cm["metadata"]["name"] for cm in of_kind(docs, "ConfigMap")
               if (cm.get("data") or {}).get("plans.yaml") == catalog}
    if not holders:
        problems.append("no ConfigMap holds catalog/plans.yaml as it is (infra/k8s/base/catalog is a copy)")
    for where, pod in workloads(docs):
        sources = {v["name"]: v["configMap"]["name"] for v in pod.get("volumes") or [] if "configMap" in v}
        for c in containers(pod):
            path = environment(docs, c).get("CATALOG_PATH")
            needs = served_name(c) in ("entitlements", "usage", "dunning", "api_grpc") or c["name"] == "catalog-load"
            if not needs:
                continue
            mounts = [m for m in c.get("volumeMounts") or []
                      if isinstance(path, str) and path == f"{m['mountPath'].rstrip('/')}/plans.yaml"]
            if not mounts or sources.get(mounts[0]["name"]) not in holders:
                problems.append(f"{where} container {c['name']}: CATALOG_PATH {path} is not the catalog ConfigMap")
    return problems


def unknown_env_problems(docs: list[Doc]) -> list[str]:
    """Every variable set is one `Settings` reads (a typo would be silently ignored)."""
    known = settings_env_names()
    problems = []
    for where, pod in workloads(docs):
        for c in containers(pod):
            problems += [f"{where} container {c['name']}: {n} is not a setting"
                         for n in environment(docs, c) if n not in known]
    return sorted(set(problems))


CHECKS = {
    "services": service_problems,
    "probes": probe_problems,
    "security": security_problems,
    "resources": resource_problems,
    "drain": drain_problems,
    "availability": availability_problems,
    "jobs": job_problems,
    "catalog": catalog_problems,
    "env": unknown_env_problems,
}


# --- the manifests as they are ---------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS)
def test_both_overlays_pass_every_check(check: str, docs: list[Doc]) -> None:
    assert CHECKS[check](docs) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_value_is_in_a_rendered_overlay(overlay: str) -> None:
    text = render(overlay)
    assert secret_problems(parse(text), text) == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_resource_is_valid_against_the_kubernetes_schemas(
    overlay: str, version: str, tmp_path: Path
) -> None:
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(render(overlay))
    result = validate(path, version)
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_overlay_sets_its_own_namespace(rendered: dict[str, list[Doc]]) -> None:
    namespaces = {o: {d["metadata"].get("namespace") for d in docs} for o, docs in rendered.items()}
    assert all(len(ns) == 1 and None not in ns for ns in namespaces.values()), namespaces
    assert len({next(iter(ns)) for ns in namespaces.values()}) == len(OVERLAYS)


def test_the_base_catalog_is_a_copy_of_catalog_plans_yaml() -> None:
    assert (K8S / "base" / "catalog" / "plans.yaml").read_text() == CATALOG.read_text(), (
        "cp catalog/plans.yaml infra/k8s/base/catalog/plans.yaml"
    )


# --- the checks catch what they are for ------------------------------------------------


def prod(rendered: dict[str, list[Doc]]) -> list[Doc]:
    return copy.deepcopy(rendered["prod"])


def served(docs: list[Doc], name: str) -> tuple[Doc, Doc]:
    return deployments_by_service(docs)[name]


def test_a_missing_readiness_probe_is_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = prod(rendered)
    del served(docs, "usage")[1]["readinessProbe"]
    assert probe_problems(docs) == ["Deployment/usage: no HTTP readinessProbe"]


def test_a_probe_on_the_wrong_port_is_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = prod(rendered)
    served(docs, "api_grpc")[1]["livenessProbe"]["httpGet"]["port"] = "grpc"
    assert probe_problems(docs) == ["Deployment/api-grpc: livenessProbe is not GET /health/live on port 8081"]


def test_a_port_setting_the_manifests_do_not_follow_is_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = prod(rendered)
    named(docs, "ConfigMap", served(docs, "entitlements")[1]["envFrom"][0]["configMapRef"]["name"])["data"][
        "ENTITLEMENTS_PORT"] = "9091"
    assert any("ENTITLEMENTS_PORT=9091" in p for p in probe_problems(docs))


def test_a_root_container_or_a_writable_root_filesystem_is_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = prod(rendered)
    container = named(docs, "Job", "migrate")["spec"]["template"]["spec"]["initContainers"][0]
    container["securityContext"]["runAsUser"] = 0
    container["securityContext"]["readOnlyRootFilesystem"] = False
    assert security_problems(docs) == [
        "Job/migrate container migrate: runAsUser is 0, not the Dockerfile's 10001",
        "Job/migrate container migrate: the root filesystem is writable",
    ]


def test_a_container_without_limits_is_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = prod(rendered)
    del served(docs, "dunning")[1]["resources"]["limits"]
    assert resource_problems(docs) == ["Deployment/dunning container dunning: no limits for ['cpu', 'memory']"]


def test_a_literal_secret_is_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = prod(rendered)
    served(docs, "ingest_webhooks")[1]["env"].append({"name": "STRIPE_SECRET_KEY", "value": "sk_live_abc"})
    text = yaml.safe_dump_all(docs)
    assert secret_problems(docs, text) == [
        "Deployment/ingest-webhooks container ingest-webhooks: STRIPE_SECRET_KEY is not from a secretKeyRef",
        "something secret-looking is written out: sk_live_abc...",
    ]


def test_a_secret_in_a_config_map_or_a_secret_object_is_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = prod(rendered)
    of_kind(docs, "ConfigMap")[0].setdefault("data", {})["DATABASE_URL"] = "postgresql://app@db/x"
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "paymentsvc-secrets"}})
    problems = secret_problems(docs, "")
    assert len(problems) == 2 and "a Secret is rendered: paymentsvc-secrets" in problems


def test_a_grace_period_shorter_than_the_drain_is_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = prod(rendered)
    served(docs, "api_grpc")[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20
    assert drain_problems(docs) == [
        "Deployment/api-grpc: terminationGracePeriodSeconds 20 < preStop 5.0 + SHUTDOWN_DELAY_S 5.0 "
        "+ SHUTDOWN_TIMEOUT_S 15.0 + 5.0"
    ]


def test_a_served_pod_without_pre_stop_is_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = prod(rendered)
    del served(docs, "ingest_webhooks")[1]["lifecycle"]
    assert drain_problems(docs) == [
        "Deployment/ingest-webhooks: behind a Service, but preStop sleep 0.0 s and SHUTDOWN_DELAY_S 5.0"
    ]


def test_more_worker_replicas_than_partitions_are_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = prod(rendered)
    served(docs, "entitlements")[0]["spec"]["replicas"] = 13
    assert availability_problems(docs) == ["Deployment/entitlements: up to 13 replicas for 12 partitions"]


def test_a_missing_autoscaler_or_disruption_budget_is_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = [d for d in prod(rendered)
            if not (d["kind"] in ("HorizontalPodAutoscaler", "PodDisruptionBudget")
                    and d["metadata"]["name"] == "api-grpc")]
    assert availability_problems(docs) == [
        "Deployment/api-grpc: no PodDisruptionBudget", "Deployment/api-grpc: no HorizontalPodAutoscaler",
    ]


def test_a_job_command_the_cli_does_not_have_is_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = prod(rendered)
    named(docs, "Job", "topics")["spec"]["template"]["spec"]["containers"][0]["args"] = ["topic", "create"]
    assert job_problems(docs) == [
        "Job/topics container topics: `paymentsvc topic create` is no command",
        "no Job runs `paymentsvc topics create`",
    ]


def test_an_unknown_service_name_is_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = prod(rendered)
    served(docs, "usage")[1]["args"] = ["serve", "usages"]
    assert service_problems(docs)[:2] == [
        "Deployment/usage serves unknown 'usages'", "no Deployment runs `serve usage`",
    ]


def test_a_stale_catalog_is_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = prod(rendered)
    for cm in of_kind(docs, "ConfigMap"):
        if "plans.yaml" in (cm.get("data") or {}):
            cm["data"]["plans.yaml"] += "\n# edited\n"
    assert "no ConfigMap holds catalog/plans.yaml as it is (infra/k8s/base/catalog is a copy)" in catalog_problems(docs)


def test_a_misspelled_setting_is_caught(rendered: dict[str, list[Doc]]) -> None:
    docs = prod(rendered)
    served(docs, "usage")[1]["env"].append({"name": "SHUTDOWN_TIMEOUT", "value": "15"})
    assert unknown_env_problems(docs) == ["Deployment/usage container usage: SHUTDOWN_TIMEOUT is not a setting"]


def test_schema_validation_rejects_a_misspelled_field(rendered: dict[str, list[Doc]], tmp_path: Path) -> None:
    docs = prod(rendered)
    probe = served(docs, "api_grpc")[1]["readinessProbe"]
    probe["periodSecond"] = probe.pop("periodSeconds")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = validate(path, KUBERNETES_VERSIONS[-1])
    assert result.returncode != 0 and "periodSecond" in result.stdout + result.stderr


# --- checkov ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Allowed:
    check: str
    overlays: tuple[str, ...]
    resources: tuple[str, ...]
    reason: str

    def covers(self, overlay: str, finding: tuple[str, str]) -> bool:
        check, resource = finding
        return (check == self.check and overlay in self.overlays
                and any(fnmatch.fnmatchcase(resource, p) for p in self.resources))


def load_allowlist() -> list[Allowed]:
    entries = yaml.safe_load(ALLOWLIST.read_text()) or []
    allowed = []
    for e in entries:
        assert set(e) == {"check", "overlays", "resources", "reason"}, e
        assert len(str(e["reason"]).split()) >= 8, f"{e['check']}: give the reason, not a word"
        allowed.append(Allowed(e["check"], tuple(e["overlays"]), tuple(e["resources"]), e["reason"]))
    return allowed


BROKEN = "broken"  # prod with the probes of one Deployment removed: checkov must object


@pytest.fixture(scope="module")
def checkov_findings(rendered: dict[str, list[Doc]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[tuple[str, str]]]:
    """(check id, resource) of every failed check, per rendered file: one checkov run."""
    folder = tmp_path_factory.mktemp("checkov")
    for overlay, docs in rendered.items():
        (folder / f"{overlay}.yaml").write_text(yaml.safe_dump_all(docs))
    broken = prod(rendered)
    container = served(broken, "usage")[1]
    container.pop("livenessProbe", None)
    container.pop("readinessProbe", None)
    (folder / f"{BROKEN}.yaml").write_text(yaml.safe_dump_all(broken))
    result = run([tool("checkov"), "--directory", str(folder), "--framework", "kubernetes",
                  "--skip-download", "--quiet", "--output", "json"])
    assert result.returncode in (0, 1), result.stderr[-2000:]
    reports = json.loads(result.stdout)
    findings: dict[str, set[tuple[str, str]]] = {name: set() for name in (*OVERLAYS, BROKEN)}
    for report in reports if isinstance(reports, list) else [reports]:
        for failed in (report.get("results") or {}).get("failed_checks") or []:
            findings[Path(failed["file_path"]).stem].add((failed["check_id"], failed["resource"]))
    return findings


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_nothing_beyond_the_allow_list(overlay: str, checkov_findings: dict[str, set[tuple[str, str]]]) -> None:
    allowed = load_allowlist()
    unexplained = sorted(f for f in checkov_findings[overlay] if not any(a.covers(overlay, f) for a in allowed))
    assert not unexplained, f"fix these, or list them with the reason in infra/k8s/checkov-allowlist.yaml: {unexplained}"


def test_every_allow_list_entry_still_matches_a_finding(checkov_findings: dict[str, set[tuple[str, str]]]) -> None:
    stale = [(a.check, o) for a in load_allowlist() for o in a.overlays
             if not any(a.covers(o, f) for f in checkov_findings[o])]
    assert not stale, f"fixed: remove these entries from infra/k8s/checkov-allowlist.yaml: {stale}"


def test_checkov_flags_a_deployment_without_probes(checkov_findings: dict[str, set[tuple[str, str]]]) -> None:
    allowed = load_allowlist()
    unexplained = {check for check, resource in checkov_findings[BROKEN]
                   if not any(a.covers("prod", (check, resource)) for a in allowed)}
    assert unexplained == {"CKV_K8S_8", "CKV_K8S_9"}  # liveness, readiness
