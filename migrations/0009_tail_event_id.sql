-- 0009: what identifies the log a worker's marks were made on. The event id of the
-- record just below each mark (the last one the worker passed on that partition,
-- applied, duplicate or dead-lettered); on assignment the worker reads the record
-- below its mark and compares (shared/consumer.py), so a recreated topic whose
-- offsets happen to line up with the old marks is recognised. Tansu gives no topic ids.
ALTER TABLE consumer_offsets ADD COLUMN tail_event_id text;
