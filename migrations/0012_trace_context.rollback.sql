ALTER TABLE outbox DROP COLUMN IF EXISTS traceparent;
ALTER TABLE dunning_cases DROP COLUMN IF EXISTS traceparent;
