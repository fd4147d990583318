"""`paymentsvc backfill`: publish Stripe's current state to `payment-events`, once, at cut-over.

The projections otherwise start empty: a subscriber has nothing until Stripe happens to
send an event about them. The backfill reads, per customer, with the `stripe` SDK:

- every subscription (``status=all``), with its items and periods;
- the invoices and charges created in the last ``recent_days`` days;

and publishes each object as one *snapshot event*: the Stripe event type that states the
object as it is now (:func:`snapshot_type`), built as a Stripe event envelope around the
object and normalized by the ingester's own :func:`normalize`, so Stripe's shapes are
translated in one place. The customer object read from the list is put in place of the
objects' ``customer`` id, as if Stripe had expanded it, so its metadata (user_id,
family_id) reaches every event.

Ids and order
-------------
* The event id is ``backfill:<object id>:<digest>``, the digest taken over the normalized
  event without its id and time. The same state read twice gives the same id, so a second
  run changes nothing (the workers' inbox skips a known id); a changed object gets a new
  id.
* The event's ``created`` is a second no later than the read, on Stripe's clock like
  every event's ``created``: the answer's ``Date`` header minus the request's round trip,
  rounded up (about one second before the answer). The projections keep the newest
  ``(created, event_id)``: a webhook created before that second is older, and the
  snapshot (which already contains its change) wins; a webhook of a change after the
  read has a ``created`` at or after it and wins, also on a tie, because ``backfill:``
  sorts before Stripe's ``evt_``. (Within that second a webhook from just before the read
  wins too; it is the state of that moment, and every later change has its own webhook.)
* ``source`` is ``EVENT_SOURCE_STRIPE_BACKFILL``.

Runs and resumption
-------------------
Customers are read in pages (``starting_after``). With ``apply``, after every page the
events of its customers are published (acks=all) and then the page's last customer id is
written to the checkpoint file. A run that stops (Ctrl-C, Stripe or the broker down) is
resumed by running it again: it starts after the checkpointed customer. A finished run
deletes the checkpoint, so the next run starts from the first customer. A dry run reads
everything, publishes nothing and never touches the checkpoint.

Rate limits: a 429 (``RateLimitError``), a connection error or a 5xx is retried with
exponential backoff (``Backoff``); when the retries run out the run stops with
``DependencyUnavailable`` and the checkpoint says where to resume.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol

import stripe
from aiokafka.errors import KafkaError

from payment.v1 import events_pb2
from services.ingest_webhooks.handlers import payment_event_message
from services.ingest_webhooks.normalize import MalformedEvent, normalize
from shared.config import Topics
from shared.errors import ConfigurationError, DependencyUnavailable
from shared.kafka import OutgoingMessage, PublishFailed, make_producer, publish_all

log = logging.getLogger(__name__)

ID_PREFIX = "backfill:"  # sorts before Stripe's "evt_": a same-second webhook wins the tie
PAGE_SIZE = 100  # Stripe's largest page
MAX_CONCURRENCY = 32
DAY = 86_400
FIRST_PROBLEMS_SHOWN = 3


# --- what a snapshot says -------------------------------------------------------------


def snapshot_type(object_type: str, obj: dict[str, Any]) -> str | None:
    """The Stripe event type that states `obj` as it is now; None when no projected event
    type does (a draft or void invoice, a pending charge): such objects are skipped."""
    status = obj.get("status")
    if object_type == "subscription":
        # Stripe sends .deleted when a subscription ends; the dunning worker closes its cases on it.
        return "customer.subscription.deleted" if status == "canceled" else "customer.subscription.updated"
    if object_type == "invoice":
        if status == "paid":
            return "invoice.paid"
        if status == "open" and (obj.get("attempted") or (obj.get("attempt_count") or 0) > 0):
            return "invoice.payment_failed"  # attempted and still open: its payment failed
        return None
    if object_type == "charge":
        if status == "succeeded":
            return "charge.refunded" if (obj.get("amount_refunded") or 0) > 0 else "charge.succeeded"
        return "charge.failed" if status == "failed" else None
    raise ValueError(f"no snapshot for a {object_type!r}")


def snapshot(
    event_type: str, obj: dict[str, Any], customer: dict[str, Any] | None, read_at: int, api_version: str
) -> events_pb2.PaymentEvent:
    """The normalized snapshot event of `obj` as read at `read_at` (Stripe's clock).

    Raises MalformedEvent when the normalizer cannot read the object.
    """
    data = dict(obj)
    if customer is not None and data.get("customer") == customer.get("id"):
        data["customer"] = customer  # as if expanded: its metadata names the user and family
    envelope = {
        "id": ID_PREFIX + "pending",
        "object": "event",
        "type": event_type,
        "created": read_at,
        "api_version": api_version or None,
        "livemode": bool(obj.get("livemode", False)),
        "data": {"object": data},
    }
    event = normalize(envelope)
    if event is None:  # snapshot_type only names projected types
        raise AssertionError(f"{event_type} is not a projected type")
    event.source = events_pb2.EVENT_SOURCE_STRIPE_BACKFILL
    event.event_id = snapshot_id(event)
    return event


def snapshot_id(event: events_pb2.PaymentEvent) -> str:
    """`backfill:<object id>:<digest of the event without its id and time>`."""
    stateless = events_pb2.PaymentEvent()
    stateless.CopyFrom(event)
    stateless.ClearField("event_id")
    stateless.ClearField("created")
    digest = hashlib.sha256(stateless.SerializeToString(deterministic=True)).hexdigest()[:24]
    return f"{ID_PREFIX}{event.object_id}:{digest}"


# --- reading Stripe -------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """One list response: its objects as Stripe sent them, and when Stripe answered."""

    objects: list[dict[str, Any]]
    has_more: bool
    read_at: int
    api_version: str = ""


class StripeState(Protocol):
    """The reads the backfill makes; `StripeReader` is the SDK adapter."""

    retries: int  # reads retried after a rate limit or a transient error, for the report

    async def customers(self, starting_after: str | None, limit: int) -> Page: ...

    async def customer(self, customer_id: str) -> Page: ...

    async def objects(self, kind: str, customer_id: str, starting_after: str | None, limit: int) -> Page: ...


@dataclass(frozen=True)
class Backoff:
    """Retries of a rate-limited or failed read: first_s, doubled up to max_s, with jitter."""

    first_s: float = 0.5
    max_s: float = 30.0
    attempts: int = 8

    def delay(self, attempt: int) -> float:
        base = min(self.max_s, self.first_s * 2**attempt)
        return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, stripe.RateLimitError | stripe.APIConnectionError):
        return True
    return isinstance(exc, stripe.StripeError) and (exc.http_status or 0) >= 500


_LISTS = {"subscription": "subscriptions", "invoice": "invoices", "charge": "charges"}


class StripeReader:
    """`StripeState` over the `stripe` SDK (aiohttp), with its own retries on 429 and 5xx.

    The SDK's retries are off: it does not retry a plain 429, and one policy is easier to
    reason about.
    """

    def __init__(
        self,
        client: stripe.StripeClient,
        backoff: Backoff = Backoff(),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        where: str = "https://api.stripe.com",
    ) -> None:
        self._client = client
        self._backoff = backoff
        self._sleep = sleep
        self._where = where
        self.retries = 0

    @classmethod
    def connect(cls, secret_key: str, api_base: str = "", backoff: Backoff = Backoff()) -> StripeReader:
        kwargs: dict[str, Any] = {"base_addresses": {"api": api_base}} if api_base else {}
        client = stripe.StripeClient(secret_key, http_client=stripe.AIOHTTPClient(), max_network_retries=0, **kwargs)
        return cls(client, backoff, where=api_base or "https://api.stripe.com")

    async def close(self) -> None:
        http = getattr(getattr(self._client, "_requestor", None), "_client", None)
        if http is not None and hasattr(http, "close_async"):
            await http.close_async()

    async def customers(self, starting_after: str | None, limit: int) -> Page:
        params: dict[str, Any] = {"limit": limit}
        if starting_after:
            params["starting_after"] = starting_after
        try:
            return await self._list(lambda: self._client.v1.customers.list_async(params))  # type: ignore[arg-type]
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404 and starting_after:
                raise ConfigurationError(
                    f"the checkpoint's customer {starting_after} no longer exists in Stripe; delete the "
                    "checkpoint to start over (customers done already are skipped by their ids)"
                ) from None
            raise DependencyUnavailable("stripe", self._where, f"InvalidRequestError: {exc.user_message or exc}") from None

    async def customer(self, customer_id: str) -> Page:
        try:
            found, round_trip = await self._call(lambda: self._client.v1.customers.retrieve_async(customer_id))
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                raise ConfigurationError(f"--customer {customer_id}: no such customer in Stripe") from None
            raise
        response = found.last_response
        assert response is not None  # a retrieve always carries its response
        body = response.data
        gone = isinstance(body, dict) and body.get("deleted")
        return Page([] if gone else [dict(body)], False, self._read_at(response, round_trip), _api_version(response))  # type: ignore[arg-type]

    async def objects(self, kind: str, customer_id: str, starting_after: str | None, limit: int) -> Page:
        params: dict[str, Any] = {"customer": customer_id, "limit": limit}
        if kind == "subscription":
            params["status"] = "all"  # canceled ones too: they end access
        if starting_after:
            params["starting_after"] = starting_after
        service = getattr(self._client.v1, _LISTS[kind])
        try:
            return await self._list(lambda: service.list_async(params))
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:  # the customer was deleted after it was listed
                return Page([], False, 0)
            raise DependencyUnavailable("stripe", self._where, f"InvalidRequestError: {exc.user_message or exc}") from None

    async def _list(self, call: Callable[[], Awaitable[Any]]) -> Page:
        listed, round_trip = await self._call(call)
        response = listed.last_response
        assert response is not None
        body = response.data  # the JSON as Stripe sent it, like a webhook's data.object
        return Page(list(body["data"]), bool(body.get("has_more")), self._read_at(response, round_trip), _api_version(response))

    async def _call(self, call: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
        """The call's result and its round trip in seconds, retried as `Backoff` says."""
        for attempt in range(self._backoff.attempts + 1):
            try:
                started = time.monotonic()
                return await call(), time.monotonic() - started
            except stripe.StripeError as exc:
                if isinstance(exc, stripe.InvalidRequestError) and exc.http_status == 404:
                    raise  # the caller names what was not found
                if not is_retryable(exc):
                    raise DependencyUnavailable(
                        "stripe", self._where, f"{type(exc).__name__}: {exc.user_message or exc}"
                    ) from None
                if attempt == self._backoff.attempts:
                    raise DependencyUnavailable(
                        "stripe", self._where, f"{type(exc).__name__} after {attempt + 1} attempts",
                        hint="run the same command again later: with --apply it resumes after its checkpoint",
                    ) from None
                self.retries += 1
                delay = self._backoff.delay(attempt)
                log.warning("stripe answered %s; retrying in %.1f s", type(exc).__name__, delay)
                await self._sleep(delay)
        raise AssertionError("unreachable")

    def _read_at(self, response: Any, round_trip: float) -> int:
        """A second on Stripe's clock (the clock of every event's `created`) no later than
        the read: the answer's Date header (whole seconds, so at most the answer's time)
        minus the round trip, rounded up. Stripe read the objects at some point of that
        round trip, so every change after the read has a `created` at or after this."""
        date = _header(response, "date")
        if not date:
            raise DependencyUnavailable("stripe", self._where, "an answer without a Date header: no time to order the snapshot by")
        return int(parsedate_to_datetime(date).timestamp()) - math.ceil(round_trip)


def _api_version(response: Any) -> str:
    return _header(response, "stripe-version")


def _header(response: Any, name: str) -> str:
    for key, value in response.headers.items():
        if key.lower() == name:
            return str(value)
    return ""


# --- a run ----------------------------------------------------------------------------


@dataclass
class Report:
    """What a run read and published, and what it left out, and why."""

    customers: int = 0
    customers_without_state: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # "invoice draft" -> n
    unnormalizable: dict[str, str] = field(default_factory=dict)  # object id -> reason
    resumed_after: str | None = None
    retries: int = 0
    finished: bool = False

    @property
    def events(self) -> int:
        return sum(self.by_type.values())

    def lines(self, applied: bool, topic: str) -> list[str]:
        counts = ", ".join(f"{kind} {n}" for kind, n in sorted(self.by_type.items())) or "-"
        lines = []
        if self.resumed_after:
            lines.append(f"resumed after customer {self.resumed_after} (the checkpoint of an unfinished run)")
        lines.append(
            f"read {self.customers} customer(s), {self.customers_without_state} with nothing to publish; "
            f"snapshots: {counts}"
        )
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{what} {n}" for what, n in sorted(self.skipped.items())))
        if self.unnormalizable:
            shown = "; ".join(f"{oid}: {why}" for oid, why in list(self.unnormalizable.items())[:FIRST_PROBLEMS_SHOWN])
            lines.append(f"unnormalizable: {len(self.unnormalizable)} (not published), e.g. {shown}")
        if self.retries:
            lines.append(f"retried {self.retries} Stripe read(s) after a rate limit or error")
        verb = "published" if applied else "would publish"
        tail = "" if applied else " (dry run: nothing published; --apply publishes)"
        lines.append(f"{verb} {self.events} snapshot event(s) to {topic}{tail}")
        return lines


Progress = Callable[[Report], None]


class Checkpoint:
    """The last customer whose snapshots the broker acknowledged, in a file.

    Written (atomically, by rename) after every published page; deleted when a run ends.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> str | None:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return None
        if not text.startswith("cus_"):
            raise ConfigurationError(f"checkpoint {self.path} holds no customer id; delete it to start over")
        return text

    def write(self, customer_id: str) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(customer_id + "\n")
        tmp.replace(self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class Sink(Protocol):
    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        """Return once the broker acknowledged every message; else raise DependencyUnavailable."""


@dataclass(frozen=True)
class Options:
    apply: bool = False
    customer_id: str | None = None
    recent_days: int = 90
    page_size: int = PAGE_SIZE
    # Customers of a page read at once. Reads are latency-bound (~100-300 ms each on the
    # real API); 8 at once stays well under Stripe's live limit of 100 requests/s.
    concurrency: int = 8

    def __post_init__(self) -> None:
        if self.customer_id is not None and not self.customer_id.startswith("cus_"):
            raise ConfigurationError(f"--customer must be a Stripe customer id (cus_...), not {self.customer_id!r}")
        if self.recent_days < 0:
            raise ConfigurationError(f"--recent-days must be 0 or more, not {self.recent_days}")
        if not 1 <= self.page_size <= PAGE_SIZE:
            raise ConfigurationError(f"--page-size must be within 1..{PAGE_SIZE}, not {self.page_size}")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ConfigurationError(f"--concurrency must be within 1..{MAX_CONCURRENCY}, not {self.concurrency}")


async def backfill(
    state: StripeState,
    sink: Sink | None,
    topics: Topics,
    options: Options,
    *,
    checkpoint: Checkpoint | None = None,
    progress: Progress | None = None,
    now: int,
) -> Report:
    """Read every customer (or `options.customer_id`) and, with `options.apply`, publish
    their snapshots through `sink`; returns what was found.

    `now` (Unix seconds) only bounds "recent" invoices and charges. The checkpoint is read
    and written only when applying to every customer.
    """
    if options.apply and sink is None:
        raise ValueError("applying needs a sink")
    report = Report()
    since = now - options.recent_days * DAY
    resumable = options.apply and options.customer_id is None and checkpoint is not None
    after = checkpoint.read() if resumable and checkpoint is not None else None
    report.resumed_after = after
    while True:
        if options.customer_id is not None:
            page = await state.customer(options.customer_id)
        else:
            page = await state.customers(after, options.page_size)
        messages = [
            payment_event_message(e, topics)
            for events in await _read_page(state, page.objects, since, options, report, progress)
            for e in events
        ]
        if options.apply and messages and sink is not None:
            await sink.publish(messages)
        if not page.objects or not page.has_more or options.customer_id is not None:
            break
        after = str(page.objects[-1]["id"])
        if resumable and checkpoint is not None:
            checkpoint.write(after)  # only after the page's events were acknowledged
    if resumable and checkpoint is not None:
        checkpoint.clear()
    report.retries = state.retries
    report.finished = True
    return report


async def _read_page(
    state: StripeState,
    customers: Sequence[dict[str, Any]],
    since: int,
    options: Options,
    report: Report,
    progress: Progress | None,
) -> list[list[events_pb2.PaymentEvent]]:
    """Each customer's snapshots, in page order; up to `options.concurrency` read at once.
    The first failure cancels the other reads and is raised as itself."""
    gate = asyncio.Semaphore(options.concurrency)

    async def one(customer: dict[str, Any]) -> list[events_pb2.PaymentEvent]:
        async with gate:
            events = await _customer_snapshots(state, customer, since, options.page_size, report)
        report.customers += 1
        if not events:
            report.customers_without_state += 1
        if progress is not None:
            progress(report)
        return events

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(customer)) for customer in customers]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None  # the operator's one-line error, not a group
    return [task.result() for task in tasks]


async def _customer_snapshots(
    state: StripeState, customer: dict[str, Any], since: int, page_size: int, report: Report
) -> list[events_pb2.PaymentEvent]:
    events: list[events_pb2.PaymentEvent] = []
    customer_id = str(customer["id"])
    for kind in ("subscription", "invoice", "charge"):
        recent_only = kind != "subscription"
        after: str | None = None
        while True:
            page = await state.objects(kind, customer_id, after, page_size)
            for obj in page.objects:
                if recent_only and (obj.get("created") or 0) < since:
                    continue
                event = _snapshot_or_report(kind, obj, customer, page, report)
                if event is not None:
                    events.append(event)
                    report.by_type[event.event_type] += 1
            older = recent_only and page.objects and all((o.get("created") or 0) < since for o in page.objects)
            # Stripe lists newest first: a page wholly older than `since` ends the recent ones.
            if not page.has_more or not page.objects or older:
                break
            after = str(page.objects[-1]["id"])
    return events


def _snapshot_or_report(
    kind: str, obj: dict[str, Any], customer: dict[str, Any], page: Page, report: Report
) -> events_pb2.PaymentEvent | None:
    event_type = snapshot_type(kind, obj)
    if event_type is None:
        report.skipped[f"{kind} {obj.get('status') or 'without status'}"] += 1
        return None
    try:
        return snapshot(event_type, obj, customer, page.read_at, page.api_version)
    except MalformedEvent as exc:
        report.unnormalizable[str(obj.get("id") or "?")] = str(exc)
        return None


class KafkaSink:
    """Publishes to the broker with the project's producer settings (acks=all)."""

    def __init__(self, bootstrap: str, timeout_s: float = 10.0) -> None:
        self._bootstrap = bootstrap
        self._timeout_s = timeout_s
        self._producer = make_producer(bootstrap)

    async def start(self) -> None:
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            raise DependencyUnavailable("kafka", self._bootstrap, str(exc) or type(exc).__name__) from None

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        try:
            await publish_all(self._producer, messages, self._timeout_s)
        except PublishFailed as exc:
            raise DependencyUnavailable("kafka", self._bootstrap, f"snapshots not acknowledged: {exc}") from None
