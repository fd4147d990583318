-- Queries of services/usage (the worker, the cache rebuild) and of the API's usage reads.
-- Loaded by shared/sqlfile.py. Only the usage worker writes these tables.

-- name: insert_records
-- The batch's increments; a key recorded before is skipped, and only the rows this
-- statement inserted are returned (and added to the aggregates).
INSERT INTO usage_records (event_id, idempotency_key, subject_type, subject_id, user_id, family_id,
                           feature_code, amount, period_start, period_end, metadata, created_at,
                           used_after, usage_limit, over_soft_limit)
SELECT r.event_id, r.idempotency_key, r.subject_type, r.subject_id, nullif(r.user_id, ''),
       nullif(r.family_id, ''), r.feature_code, r.amount, to_timestamp(r.period_start),
       to_timestamp(r.period_end), r.metadata::jsonb, to_timestamp(r.created_ms / 1000.0),
       r.used_after, nullif(r.usage_limit, -1), r.over_soft_limit
FROM unnest(%(event_ids)s::text[], %(keys)s::text[], %(subject_types)s::text[],
            %(subject_ids)s::text[], %(user_ids)s::text[], %(family_ids)s::text[],
            %(features)s::text[], %(amounts)s::bigint[], %(period_starts)s::bigint[],
            %(period_ends)s::bigint[], %(metadata)s::text[], %(created_ms)s::bigint[],
            %(used_after)s::bigint[], %(limits)s::bigint[], %(over)s::boolean[])
     AS r(event_id, idempotency_key, subject_type, subject_id, user_id, family_id, feature_code,
          amount, period_start, period_end, metadata, created_ms, used_after, usage_limit,
          over_soft_limit)
ON CONFLICT DO NOTHING
RETURNING event_id;

-- name: ensure_aggregates
-- The (pool, feature, period) rows of the batch exist, at zero when new.
INSERT INTO usage_aggregates (subject_type, subject_id, feature_code, period_start, period_end,
                              used, updated_at)
SELECT r.subject_type, r.subject_id, r.feature_code, to_timestamp(r.period_start),
       to_timestamp(r.period_end), 0, now()
FROM unnest(%(subject_types)s::text[], %(subject_ids)s::text[], %(features)s::text[],
            %(period_starts)s::bigint[], %(period_ends)s::bigint[])
     AS r(subject_type, subject_id, feature_code, period_start, period_end)
ON CONFLICT DO NOTHING;

-- name: add_to_aggregates
-- One entry per (pool, feature, period), its amounts summed by the caller. Never below
-- zero (a release is clamped in Redis already; this is a guard).
UPDATE usage_aggregates a
SET used = greatest(0, a.used + r.amount), updated_at = now(), usage_limit = nullif(r.usage_limit, -1)
FROM unnest(%(subject_types)s::text[], %(subject_ids)s::text[], %(features)s::text[],
            %(period_starts)s::bigint[], %(amounts)s::bigint[], %(limits)s::bigint[])
     AS r(subject_type, subject_id, feature_code, period_start, amount, usage_limit)
WHERE a.subject_type = r.subject_type AND a.subject_id = r.subject_id
  AND a.feature_code = r.feature_code AND a.period_start = to_timestamp(r.period_start);

-- name: ensure_member_aggregates
INSERT INTO usage_member_aggregates (family_id, user_id, feature_code, period_start, used)
SELECT r.family_id, r.user_id, r.feature_code, to_timestamp(r.period_start), 0
FROM unnest(%(family_ids)s::text[], %(user_ids)s::text[], %(features)s::text[],
            %(period_starts)s::bigint[])
     AS r(family_id, user_id, feature_code, period_start)
ON CONFLICT DO NOTHING;

-- name: add_to_member_aggregates
UPDATE usage_member_aggregates m
SET used = greatest(0, m.used + r.amount)
FROM unnest(%(family_ids)s::text[], %(user_ids)s::text[], %(features)s::text[],
            %(period_starts)s::bigint[], %(amounts)s::bigint[])
     AS r(family_id, user_id, feature_code, period_start, amount)
WHERE m.family_id = r.family_id AND m.user_id = r.user_id
  AND m.feature_code = r.feature_code AND m.period_start = to_timestamp(r.period_start);

-- name: billing_period
-- The current period of the subscription behind the subject's entitlement to a feature
-- on a plan (the newest, when there are several).
SELECT extract(epoch FROM s.current_period_start)::bigint,
       extract(epoch FROM s.current_period_end)::bigint
FROM entitlements e
JOIN subscriptions s ON e.source_type = 'subscription' AND s.subscription_id = e.source_id
WHERE (e.subject_type, e.subject_id) IN (
    SELECT * FROM unnest(%(subject_types)s::text[], %(subject_ids)s::text[]))
  AND e.feature_code = %(feature_code)s AND e.plan_id = %(plan_id)s
  AND s.current_period_start IS NOT NULL AND s.current_period_end IS NOT NULL
ORDER BY s.current_period_end DESC
LIMIT 1;

-- name: used_in_periods
-- What the worker has recorded for the given (pool, feature, period) keys.
SELECT r.i, coalesce(a.used, 0)
FROM unnest(%(subject_types)s::text[], %(subject_ids)s::text[], %(features)s::text[],
            %(period_starts)s::bigint[]) WITH ORDINALITY
     AS r(subject_type, subject_id, feature_code, period_start, i)
LEFT JOIN usage_aggregates a
       ON a.subject_type = r.subject_type AND a.subject_id = r.subject_id
      AND a.feature_code = r.feature_code AND a.period_start = to_timestamp(r.period_start)
ORDER BY r.i;

-- name: list_usage
-- Newest period first, then feature and pool; `after` is the last row's cursor.
SELECT subject_type, subject_id, feature_code,
       extract(epoch FROM period_start)::bigint AS period_start,
       extract(epoch FROM period_end)::bigint AS period_end, used, usage_limit
FROM usage_aggregates
WHERE (subject_type, subject_id) IN (
    SELECT * FROM unnest(%(subject_types)s::text[], %(subject_ids)s::text[]))
  AND (%(feature_code)s::text IS NULL OR feature_code = %(feature_code)s)
  AND (%(after_start)s::bigint IS NULL
       OR (extract(epoch FROM period_start)::bigint < %(after_start)s)
       OR (extract(epoch FROM period_start)::bigint = %(after_start)s
           AND (feature_code COLLATE "C", subject_type COLLATE "C", subject_id COLLATE "C")
               > (%(after_feature)s::text, %(after_type)s::text, %(after_id)s::text)))
ORDER BY period_start DESC, feature_code COLLATE "C", subject_type COLLATE "C", subject_id COLLATE "C"
LIMIT %(limit)s;

-- name: running_aggregates
-- Every counter of a period that has not ended: what the Redis counters must hold.
SELECT subject_type, subject_id, feature_code, extract(epoch FROM period_start)::bigint,
       extract(epoch FROM period_end)::bigint, used
FROM usage_aggregates
WHERE period_end > to_timestamp(%(now)s);

-- name: running_member_aggregates
SELECT m.family_id, m.user_id, m.feature_code, extract(epoch FROM m.period_start)::bigint,
       extract(epoch FROM a.period_end)::bigint, m.used
FROM usage_member_aggregates m
JOIN usage_aggregates a
  ON a.subject_type = 'family' AND a.subject_id = m.family_id
 AND a.feature_code = m.feature_code AND a.period_start = m.period_start
WHERE a.period_end > to_timestamp(%(now)s);

-- name: recent_records
-- The increments whose idempotency records Redis must still hold.
SELECT idempotency_key, subject_type, subject_id, coalesce(user_id, ''), coalesce(family_id, ''),
       feature_code, amount, extract(epoch FROM period_start)::bigint,
       extract(epoch FROM period_end)::bigint, (extract(epoch FROM created_at) * 1000)::bigint,
       metadata, coalesce(used_after, 0), coalesce(usage_limit, -1), over_soft_limit
FROM usage_records
WHERE created_at > to_timestamp(%(since)s);

-- name: worker_positions
-- The usage worker's next offset per partition of its topic.
SELECT kafka_partition, next_offset FROM consumer_offsets
WHERE consumer = 'usage' AND topic = %(topic)s;
