"""payment.v1.PaymentService: translation only. Each method validates and unpacks its
request, calls the use case (service.py) and packs the answer. Errors are raised as
domain errors and mapped to status codes by interceptors.CallInterceptor."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeAlias

import grpc

from domain.payments import PAYMENT_STATUSES
from payment.v1 import service_pb2, service_pb2_grpc
from services.api_grpc import validation
from services.api_grpc.commands import NewPayment
from services.api_grpc.context import CALLER
from services.api_grpc.decisions import Decision
from services.api_grpc.errors import InvalidArgument, Unimplemented
from services.api_grpc.queries import PaymentFilter, Row, Watermark
from services.api_grpc.service import PaymentApi
from services.api_grpc.usage import UsageApi
from services.api_grpc.validation import SubjectIds

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
DEFAULT_TIMEOUT_S = 10.0


def _timeout(context: Context) -> float:
    remaining = context.time_remaining()
    return DEFAULT_TIMEOUT_S if remaining is None else max(0.001, remaining)


def _traceparent(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent":
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def _unix(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, datetime):
        return int(value.timestamp())
    return int(value)


def _subject(message: service_pb2.Subject, field: str = "subject") -> SubjectIds:
    return validation.subject(message.user_id, message.family_id, field)


def _freshness_fields(mark: Watermark | None) -> dict[str, Any]:
    if mark is None:
        return {}
    return {"watermark": mark.created, "watermark_event_id": mark.event_id, "lag_ms": mark.lag_ms}


def freshness(mark: Watermark | None) -> service_pb2.Freshness:
    return service_pb2.Freshness(**_freshness_fields(mark))


def _check_fields(
    decision: Decision, feature_code: str, subject: SubjectIds, mark: Watermark | None
) -> dict[str, Any]:
    # Nested messages as dicts: protobuf builds them in place, where a message object
    # passed in is built and then copied (360 -> 210 µs for 50, same bytes;
    # tests/unit/test_api_grpc_units.py). A bulk answer keeps its results' bytes
    # (BulkResults) and builds only the ones it has not seen.
    return {
        "allowed": decision.allowed,
        "reason": decision.reason,
        "plan_id": decision.plan_id,
        "status": decision.status,
        "expires_at": decision.expires_at,
        "access_level": decision.access_level,
        "decided_by_event_id": decision.decided_by_event_id,
        "usage_limit": decision.usage_limit,
        "limit_period": decision.limit_period,
        "freshness": _freshness_fields(mark),
        "feature_code": feature_code,
        "subject": {"user_id": subject.user_id, "family_id": subject.family_id},
        "explanation": {
            "rule": decision.rule, "plan_id": decision.plan_id, "plan_version": decision.plan_version,
            "source": decision.source, "deciding_event_id": decision.decided_by_event_id, "clock": decision.clock,
        },
        "grace_until": decision.grace_until,
    }


def check_response(
    decision: Decision, feature_code: str, subject: SubjectIds, mark: Watermark | None
) -> service_pb2.CheckEntitlementResponse:
    return service_pb2.CheckEntitlementResponse(**_check_fields(decision, feature_code, subject, mark))


class BulkResults:
    """The results of BulkCheckEntitlementsResponse as wire bytes (each a serialized
    response holding that one result; protobuf concatenates repeated fields), kept by what
    it is built from (its Decision, feature code and subject; never a freshness, which a
    bulk answer carries once, outside the results).

    An entry's bytes are a pure function of its key, so an entry cannot go stale: the
    decisions are still made on every call, with the clock (decisions.decide); only the
    building of the same message again is saved. Building 50 results in protobuf was
    about a quarter of the loop's time under bulk load (docs/performance.md, round 4);
    joining kept bytes and letting protobuf parse them once costs a quarter of that.
    Bounded in bytes, not entries: ids may be 255 characters of any script, so one entry
    weighs from about 500 bytes to about 6 KB. An entry is counted as three times its
    framed bytes (the bytes, then the key's strings, which the body repeats: their
    characters and, for text beyond ASCII, the UTF-8 copy CPython keeps in a str once
    protobuf has encoded it) plus ENTRY_OVERHEAD for the tuple, the Decision and the
    dict's slot: an upper bound of what is held (tests/unit/test_api_grpc_units.py checks
    it with tracemalloc, for the heaviest ids). When the next entry would pass `max_bytes`
    (32 MiB by default, beside the near cache's 50,000 subjects), the cache is emptied;
    a hot set refills in one call each."""

    ENTRY_OVERHEAD = 500

    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._framed: dict[tuple[Decision, str, str, str], bytes] = {}

    def __len__(self) -> int:
        return len(self._framed)

    @property
    def counted_bytes(self) -> int:
        """What the entries weigh as counted against `max_bytes`."""
        return self._bytes

    def encode(self, decisions: Sequence[Decision], subjects: Sequence[SubjectIds], codes: Sequence[str]) -> bytes:
        """Field 1 (`results`) of a BulkCheckEntitlementsResponse: `decisions` are the
        subjects x codes, in that order (each subject's codes together)."""
        if len(decisions) != len(subjects) * len(codes):
            raise ValueError(f"{len(decisions)} decisions for {len(subjects)} subjects x {len(codes)} codes")
        framed = self._framed
        parts = []
        decided = iter(decisions)
        for s in subjects:
            user_id, family_id = s.user_id, s.family_id  # the key holds strings: a tuple's hash is C
            for c in codes:
                d = next(decided)
                key = (d, c, user_id, family_id)
                entry = framed.get(key)
                if entry is None:
                    # A response holding this one result: its bytes are field 1 framed, and
                    # such responses concatenate into one with all their results.
                    entry = service_pb2.BulkCheckEntitlementsResponse(
                        results=[_check_fields(d, c, s, None)]).SerializeToString()
                    cost = 3 * len(entry) + self.ENTRY_OVERHEAD
                    if self._bytes + cost > self._max_bytes:
                        framed.clear()
                        self._bytes = 0
                    framed[key] = entry
                    self._bytes += cost
                parts.append(entry)
        return b"".join(parts)


def access_change_message(row: Row) -> service_pb2.AccessChange:
    return service_pb2.AccessChange(
        subscription_id=row["subscription_id"], event_id=row["event_id"], changed_at=int(row["changed_at"]),
        from_level=row["from_level"], to_level=row["to_level"], status=row["status"],
        plan_id=row.get("plan_id") or "", user_id=row.get("user_id") or "", family_id=row.get("family_id") or "",
    )


def payment_message(row: Row) -> service_pb2.Payment:
    return service_pb2.Payment(
        payment_id=row["payment_id"],
        customer_id=row.get("customer_id") or "",
        user_id=row.get("user_id") or "",
        family_id=row.get("family_id") or "",
        amount=int(row.get("amount") or 0),
        currency=row.get("currency") or "",
        status=row.get("status") or "",
        amount_refunded=int(row.get("amount_refunded") or 0),
        payment_intent_id=row.get("payment_intent_id") or "",
        charge_id=row.get("charge_id") or "",
        invoice_id=row.get("invoice_id") or "",
        description=row.get("description") or "",
        failure_code=row.get("failure_code") or "",
        failure_message=row.get("failure_message") or "",
        created_at=_unix(row.get("created_at")),
        updated_at=_unix(row.get("updated_at")),
        last_event_id=row.get("last_event_id") or "",
        last_event_created=_unix(row.get("last_event_created")),
        metadata={str(k): str(v) for k, v in (row.get("metadata") or {}).items()},
    )


def entitlement_message(row: Row) -> service_pb2.Entitlement:
    limit = row["usage_limit"]
    return service_pb2.Entitlement(
        feature_code=row["feature_code"],
        plan_id=row["plan_id"],
        status=row["status"],
        access_level=row["access_level"],
        usage_limit=-1 if limit is None else int(limit),
        limit_period=row["limit_period"],
        granted_at=_unix(row["granted_at"]),
        expires_at=_unix(row["expires_at"]),
        subscription_id=row["source_id"] if row["source_type"] == "subscription" else "",
        user_id=row["user_id"] or "",
        family_id=row["family_id"] or "",
        last_event_id=row["last_event_id"],
    )


def subscription_message(row: Row) -> service_pb2.Subscription:
    return service_pb2.Subscription(
        subscription_id=row["subscription_id"],
        customer_id=row["customer_id"],
        user_id=row["user_id"] or "",
        family_id=row["family_id"] or "",
        plan_id=row["plan_id"] or "",
        price_id=row["price_id"],
        status=row["status"],
        current_period_start=_unix(row["current_period_start"]),
        current_period_end=_unix(row["current_period_end"]),
        cancel_at_period_end=bool(row["cancel_at_period_end"]),
        canceled_at=_unix(row["canceled_at"]),
        trial_end=_unix(row["trial_end"]),
        access_level=row["access_level"],
        last_event_id=row["last_event_id"],
        last_event_created=_unix(row["last_event_created"]),
    )


class PaymentServicer(service_pb2_grpc.PaymentServiceServicer):
    def __init__(self, api: PaymentApi, usage: UsageApi | None = None) -> None:
        self._api = api
        self._usage = usage
        self._bulk_results = BulkResults()

    # ------------------------------------------------------------ entitlements

    async def CheckEntitlement(  # noqa: N802 - generated name
        self, request: service_pb2.CheckEntitlementRequest, context: Context
    ) -> service_pb2.CheckEntitlementResponse:
        subject = _subject(request.subject)
        if not request.HasField("as_of"):
            decision, mark = await self._api.check(subject, request.feature_code, _timeout(context))
            return check_response(decision, request.feature_code, subject, mark)
        past = await self._api.check_as_of(subject, request.feature_code, request.as_of, _timeout(context))
        response = check_response(past.decision, request.feature_code, subject, past.freshness)
        response.evidence_event_ids.extend(past.evidence)
        response.as_of = request.as_of
        return response

    async def BulkCheckEntitlements(  # noqa: N802
        self, request: service_pb2.BulkCheckEntitlementsRequest, context: Context
    ) -> service_pb2.BulkCheckEntitlementsResponse:
        validation.bulk_shape(len(request.subjects), len(request.feature_codes))
        subjects = [_subject(s, f"subjects[{i}]") for i, s in enumerate(request.subjects)]
        codes = list(request.feature_codes)
        results, mark = await self._api.bulk_check(subjects, codes, _timeout(context))
        response = service_pb2.BulkCheckEntitlementsResponse(freshness=_freshness_fields(mark))
        response.MergeFromString(self._bulk_results.encode(results, subjects, codes))
        return response

    async def ListEntitlements(  # noqa: N802
        self, request: service_pb2.ListEntitlementsRequest, context: Context
    ) -> service_pb2.ListEntitlementsResponse:
        subject = _subject(request.subject)
        size = validation.page_size(request.page_size)
        page = await self._api.list_entitlements(subject, size, request.page_token, _timeout(context))
        return service_pb2.ListEntitlementsResponse(
            entitlements=[entitlement_message(r) for r in page.rows],
            next_page_token=page.next_page_token,
            freshness=freshness(page.freshness),
        )

    async def ListSubscriptions(  # noqa: N802
        self, request: service_pb2.ListSubscriptionsRequest, context: Context
    ) -> service_pb2.ListSubscriptionsResponse:
        subject = _subject(request.subject)
        size = validation.page_size(request.page_size)
        page = await self._api.list_subscriptions(subject, size, request.page_token, _timeout(context))
        return service_pb2.ListSubscriptionsResponse(
            subscriptions=[subscription_message(r) for r in page.rows],
            next_page_token=page.next_page_token,
            freshness=freshness(page.freshness),
        )

    async def ListAccessChanges(  # noqa: N802
        self, request: service_pb2.ListAccessChangesRequest, context: Context
    ) -> service_pb2.ListAccessChangesResponse:
        subject = _subject(request.subject)
        size = validation.page_size(request.page_size)
        page = await self._api.list_access_changes(
            subject, request.since, request.until, size, request.page_token, _timeout(context)
        )
        return service_pb2.ListAccessChangesResponse(
            changes=[access_change_message(r) for r in page.rows],
            next_page_token=page.next_page_token,
            freshness=freshness(page.freshness),
        )

    # ------------------------------------------------------------ payments

    async def GetPayment(  # noqa: N802
        self, request: service_pb2.GetPaymentRequest, context: Context
    ) -> service_pb2.GetPaymentResponse:
        row, mark = await self._api.get_payment(request.payment_id, _timeout(context))
        return service_pb2.GetPaymentResponse(payment=payment_message(row), freshness=freshness(mark))

    async def GetPaymentsByCustomer(  # noqa: N802
        self, request: service_pb2.GetPaymentsByCustomerRequest, context: Context
    ) -> service_pb2.ListPaymentsResponse:
        customer_id = validation.identifier(request.customer_id, "customer_id")
        size = validation.page_size(request.page_size)
        where = PaymentFilter(customer_id=customer_id)
        return await self._payments(where, size, request.page_token, context)

    async def ListPayments(  # noqa: N802
        self, request: service_pb2.ListPaymentsRequest, context: Context
    ) -> service_pb2.ListPaymentsResponse:
        size = validation.page_size(request.page_size)
        subject = request.subject
        if subject.user_id or subject.family_id:
            _subject(subject)
        if request.customer_id:
            validation.identifier(request.customer_id, "customer_id")
        after, before = validation.time_range(request.created_after, request.created_before)
        where = PaymentFilter(
            customer_id=request.customer_id or None,
            user_id=subject.user_id or None,
            family_id=subject.family_id or None,
            status=validation.status_filter(request.status, PAYMENT_STATUSES),
            created_after=after,
            created_before=before,
        )
        return await self._payments(where, size, request.page_token, context)

    async def _payments(
        self, where: PaymentFilter, size: int, token: str, context: Context
    ) -> service_pb2.ListPaymentsResponse:
        page = await self._api.list_payments(where, size, token, _timeout(context))
        return service_pb2.ListPaymentsResponse(
            payments=[payment_message(r) for r in page.rows],
            next_page_token=page.next_page_token,
            freshness=freshness(page.freshness),
        )

    async def CreatePayment(  # noqa: N802
        self, request: service_pb2.CreatePaymentRequest, context: Context
    ) -> service_pb2.CreatePaymentResponse:
        subject = request.subject
        if subject.user_id or subject.family_id:
            _subject(subject)
        if request.customer_id:
            validation.identifier(request.customer_id, "customer_id")
        command = NewPayment(
            idempotency_key=validation.identifier(request.idempotency_key, "idempotency_key"),
            user_id=subject.user_id,
            family_id=subject.family_id,
            customer_id=request.customer_id,
            amount=validation.amount(request.amount),
            currency=validation.currency(request.currency),
            description=request.description[:1000],
            metadata=validation.metadata(dict(request.metadata)),
            actor=CALLER.get(),
        )
        created = await self._api.create_payment(command, _traceparent(context), _timeout(context))
        return service_pb2.CreatePaymentResponse(
            payment=payment_message(created.payment), client_secret=created.client_secret
        )

    async def UpdatePaymentStatus(  # noqa: N802
        self, request: service_pb2.UpdatePaymentStatusRequest, context: Context
    ) -> service_pb2.UpdatePaymentStatusResponse:
        event_id = await self._api.update_payment_status(
            request.payment_id,
            request.status,
            request.reason,
            request.idempotency_key,
            CALLER.get(),
            _traceparent(context),
            _timeout(context),
        )
        return service_pb2.UpdatePaymentStatusResponse(event_id=event_id)

    async def CreateCheckoutSession(  # noqa: N802
        self, request: service_pb2.CreateCheckoutSessionRequest, context: Context
    ) -> service_pb2.CreateCheckoutSessionResponse:
        subject = _subject(request.subject)
        if not request.plan_id:
            raise InvalidArgument("plan_id is required")
        if request.customer_id:
            validation.identifier(request.customer_id, "customer_id")
        session_id, url = await self._api.create_checkout_session(
            subject,
            request.plan_id,
            validation.url(request.success_url, "success_url"),
            validation.url(request.cancel_url, "cancel_url"),
            request.customer_id,
            request.idempotency_key,
            _timeout(context),
        )
        return service_pb2.CreateCheckoutSessionResponse(session_id=session_id, url=url)

    # ------------------------------------------------------------ usage (issue 6)

    def _usage_api(self, method: str) -> UsageApi:
        if self._usage is None:
            raise Unimplemented(f"usage quotas (issue 6) are not configured on this server: {method} is unavailable")
        return self._usage

    async def ListUsage(  # noqa: N802
        self, request: service_pb2.ListUsageRequest, context: Context
    ) -> service_pb2.ListUsageResponse:
        usage = self._usage_api("ListUsage")
        subject = _subject(request.subject)
        size = validation.page_size(request.page_size)
        page = await usage.list_usage(subject, request.feature_code, size, request.page_token, _timeout(context))
        return service_pb2.ListUsageResponse(
            periods=[
                service_pb2.UsagePeriod(
                    feature_code=r["feature_code"], period_start=int(r["period_start"]),
                    period_end=int(r["period_end"]), used=int(r["used"]),
                    limit=-1 if r["usage_limit"] is None else int(r["usage_limit"]),
                )
                for r in page.rows
            ],
            next_page_token=page.next_page_token,
        )

    async def IncrementUsage(  # noqa: N802
        self, request: service_pb2.IncrementUsageRequest, context: Context
    ) -> service_pb2.IncrementUsageResponse:
        usage = self._usage_api("IncrementUsage")
        subject = _subject(request.subject)
        done = await usage.increment(
            subject, request.feature_code, request.amount, request.idempotency_key,
            request.metadata, _timeout(context),  # UsageApi copies it, once
        )
        a = done.answer
        return service_pb2.IncrementUsageResponse(
            allowed=a.allowed, used=a.used, limit=a.limit, remaining=a.remaining,
            over_soft_limit=a.over_soft_limit, overage=a.overage, period_start=a.period.start,
            period_end=a.period.end, consistency_token=done.consistency_token, hard_limit=a.hard,
        )

    async def CheckQuota(  # noqa: N802
        self, request: service_pb2.CheckQuotaRequest, context: Context
    ) -> service_pb2.CheckQuotaResponse:
        usage = self._usage_api("CheckQuota")
        subject = _subject(request.subject)
        quotas = await usage.check_quota(subject, request.feature_code, request.consistency_token, _timeout(context))
        return service_pb2.CheckQuotaResponse(
            quotas=[
                service_pb2.Quota(
                    feature_code=q.feature_code, used=q.used, limit=q.limit, remaining=q.remaining,
                    period_start=q.period.start, period_end=q.period.end, hard_limit=q.hard,
                )
                for q in quotas
            ]
        )
