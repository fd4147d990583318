-- 0002: the state the entitlements projection needs to be independent of the
-- order in which Stripe delivers events. Forward-only; the rollback file undoes it.
-- Also in migrations/declared/schema.sql.

-- When the subscription entered its current status: the `created` time of the
-- first event of the latest run of events with that status. A reader adds the
-- policy's grace_days to it to know when `grace` access ends.
ALTER TABLE subscriptions ADD COLUMN status_since timestamptz;

-- Why the current status was set by hand (payment.status_updated); else NULL.
ALTER TABLE payments ADD COLUMN status_reason text;

-- Every customer.subscription.* event applied, older ones included: the status
-- and price as of that event. status_since, the access level and its changes,
-- and the features a plan change took away are derived from this history, so
-- an event that arrives late still lands in its place.
CREATE TABLE subscription_history (
    subscription_id   text NOT NULL,
    event_id          text NOT NULL,
    event_created     timestamptz NOT NULL,
    customer_id       text NOT NULL,
    status            text NOT NULL CHECK (status IN (
                          'incomplete', 'incomplete_expired', 'trialing', 'active',
                          'past_due', 'unpaid', 'suspended', 'paused', 'canceled')),
    price_id          text NOT NULL,
    PRIMARY KEY (subscription_id, event_id)
);
CREATE INDEX subscription_history_customer ON subscription_history (customer_id);

-- The latest period end of a subscription's paid invoices (a grow-only max).
-- Its own table because an invoice may arrive before its subscription.
CREATE TABLE paid_periods (
    subscription_id     text PRIMARY KEY CHECK (subscription_id <> ''),
    customer_id         text NOT NULL,
    paid_through        timestamptz NOT NULL,
    invoice_id          text,
    last_event_id       text NOT NULL,
    last_event_created  timestamptz NOT NULL
);
CREATE INDEX paid_periods_customer ON paid_periods (customer_id);

-- One-time purchases that grant a plan (a checkout in payment mode, a charge
-- with a plan_id). Kept apart from their entitlements so that they can be
-- granted once the customer's user or family becomes known. plan_id has no
-- foreign key: a plan removed from the catalog simply grants nothing.
CREATE TABLE one_time_grants (
    source_type         text NOT NULL CHECK (source_type IN ('charge', 'checkout')),
    source_id           text NOT NULL CHECK (source_id <> ''),
    customer_id         text NOT NULL,
    user_id             text,
    family_id           text,
    plan_id             text NOT NULL,
    granted_at          timestamptz NOT NULL,
    last_event_id       text NOT NULL,
    last_event_created  timestamptz NOT NULL,
    PRIMARY KEY (source_type, source_id)
);
CREATE INDEX one_time_grants_customer ON one_time_grants (customer_id);
