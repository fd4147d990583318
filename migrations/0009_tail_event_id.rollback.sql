ALTER TABLE consumer_offsets DROP COLUMN tail_event_id;
