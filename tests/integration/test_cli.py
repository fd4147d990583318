"""The CLI answers operator mistakes with one line and exit status 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from shared.devbroker import free_port

pytestmark = pytest.mark.integration


def paymentsvc(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "STARTUP_TIMEOUT_S": "2", **env}
    return subprocess.run(
        [sys.executable, "-m", "paymentsvc.cli", *args], env=full_env, capture_output=True, text=True, timeout=60
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]
    return lines[0]


def test_a_database_that_is_down_is_named_with_the_command_that_starts_it() -> None:
    port = free_port()
    line = assert_one_line_error(
        paymentsvc("migrate", DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/x"), "postgres", str(port)
    )
    assert "pg_ctlcluster" in line


def test_a_malformed_database_url_is_a_one_line_error_without_the_password() -> None:
    line = assert_one_line_error(paymentsvc("migrate", DATABASE_URL="postgresql://u:hunter2@[::1"), "DATABASE_URL")
    assert "hunter2" not in line


def test_a_missing_database_says_to_migrate(database_url: str) -> None:
    missing = psycopg.conninfo.make_conninfo(database_url, dbname=f"paymentsvc_missing_{os.urandom(3).hex()}")
    assert_one_line_error(paymentsvc("catalog", "load", DATABASE_URL=missing), "does not exist", "paymentsvc migrate")


def test_a_broker_that_is_down_is_a_one_line_error() -> None:
    assert_one_line_error(
        paymentsvc("topics", "create", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}"), "kafka"
    )


def test_serving_with_the_broker_down_is_a_one_line_error() -> None:
    assert_one_line_error(
        paymentsvc(
            "serve", "ingest_webhooks",
            KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
            STRIPE_WEBHOOK_SECRETS="whsec_x",
            INGEST_PORT=str(free_port()),
        ),
        "kafka",
    )


def test_serving_without_a_broker_configured_points_at_dev() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    result = subprocess.run(
        [sys.executable, "-m", "paymentsvc.cli", "serve", "ingest_webhooks"],
        env={**env, "KAFKA_BOOTSTRAP_SERVERS": ""}, capture_output=True, text=True, timeout=60,
    )
    assert_one_line_error(result, "KAFKA_BOOTSTRAP_SERVERS", "paymentsvc dev")


def test_an_unknown_service_is_named_with_the_known_ones(broker: str) -> None:
    assert_one_line_error(paymentsvc("serve", "billing", KAFKA_BOOTSTRAP_SERVERS=broker), "billing", "entitlements")


def test_an_invalid_setting_is_named() -> None:
    assert_one_line_error(paymentsvc("migrate", GRPC_PORT="eighty"), "GRPC_PORT")


def test_an_invalid_catalog_names_the_line(tmp_path, database_url: str) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "plans.yaml"
    bad.write_text("version: 1\nplans: [\n")
    result = paymentsvc("catalog", "load", str(bad), DATABASE_URL=database_url)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad}:" in result.stderr


def test_the_catalog_loads_into_a_migrated_database(database_url: str) -> None:
    result = paymentsvc("catalog", "load", DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    assert "3 plans" in result.stdout


def test_a_usage_mistake_is_answered_with_usage_not_a_traceback() -> None:
    result = paymentsvc("serve")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Missing argument" in result.stderr
