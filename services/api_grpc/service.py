"""The use cases of the API, free of gRPC: reads from Redis then Postgres, commands that
become events, and Stripe calls. The servicer translates protos to these calls and back;
errors are the domain errors of errors.py.

`timeout` everywhere is the caller's remaining deadline in seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from domain.entitlements import WATERMARK_FIELD, subject_hash
from domain.entitlements_asof import rows_as_of
from domain.payments import PAYMENT_STATUSES
from services.api_grpc import commands, decisions, validation
from services.api_grpc.cache import CacheUnavailable, EntitlementCache, Fields
from services.api_grpc.commands import EventBus, NewPayment
from services.api_grpc.decisions import Decision, Facts
from services.api_grpc.errors import InvalidArgument, NotFound, Unavailable
from services.api_grpc.freshness import FreshnessCache
from services.api_grpc.page_tokens import PageTokens, query_fingerprint
from services.api_grpc.queries import PaymentFilter, Queries, Row, Watermark
from services.api_grpc.stripe_gateway import StripeGateway
from services.api_grpc.validation import SubjectIds, SubjectKey
from shared.catalog import Plan, Price
from shared.metrics import (
    API_CACHE_LOOKUPS,
    API_ENTITLEMENT_CHECKS,
    GO_CACHE_HITS,
    GO_CACHE_MISSES,
    GO_ENTITLEMENT_CACHE_HITS,
    GO_ENTITLEMENT_CACHE_MISSES,
    GO_ENTITLEMENT_CHECKS,
    GO_ENTITLEMENT_DURATION,
    GO_PAYMENT_AMOUNT,
    GO_PAYMENT_DURATION,
    GO_PAYMENT_FAILED,
    GO_PAYMENT_SUCCESS,
    GO_PAYMENT_TOTAL,
)

EMPTY_WATERMARK = orjson.dumps({"created": 0, "event_id": ""})
_CACHE_HIT = API_CACHE_LOOKUPS.labels("hit")
_CACHE_MISS = API_CACHE_LOOKUPS.labels("miss")
_CACHE_UNAVAILABLE = API_CACHE_LOOKUPS.labels("unavailable")
_CHECKS: dict[str, Any] = {}


def _count_check(reason: str, n: int = 1) -> None:
    child = _CHECKS.get(reason)
    if child is None:
        child = _CHECKS[reason] = API_ENTITLEMENT_CHECKS.labels(reason)
    child.inc(n)


def _count_go_checks(from_cache: bool, n: int = 1) -> None:
    """The Go service's entitlement counters: n decisions, from the cache or from Postgres."""
    GO_ENTITLEMENT_CHECKS.inc(n)
    (GO_ENTITLEMENT_CACHE_HITS if from_cache else GO_ENTITLEMENT_CACHE_MISSES).inc(n)


# Stripe's zero-decimal currencies: their amounts are already in the major unit.
ZERO_DECIMAL = frozenset(
    "bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split()
)


def major_units(amount: int, currency: str) -> float:
    """A minor-unit amount in the currency's major unit (the Go service's "dollars")."""
    return float(amount) if currency.lower() in ZERO_DECIMAL else amount / 100


def _go_payment_metrics(
    create: Callable[..., Awaitable[CreatedPayment]],
) -> Callable[..., Awaitable[CreatedPayment]]:
    """The Go service's payment_* metrics around CreatePayment's use case: every request
    counted, its amount and duration observed, and success or failure (any exception,
    cancellation included, as Go's failed context was)."""

    @functools.wraps(create)
    async def counted(self: PaymentApi, command: NewPayment, *args: Any, **kwargs: Any) -> CreatedPayment:
        GO_PAYMENT_TOTAL.inc()
        GO_PAYMENT_AMOUNT.observe(major_units(command.amount, command.currency))
        started = time.perf_counter()
        try:
            created = await create(self, command, *args, **kwargs)
        except BaseException:
            GO_PAYMENT_FAILED.inc()
            raise
        finally:
            GO_PAYMENT_DURATION.observe(time.perf_counter() - started)
        GO_PAYMENT_SUCCESS.inc()
        return created

    return counted


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[Row]
    next_page_token: str
    freshness: Watermark | None


@dataclass(frozen=True, slots=True)
class PastAnswer:
    """CheckEntitlement as of a moment: the decision then and the events it rests on."""

    decision: Decision
    evidence: tuple[str, ...]
    freshness: Watermark | None


# ListAccessChanges without `until`: no end (the last second a timestamptz can hold here).
_NO_END = 253_402_300_799


@dataclass(frozen=True, slots=True)
class CreatedPayment:
    payment: Row
    client_secret: str


def choose_price(plan: Plan, currency: str = "usd", interval: str = "month") -> Price:
    """The plan's price to sell by default: monthly in usd, else the first listed."""
    prices = list(plan.prices.values())
    for price in prices:
        if price.currency == currency and price.interval == interval:
            return price
    return prices[0]


def subject_freshness(hashes: Sequence[Fields | None], now: float) -> Watermark | None:
    """Freshness from the hashes' own watermarks (when Postgres cannot say): the newest
    event behind them, and its age as an upper bound of the lag."""
    marks = [h[WATERMARK_FIELD] for h in hashes if h is not None and h[WATERMARK_FIELD]["created"]]
    if not marks:
        return None
    newest = max(marks, key=lambda m: (m["created"], m["event_id"]))
    return Watermark(newest["created"], newest["event_id"], max(0, int((now - newest["created"]) * 1000)))


class PaymentApi:
    def __init__(
        self,
        facts: Facts,
        queries: Queries,
        cache: EntitlementCache | None,
        bus: EventBus,
        stripe: StripeGateway | None,
        tokens: PageTokens,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.facts = facts
        self.queries = queries
        self.cache = cache
        self.bus = bus
        self.stripe = stripe
        self.tokens = tokens
        self.clock = clock
        self.freshness = FreshnessCache(queries.watermark)

    # ------------------------------------------------------------ entitlements

    async def check(
        self, subject: SubjectIds, feature_code: str, timeout: float
    ) -> tuple[Decision, Watermark | None]:
        started = time.perf_counter()
        decisions.require_known(feature_code, self.facts.known)
        keys = subject.keys()
        hashes = await self._cached(keys, timeout, feature_code)
        from_cache = hashes is not None
        if hashes is None:
            hashes, fresh = await self._from_postgres(keys, timeout)
        else:
            fresh = await self.freshness.get(timeout) or subject_freshness(hashes, self.clock())
        answers = [h.get(feature_code) if h else None for h in hashes]
        decision = decisions.decide(answers, feature_code, self.facts, self.clock())
        _count_check(decision.reason)
        _count_go_checks(from_cache)
        GO_ENTITLEMENT_DURATION.observe(time.perf_counter() - started)
        return decision, fresh

    async def check_as_of(self, subject: SubjectIds, feature_code: str, as_of: int, timeout: float) -> PastAnswer:
        """The answer the projection would have given at `as_of` (domain/entitlements_asof.py),
        from Postgres only: the cache holds the present. Raises InvalidArgument for a time
        in the future or before 1970."""
        decisions.require_known(feature_code, self.facts.known)
        if as_of <= 0 or as_of > self.clock():
            raise InvalidArgument("as_of must be a Unix time in seconds, not in the future")
        catalog = self.facts.catalog
        history = await self.queries.history(subject.user_id or None, subject.family_id or None, as_of, timeout)
        moment = rows_as_of(history, catalog, as_of)
        answers: list[decisions.Answer | None] = []
        for key in subject.keys():
            fields = subject_hash([r for r in moment.rows if (r.subject_type, r.subject_id) == key], catalog)
            answers.append(orjson.loads(fields[feature_code]) if feature_code in fields else None)
        decision = decisions.decide(answers, feature_code, self.facts, as_of)
        evidence = moment.evidence.get(decision.source, ())
        if not evidence and decision.decided_by_event_id:  # the default plan after a paid one ended
            evidence = next((ids for ids in moment.evidence.values() if decision.decided_by_event_id in ids), ())
        _count_check(decision.reason)
        return PastAnswer(decision, evidence, await self.freshness.get(timeout))

    async def bulk_check(
        self, subjects: Sequence[SubjectIds], feature_codes: Sequence[str], timeout: float
    ) -> tuple[list[Decision], Watermark | None]:
        """subjects x features in request order, from one snapshot (one Redis MULTI, or
        one REPEATABLE READ transaction when any subject is not cached)."""
        validation.bulk_shape(len(subjects), len(feature_codes))
        for code in feature_codes:
            decisions.require_known(code, self.facts.known)
        keys = sorted({k for s in subjects for k in s.keys()})
        hashes = await self._cached(keys, timeout, None)
        from_cache = hashes is not None
        if hashes is None:
            hashes, fresh = await self._from_postgres(keys, timeout)
        else:
            fresh = await self.freshness.get(timeout) or subject_freshness(hashes, self.clock())
        by_key = dict(zip(keys, hashes, strict=True))
        now = self.clock()
        results = []
        for s in subjects:
            subject_hashes = [by_key[k] for k in s.keys()]
            decided: dict[str, Decision] = {}  # a code asked twice is decided once
            for code in feature_codes:
                decision = decided.get(code)
                if decision is None:
                    answers = [h.get(code) if h else None for h in subject_hashes]
                    decision = decided[code] = decisions.decide(answers, code, self.facts, now)
                results.append(decision)
        reasons: dict[str, int] = {}
        for d in results:
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
        for reason, n in reasons.items():
            _count_check(reason, n)
        _count_go_checks(from_cache, len(results))
        return results, fresh

    async def _cached(
        self, keys: Sequence[SubjectKey], timeout: float, feature_code: str | None
    ) -> list[Fields | None] | None:
        """The subjects' hashes if Redis holds every one of them, else None."""
        if self.cache is None:
            return None
        try:
            if feature_code is None:
                hashes = await self.cache.read_all(keys, timeout)
            else:
                hashes = await self.cache.read_features(keys, feature_code, timeout)
        except CacheUnavailable:
            _CACHE_UNAVAILABLE.inc()
            GO_CACHE_MISSES.inc()
            return None
        if None in hashes:
            _CACHE_MISS.inc()
            GO_CACHE_MISSES.inc()
            return None
        _CACHE_HIT.inc()
        GO_CACHE_HITS.inc()
        return hashes

    async def _from_postgres(
        self, keys: Sequence[SubjectKey], timeout: float
    ) -> tuple[list[Fields | None], Watermark | None]:
        started = time.monotonic()
        rows, fresh = await self.queries.subject_rows(keys, timeout)
        self.freshness.put(fresh)
        fields: dict[SubjectKey, dict[str, bytes]] = {}
        for key in keys:
            own = [r for r in rows if (r.subject_type, r.subject_id) == key]
            fields[key] = subject_hash(own, self.facts.catalog) or {WATERMARK_FIELD: EMPTY_WATERMARK}
        if self.cache is not None:
            await self.cache.fill(fields, max(0.05, timeout - (time.monotonic() - started)))
        hashes: list[Fields | None] = [
            {name: orjson.loads(value) for name, value in fields[key].items()} for key in keys
        ]
        return hashes, fresh

    async def list_entitlements(
        self, subject: SubjectIds, page_size: int, token: str, timeout: float
    ) -> Page:
        fingerprint = query_fingerprint("entitlements", {"s": subject.keys()})
        after = self.tokens.decode(token, fingerprint)
        rows = await self.queries.entitlements(subject.keys(), after, page_size + 1, timeout)
        cursor = ["subject_type", "subject_id", "feature_code", "source_type", "source_id"]
        return await self._page(rows, page_size, fingerprint, lambda r: [r[c] for c in cursor], timeout)

    async def list_subscriptions(
        self, subject: SubjectIds, page_size: int, token: str, timeout: float
    ) -> Page:
        fingerprint = query_fingerprint("subscriptions", {"s": subject.keys()})
        after = self.tokens.decode(token, fingerprint)
        rows = await self.queries.subscriptions(
            subject.user_id or None, subject.family_id or None, after[0] if after else None,
            page_size + 1, timeout,
        )
        return await self._page(rows, page_size, fingerprint, lambda r: [r["subscription_id"]], timeout)

    async def list_access_changes(
        self, subject: SubjectIds, since: int, until: int, page_size: int, token: str, timeout: float
    ) -> Page:
        """Oldest first, since <= changed_at < until (0: open)."""
        if since < 0 or until < 0 or (until and until <= since):
            raise InvalidArgument("since and until must be Unix seconds with since < until (0: open)")
        fingerprint = query_fingerprint("access_changes", {"s": subject.keys(), "since": since, "until": until})
        after = self.tokens.decode(token, fingerprint)
        if after is not None and (len(after) != 3 or not isinstance(after[0], int)):
            raise InvalidArgument("page_token is malformed")
        rows = await self.queries.access_changes(
            subject.user_id or None, subject.family_id or None, since, until or _NO_END, after, page_size + 1, timeout
        )
        catalog = self.facts.catalog
        for row in rows:
            plan = catalog.plan_for_price(row.pop("price_id") or "")
            row["plan_id"] = plan.id if plan else ""
        cursor = ["changed_at", "subscription_id", "event_id"]
        return await self._page(rows, page_size, fingerprint, lambda r: [r[c] for c in cursor], timeout)

    # ------------------------------------------------------------ payments

    async def get_payment(self, payment_id: str, timeout: float) -> tuple[Row, Watermark | None]:
        validation.identifier(payment_id, "payment_id")
        row = await self.queries.payment(payment_id, timeout)
        if row is None:
            raise NotFound(f"no payment {payment_id!r}")
        return row, await self.freshness.get(timeout)

    async def list_payments(
        self, where: PaymentFilter, page_size: int, token: str, timeout: float
    ) -> Page:
        fingerprint = query_fingerprint("payments", dataclasses.asdict(where))
        after = self.tokens.decode(token, fingerprint)
        if after is not None and (len(after) != 2 or not all(isinstance(v, str) for v in after)):
            raise InvalidArgument("page_token is malformed")
        rows = await self.queries.payments(where, after, page_size + 1, timeout)
        return await self._page(
            rows, page_size, fingerprint, lambda r: [r["created_at"].isoformat(), r["payment_id"]], timeout
        )

    async def _page(
        self, rows: list[Row], size: int, fingerprint: str, cursor: Callable[[Row], list[Any]], timeout: float
    ) -> Page:
        more = len(rows) > size
        rows = rows[:size]
        token = self.tokens.encode(fingerprint, cursor(rows[-1])) if more and rows else ""
        return Page(rows, token, await self.freshness.get(timeout))

    @_go_payment_metrics
    async def create_payment(self, command: NewPayment, traceparent: str, timeout: float) -> CreatedPayment:
        """PaymentIntent at Stripe (idempotent by the caller's key), then payment.created
        on the bus with acks=all. The webhooks that follow complete the payment."""
        stripe = self._stripe()
        deadline = time.monotonic() + timeout
        customer_id = command.customer_id
        if not customer_id:
            customer = await stripe.create_customer(
                {"metadata": _identity(command.user_id, command.family_id)},
                f"{command.idempotency_key}:customer",
                timeout,
            )
            customer_id = customer["id"]
        params: dict[str, Any] = {
            "amount": command.amount,
            "currency": command.currency,
            "customer": customer_id,
            "metadata": {**command.metadata, **_identity(command.user_id, command.family_id)},
        }
        if command.description:
            params["description"] = command.description
        intent = await stripe.create_payment_intent(params, command.idempotency_key, deadline - time.monotonic())
        command = dataclasses.replace(command, customer_id=customer_id)
        event = commands.payment_created(command, intent)
        await self.bus.publish(event, traceparent, max(0.05, deadline - time.monotonic()))
        row = {
            "payment_id": intent["id"], "customer_id": customer_id, "user_id": command.user_id,
            "family_id": command.family_id, "amount": command.amount, "currency": command.currency,
            "status": "pending", "payment_intent_id": intent["id"], "description": command.description,
            "metadata": dict(command.metadata), "created_at": event.created, "updated_at": event.created,
            "last_event_id": event.event_id, "last_event_created": event.created,
        }
        return CreatedPayment(row, str(intent.get("client_secret") or ""))

    async def update_payment_status(
        self, payment_id: str, status: str, reason: str, idempotency_key: str, actor: str,
        traceparent: str, timeout: float,
    ) -> str:
        """Publish payment.status_updated for an existing payment; the worker applies it.
        Returns the event id."""
        validation.identifier(payment_id, "payment_id")
        validation.status(status, PAYMENT_STATUSES)
        if len(reason) > 500:
            raise InvalidArgument("reason is longer than 500 characters")
        deadline = time.monotonic() + timeout
        row = await self.queries.payment(payment_id, timeout)
        if row is None:
            raise NotFound(f"no payment {payment_id!r}")
        event = commands.payment_status_updated(
            row, status, reason, idempotency_key, actor, int(self.clock())
        )
        await self.bus.publish(event, traceparent, max(0.05, deadline - time.monotonic()))
        return event.event_id

    async def create_checkout_session(
        self, subject: SubjectIds, plan_id: str, success_url: str, cancel_url: str,
        customer_id: str, idempotency_key: str, timeout: float,
    ) -> tuple[str, str]:
        """A subscription Checkout Session for a paid plan of the catalog: (id, url)."""
        plan = self.facts.catalog.plans.get(plan_id)
        if plan is None:
            raise InvalidArgument(f"unknown plan_id {plan_id!r}; known: {', '.join(sorted(self.facts.catalog.plans))}")
        if plan.default or not plan.prices:
            raise InvalidArgument(f"plan {plan_id!r} is free: there is nothing to check out")
        price = choose_price(plan)
        metadata = {**_identity(subject.user_id, subject.family_id), "plan_id": plan.id}
        params: dict[str, Any] = {
            "mode": "subscription",
            "line_items": [{"price": price.id, "quantity": 1}],
            "client_reference_id": subject.user_id or subject.family_id,
            "metadata": metadata,
            "subscription_data": {"metadata": metadata},
            "success_url": success_url,
            "cancel_url": cancel_url,
        }
        if customer_id:
            params["customer"] = customer_id
        session = await self._stripe().create_checkout_session(params, idempotency_key, timeout)
        return str(session["id"]), str(session.get("url") or "")

    def _stripe(self) -> StripeGateway:
        if self.stripe is None:
            raise Unavailable("Stripe is not configured (STRIPE_SECRET_KEY)")
        return self.stripe


def _identity(user_id: str, family_id: str) -> dict[str, str]:
    return {k: v for k, v in (("user_id", user_id), ("family_id", family_id)) if v}
