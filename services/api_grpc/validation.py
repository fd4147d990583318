"""Validation of request fields at the edge: pure functions that raise InvalidArgument
with a message that names the field and says what is allowed."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.api_grpc.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_ID_LENGTH = 255
MAX_AMOUNT = 99_999_999  # Stripe's limit for most currencies, in minor units
MAX_BULK_SUBJECTS = 100
MAX_BULK_FEATURES = 100
MAX_BULK_CHECKS = 10_000
_CURRENCY = re.compile(r"^[a-z]{3}$")
_STATUS = re.compile(r"^[a-z_]{1,40}$")

SubjectKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class SubjectIds:
    """Whose answer is asked: a user, a family, or a user within a family."""

    user_id: str
    family_id: str

    def keys(self) -> list[SubjectKey]:
        """The projection's subjects behind this one, user first."""
        keys: list[SubjectKey] = []
        if self.user_id:
            keys.append(("user", self.user_id))
        if self.family_id:
            keys.append(("family", self.family_id))
        return keys


def subject(user_id: str, family_id: str, field: str = "subject") -> SubjectIds:
    """At least one of user_id / family_id, each a sane id."""
    if not user_id and not family_id:
        raise InvalidArgument(f"{field} needs a user_id or a family_id")
    if user_id:
        identifier(user_id, f"{field}.user_id")
    if family_id:
        identifier(family_id, f"{field}.family_id")
    return SubjectIds(user_id, family_id)


def identifier(value: str, field: str) -> str:
    """A non-empty id of at most 255 printable characters."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(f"{field} is longer than {MAX_ID_LENGTH} characters")
    if not value.isprintable() or value.strip() != value:
        raise InvalidArgument(f"{field} must be printable, without surrounding spaces")
    return value


def page_size(value: int) -> int:
    """1..500; 0 means the default of 50."""
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 1 and {MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE})")
    return value


def currency(value: str) -> str:
    if not _CURRENCY.match(value):
        raise InvalidArgument(f"currency must be a lower-case ISO 4217 code such as 'usd', not {value!r}")
    return value


def amount(value: int) -> int:
    if not 1 <= value <= MAX_AMOUNT:
        raise InvalidArgument(f"amount must be between 1 and {MAX_AMOUNT} minor units, not {value}")
    return value


def status_filter(value: str, allowed: frozenset[str]) -> str | None:
    """An optional status filter: empty means any."""
    if not value:
        return None
    return status(value, allowed)


def status(value: str, allowed: frozenset[str]) -> str:
    if not _STATUS.match(value) or value not in allowed:
        raise InvalidArgument(f"status {value!r} is not one of: {', '.join(sorted(allowed))}")
    return value


def time_range(created_after: int, created_before: int) -> tuple[int | None, int | None]:
    """Unix seconds; 0 means unbounded. `after` must be before `before`."""
    if created_after < 0 or created_before < 0:
        raise InvalidArgument("created_after and created_before are Unix seconds, not negative")
    after = created_after or None
    before = created_before or None
    if after is not None and before is not None and after >= before:
        raise InvalidArgument("created_after must be earlier than created_before")
    return after, before


def bulk_shape(subjects: int, features: int) -> None:
    """1..100 subjects x 1..100 features, at most 10,000 checks."""
    if not 1 <= subjects <= MAX_BULK_SUBJECTS:
        raise InvalidArgument(f"subjects must hold 1 to {MAX_BULK_SUBJECTS} entries, not {subjects}")
    if not 1 <= features <= MAX_BULK_FEATURES:
        raise InvalidArgument(f"feature_codes must hold 1 to {MAX_BULK_FEATURES} entries, not {features}")
    if subjects * features > MAX_BULK_CHECKS:
        raise InvalidArgument(f"at most {MAX_BULK_CHECKS} checks per call")


def url(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    if not value.startswith(("https://", "http://")) or len(value) > 2048:
        raise InvalidArgument(f"{field} must be an http(s) URL of at most 2048 characters")
    return value


def metadata(values: dict[str, str]) -> dict[str, str]:
    """Stripe's limits: 50 keys, keys up to 40 and values up to 500 characters."""
    if len(values) > 50:
        raise InvalidArgument("metadata holds at most 50 keys")
    for key, value in values.items():
        if not key or len(key) > 40 or len(value) > 500:
            raise InvalidArgument("metadata keys are 1..40 characters and values at most 500")
    return values
