DROP TABLE paid_period_events;
ALTER TABLE subscription_history DROP COLUMN status_only;
ALTER TABLE subscription_history DROP COLUMN cancel_at;
ALTER TABLE subscription_history DROP COLUMN cancel_at_period_end;
ALTER TABLE subscription_history DROP COLUMN current_period_end;
