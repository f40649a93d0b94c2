-- Commit-order safety, poison rows and wake-ups. Adds nullable columns and defaults only, so it
-- does not rewrite an existing table.

-- The snapshot horizon of the inserting statement: every transaction with an id below it had
-- either finished or was running when the row was inserted. The relay publishes a row only
-- once all of those have finished, so a row with a lower id that commits late (its
-- transaction was still open) is never overtaken by this one. NULL (rows from before this
-- migration) means "ready".
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS xid_horizon xid8;
ALTER TABLE outbox ALTER COLUMN xid_horizon SET DEFAULT pg_snapshot_xmax(pg_current_snapshot());

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
