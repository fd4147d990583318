"""Opaque, tamper-evident page tokens.

A token is base64url(JSON payload) + "." + base64url(HMAC-SHA256). The payload holds
the keyset cursor (the sort key of the last row returned) and a fingerprint of the
query (method and filters), so a token cannot be replayed against another query. The
keys come from `TOKEN_SIGNING_KEYS`, shared by every replica, so a token made by one
replica is accepted by the others. The first key signs and every key verifies, so a
key is rotated by putting a new one first and dropping the old one once the tokens it
signed have expired from clients (a page token lives as long as a listing; a
consistency token a few seconds).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import orjson

from services.api_grpc.errors import InvalidArgument

MAX_TOKEN_LENGTH = 2048


def derive_key(secret_material: str) -> bytes:
    """A stable HMAC key from configuration that all replicas share."""
    return hashlib.sha256(b"api_grpc page tokens\x00" + secret_material.encode()).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def query_fingerprint(method: str, filters: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps([method, filters], option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


class PageTokens:
    def __init__(self, *keys: bytes) -> None:
        if not keys:
            raise ValueError("PageTokens needs at least one key")
        self._keys = keys

    def _sign(self, payload: bytes, key: bytes | None = None) -> str:
        return _b64(hmac.new(key or self._keys[0], payload, hashlib.sha256).digest())

    def encode(self, fingerprint: str, cursor: list[Any]) -> str:
        payload = orjson.dumps({"q": fingerprint, "c": cursor})
        return f"{_b64(payload)}.{self._sign(payload)}"

    def decode(self, token: str, fingerprint: str) -> list[Any] | None:
        """The cursor of `token`, None for an empty token (the first page).

        Raises InvalidArgument for a malformed or tampered token, or one made for
        another query.
        """
        if not token:
            return None
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidArgument("page_token is malformed")
        body, sep, signature = token.partition(".")
        try:
            payload = _unb64(body)
            expected = [self._sign(payload, key) for key in self._keys]
        except (ValueError, TypeError):
            raise InvalidArgument("page_token is malformed") from None
        if not sep or not any(hmac.compare_digest(e, signature) for e in expected):
            raise InvalidArgument("page_token is malformed or was altered")
        data = orjson.loads(payload)
        if data.get("q") != fingerprint:
            raise InvalidArgument("page_token belongs to another query (filters changed)")
        cursor = data.get("c")
        if not isinstance(cursor, list):
            raise InvalidArgument("page_token is malformed")
        return cursor
