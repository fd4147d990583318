-- Queries of the usage worker's thresholds (services/usage/thresholds.py). Loaded by
-- shared/sqlfile.py. Only the usage worker writes usage_thresholds.

-- name: pools_before
-- The watched pool counters before the batch is added, locked until the batch
-- commits. A counter without a row is 0 (absent from the result).
SELECT a.subject_type, a.subject_id, a.feature_code, extract(epoch FROM a.period_start)::bigint, a.used
FROM usage_aggregates a
JOIN unnest(%(subject_types)s::text[], %(subject_ids)s::text[], %(features)s::text[],
            %(period_starts)s::bigint[]) AS r(subject_type, subject_id, feature_code, period_start)
  ON a.subject_type = r.subject_type AND a.subject_id = r.subject_id
 AND a.feature_code = r.feature_code AND a.period_start = to_timestamp(r.period_start)
ORDER BY 1, 2, 3, 4
FOR UPDATE OF a;

-- name: members_before
SELECT m.family_id, m.user_id, m.feature_code, extract(epoch FROM m.period_start)::bigint, m.used
FROM usage_member_aggregates m
JOIN unnest(%(family_ids)s::text[], %(user_ids)s::text[], %(features)s::text[],
            %(period_starts)s::bigint[]) AS r(family_id, user_id, feature_code, period_start)
  ON m.family_id = r.family_id AND m.user_id = r.user_id
 AND m.feature_code = r.feature_code AND m.period_start = to_timestamp(r.period_start)
ORDER BY 1, 2, 3, 4
FOR UPDATE OF m;

-- name: insert_thresholds
-- The batch's crossings; one already recorded (an earlier batch crossed it in this
-- period) is skipped. Returns the keys inserted: only those are published.
INSERT INTO usage_thresholds (scope, subject_type, subject_id, member_id, feature_code, period_start,
                              threshold, period_end, plan_id, threshold_units, usage, usage_limit,
                              event_id, user_id, crossed_at)
SELECT r.scope, r.subject_type, r.subject_id, r.member_id, r.feature_code, to_timestamp(r.period_start),
       r.threshold, to_timestamp(r.period_end), r.plan_id, r.units, r.usage, nullif(r.usage_limit, -1),
       r.event_id, nullif(r.user_id, ''), to_timestamp(r.created_ms / 1000.0)
FROM unnest(%(scopes)s::text[], %(subject_types)s::text[], %(subject_ids)s::text[],
            %(member_ids)s::text[], %(features)s::text[], %(period_starts)s::bigint[],
            %(thresholds)s::text[], %(period_ends)s::bigint[], %(plan_ids)s::text[],
            %(units)s::bigint[], %(usages)s::bigint[], %(limits)s::bigint[], %(event_ids)s::text[],
            %(user_ids)s::text[], %(created_ms)s::bigint[])
     AS r(scope, subject_type, subject_id, member_id, feature_code, period_start, threshold, period_end,
          plan_id, units, usage, usage_limit, event_id, user_id, created_ms)
ORDER BY 1, 2, 3, 4, 5, 6, 7
ON CONFLICT DO NOTHING
RETURNING scope, subject_type, subject_id, member_id, feature_code,
          extract(epoch FROM period_start)::bigint, threshold;
