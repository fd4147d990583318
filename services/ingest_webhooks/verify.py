"""Stripe-Signature verification, with the `stripe` library doing the HMAC.

The body is verified exactly as received (bytes). Several secrets may be
active at once while Stripe rolls one over. The SDK rejects a timestamp older
than the tolerance; we also reject one further than the tolerance in the future.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import stripe


class WebhookRejected(Exception):
    """The request is answered 4xx. `reason` labels the rejection metric."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def _header_timestamp(header: str) -> int:
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            return int(value)
    raise ValueError("no t= in the header")


class SignatureVerifier:
    def __init__(
        self,
        secrets: Sequence[str],
        tolerance_s: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secrets:
            raise ValueError("at least one webhook signing secret is required (STRIPE_WEBHOOK_SECRETS)")
        self._secrets = tuple(secrets)
        self._tolerance_s = tolerance_s
        self._clock = clock

    def verify(self, body: bytes, header: str | None) -> None:
        """Return if `header` signs `body` with one of our secrets, recently enough.

        Raises WebhookRejected(400, reason) otherwise; never echoes the body or a secret.
        """
        if not header:
            raise WebhookRejected(400, "missing_signature", "the Stripe-Signature header is missing")
        if not header.isascii():  # int() reads non-ASCII digits; the SDK's compare raises on them
            raise WebhookRejected(400, "bad_signature", "the Stripe-Signature header is malformed")
        try:
            payload = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WebhookRejected(400, "not_utf8", "the body is not UTF-8") from exc
        try:
            timestamp = _header_timestamp(header)
        except ValueError as exc:
            raise WebhookRejected(400, "bad_signature", "the Stripe-Signature header is malformed") from exc
        now = self._clock()
        if timestamp > now + self._tolerance_s:
            raise WebhookRejected(400, "future_timestamp", "the signature timestamp is in the future")
        if timestamp < now - self._tolerance_s:
            raise WebhookRejected(400, "stale_timestamp", "the signature timestamp is too old")
        for secret in self._secrets:
            try:
                # The tolerance was checked above against our (injectable) clock.
                stripe.WebhookSignature.verify_header(payload, header, secret, tolerance=None)
                return
            except stripe.SignatureVerificationError:
                continue
        raise WebhookRejected(400, "bad_signature", "no signature matches any active secret")
