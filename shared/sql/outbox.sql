-- The transactional outbox (shared/outbox.py).

-- name: stage
INSERT INTO outbox (consumer, payload)
SELECT %(consumer)s, p FROM unnest(%(payloads)s::bytea[]) WITH ORDINALITY AS t(p, n) ORDER BY n;

-- name: claim
-- Oldest first, and skip what another relay holds, so replicas share the work.
SELECT id, payload FROM outbox
WHERE consumer = %(consumer)s
ORDER BY id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: delete
DELETE FROM outbox WHERE id = ANY(%(ids)s::bigint[]);
