-- Two-phase commit: a transaction that inserts an outbox row can be prepared.
--
-- The statement trigger of 0002 sent NOTIFY from the writer's own transaction, and PostgreSQL
-- refuses to PREPARE a transaction that has executed NOTIFY, so no application on XA or 2PC
-- (Java EE, Atomikos, Narayana) could write the outbox. The relay now notices commits itself:
-- an idle relay asks PostgreSQL every relay.commit_watch_interval (20 ms) whether the commit
-- horizon moved, which costs one trivial query and no lock in the writers' commit path.
-- outbox_relay_notify() stays, for tables whose writers never prepare and want NOTIFY.
DROP TRIGGER IF EXISTS outbox_relay_notify ON outbox;
