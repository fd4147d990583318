-- 0004: what the usage worker and the quota API need. Forward-only; the rollback
-- file undoes it. Also in migrations/declared/schema.sql.

-- usage_records keeps, per accepted increment, what IncrementUsage answered
-- (the pool's counter after it, the limit then, whether it went over a soft
-- limit), so that `paymentsvc usage rebuild-cache` can restore the idempotency
-- records into Redis and a retry after a Redis loss still gets its first answer.
ALTER TABLE usage_records ADD COLUMN used_after bigint;
ALTER TABLE usage_records ADD COLUMN usage_limit bigint;          -- NULL: unlimited
ALTER TABLE usage_records ADD COLUMN over_soft_limit boolean NOT NULL DEFAULT false;
-- The durable idempotency guard: one record per caller key, whatever the event id.
CREATE UNIQUE INDEX usage_records_idempotency_key ON usage_records (idempotency_key);
-- The rebuild restores the idempotency records of the last days only.
CREATE INDEX usage_records_created ON usage_records (created_at);

-- The limit in force when the period was last charged, for ListUsage (NULL: unlimited).
ALTER TABLE usage_aggregates ADD COLUMN usage_limit bigint;
-- The rebuild reads the periods that are still running.
CREATE INDEX usage_aggregates_period_end ON usage_aggregates (period_end);
