"""The dunning projection: payment-events -> dunning_cases.

It implements shared/projection.py's contract; shared/worker.py runs it. `apply` loads the
cases of the batch's invoices and subscriptions in one query, folds the events in order
with the pure handlers (handlers.py), and upserts the cases that changed. The scheduler's
decisions are events on the same topic, so the table is a pure function of the log.

The batch's notices (case opened, retry scheduled, attempt failed, recovered, closed)
are staged in the transactional outbox (shared/outbox.py) in the same transaction as the
cases, and `after_commit` asks the relay to publish them on dunning-events. So they are
published at least once: a crash or a broker failure between the commit and the publish
only delays them (the service's background relay retries). Never in replay, and not at
all when the projection has no relay. Their ids are stable, so a consumer deduplicates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

from payment.v1 import events_pb2
from services.dunning import handlers, repository
from services.dunning.events import notice_event
from services.dunning.model import Notice, Outcome, State
from shared.catalog import Catalog
from shared.metrics import DUNNING_NOTICE_FAILURES
from shared.outbox import OutboxRelay, stage
from shared.projection import ApplyContext, Envelope, PoisonEvent, decode_payment_event

log = logging.getLogger(__name__)

PaymentEnvelope = Envelope[events_pb2.PaymentEvent]


@dataclass(frozen=True)
class DunningBatch:
    """What `apply` hands to `after_commit`."""

    notices: tuple[Notice, ...]


class DunningProjection:
    """Projection[PaymentEvent] named "dunning"; see the module docstring."""

    name = "dunning"

    def __init__(self, catalog: Catalog, relay: OutboxRelay | None) -> None:
        self._catalog = catalog
        self._relay = relay

    def decode(
        self, value: bytes, headers: dict[str, bytes]
    ) -> tuple[str, str, events_pb2.PaymentEvent]:
        """(event_id, event_type, event); ValueError if it is no PaymentEvent we can key."""
        return decode_payment_event(value)

    async def apply(
        self, conn: AsyncConnection[Any], events: list[PaymentEnvelope], ctx: ApplyContext
    ) -> DunningBatch:
        """Apply `events` in order inside the caller's transaction. Raises PoisonEvent for an
        event the handlers reject; database errors propagate as transient."""
        relevant = [e for e in events if e.event_type in handlers.HANDLERS]
        if not relevant:
            return DunningBatch(())
        invoices = {e.message.invoice_id for e in relevant} - {""}
        subscriptions = {
            e.message.subscription_id
            for e in relevant
            if e.event_type == "customer.subscription.deleted"
        } - {""}
        before = await repository.load_state(conn, invoices, subscriptions)
        after = before.copy()
        notices: list[Notice] = []
        traces: dict[str, str] = {}  # invoice id -> traceparent of the event that last changed it
        causes: dict[str, str] = {}  # event id -> its traceparent, for the notices it made
        for envelope in relevant:
            outcome = self._outcome(envelope, after)
            after.apply(outcome.cases)
            notices += outcome.notices
            traces.update((case.invoice_id, envelope.traceparent) for case in outcome.cases)
            causes[envelope.event_id] = envelope.traceparent
        await repository.save(conn, repository.changed(before, after), traces)
        if notices and self._relay is not None and not ctx.replay:
            await stage(conn, self.name, [notice_event(n).SerializeToString() for n in notices],
                        [causes.get(n.source_event_id, "") for n in notices])
        return DunningBatch(tuple(notices))

    def _outcome(self, envelope: PaymentEnvelope, state: State) -> Outcome:
        try:
            return handlers.apply(envelope.message, state, self._catalog)
        except handlers.InvalidEvent as exc:
            # The event breaks the contract: it would fail on every retry. Poison.
            # Any other exception is a bug of ours: it propagates and stops the line
            # (shared/consumer.py) instead of draining events of that type to the DLQ.
            raise PoisonEvent(envelope.event_id, f"{type(exc).__name__}: {exc}") from exc

    async def after_commit(self, result: DunningBatch | None, ctx: ApplyContext) -> None:
        """Publish the staged notices (live only). Never raises: see the module docstring."""
        if result is None or not result.notices or ctx.replay or self._relay is None:
            return
        try:
            await self._relay.flush()
        except Exception as exc:
            DUNNING_NOTICE_FAILURES.inc(len(result.notices))
            log.warning(
                "could not publish dunning notices yet; the outbox keeps them",
                extra={"notices": len(result.notices), "error": f"{type(exc).__name__}: {exc}"},
            )
