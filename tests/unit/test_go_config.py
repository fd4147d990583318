"""The Go service's configuration as a drop-in (issue 17, item 2): its variable names as
aliases of ours, its config.yaml, and the precedence our variables > its variables >
the file > the defaults. Real Settings, real files in tmp_path; no I/O beyond that."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared import go_compat
from shared.config import Settings
from shared.errors import ConfigurationError

OURS = (
    "DATABASE_URL", "REDIS_URL", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRETS", "GRPC_PORT", "BIND_HOST",
    "GRPC_HTTP_PORT", "LOG_LEVEL", "LOG_FORMAT", "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPIC_PREFIX",
    "KAFKA_PARTITIONS", "STRIPE_API_BASE", "CONFIG_FILE",
)
GO = ("POSTGRES_DSN", "REDIS_ADDR", "REDIS_PASSWORD", "REDIS_DB", "STRIPE_SECRET", "STRIPE_WEBHOOK_SECRET",
      "GRPC_ADDRESS", "HEALTH_PORT", "EVENTS_BROKERS", "APP_NAME", "POSTGRES_MAX_CONNS", "AUTH_PUBLIC_KEY_PEM",
      "STRIPE_PUBLISHABLE_KEY", "BILLING_PROVIDER", "EVENTS_PROVIDER", "EVENTS_TOPIC")

# The Go service's own documented config.yaml (its architecture guide), older than its
# `app` section: the file a team has today must load as it is.
SEED_FILE = """\
app_name: "payment-service"

grpc:
  address: ":8081"

postgres:
  dsn: "postgres://user:pass@host:5432/db?sslmode=require"
  max_conns: 10

redis:
  addr: "localhost:6379"
  db: 0
  password: ""

auth:
  public_key_pem: ""

billing:
  provider: "stripe"
  stripe_secret: "sk_test_..."
  stripe_publishable: "pk_test_..."

events:
  provider: "kafka"
  brokers: ["localhost:9092"]
  topic: "payments"

log:
  level: "info"
"""

GO_FILE = """\
app:
  name: payment-service
  env: production
grpc:
  address: "0.0.0.0:9090"
postgres:
  host: db.internal
  port: 5433
  user: payments
  password: "pg-verysecret"
  database: payments
  sslmode: require
  max_conns: 20
redis:
  addr: cache.internal:6380
  password: "redis-verysecret"
  db: 2
billing:
  provider: stripe
  stripe_secret: "sk_live_verysecret"
  webhook_secret: "whsec_verysecret"
events:
  brokers: [kafka-1:9092, kafka-2:9092]
log:
  level: debug
  format: json
metrics:
  enabled: true
  port: 9100
health:
  port: 9091
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OURS + GO:
        monkeypatch.delenv(name, raising=False)


def settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def notes(**env: str) -> list[str]:
    return go_compat.load(env, env.get("CONFIG_FILE")).notes


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the variables

def test_the_go_variable_names_set_our_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(
        monkeypatch,
        POSTGRES_DSN="postgres://app:pw@db:5432/payments?sslmode=disable",
        REDIS_ADDR="cache:6380",
        STRIPE_SECRET="sk_test_go",
        STRIPE_WEBHOOK_SECRET="whsec_go",
        GRPC_ADDRESS="10.0.0.5:9090",
        HEALTH_PORT="9091",
        LOG_LEVEL="warn",
    )
    assert s.database_url.get_secret_value() == "postgres://app:pw@db:5432/payments?sslmode=disable"
    assert s.redis_url.get_secret_value() == "redis://cache:6380/0"
    assert s.stripe_secret_key is not None and s.stripe_secret_key.get_secret_value() == "sk_test_go"
    assert [x.get_secret_value() for x in s.stripe_webhook_secrets] == ["whsec_go"]
    assert (s.bind_host, s.grpc_port, s.grpc_http_port) == ("10.0.0.5", 9090, 9091)
    assert s.log_level == "WARNING"


def test_redis_addr_takes_its_password_and_database_into_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(monkeypatch, REDIS_ADDR="[::1]:6379", REDIS_PASSWORD="p@ss/word", REDIS_DB="3")
    assert s.redis_url.get_secret_value() == "redis://:p%40ss%2Fword@[::1]:6379/3"
    assert "p@ss" not in str(s.public_view())


@pytest.mark.parametrize("addr", ["redis://cache:6379", "cache", "cache:port", "cache:70000"])
def test_a_redis_addr_that_is_not_host_and_port_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, addr: str) -> None:
    with pytest.raises(ConfigurationError, match="REDIS_ADDR must be host:port"):
        settings(monkeypatch, REDIS_ADDR=addr)


def test_a_grpc_address_without_host_listens_everywhere_like_go(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(monkeypatch, GRPC_ADDRESS=":8080")
    assert (s.bind_host, s.grpc_port) == ("0.0.0.0", 8080)


def test_a_keyword_dsn_becomes_a_url_so_its_password_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(monkeypatch, POSTGRES_DSN="host=db port=5433 user=app password=dsn-verysecret dbname=pay sslmode=require")
    assert s.database_url.get_secret_value() == "postgresql://app:dsn-verysecret@db:5433/pay?sslmode=require"
    assert s.public_view()["database_url"] == "postgresql://app:***@db:5433/pay?sslmode=require"


@pytest.mark.parametrize("level", ["fatal", "panic", "dpanic"])
def test_zaps_levels_above_error_are_critical(monkeypatch: pytest.MonkeyPatch, level: str) -> None:
    assert settings(monkeypatch, LOG_LEVEL=level).log_level == "CRITICAL"


def test_an_unknown_log_level_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="LOG_LEVEL must be one of"):
        settings(monkeypatch, LOG_LEVEL="verbose")


def test_our_name_wins_over_the_go_name_and_the_difference_is_noted_without_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {
        "DATABASE_URL": "postgresql://ours:ours-verysecret@db/ours",
        "POSTGRES_DSN": "postgres://go:go-verysecret@db/go",
        "STRIPE_SECRET_KEY": "sk_ours_verysecret",
        "STRIPE_SECRET": "sk_go_verysecret",
        "GRPC_PORT": "8080",
        "GRPC_ADDRESS": ":9090",
    }
    s = settings(monkeypatch, **env)
    assert s.database_url.get_secret_value() == env["DATABASE_URL"]
    assert s.stripe_secret_key is not None and s.stripe_secret_key.get_secret_value() == env["STRIPE_SECRET_KEY"]
    assert s.grpc_port == 8080 and s.bind_host == "0.0.0.0"  # the address's host still applies
    found = notes(**env)
    assert any(n.startswith("POSTGRES_DSN and DATABASE_URL are both set and differ: DATABASE_URL wins") for n in found)
    assert any(n.startswith("STRIPE_SECRET and STRIPE_SECRET_KEY") for n in found)
    assert any(n.startswith("GRPC_ADDRESS and GRPC_PORT") for n in found)
    assert "verysecret" not in " ".join(found)


def test_the_same_value_under_both_names_is_not_noted() -> None:
    assert notes(REDIS_URL="redis://cache:6379/0", REDIS_ADDR="cache:6379", HEALTH_PORT="8081", GRPC_HTTP_PORT="8081") == []


def test_the_notes_are_logged_once_per_process(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(go_compat, "_reported", False)
    env = {"STRIPE_SECRET_KEY": "sk_a", "STRIPE_SECRET": "sk_b"}
    with caplog.at_level(logging.WARNING, logger="config"):
        go_compat.report_notes(env, None)
        go_compat.report_notes(env, None)
    assert [r.getMessage() for r in caplog.records if r.name == "config"] == [
        "STRIPE_SECRET and STRIPE_SECRET_KEY are both set and differ: STRIPE_SECRET_KEY wins (our names win over the Go service's)"
    ]


# ---------------------------------------------------------------- the file

def test_a_go_config_file_sets_every_setting_it_maps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = settings(monkeypatch, CONFIG_FILE=str(write(tmp_path, GO_FILE)))
    assert s.database_url.get_secret_value() == (
        "postgresql://payments:pg-verysecret@db.internal:5433/payments?sslmode=require"
    )
    assert s.redis_url.get_secret_value() == "redis://:redis-verysecret@cache.internal:6380/2"
    assert s.stripe_secret_key is not None and s.stripe_secret_key.get_secret_value() == "sk_live_verysecret"
    assert [x.get_secret_value() for x in s.stripe_webhook_secrets] == ["whsec_verysecret"]
    assert (s.bind_host, s.grpc_port, s.grpc_http_port) == ("0.0.0.0", 9090, 9091)
    assert s.kafka_bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert (s.log_level, s.log_format) == ("DEBUG", "json")
    assert "verysecret" not in str(s.public_view()) and "verysecret" not in repr(s)


def test_the_environment_wins_over_the_file_and_the_file_over_the_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(tmp_path, "grpc:\n  port: 9090\nhealth:\n  port: 9091\nlog:\n  level: error\n")
    s = settings(monkeypatch, CONFIG_FILE=str(path), GRPC_PORT="7070", HEALTH_PORT="7071")
    assert s.grpc_port == 7070          # ours beats the file
    assert s.grpc_http_port == 7071     # the Go variable beats the file too
    assert s.log_level == "ERROR"       # the file beats the default
    assert s.ingest_port == 8090        # untouched: the default


def test_the_go_services_own_documented_config_file_loads_as_it_is(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(tmp_path, SEED_FILE)
    s = settings(monkeypatch, CONFIG_FILE=str(path))
    assert s.database_url.get_secret_value() == "postgres://user:pass@host:5432/db?sslmode=require"
    assert s.redis_url.get_secret_value() == "redis://localhost:6379/0"
    assert (s.bind_host, s.grpc_port) == ("0.0.0.0", 8081)
    assert s.kafka_bootstrap_servers == "localhost:9092" and s.log_level == "INFO"
    assert [n.split(": ", 1)[1] for n in notes(CONFIG_FILE=str(path))] == [
        "app_name ignored: each process is named by `paymentsvc serve NAME`",
        "postgres.max_conns ignored: each service sizes its own Postgres pool",
        "auth.public_key_pem ignored: clients authenticate with API_KEYS (Bearer keys with scopes)",
        "billing.stripe_publishable ignored: only browsers use the publishable key",
        "events.topic ignored: topic names are fixed (payment-events, ...); events.topic_prefix prefixes them",
    ]


def test_the_go_services_other_variables_are_reported_as_ignored_and_its_brokers_are_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = settings(monkeypatch, EVENTS_BROKERS="k1:9092, k2:9092", POSTGRES_MAX_CONNS="10")
    assert s.kafka_bootstrap_servers == "k1:9092,k2:9092"
    assert notes(POSTGRES_MAX_CONNS="10", STRIPE_PUBLISHABLE_KEY="pk_live_verysecret") == [
        "POSTGRES_MAX_CONNS is set and ignored: each service sizes its own Postgres pool",
        "STRIPE_PUBLISHABLE_KEY is set and ignored: only browsers use the publishable key",
    ]


def test_another_event_bus_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=":2: events.provider: the event bus here is Kafka"):
        settings(monkeypatch, CONFIG_FILE=str(write(tmp_path, "events:\n  provider: nats\n")))


def test_the_config_file_can_be_given_directly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(config_file=write(tmp_path, "health:\n  port: 9191\n"))
    assert s.grpc_http_port == 9191


def test_an_unknown_key_is_refused_with_its_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, "grpc:\n  port: 9090\n\npostgres:\n  dsn: postgres://db/x\n  max_connz: 5\n")
    with pytest.raises(ConfigurationError, match=rf"{path}:6: unknown key postgres.max_connz; known in postgres: dsn, "):
        settings(monkeypatch, CONFIG_FILE=str(path))


def test_an_unknown_section_is_refused_with_its_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, "log:\n  level: info\ntracing:\n  enabled: true\n")
    with pytest.raises(ConfigurationError, match=rf"{path}:3: unknown section 'tracing'; known: app, grpc, "):
        settings(monkeypatch, CONFIG_FILE=str(path))


def test_a_key_given_twice_is_refused_with_both_lines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, "log:\n  level: info\n  level: debug\n")
    with pytest.raises(ConfigurationError, match="level is given twice \\(lines 2 and 3\\)"):
        settings(monkeypatch, CONFIG_FILE=str(path))


def test_a_value_of_the_wrong_type_names_the_key_and_line_but_not_the_value(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(tmp_path, "billing:\n  stripe_secret: [sk_live_verysecret]\n")
    with pytest.raises(ConfigurationError, match=rf"{path}:2: billing.stripe_secret must be a string") as caught:
        settings(monkeypatch, CONFIG_FILE=str(path))
    assert "verysecret" not in str(caught.value)


def test_the_dsn_and_its_parts_at_once_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, "postgres:\n  dsn: postgres://db/x\n  host: other\n")
    with pytest.raises(ConfigurationError, match="postgres.dsn and postgres.host \\(line 3\\) are both given"):
        settings(monkeypatch, CONFIG_FILE=str(path))


def test_settings_that_mean_nothing_here_are_accepted_and_reported_with_their_lines(tmp_path: Path) -> None:
    path = write(tmp_path, GO_FILE)
    found = notes(CONFIG_FILE=str(path))
    assert found == [
        f"{path}:2: app.name ignored: each process is named by `paymentsvc serve NAME`",
        f"{path}:3: app.env ignored: no environment switch here: every setting is explicit",
        f"{path}:13: postgres.max_conns ignored: each service sizes its own Postgres pool",
        f"{path}:28: metrics.enabled ignored: metrics are always served",
        f"{path}:29: metrics.port ignored: metrics are served at /metrics on each service's HTTP port (health.port for the API)",
    ]


def test_empty_sections_and_an_empty_file_are_fine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert settings(monkeypatch, CONFIG_FILE=str(write(tmp_path, "metrics:\nlog:\n"))).log_level == "INFO"
    assert settings(monkeypatch, CONFIG_FILE=str(write(tmp_path, ""))).grpc_port == 8080


def test_a_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="config file .*nope.yaml does not exist"):
        settings(monkeypatch, CONFIG_FILE=str(tmp_path / "nope.yaml"))


def test_broken_yaml_says_where(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not valid YAML at line 3: mapping values are not allowed here"):
        settings(monkeypatch, CONFIG_FILE=str(write(tmp_path, "log:\n  level: info\n  format: json: x\n")))


def test_only_the_stripe_provider_exists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=":2: billing.provider: only the stripe billing provider"):
        settings(monkeypatch, CONFIG_FILE=str(write(tmp_path, "billing:\n  provider: paypal\n")))


def test_the_cli_reads_config_and_reports_a_bad_file_as_one_line(tmp_path: Path) -> None:
    """`paymentsvc --config FILE`: a real subprocess, as an operator runs it."""
    path = write(tmp_path, "grpc:\n  prot: 9090\n")
    done = subprocess.run(
        [sys.executable, "-m", "paymentsvc.cli", "--config", str(path), "topics", "create"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: {path}:2: unknown key grpc.prot; known in grpc: address, host, port, reflection, "
        "max_recv_msg_size, max_send_msg_size, timeout, shutdown_timeout"
    )


@pytest.mark.parametrize("address", ["8080", "localhost", "grpc://h:8080", ":0"])
def test_a_grpc_address_that_is_not_host_and_port_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    with pytest.raises(ConfigurationError, match=r"GRPC_ADDRESS must be host:port .*\(e\.g\. :8080\)"):
        settings(monkeypatch, GRPC_ADDRESS=address)


def test_an_unsupported_tag_names_the_key_and_line_but_not_the_value(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(tmp_path, "log:\n  level: info\nbilling: {stripe_secret: !vault sk_live_SECRETVALUE}\n")
    with pytest.raises(ConfigurationError, match=rf"{path}:3: billing.stripe_secret: unsupported value or tag") as caught:
        settings(monkeypatch, CONFIG_FILE=str(path))
    assert "SECRETVALUE" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_malformed_bracketed_address_is_a_configuration_error_with_its_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(tmp_path, "redis:\n  addr: \"[not-v6]:6379\"\n")
    with pytest.raises(ConfigurationError, match=rf"{path}:2: redis.addr") as caught:
        settings(monkeypatch, CONFIG_FILE=str(path))
    assert "not-v6" not in str(caught.value)
    with pytest.raises(ConfigurationError, match="REDIS_ADDR") as caught:
        settings(monkeypatch, CONFIG_FILE="", REDIS_ADDR="[zz::q]:6379")
    assert "zz::q" not in str(caught.value)
