"""The plan catalog: which Stripe price grants which plan, and what a plan grants.

The catalog is a YAML file written by operators (docs/catalog.md describes the
format; catalog/plans.yaml is the example). `load_catalog` validates it into frozen
models and reports every problem as `PATH:LINE: dotted.location: message`, so a
typo points at its line. `apply_catalog` writes a catalog into the `plans`,
`pricing_zones`, `plan_prices` and `plan_features` tables in one transaction.

The helpers on `Catalog` and `Plan` are pure: the workers that project Stripe
events use them to decide a subscription's plan and access level.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import psycopg
import yaml
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.sqlfile import load_queries

AccessLevel = Literal["full", "grace", "reduced", "blocked"]
RuleLevel = Literal["full", "reduced", "blocked"]
MinAccess = Literal["full", "reduced"]
Period = Literal["none", "day", "month", "billing_period"]
Enforcement = Literal["hard", "soft"]
Interval = Literal["day", "week", "month", "year", "one_time"]
# The statuses the subscriptions table accepts (Stripe's, plus our `suspended`).
SubscriptionStatus = Literal[
    "incomplete",
    "incomplete_expired",
    "trialing",
    "active",
    "past_due",
    "unpaid",
    "suspended",
    "paused",
    "canceled",
]
EscalateTo = Literal["suspended", "unpaid", "canceled"]

ACCESS_LEVELS: tuple[AccessLevel, ...] = ("full", "grace", "reduced", "blocked")
SECONDS_PER_DAY = 86_400
SQL_PATH = Path(__file__).resolve().parent / "sql" / "catalog.sql"

# Strict: YAML already yields real ints and bools, and lax coercion would turn
# `limit: yes` into 1 or `default: 1` into true without a word.
Count = Annotated[int, Strict(), Field(ge=0)]
Flag = Annotated[bool, Strict()]
Currency = Annotated[str, Field(pattern=r"^[a-z]{3}$")]
Country = Annotated[str, Field(pattern=r"^[A-Z]{2}$")]
RetryDay = Annotated[int, Strict(), Field(ge=1)]

Loc = tuple[str | int, ...]


# ---------------------------------------------------------------- errors


@dataclass(frozen=True)
class CatalogProblem:
    """One problem in a catalog. `path` and `line` are None when not known."""

    message: str
    location: str = ""
    path: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = self.path or ""
        if self.path is not None and self.line is not None:
            where = f"{self.path}:{self.line}"
        parts = [p for p in (where, self.location, self.message) if p]
        return ": ".join(parts)


class CatalogError(ValueError):
    """The catalog is invalid or cannot be applied; the message has one problem per line."""

    def __init__(self, problems: Sequence[CatalogProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class _Problems(ValueError):
    """Raised by model validators to report several problems, each at its own location.

    Pydantic wraps it into one error at the model's location and keeps the
    instance in the error's ctx, where the loader unpacks it.
    """

    def __init__(self, problems: Sequence[tuple[Loc, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{_dotted(loc)}: {msg}" for loc, msg in self.problems))


def _raise_if(problems: list[tuple[Loc, str]]) -> None:
    if problems:
        raise _Problems(problems)


def _dotted(loc: Iterable[str | int]) -> str:
    return ".".join(str(part) for part in loc if part != "[key]")


# ---------------------------------------------------------------- models


class _Model(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(frozen=True, extra="forbid")


def _inject_keys(value: Any, field: str) -> Any:
    """Give each entry of a `key: {...}` mapping its key as `field`.

    The file names zones, plans, prices and features by mapping key; the models
    carry the key as a field. An explicit field is kept and checked against the key
    later. Anything that is not a mapping is left for pydantic to reject.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        return value
    out: dict[Any, Any] = {}
    for key, entry in value.items():
        if entry is None:
            entry = {}
        out[key] = {field: key, **entry} if isinstance(entry, dict) else entry
    return out


def _key_mismatches(entries: dict[str, Any], field: str, prefix: Loc) -> list[tuple[Loc, str]]:
    return [
        ((*prefix, key, field), f"{field} {getattr(entry, field)!r} differs from its key {key!r}")
        for key, entry in entries.items()
        if getattr(entry, field) != key
    ]


class Zone(_Model):
    """A pricing zone: a currency and the countries it serves."""

    code: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    name: str = Field(min_length=1)
    currency: Currency
    countries: tuple[Country, ...] = ()


class Price(_Model):
    """A Stripe price id and what it costs; `amount` is in minor units (cents)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,255}$")
    zone: str
    currency: Currency
    amount: Count
    interval: Interval


class Feature(_Model):
    """What a plan grants for one feature code.

    `limit` None means unlimited, or not metered at all (a boolean feature).
    """

    code: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,62}$")
    limit: Count | None = None
    period: Period = "none"
    enforcement: Enforcement = "hard"
    allow_release: Flag = False
    member_cap: Count | None = None
    min_access: MinAccess = "full"
    # Usage thresholds that emit `usage.threshold_crossed` (docs/catalog.md "Alerts"),
    # kept in their canonical spelling: "80%" (of the limit) or "1000" (units).
    alerts: tuple[str, ...] = ()

    @field_validator("alerts", mode="before")
    @classmethod
    def _alert_specs(cls, value: Any) -> Any:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ValueError("alerts must be a list, e.g. [80%, 100%, 1000]")
        problems: list[tuple[Loc, str]] = []
        specs: list[str] = []
        for index, item in enumerate(value):
            spec = _alert_spec(item)
            if spec is None:
                problems.append(((index,), f"{item!r} is no threshold: write a percentage of the limit "
                                           "from 1% to 1000% (80%) or an amount of at least 1 (1000)"))
            elif spec in specs:
                problems.append(((index,), f"threshold {spec} is listed twice"))
            else:
                specs.append(spec)
        _raise_if(problems)
        return tuple(specs)

    @model_validator(mode="after")
    def _period_needs_limit(self) -> Feature:
        problems: list[tuple[Loc, str]] = []
        if self.period != "none" and self.limit is None:
            problems.append((("limit",), f"a limit is required when period is {self.period!r}"))
        if self.limit is None and self.member_cap is None:
            problems += [
                (("alerts", index), f"a percentage threshold ({spec}) needs a limit or a member_cap")
                for index, spec in enumerate(self.alerts)
                if spec.endswith("%")
            ]
        _raise_if(problems)
        return self

    def thresholds(self, limit: int | None) -> list[tuple[str, int]]:
        """(spec, units) of each alert against `limit` (None: unlimited, where only the
        absolute amounts apply). A percentage is rounded up: 80% of 5 is 4 units."""
        out = []
        for spec in self.alerts:
            if not spec.endswith("%"):
                out.append((spec, int(spec)))
            elif limit is not None:
                out.append((spec, -(-limit * int(spec[:-1]) // 100)))
        return out

    @property
    def metered(self) -> bool:
        return self.limit is not None


class AccessRule(_Model):
    """The access a subscription has in one status.

    With `grace_days`, the subscription has `grace` access (everything `full`
    grants) for that many days after entering the status, then `then`.
    A bare level (`active: full`) is shorthand for `{level: full}`.
    """

    level: RuleLevel
    grace_days: Count = 0
    then: Literal["reduced", "blocked"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"level": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _grace_is_consistent(self) -> AccessRule:
        problems: list[tuple[Loc, str]] = []
        if self.grace_days and self.level != "full":
            problems.append((("level",), "a grace period needs level: full"))
        if self.grace_days and self.then is None:
            problems.append((("then",), "a grace period needs `then` (reduced or blocked)"))
        if self.then is not None and not self.grace_days:
            problems.append((("grace_days",), "`then` needs grace_days > 0"))
        _raise_if(problems)
        return self

    def level_after(self, seconds_in_status: float) -> AccessLevel:
        """The access level `seconds_in_status` after the subscription entered the status."""
        if not self.grace_days:
            return self.level
        if seconds_in_status < self.grace_days * SECONDS_PER_DAY:
            return "grace"
        return self.then or "blocked"  # `then` is set whenever grace_days is (validated)


class DunningPolicy(_Model):
    """How a failed renewal is retried and what happens when retries run out.

    `retry_after_days` are days after the first failed attempt, strictly
    increasing. After the last retry fails, the case waits `grace_days`, then
    (if `escalate_after_last`) moves the subscription to `escalate_to`.
    The defaults are the recommended values of catalog/plans.yaml.
    """

    retry_after_days: tuple[RetryDay, ...] = (1, 3, 5, 7)
    escalate_after_last: Flag = True
    escalate_to: EscalateTo = "suspended"
    grace_days: Count = 7

    @field_validator("retry_after_days")
    @classmethod
    def _increasing(cls, days: tuple[int, ...]) -> tuple[int, ...]:
        if any(b <= a for a, b in zip(days, days[1:], strict=False)):
            raise ValueError("retry days must be strictly increasing (days since the failure)")
        return days


AccessPolicy = dict[SubscriptionStatus, AccessRule]
_PERCENT = re.compile(r"^([1-9][0-9]{0,3})\s*%$")


def _alert_spec(item: Any) -> str | None:
    """The canonical spelling of one threshold, or None if it is none."""
    if isinstance(item, bool):  # YAML's yes/no: never a threshold
        return None
    if isinstance(item, int):
        return str(item) if item >= 1 else None
    if isinstance(item, str):
        match = _PERCENT.match(item.strip())
        if match and int(match.group(1)) <= 1000:
            return f"{int(match.group(1))}%"
    return None


class Plan(_Model):
    """A plan with its effective (inherited and overridden) policies."""

    id: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")
    name: str = Field(min_length=1)
    tier: Count
    default: Flag = False
    family_pool: Flag = False
    prices: dict[str, Price] = Field(default_factory=dict)
    features: dict[str, Feature] = Field(default_factory=dict)
    access_policy: AccessPolicy
    dunning: DunningPolicy = DunningPolicy()

    @field_validator("prices", mode="before")
    @classmethod
    def _price_ids(cls, value: Any) -> Any:
        return _inject_keys(value, "id")

    @field_validator("features", mode="before")
    @classmethod
    def _feature_codes(cls, value: Any) -> Any:
        return _inject_keys(value, "code")

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        problems = _key_mismatches(self.prices, "id", ("prices",))
        problems += _key_mismatches(self.features, "code", ("features",))
        if self.default and self.prices:
            problems.append((("prices",), "the default plan is free and cannot have prices"))
        if not self.family_pool:
            problems += [
                (("features", code, "member_cap"), "member_cap needs family_pool: true")
                for code, feature in self.features.items()
                if feature.member_cap is not None
            ]
        _raise_if(problems)
        return self

    def access_for(self, status: str, since_status_change_s: float) -> AccessLevel:
        """The access level of a subscription in `status` for that many seconds.

        A status the policy does not list is `blocked`: unknown means no access.
        """
        rule = self.access_policy.get(status)  # type: ignore[call-overload]
        if rule is None:
            return "blocked"
        return rule.level_after(since_status_change_s)

    def features_at(self, access_level: str) -> list[Feature]:
        """The features available at an access level.

        full and grace: all; reduced: those with min_access reduced; blocked: none.
        """
        if access_level in ("full", "grace"):
            return list(self.features.values())
        if access_level == "reduced":
            return [f for f in self.features.values() if f.min_access == "reduced"]
        if access_level == "blocked":
            return []
        raise ValueError(f"unknown access level {access_level!r}; expected one of {ACCESS_LEVELS}")


class Defaults(_Model):
    """What plans inherit: the access policy (status by status) and the dunning policy."""

    access_policy: AccessPolicy
    dunning: DunningPolicy = DunningPolicy()


# Stands in for an invalid `defaults:` block, so its errors are not repeated
# as "missing" errors in every plan that would have inherited from it.
_NO_DEFAULTS = Defaults(access_policy={})


def _inherit(plan: Any, defaults: Defaults) -> Any:
    """Merge a raw plan's overrides over the defaults, before the plan is validated.

    Merging raw data (not models) keeps the plan's own values at their own
    location, so an error in an override names the plan's line.
    """
    if not isinstance(plan, dict):
        return plan
    policy: dict[str, Any] = {s: rule.model_dump() for s, rule in defaults.access_policy.items()}
    dunning = defaults.dunning.model_dump()
    return {
        **plan,
        "access_policy": _merge(policy, plan.get("access_policy")),
        "dunning": _merge(dunning, plan.get("dunning")),
    }


def _merge(inherited: dict[str, Any], own: Any) -> Any:
    """`own` keys over `inherited`; a non-mapping `own` is left for pydantic to reject."""
    if own is None:
        return inherited
    return {**inherited, **own} if isinstance(own, dict) else own


class Catalog(_Model):
    """The whole catalog. Construct it with `load_catalog` or `parse_catalog`."""

    version: Literal[1] = 1
    defaults: Defaults
    zones: dict[str, Zone] = Field(default_factory=dict)
    plans: dict[str, Plan]

    @field_validator("zones", mode="before")
    @classmethod
    def _zone_codes(cls, value: Any) -> Any:
        return _inject_keys(value, "code")

    @field_validator("plans", mode="before")
    @classmethod
    def _plans_inherit(cls, value: Any, info: ValidationInfo) -> Any:
        # `defaults` is declared before `plans`, so it is validated first.
        defaults = info.data.get("defaults", _NO_DEFAULTS)
        value = _inject_keys(value, "id")
        if not isinstance(value, dict):
            return value
        return {key: _inherit(plan, defaults) for key, plan in value.items()}

    @model_validator(mode="after")
    def _cross_checks(self) -> Catalog:
        problems = _key_mismatches(self.zones, "code", ("zones",))
        problems += _key_mismatches(self.plans, "id", ("plans",))
        problems += self._default_problems()
        problems += self._price_problems()
        _raise_if(problems)
        return self

    def _default_problems(self) -> list[tuple[Loc, str]]:
        defaults = [plan.id for plan in self.plans.values() if plan.default]
        if not defaults:
            return [(("plans",), "no plan has default: true; exactly one must")]
        return [
            (
                ("plans", plan_id, "default"),
                f"only one plan may be the default; also {defaults[0]!r}",
            )
            for plan_id in defaults[1:]
        ]

    def _price_problems(self) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        owner: dict[str, str] = {}
        for plan in self.plans.values():
            for price in plan.prices.values():
                loc: Loc = ("plans", plan.id, "prices", price.id)
                if price.id in owner:
                    problems.append(
                        (loc, f"price id is also listed under plan {owner[price.id]!r}")
                    )
                owner.setdefault(price.id, plan.id)
                zone = self.zones.get(price.zone)
                if zone is None:
                    problems.append(((*loc, "zone"), f"unknown zone {price.zone!r}"))
                elif zone.currency != price.currency:
                    problems.append(
                        ((*loc, "currency"), f"zone {zone.code!r} uses {zone.currency!r}")
                    )
        return problems

    @property
    def default_plan(self) -> Plan:
        """The plan of a subject with no subscription."""
        return next(plan for plan in self.plans.values() if plan.default)

    def plan(self, plan_id: str) -> Plan:
        """The plan `plan_id`; KeyError if the catalog has none."""
        try:
            return self.plans[plan_id]
        except KeyError:
            raise KeyError(f"no plan {plan_id!r} in the catalog") from None

    def plan_for_price(self, price_id: str) -> Plan | None:
        """The plan a Stripe price grants, or None if the price is not in the catalog."""
        return next((plan for plan in self.plans.values() if price_id in plan.prices), None)

    def price(self, price_id: str) -> Price | None:
        """The catalog entry of a Stripe price, or None."""
        plan = self.plan_for_price(price_id)
        return plan.prices[price_id] if plan else None


# ---------------------------------------------------------------- loading


def load_catalog(path: Path) -> Catalog:
    """Read and validate the catalog at `path`. Raises CatalogError listing every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        problem = CatalogProblem(f"cannot read the catalog: {reason}", path=str(path))
        raise CatalogError([problem]) from exc
    return parse_catalog(text, source=str(path))


def parse_catalog(text: str, source: str = "<catalog>") -> Catalog:
    """Validate catalog YAML; `source` names it in error messages."""
    root, data = _parse_yaml(text, source)
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        raise CatalogError(list(_problems_from(exc, root, source))) from exc


def _parse_yaml(text: str, source: str) -> tuple[yaml.Node, Any]:
    """The node tree (for line numbers) and the data of a one-document YAML text."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise CatalogError([CatalogProblem("the catalog is empty", path=source, line=1)])
        # Before constructing: PyYAML keeps the last of duplicate keys silently.
        _raise_duplicates(root, source)
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = ": ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        line = mark.line + 1 if mark is not None else None
        raise CatalogError([CatalogProblem(message, "yaml", source, line)]) from exc
    except yaml.YAMLError as exc:
        raise CatalogError([CatalogProblem(f"invalid YAML: {exc}", "yaml", source)]) from exc
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        line = root.start_mark.line + 1
        message = "the catalog must be a mapping (version, defaults, zones, plans)"
        raise CatalogError([CatalogProblem(message, "(top level)", source, line)])
    return root, data


def _raise_duplicates(root: yaml.Node, source: str) -> None:
    problems = [
        CatalogProblem(f"duplicate key (first at line {first})", _dotted(loc), source, line)
        for loc, line, first in _duplicates(root, ())
    ]
    if problems:
        raise CatalogError(problems)


def _duplicates(node: yaml.Node, loc: Loc) -> Iterator[tuple[Loc, int, int]]:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":
                continue
            name, line = str(key.value), key.start_mark.line + 1
            if name in seen:
                yield (*loc, name), line, seen[name]
            seen.setdefault(name, line)
            yield from _duplicates(value, (*loc, name))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicates(item, (*loc, index))


def _problems_from(exc: ValidationError, root: yaml.Node, source: str) -> Iterator[CatalogProblem]:
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        nested = error.get("ctx", {}).get("error")
        if isinstance(nested, _Problems):
            for sub_loc, message in nested.problems:
                full = (*loc, *sub_loc)
                yield CatalogProblem(message, _dotted(full), source, _line_of(root, full))
        else:
            yield CatalogProblem(_message(error), _dotted(loc), source, _line_of(root, loc))


def _message(error: Any) -> str:
    kind, message = error["type"], str(error["msg"])
    if kind == "extra_forbidden":
        return _unknown_key_message(tuple(error["loc"]))
    if kind == "missing":
        return "required key is missing"
    return message.removeprefix("Value error, ")


def _unknown_key_message(loc: Loc) -> str:
    allowed = _keys_at(loc[:-1])
    if not allowed:
        return "unknown key"
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; expected one of: {', '.join(allowed)}"


def _keys_at(loc: Loc) -> list[str]:
    """The keys the model at `loc` accepts, found by following the field types."""
    current: Any = Catalog
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """`X | None` and `Annotated[X, ...]` -> X."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin in (Union, UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        return _unwrap(members[0]) if len(members) == 1 else annotation
    return annotation


def _line_of(root: yaml.Node, loc: Loc) -> int:
    """The 1-based line of `loc`, or of its nearest ancestor that exists in the file."""
    node, line = root, root.start_mark.line + 1
    for part in loc:
        found = _child(node, part)
        if found is None:
            break
        line, node = found
    return line


def _child(node: yaml.Node, part: str | int) -> tuple[int, yaml.Node] | None:
    # A key's line is where the key is written: for `features:\n  x: ...` the
    # value node starts a line later than the key the message should point at.
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return key.start_mark.line + 1, value
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
        if 0 <= part < len(node.value):
            item = node.value[part]
            return item.start_mark.line + 1, item
    return None


# ---------------------------------------------------------------- database


@cache
def _queries() -> dict[str, str]:
    return load_queries(SQL_PATH)


def apply_catalog(conn: psycopg.Connection[Any], catalog: Catalog) -> dict[str, int]:
    """Write `catalog` into the catalog tables, in one transaction.

    Upserts zones, plans (with their effective policies as jsonb), prices and
    features, and deletes prices, features, zones and plans that are no longer in
    the catalog. A removed plan that subscriptions or entitlements still reference
    raises CatalogError and nothing is changed. Returns how many of each the
    catalog holds: {"plans", "features", "prices", "zones"}.
    """
    queries = _queries()
    prices = [(plan, price) for plan in catalog.plans.values() for price in plan.prices.values()]
    features = [(plan, f) for plan in catalog.plans.values() for f in plan.features.values()]
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(queries["lock_catalog"])
        cur.executemany(queries["upsert_zone"], [_zone_row(z) for z in catalog.zones.values()])
        cur.execute(queries["clear_other_default"], {"plan_id": catalog.default_plan.id})
        cur.executemany(queries["upsert_plan"], [_plan_row(p) for p in catalog.plans.values()])
        # A price that moved between plans is updated before its old plan may go.
        cur.executemany(queries["upsert_price"], [_price_row(p, pr) for p, pr in prices])
        cur.execute(queries["delete_stale_prices"], {"keep": [pr.id for _, pr in prices]})
        cur.executemany(queries["upsert_feature"], [_feature_row(p, f) for p, f in features])
        cur.executemany(
            queries["delete_stale_features"],
            [{"plan_id": p.id, "keep": list(p.features)} for p in catalog.plans.values()],
        )
        # May raise CatalogError, which rolls back everything above.
        _delete_removed_plans(cur, queries, catalog)
        cur.execute(queries["delete_stale_zones"], {"keep": list(catalog.zones)})
    return {
        "plans": len(catalog.plans),
        "features": len(features),
        "prices": len(prices),
        "zones": len(catalog.zones),
    }


def _delete_removed_plans(
    cur: psycopg.Cursor[tuple[Any, ...]], queries: dict[str, str], catalog: Catalog
) -> None:
    existing = [row[0] for row in cur.execute(queries["plan_ids"]).fetchall()]
    removed = [plan_id for plan_id in existing if plan_id not in catalog.plans]
    if not removed:
        return
    referenced = cur.execute(queries["referenced_plans"], {"plan_ids": removed}).fetchall()
    if referenced:
        raise CatalogError(
            [
                CatalogProblem(
                    f"removed from the catalog but still referenced by {subs} subscription(s) "
                    f"and {ents} entitlement(s); keep the plan (it may have no prices) "
                    "or move those rows to another plan first",
                    location=f"plans.{plan_id}",
                )
                for plan_id, subs, ents in referenced
            ]
        )
    cur.execute(queries["delete_plans"], {"plan_ids": removed})


def _zone_row(zone: Zone) -> dict[str, Any]:
    return {
        "zone_code": zone.code,
        "name": zone.name,
        "currency": zone.currency,
        "countries": list(zone.countries),
    }


def _plan_row(plan: Plan) -> dict[str, Any]:
    policy = {status: rule.model_dump(mode="json") for status, rule in plan.access_policy.items()}
    return {
        "plan_id": plan.id,
        "name": plan.name,
        "tier": plan.tier,
        "is_default": plan.default,
        "family_pool": plan.family_pool,
        "access_policy": Jsonb(policy),
        "dunning_policy": Jsonb(plan.dunning.model_dump(mode="json")),
    }


def _price_row(plan: Plan, price: Price) -> dict[str, Any]:
    return {
        "price_id": price.id,
        "plan_id": plan.id,
        "zone_code": price.zone,
        "amount": price.amount,
        "currency": price.currency,
        "billing_interval": price.interval,
    }


def _feature_row(plan: Plan, feature: Feature) -> dict[str, Any]:
    return {
        "plan_id": plan.id,
        "feature_code": feature.code,
        "usage_limit": feature.limit,
        "limit_period": feature.period,
        "enforcement": feature.enforcement,
        "allow_release": feature.allow_release,
        "member_cap": feature.member_cap,
        "min_access": feature.min_access,
    }
