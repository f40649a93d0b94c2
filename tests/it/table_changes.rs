//! What operators do to the outbox table under running relays: swap it for a new one (rename and
//! recreate, restore from a dump), or empty it with its identity restarted. The relays notice at
//! their next claim: they never mix two tables' state (a claim floor or lock keys of one table
//! applied to another), never publish a key's rows out of order, and never hold one shard twice.

use crate::support::*;
use tokio_postgres::Client;

/// Inserts events `n` in `range` of `topic` (keys `key-{n % 10}`, payload `{"key", "n"}` as
/// [`NewEvent::keyed`] writes them) through `sql_client`, which may be a transaction.
async fn insert_range(sql_client: &impl tokio_postgres::GenericClient, topic: &str, range: std::ops::Range<i32>) {
    sql_client
        .execute(
            "INSERT INTO outbox (topic, key, payload) \
             SELECT $1, 'key-' || (n % 10), json_build_object('key', 'key-' || (n % 10), 'n', n)::jsonb \
             FROM generate_series($2::int4, $3::int4 - 1) AS n ORDER BY n",
            &[&topic, &range.start, &range.end],
        )
        .await
        .expect("insert events");
}

/// Publishes `range` and waits until it is marked, then drives a few more claims one commit at
/// a time, so that the relay's claim floor has risen well above the table's first ids.
async fn publish_and_raise_the_floor(db: &Client, topic: &str, range: std::ops::Range<i32>) {
    insert_range(db, topic, range.clone()).await;
    for n in range.end..range.end + 20 {
        insert_range(db, topic, n..n + 1).await;
        wait_until(PATIENCE, "each single row published", || async { unpublished_count(db).await == 0 }).await;
    }
}

/// Advisory locks of relays (membership, shards, shard count) keyed by another table's OID than
/// the one `outbox` names now.
async fn shard_locks_of_other_tables(db: &Client) -> i64 {
    db.query_one(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND classid NOT IN (SELECT (hashtext(prefix || 'outbox'::regclass::oid::text) & 2147483647)::oid \
           FROM unnest(ARRAY['outbox-relay-member:', 'outbox-relay-shard:', 'outbox-relay-shard-count:']) AS prefix)",
        &[],
    )
    .await
    .expect("shard locks")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_renamed_and_recreated_under_the_relay_is_relayed_from_its_start_in_key_order() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(4).await;
    let db = env.client().await;
    let relay = env.spawn_relay(env.owner_config());
    publish_and_raise_the_floor(&db, &topic, 0..2000).await;

    // In one transaction: rows for the old table, then a new table in its place, then rows for
    // the new one, whose ids start again at 1, far below the relay's claim floor.
    let mut owner = env.client().await;
    let swap = owner.transaction().await.unwrap();
    insert_range(&swap, &topic, 3000..3500).await;
    swap.batch_execute("ALTER TABLE outbox RENAME TO outbox_old; CREATE TABLE outbox (LIKE outbox_old INCLUDING ALL)")
        .await
        .unwrap();
    insert_range(&swap, &topic, 10_000..12_000).await;
    swap.commit().await.unwrap();

    wait_until(PATIENCE, "every row of the new table published", || async { unpublished_count(&db).await == 0 }).await;
    let records = read_topic(&env.brokers, &topic).await;
    assert_first_copies_in_key_order(&records);
    assert!(identical_duplicates(&records).is_empty(), "no row published twice without a relay stop");
    let new_rows = records.iter().filter(|r| key_n(r) >= 10_000).count();
    assert_eq!(new_rows, 2000, "every row of the new table, once");
    assert_eq!(records.iter().filter(|r| (3000..3500).contains(&key_n(r))).count(), 0, "nothing of the old table");
    let orphaned: i64 =
        db.query_one("SELECT count(*) FROM outbox_old WHERE published_at IS NULL", &[]).await.unwrap().get(0);
    assert_eq!(orphaned, 500, "the old table's unpublished rows are left as they are, for the operator");
    assert_eq!(relay.metrics.table_changes.with_label_values(&["replaced"]).get(), 1);
    // `status` and other relays find this relay by the new table's lock keys.
    wait_until(PATIENCE, "the relay to hold every shard of the new table", || async {
        shard_holders(&db).await.values().sum::<usize>() == 16 && shard_locks_of_other_tables(&db).await == 0
    })
    .await;
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_restored_under_two_relays_is_never_published_by_both() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(4).await;
    let db = env.client().await;
    let first = env.spawn_relay(env.owner_config());
    let second = env.spawn_relay(env.owner_config());
    publish_and_raise_the_floor(&db, &topic, 0..1000).await;

    // What `pg_dump -t outbox --clean | psql -1` does: the same rows in a new table (a new
    // OID), in one transaction.
    db.batch_execute(
        "BEGIN; \
         CREATE TABLE outbox_restored (LIKE outbox INCLUDING ALL); \
         INSERT INTO outbox_restored OVERRIDING SYSTEM VALUE SELECT * FROM outbox; \
         SELECT setval(pg_get_serial_sequence('outbox_restored', 'id'), (SELECT max(id) FROM outbox)); \
         DROP TABLE outbox; \
         ALTER TABLE outbox_restored RENAME TO outbox; \
         COMMIT",
    )
    .await
    .unwrap();
    // One relay is restarted (cleanly) after the restore; the other runs on.
    first.stop().await.expect("clean stop");
    let first = env.spawn_relay(env.owner_config());
    for chunk in 0..6 {
        insert_range(&db, &topic, 10_000 + chunk * 500..10_500 + chunk * 500).await;
    }
    wait_until(PATIENCE, "every row written after the restore published", || async {
        unpublished_count(&db).await == 0
    })
    .await;

    let records = read_topic(&env.brokers, &topic).await;
    let after_restore: Vec<&Received> = records.iter().filter(|r| key_n(r) >= 10_000).collect();
    let distinct: std::collections::HashSet<String> = after_restore.iter().map(|r| r.event_id()).collect();
    assert_eq!(distinct.len(), 3000, "every row written after the restore");
    assert_eq!(after_restore.len(), 3000, "and none twice: the two relays never held one shard each");
    assert_first_copies_in_key_order(&records);
    wait_until(PATIENCE, "both relays to hold the restored table's shards, and no other", || async {
        shard_holders(&db).await.values().sum::<usize>() == 16 && shard_locks_of_other_tables(&db).await == 0
    })
    .await;
    assert_eq!(second.metrics.table_changes.with_label_values(&["replaced"]).get(), 1);
    first.stop().await.expect("clean stop");
    second.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_that_restarts_the_identity_keeps_every_keys_order() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(4).await;
    let db = env.client().await;
    let relay = env.spawn_relay(env.config());
    publish_and_raise_the_floor(&db, &topic, 0..2000).await;

    // The same table, emptied; new rows take ids from 1 again, below the claim floor.
    db.batch_execute("TRUNCATE outbox RESTART IDENTITY").await.unwrap();
    for chunk in 0..6 {
        insert_range(&db, &topic, 10_000 + chunk * 500..10_500 + chunk * 500).await;
    }
    wait_until(PATIENCE, "every row written after the truncate published", || async {
        unpublished_count(&db).await == 0
    })
    .await;

    let records = read_topic(&env.brokers, &topic).await;
    assert_first_copies_in_key_order(&records);
    assert_eq!(records.iter().filter(|r| key_n(r) >= 10_000).count(), 3000, "every new row, once");
    relay.stop().await.expect("clean stop");
}

/// The `n` of a record written by [`insert_range`].
fn key_n(record: &Received) -> i64 {
    let payload: serde_json::Value =
        serde_json::from_slice(record.payload.as_deref().unwrap_or(b"null")).expect("JSON payload");
    payload["n"].as_i64().expect("payload n")
}
