-- Queries of services/entitlements/repository.py. Loaded by shared/sqlfile.py.
-- All run in the worker's transaction for one batch. A batch loads everything
-- its customers own with the load_* queries (in two pipelined phases, so that
-- every query is an index lookup by exact ids), then writes the rows that
-- changed. The upserts overwrite: the rows were merged in memory, and only the
-- worker of the customer's partition writes them (catalog_misses, shared by all
-- workers, is merged in SQL). Lists of ids are sent in binary (the "b" placeholders): psycopg
-- quotes a text array element by element in Python, 6x slower (docs/performance.md).
-- The load queries return times as Unix seconds (truncated, as int(datetime.timestamp())
-- does), in the order of the model's fields with the version last (created, event id):
-- a datetime per value, built by psycopg and converted back in Python, cost more than the
-- rest of the conversion (docs/performance.md, issue 12 section 7).

-- name: load_customers
SELECT customer_id, user_id, family_id, email, trunc(extract(epoch FROM created_at))::bigint,
       trunc(extract(epoch FROM last_event_created))::bigint, last_event_id
FROM customers
WHERE customer_id = ANY(%(customer_ids)b::text[]);

-- name: load_subscriptions
-- Only a row written before migration 0002 lacks status_since.
SELECT subscription_id, customer_id, user_id, family_id, plan_id, price_id, status,
       trunc(extract(epoch FROM current_period_start))::bigint, trunc(extract(epoch FROM current_period_end))::bigint,
       cancel_at_period_end, trunc(extract(epoch FROM cancel_at))::bigint, trunc(extract(epoch FROM canceled_at))::bigint,
       trunc(extract(epoch FROM trial_end))::bigint, access_level,
       trunc(extract(epoch FROM coalesce(status_since, updated_at)))::bigint, trunc(extract(epoch FROM created_at))::bigint,
       trunc(extract(epoch FROM updated_at))::bigint, trunc(extract(epoch FROM last_event_created))::bigint, last_event_id
FROM subscriptions
WHERE customer_id = ANY(%(customer_ids)b::text[])
   OR subscription_id = ANY(%(subscription_ids)b::text[]);

-- name: load_history
-- Sorted by version in Python: ORDER BY on text follows the collation, not code points.
SELECT trunc(extract(epoch FROM event_created))::bigint, event_id, subscription_id, customer_id, status, price_id,
       trunc(extract(epoch FROM current_period_end))::bigint, cancel_at_period_end,
       trunc(extract(epoch FROM cancel_at))::bigint, status_only
FROM subscription_history
WHERE customer_id = ANY(%(customer_ids)b::text[])
   OR subscription_id = ANY(%(subscription_ids)b::text[]);

-- name: load_paid_periods
SELECT subscription_id, customer_id, trunc(extract(epoch FROM paid_through))::bigint, invoice_id,
       trunc(extract(epoch FROM last_event_created))::bigint, last_event_id
FROM paid_periods
WHERE customer_id = ANY(%(customer_ids)b::text[])
   OR subscription_id = ANY(%(subscription_ids)b::text[]);

-- name: load_grants
-- FOR UPDATE, like load_payments: a grant of a charge or checkout session can be written
-- by batches of two partitions (a guest's charge, then the same charge with its customer).
SELECT source_type, source_id, customer_id, user_id, family_id, plan_id,
       trunc(extract(epoch FROM granted_at))::bigint, trunc(extract(epoch FROM last_event_created))::bigint, last_event_id
FROM one_time_grants
WHERE customer_id = ANY(%(customer_ids)b::text[])
   -- a guest's grant has no customer: found by its charge or checkout session id
   OR source_id = ANY(%(payment_ids)b::text[])
ORDER BY source_type, source_id
FOR UPDATE;

-- name: load_entitlements
-- Second phase: the sources are the subscriptions and grants the first phase found.
SELECT subject_type, subject_id, feature_code, source_type, source_id, user_id, family_id,
       plan_id, status, access_level, usage_limit, limit_period, enforcement,
       trunc(extract(epoch FROM granted_at))::bigint, trunc(extract(epoch FROM expires_at))::bigint, trunc(extract(epoch FROM revoked_at))::bigint,
       trunc(extract(epoch FROM last_event_created))::bigint, last_event_id
FROM entitlements
WHERE (source_type, source_id) IN (
    SELECT * FROM unnest(%(source_types)b::text[], %(source_ids)b::text[]));

-- name: load_access_changes
-- Second phase, like load_entitlements.
SELECT subscription_id, event_id, trunc(extract(epoch FROM event_created))::bigint, from_level, to_level, status
FROM access_changes
WHERE subscription_id = ANY(%(subscription_ids)b::text[]);

-- name: load_payments
-- FOR UPDATE: events about one payment can arrive on two partitions (a dispute is keyed
-- by its payment, the charge by its customer; a guest payment later attached to a
-- customer), so batches of two partitions may write one payment at once. A batch that
-- finds the row locks it until it commits: the other batch's load waits here and reads
-- what the first committed (READ COMMITTED: each statement sees the latest commits), also
-- when it reaches the row by another of its ids (the charge, where the row is keyed by the
-- intent). A row that does not exist yet cannot be locked: upsert_payment inserts the rows
-- its batch did not find only if no other transaction inserted them meanwhile, else the
-- batch fails and is retried (ConcurrentInsert in repository.py). Row locks live in the
-- rows, not in the server's lock table, so a batch of any size holds none of its entries
-- (docs/performance.md, issue 12 section 9). ORDER BY: batches lock rows in one order.
SELECT payment_id, customer_id, user_id, family_id, amount, currency, status, amount_refunded,
       payment_intent_id, charge_id, invoice_id, description, failure_code, failure_message,
       status_reason, metadata, trunc(extract(epoch FROM created_at))::bigint, trunc(extract(epoch FROM updated_at))::bigint,
       trunc(extract(epoch FROM last_event_created))::bigint, last_event_id
FROM payments
WHERE payment_id = ANY(%(payment_ids)b::text[])
   OR charge_id = ANY(%(charge_ids)b::text[])
ORDER BY payment_id
FOR UPDATE;

-- The writes below are set-based: each takes all of a batch's rows of its table as one
-- JSON array of objects (the rows parameter, keyed by column name, made by orjson) and writes them
-- in one statement, so a batch costs the same number of statements whatever its size
-- (tests/integration/test_entitlements_statements.py counts them). JSON rather than one
-- array per column: psycopg quotes array elements in Python, which cost 8x the client
-- time of the JSON (docs/performance.md). json_populate_recordset(NULL::table) takes
-- the column types from the table, in the schema the search_path names first (a
-- replay's). Rows are unique by key within a batch (merged in memory), as ON CONFLICT
-- DO UPDATE requires.

-- name: upsert_customer
INSERT INTO customers (customer_id, user_id, family_id, email, created_at,
                       last_event_id, last_event_created)
SELECT customer_id, user_id, family_id, email, created_at, last_event_id, last_event_created
FROM json_populate_recordset(NULL::customers, %(rows)s)
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
SELECT subscription_id, customer_id, user_id, family_id, plan_id, price_id, status, current_period_start, current_period_end, cancel_at_period_end, cancel_at, canceled_at, trial_end, access_level, status_since, created_at, updated_at, last_event_id, last_event_created
FROM json_populate_recordset(NULL::subscriptions, %(rows)s)
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
-- Append-only; DO NOTHING also absorbs an entry that occurs twice in one batch.
INSERT INTO subscription_history (subscription_id, event_id, event_created, customer_id,
                                  status, price_id, current_period_end, cancel_at_period_end,
                                  cancel_at, status_only)
SELECT subscription_id, event_id, event_created, customer_id, status, price_id,
       current_period_end, coalesce(cancel_at_period_end, false), cancel_at, coalesce(status_only, false)
FROM json_populate_recordset(NULL::subscription_history, %(rows)s)
ON CONFLICT (subscription_id, event_id) DO NOTHING;

-- name: insert_paid_events
-- Every paid invoice's period end, append-only (CheckEntitlement as_of reads it).
INSERT INTO paid_period_events (subscription_id, event_id, event_created, customer_id, paid_through)
SELECT subscription_id, event_id, event_created, customer_id, paid_through
FROM json_populate_recordset(NULL::paid_period_events, %(rows)s)
ON CONFLICT (subscription_id, event_id) DO NOTHING;

-- name: upsert_paid_period
INSERT INTO paid_periods (subscription_id, customer_id, paid_through, invoice_id,
                          last_event_id, last_event_created)
SELECT subscription_id, customer_id, paid_through, invoice_id, last_event_id, last_event_created
FROM json_populate_recordset(NULL::paid_periods, %(rows)s)
ON CONFLICT (subscription_id) DO UPDATE
SET customer_id = EXCLUDED.customer_id,
    paid_through = EXCLUDED.paid_through,
    invoice_id = EXCLUDED.invoice_id,
    last_event_id = EXCLUDED.last_event_id,
    last_event_created = EXCLUDED.last_event_created;

-- name: upsert_grant
-- As upsert_payment: rows are the grants the batch loaded (locked), new_rows the ones
-- it did not find, inserted only where no row has the key by now.
WITH inserted AS (
    INSERT INTO one_time_grants (source_type, source_id, customer_id, user_id, family_id, plan_id,
                                 granted_at, last_event_id, last_event_created)
    SELECT source_type, source_id, customer_id, user_id, family_id, plan_id, granted_at, last_event_id, last_event_created
    FROM json_populate_recordset(NULL::one_time_grants, %(new_rows)s)
    ON CONFLICT DO NOTHING
    RETURNING 1
), updated AS (
    INSERT INTO one_time_grants (source_type, source_id, customer_id, user_id, family_id, plan_id,
                                 granted_at, last_event_id, last_event_created)
    SELECT source_type, source_id, customer_id, user_id, family_id, plan_id, granted_at, last_event_id, last_event_created
    FROM json_populate_recordset(NULL::one_time_grants, %(rows)s)
    ON CONFLICT (source_type, source_id) DO UPDATE
    SET customer_id = EXCLUDED.customer_id,
        user_id = EXCLUDED.user_id,
        family_id = EXCLUDED.family_id,
        plan_id = EXCLUDED.plan_id,
        granted_at = EXCLUDED.granted_at,
        last_event_id = EXCLUDED.last_event_id,
        last_event_created = EXCLUDED.last_event_created
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted);

-- name: delete_entitlement
DELETE FROM entitlements
WHERE (subject_type, subject_id, feature_code, source_type, source_id) IN (
    SELECT subject_type, subject_id, feature_code, source_type, source_id
    FROM json_populate_recordset(NULL::entitlements, %(rows)s));

-- name: upsert_entitlement
INSERT INTO entitlements (subject_type, subject_id, feature_code, source_type, source_id,
                          user_id, family_id, plan_id, status, access_level, usage_limit,
                          limit_period, enforcement, granted_at, expires_at, revoked_at,
                          last_event_id, last_event_created)
SELECT subject_type, subject_id, feature_code, source_type, source_id, user_id, family_id, plan_id, status, access_level, usage_limit, limit_period, enforcement, granted_at, expires_at, revoked_at, last_event_id, last_event_created
FROM json_populate_recordset(NULL::entitlements, %(rows)s)
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
WHERE (subscription_id, event_id) IN (
    SELECT subscription_id, event_id FROM json_populate_recordset(NULL::access_changes, %(rows)s));

-- name: upsert_access_change
INSERT INTO access_changes (subscription_id, event_id, event_created, from_level, to_level,
                            status)
SELECT subscription_id, event_id, event_created, from_level, to_level, status
FROM json_populate_recordset(NULL::access_changes, %(rows)s)
ON CONFLICT (subscription_id, event_id) DO UPDATE
SET event_created = EXCLUDED.event_created,
    from_level = EXCLUDED.from_level,
    to_level = EXCLUDED.to_level,
    status = EXCLUDED.status;

-- name: delete_payment
-- Payments first stored under their charge id, now merged into their payment intent's
-- rows. Runs before upsert_payment, which takes over the charge_id (a unique column).
DELETE FROM payments
WHERE payment_id IN (SELECT payment_id FROM json_populate_recordset(NULL::payments, %(rows)s));

-- name: upsert_payment
-- The rows parameter: payments the batch loaded (and holds locked, load_payments); new_rows:
-- payments it did not find, inserted only where no row has the key (payment_id, or the
-- unique charge_id) by now: a row another transaction inserted since the batch's load
-- (waited for if it has not committed yet) is left alone and not counted in `inserted`,
-- and the batch fails (repository.save) instead of overwriting what it never read.
WITH inserted AS (
    INSERT INTO payments (payment_id, customer_id, user_id, family_id, amount, currency, status,
                          amount_refunded, payment_intent_id, charge_id, invoice_id, description,
                          failure_code, failure_message, status_reason, metadata, created_at,
                          updated_at, last_event_id, last_event_created)
    SELECT payment_id, customer_id, user_id, family_id, amount, currency, status, amount_refunded, payment_intent_id, charge_id, invoice_id, description, failure_code, failure_message, status_reason, metadata, created_at, updated_at, last_event_id, last_event_created
    FROM json_populate_recordset(NULL::payments, %(new_rows)s)
    ON CONFLICT DO NOTHING
    RETURNING 1
), updated AS (
    INSERT INTO payments (payment_id, customer_id, user_id, family_id, amount, currency, status,
                          amount_refunded, payment_intent_id, charge_id, invoice_id, description,
                          failure_code, failure_message, status_reason, metadata, created_at,
                          updated_at, last_event_id, last_event_created)
    SELECT payment_id, customer_id, user_id, family_id, amount, currency, status, amount_refunded, payment_intent_id, charge_id, invoice_id, description, failure_code, failure_message, status_reason, metadata, created_at, updated_at, last_event_id, last_event_created
    FROM json_populate_recordset(NULL::payments, %(rows)s)
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
        last_event_created = EXCLUDED.last_event_created
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted);

-- name: backfill_payment_identity
-- Customers that gained a user or family: their payments stored without one get it.
UPDATE payments
SET user_id = coalesce(payments.user_id, c.user_id),
    family_id = coalesce(payments.family_id, c.family_id)
FROM json_populate_recordset(NULL::customers, %(rows)s) AS c
WHERE payments.customer_id = c.customer_id
  AND ((payments.user_id IS NULL AND c.user_id IS NOT NULL)
       OR (payments.family_id IS NULL AND c.family_id IS NOT NULL));

-- name: upsert_catalog_miss
-- Shared by every worker, so merged here: first seen is a min, the rest follows the
-- latest sighting. COLLATE "C" orders event ids by code point, as Python does.
INSERT INTO catalog_misses (price_id, first_seen_at, last_seen_at, last_subscription_id,
                            last_event_id)
SELECT price_id, first_seen_at, last_seen_at, last_subscription_id, last_event_id
FROM json_populate_recordset(NULL::catalog_misses, %(rows)s)
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
    FROM unnest(%(subject_types)b::text[], %(subject_ids)b::text[]) AS d(t, i)
    ORDER BY t, i
    ON CONFLICT (consumer, subject_type, subject_id)
    DO UPDATE SET batch_txid = EXCLUDED.batch_txid, marked_at = now()
)
SELECT txid_current();

-- name: clear_cache_pending
-- Marks of subjects whose answer is now in Redis; only the marks that transaction set.
DELETE FROM cache_refresh_pending p
USING unnest(%(subject_types)b::text[], %(subject_ids)b::text[]) AS d(t, i)
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
USING unnest(%(subject_types)b::text[], %(subject_ids)b::text[]) AS d(t, i)
WHERE p.consumer = %(consumer)s AND p.subject_type = d.t AND p.subject_id = d.i;

-- name: count_cache_pending
SELECT count(*) FROM cache_refresh_pending WHERE consumer = %(consumer)s;
