"""Signature verification: the stripe library does the HMAC; we add the rules around it."""

from __future__ import annotations

import pytest

from paymentsvc.dev.webhooks import sign
from services.ingest_webhooks.verify import SignatureVerifier, WebhookRejected

NOW = 1_800_000_000
BODY = b'{"id": "evt_1", "type": "invoice.paid"}'


def verifier(*secrets: str, tolerance: int = 300) -> SignatureVerifier:
    return SignatureVerifier(list(secrets) or ["whsec_a"], tolerance, clock=lambda: NOW)


def reason(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(WebhookRejected) as info:
        call()
    return info.value.reason


def test_a_body_signed_with_an_active_secret_verifies() -> None:
    verifier("whsec_a").verify(BODY, sign(BODY, "whsec_a", NOW))


def test_any_of_several_active_secrets_verifies() -> None:
    v = verifier("whsec_new", "whsec_old")
    v.verify(BODY, sign(BODY, "whsec_old", NOW))
    v.verify(BODY, sign(BODY, "whsec_new", NOW))


def test_a_secret_that_is_not_active_is_rejected() -> None:
    assert reason(lambda: verifier("whsec_a").verify(BODY, sign(BODY, "whsec_b", NOW))) == "bad_signature"


def test_one_changed_byte_breaks_the_signature() -> None:
    header = sign(BODY, "whsec_a", NOW)
    assert reason(lambda: verifier().verify(BODY.replace(b"paid", b"paiD"), header)) == "bad_signature"


def test_a_timestamp_older_than_the_tolerance_is_stale() -> None:
    assert reason(lambda: verifier().verify(BODY, sign(BODY, "whsec_a", NOW - 301))) == "stale_timestamp"


def test_a_timestamp_at_the_edge_of_the_tolerance_is_accepted() -> None:
    verifier().verify(BODY, sign(BODY, "whsec_a", NOW - 300))
    verifier().verify(BODY, sign(BODY, "whsec_a", NOW + 300))


def test_a_timestamp_too_far_in_the_future_is_rejected_too() -> None:
    assert reason(lambda: verifier().verify(BODY, sign(BODY, "whsec_a", NOW + 301))) == "future_timestamp"


def test_the_tolerance_is_configurable() -> None:
    header = sign(BODY, "whsec_a", NOW - 100)
    assert reason(lambda: verifier(tolerance=60).verify(BODY, header)) == "stale_timestamp"


@pytest.mark.parametrize("header", [None, ""])
def test_a_missing_header_is_rejected(header: str | None) -> None:
    assert reason(lambda: verifier().verify(BODY, header)) == "missing_signature"


@pytest.mark.parametrize("header", ["v1=abc", "t=notanumber,v1=abc", "garbage", f"t={NOW}"])
def test_a_malformed_header_is_rejected(header: str) -> None:
    assert reason(lambda: verifier().verify(BODY, header)) == "bad_signature"


def test_a_body_that_is_not_utf8_is_rejected() -> None:
    assert reason(lambda: verifier().verify(b"\xff\xfe", f"t={NOW},v1=00")) == "not_utf8"


def test_a_verifier_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="STRIPE_WEBHOOK_SECRETS"):
        SignatureVerifier([], 300)


def test_the_rejection_message_never_contains_the_secret() -> None:
    with pytest.raises(WebhookRejected) as info:
        verifier("whsec_topsecret").verify(BODY, sign(BODY, "whsec_other", NOW))
    assert "whsec" not in info.value.message
