"""The dunning scheduler: the only part of the service with side effects (live only).

Every tick it finds the cases whose next step is due and takes that step:

* a retry (`attempt-N`): ask Stripe to pay the invoice (Invoice.pay, idempotency key
  `dunning-{case_id}-{N}`), behind a circuit breaker, then publish dunning.attempt_made.
  The pay call's answer is not the outcome: the webhooks that follow (invoice.paid,
  invoice.payment_failed) move the case. A decline is still an attempt made.
* `escalate` (retries ran out, grace over): publish dunning.escalated with the policy's
  `escalate_to`; the entitlements worker suspends the subscription. An escalated case
  is still retried at a slow pace (handlers.next_attempt_at).
* `restore` (an escalated case was paid since): publish dunning.restored; the
  entitlements worker makes the subscription active again.

Each step also goes out on dunning-events (ATTEMPT_MADE, ESCALATED).

Exactly once across replicas
----------------------------
The claim is durable rather than a row lock held across the Stripe call. In one short
transaction the scheduler selects the due cases `FOR UPDATE SKIP LOCKED` (so replicas
split the work instead of queueing on each other) and inserts one row per step into
`dunning_steps`, whose primary key (case_id, step) admits each step once; then it
commits and only then calls Stripe and publishes. Holding the row lock during the call
instead would keep a transaction (and a pooled connection) open for as long as Stripe
takes, block the projection's upsert of that very case, and lose the claim on a crash
anyway. With the ledger, a replica that crashes after its claim leaves a row that
expires at `claimed_until`; another replica then takes the step over with the same
idempotency key, so Stripe does not charge twice. The step is marked published once the
broker acknowledged the decision; the case is left out of later ticks until the
projection has applied it (its attempt_count moved past the step).

A Stripe outage (breaker open, connection error, 5xx, rate limit) releases the claim:
the attempt is not burned, nothing is published, and the case is due again next tick.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import stripe
from psycopg_pool import AsyncConnectionPool

from payment.v1 import events_pb2
from services.dunning import repository
from services.dunning.events import Publisher, decision_event, decision_notice
from services.dunning.handlers import policy_for
from services.dunning.model import ATTEMPT_MADE, ESCALATED, RESTORED, Case, Version
from services.dunning.repository import DueCase
from shared import tracing
from shared.breaker import Breaker, BreakerOpen
from shared.catalog import Catalog, DunningPolicy
from shared.metrics import DUNNING_BREAKER_OPEN, DUNNING_STEPS

log = logging.getLogger(__name__)
BREAKER = "stripe-invoices"


class StripeUnavailable(Exception):
    """Stripe could not be asked (outage, 5xx, rate limit): the attempt did not happen."""


@dataclass(frozen=True, slots=True)
class PayResult:
    """Stripe's immediate answer. Informational: webhooks decide the case."""

    paid: bool
    error: str = ""


class InvoicePayer(Protocol):
    async def pay(self, invoice_id: str, idempotency_key: str) -> PayResult:
        """Ask Stripe to pay the invoice now. Raises StripeUnavailable on an outage."""


class StripeInvoices:
    """InvoicePayer through the official SDK. No network retries of its own: the
    schedule is the retry, and a hung call must not hold the tick."""

    def __init__(self, api_key: str, api_base: str = "", timeout_s: float = 20.0) -> None:
        http = stripe.RequestsClient(timeout=timeout_s) if _has_requests() else None
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=0,
            http_client=http,
        )

    async def pay(self, invoice_id: str, idempotency_key: str) -> PayResult:
        try:
            invoice = await asyncio.to_thread(
                self._client.v1.invoices.pay,
                invoice_id,
                options={"idempotency_key": idempotency_key},
            )
        except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
            raise StripeUnavailable(type(exc).__name__) from exc
        except stripe.StripeError as exc:
            status = exc.http_status or 0
            if status >= 500 or status == 0:
                raise StripeUnavailable(f"{type(exc).__name__} {status}") from exc
            # A decline, or an invoice that cannot be paid (already paid, voided): Stripe
            # answered, the attempt happened; its webhooks tell what it means.
            return PayResult(False, (exc.user_message or str(exc))[:500])
        return PayResult(getattr(invoice, "status", "") == "paid")


def _has_requests() -> bool:
    try:
        import requests  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class SchedulerConfig:
    interval_s: float = 30.0
    batch_size: int = 20
    claim_ttl_s: int = 600  # longer than a Stripe call and a publish can take
    breaker_threshold: int = 3  # consecutive outages that open the breaker
    breaker_ttl_s: float = 30.0  # how long it stays open before one trial call
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")


@dataclass
class TickReport:
    """What one tick did, by step: for tests and logs."""

    attempts: list[str] = field(default_factory=list)  # case ids retried
    escalations: list[str] = field(default_factory=list)
    restorations: list[str] = field(default_factory=list)
    skipped_unavailable: list[str] = field(default_factory=list)
    publish_failed: list[str] = field(default_factory=list)
    released_on_stop: int = 0  # claimed, not taken: the service was stopping


@dataclass(frozen=True, slots=True)
class Step:
    name: str  # attempt-N, escalate, restore
    after_attempts: int
    attempt: int = 0


def next_step(case: DueCase, policy: DunningPolicy) -> Step | None:
    """The step a due case is waiting for; None if there is nothing to do."""
    if case.state == "recovered":
        return Step("restore", case.attempt_count)
    if case.attempt_count < len(policy.retry_after_days) or case.state == "escalated":
        attempt = case.attempt_count + 1
        return Step(f"attempt-{attempt}", case.attempt_count, attempt)
    if policy.escalate_after_last:
        return Step("escalate", case.attempt_count)
    return None


class Scheduler:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        payer: InvoicePayer,
        publisher: Publisher,
        catalog: Catalog,
        *,
        clock: Callable[[], float] = time.time,
        config: SchedulerConfig | None = None,
        breaker_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._payer = payer
        self._publisher = publisher
        self._catalog = catalog
        self._clock = clock
        self.config = config or SchedulerConfig()
        # Only an outage counts against the breaker: a decline is an answer from Stripe.
        self.breaker = Breaker(
            BREAKER,
            lambda exc: isinstance(exc, StripeUnavailable),
            threshold=self.config.breaker_threshold,
            reset_after_s=self.config.breaker_ttl_s,
            clock=breaker_clock,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every `interval_s` until `stop`. A failing tick (database down) is logged
        and retried next time: nothing it claimed is lost (claims expire)."""
        while not stop.is_set():
            try:
                await self.tick(stop)
            except Exception as exc:
                log.warning(
                    "dunning tick failed; retrying next interval",
                    extra={"error": f"{type(exc).__name__}: {str(exc)[:200]}"},
                )
            try:
                await asyncio.wait_for(stop.wait(), self.config.interval_s)
            except TimeoutError:
                pass

    async def tick(self, stop: asyncio.Event | None = None) -> TickReport:
        """Claim the due steps, then take them one by one. Returns what was done.

        `stop` is checked before each Stripe call: once set, the steps not taken yet
        are released (another replica, or the next start, takes them at once) and the
        tick returns, so a shutdown waits for one call at most, not a whole batch.
        """
        now = int(self._clock())
        report = TickReport()
        claimed = await self._claim(now)
        for n, (case, step) in enumerate(claimed):
            if stop is not None and stop.is_set():
                for left_case, left_step in claimed[n:]:
                    await self._release(left_case, left_step)
                report.released_on_stop = len(claimed) - n
                break
            await self._take(case, step, now, report)
        return report

    async def _claim(self, now: int) -> list[tuple[DueCase, Step]]:
        until = now + self.config.claim_ttl_s
        claimed: list[tuple[DueCase, Step]] = []
        async with self._pool.connection() as conn, conn.transaction():
            due = await repository.due_cases(conn, "due_cases", now, self.config.batch_size)
            due += await repository.due_cases(conn, "cases_to_restore", now, self.config.batch_size)
            for case in due:
                step = next_step(case, self._policy(case))
                if step is None:
                    continue
                if await repository.claim_step(
                    conn, case.case_id, step.name, step.after_attempts, self.config.owner, now, until
                ):
                    claimed.append((case, step))
        return claimed

    def _policy(self, case: DueCase) -> DunningPolicy:
        return policy_for(_as_case(case), self._catalog)

    async def _take(self, case: DueCase, step: Step, now: int, report: TickReport) -> None:
        # A step continues the trace of the event that last changed its case (stored with
        # the case), so one failed invoice's retries, escalation and restore are one trace.
        with tracing.continued(case.traceparent), tracing.tracer().start_as_current_span(
            f"dunning {step.name.split('-')[0]}"
        ) as span:
            if span.is_recording():
                span.set_attribute("dunning.case_id", case.case_id)
                span.set_attribute("dunning.step", step.name)
            await self._take_step(case, step, now, report)

    async def _take_step(self, case: DueCase, step: Step, now: int, report: TickReport) -> None:
        kind = step.name.split("-")[0]
        error = ""
        if kind == "attempt":
            try:
                result = await self._pay(case, step)
            except (StripeUnavailable, BreakerOpen) as exc:
                await self._release(case, step)
                DUNNING_STEPS.labels(kind, "stripe_unavailable").inc()
                report.skipped_unavailable.append(case.case_id)
                log.info("Stripe unavailable; attempt postponed",
                         extra={"case_id": case.case_id, "step": step.name, "error": str(exc)})
                return
            error = result.error
            if error:
                DUNNING_STEPS.labels(kind, "declined").inc()
        decision, notice = self._messages(case, step, now, error)
        try:
            await self._publisher.decision(decision)
            if notice is not None:
                await self._publisher.notices([notice])
        except Exception as exc:
            # The claim stays: it expires and the step is retried with the same
            # idempotency key and event ids, which Stripe and the inboxes deduplicate.
            DUNNING_STEPS.labels(kind, "publish_failed").inc()
            report.publish_failed.append(case.case_id)
            log.warning("could not publish a dunning decision; it is retried once the claim expires",
                        extra={"case_id": case.case_id, "step": step.name, "error": f"{type(exc).__name__}: {exc}"})
            return
        async with self._pool.connection() as conn:
            await repository.mark_published(conn, case.case_id, step.name, self.config.owner, now)
        DUNNING_STEPS.labels(kind, "published").inc()
        {"attempt": report.attempts, "escalate": report.escalations, "restore": report.restorations}[
            kind
        ].append(case.case_id)

    async def _pay(self, case: DueCase, step: Step) -> PayResult:
        try:
            return await self.breaker.call(
                lambda: self._payer.pay(case.invoice_id, f"dunning-{case.case_id}-{step.attempt}")
            )
        finally:
            DUNNING_BREAKER_OPEN.set(1 if self.breaker.state == "opened" else 0)

    async def _release(self, case: DueCase, step: Step) -> None:
        async with self._pool.connection() as conn:
            await repository.release_step(conn, case.case_id, step.name, self.config.owner)

    def _messages(
        self, case: DueCase, step: Step, now: int, error: str
    ) -> tuple[events_pb2.PaymentEvent, events_pb2.DunningEvent | None]:
        """The decision for payment-events and its notice for dunning-events. A restore
        has no notice of its own: the projection announced RECOVERED with the payment."""
        if step.name == "escalate":
            status = self._policy(case).escalate_to
            reason = f"dunning: {case.attempt_count} retries failed"
            return (
                decision_event(ESCALATED, case, now, status=status, reason=reason),
                decision_notice("ESCALATED", case, now, attempt=case.attempt_count, state="escalated"),
            )
        if step.name == "restore":
            reason = "dunning: the escalated invoice was paid"
            return decision_event(RESTORED, case, now, status="active", reason=reason), None
        return (
            decision_event(ATTEMPT_MADE, case, now, attempt=step.attempt, error=error),
            decision_notice("ATTEMPT_MADE", case, now, attempt=step.attempt, state="retrying", error=error),
        )


def _as_case(case: DueCase) -> Case:
    """Enough of a Case for policy_for (which reads the plan only)."""
    return Case(
        case.case_id, case.invoice_id, case.customer_id, case.subscription_id, case.user_id,
        case.family_id, case.plan_id, case.price_id, case.state, case.attempt_count, None, None,
        case.amount_due, case.currency, 0, None, None, None, None, Version(0, ""),
    )
