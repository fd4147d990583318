"""Configuration from the environment, and secrets that never leak."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.config import Settings, redact_url


def settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_the_defaults_point_at_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DATABASE_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS", "API_KEYS", "GRPC_PORT"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert s.database_url.get_secret_value().startswith("postgresql://postgres@127.0.0.1:5432/")
    assert s.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert (s.grpc_port, s.grpc_http_port, s.ingest_port) == (8080, 8081, 8090)
    assert (s.entitlements_port, s.usage_port, s.dunning_port) == (8091, 8092, 8093)
    assert s.kafka_bootstrap_servers == "" and s.api_keys == ()


def test_webhook_secrets_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(monkeypatch, STRIPE_WEBHOOK_SECRETS="whsec_a, whsec_b,,")
    assert [x.get_secret_value() for x in s.stripe_webhook_secrets] == ["whsec_a", "whsec_b"]


def test_api_keys_carry_their_scopes(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(monkeypatch, API_KEYS="k1=read,k2=read+write+admin")
    assert [(k.secret.get_secret_value(), sorted(k.scopes)) for k in s.api_keys] == [
        ("k1", ["read"]),
        ("k2", ["admin", "read", "write"]),
    ]


@pytest.mark.parametrize("value", ["k1=root", "k1", "=read", "k1="])
def test_a_malformed_api_key_entry_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    with pytest.raises(ValidationError, match="API_KEYS entry 1"):
        settings(monkeypatch, API_KEYS=value)


def test_secrets_never_appear_in_the_repr_or_the_status_view(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(
        monkeypatch,
        STRIPE_SECRET_KEY="sk_live_verysecret",
        STRIPE_WEBHOOK_SECRETS="whsec_verysecret",
        API_KEYS="apikeyverysecret=read",
        DATABASE_URL="postgresql://app:dbverysecret@db.internal:5432/payments",
        REDIS_URL="redis://:redisverysecret@cache:6379/0",
    )
    for text in (repr(s), str(s), str(s.public_view())):
        assert "verysecret" not in text
    view = s.public_view()
    assert view["database_url"] == "postgresql://app:***@db.internal:5432/payments"
    assert view["stripe_secret_key"] == "set" and view["api_keys"] == [{"name": "key-1", "scopes": ["read"]}]


def test_a_port_that_is_not_a_number_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="grpc_port"):
        settings(monkeypatch, GRPC_PORT="eighty")


def test_topic_names_take_the_configured_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(monkeypatch, KAFKA_TOPIC_PREFIX="staging.")
    assert s.topics.payment_events == "staging.payment-events"
    assert "staging.payment-events.dlq" in s.topics.all() and len(s.topics.all()) == 9


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:p@h:1/d", "postgresql://u:***@h:1/d"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
