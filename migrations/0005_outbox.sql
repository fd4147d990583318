-- 0005: a transactional outbox. A projection stages the messages it must emit
-- (e.g. dunning notices) in the same transaction as its rows; a relay publishes
-- them after the commit and deletes them once the broker acknowledged. So a
-- crash between the commit and the publish delays a message, never loses it.
CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    consumer   text NOT NULL,
    payload    bytea NOT NULL,
    staged_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_consumer ON outbox (consumer, id);
