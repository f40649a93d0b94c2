-- The consumer side of effectively-once processing. A consumer records each event it applies
-- here, in the same transaction as the effect, keyed by the event_id header the relay sends.
-- A redelivered or duplicated event finds its row and is skipped. outbox_relay::inbox does
-- this for Rust consumers; the table is plain SQL so that any consumer can do the same.
CREATE TABLE IF NOT EXISTS outbox_inbox (
    -- Which logical consumer applied the event (usually its consumer group): two consumers of
    -- the same topic each apply every event once.
    consumer        text        NOT NULL,
    event_id        text        NOT NULL,
    topic           text        NOT NULL,
    kafka_partition int         NOT NULL,
    kafka_offset    bigint      NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Pruning deletes by age: keep rows longer than the topic's retention plus the longest time a
-- consumer may lag or replay, or a replayed event would be applied again.
CREATE INDEX IF NOT EXISTS outbox_inbox_processed_at_idx ON outbox_inbox (processed_at);
