DROP TABLE dunning_steps;
DROP INDEX dunning_cases_restore;
ALTER TABLE dunning_cases DROP COLUMN restored_at;
ALTER TABLE dunning_cases DROP COLUMN escalated_at;
ALTER TABLE dunning_cases DROP COLUMN last_attempt_at;
ALTER TABLE dunning_cases DROP COLUMN price_id;
