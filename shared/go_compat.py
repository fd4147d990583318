"""The Go payment service's configuration, read as a drop-in: its environment variables
and its `config.yaml`, translated into our settings.

Precedence, highest first (README, "Coming from the Go service"):

1. our own variables (`DATABASE_URL`, `REDIS_URL`, ...);
2. the Go service's variables (`POSTGRES_DSN`, `REDIS_ADDR`, ...), when ours is not set;
3. the Go-shaped config file named by `CONFIG_FILE` (or `paymentsvc --config`);
4. the defaults.

`load` is pure: it takes the environment and the file's path and returns the values it
supplies plus the notes to log once (a Go variable overridden by ours, a file key that
means nothing here). A note never holds a value, so no secret can reach a log line, and
neither does an error: they name the variable or the file key and its line.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from shared.errors import ConfigurationError

log = logging.getLogger("config")

# A Go variable -> (the field it sets, our variable that wins over it).
GO_VARIABLES: dict[str, tuple[str, str]] = {
    "POSTGRES_DSN": ("database_url", "DATABASE_URL"),
    "REDIS_ADDR": ("redis_url", "REDIS_URL"),
    "STRIPE_SECRET": ("stripe_secret_key", "STRIPE_SECRET_KEY"),
    "STRIPE_WEBHOOK_SECRET": ("stripe_webhook_secrets", "STRIPE_WEBHOOK_SECRETS"),
    "GRPC_ADDRESS": ("grpc_port", "GRPC_PORT"),
    "HEALTH_PORT": ("grpc_http_port", "GRPC_HTTP_PORT"),
    "EVENTS_BROKERS": ("kafka_bootstrap_servers", "KAFKA_BOOTSTRAP_SERVERS"),
}
# The Go service's other variables: accepted, and reported once as meaning nothing here.
GO_IGNORED_VARIABLES: dict[str, str] = {
    "APP_NAME": "each process is named by `paymentsvc serve NAME`",
    "POSTGRES_MAX_CONNS": "each service sizes its own Postgres pool",
    "AUTH_PUBLIC_KEY_PEM": "clients authenticate with API_KEYS (Bearer keys with scopes)",
    "STRIPE_PUBLISHABLE_KEY": "only browsers use the publishable key",
    "BILLING_PROVIDER": "the billing provider is Stripe",
    "EVENTS_PROVIDER": "the event bus is Kafka",
    "EVENTS_TOPIC": "topic names are fixed (payment-events, ...); KAFKA_TOPIC_PREFIX prefixes them",
}
# go-redis' companions of REDIS_ADDR: they only complete it (or REDIS_URL's absence).
REDIS_PARTS = ("REDIS_PASSWORD", "REDIS_DB")
DEFAULT_POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "database": "paymentsvc"}


@dataclass
class Loaded:
    """What the Go-shaped configuration supplies (field name -> raw value) and the notes
    to log once."""

    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- conversions

def host_port(text: str, what: str, example: str = "127.0.0.1:6379") -> tuple[str, int]:
    """`host:port`, `:port` or `[v6]:port`, as Go's net.Listen and go-redis read it."""
    if "://" in text:
        raise ConfigurationError(f"{what} must be host:port without a scheme (e.g. {example})")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"{what} must be host:port with a port from 1 to 65535 (e.g. {example})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:  # its message quotes the host: name the setting, not the value
            raise ConfigurationError(f"{what}: [host] must be an IPv6 address (e.g. [::1]:6379)") from None
    return host, int(port)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def redis_url(addr: str, password: str | None, db: int | str | None, what: str) -> str:
    """go-redis' Addr/Password/DB as our REDIS_URL."""
    host, port = host_port(addr, what)
    if db is None or db == "":
        db = 0
    if not str(db).isdigit():
        raise ConfigurationError(f"{what}: the redis database must be a number from 0")
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{_url_host(host or '127.0.0.1')}:{port}/{int(db)}"


def postgres_url(dsn: str, what: str) -> str:
    """A pgx DSN as a URL: URLs pass through; a keyword DSN (`host=db user=app ...`) is
    rewritten, because every place that shows the setting redacts a URL's password."""
    if "://" in dsn:
        return dsn
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except Exception as exc:  # psycopg says which keyword; the DSN itself is not repeated
        raise ConfigurationError(f"{what} is neither a URL nor a keyword DSN ({type(exc).__name__})") from None
    return postgres_url_of(parts)


def postgres_url_of(parts: Mapping[str, Any]) -> str:
    """host/port/user/password/database(dbname) and extra keywords as a postgresql:// URL."""
    rest = {k: v for k, v in parts.items() if k not in ("host", "port", "user", "password", "database", "dbname")}
    user = quote(str(parts.get("user") or DEFAULT_POSTGRES["user"]), safe="")
    password = parts.get("password")
    auth = f"{user}:{quote(str(password), safe='')}" if password else user
    host = _url_host(str(parts.get("host") or DEFAULT_POSTGRES["host"]))
    port = parts.get("port") or DEFAULT_POSTGRES["port"]
    database = quote(str(parts.get("database") or parts.get("dbname") or DEFAULT_POSTGRES["database"]), safe="")
    query = "&".join(f"{quote(str(k))}={quote(str(v), safe='')}" for k, v in rest.items())
    return f"postgresql://{auth}@{host}:{port}/{database}" + (f"?{query}" if query else "")


def listen_address(text: str, what: str) -> dict[str, Any]:
    """GRPC_ADDRESS / grpc.address: the port, and the host unless it is empty (Go's
    `:8080` listens on every interface, which is our BIND_HOST=0.0.0.0)."""
    host, port = host_port(text, what, example=":8080")
    return {"grpc_port": port, "bind_host": host or "0.0.0.0"}


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ZAP_LEVELS = {"WARN": "WARNING", "DPANIC": "CRITICAL", "PANIC": "CRITICAL", "FATAL": "CRITICAL"}


def log_level(text: str) -> str:
    """Python's level names, and zap's (the Go service's): warn is WARNING; dpanic, panic
    and fatal have no peer below CRITICAL."""
    upper = text.strip().upper()
    upper = _ZAP_LEVELS.get(upper, upper)
    if upper not in LOG_LEVELS:
        raise ConfigurationError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)} (or zap's warn, dpanic, panic, fatal)")
    return upper


# ---------------------------------------------------------------- the environment

def from_environment(env: Mapping[str, str]) -> Loaded:
    """The Go variables present in `env` (upper-case names), converted."""
    out = Loaded()
    redis_parts = {k: env[k] for k in REDIS_PARTS if env.get(k)}
    for go in GO_VARIABLES:
        value = env.get(go)
        if not value:
            continue
        supplied: dict[str, Any]
        if go == "POSTGRES_DSN":
            supplied = {"database_url": postgres_url(value, go)}
        elif go == "REDIS_ADDR":
            supplied = {"redis_url": redis_url(value, redis_parts.get("REDIS_PASSWORD"), redis_parts.get("REDIS_DB"), go)}
        elif go == "GRPC_ADDRESS":
            supplied = listen_address(value, go)
        elif go == "EVENTS_BROKERS":
            supplied = {"kafka_bootstrap_servers": ",".join(p.strip() for p in value.split(",") if p.strip())}
        elif go == "HEALTH_PORT":
            if not value.strip().isdigit():
                raise ConfigurationError("HEALTH_PORT must be a port number")
            supplied = {"grpc_http_port": int(value)}
        else:
            supplied = {GO_VARIABLES[go][0]: value}
        shadowed = [n for n in _our_names(supplied) if env.get(n)]
        if shadowed:
            if any(_differs(env[n], supplied[_FIELD_OF[n]]) for n in shadowed):
                out.notes.append(
                    f"{go} and {' and '.join(shadowed)} are both set and differ: "
                    f"{' and '.join(shadowed)} wins (our names win over the Go service's)"
                )
            supplied = {k: v for k, v in supplied.items() if _OURS_OF[k] not in shadowed}
        out.values.update(supplied)
    for go, reason in GO_IGNORED_VARIABLES.items():
        if env.get(go):
            out.notes.append(f"{go} is set and ignored: {reason}")
    if redis_parts and not env.get("REDIS_ADDR"):
        out.notes.append(f"{' and '.join(redis_parts)} without REDIS_ADDR: ignored (they complete REDIS_ADDR only)")
    return out


_OURS_OF = {
    "database_url": "DATABASE_URL", "redis_url": "REDIS_URL", "stripe_secret_key": "STRIPE_SECRET_KEY",
    "stripe_webhook_secrets": "STRIPE_WEBHOOK_SECRETS", "grpc_port": "GRPC_PORT", "bind_host": "BIND_HOST",
    "grpc_http_port": "GRPC_HTTP_PORT", "log_level": "LOG_LEVEL", "log_format": "LOG_FORMAT",
    "stripe_api_base": "STRIPE_API_BASE", "kafka_bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS",
    "kafka_topic_prefix": "KAFKA_TOPIC_PREFIX", "kafka_partitions": "KAFKA_PARTITIONS",
}
_FIELD_OF = {v: k for k, v in _OURS_OF.items()}


def _our_names(supplied: Mapping[str, Any]) -> list[str]:
    return [_OURS_OF[k] for k in supplied]


def _differs(ours: str, theirs: Any) -> bool:
    if isinstance(theirs, int):
        return ours.strip() != str(theirs)
    if isinstance(theirs, list):
        theirs = ",".join(theirs)
    split = [p.strip() for p in str(ours).split(",")]
    return split != [p.strip() for p in str(theirs).split(",")]


# ---------------------------------------------------------------- the file

@dataclass(frozen=True)
class Key:
    """How one key of the file is read: `to` takes (value, where) and returns field values;
    `ignored` (a reason) marks a key that means nothing here."""

    to: Callable[[Any, str], dict[str, Any]] | None = None
    ignored: str = ""


def _str(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigurationError(f"{where} must be a string")
    return str(value)


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        raise ConfigurationError(f"{where} must be a whole number")
    return value


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ConfigurationError(f"{where} must be a list of strings or a comma-separated string")


def _set(name: str, read: Callable[[Any, str], Any] = _str) -> Key:
    return Key(to=lambda value, where: {name: read(value, where)})


def _part(section: str, name: str, read: Callable[[Any, str], Any] = _str) -> Key:
    """One part of a value assembled from several keys (postgres.host, redis.db, ...)."""
    return Key(to=lambda value, where: {f"_{section}.{name}": read(value, where)})


def _provider(value: Any, where: str) -> dict[str, Any]:
    if _str(value, where).lower() != "stripe":
        raise ConfigurationError(f"{where}: only the stripe billing provider exists here")
    return {}


def _events_provider(value: Any, where: str) -> dict[str, Any]:
    if _str(value, where).lower() != "kafka":
        raise ConfigurationError(f"{where}: the event bus here is Kafka")
    return {}


def _log_format(value: Any, where: str) -> dict[str, Any]:
    text = _str(value, where).lower()
    mapped = {"json": "json", "console": "console", "text": "console"}.get(text)
    if mapped is None:
        raise ConfigurationError(f"{where} must be json, console or text")
    return {"log_format": mapped}


_POOL = "each service sizes its own Postgres pool"
# Top-level keys of the Go service's older config.yaml, before its `app` section.
TOP_LEVEL_IGNORED = {"app_name": "each process is named by `paymentsvc serve NAME`"}
_REDIS_POOL = "the Redis clients' pools and timeouts are set per service"
FILE_KEYS: dict[str, dict[str, Key]] = {
    "app": {
        "name": Key(ignored="each process is named by `paymentsvc serve NAME`"),
        "env": Key(ignored="no environment switch here: every setting is explicit"),
        "environment": Key(ignored="no environment switch here: every setting is explicit"),
        "version": Key(ignored="the version is the installed package's"),
        "debug": Key(ignored="use log.level: debug"),
    },
    "grpc": {
        "address": Key(to=lambda v, w: listen_address(_str(v, w), w)),
        "host": _set("bind_host"),
        "port": _set("grpc_port", _int),
        "reflection": Key(ignored="server reflection is always on"),
        "max_recv_msg_size": Key(ignored="gRPC's default message limits apply"),
        "max_send_msg_size": Key(ignored="gRPC's default message limits apply"),
        "timeout": Key(ignored="each call's deadline is the client's"),
        "shutdown_timeout": Key(ignored="SHUTDOWN_TIMEOUT_S sets the drain"),
    },
    "postgres": {
        "dsn": Key(to=lambda v, w: {"database_url": postgres_url(_str(v, w), w)}),
        "host": _part("postgres", "host"),
        "port": _part("postgres", "port", _int),
        "user": _part("postgres", "user"),
        "password": _part("postgres", "password"),
        "database": _part("postgres", "database"),
        "dbname": _part("postgres", "database"),
        "sslmode": _part("postgres", "sslmode"),
        "max_conns": Key(ignored=_POOL),
        "min_conns": Key(ignored=_POOL),
        "max_conn_lifetime": Key(ignored=_POOL),
        "max_conn_idle_time": Key(ignored=_POOL),
    },
    "redis": {
        "addr": _part("redis", "addr"),
        "password": _part("redis", "password"),
        "db": _part("redis", "db", _int),
        "pool_size": Key(ignored=_REDIS_POOL),
        "min_idle_conns": Key(ignored=_REDIS_POOL),
        "dial_timeout": Key(ignored=_REDIS_POOL),
        "read_timeout": Key(ignored=_REDIS_POOL),
        "write_timeout": Key(ignored=_REDIS_POOL),
    },
    "billing": {
        "provider": Key(to=_provider),
        "stripe_secret": _set("stripe_secret_key"),
        "webhook_secret": Key(to=lambda v, w: {"stripe_webhook_secrets": _strings(v, w)}),
        "stripe_webhook_secret": Key(to=lambda v, w: {"stripe_webhook_secrets": _strings(v, w)}),
        "api_base": _set("stripe_api_base"),
        "publishable_key": Key(ignored="only browsers use the publishable key"),
        "stripe_publishable": Key(ignored="only browsers use the publishable key"),
        "success_url": Key(ignored="CreateCheckoutSession takes success_url per request"),
        "cancel_url": Key(ignored="CreateCheckoutSession takes cancel_url per request"),
        "currency": Key(ignored="each price's currency comes from the catalog"),
    },
    "events": {
        "provider": Key(to=_events_provider),
        "brokers": Key(to=lambda v, w: {"kafka_bootstrap_servers": ",".join(_strings(v, w))}),
        "topic_prefix": _set("kafka_topic_prefix"),
        "partitions": _set("kafka_partitions", _int),
        "enabled": Key(ignored="events are how this service works: always on"),
        "topic": Key(ignored="topic names are fixed (payment-events, ...); events.topic_prefix prefixes them"),
        "publisher": Key(ignored="the publisher is Kafka"),
    },
    "auth": {
        "public_key_pem": Key(ignored="clients authenticate with API_KEYS (Bearer keys with scopes)"),
    },
    "log": {
        "level": Key(to=lambda v, w: {"log_level": log_level(_str(v, w))}),
        "format": Key(to=_log_format),
        "development": Key(ignored="use log.level and log.format"),
        "output": Key(ignored="logs go to stderr"),
    },
    "metrics": {
        "enabled": Key(ignored="metrics are always served"),
        "port": Key(ignored="metrics are served at /metrics on each service's HTTP port (health.port for the API)"),
        "path": Key(ignored="the path is /metrics"),
        "namespace": Key(ignored="the Go service's metric names are exported as they were, beside paymentsvc_*"),
    },
    "health": {
        "port": _set("grpc_http_port", _int),
        "enabled": Key(ignored="health endpoints are always served"),
        "path": Key(ignored="the paths are /health, /health/live and /health/ready"),
        "live_path": Key(ignored="the paths are /health, /health/live and /health/ready"),
        "ready_path": Key(ignored="the paths are /health, /health/live and /health/ready"),
    },
}


def _mapping(node: yaml.Node, where: str) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return []
    if not isinstance(node, yaml.MappingNode):
        raise ConfigurationError(f"{where} must be a mapping")
    seen: dict[str, int] = {}
    pairs = []
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            raise ConfigurationError(f"{where}: a key at line {key.start_mark.line + 1} is not a name")
        if key.value in seen:
            raise ConfigurationError(
                f"{where}: {key.value} is given twice (lines {seen[key.value]} and {key.start_mark.line + 1})"
            )
        seen[key.value] = key.start_mark.line + 1
        pairs.append((key, value))
    return pairs


def from_file(path: Path) -> Loaded:
    """Read a Go-shaped config.yaml. Unknown sections and keys are refused with their line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(f"config file {path} does not exist (CONFIG_FILE or --config)") from None
    except OSError as exc:
        raise ConfigurationError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigurationError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    out = Loaded()
    if root is None:
        return out
    constructor = yaml.SafeLoader("")
    lines: dict[str, int] = {}
    given: dict[str, int] = {}
    for section_key, section_node in _mapping(root, str(path)):
        section = str(section_key.value)
        if section in TOP_LEVEL_IGNORED:
            out.notes.append(f"{path}:{section_key.start_mark.line + 1}: {section} ignored: {TOP_LEVEL_IGNORED[section]}")
            continue
        keys = FILE_KEYS.get(section)
        if keys is None:
            raise ConfigurationError(
                f"{path}:{section_key.start_mark.line + 1}: unknown section {section!r}; "
                f"known: {', '.join(FILE_KEYS)}"
            )
        for key_node, value_node in _mapping(section_node, f"{path}: section {section}"):
            name, line = str(key_node.value), key_node.start_mark.line + 1
            given[f"{section}.{name}"] = line
            spec = keys.get(name)
            where = f"{path}:{line}: {section}.{name}"
            if spec is None:
                raise ConfigurationError(
                    f"{path}:{line}: unknown key {section}.{name}; known in {section}: {', '.join(keys)}"
                )
            if spec.to is None:
                out.notes.append(f"{path}:{line}: {section}.{name} ignored: {spec.ignored}")
                continue
            try:
                value = constructor.construct_object(value_node, deep=True)
            except (yaml.YAMLError, ValueError):
                # The constructor's message quotes the source line, which may hold a secret.
                raise ConfigurationError(f"{where}: unsupported value or tag") from None
            if value is None or value == "":
                continue
            supplied = spec.to(value, where)
            for k in supplied:
                lines[k] = line
            out.values.update(supplied)
    both = [k for k in ("grpc.host", "grpc.port") if k in given]
    if "grpc.address" in given and both:
        raise ConfigurationError(
            f"{path}:{given['grpc.address']}: grpc.address and {both[0]} (line {given[both[0]]}) "
            "are both given: use the address or host and port"
        )
    _assemble(out, lines, path)
    return out


def _assemble(out: Loaded, lines: dict[str, int], path: Path) -> None:
    """Turn the collected parts (postgres.host, redis.addr, ...) into URLs, refusing a
    value given two ways."""
    parts = {k: out.values.pop(k) for k in [k for k in out.values if k.startswith("_")]}
    pg = {k.split(".", 1)[1]: v for k, v in parts.items() if k.startswith("_postgres.")}
    if pg:
        if "database_url" in out.values:
            raise ConfigurationError(
                f"{path}:{lines['database_url']}: postgres.dsn and postgres.{next(iter(pg))} "
                f"(line {lines['_postgres.' + next(iter(pg))]}) are both given: use the dsn or its parts"
            )
        out.values["database_url"] = postgres_url_of(pg)
    rd = {k.split(".", 1)[1]: v for k, v in parts.items() if k.startswith("_redis.")}
    if rd:
        if "addr" not in rd:
            raise ConfigurationError(f"{path}: redis.password or redis.db without redis.addr")
        out.values["redis_url"] = redis_url(rd["addr"], rd.get("password"), rd.get("db"), f"{path}:{lines['_redis.addr']}: redis.addr")


# ---------------------------------------------------------------- together

def load(env: Mapping[str, str], config_file: Path | str | None) -> Loaded:
    """The Go variables over the Go file: the values to put under our own variables."""
    upper = {k.upper(): v for k, v in env.items()}
    loaded = Loaded()
    if config_file:
        loaded = from_file(Path(config_file))
    from_env = from_environment(upper)
    loaded.values.update(from_env.values)
    loaded.notes.extend(from_env.notes)
    return loaded


_reported = False


def report_notes(env: Mapping[str, str], config_file: Path | str | None) -> list[str]:
    """Log the notes once per process (WARNING: someone should read them). Returns them."""
    global _reported
    notes = load(env, config_file).notes
    if not _reported:
        _reported = True
        for note in notes:
            log.warning(note)
    return notes
