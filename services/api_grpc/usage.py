"""The usage use cases of the API: IncrementUsage, CheckQuota and ListUsage, free of gRPC.

IncrementUsage
    1. The subject's policy for the feature: the entitlement decision (decisions.py,
       through PaymentApi.check: Redis first, Postgres second) names the plan and its
       limit; the catalog adds hard/soft, allow_release and the member cap; the period is
       the subscription's billing period (Postgres), a calendar month or day, or the
       everlasting period of `none`. Policies are cached per process for POLICY_TTL_S
       (a plan change takes effect within that), and never past their period's end.
    2. One Lua script in Redis (services/usage/counters.py) checks the limit and the
       member cap, changes the pool's and the member's counters and stores the answer
       under the idempotency key, atomically. Redis is shared by every replica, so the
       same key never counts twice across replicas; the record lives 7 days, and the
       rebuild restores it from usage_records after a Redis loss (Postgres is the durable
       record of every counted key).
    3. An allowed change is published to usage-events with acks=all, its event id derived
       from the idempotency key. If the broker does not acknowledge, a second script
       rolls back the counters and the record (only if the record is still the one this
       call wrote) and the answer is UNAVAILABLE: nothing counted, nothing lost.
       The call hands the event to the producer and waits for the delivery future
       itself, within the one timeout of the call: no task per increment. What follows
       from the delivery (keep, or roll back) hangs on that future, not on the call: a
       call cancelled (the client left, the deadline passed, the server is stopping)
       still settles, bounded by the producer's delivery timeout (`request_timeout_ms`),
       and the rollback, when there is one, runs as its own task. A call cancelled
       before the event was handed over rolls back at once. The server waits for
       unsettled increments before it exits (`UsageApi.drain`).
    A retry that finds a record whose publish is not known to be acknowledged (the first
    attempt is in flight, or its replica died) publishes the same event again (the
    worker's inbox drops a copy), then marks the record done and returns the first
    answer. With Redis down or not rebuilt (`usage:ready` missing) increments are refused
    with UNAVAILABLE: the limit cannot be checked atomically anywhere else.

CheckQuota
    Reads the counters of the current periods with one MGET. Every replica reads the same
    Redis that IncrementUsage wrote before answering, so a check after a write sees it on
    any replica. When Redis is down or not rebuilt, the worker's aggregates in Postgres
    answer instead; they may lag the log, so the consistency token of IncrementUsage
    (signed: pool, feature, period start, the counter after the write) raises `used` to at
    least what that write saw: read-your-writes holds on both paths.

ListUsage
    The worker's per-period aggregates, newest period first, with signed page tokens.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.exceptions
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from psycopg_pool import AsyncConnectionPool

from domain.usage import model, repository
from domain.usage.counters import Counters, NotReady, Step
from domain.usage.model import UNLIMITED, Answer, Outcome, Policy, Request
from payment.v1 import events_pb2
from services.api_grpc import decisions, validation
from services.api_grpc.cache import CALL_TIMEOUT_S
from services.api_grpc.decisions import Decision, Facts
from services.api_grpc.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.api_grpc.page_tokens import PageTokens, query_fingerprint
from services.api_grpc.queries import Row, Watermark
from services.api_grpc.validation import SubjectIds, SubjectKey
from shared.db import timed_connection
from shared.kafka import OutgoingMessage, PublishFailed, enqueue, event_headers, publish
from shared.metrics import (
    GO_CACHE_HITS,
    GO_CACHE_MISSES,
    USAGE_INCREMENTS,
    USAGE_PUBLISH_FAILURES,
    USAGE_QUOTA_READS,
)

# Bound once: a labels() lookup costs about 2.5 µs, on every call.
_INCREMENTS = {o: USAGE_INCREMENTS.labels(o) for o in ("allowed", "denied", "over_soft_limit", "released", "replayed")}
_QUOTA_READS_REDIS = USAGE_QUOTA_READS.labels("redis")
_QUOTA_READS_POSTGRES = USAGE_QUOTA_READS.labels("postgres")

log = logging.getLogger("api_grpc.usage")
POLICY_TTL_S = 5.0
# The bounds of the Redis calls that run in tasks of their own, past their caller (the
# client has no socket timeout: bootstrap.redis_client). A timed-out confirm leaves the
# record pending, which the next retry publishes and confirms again.
ROLLBACK_TIMEOUT_S = 2.0
CONFIRM_TIMEOUT_S = 2.0
QUOTA_READ_TIMEOUT_S = 1.0
MAX_POLICIES = 100_000
TOKEN_QUERY = "usage-consistency"


class EntitlementChecker(Protocol):
    async def check(
        self, subject: SubjectIds, feature_code: str, timeout: float
    ) -> tuple[Decision, Watermark | None]: ...


class UsageBus(Protocol):
    """Where usage events go. A bus may also offer `send` (KafkaUsageBus does): then an
    increment waits for the delivery future itself instead of running `publish` as a task."""

    async def publish(self, event: events_pb2.UsageEvent, timeout: float) -> None:
        """Return once the broker acknowledged (acks=all); else raise Unavailable."""


# What a failed delivery raises: the event was not acknowledged, so the count is undone.
NOT_ACKNOWLEDGED = (Unavailable, KafkaError, PublishFailed)


class KafkaUsageBus:
    """usage-events, keyed by the charged pool so one pool's increments stay in order."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, max_timeout_s: float = 10.0) -> None:
        self._producer = producer
        self._topic = topic
        self._max_timeout_s = max_timeout_s

    def _message(self, event: events_pb2.UsageEvent) -> OutgoingMessage:
        headers = event_headers(event.event_id, "usage.recorded", "UsageEvent", occurred_at=event.created_ms / 1000)
        return OutgoingMessage(self._topic, event.subject_id.encode(), event.SerializeToString(), tuple(headers),
                               "usage.recorded")

    async def send(self, event: events_pb2.UsageEvent) -> asyncio.Future[Any]:
        """Hand the event to the producer; the future fails with a KafkaError if the broker
        does not acknowledge within the producer's request timeout (shared.kafka.enqueue).
        Raises Unavailable when it cannot be enqueued: then it was not sent."""
        try:
            return await enqueue(self._producer, self._message(event))
        except KafkaError as exc:
            raise Unavailable(f"the event bus did not take the usage event: {type(exc).__name__}") from exc

    async def publish(self, event: events_pb2.UsageEvent, timeout: float) -> None:
        m = self._message(event)
        try:
            await publish(self._producer, m.topic, m.value, key=m.key, headers=m.headers, event_type=m.event_type,
                          timeout_s=min(timeout, self._max_timeout_s))
        except PublishFailed as exc:
            raise Unavailable(f"the event bus did not acknowledge the usage event: {exc}") from exc


class UsageStore:
    """The API's Postgres reads for usage (sql in services/usage/sql/usage.sql)."""

    def __init__(self, pool: AsyncConnectionPool, checkout_timeout_s: float = 2.0) -> None:
        self._pool = pool
        self._checkout_s = checkout_timeout_s

    def _connection(self, timeout: float) -> Any:
        return timed_connection(self._pool, min(timeout, self._checkout_s))

    async def billing_period(
        self, subjects: Sequence[SubjectKey], feature_code: str, plan_id: str, timeout: float
    ) -> tuple[int, int] | None:
        async with self._connection(timeout) as conn:
            return await repository.billing_period(conn, subjects, feature_code, plan_id)

    async def used(self, keys: Sequence[repository.PeriodKey], timeout: float) -> list[int]:
        async with self._connection(timeout) as conn:
            return await repository.used_in_periods(conn, keys)

    async def list_usage(
        self, subjects: Sequence[SubjectKey], feature_code: str | None, after: Sequence[Any] | None,
        limit: int, timeout: float,
    ) -> list[Row]:
        async with self._connection(timeout) as conn:
            return await repository.list_usage(conn, subjects, feature_code, after, limit)


@dataclass(frozen=True, slots=True)
class Increment:
    answer: Answer
    consistency_token: str


@dataclass(frozen=True, slots=True)
class Quota:
    feature_code: str
    used: int
    limit: int
    remaining: int
    period: model.Period
    hard: bool


@dataclass(frozen=True, slots=True)
class UsagePage:
    rows: list[Row]
    next_page_token: str


def _redis_down(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError | TimeoutError | OSError)


def check_amount(amount: int) -> int:
    if amount == 0:
        raise InvalidArgument("amount must not be 0")
    if abs(amount) > model.MAX_AMOUNT:
        raise InvalidArgument(f"amount must be within ±2^53 ({model.MAX_AMOUNT}), not {amount}")
    return amount


class UsageApi:
    def __init__(
        self,
        facts: Facts,
        entitlements: EntitlementChecker,
        store: UsageStore,
        counters: Counters,
        bus: UsageBus,
        tokens: PageTokens,
        clock: Callable[[], float] = time.time,
        policy_ttl_s: float = POLICY_TTL_S,
        publish_timeout_s: float = 10.0,
    ) -> None:
        self.facts = facts
        self.entitlements = entitlements
        self.store = store
        self.counters = counters
        self.bus = bus
        self.tokens = tokens
        self.clock = clock
        self.policy_ttl_s = policy_ttl_s
        # The producer's delivery bound: how long a publish may take to be answered.
        self.publish_timeout_s = publish_timeout_s
        self._policies: dict[tuple[str, str, str], tuple[Policy, float]] = {}
        # Deliveries not yet acknowledged, and the tasks that settle the rest (a bus
        # without `send`, a retried key's republish and confirm, rollbacks): what
        # `drain` waits for.
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._settling: set[asyncio.Future[Any]] = set()
        self._rollbacks: dict[int, asyncio.Task[None]] = {}

    # ------------------------------------------------------------ policy

    def _metered(self, feature_code: str) -> str:
        decisions.require_known(feature_code, self.facts.known)
        if feature_code not in self.facts.metered:
            raise InvalidArgument(f"feature_code {feature_code!r} is not metered: it has no usage to count")
        return feature_code

    async def policy(self, subject: SubjectIds, feature_code: str, timeout: float) -> Policy:
        """The subject's policy for a metered feature now. FailedPrecondition when the
        subject is not entitled to it."""
        now = self.clock()
        key = (subject.user_id, subject.family_id, feature_code)
        cached = self._policies.get(key)
        if cached is not None and cached[1] > time.monotonic() and cached[0].period.start <= now < cached[0].period.end:
            return cached[0]
        policy = await self._resolve(subject, feature_code, now, timeout)
        if len(self._policies) >= MAX_POLICIES:
            self._policies.clear()
        self._policies[key] = (policy, time.monotonic() + self.policy_ttl_s)
        return policy

    async def _resolve(self, subject: SubjectIds, feature_code: str, now: float, timeout: float) -> Policy:
        decision, _ = await self.entitlements.check(subject, feature_code, timeout)
        if not decision.allowed:
            raise FailedPrecondition(
                f"the subject is not entitled to {feature_code!r} ({decision.reason}): there is no quota to use"
            )
        plan = self.facts.catalog.plans.get(decision.plan_id)
        feature = plan.features.get(feature_code) if plan is not None else None
        family_pool = plan is not None and plan.family_pool and bool(subject.family_id)
        if family_pool:
            pool_type, pool_id, member = "family", subject.family_id, (subject.user_id or None)
        elif subject.user_id:
            pool_type, pool_id, member = "user", subject.user_id, None
        else:
            pool_type, pool_id, member = "family", subject.family_id, None
        sub_period = None
        if decision.limit_period == "billing_period" and plan is not None and not plan.default:
            sub_period = await self.store.billing_period(subject.keys(), feature_code, plan.id, timeout)
        start, end = sub_period if sub_period is not None else (None, None)
        return Policy(
            feature_code=feature_code,
            plan_id=decision.plan_id,
            pool_type=pool_type,
            pool_id=pool_id,
            member=member,
            limit=decision.usage_limit if decision.usage_limit >= 0 else UNLIMITED,
            hard=feature is None or feature.enforcement == "hard",
            allow_release=feature is not None and feature.allow_release,
            member_cap=feature.member_cap if family_pool and feature and feature.member_cap is not None else UNLIMITED,
            period=model.period_for(decision.limit_period, now, start, end),
            user_id=subject.user_id,
            family_id=subject.family_id,
        )

    # ------------------------------------------------------------ IncrementUsage

    async def increment(
        self, subject: SubjectIds, feature_code: str, amount: int, idempotency_key: str,
        metadata: Mapping[str, str], timeout: float,
    ) -> Increment:
        """See the module docstring. Raises InvalidArgument, FailedPrecondition, Unavailable."""
        deadline = time.monotonic() + timeout
        self._metered(feature_code)
        check_amount(amount)
        validation.identifier(idempotency_key, "idempotency_key")
        metadata = validation.metadata(dict(metadata))  # one copy, owned by the Request
        policy = await self.policy(subject, feature_code, timeout)
        if amount < 0 and not policy.allow_release:
            raise InvalidArgument(f"feature {feature_code!r} does not allow releases (negative amounts)")
        if policy.member_cap >= 0 and policy.member is None:
            raise InvalidArgument(f"feature {feature_code!r} has a cap per member: subject.user_id is required")
        request = Request(idempotency_key, policy, amount, int(self.clock() * 1000), metadata)
        for _ in range(2):  # a second round only if a retried key's first attempt was rolled back meanwhile
            outcome, replayed = await self._count_and_publish(request, deadline)
            if outcome is not None:
                return self._answer(outcome, replayed)
        raise Unavailable("the first attempt with this idempotency key was rolled back meanwhile; retry")

    async def _count_and_publish(self, request: Request, deadline: float) -> tuple[Outcome | None, bool]:
        """The script, then the event, within one timeout. (None, True): a replayed
        record vanished meanwhile."""
        published = False  # past this point a timeout is the bus's, and the increment settles on its own
        try:
            # One scope: the script gets at most CALL_TIMEOUT_S (the client has no socket
            # timeout), then the publish gets the rest of the call's time.
            left = max(0.01, deadline - time.monotonic())
            async with asyncio.timeout(min(left, CALL_TIMEOUT_S)) as scope:
                step = await self._step(request)
                if left > CALL_TIMEOUT_S:
                    scope.reschedule(asyncio.get_running_loop().time() + max(0.01, deadline - time.monotonic()))
                outcome = step.outcome
                if not model.needs_publish(outcome):
                    return outcome, step.replayed
                published = True
                if step.replayed:
                    return await asyncio.shield(self._track(self._republish(step))), True
                await self._publish(step)
                return outcome, False
        except TimeoutError:
            if not published:
                raise Unavailable("Redis cannot count atomically now (TimeoutError); retry later") from None
            raise Unavailable(
                "the event bus has not answered within the deadline; the increment settles on "
                "its own (kept if the event lands, else rolled back): retry with the same idempotency_key"
            ) from None

    async def _step(self, request: Request) -> Step:
        try:
            step = await self.counters.increment(request, self.clock())
        except NotReady as exc:
            raise Unavailable("the usage counters are being rebuilt after a Redis loss; retry shortly") from exc
        except Exception as exc:
            if _redis_down(exc):
                raise Unavailable(f"Redis cannot count atomically now ({type(exc).__name__}); retry later") from exc
            raise
        if step.replayed:
            first = step.outcome.request
            if (first.policy.feature_code, first.amount, first.policy.user_id, first.policy.family_id) != (
                request.policy.feature_code, request.amount, request.policy.user_id, request.policy.family_id
            ):
                raise InvalidArgument("idempotency_key was already used for a different increment")
        return step

    async def _publish(self, step: Step) -> None:
        """Publish a new step's event and wait for its acknowledgement; on a failed one,
        roll back (waiting for it, when the call is still there) and raise Unavailable.

        The delivery future settles the step whether or not the call still waits for it
        (`_delivered`); the call awaits it through a shield, so that its cancellation or
        timeout never cancels the delivery."""
        try:
            ack = await self._send(model.usage_event(step.outcome))
        except BaseException as exc:  # not handed over (refused, cancelled, timed out): nothing was sent
            rollback = self._roll_back(step)
            if isinstance(exc, NOT_ACKNOWLEDGED):
                await asyncio.shield(rollback)
            raise
        self._in_flight.add(ack)
        ack.add_done_callback(functools.partial(self._delivered, step))
        try:
            await asyncio.shield(ack)
        except NOT_ACKNOWLEDGED as exc:
            await asyncio.shield(self._roll_back(step))
            raise Unavailable(f"the event bus did not acknowledge the usage event: {exc}") from exc

    async def _send(self, event: events_pb2.UsageEvent) -> asyncio.Future[Any]:
        """The event's delivery future: the producer's own, or a task around `publish`
        for a bus without `send`."""
        send = getattr(self.bus, "send", None)
        if send is not None:
            ack: asyncio.Future[Any] = await send(event)
            return ack
        return asyncio.ensure_future(self.bus.publish(event, self.publish_timeout_s))

    def _delivered(self, step: Step, ack: asyncio.Future[Any]) -> None:
        """The delivery of a new step's event resolved: keep the count, or roll it back."""
        self._in_flight.discard(ack)
        if ack.cancelled():
            return  # nobody cancels a delivery; if someone did, the record stays pending for a retry
        exc = ack.exception()
        if exc is None:
            return
        if isinstance(exc, NOT_ACKNOWLEDGED):
            self._roll_back(step)
        else:
            log.error("usage event delivery failed unexpectedly; the count is kept pending",
                      extra={"idempotency_key": step.outcome.request.idempotency_key}, exc_info=exc)

    def _roll_back(self, step: Step) -> asyncio.Task[None]:
        """The one rollback task of `step` (started on first ask), counted once."""
        key = id(step)  # the step, not its idempotency key: a retry's new step needs its own
        task = self._rollbacks.get(key)
        if task is None:
            USAGE_PUBLISH_FAILURES.inc()
            task = self._rollbacks[key] = asyncio.ensure_future(self._rollback(step))
            task.add_done_callback(lambda _: self._rollbacks.pop(key, None))
            self._track(task)
        return task

    def _track(self, work: Any) -> asyncio.Future[Any]:
        """Run `work` (a coroutine or future) to its end whether or not anyone awaits it."""
        future = asyncio.ensure_future(work)
        self._settling.add(future)
        future.add_done_callback(self._settled)
        return future

    def _settled(self, future: asyncio.Future[Any]) -> None:
        self._settling.discard(future)
        if not future.cancelled():
            future.exception()  # retrieved: a caller that left has nobody to raise it to

    async def drain(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for increments still settling; the number left over."""
        deadline = time.monotonic() + timeout_s
        pending = self._in_flight | self._settling
        while pending and time.monotonic() < deadline:
            await asyncio.wait(pending, timeout=deadline - time.monotonic())
            pending = self._in_flight | self._settling  # a failed delivery starts its rollback
        if pending:
            log.error("usage increments still unsettled at shutdown: their records stay pending "
                      "and a retry with the same key publishes them again", extra={"unsettled": len(pending)})
        return len(pending)

    async def _republish(self, step: Step) -> Outcome | None:
        """A retried key whose record is pending: publish its event again (the worker's
        inbox drops a copy), then mark the record done. None if the record vanished
        meanwhile (the first attempt was rolled back)."""
        try:
            ack = await self._send(model.usage_event(step.outcome))
            await ack
        except NOT_ACKNOWLEDGED as exc:
            USAGE_PUBLISH_FAILURES.inc()
            raise Unavailable(f"the event bus did not acknowledge the usage event: {exc}") from exc
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT_S):  # this task outlives a caller that left
                confirmed = await self.counters.confirm(step)
        except TimeoutError:
            raise Unavailable("Redis did not confirm the increment (TimeoutError); retry with the same "
                              "idempotency_key") from None
        if not confirmed:
            return None
        return step.outcome

    async def _rollback(self, step: Step) -> None:
        try:
            async with asyncio.timeout(ROLLBACK_TIMEOUT_S):
                await self.counters.rollback(step)
        except Exception:  # the counter stays high by this amount until the next rebuild
            log.error("could not roll back a usage increment whose event was not published",
                      extra={"idempotency_key": step.outcome.request.idempotency_key}, exc_info=True)

    def _answer(self, outcome: Outcome, replayed: bool) -> Increment:
        answer = model.answer(outcome)
        _INCREMENTS["replayed" if replayed else model.outcome_label(outcome, answer)].inc()
        p = outcome.request.policy
        token = self.tokens.encode(TOKEN_QUERY, [p.pool_type, p.pool_id, p.feature_code, p.period.start, outcome.used])
        return Increment(answer, token)

    # ------------------------------------------------------------ CheckQuota

    def _token(self, token: str) -> tuple[repository.PeriodKey, int] | None:
        if not token:
            return None
        try:
            c = self.tokens.decode(token, TOKEN_QUERY)
        except InvalidArgument:
            raise InvalidArgument("consistency_token is malformed or was altered") from None
        if c is None or len(c) != 5:
            raise InvalidArgument("consistency_token is malformed")
        return (str(c[0]), str(c[1]), str(c[2]), int(c[3])), int(c[4])

    async def check_quota(self, subject: SubjectIds, feature_code: str, token: str, timeout: float) -> list[Quota]:
        """One feature, or every metered feature the subject is entitled to."""
        deadline = time.monotonic() + timeout
        seen = self._token(token)
        if feature_code:
            policies = [await self.policy(subject, self._metered(feature_code), timeout)]
        else:
            policies = []
            for code in sorted(self.facts.metered):
                try:
                    policies.append(await self.policy(subject, code, max(0.05, deadline - time.monotonic())))
                except FailedPrecondition:
                    continue
        period_keys = [(p.pool_type, p.pool_id, p.feature_code, p.period.start) for p in policies]
        used, members = await self._read(policies, period_keys, deadline)
        quotas = []
        for p, key, u, m in zip(policies, period_keys, used, members, strict=True):
            if seen is not None and seen[0] == key:
                u = max(u, seen[1])
            quotas.append(Quota(p.feature_code, u, p.limit, model.remaining(p.limit, u, p.member_cap, m),
                                p.period, p.hard))
        return quotas

    async def _read(
        self, policies: Sequence[Policy], period_keys: Sequence[repository.PeriodKey], deadline: float
    ) -> tuple[list[int], list[int]]:
        """Pool and member counters from Redis; from Postgres (members: 0) when Redis is
        down or not rebuilt."""
        if not policies:
            return [], []
        keys = [self.counters.keys.of(p) for p in policies]
        flat = [k[0] for k in keys] + [k[1] or k[0] for k in keys]
        values: list[int] | None = None
        try:
            async with asyncio.timeout(max(0.01, min(QUOTA_READ_TIMEOUT_S, deadline - time.monotonic()))):
                values = await self.counters.read(flat)
        except Exception as exc:
            if not _redis_down(exc):
                raise
        if values is not None:
            _QUOTA_READS_REDIS.inc()
            GO_CACHE_HITS.inc()
            n = len(policies)
            members = [values[n + i] if keys[i][1] is not None else 0 for i in range(n)]
            return values[:n], members
        _QUOTA_READS_POSTGRES.inc()
        GO_CACHE_MISSES.inc()
        used = await self.store.used(period_keys, max(0.05, deadline - time.monotonic()))
        return used, [0] * len(policies)

    # ------------------------------------------------------------ ListUsage

    async def list_usage(
        self, subject: SubjectIds, feature_code: str, page_size: int, token: str, timeout: float
    ) -> UsagePage:
        if feature_code:
            decisions.require_known(feature_code, self.facts.known)
        subjects = subject.keys()
        fingerprint = query_fingerprint("usage", {"s": subjects, "f": feature_code})
        after = self.tokens.decode(token, fingerprint)
        if after is not None and len(after) != 4:
            raise InvalidArgument("page_token is malformed")
        rows = await self.store.list_usage(subjects, feature_code or None, after, page_size + 1, timeout)
        more = len(rows) > page_size
        rows = rows[:page_size]
        next_token = ""
        if more and rows:
            last = rows[-1]
            cursor = [int(last["period_start"]), last["feature_code"], last["subject_type"], last["subject_id"]]
            next_token = self.tokens.encode(fingerprint, cursor)
        return UsagePage(rows, next_token)
