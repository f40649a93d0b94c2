-- Prepares Debezium's outbox table for outbox-relay, once, on the live table.
--
-- For the table of Debezium's documentation
--   CREATE TABLE outboxevent (id uuid NOT NULL PRIMARY KEY, aggregatetype varchar(255) NOT NULL,
--                             aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL,
--                             payload jsonb);
-- and used with examples/debezium.toml. Every column added has a default or is NULL, so the
-- application's INSERT stays as it is, and none rewrites the table (a constant default is kept
-- in the catalog; a later SET DEFAULT applies to new rows only). Debezium may keep running
-- meanwhile: its router ignores columns it is not configured for.
--
-- Run it with psql (the index is built CONCURRENTLY, which cannot run inside a transaction):
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f examples/debezium.sql

-- Per-aggregate order. A uuid orders nothing, so rows get a number from a sequence without a
-- cache (one session cannot take a block of numbers ahead of another), in insertion order.
-- Rows already in the table share 0: they are the ones Debezium published (see the README's
-- migration guide), and the relay never sees them.
CREATE SEQUENCE IF NOT EXISTS outboxevent_seq_seq AS bigint NO CYCLE;
ALTER TABLE outboxevent ADD COLUMN IF NOT EXISTS seq bigint NOT NULL DEFAULT 0;
ALTER SEQUENCE outboxevent_seq_seq OWNED BY outboxevent.seq;
ALTER TABLE outboxevent ALTER COLUMN seq SET DEFAULT nextval('outboxevent_seq_seq');

-- Commit-order safety: the inserting transaction, so that a row is published only once every
-- transaction that began writing before it has ended (rows already there stay NULL, committed).
ALTER TABLE outboxevent ADD COLUMN IF NOT EXISTS xact_id xid8;
ALTER TABLE outboxevent ALTER COLUMN xact_id SET DEFAULT pg_current_xact_id();

-- Poison rows: a row the broker refuses is counted, retried after a growing wait, given up on
-- after relay.max_attempts, and keeps its error.
ALTER TABLE outboxevent ADD COLUMN IF NOT EXISTS attempts int NOT NULL DEFAULT 0;
ALTER TABLE outboxevent ADD COLUMN IF NOT EXISTS last_error text;
ALTER TABLE outboxevent ADD COLUMN IF NOT EXISTS last_attempt_at timestamptz;
ALTER TABLE outboxevent ADD COLUMN IF NOT EXISTS failed_at timestamptz;

-- The index claims walk, in the order of seq.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outboxevent_seq_idx ON outboxevent (seq);
-- A key's earlier failing rows, which each claim looks up; only failing rows are in it. A hash
-- index, so that no aggregate id is too long for it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outboxevent_retrying_idx ON outboxevent USING hash (aggregateid)
    WHERE attempts > 0;

-- The relay's role needs (outbox-relay check prints these for your role name):
--   GRANT SELECT (id, aggregatetype, aggregateid, type, payload, seq, xact_id, attempts,
--                 last_error, last_attempt_at, failed_at) ON outboxevent TO relay;
--   GRANT UPDATE (attempts, last_error, last_attempt_at, failed_at) ON outboxevent TO relay;
--   GRANT DELETE ON outboxevent TO relay;
