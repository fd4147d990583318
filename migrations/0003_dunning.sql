-- 0003: what the dunning worker needs. Forward-only; the rollback file undoes it.
-- Also in migrations/declared/schema.sql.

-- dunning_cases stays a pure projection of payment-events (the scheduler's
-- decisions are events on that topic too). These columns are facts of the log:
-- the price of the failed invoice (its plan's dunning policy), when the last
-- retry was made (the escalation deadline counts from it), and when the case
-- was escalated and access restored (so a recovered, escalated case gets its
-- access back exactly once).
ALTER TABLE dunning_cases ADD COLUMN price_id text;
ALTER TABLE dunning_cases ADD COLUMN last_attempt_at timestamptz;
ALTER TABLE dunning_cases ADD COLUMN escalated_at timestamptz;
ALTER TABLE dunning_cases ADD COLUMN restored_at timestamptz;
CREATE INDEX dunning_cases_restore ON dunning_cases (case_id)
    WHERE state = 'recovered' AND escalated_at IS NOT NULL AND restored_at IS NULL;

-- The scheduler's ledger of side effects, one row per step of a case
-- ('attempt-N', 'escalate', 'restore'). Not a projection: like
-- processed_events, it is bookkeeping of the live scheduler, never replayed.
-- The primary key is what makes every step happen at most once across any
-- number of scheduler replicas; a claim that was never published expires at
-- claimed_until (a crashed replica) and may be taken again with the same
-- Stripe idempotency key.
CREATE TABLE dunning_steps (
    case_id          text NOT NULL,
    step             text NOT NULL CHECK (step ~ '^(attempt-[1-9][0-9]*|escalate|restore)$'),
    after_attempts   integer NOT NULL CHECK (after_attempts >= 0),
    claimed_by       text NOT NULL,
    claimed_until    timestamptz NOT NULL,
    published_at     timestamptz,
    PRIMARY KEY (case_id, step)
);
