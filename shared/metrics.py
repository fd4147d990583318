"""Every Prometheus metric of the project, declared once with its help text.

Import the metric objects from here; never declare one elsewhere.

Under `paymentsvc serve NAME --processes N` the children share one prometheus_client
multiprocess directory (PROMETHEUS_MULTIPROC_DIR), and the /metrics of whichever child
answers sums the counters and histograms of all of them. Each gauge says how its
children's values combine (`multiprocess_mode`, ignored in a single process), and a
gauge read by a callback is declared with `gauge_function`, so that it is also
written to that directory (a callback is invisible to another process).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# ---------------------------------------------------------------- ingest_webhooks
WEBHOOKS_RECEIVED = Counter(
    "paymentsvc_webhooks_received_total", "Webhook requests received on POST /webhooks/stripe."
)
WEBHOOKS_VERIFIED = Counter(
    "paymentsvc_webhooks_verified_total", "Webhook requests whose Stripe signature verified."
)
WEBHOOKS_REJECTED = Counter(
    "paymentsvc_webhooks_rejected_total",
    "Webhook requests answered 4xx, by reason.",
    ["reason"],
)
WEBHOOKS_UNPROJECTED = Counter(
    "paymentsvc_webhooks_unprojected_total",
    "Verified events of a type we do not project: archived on stripe-raw-events only.",
    ["event_type"],
)
WEBHOOKS_UNNORMALIZED = Counter(
    "paymentsvc_webhooks_unnormalized_total",
    "Verified events we could not normalize, by reason (malformed_event, malformed_json, "
    "not_an_event): archived, dead-lettered to payment-events.dlq and answered 200.",
    ["event_type", "reason"],
)
WEBHOOKS_UNAVAILABLE = Counter(
    "paymentsvc_webhooks_unavailable_total",
    "Webhook requests answered 503 because the broker did not acknowledge in time.",
)
EVENTS_PUBLISHED = Counter(
    "paymentsvc_events_published_total",
    "Messages acknowledged by the broker, by topic and event type.",
    ["topic", "event_type"],
)
PUBLISH_LATENCY = Histogram(
    "paymentsvc_publish_latency_seconds",
    "Time from send to broker acknowledgement (acks=all).",
    ["topic"],
    buckets=LATENCY_BUCKETS,
)

# ---------------------------------------------------------------- shared
SERVICE_INFO = Gauge(
    "paymentsvc_service_info", "Constant 1, labelled with the service and version.",
    ["service", "version"],
    multiprocess_mode="livemax",
)
DEPENDENCY_UP = Gauge(
    "paymentsvc_dependency_up", "1 when the last readiness probe of a dependency passed.",
    ["dependency"],
    multiprocess_mode="livemin",
)
BREAKER_OPEN = Gauge(
    "paymentsvc_circuit_breaker_open",
    "1 from when a circuit breaker opens until a call through it succeeds again (open or "
    "half-open), by breaker: redis and stripe (api_grpc), stripe-invoices (dunning).",
    ["breaker"],
    multiprocess_mode="livemax",
)

# ---------------------------------------------------------------- worker runtime
WORKER_EVENTS = Counter(
    "paymentsvc_worker_events_total",
    "Messages a worker finished with, by outcome: applied, duplicate, dead_lettered.",
    ["consumer", "outcome"],
)
WORKER_BATCH_SECONDS = Histogram(
    "paymentsvc_worker_batch_seconds",
    "Time to apply one batch: decode, transaction, dead letters, after-commit.",
    ["consumer"],
    buckets=LATENCY_BUCKETS,
)
WORKER_TRANSIENT_FAILURES = Counter(
    "paymentsvc_worker_transient_failures_total",
    "Failed attempts of a batch, retried: a dependency down, or a bug (never dead-lettered), by exception class.",
    ["consumer", "error"],
)
WORKER_STALLED_SECONDS = Gauge(
    "paymentsvc_worker_stalled_seconds",
    "How long the current batch has been failing (0 while batches succeed); alert when it stays above a minute.",
    ["consumer"],
)
WORKER_LAG = Gauge(
    "paymentsvc_worker_lag_messages",
    "Messages between a partition's end and the worker's position.",
    ["consumer", "topic", "partition"],
)
WORKER_LOG_MISMATCH = Gauge(
    "paymentsvc_worker_log_mismatch",
    "1 while a partition is not consumed because the projection's mark does not fit its log (see the ERROR log).",
    ["consumer", "topic", "partition"],
)
INBOX_PRUNED = Counter(
    "paymentsvc_inbox_pruned_total",
    "Inbox rows (processed_events) older than INBOX_RETENTION_DAYS deleted by the pruner.",
    ["consumer"],
)
WORKER_PAUSED = Gauge(
    "paymentsvc_worker_paused",
    "1 while a worker is backing off after a transient failure.",
    ["consumer"],
)

# ---------------------------------------------------------------- entitlements
CATALOG_MISSES = Counter(
    "paymentsvc_catalog_misses_total",
    "Events naming a Stripe price that the catalog does not know; they grant nothing.",
    ["price_id"],
)
REDIS_PROJECTION_FAILURES = Counter(
    "paymentsvc_redis_projection_failures_total",
    "Batches whose entitlement answers could not be written to Redis (readers use Postgres).",
)
ACCESS_CHANGES = Counter(
    "paymentsvc_access_changes_total",
    "Changes of a subscription's access level recorded in access_changes, by new level.",
    ["to_level"],
)

# ---------------------------------------------------------------- dunning
DUNNING_NOTICE_FAILURES = Counter(
    "paymentsvc_dunning_notice_failures_total",
    "Dunning notices that could not be published on dunning-events after their batch committed.",
)
DUNNING_STEPS = Counter(
    "paymentsvc_dunning_steps_total",
    "Steps the dunning scheduler took, by step (attempt, escalate, restore) and outcome "
    "(published, declined, stripe_unavailable, publish_failed).",
    ["step", "outcome"],
)
DUNNING_BREAKER_OPEN = Gauge(
    "paymentsvc_dunning_stripe_breaker_open",
    "1 while the dunning scheduler's circuit breaker around Stripe is open.",
)

# ---------------------------------------------------------------- api_grpc
API_HANDLED = Counter(
    "paymentsvc_api_handled_total",
    "gRPC calls answered by the API, by method and status code.",
    ["method", "code"],
)
API_LATENCY = Histogram(
    "paymentsvc_api_latency_seconds",
    "Time to answer a gRPC call, by method.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
API_ENTITLEMENT_CHECKS = Counter(
    "paymentsvc_api_entitlement_checks_total",
    "Entitlement decisions made, by reason (granted, grace, free_plan, expired, ...).",
    ["reason"],
)
API_CACHE_LOOKUPS = Counter(
    "paymentsvc_api_cache_lookups_total",
    "Entitlement reads from Redis, by result: hit, miss (Postgres), unavailable (Postgres).",
    ["result"],
)
API_NEAR_CACHE_READS = Counter(
    "paymentsvc_api_near_cache_reads_total",
    "Entitlement hash reads through the near cache, by result: hit (every subject from "
    "process memory), miss (read Redis, then cached), bypass (the change feed is down or "
    "silent: read Redis, cache nothing).",
    ["result"],
)
API_RATE_LIMITED = Counter(
    "paymentsvc_api_rate_limited_total",
    "Calls refused by the per-key rate limiter, by key name.",
    ["key"],
)
API_RATE_LIMIT_FAIL_OPEN = Counter(
    "paymentsvc_api_rate_limit_fail_open_total",
    "Calls let through without a rate-limit check because Redis did not answer.",
)

# ---- usage
# The usage worker's lag is WORKER_LAG{consumer="usage"} (the shared runtime reports it).
USAGE_INCREMENTS = Counter(
    "paymentsvc_usage_increments_total",
    "IncrementUsage answers, by outcome: allowed, denied, over_soft_limit, released, replayed.",
    ["outcome"],
)
USAGE_SCRIPT_SECONDS = Histogram(
    "paymentsvc_usage_script_seconds",
    "Time of one usage Lua script call in Redis (round trip included), by script.",
    ["script"],
    buckets=LATENCY_BUCKETS,
)
USAGE_PUBLISH_FAILURES = Counter(
    "paymentsvc_usage_publish_failures_total",
    "Usage events the broker did not acknowledge (the Redis increment was rolled back).",
)
USAGE_QUOTA_READS = Counter(
    "paymentsvc_usage_quota_reads_total",
    "CheckQuota counter reads, by source: redis, postgres (Redis down or not rebuilt).",
    ["source"],
)
USAGE_CACHE_REBUILDS = Counter(
    "paymentsvc_usage_cache_rebuilds_total",
    "Rebuilds of the Redis usage counters from Postgres, by outcome.",
    ["outcome"],
)

# ---------------------------------------------------------------- the Go service's names
# The Go payment service's metrics, under its names, buckets and meanings, so that its
# dashboards and alerts keep working (issue 17; README "Coming from the Go service" says
# where each one is counted here). They sit beside ours, never instead of them.
GO_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)  # Go's prometheus.DefBuckets
GO_PAYMENT_TOTAL = Counter(
    "payment_total",
    "Payment requests: CreatePayment calls past validation, as the Go service counted them.",
)
GO_PAYMENT_SUCCESS = Counter(
    "payment_success_total",
    "CreatePayment calls whose PaymentIntent was created and whose payment.created event was acknowledged.",
)
GO_PAYMENT_FAILED = Counter(
    "payment_failed_total",
    "CreatePayment calls that failed after validation (Stripe refused or was unavailable, or the event was not acknowledged).",
)
GO_PAYMENT_DURATION = Histogram(
    "payment_duration_seconds",
    "Time to process one CreatePayment (Stripe calls and the event's acknowledgement).",
    buckets=GO_DEFAULT_BUCKETS,
)
GO_PAYMENT_AMOUNT = Histogram(
    "payment_amount_dollars",
    "Amounts of CreatePayment requests in the currency's major unit (cents / 100; zero-decimal currencies as they are).",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
GO_ENTITLEMENT_CHECKS = Counter(
    "entitlement_checks_total",
    "Entitlement decisions of CheckEntitlement (one each) and BulkCheckEntitlements (one per subject and feature).",
)
GO_ENTITLEMENT_CACHE_HITS = Counter(
    "entitlement_cache_hits_total",
    "Entitlement decisions answered from the cache (the replica's near cache or Redis).",
)
GO_ENTITLEMENT_CACHE_MISSES = Counter(
    "entitlement_cache_misses_total",
    "Entitlement decisions answered from Postgres (a subject not in Redis, or Redis unavailable).",
)
GO_ENTITLEMENT_DURATION = Histogram(
    "entitlement_check_duration_seconds",
    "Time to decide one CheckEntitlement call (cache or Postgres read and the decision; not the gRPC transport).",
    buckets=GO_DEFAULT_BUCKETS,
)
GO_DB_CONNECTIONS_ACTIVE = Gauge(
    "db_connections_active",
    "Postgres connections of this process's pools in use right now (psycopg_pool: pool_size - pool_available).",
    multiprocess_mode="livesum",
)
GO_DB_QUERY_DURATION = Histogram(
    "db_query_duration_seconds",
    "Time of one Postgres read of the API, from asking the pool for a connection to giving it back.",
    buckets=GO_DEFAULT_BUCKETS,
)
GO_CACHE_HITS = Counter(
    "cache_hits_total",
    "Reads of the API answered by its cache: entitlement hashes (near cache or Redis) and usage counters (Redis).",
)
GO_CACHE_MISSES = Counter(
    "cache_misses_total",
    "Reads of the API that the cache could not answer and that went to Postgres.",
)
GO_CIRCUIT_BREAKER_STATE = Gauge(
    "circuit_breaker_state",
    "Circuit breaker state, 0 closed, 1 open, 2 half-open (the Go service's values), by breaker (stripe, redis).",
    ["breaker"],
    multiprocess_mode="livemax",
)


# ---------------------------------------------------------------- callback gauges
_FUNCTIONS: dict[Gauge, Callable[[], float]] = {}


def gauge_function(gauge: Gauge, function: Callable[[], float]) -> None:
    """Read `gauge` from `function` at scrape time; under several processes the value
    is written by `refresh_gauge_functions` instead, which each child runs on a timer."""
    gauge.set_function(function)
    _FUNCTIONS[gauge] = function


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def refresh_gauge_functions() -> None:
    for gauge, function in list(_FUNCTIONS.items()):
        gauge.set(function())
