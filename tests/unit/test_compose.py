"""The Docker stack (infra/compose.yaml and the Dockerfile) agrees with the code.

Nothing here needs Docker: the files are parsed and checked against `shared.config`.
Each check is a function that returns its problems, so the tests can show that a
broken file (a misspelled variable, a wrong port, an unknown service) is caught.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices

from shared.config import SERVICE_NAMES, SERVICE_PORTS, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PATH = ROOT / "infra" / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

# Ports a service listens on besides the HTTP port named in SERVICE_PORTS.
EXTRA_PORT_FIELDS: dict[str, tuple[str, ...]] = {"api_grpc": ("grpc_port",)}
INFRA = ("kafka", "postgres", "redis")
SERVE = re.compile(r"\bpaymentsvc\s+serve\s+([A-Za-z0-9_.-]+)")
DEFAULT = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}")


# --- reading the files -------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    with COMPOSE_PATH.open() as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture
def compose() -> dict[str, Any]:
    return load_compose()


def settings_env_names() -> frozenset[str]:
    """The environment variables `Settings` reads: the field name upper-cased, or its alias."""
    prefix = str(Settings.model_config.get("env_prefix") or "")
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias or field.alias
        if alias is None:
            names.add(f"{prefix}{name}".upper())
        elif isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names.update(c.upper() for c in alias.choices if isinstance(c, str))
    return frozenset(names)


def dockerfile_entrypoint() -> list[str]:
    entrypoints = re.findall(r"^\s*ENTRYPOINT\s+(.+?)\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    assert entrypoints, "the Dockerfile has no ENTRYPOINT"
    last = entrypoints[-1]
    return json.loads(last) if last.startswith("[") else ["/bin/sh", "-c", last]


def resolve(value: Any) -> str:
    """A compose value with `${VAR:-default}` replaced by its default (as with VAR unset)."""
    return DEFAULT.sub(lambda m: m.group(1) or "", str(value))


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, dict):
        return {k: None if v is None else str(v) for k, v in env.items()}
    pairs = (item.partition("=") for item in env)
    return {k: (v if sep else None) for k, sep, v in pairs}


def as_argv(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def is_ours(service: dict[str, Any]) -> bool:
    """Built from the repository's Dockerfile (the build context is the repository root)."""
    build = service.get("build")
    if build is None:
        return False
    if isinstance(build, str):
        build = {"context": build}
    context = (COMPOSE_PATH.parent / build.get("context", ".")).resolve()
    return context == ROOT and build.get("dockerfile", "Dockerfile") == "Dockerfile"


def ours(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if is_ours(svc)}


def served_names(service: dict[str, Any]) -> list[str]:
    """The X in every `paymentsvc serve X` that the container runs."""
    if "entrypoint" in service:
        entrypoint = as_argv(service["entrypoint"])
    elif is_ours(service):
        entrypoint = dockerfile_entrypoint()
    else:
        entrypoint = []
    words = entrypoint + as_argv(service.get("command"))
    return SERVE.findall(" ".join(words))


def published_ports(service: dict[str, Any]) -> list[tuple[int | None, int]]:
    """(host port, container port) for each published port."""
    ports = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published = entry.get("published")
            host = int(resolve(published)) if published not in (None, "") else None
            ports.append((host, int(resolve(entry["target"]))))
            continue
        spec = resolve(entry).split("/")[0]
        parts = spec.rsplit(":", 2)
        host_part = parts[-2] if len(parts) >= 2 else ""
        ports.append((int(host_part) if host_part else None, int(parts[-1])))
    return ports


def port_setting(service: dict[str, Any], field: str) -> int:
    """The port a Settings field gives the container: its environment, else the default."""
    value = environment(service).get(field.upper())
    if value is None:
        return int(Settings.model_fields[field].default)
    return int(resolve(value))


def dependencies(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


# --- the checks ----------------------------------------------------------------------------


def services_without_image_or_build(compose: dict[str, Any]) -> list[str]:
    return [n for n, s in compose["services"].items() if not (s.get("image") or s.get("build"))]


def unknown_served_names(compose: dict[str, Any]) -> list[str]:
    return [
        f"{name}: serve {served}"
        for name, svc in compose["services"].items()
        for served in served_names(svc)
        if served not in SERVICE_NAMES
    ]


def unserved_service_names(compose: dict[str, Any]) -> list[str]:
    served = {x for svc in compose["services"].values() for x in served_names(svc)}
    return [name for name in SERVICE_NAMES if name not in served]


def unknown_env_vars(compose: dict[str, Any]) -> list[str]:
    known = settings_env_names()
    return [
        f"{name}: {var}"
        for name, svc in ours(compose).items()
        for var in environment(svc)
        if var not in known
    ]


def missing_dependencies(compose: dict[str, Any]) -> list[str]:
    services = compose["services"]
    return [
        f"{name} -> {dep}"
        for name, svc in services.items()
        for dep in dependencies(svc)
        if dep not in services
    ]


def port_mismatches(compose: dict[str, Any]) -> list[str]:
    problems = []
    for name, svc in compose["services"].items():
        published = published_ports(svc)
        for served in served_names(svc):
            fields = (SERVICE_PORTS.get(served), *EXTRA_PORT_FIELDS.get(served, ()))
            for field in filter(None, fields):
                port = port_setting(svc, field)
                if (port, port) not in published:
                    problems.append(f"{name}: {field}={port} but publishes {published}")
    return problems


def health_checks_off_port(compose: dict[str, Any]) -> list[str]:
    problems = []
    for name, svc in compose["services"].items():
        for served in served_names(svc):
            port = port_setting(svc, SERVICE_PORTS[served]) if served in SERVICE_PORTS else None
            probe = " ".join(as_argv((svc.get("healthcheck") or {}).get("test")))
            if port is None or f":{port}/health/ready" not in probe:
                problems.append(f"{name}: healthcheck {probe!r} does not probe :{port}")
    return problems


# --- the tests -----------------------------------------------------------------------------


def test_the_compose_file_has_services_built_from_our_dockerfile(compose):
    assert set(INFRA) <= set(compose["services"])
    assert ours(compose), "no service is built from the repository's Dockerfile"


def test_every_service_has_an_image_or_a_build(compose):
    assert services_without_image_or_build(compose) == []


def test_every_served_name_is_a_known_service(compose):
    assert unknown_served_names(compose) == []


def test_every_known_service_is_served_by_a_compose_service(compose):
    assert unserved_service_names(compose) == []


def test_our_services_set_only_real_settings_env_vars(compose):
    assert unknown_env_vars(compose) == []


def test_our_services_listen_on_all_interfaces_in_their_containers(compose):
    for name, svc in ours(compose).items():
        assert environment(svc).get("BIND_HOST") == "0.0.0.0", name


def test_every_depends_on_target_exists(compose):
    assert missing_dependencies(compose) == []


def test_every_service_port_set_by_settings_is_published_as_is(compose):
    assert port_mismatches(compose) == []


def test_every_service_healthcheck_probes_its_own_ready_endpoint(compose):
    assert health_checks_off_port(compose) == []


def test_every_served_service_waits_for_init_and_healthy_infrastructure(compose):
    for name, svc in compose["services"].items():
        if not served_names(svc):
            continue
        deps = dependencies(svc)
        assert deps.get("init") == "service_completed_successfully", name
        for infra in INFRA:
            assert deps.get(infra) == "service_healthy", f"{name} -> {infra}"


def test_init_migrates_loads_the_catalog_and_creates_topics_in_order(compose):
    init = compose["services"]["init"]
    words = as_argv(init.get("entrypoint")) + as_argv(init.get("command"))
    script = " ".join(words)
    steps = ["paymentsvc migrate", "paymentsvc catalog load", "paymentsvc topics create"]
    positions = [script.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), script
    assert dependencies(init) == {infra: "service_healthy" for infra in INFRA}


def test_secrets_are_not_written_into_the_compose_file(compose):
    for name, svc in ours(compose).items():
        env = environment(svc)
        for var in ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRETS", "API_KEYS"):
            value = env.get(var)
            assert value is None or resolve(value) == "", f"{name}: {var}={value!r}"


def test_the_dockerfile_entrypoint_is_paymentsvc():
    assert dockerfile_entrypoint() == ["paymentsvc"]


def test_the_dockerfile_runs_as_a_non_root_user():
    users = re.findall(r"^\s*USER\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert users and users[-1] not in ("root", "0", "0:0")


def test_the_paymentsvc_console_script_is_declared_in_pyproject():
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert re.fullmatch(r"[\w.]+:\w+", scripts.get("paymentsvc", ""))


def test_the_dockerignore_keeps_what_the_image_needs_and_drops_the_venv():
    patterns = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "!"))
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) for p in patterns)

    needed = ["pyproject.toml", "README.md", "shared", "services", "gen", "migrations", "catalog"]
    assert [p for p in needed if ignored(p)] == []
    assert ignored(".venv") and ignored(".git") and ignored("tests")


# --- the checks can fail -------------------------------------------------------------------


def _first_served(compose: dict[str, Any]) -> dict[str, Any]:
    return next(svc for svc in compose["services"].values() if served_names(svc))


def test_a_misspelled_env_var_is_caught(compose):
    broken = copy.deepcopy(compose)
    svc = _first_served(broken)
    svc["environment"] = {**environment(svc), "DATABSE_URL": "postgresql://x"}
    assert any("DATABSE_URL" in p for p in unknown_env_vars(broken))


def test_a_third_party_images_own_variables_are_not_checked(compose):
    assert not is_ours(compose["services"]["kafka"])
    assert "KAFKA_NODE_ID" in environment(compose["services"]["kafka"])


def test_an_unknown_served_name_is_caught(compose):
    broken = copy.deepcopy(compose)
    _first_served(broken)["command"] = ["serve", "no_such_service"]
    assert unknown_served_names(broken)
    assert unserved_service_names(broken)


def test_a_wrong_published_port_is_caught(compose):
    broken = copy.deepcopy(compose)
    svc = _first_served(broken)
    svc["ports"] = ["127.0.0.1:9999:9999"]
    assert port_mismatches(broken)


def test_a_port_setting_that_disagrees_with_the_healthcheck_is_caught(compose):
    broken = copy.deepcopy(compose)
    svc = _first_served(broken)
    field = SERVICE_PORTS[served_names(svc)[0]]
    svc["environment"] = {**environment(svc), field.upper(): "9999"}
    assert health_checks_off_port(broken)
    assert port_mismatches(broken)


def test_a_dependency_on_a_missing_service_is_caught(compose):
    broken = copy.deepcopy(compose)
    _first_served(broken)["depends_on"] = {"zookeeper": {"condition": "service_started"}}
    assert missing_dependencies(broken)


def test_a_service_with_neither_image_nor_build_is_caught(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["orphan"] = {"command": ["true"]}
    assert services_without_image_or_build(broken) == ["orphan"]
