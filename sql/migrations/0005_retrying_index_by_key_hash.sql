-- Recording a failure never fails on the row's key.
--
-- 0002's outbox_retrying_idx was a btree on (key, id). A btree entry must fit in about a third
-- of a page (2,704 bytes), so a failing row with a long key (3,200 characters, say) could not
-- be marked as failing: PostgreSQL refused the UPDATE with "index row size ... exceeds btree
-- version 4 maximum 2704", and the relay retried recording that failure forever while every
-- other key waited. A hash index stores a 4-byte hash of the key, whatever its length, and
-- answers the claim's lookup (`e.key = a.key`; `e.id < a.id` is then checked on the few
-- failing rows of that key). It stays partial: only rows that have failed at least once.
--
-- Built inside migrate's transaction, so not CONCURRENTLY: building it reads the table once
-- while writers wait. On a large, busy table run these three first, outside a transaction:
--   CREATE INDEX CONCURRENTLY outbox_retrying_hash_idx ON outbox USING hash (key)
--       WHERE published_at IS NULL AND attempts > 0;
--   DROP INDEX CONCURRENTLY outbox_retrying_idx;
--   ALTER INDEX outbox_retrying_hash_idx RENAME TO outbox_retrying_idx;
-- and this migration finds the hash index in place and leaves it alone.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class AS c JOIN pg_am AS am ON am.oid = c.relam
               WHERE c.oid = to_regclass('outbox_retrying_idx') AND am.amname <> 'hash') THEN
        DROP INDEX outbox_retrying_idx;
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS outbox_retrying_idx ON outbox USING hash (key)
    WHERE published_at IS NULL AND attempts > 0;
