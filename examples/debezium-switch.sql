-- The switch from Debezium's outbox router to outbox-relay, at one commit (the README's
-- migration guide walks through the steps around it). Run it as the owner of the connector's
-- publication (or a superuser), once examples/debezium.sql has run and the applications no
-- longer delete their outbox rows:
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -v publication=dbz_publication -f examples/debezium-switch.sql
--
-- In one transaction it waits for the transactions writing the table to end, holds new INSERTs
-- for the few milliseconds until it commits, writes a marker row, and stops the connector's
-- publication from publishing inserts: Debezium streams every row committed before this commit
-- (the marker last of them, routed to topic outbox.event.outbox_relay_switch, which must exist)
-- and none after it. Rows after it are the relay's. Table outbox_relay_switch keeps the last row
-- that is Debezium's, for the steps after.
--
-- The publication stops publishing inserts of every table in it: this is for a connector that
-- relays the outbox table alone, as Debezium's outbox setups do. If yours captures other tables
-- too, and its publication lists tables (publication.autocreate.mode=filtered), replace the
-- ALTER PUBLICATION line by: ALTER PUBLICATION :"publication" DROP TABLE outboxevent;
--
-- The marker's aggregatetype is outbox_relay_switch unless -v marker=NAME says otherwise.
--
-- If it cannot get the lock within lock_timeout (a long transaction writes the table), it
-- fails and changes nothing: run it again.

\set ON_ERROR_STOP on
\if :{?marker}
\else
\set marker outbox_relay_switch
\endif
BEGIN;
SET LOCAL lock_timeout = '5s';
LOCK TABLE outboxevent IN SHARE ROW EXCLUSIVE MODE;
INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload)
    VALUES (gen_random_uuid(), :'marker', :'marker', 'OutboxRelaySwitch', NULL);
ALTER PUBLICATION :"publication" SET (publish = 'update, delete');
CREATE TABLE outbox_relay_switch AS
    SELECT o.seq AS last_debezium_seq, o.id AS marker_id, now() AS switched_at
    FROM outboxevent AS o WHERE o.aggregatetype = :'marker' ORDER BY o.seq DESC LIMIT 1;
COMMIT;
SELECT last_debezium_seq, marker_id FROM outbox_relay_switch;
