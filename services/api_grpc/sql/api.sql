-- Queries of services/api_grpc/queries.py. Loaded by shared/sqlfile.py.
-- Read-only: the API never writes a projection table (DESIGN.md, invariant 1).
-- Lists use keyset pagination; text sort keys are compared and ordered with
-- COLLATE "C" so that the cursor order is the index order on every server.

-- name: freshness
-- The newest event the entitlements projection applied, and how long ago.
SELECT extract(epoch FROM last_event_created)::bigint, last_event_id,
       (extract(epoch FROM clock_timestamp() - applied_at) * 1000)::bigint
FROM consumer_offsets
WHERE consumer = 'entitlements' AND last_event_created IS NOT NULL
ORDER BY last_event_created DESC, last_event_id COLLATE "C" DESC
LIMIT 1;

-- name: get_payment
SELECT payment_id, customer_id, user_id, family_id, amount, currency, status, amount_refunded,
       payment_intent_id, charge_id, invoice_id, description, failure_code, failure_message,
       metadata, created_at, updated_at, last_event_id, last_event_created
FROM payments
WHERE payment_id = %(payment_id)s OR charge_id = %(payment_id)s
ORDER BY (payment_id = %(payment_id)s) DESC
LIMIT 1;

-- name: list_payments
-- Each filter applies when its parameter is not NULL; newest first.
SELECT payment_id, customer_id, user_id, family_id, amount, currency, status, amount_refunded,
       payment_intent_id, charge_id, invoice_id, description, failure_code, failure_message,
       metadata, created_at, updated_at, last_event_id, last_event_created
FROM payments
WHERE (%(customer_id)s::text IS NULL OR customer_id = %(customer_id)s)
  AND (%(user_id)s::text IS NULL OR user_id = %(user_id)s)
  AND (%(family_id)s::text IS NULL OR family_id = %(family_id)s)
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(created_after)s::timestamptz IS NULL OR created_at >= %(created_after)s)
  AND (%(created_before)s::timestamptz IS NULL OR created_at < %(created_before)s)
  AND (%(after_created)s::timestamptz IS NULL
       OR (created_at, payment_id COLLATE "C") < (%(after_created)s, %(after_id)s::text))
ORDER BY created_at DESC, payment_id COLLATE "C" DESC
LIMIT %(limit)s;

-- name: list_entitlements
SELECT e.subject_type, e.subject_id, e.feature_code, e.source_type, e.source_id, e.user_id,
       e.family_id, e.plan_id, e.status, e.access_level, e.usage_limit, e.limit_period,
       e.granted_at, e.expires_at, e.last_event_id
FROM entitlements e
WHERE (e.subject_type, e.subject_id) IN (
    SELECT * FROM unnest(%(subject_types)s::text[], %(subject_ids)s::text[]))
  AND (%(after)s::text[] IS NULL
       OR (e.subject_type COLLATE "C", e.subject_id COLLATE "C", e.feature_code COLLATE "C",
           e.source_type COLLATE "C", e.source_id COLLATE "C")
          > ((%(after)s::text[])[1], (%(after)s::text[])[2], (%(after)s::text[])[3],
             (%(after)s::text[])[4], (%(after)s::text[])[5]))
ORDER BY e.subject_type COLLATE "C", e.subject_id COLLATE "C", e.feature_code COLLATE "C",
         e.source_type COLLATE "C", e.source_id COLLATE "C"
LIMIT %(limit)s;

-- name: list_subscriptions
SELECT subscription_id, customer_id, user_id, family_id, plan_id, price_id, status,
       current_period_start, current_period_end, cancel_at_period_end, canceled_at, trial_end,
       access_level, last_event_id, last_event_created
FROM subscriptions
WHERE (user_id = %(user_id)s OR family_id = %(family_id)s)
  AND (%(after)s::text IS NULL OR subscription_id COLLATE "C" > %(after)s)
ORDER BY subscription_id COLLATE "C"
LIMIT %(limit)s;
