"""The one configuration model, read from the environment.

Every service and command takes a `Settings`. Defaults work on a development
machine (local Postgres and Redis, a Tansu broker started on demand). Secrets
are `SecretStr`: they never appear in reprs, logs or `/status`. The Go service's
variable names and its config.yaml (`CONFIG_FILE`) are read too, below our own
variables (shared/go_compat.py).
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from shared import go_compat

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Package data (the checkout links shared/default_catalog to catalog/, shared/migrations
# to migrations/; a wheel holds the files), so an installed service finds them anywhere.
PACKAGE_DATA = Path(str(importlib.resources.files("shared")))
DEFAULT_CATALOG_PATH = PACKAGE_DATA / "default_catalog" / "plans.yaml"

SCOPES = frozenset({"read", "write", "admin"})


@dataclass(frozen=True)
class ApiKey:
    """An API key and what it may do. `name` is a non-secret label for logs."""

    name: str
    secret: SecretStr
    scopes: frozenset[str]
    rate_limit: tuple[float, float] | None = None  # (per second, burst); None: API_RATE_LIMIT


def parse_rate_limit(text: str, what: str) -> tuple[float, float]:
    """`rate/burst` (e.g. `1000/2000`), both positive."""
    rate, sep, burst = text.partition("/")
    try:
        parsed = (float(rate), float(burst))
    except ValueError:
        parsed = (0.0, 0.0)
    if not sep or parsed[0] <= 0 or parsed[1] < 1:
        raise ValueError(f"{what} must look like rate/burst with rate > 0 and burst >= 1, e.g. 1000/2000; got {text!r}")
    return parsed


@dataclass(frozen=True)
class Topics:
    """Topic names. A prefix lets tests (or tenants) share one broker."""

    prefix: str = ""

    @property
    def payment_events(self) -> str:
        return f"{self.prefix}payment-events"

    @property
    def usage_events(self) -> str:
        return f"{self.prefix}usage-events"

    @property
    def usage_thresholds(self) -> str:
        """usage.threshold_crossed events (payment.v1.UsageThresholdCrossed), keyed by subject."""
        return f"{self.prefix}usage-thresholds"

    @property
    def dunning_events(self) -> str:
        return f"{self.prefix}dunning-events"

    @property
    def stripe_raw_events(self) -> str:
        return f"{self.prefix}stripe-raw-events"

    @staticmethod
    def dlq(topic: str) -> str:
        return f"{topic}.dlq"

    def all(self) -> list[str]:
        base = [self.payment_events, self.usage_events, self.dunning_events, self.stripe_raw_events]
        # usage-thresholds is only published here (nothing of ours consumes it): no DLQ.
        return base + [self.usage_thresholds] + [self.dlq(t) for t in base]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def parse_api_keys(entries: list[str]) -> tuple[ApiKey, ...]:
    """Parse `key=scope+scope[:rate/burst]` entries. The label in logs is `key-<n>`, never the key."""
    keys = []
    for n, entry in enumerate(entries, start=1):
        secret, sep, rest = entry.partition("=")
        scope_text, _, limit_text = rest.partition(":")
        limit = parse_rate_limit(limit_text, f"API_KEYS entry {n}'s rate limit") if limit_text else None
        if not sep or not secret:
            raise ValueError(f"API_KEYS entry {n} must look like key=read+write")
        scopes = frozenset(s.strip() for s in scope_text.split("+") if s.strip())
        unknown = scopes - SCOPES
        if not scopes or unknown:
            raise ValueError(
                f"API_KEYS entry {n} has unknown or no scopes {sorted(unknown)}; "
                f"allowed: {sorted(SCOPES)}"
            )
        keys.append(ApiKey(name=f"key-{n}", secret=SecretStr(secret), scopes=scopes, rate_limit=limit))
    return tuple(keys)


class Settings(BaseSettings):
    # hide_input_in_errors: a rejected value (a short signing key, an API key) never appears in an error.
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True, hide_input_in_errors=True)

    # Storage and bus.
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/paymentsvc")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    kafka_bootstrap_servers: str = Field(
        default="", description="empty: start (or reuse) the embedded Tansu dev broker"
    )
    kafka_partitions: int = Field(default=3, ge=1, le=256)
    kafka_topic_prefix: str = ""

    # Stripe.
    stripe_secret_key: SecretStr | None = None
    stripe_api_base: str = ""
    stripe_webhook_secrets: Annotated[list[SecretStr], NoDecode] = []
    stripe_webhook_tolerance_s: int = Field(default=300, ge=1)
    webhook_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    publish_timeout_s: float = Field(default=10.0, gt=0)
    dunning_interval_s: float = Field(default=30.0, gt=0, description="how often the dunning scheduler looks for due cases")
    startup_timeout_s: float = Field(default=30.0, gt=0, description="wait this long for dependencies")
    shutdown_delay_s: float = Field(
        default=0.0, ge=0,
        description="after SIGTERM, keep serving this long while not ready, so load balancers stop sending first (Kubernetes: 5)",
    )
    shutdown_timeout_s: float = Field(
        default=15.0, gt=0,
        description="after SIGTERM: not ready at once, then this long to finish work in flight before exiting",
    )
    inbox_retention_days: float = Field(
        default=35.0, gt=3.0,
        description="how long a worker remembers an applied event id (longer than Stripe's 3-day retries and the topics' retention)",
    )
    inbox_prune_interval_s: float = Field(default=300.0, gt=0, description="how often a worker prunes its inbox")
    worker_lanes: int = Field(
        default=3, ge=1,
        description="partition groups a worker applies concurrently, one batch each, for a projection that opts in "
        "(entitlements); at most one per partition it owns; 1: one batch at a time",
    )

    # API.
    # `key=scope+scope,...`; kept as secrets so that no key shows in a repr or log.
    api_keys_raw: Annotated[list[SecretStr], NoDecode] = Field(default=[], alias="API_KEYS")
    api_rate_limit: str = Field(default="1000/2000", description="default per-key limit, calls/s and burst")
    api_publish_linger_ms: float = Field(
        default=0.0, ge=0, le=100,
        description="the API's producer waits up to this long to batch usage events: under load fewer, fuller "
        "produce requests (less CPU here and on the broker), at the price of this much more latency per "
        "IncrementUsage; 0: send at once (docs/performance.md, issue 13)",
    )
    # Page and consistency tokens are HMAC-signed with these; several while rotating.
    token_signing_keys: Annotated[list[SecretStr], NoDecode] = []

    # Ports.
    grpc_port: int = 8080
    grpc_http_port: int = 8081
    ingest_port: int = 8090
    entitlements_port: int = 8091
    usage_port: int = 8092
    dunning_port: int = 8093
    bind_host: str = "127.0.0.1"
    reuse_port: bool = Field(
        default=False,
        description="share the serving ports with other processes (SO_REUSEPORT); `serve --processes N` sets it in its children",
    )

    # Operations.
    log_level: str = "INFO"
    log_format: str = Field(default="console", pattern="^(console|json)$")
    catalog_path: Path = DEFAULT_CATALOG_PATH
    service_version: str = "0.1.0"
    db_statement_timeout_ms: int = Field(
        default=30_000, ge=0, description="statement_timeout of every pooled Postgres connection; 0: none"
    )
    progress_output: str = Field(
        default="auto", pattern="^(auto|always|never)$",
        description="progress bars of operator commands: auto (on a terminal), always, never",
    )
    # The Go service's config.yaml (shared/go_compat.py): below every variable, above the defaults.
    config_file: Path | None = Field(default=None, description="a config.yaml in the Go service's shape")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Our variables first, then the Go service's names and its file (one source).
        go = GoCompatSource(settings_cls, init_settings, env_settings)
        return init_settings, env_settings, go, dotenv_settings, file_secret_settings

    @field_validator("stripe_webhook_secrets", "api_keys_raw", "token_signing_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("api_keys_raw")
    @classmethod
    def _valid_api_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        parse_api_keys([v.get_secret_value() for v in value])
        return value

    @field_validator("api_rate_limit")
    @classmethod
    def _valid_rate_limit(cls, value: str) -> str:
        parse_rate_limit(value, "API_RATE_LIMIT")
        return value

    @field_validator("token_signing_keys")
    @classmethod
    def _long_enough(cls, value: list[SecretStr]) -> list[SecretStr]:
        for n, key in enumerate(value, start=1):
            if len(key.get_secret_value()) < 32:
                raise ValueError(f"TOKEN_SIGNING_KEYS entry {n} is shorter than 32 characters")
        return value

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        # zap's dpanic/panic/fatal (the Go service's LOG_LEVEL) are CRITICAL here.
        return go_compat.log_level(value)

    @cached_property
    def api_keys(self) -> tuple[ApiKey, ...]:
        return parse_api_keys([v.get_secret_value() for v in self.api_keys_raw])

    @property
    def topics(self) -> Topics:
        return Topics(self.kafka_topic_prefix)

    def public_view(self) -> dict[str, Any]:
        """The configuration as `/status` shows it: secrets replaced by whether they are set."""
        view: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if name == "api_keys_raw":
                view["api_keys"] = [
                    {"name": k.name, "scopes": sorted(k.scopes)} for k in self.api_keys
                ]
            elif name in ("database_url", "redis_url"):
                view[name] = redact_url(value.get_secret_value())
            elif isinstance(value, SecretStr):
                view[name] = "set"
            elif isinstance(value, list) and value and isinstance(value[0], SecretStr):
                view[name] = f"{len(value)} set"
            elif value is None:
                view[name] = None
            else:
                view[name] = str(value) if isinstance(value, Path) else value
        return view


class GoCompatSource(PydanticBaseSettingsSource):
    """The Go service's variables and config file (shared/go_compat.py), as one source
    ranked below our own variables: a value of ours, when set, wins."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
    ) -> None:
        super().__init__(settings_cls)
        self._init_kwargs: dict[str, Any] = getattr(init_settings, "init_kwargs", {})
        self._env: Mapping[str, str | None] = getattr(env_settings, "env_vars", os.environ)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ answers for every field at once

    def __call__(self) -> dict[str, Any]:
        env = {k: v for k, v in self._env.items() if v is not None}
        path = self._init_kwargs.get("config_file") or {k.upper(): v for k, v in env.items()}.get("CONFIG_FILE")
        return go_compat.load(env, path).values


def redact_url(url: str) -> str:
    """Drop the password from a URL such as postgresql://user:pw@host/db."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"


# Every service that `paymentsvc serve NAME` knows, with the setting that holds
# its HTTP port (health and metrics; the ingester also takes webhooks there).
SERVICE_PORTS: dict[str, str] = {
    "ingest_webhooks": "ingest_port",
    "entitlements": "entitlements_port",
    "usage": "usage_port",
    "dunning": "dunning_port",
    "api_grpc": "grpc_http_port",
}
SERVICE_NAMES = tuple(SERVICE_PORTS)
