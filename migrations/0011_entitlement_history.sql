-- 0011: the history CheckEntitlement(as_of) reads (domain/entitlements_asof.py).
-- Each subscription_history entry keeps the snapshot fields that decide expiry, and
-- every paid invoice's period end is kept (paid_periods holds only the maximum), so
-- the answer at any moment is a function of the events created until then. Entries
-- recorded before this migration have no snapshot fields: a replay fills them.
ALTER TABLE subscription_history ADD COLUMN current_period_end timestamptz;
ALTER TABLE subscription_history ADD COLUMN cancel_at_period_end boolean NOT NULL DEFAULT false;
ALTER TABLE subscription_history ADD COLUMN cancel_at timestamptz;
-- A status set by our dunning scheduler (dunning.escalated / restored): the entry's price
-- and expiry fields are copies of whatever snapshot the worker held when it applied it,
-- so readers take them from the newest real snapshot before it instead.
ALTER TABLE subscription_history ADD COLUMN status_only boolean NOT NULL DEFAULT false;

CREATE TABLE paid_period_events (
    subscription_id   text NOT NULL,
    event_id          text NOT NULL,
    event_created     timestamptz NOT NULL,
    customer_id       text NOT NULL,
    paid_through      timestamptz NOT NULL,
    PRIMARY KEY (subscription_id, event_id)
);
