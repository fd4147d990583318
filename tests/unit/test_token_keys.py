"""TOKEN_SIGNING_KEYS and per-key rate limits (issue 11, item 5)."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from services.api_grpc.bootstrap import rate_limits, token_keys
from services.api_grpc.errors import InvalidArgument
from services.api_grpc.page_tokens import PageTokens, derive_key, query_fingerprint
from shared.config import Settings
from shared.errors import ConfigurationError

OLD, NEW = "old-signing-key-0123456789abcdef-0", "new-signing-key-0123456789abcdef-1"
Q = query_fingerprint("payments", {})


def settings(**env: str) -> Settings:
    return Settings(**env)  # type: ignore[arg-type]


def tokens(monkeypatch: pytest.MonkeyPatch, keys: str) -> PageTokens:
    monkeypatch.setenv("TOKEN_SIGNING_KEYS", keys)
    return PageTokens(*token_keys(Settings()))


def test_the_first_key_signs_and_every_key_verifies_so_keys_rotate(monkeypatch: pytest.MonkeyPatch) -> None:
    before = tokens(monkeypatch, OLD).encode(Q, ["a"])
    rotating = tokens(monkeypatch, f"{NEW},{OLD}")
    assert rotating.decode(before, Q) == ["a"]  # issued before the rotation, still good
    after = rotating.encode(Q, ["b"])
    assert tokens(monkeypatch, NEW).decode(after, Q) == ["b"]  # signed with the new key
    with pytest.raises(InvalidArgument, match="altered"):
        tokens(monkeypatch, NEW).decode(before, Q)  # the old key retired: its tokens are refused


def test_a_token_forged_with_the_old_derivation_from_the_database_url_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    default_url = "postgresql://postgres@127.0.0.1:5432/paymentsvc"
    forged = PageTokens(derive_key(hashlib.sha256(default_url.encode()).hexdigest())).encode(Q, ["x"])
    with pytest.raises(InvalidArgument):
        tokens(monkeypatch, NEW).decode(forged, Q)


def test_the_api_refuses_to_start_without_signing_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKEN_SIGNING_KEYS", raising=False)
    with pytest.raises(ConfigurationError, match="TOKEN_SIGNING_KEYS is not set"):
        token_keys(Settings())


def test_a_short_signing_key_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_SIGNING_KEYS", "short")
    with pytest.raises(ValidationError, match="shorter than 32"):
        Settings()


def test_rate_limits_default_and_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "aaa=read:5/10,bbb=read+write")
    monkeypatch.setenv("API_RATE_LIMIT", "200/400")
    limits = rate_limits(Settings())
    assert (limits.rate, limits.burst, limits.per_key) == (200.0, 400.0, (("key-1", 5.0, 10.0),))


@pytest.mark.parametrize(("name", "value"), [("API_RATE_LIMIT", "fast"), ("API_RATE_LIMIT", "0/10"),
                                             ("API_KEYS", "aaa=read:10"), ("API_KEYS", "aaa=read:x/y")])
def test_a_malformed_rate_limit_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match="rate/burst"):
        Settings()


def test_a_rejected_secret_is_not_repeated_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_SIGNING_KEYS", "tooshort-but-secret")
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert "tooshort-but-secret" not in str(raised.value)
