-- 0008: the inbox is bounded. The pruner deletes a consumer's oldest rows in small
-- batches (shared/inbox.py); this index lets it find them without a scan.
CREATE INDEX processed_events_age ON processed_events (consumer, processed_at);
