-- The relay's own login role, with only what `outbox-relay run` needs on the standard outbox
-- table (sql/migrations/). The schema is the owner's: run `outbox-relay migrate` as the role that
-- owns the table, then this script as that owner (or a superuser), with psql:
--
--   psql "postgres://owner@db/app" -v ON_ERROR_STOP=1 \
--        -v relay_role=outbox_relay -v relay_password="$RELAY_PASSWORD" -v allow_delete=off \
--        -f sql/relay_role.sql
--
-- Variables (all optional):
--   relay_role      the role to create or update                         (default outbox_relay)
--   relay_password  its password; left unchanged when not given (use `\password ROLE`, or
--                   certificate or peer authentication, to keep it off the command line)
--   allow_delete    on: the relay may delete rows, which retention (retention.delete_published_after)
--                   and outbox.mark = "delete" need                       (default off)
--   schema          the schema holding the outbox table                  (default public)
--
-- Safe to re-run: it creates the role only if absent, and sets the table's privileges for the
-- role from scratch each time, so running it with allow_delete=off takes DELETE back. Run it
-- once at a time: two concurrent runs for a new role can both try to create it.
--
-- What the relay needs and does not get:
--   - SELECT on the columns it reads, UPDATE only on the bookkeeping columns it writes
--     (published_at, attempts, last_error, last_attempt_at, failed_at); never INSERT, and never
--     UPDATE of id, event_id, topic, key, payload, headers, created_at or xact_id.
--   - Nothing on any other table, sequence or function. The identity sequence and the default
--     outbox_uuid_v7() (migration 0003) serve INSERT only, which the relay never runs; the
--     NOTIFY trigger fires on INSERT only.
--   - No grant for its advisory locks (pg_try_advisory_lock, shards and membership), LISTEN,
--     or its reads of pg_locks and pg_stat_activity (`status`, the hold-back warning): PostgreSQL
--     allows them to every role. Without pg_read_all_stats the relay sees only the pid of
--     another role's transaction that holds rows back, not its query or start time; it then
--     reports the age of the oldest held row instead. `GRANT pg_read_all_stats TO outbox_relay`
--     restores the details, at the cost of letting the role read every session's query text.
--   - No grant to take over a frozen relay's shards either: relays running as this one role see
--     each other's session state and may end each other's sessions (pg_terminate_backend).
--     Relays of one table running as different roles need pg_read_all_stats and
--     pg_signal_backend for that; without them a frozen relay keeps its shards (they warn).
--   - Not outbox_relay_schema_migrations: only `migrate` reads it, and migrate is the owner's job.
--   - No CREATE on the schema. PostgreSQL 15 and later no longer let PUBLIC create objects in
--     schema public; on older versions every role can, this one included, until the owner runs
--     `REVOKE CREATE ON SCHEMA public FROM PUBLIC` (which affects every role of the database).

\if :{?relay_role}
\else
    \set relay_role outbox_relay
\endif
\if :{?allow_delete}
\else
    \set allow_delete off
\endif
\if :{?schema}
\else
    \set schema public
\endif

-- A role that already exists must be as plain as one this script creates: never reuse an
-- administrator's role for the relay by mistake, and never demote one either.
SELECT EXISTS (
    SELECT FROM pg_roles AS r
    WHERE r.rolname = :'relay_role'
      AND (r.rolsuper OR r.rolcreatedb OR r.rolcreaterole OR r.rolreplication OR r.rolbypassrls
           OR EXISTS (SELECT FROM pg_auth_members AS m WHERE m.member = r.oid))
) AS relay_role_is_too_powerful \gset
\if :relay_role_is_too_powerful
    \warn 'relay_role.sql: role' :relay_role 'already exists with SUPERUSER, CREATEDB, CREATEROLE, REPLICATION, BYPASSRLS or membership in other roles; the relay must run as a plain role: choose another name (-v relay_role=...) or take those away first'
    DO $$ BEGIN RAISE EXCEPTION 'relay_role.sql: refusing to use an existing role with more than login rights as the relay role'; END $$;
\endif

SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS', :'relay_role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'relay_role') \gexec

\if :{?relay_password}
    ALTER ROLE :"relay_role" LOGIN PASSWORD :'relay_password';
\else
    ALTER ROLE :"relay_role" LOGIN;
\endif

SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'relay_role') \gexec
GRANT USAGE ON SCHEMA :"schema" TO :"relay_role";

-- From scratch: revoking the table's privileges revokes its column privileges too.
REVOKE ALL ON TABLE :"schema".outbox FROM :"relay_role";

-- Every column the claim, the stats, `status` and `audit` read.
GRANT SELECT (id, event_id, topic, key, payload, headers, created_at, published_at, attempts, last_error,
              last_attempt_at, failed_at, xact_id)
    ON TABLE :"schema".outbox TO :"relay_role";

-- Marking a row published, recording failed attempts, giving up on a row, and `retry`.
GRANT UPDATE (published_at, attempts, last_error, last_attempt_at, failed_at)
    ON TABLE :"schema".outbox TO :"relay_role";

-- Reading the id sequence's position lets the relay notice it being set back (setval,
-- ALTER SEQUENCE ... RESTART) and start its claims over; SELECT does not let it take ids.
SELECT format('GRANT SELECT ON SEQUENCE %s TO %I', pg_get_serial_sequence(format('%I.outbox', :'schema'), 'id'),
              :'relay_role')
WHERE pg_get_serial_sequence(format('%I.outbox', :'schema'), 'id') IS NOT NULL \gexec

\if :allow_delete
    GRANT DELETE ON TABLE :"schema".outbox TO :"relay_role";
\endif
