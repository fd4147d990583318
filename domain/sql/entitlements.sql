-- The entitlements read model: what its writer (services/entitlements) stores and
-- every reader (services/api_grpc) reads back, one query for both (domain/entitlements.py).

-- name: subject_entitlements
-- Every row of the given subjects, for the Redis answer; the subscription's status
-- and status_since tell when a grace period ends. Times as Unix seconds (truncated, as
-- int(datetime.timestamp()) does), the version as (created, event id): a row is
-- SubjectRow's arguments, without a datetime built and converted back per value.
SELECT e.subject_type, e.subject_id, e.feature_code, e.source_type, e.source_id, e.plan_id,
       e.status, e.access_level, e.usage_limit, e.limit_period, e.enforcement,
       trunc(extract(epoch FROM e.expires_at))::bigint,
       trunc(extract(epoch FROM e.last_event_created))::bigint, e.last_event_id,
       s.status AS subscription_status, trunc(extract(epoch FROM s.status_since))::bigint
FROM entitlements e
LEFT JOIN subscriptions s
       ON e.source_type = 'subscription' AND s.subscription_id = e.source_id
WHERE (e.subject_type, e.subject_id) IN (
    SELECT * FROM unnest(%(subject_types)b::text[], %(subject_ids)b::text[]));
