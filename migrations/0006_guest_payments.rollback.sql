-- Guest grants cannot be kept without a customer; a replay of the log rebuilds them.
DELETE FROM one_time_grants WHERE customer_id IS NULL;
ALTER TABLE one_time_grants ALTER COLUMN customer_id SET NOT NULL;
