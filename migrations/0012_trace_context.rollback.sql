ALTER TABLE outbox DROP COLUMN traceparent;
ALTER TABLE dunning_cases DROP COLUMN traceparent;
