DROP INDEX usage_aggregates_period_end;
ALTER TABLE usage_aggregates DROP COLUMN usage_limit;
DROP INDEX usage_records_created;
DROP INDEX usage_records_idempotency_key;
ALTER TABLE usage_records DROP COLUMN over_soft_limit;
ALTER TABLE usage_records DROP COLUMN usage_limit;
ALTER TABLE usage_records DROP COLUMN used_after;
