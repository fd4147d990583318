DROP TABLE one_time_grants;
DROP TABLE paid_periods;
DROP TABLE subscription_history;
ALTER TABLE payments DROP COLUMN status_reason;
ALTER TABLE subscriptions DROP COLUMN status_since;
