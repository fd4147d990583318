-- Queries of services/entitlements/repository.py. Loaded by shared/sqlfile.py.
-- All run in the worker's transaction for one batch. A batch loads everything
-- its customers own with the load_* queries (in two pipelined phases, so that
-- every query is an index lookup by exact ids), then writes the rows that
-- changed. The upserts overwrite: the rows were merged in memory, and only the
-- worker of the customer's partition writes them (catalog_misses, shared by all
-- workers, is merged in SQL).

-- name: load_customers
SELECT customer_id, user_id, family_id, email, created_at, last_event_id, last_event_created
FROM customers
WHERE customer_id = ANY(%(customer_ids)s::text[]);

-- name: load_subscriptions
SELECT subscription_id, customer_id, user_id, family_id, plan_id, price_id, status,
       current_period_start, current_period_end, cancel_at_period_end, cancel_at,
       canceled_at, trial_end, access_level, status_since, created_at, updated_at,
       last_event_id, last_event_created
FROM subscriptions
WHERE customer_id = ANY(%(customer_ids)s::text[])
   OR subscription_id = ANY(%(subscription_ids)s::text[]);

-- name: load_history
-- Sorted by version in Python: ORDER BY on text follows the collation, not code points.
SELECT event_created, event_id, subscription_id, customer_id, status, price_id
FROM subscription_history
WHERE customer_id = ANY(%(customer_ids)s::text[])
   OR subscription_id = ANY(%(subscription_ids)s::text[]);

-- name: lock_batch_keys
-- Runs first, before any read. Events about one payment can arrive on two partitions (a
-- dispute is keyed by its payment, the charge by its customer; a guest payment later
-- attached to a customer), so two batches may touch one row at once. Each batch takes a
-- transaction lock per id it touches (customers, payments, charges, objects), all in one
-- order, so such batches run one after the other and the second reads what the first
-- committed (READ COMMITTED: each statement sees the latest commits). Keyed by schema too:
-- a replay into another schema never waits for the live worker.
SELECT count(*)
FROM (SELECT pg_advisory_xact_lock(lock_key)
      FROM (SELECT DISTINCT hashtextextended(current_schema() || ':' || id, 0) AS lock_key
            FROM unnest(%(lock_ids)s::text[]) AS id
            ORDER BY lock_key) AS ordered) AS locked;

-- name: load_paid_periods
SELECT subscription_id, customer_id, paid_through, invoice_id, last_event_id, last_event_created
FROM paid_periods
WHERE customer_id = ANY(%(customer_ids)s::text[])
   OR subscription_id = ANY(%(subscription_ids)s::text[]);

-- name: load_grants
SELECT source_type, source_id, customer_id, user_id, family_id, plan_id, granted_at,
       last_event_id, last_event_created
FROM one_time_grants
WHERE customer_id = ANY(%(customer_ids)s::text[])
   -- a guest's grant has no customer: found by its charge or checkout session id
   OR source_id = ANY(%(payment_ids)s::text[]);

-- name: load_entitlements
-- Second phase: the sources are the subscriptions and grants the first phase found.
SELECT subject_type, subject_id, feature_code, source_type, source_id, user_id, family_id,
       plan_id, status, access_level, usage_limit, limit_period, enforcement, granted_at,
       expires_at, revoked_at, last_event_id, last_event_created
FROM entitlements
WHERE (source_type, source_id) IN (
    SELECT * FROM unnest(%(source_types)s::text[], %(source_ids)s::text[]));

-- name: load_access_changes
-- Second phase, like load_entitlements.
SELECT subscription_id, event_id, event_created, from_level, to_level, status
FROM access_changes
WHERE subscription_id = ANY(%(subscription_ids)s::text[]);

-- name: load_payments
-- FOR UPDATE: a batch that reaches a payment by another of its ids (the charge, where the
-- row is keyed by the intent) waits for a writer holding it and reads what it committed.
SELECT payment_id, customer_id, user_id, family_id, amount, currency, status, amount_refunded,
       payment_intent_id, charge_id, invoice_id, description, failure_code, failure_message,
       status_reason, metadata, created_at, updated_at, last_event_id, last_event_created
FROM payments
WHERE payment_id = ANY(%(payment_ids)s::text[])
   OR charge_id = ANY(%(charge_ids)s::text[])
ORDER BY payment_id
FOR UPDATE;

-- name: upsert_customer
INSERT INTO customers (customer_id, user_id, family_id, email, created_at,
                       last_event_id, last_event_created)
VALUES (%(customer_id)s, %(user_id)s, %(family_id)s, %(email)s, %(created_at)s,
        %(last_event_id)s, %(last_event_created)s)
ON CONFLICT (customer_id) DO UPDATE
SET user_id = EXCLUDED.user_id,
    family_id = EXCLUDED.family_id,
    email = EXCLUDED.email,
    created_at = EXCLUDED.created_at,
    last_event_id = EXCLUDED.last_event_id,
    last_event_created = EXCLUDED.last_event_created;

-- name: upsert_subscription
INSERT INTO subscriptions (subscription_id, customer_id, user_id, family_id, plan_id, price_id,
                           status, current_period_start, current_period_end,
                           cancel_at_period_end, cancel_at, canceled_at, trial_end,
                           access_level, status_since, created_at, updated_at,
                           last_event_id, last_event_created)
VALUES (%(subscription_id)s, %(customer_id)s, %(user_id)s, %(family_id)s, %(plan_id)s,
        %(price_id)s, %(status)s, %(current_period_start)s, %(current_period_end)s,
        %(cancel_at_period_end)s, %(cancel_at)s, %(canceled_at)s, %(trial_end)s,
        %(access_level)s, %(status_since)s, %(created_at)s, %(updated_at)s,
        %(last_event_id)s, %(last_event_created)s)
ON CONFLICT (subscription_id) DO UPDATE
SET customer_id = EXCLUDED.customer_id,
    user_id = EXCLUDED.user_id,
    family_id = EXCLUDED.family_id,
    plan_id = EXCLUDED.plan_id,
    price_id = EXCLUDED.price_id,
    status = EXCLUDED.status,
    current_period_start = EXCLUDED.current_period_start,
    current_period_end = EXCLUDED.current_period_end,
    cancel_at_period_end = EXCLUDED.cancel_at_period_end,
    cancel_at = EXCLUDED.cancel_at,
    canceled_at = EXCLUDED.canceled_at,
    trial_end = EXCLUDED.trial_end,
    access_level = EXCLUDED.access_level,
    status_since = EXCLUDED.status_since,
    created_at = EXCLUDED.created_at,
    updated_at = EXCLUDED.updated_at,
    last_event_id = EXCLUDED.last_event_id,
    last_event_created = EXCLUDED.last_event_created;

-- name: insert_history
INSERT INTO subscription_history (subscription_id, event_id, event_created, customer_id,
                                  status, price_id)
VALUES (%(subscription_id)s, %(event_id)s, %(event_created)s, %(customer_id)s,
        %(status)s, %(price_id)s)
ON CONFLICT (subscription_id, event_id) DO NOTHING;

-- name: upsert_paid_period
INSERT INTO paid_periods (subscription_id, customer_id, paid_through, invoice_id,
                          last_event_id, last_event_created)
VALUES (%(subscription_id)s, %(customer_id)s, %(paid_through)s, %(invoice_id)s,
        %(last_event_id)s, %(last_event_created)s)
ON CONFLICT (subscription_id) DO UPDATE
SET customer_id = EXCLUDED.customer_id,
    paid_through = EXCLUDED.paid_through,
    invoice_id = EXCLUDED.invoice_id,
    last_event_id = EXCLUDED.last_event_id,
    last_event_created = EXCLUDED.last_event_created;

-- name: upsert_grant
INSERT INTO one_time_grants (source_type, source_id, customer_id, user_id, family_id, plan_id,
                             granted_at, last_event_id, last_event_created)
VALUES (%(source_type)s, %(source_id)s, %(customer_id)s, %(user_id)s, %(family_id)s,
        %(plan_id)s, %(granted_at)s, %(last_event_id)s, %(last_event_created)s)
ON CONFLICT (source_type, source_id) DO UPDATE
SET customer_id = EXCLUDED.customer_id,
    user_id = EXCLUDED.user_id,
    family_id = EXCLUDED.family_id,
    plan_id = EXCLUDED.plan_id,
    granted_at = EXCLUDED.granted_at,
    last_event_id = EXCLUDED.last_event_id,
    last_event_created = EXCLUDED.last_event_created;

-- name: delete_entitlement
DELETE FROM entitlements
WHERE subject_type = %(subject_type)s AND subject_id = %(subject_id)s
  AND feature_code = %(feature_code)s AND source_type = %(source_type)s
  AND source_id = %(source_id)s;

-- name: upsert_entitlement
INSERT INTO entitlements (subject_type, subject_id, feature_code, source_type, source_id,
                          user_id, family_id, plan_id, status, access_level, usage_limit,
                          limit_period, enforcement, granted_at, expires_at, revoked_at,
                          last_event_id, last_event_created)
VALUES (%(subject_type)s, %(subject_id)s, %(feature_code)s, %(source_type)s, %(source_id)s,
        %(user_id)s, %(family_id)s, %(plan_id)s, %(status)s, %(access_level)s,
        %(usage_limit)s, %(limit_period)s, %(enforcement)s, %(granted_at)s, %(expires_at)s,
        %(revoked_at)s, %(last_event_id)s, %(last_event_created)s)
ON CONFLICT (subject_type, subject_id, feature_code, source_type, source_id) DO UPDATE
SET user_id = EXCLUDED.user_id,
    family_id = EXCLUDED.family_id,
    plan_id = EXCLUDED.plan_id,
    status = EXCLUDED.status,
    access_level = EXCLUDED.access_level,
    usage_limit = EXCLUDED.usage_limit,
    limit_period = EXCLUDED.limit_period,
    enforcement = EXCLUDED.enforcement,
    granted_at = EXCLUDED.granted_at,
    expires_at = EXCLUDED.expires_at,
    revoked_at = EXCLUDED.revoked_at,
    last_event_id = EXCLUDED.last_event_id,
    last_event_created = EXCLUDED.last_event_created;

-- name: delete_access_change
DELETE FROM access_changes
WHERE subscription_id = %(subscription_id)s AND event_id = %(event_id)s;

-- name: upsert_access_change
INSERT INTO access_changes (subscription_id, event_id, event_created, from_level, to_level,
                            status)
VALUES (%(subscription_id)s, %(event_id)s, %(event_created)s, %(from_level)s, %(to_level)s,
        %(status)s)
ON CONFLICT (subscription_id, event_id) DO UPDATE
SET event_created = EXCLUDED.event_created,
    from_level = EXCLUDED.from_level,
    to_level = EXCLUDED.to_level,
    status = EXCLUDED.status;

-- name: delete_payment
-- A payment first stored under its charge id, now merged into its payment intent's row.
-- Runs before upsert_payment, which takes over the charge_id (a unique column).
DELETE FROM payments WHERE payment_id = %(payment_id)s;

-- name: upsert_payment
INSERT INTO payments (payment_id, customer_id, user_id, family_id, amount, currency, status,
                      amount_refunded, payment_intent_id, charge_id, invoice_id, description,
                      failure_code, failure_message, status_reason, metadata, created_at,
                      updated_at, last_event_id, last_event_created)
VALUES (%(payment_id)s, %(customer_id)s, %(user_id)s, %(family_id)s, %(amount)s, %(currency)s,
        %(status)s, %(amount_refunded)s, %(payment_intent_id)s, %(charge_id)s, %(invoice_id)s,
        %(description)s, %(failure_code)s, %(failure_message)s, %(status_reason)s,
        %(metadata)s, %(created_at)s, %(updated_at)s, %(last_event_id)s,
        %(last_event_created)s)
ON CONFLICT (payment_id) DO UPDATE
SET customer_id = EXCLUDED.customer_id,
    user_id = EXCLUDED.user_id,
    family_id = EXCLUDED.family_id,
    amount = EXCLUDED.amount,
    currency = EXCLUDED.currency,
    status = EXCLUDED.status,
    amount_refunded = EXCLUDED.amount_refunded,
    payment_intent_id = EXCLUDED.payment_intent_id,
    charge_id = EXCLUDED.charge_id,
    invoice_id = EXCLUDED.invoice_id,
    description = EXCLUDED.description,
    failure_code = EXCLUDED.failure_code,
    failure_message = EXCLUDED.failure_message,
    status_reason = EXCLUDED.status_reason,
    metadata = EXCLUDED.metadata,
    created_at = EXCLUDED.created_at,
    updated_at = EXCLUDED.updated_at,
    last_event_id = EXCLUDED.last_event_id,
    last_event_created = EXCLUDED.last_event_created;

-- name: backfill_payment_identity
-- A customer gained a user or family: its payments stored without one get it.
UPDATE payments
SET user_id = coalesce(user_id, %(user_id)s),
    family_id = coalesce(family_id, %(family_id)s)
WHERE customer_id = %(customer_id)s
  AND ((user_id IS NULL AND %(user_id)s::text IS NOT NULL)
       OR (family_id IS NULL AND %(family_id)s::text IS NOT NULL));

-- name: upsert_catalog_miss
-- Shared by every worker, so merged here: first seen is a min, the rest follows the
-- latest sighting. COLLATE "C" orders event ids by code point, as Python does.
INSERT INTO catalog_misses (price_id, first_seen_at, last_seen_at, last_subscription_id,
                            last_event_id)
VALUES (%(price_id)s, %(first_seen_at)s, %(last_seen_at)s, %(last_subscription_id)s,
        %(last_event_id)s)
ON CONFLICT (price_id) DO UPDATE
SET first_seen_at = LEAST(catalog_misses.first_seen_at, EXCLUDED.first_seen_at),
    last_seen_at = GREATEST(catalog_misses.last_seen_at, EXCLUDED.last_seen_at),
    last_subscription_id = CASE
        WHEN (EXCLUDED.last_seen_at, EXCLUDED.last_event_id COLLATE "C")
             > (catalog_misses.last_seen_at, catalog_misses.last_event_id COLLATE "C")
        THEN EXCLUDED.last_subscription_id ELSE catalog_misses.last_subscription_id END,
    last_event_id = CASE
        WHEN (EXCLUDED.last_seen_at, EXCLUDED.last_event_id COLLATE "C")
             > (catalog_misses.last_seen_at, catalog_misses.last_event_id COLLATE "C")
        THEN EXCLUDED.last_event_id ELSE catalog_misses.last_event_id END;

-- name: mark_cache_pending
-- The batch's subjects may have a stale Redis answer until after_commit writes it.
-- Sorted input, so concurrent batches lock the rows in one order.
-- One row back, the transaction's id, however many subjects.
WITH marked AS (
    INSERT INTO cache_refresh_pending (consumer, subject_type, subject_id, batch_txid)
    SELECT %(consumer)s, t, i, txid_current()
    FROM unnest(%(subject_types)s::text[], %(subject_ids)s::text[]) AS d(t, i)
    ORDER BY t, i
    ON CONFLICT (consumer, subject_type, subject_id)
    DO UPDATE SET batch_txid = EXCLUDED.batch_txid, marked_at = now()
)
SELECT txid_current();

-- name: clear_cache_pending
-- Marks of subjects whose answer is now in Redis; only the marks that transaction set.
DELETE FROM cache_refresh_pending p
USING unnest(%(subject_types)s::text[], %(subject_ids)s::text[]) AS d(t, i)
WHERE p.consumer = %(consumer)s AND p.subject_type = d.t AND p.subject_id = d.i
  AND p.batch_txid = %(batch_txid)s;

-- name: take_cache_pending
-- Marked subjects no running batch holds, locked until the caller commits.
SELECT subject_type, subject_id
FROM cache_refresh_pending
WHERE consumer = %(consumer)s
ORDER BY subject_type, subject_id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: mark_all_cache_pending
-- Every subject with an entitlement row (for rebuild-cache), or one subject.
INSERT INTO cache_refresh_pending (consumer, subject_type, subject_id, batch_txid)
SELECT DISTINCT %(consumer)s, subject_type, subject_id, txid_current()
FROM entitlements
WHERE %(subject_type)s::text IS NULL OR (subject_type, subject_id) = (%(subject_type)s::text, %(subject_id)s::text)
ON CONFLICT (consumer, subject_type, subject_id)
DO UPDATE SET batch_txid = EXCLUDED.batch_txid, marked_at = now();

-- name: drop_cache_pending
-- Marks the caller holds locked (take_cache_pending) and has just rewritten.
DELETE FROM cache_refresh_pending p
USING unnest(%(subject_types)s::text[], %(subject_ids)s::text[]) AS d(t, i)
WHERE p.consumer = %(consumer)s AND p.subject_type = d.t AND p.subject_id = d.i;

-- name: count_cache_pending
SELECT count(*) FROM cache_refresh_pending WHERE consumer = %(consumer)s;
