-- Queries of the dunning service: the projection (dunning_cases) and the
-- scheduler's ledger (dunning_steps). Times are timestamptz; every value is a parameter.

-- name: load_cases
SELECT case_id, invoice_id, customer_id, subscription_id, user_id, family_id, plan_id,
       price_id, state, attempt_count, next_attempt_at, last_error, amount_due, currency,
       opened_at, closed_at, last_attempt_at, escalated_at, restored_at,
       last_event_id, last_event_created
FROM dunning_cases
WHERE invoice_id = ANY(%(invoice_ids)b::text[])
   OR subscription_id = ANY(%(subscription_ids)b::text[]);

-- name: upsert_case
-- Set-based: the batch's changed cases as one JSON array of rows (shared.db.json_rows).
INSERT INTO dunning_cases AS c (
    case_id, invoice_id, customer_id, subscription_id, user_id, family_id, plan_id,
    price_id, state, attempt_count, next_attempt_at, last_error, amount_due, currency,
    opened_at, closed_at, last_attempt_at, escalated_at, restored_at,
    last_event_id, last_event_created, traceparent)
SELECT case_id, invoice_id, customer_id, subscription_id, user_id, family_id, plan_id,
       price_id, state, attempt_count, next_attempt_at, last_error, amount_due, currency,
       opened_at, closed_at, last_attempt_at, escalated_at, restored_at,
       last_event_id, last_event_created, traceparent
FROM json_populate_recordset(NULL::dunning_cases, %(rows)s)
ON CONFLICT (case_id) DO UPDATE SET
    customer_id = EXCLUDED.customer_id,
    subscription_id = EXCLUDED.subscription_id,
    user_id = EXCLUDED.user_id,
    family_id = EXCLUDED.family_id,
    plan_id = EXCLUDED.plan_id,
    price_id = EXCLUDED.price_id,
    state = EXCLUDED.state,
    attempt_count = EXCLUDED.attempt_count,
    next_attempt_at = EXCLUDED.next_attempt_at,
    last_error = EXCLUDED.last_error,
    amount_due = EXCLUDED.amount_due,
    currency = EXCLUDED.currency,
    opened_at = EXCLUDED.opened_at,
    closed_at = EXCLUDED.closed_at,
    last_attempt_at = EXCLUDED.last_attempt_at,
    escalated_at = EXCLUDED.escalated_at,
    restored_at = EXCLUDED.restored_at,
    last_event_id = EXCLUDED.last_event_id,
    last_event_created = EXCLUDED.last_event_created,
    traceparent = EXCLUDED.traceparent;

-- name: due_cases
-- Cases whose next step is due, locked so that another replica skips them. A case
-- whose current step is already claimed (and not expired) or published is left out:
-- it is waiting for the projection to apply the step's event.
SELECT c.case_id, c.invoice_id, c.customer_id, c.subscription_id, c.user_id, c.family_id,
       c.plan_id, c.price_id, c.state, c.attempt_count, c.amount_due, c.currency, c.traceparent
FROM dunning_cases c
WHERE c.state IN ('open', 'retrying', 'escalated') AND c.next_attempt_at <= %(now)s
  AND NOT EXISTS (
      SELECT 1 FROM dunning_steps s
      WHERE s.case_id = c.case_id AND s.step <> 'restore'
        AND s.after_attempts = c.attempt_count
        -- an escalated case's next step is a retry, not the escalation it already had
        AND NOT (s.step = 'escalate' AND c.state = 'escalated')
        AND (s.published_at IS NOT NULL OR s.claimed_until > %(now)s))
ORDER BY c.next_attempt_at, c.case_id
LIMIT %(limit)s
FOR UPDATE OF c SKIP LOCKED;

-- name: cases_to_restore
-- Escalated cases that were paid since: their access must be given back.
SELECT c.case_id, c.invoice_id, c.customer_id, c.subscription_id, c.user_id, c.family_id,
       c.plan_id, c.price_id, c.state, c.attempt_count, c.amount_due, c.currency, c.traceparent
FROM dunning_cases c
WHERE c.state = 'recovered' AND c.escalated_at IS NOT NULL AND c.restored_at IS NULL
  AND NOT EXISTS (
      SELECT 1 FROM dunning_steps s
      WHERE s.case_id = c.case_id AND s.step = 'restore'
        AND (s.published_at IS NOT NULL OR s.claimed_until > %(now)s))
ORDER BY c.case_id
LIMIT %(limit)s
FOR UPDATE OF c SKIP LOCKED;

-- name: claim_step
-- The step is ours if we insert it, or take over a claim that expired unpublished.
INSERT INTO dunning_steps AS s (case_id, step, after_attempts, claimed_by, claimed_until)
VALUES (%(case_id)s, %(step)s, %(after_attempts)s, %(owner)s, %(claimed_until)s)
ON CONFLICT (case_id, step) DO UPDATE SET
    claimed_by = EXCLUDED.claimed_by,
    claimed_until = EXCLUDED.claimed_until
WHERE s.published_at IS NULL AND s.claimed_until <= %(now)s
RETURNING case_id;

-- name: release_step
-- Stripe was unavailable: the step was not taken, so it must not count.
DELETE FROM dunning_steps
WHERE case_id = %(case_id)s AND step = %(step)s AND claimed_by = %(owner)s
  AND published_at IS NULL;

-- name: mark_published
UPDATE dunning_steps SET published_at = %(now)s
WHERE case_id = %(case_id)s AND step = %(step)s AND claimed_by = %(owner)s;
