-- The declared schema: what applying every migration must produce.
-- tests/integration/test_migrations.py checks it. Update it with every migration.
-- Tables are created unqualified so that replay can build into another schema.
--
-- Every projected row carries (last_event_created, last_event_id): the Stripe
-- `created` time and id of the event that last changed it. A handler applies an
-- event to a row only when (created, id) is newer than that pair, so an older
-- event never overwrites newer state (DESIGN.md, invariant 3).

-- ---------------------------------------------------------------- catalog
CREATE TABLE plans (
    plan_id           text PRIMARY KEY CHECK (plan_id ~ '^[a-z][a-z0-9_-]{0,62}$'),
    name              text NOT NULL,
    tier              integer NOT NULL CHECK (tier >= 0),
    is_default        boolean NOT NULL DEFAULT false,   -- the plan of a subject with no subscription
    family_pool       boolean NOT NULL DEFAULT false,   -- usage counts against the family's pool
    access_policy     jsonb NOT NULL DEFAULT '{}'::jsonb,  -- subscription status -> access level
    dunning_policy    jsonb NOT NULL DEFAULT '{}'::jsonb,  -- retry schedule, escalation
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX plans_one_default ON plans (is_default) WHERE is_default;

CREATE TABLE pricing_zones (
    zone_code   text PRIMARY KEY CHECK (zone_code ~ '^[a-z][a-z0-9_-]{0,31}$'),
    name        text NOT NULL,
    currency    text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    countries   text[] NOT NULL DEFAULT '{}'
);

-- Stripe price -> plan. A price that is missing here grants nothing.
CREATE TABLE plan_prices (
    price_id    text PRIMARY KEY CHECK (price_id <> ''),
    plan_id     text NOT NULL REFERENCES plans (plan_id) ON DELETE CASCADE,
    zone_code   text REFERENCES pricing_zones (zone_code),
    amount      bigint CHECK (amount >= 0),            -- minor units, informational
    currency    text CHECK (currency ~ '^[a-z]{3}$'),
    billing_interval text CHECK (billing_interval IN ('day', 'week', 'month', 'year', 'one_time'))
);
CREATE INDEX plan_prices_plan ON plan_prices (plan_id);

CREATE TABLE plan_features (
    plan_id         text NOT NULL REFERENCES plans (plan_id) ON DELETE CASCADE,
    feature_code    text NOT NULL CHECK (feature_code ~ '^[a-z][a-z0-9_.-]{0,62}$'),
    usage_limit     bigint CHECK (usage_limit >= 0),     -- NULL: unlimited or not metered
    limit_period    text NOT NULL DEFAULT 'none'
                    CHECK (limit_period IN ('none', 'day', 'month', 'billing_period')),
    enforcement     text NOT NULL DEFAULT 'hard' CHECK (enforcement IN ('hard', 'soft')),
    allow_release   boolean NOT NULL DEFAULT false,     -- negative increments allowed
    member_cap      bigint CHECK (member_cap >= 0),      -- per-member cap inside a family pool
    min_access      text NOT NULL DEFAULT 'full' CHECK (min_access IN ('full', 'reduced')),
    PRIMARY KEY (plan_id, feature_code)
);

-- ---------------------------------------------------------------- projections
CREATE TABLE customers (
    customer_id         text PRIMARY KEY CHECK (customer_id <> ''),
    user_id             text,
    family_id           text,
    email               text,
    created_at          timestamptz NOT NULL,
    last_event_id       text NOT NULL,
    last_event_created  timestamptz NOT NULL
);
CREATE INDEX customers_user ON customers (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX customers_family ON customers (family_id) WHERE family_id IS NOT NULL;

CREATE TABLE subscriptions (
    subscription_id       text PRIMARY KEY CHECK (subscription_id <> ''),
    customer_id           text NOT NULL,
    user_id               text,
    family_id             text,
    plan_id               text REFERENCES plans (plan_id),  -- NULL: price not in the catalog
    price_id              text NOT NULL,
    status                text NOT NULL CHECK (status IN (
                              'incomplete', 'incomplete_expired', 'trialing', 'active',
                              'past_due', 'unpaid', 'suspended', 'paused', 'canceled')),
    current_period_start  timestamptz,
    current_period_end    timestamptz,
    cancel_at_period_end  boolean NOT NULL DEFAULT false,
    cancel_at             timestamptz,
    canceled_at           timestamptz,
    trial_end             timestamptz,
    access_level          text NOT NULL DEFAULT 'blocked'
                          CHECK (access_level IN ('full', 'grace', 'reduced', 'blocked')),
    -- When the current status began (0002); readers add grace_days to it.
    status_since          timestamptz,
    created_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL,
    last_event_id         text NOT NULL,
    last_event_created    timestamptz NOT NULL,
    CHECK (current_period_end IS NULL OR current_period_start IS NULL
           OR current_period_end >= current_period_start)
);
CREATE INDEX subscriptions_user ON subscriptions (user_id, subscription_id) WHERE user_id IS NOT NULL;
CREATE INDEX subscriptions_family ON subscriptions (family_id, subscription_id) WHERE family_id IS NOT NULL;
CREATE INDEX subscriptions_customer ON subscriptions (customer_id);
CREATE INDEX subscriptions_unknown_price ON subscriptions (price_id) WHERE plan_id IS NULL;

-- Every customer.subscription.* event applied, older ones included (0002): the
-- status and price as of that event. status_since, the access level and its
-- changes, and the features a plan change took away are derived from it.
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

-- The latest period end of a subscription's paid invoices, a grow-only max (0002).
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

-- Each change of a subscription's access level, with the event that caused it.
CREATE TABLE access_changes (
    subscription_id   text NOT NULL,
    event_id          text NOT NULL,
    event_created     timestamptz NOT NULL,
    from_level        text NOT NULL CHECK (from_level IN ('full', 'grace', 'reduced', 'blocked')),
    to_level          text NOT NULL CHECK (to_level IN ('full', 'grace', 'reduced', 'blocked')),
    status            text NOT NULL,
    PRIMARY KEY (subscription_id, event_id)
);

-- What a subject may use. One row per (subject, feature, source): a subject
-- can hold a feature through a subscription and a one-time purchase at once.
CREATE TABLE entitlements (
    subject_type        text NOT NULL CHECK (subject_type IN ('user', 'family')),
    subject_id          text NOT NULL CHECK (subject_id <> ''),
    feature_code        text NOT NULL,
    source_type         text NOT NULL CHECK (source_type IN ('subscription', 'charge', 'checkout')),
    source_id           text NOT NULL,
    user_id             text,
    family_id           text,
    plan_id             text NOT NULL REFERENCES plans (plan_id),
    status              text NOT NULL CHECK (status IN ('active', 'expired', 'revoked', 'suspended')),
    access_level        text NOT NULL CHECK (access_level IN ('full', 'grace', 'reduced', 'blocked')),
    usage_limit         bigint CHECK (usage_limit >= 0),
    limit_period        text NOT NULL DEFAULT 'none',
    enforcement         text NOT NULL DEFAULT 'hard' CHECK (enforcement IN ('hard', 'soft')),
    granted_at          timestamptz NOT NULL,
    expires_at          timestamptz,
    revoked_at          timestamptz,
    last_event_id       text NOT NULL,
    last_event_created  timestamptz NOT NULL,
    PRIMARY KEY (subject_type, subject_id, feature_code, source_type, source_id)
);
CREATE INDEX entitlements_source ON entitlements (source_type, source_id);

CREATE TABLE payments (
    payment_id          text PRIMARY KEY CHECK (payment_id <> ''),
    customer_id         text,
    user_id             text,
    family_id           text,
    amount              bigint NOT NULL CHECK (amount >= 0),
    currency            text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    status              text NOT NULL CHECK (status IN (
                            'pending', 'requires_payment_method', 'requires_confirmation',
                            'requires_action', 'processing', 'requires_capture', 'succeeded',
                            'failed', 'canceled', 'refunded', 'partially_refunded', 'disputed')),
    amount_refunded     bigint NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
    payment_intent_id   text,
    charge_id           text UNIQUE,
    invoice_id          text,
    description         text,
    failure_code        text,
    failure_message     text,
    status_reason       text,               -- why an admin set the status (0002)
    metadata            jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    last_event_id       text NOT NULL,
    last_event_created  timestamptz NOT NULL,
    CHECK (amount_refunded <= amount)
);
CREATE INDEX payments_customer ON payments (customer_id, created_at DESC, payment_id);
CREATE INDEX payments_user ON payments (user_id, created_at DESC, payment_id) WHERE user_id IS NOT NULL;
CREATE INDEX payments_family ON payments (family_id, created_at DESC, payment_id) WHERE family_id IS NOT NULL;
CREATE INDEX payments_status ON payments (status, created_at DESC, payment_id);
CREATE INDEX payments_created ON payments (created_at DESC, payment_id);

-- One row per accepted usage increment (the seed's table).
CREATE TABLE usage_records (
    event_id          text PRIMARY KEY,
    idempotency_key   text NOT NULL,
    subject_type      text NOT NULL CHECK (subject_type IN ('user', 'family')),
    subject_id        text NOT NULL CHECK (subject_id <> ''),
    user_id           text,
    family_id         text,
    feature_code      text NOT NULL,
    amount            bigint NOT NULL,
    period_start      timestamptz NOT NULL,
    period_end        timestamptz NOT NULL,
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL,
    CHECK (period_end > period_start)
);
CREATE INDEX usage_records_subject ON usage_records (subject_type, subject_id, feature_code, period_start);

-- Usage per subject, feature and period: what CheckQuota falls back to.
CREATE TABLE usage_aggregates (
    subject_type      text NOT NULL CHECK (subject_type IN ('user', 'family')),
    subject_id        text NOT NULL,
    feature_code      text NOT NULL,
    period_start      timestamptz NOT NULL,
    period_end        timestamptz NOT NULL,
    used              bigint NOT NULL DEFAULT 0 CHECK (used >= 0),
    updated_at        timestamptz NOT NULL,
    PRIMARY KEY (subject_type, subject_id, feature_code, period_start),
    CHECK (period_end > period_start)
);
-- Per-member usage inside a family pool, for member caps.
CREATE TABLE usage_member_aggregates (
    family_id         text NOT NULL,
    user_id           text NOT NULL,
    feature_code      text NOT NULL,
    period_start      timestamptz NOT NULL,
    used              bigint NOT NULL DEFAULT 0 CHECK (used >= 0),
    PRIMARY KEY (family_id, user_id, feature_code, period_start)
);

CREATE TABLE dunning_cases (
    case_id             text PRIMARY KEY,
    invoice_id          text NOT NULL UNIQUE,
    customer_id         text NOT NULL,
    subscription_id     text,
    user_id             text,
    family_id           text,
    plan_id             text,
    state               text NOT NULL CHECK (state IN (
                            'open', 'retrying', 'action_required', 'escalated', 'recovered', 'closed')),
    attempt_count       integer NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    next_attempt_at     timestamptz,
    last_error          text,
    amount_due          bigint CHECK (amount_due >= 0),
    currency            text CHECK (currency ~ '^[a-z]{3}$'),
    opened_at           timestamptz NOT NULL,
    closed_at           timestamptz,
    last_event_id       text NOT NULL,
    last_event_created  timestamptz NOT NULL
);
CREATE INDEX dunning_cases_due ON dunning_cases (next_attempt_at)
    WHERE state IN ('open', 'retrying');
CREATE INDEX dunning_cases_subscription ON dunning_cases (subscription_id);

-- One-time purchases that grant a plan (0002): a checkout in payment mode, a
-- charge with a plan_id. Granted once the customer's user or family is known.
-- plan_id has no foreign key: a plan removed from the catalog grants nothing.
CREATE TABLE one_time_grants (
    source_type         text NOT NULL CHECK (source_type IN ('charge', 'checkout')),
    source_id           text NOT NULL CHECK (source_id <> ''),
    customer_id         text,  -- NULL: bought by a guest (0006)
    user_id             text,
    family_id           text,
    plan_id             text NOT NULL,
    granted_at          timestamptz NOT NULL,
    last_event_id       text NOT NULL,
    last_event_created  timestamptz NOT NULL,
    PRIMARY KEY (source_type, source_id)
);
CREATE INDEX one_time_grants_customer ON one_time_grants (customer_id);

-- Prices seen on subscriptions that the catalog does not know. Operators list
-- these; after adding the price, a replay grants what is due.
CREATE TABLE catalog_misses (
    price_id            text PRIMARY KEY,
    first_seen_at       timestamptz NOT NULL,
    last_seen_at        timestamptz NOT NULL,
    last_subscription_id text,
    last_event_id       text NOT NULL
);

-- ---------------------------------------------------------------- worker bookkeeping
-- The inbox: an event applied by a consumer. Inserted in the same transaction
-- as the event's effects, so a redelivered duplicate is a no-op.
CREATE TABLE processed_events (
    consumer        text NOT NULL,
    event_id        text NOT NULL,
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Per-partition high-water mark of each consumer, committed with the batch.
-- Also the projection's freshness: the newest event applied and when.
CREATE TABLE consumer_offsets (
    consumer            text NOT NULL,
    topic               text NOT NULL,
    kafka_partition     integer NOT NULL,
    next_offset         bigint NOT NULL CHECK (next_offset >= 0),
    last_event_id       text,
    last_event_created  timestamptz,
    applied_at          timestamptz NOT NULL DEFAULT now(),
    tail_event_id       text,
    PRIMARY KEY (consumer, topic, kafka_partition)
);

-- ---------------------------------------------------------------- 0003: dunning
ALTER TABLE dunning_cases ADD COLUMN price_id text;
ALTER TABLE dunning_cases ADD COLUMN last_attempt_at timestamptz;
ALTER TABLE dunning_cases ADD COLUMN escalated_at timestamptz;
ALTER TABLE dunning_cases ADD COLUMN restored_at timestamptz;
CREATE INDEX dunning_cases_restore ON dunning_cases (case_id)
    WHERE state = 'recovered' AND escalated_at IS NOT NULL AND restored_at IS NULL;

-- The dunning scheduler's ledger of side effects (not a projection; never replayed).
CREATE TABLE dunning_steps (
    case_id          text NOT NULL,
    step             text NOT NULL CHECK (step ~ '^(attempt-[1-9][0-9]*|escalate|restore)$'),
    after_attempts   integer NOT NULL CHECK (after_attempts >= 0),
    claimed_by       text NOT NULL,
    claimed_until    timestamptz NOT NULL,
    published_at     timestamptz,
    PRIMARY KEY (case_id, step)
);

-- ---------------------------------------------------------------- 0004: usage
-- What IncrementUsage answered, kept so a Redis rebuild can restore idempotency records.
ALTER TABLE usage_records ADD COLUMN used_after bigint;
ALTER TABLE usage_records ADD COLUMN usage_limit bigint;          -- NULL: unlimited
ALTER TABLE usage_records ADD COLUMN over_soft_limit boolean NOT NULL DEFAULT false;
CREATE UNIQUE INDEX usage_records_idempotency_key ON usage_records (idempotency_key);
CREATE INDEX usage_records_created ON usage_records (created_at);

ALTER TABLE usage_aggregates ADD COLUMN usage_limit bigint;       -- NULL: unlimited
CREATE INDEX usage_aggregates_period_end ON usage_aggregates (period_end);

-- ---------------------------------------------------------------- 0005: outbox
-- Messages a projection must emit, staged in its transaction and published
-- by a relay after the commit (at least once).
CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    consumer   text NOT NULL,
    payload    bytea NOT NULL,
    staged_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_consumer ON outbox (consumer, id);

-- ---------------------------------------------------------------- 0007: cache_refresh_pending
-- Subjects whose Redis answer may be older than Postgres (set in the batch's
-- transaction, cleared once Redis holds the new answer).
CREATE TABLE cache_refresh_pending (
    consumer     text NOT NULL,
    subject_type text NOT NULL,
    subject_id   text NOT NULL,
    batch_txid   bigint NOT NULL,
    marked_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, subject_type, subject_id)
);

-- ---------------------------------------------------------------- 0008: inbox age
CREATE INDEX processed_events_age ON processed_events (consumer, processed_at);

-- ---------------------------------------------------------------- 0010: usage thresholds
-- Each usage threshold (catalog `alerts`) crossed, at most once per scope, subject,
-- member, feature and period.
CREATE TABLE usage_thresholds (
    scope             text NOT NULL CHECK (scope IN ('pool', 'member')),
    subject_type      text NOT NULL CHECK (subject_type IN ('user', 'family')),
    subject_id        text NOT NULL,
    member_id         text NOT NULL DEFAULT '',  -- the member (scope member); '' for the pool
    feature_code      text NOT NULL,
    period_start      timestamptz NOT NULL,
    threshold         text NOT NULL,             -- as the catalog writes it: '80%' or '1000'
    period_end        timestamptz NOT NULL,
    plan_id           text NOT NULL,
    threshold_units   bigint NOT NULL,
    usage             bigint NOT NULL,           -- the counter right after the crossing increment
    usage_limit       bigint,                    -- limit (pool) or member cap (member); NULL: none
    event_id          text NOT NULL,             -- the usage event that crossed it
    user_id           text,                      -- who made that increment
    crossed_at        timestamptz NOT NULL,      -- that increment's time (from the log)
    PRIMARY KEY (scope, subject_type, subject_id, member_id, feature_code, period_start, threshold)
);

-- ---------------------------------------------------------------- 0011: entitlement history
-- What CheckEntitlement(as_of) reads: the snapshot fields deciding expiry, per history
-- entry, and every paid invoice's period end (paid_periods keeps only the maximum).
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

-- ---------------------------------------------------------------- 0012: trace context
ALTER TABLE dunning_cases ADD COLUMN traceparent text;
ALTER TABLE outbox ADD COLUMN traceparent text;
