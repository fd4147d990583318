-- The recorded history read by CheckEntitlement(as_of) and ListAccessChanges
-- (domain/entitlements_asof.py). Written by the entitlements worker only.

-- name: asof_history
-- Every history entry created until the moment, of the subscriptions of the subject
-- (by their user or family; those are facts, filled once).
SELECT s.subscription_id, s.user_id, s.family_id, h.event_created, h.event_id, h.status, h.price_id,
       h.current_period_end, h.cancel_at_period_end, h.cancel_at, h.status_only
FROM subscriptions s
JOIN subscription_history h ON h.subscription_id = s.subscription_id
WHERE (s.user_id = %(user_id)s OR s.family_id = %(family_id)s)
  AND h.event_created <= to_timestamp(%(at)s);

-- name: asof_paid
SELECT p.subscription_id, p.event_created, p.event_id, p.paid_through
FROM subscriptions s
JOIN paid_period_events p ON p.subscription_id = s.subscription_id
WHERE (s.user_id = %(user_id)s OR s.family_id = %(family_id)s)
  AND p.event_created <= to_timestamp(%(at)s);

-- name: asof_grants
SELECT source_type, source_id, user_id, family_id, plan_id, granted_at, last_event_id, last_event_created
FROM one_time_grants
WHERE (user_id = %(user_id)s OR family_id = %(family_id)s)
  AND granted_at <= to_timestamp(%(at)s);

-- name: access_changes_of_subject
-- Oldest first; `after` is the last row's (created, subscription, event).
SELECT extract(epoch FROM a.event_created)::bigint AS changed_at, a.subscription_id, a.event_id,
       a.from_level, a.to_level, a.status, h.price_id, s.user_id, s.family_id
FROM subscriptions s
JOIN access_changes a ON a.subscription_id = s.subscription_id
LEFT JOIN subscription_history h ON h.subscription_id = a.subscription_id AND h.event_id = a.event_id
WHERE (s.user_id = %(user_id)s OR s.family_id = %(family_id)s)
  AND a.event_created >= to_timestamp(%(since)s) AND a.event_created < to_timestamp(%(until)s)
  AND (%(after_created)s::bigint IS NULL
       OR (a.event_created, a.subscription_id COLLATE "C", a.event_id COLLATE "C")
          > (to_timestamp(%(after_created)s), %(after_subscription)s::text, %(after_event)s::text))
ORDER BY a.event_created, a.subscription_id COLLATE "C", a.event_id COLLATE "C"
LIMIT %(limit)s;
