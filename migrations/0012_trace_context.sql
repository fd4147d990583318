-- 0012: the trace context of what caused a row, so the work it causes later continues
-- that trace (shared/tracing.py). A dunning case keeps the `traceparent` of the event
-- that last changed it (its scheduler steps continue it); an outbox row keeps the one
-- of the batch that staged it (its relay publishes under it). A W3C header value, or NULL.
-- IF NOT EXISTS: this migration was first written as 0010_trace_context, and a database
-- that applied it under that id must migrate cleanly (as 0007 did before).
ALTER TABLE dunning_cases ADD COLUMN IF NOT EXISTS traceparent text;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS traceparent text;
