-- 0010: usage thresholds crossed (catalog `alerts`). The usage worker records each
-- crossing here in the batch's transaction and stages its usage.threshold_crossed
-- event in the outbox; the primary key makes a threshold fire at most once per
-- scope, subject, member, feature and period (docs/catalog.md, "Alerts").
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
