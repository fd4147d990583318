-- The transactional outbox (shared/outbox.py).

-- name: stage
INSERT INTO outbox (consumer, payload, traceparent)
SELECT %(consumer)s, p, nullif(tp, '')
FROM unnest(%(payloads)s::bytea[], %(traceparents)s::text[]) WITH ORDINALITY AS t(p, tp, n) ORDER BY n;

-- name: claim
-- Oldest first, and skip what another relay holds, so replicas share the work.
SELECT id, payload, traceparent FROM outbox
WHERE consumer = %(consumer)s
ORDER BY id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: delete
DELETE FROM outbox WHERE id = ANY(%(ids)s::bigint[]);
