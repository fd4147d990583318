-- 0007: which Redis answers may be stale. The entitlements worker marks every
-- subject of a batch here in the batch's own transaction and clears the mark
-- (in its next transaction) once Redis holds the new answer. A crash, a kill or
-- a failed write between the commit and Redis leaves the mark, and the worker
-- rewrites those subjects from Postgres when it starts and before its next
-- batches, so Redis follows Postgres after any crash. `batch_txid` is the
-- transaction that set the mark: a worker clears only its own marks, never one
-- another replica set later.
CREATE TABLE IF NOT EXISTS cache_refresh_pending (
    consumer     text NOT NULL,
    subject_type text NOT NULL,
    subject_id   text NOT NULL,
    batch_txid   bigint NOT NULL,
    marked_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, subject_type, subject_id)
);
