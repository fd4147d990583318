-- Bookkeeping of the shared worker runtime (shared/worker.py).

-- name: claim_events
-- The inbox guard: only the rows this transaction inserts are new. A concurrent
-- worker inserting the same event waits on the unique index until we commit,
-- then skips it, so an event is applied at most once even across a rebalance.
INSERT INTO processed_events (consumer, event_id, topic, kafka_partition, kafka_offset)
SELECT %(consumer)s, e.event_id, e.topic, e.kafka_partition, e.kafka_offset
FROM unnest(%(event_ids)b::text[], %(topics)b::text[], %(partitions)s::int[], %(offsets)s::bigint[])
     AS e(event_id, topic, kafka_partition, kafka_offset)
ON CONFLICT (consumer, event_id) DO NOTHING
RETURNING event_id;

-- name: advance_offsets
INSERT INTO consumer_offsets AS o
    (consumer, topic, kafka_partition, next_offset, last_event_id, last_event_created, applied_at,
     tail_event_id)
SELECT %(consumer)s, p.topic, p.kafka_partition, p.next_offset, p.last_event_id,
       to_timestamp(p.last_event_created), now(), p.tail_event_id
FROM unnest(%(topics)b::text[], %(partitions)s::int[], %(next_offsets)s::bigint[],
            %(last_event_ids)b::text[], %(last_event_created)s::bigint[], %(tail_event_ids)b::text[])
     AS p(topic, kafka_partition, next_offset, last_event_id, last_event_created, tail_event_id)
ON CONFLICT (consumer, topic, kafka_partition) DO UPDATE SET
    next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset),
    tail_event_id = CASE WHEN EXCLUDED.next_offset >= o.next_offset
                         THEN EXCLUDED.tail_event_id ELSE o.tail_event_id END,
    last_event_id = CASE
        WHEN EXCLUDED.last_event_created IS NOT NULL
         AND EXCLUDED.last_event_created >= coalesce(o.last_event_created, '-infinity')
        THEN EXCLUDED.last_event_id ELSE o.last_event_id END,
    last_event_created = GREATEST(o.last_event_created, EXCLUDED.last_event_created),
    applied_at = now();

-- name: committed_offsets
SELECT kafka_partition, next_offset
FROM consumer_offsets
WHERE consumer = %(consumer)s AND topic = %(topic)s;

-- name: committed_tails
-- The event id of the record just below each mark (migration 0009).
SELECT kafka_partition, tail_event_id
FROM consumer_offsets
WHERE consumer = %(consumer)s AND topic = %(topic)s AND tail_event_id IS NOT NULL;

-- name: lock_consumer
-- Every batch holds this lock shared (replicas do not block each other);
-- `replay --swap` takes it exclusively while it switches schemas, so no batch
-- commits on either side of the switch half-way.
SELECT pg_advisory_xact_lock_shared(hashtext('paymentsvc.consumer.' || %(consumer)s));

-- name: lock_consumer_exclusive
SELECT pg_advisory_xact_lock(hashtext('paymentsvc.consumer.' || %(consumer)s));

-- name: autovacuum_enabled
SELECT current_setting('autovacuum')::boolean;

-- name: stale_tables
-- Tables of the current schema that changed by more than autovacuum's own
-- analyze threshold (50 rows + 10 %) since their statistics were taken.
SELECT s.relname
FROM pg_stat_user_tables s
JOIN pg_class c ON c.oid = s.relid
WHERE s.schemaname = current_schema()
  AND s.n_mod_since_analyze > 50 + 0.1 * greatest(c.reltuples, 0);

-- name: prune_inbox
-- At most %(batch)s of the consumer's inbox rows older than the cutoff (Unix seconds),
-- oldest first through processed_events_age; rows a batch holds are skipped.
DELETE FROM processed_events
WHERE (consumer, event_id) IN (
    SELECT consumer, event_id FROM processed_events
    WHERE consumer = %(consumer)s AND processed_at < to_timestamp(%(cutoff)s)
    ORDER BY processed_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED);
