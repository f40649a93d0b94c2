-- Commit-order safety, poison rows and wake-ups. Adds nullable columns and defaults only, so it
-- does not rewrite an existing table.

-- The id of the inserting transaction. Ids are assigned at insert, not at commit, so a lower id
-- can become visible after higher ones; the relay publishes a row only once its transaction
-- and every transaction that started writing before it have finished (its xact_id is below the
-- oldest running transaction), so a late-committing lower id is never overtaken within its key
-- and never skipped. NULL (rows from before this migration) means "ready".
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS xact_id xid8;
ALTER TABLE outbox ALTER COLUMN xact_id SET DEFAULT pg_current_xact_id();

-- When the last failed attempt happened (retries back off from it), and when the relay gave
-- up on the row: a failed row is not retried until `outbox-relay retry` re-queues it.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS last_attempt_at timestamptz;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS failed_at timestamptz;

-- Rows that have failed at least once, by key: the claim looks here for an earlier row that
-- holds its key back. Small, because only failing rows are in it.
CREATE INDEX IF NOT EXISTS outbox_retrying_idx ON outbox (key, id)
    WHERE published_at IS NULL AND attempts > 0;

-- Wakes the relay when rows commit (NOTIFY is delivered at commit); polling remains the
-- fallback, for example behind a connection pooler that drops notifications.
CREATE OR REPLACE FUNCTION outbox_relay_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_relay', TG_TABLE_NAME);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS outbox_relay_notify ON outbox;
CREATE TRIGGER outbox_relay_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_relay_notify();
