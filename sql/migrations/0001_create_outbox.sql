-- The outbox table. Applications insert one row per event in the same transaction as their
-- business change; outbox-relay publishes it to Kafka and then sets published_at.
CREATE TABLE IF NOT EXISTS outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Stable id of the event; sent as the Kafka header "event_id" so consumers deduplicate.
    event_id     uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    topic        text NOT NULL,
    -- Record key: events of one key keep their order on one partition.
    key          text,
    -- Record value (JSON text); NULL publishes a tombstone.
    payload      jsonb,
    -- Record headers: a JSON object of string values.
    headers      jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    attempts     int NOT NULL DEFAULT 0,
    last_error   text
);

-- Finds unpublished rows in id order without scanning the published ones.
CREATE INDEX IF NOT EXISTS outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;
