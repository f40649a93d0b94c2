//! `outbox-relay migrate` creates the outbox table from the same SQL users copy, records the
//! version, and is a no-op the second time.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_outbox_table_and_running_it_again_is_a_no_op() {
    let env = TestEnv::start().await;
    let url = env.database_url.clone();
    let migrate = || run_command(&["migrate"], &[("OUTBOX_RELAY_DATABASE__URL", &url)]);

    let (code, stdout, stderr) = migrate();
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("applied 0001_create_outbox"), "{stdout}");
    assert!(stdout.contains("applied 0002_order_retries_notify"), "{stdout}");
    assert!(stdout.contains("applied 0003_time_ordered_event_ids"), "{stdout}");
    assert!(stdout.contains("applied 0004_wakeups_without_notify"), "{stdout}");
    assert!(stdout.contains("applied 0005_retrying_index_by_key_hash"), "{stdout}");

    let db = env.client().await;
    let columns: Vec<(String, String)> = db
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_name = 'outbox' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected = [
        ("id", "bigint"),
        ("event_id", "uuid"),
        ("topic", "text"),
        ("key", "text"),
        ("payload", "jsonb"),
        ("headers", "jsonb"),
        ("created_at", "timestamp with time zone"),
        ("published_at", "timestamp with time zone"),
        ("attempts", "integer"),
        ("last_error", "text"),
        ("xact_id", "xid8"),
        ("last_attempt_at", "timestamp with time zone"),
        ("failed_at", "timestamp with time zone"),
    ];
    let expected: Vec<(String, String)> = expected.iter().map(|(c, t)| (c.to_string(), t.to_string())).collect();
    assert_eq!(columns, expected);
    let index: String = db
        .query_one("SELECT indexdef FROM pg_indexes WHERE indexname = 'outbox_unpublished_idx'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(index.contains("WHERE (published_at IS NULL)"), "{index}");
    let index: String = db
        .query_one("SELECT indexdef FROM pg_indexes WHERE indexname = 'outbox_retrying_idx'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        index.contains("USING hash (key) WHERE ((published_at IS NULL) AND (attempts > 0))"),
        "a hash index, which no key is too long for: {index}"
    );

    db.batch_execute("INSERT INTO outbox (topic, payload) VALUES ('t', '{}')").await.unwrap();
    // New event ids are UUIDv7: version 7, the RFC 9562 variant, and ordered like the ids
    // (millisecond time first), which keeps the mark's index writes together.
    db.batch_execute("SELECT pg_sleep(0.002); INSERT INTO outbox (topic, payload) VALUES ('t', '{}')").await.unwrap();
    let event_ids: Vec<String> = db
        .query("SELECT event_id::text FROM outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for event_id in &event_ids {
        assert_eq!(&event_id[14..15], "7", "version 7: {event_id}");
        assert!("89ab".contains(&event_id[19..20]), "RFC 9562 variant: {event_id}");
    }
    assert!(event_ids[0] < event_ids[1], "time-ordered: {event_ids:?}");
    let (code, stdout, stderr) = migrate();
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("schema is up to date (version 5)"), "{stdout}");
    let versions: i64 = db.query_one("SELECT count(*) FROM outbox_relay_schema_migrations", &[]).await.unwrap().get(0);
    assert_eq!(versions, 5, "each version is recorded once");
    let rows: i64 = db.query_one("SELECT count(*) FROM outbox", &[]).await.unwrap().get(0);
    assert_eq!(rows, 2, "a second migrate leaves the table and its rows alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_over_a_table_copied_from_sql_records_the_version_without_changing_it() {
    let env = TestEnv::start().await;
    let db = env.client().await;
    db.batch_execute(include_str!("../../sql/migrations/0001_create_outbox.sql")).await.unwrap();
    let (code, stdout, stderr) = run_command(&["migrate"], &[("OUTBOX_RELAY_DATABASE__URL", &env.database_url)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("applied 0001_create_outbox"), "{stdout}");
}

#[test]
fn migrate_refuses_a_custom_table_layout_with_exit_2() {
    let (code, _, stderr) = run_command(&["migrate"], &[("OUTBOX_RELAY_OUTBOX__TABLE", "app.events")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("outbox.table") && stderr.contains("custom table"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_against_an_unreachable_database_fails_with_a_clear_error() {
    let port = free_port();
    let url = format!("postgres://postgres:hunter2@127.0.0.1:{port}/app");
    let (code, _, stderr) = run_command(&["migrate"], &[("OUTBOX_RELAY_DATABASE__URL", &url)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("cannot connect to PostgreSQL at 127.0.0.1:{port}/app")), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// The README's partitioned outbox, run as written (plus a partition for today): the relay
/// publishes from it in key order, and `migrate` refuses it instead of applying migrations
/// written for the standard table (issue 16).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_partitioned_outbox_relays_as_written_and_migrate_leaves_it_alone() {
    let env = TestEnv::start().await;
    let readme = include_str!("../../README.md");
    let start = readme.find("For very high volume, partition the outbox").expect("the README's section");
    let block = &readme[start..];
    let sql = &block[block.find("```sql\n").expect("its SQL block") + 7..];
    let sql = &sql[..sql.find("```").expect("the end of the block")];
    let migration = include_str!("../../sql/migrations/0003_time_ordered_event_ids.sql");
    let function =
        &migration[migration.find("CREATE OR REPLACE FUNCTION").unwrap()..migration.find("$$;").unwrap() + 3];
    let db = env.client().await;
    db.batch_execute(function).await.unwrap();
    db.batch_execute(sql).await.unwrap_or_else(|e| panic!("the README's SQL: {e:?}"));
    db.batch_execute("CREATE TABLE outbox_today PARTITION OF outbox DEFAULT").await.unwrap();

    let (code, _, stderr) = run_command(&["migrate"], &[("OUTBOX_RELAY_DATABASE__URL", &env.database_url)]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("table outbox is partitioned"), "{stderr}");

    let topic = env.create_topic(2).await;
    let events: Vec<NewEvent> = (0..40).map(|n| NewEvent::keyed(&topic, &format!("k{}", n % 4), n)).collect();
    insert_events(&db, &events).await;
    let version: String =
        db.query_one("SELECT substr(event_id::text, 15, 1) FROM outbox LIMIT 1", &[]).await.unwrap().get(0);
    assert_eq!(version, "7", "time-ordered event ids");
    let relay = env.spawn_relay(env.owner_config());
    wait_until(PATIENCE, "every row published", || async { unpublished_count(&db).await == 0 }).await;
    relay.stop().await.expect("clean stop");
    let records = read_topic(&env.brokers, &topic).await;
    assert_eq!(records.len(), 40);
    assert_first_copies_in_key_order(&records);
}

/// On a table of many rows, a few of them failing, the claim finds a key's earlier failing rows
/// through migration 0005's hash index (the planner's choice, read from EXPLAIN of the claim the
/// relay runs), not by reading the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_looks_up_a_keys_failing_rows_in_the_hash_index() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let db = env.client().await;
    db.batch_execute(
        "INSERT INTO outbox (topic, key, payload) SELECT 't', 'k' || (n % 5000), '{}' FROM generate_series(1, 200000) n; \
         UPDATE outbox SET attempts = 1, last_error = 'boom', last_attempt_at = now() WHERE id % 100 = 0; \
         UPDATE outbox SET published_at = now() WHERE id < 150000; \
         ANALYZE outbox",
    )
    .await
    .unwrap();
    let config = env.owner_config();
    let mapping = outbox_relay::postgres::layout::Mapping::from_config(&config).unwrap();
    let outbox = outbox_relay::postgres::outbox::Outbox::connect(&config, &mapping).await.unwrap();
    let claim = outbox.layout().claim_sql();
    db.batch_execute(&format!("PREPARE claim AS {claim}")).await.unwrap_or_else(|e| panic!("{e:?}\n{claim}"));
    let plan: Vec<String> = db
        .query(
            "EXPLAIN EXECUTE claim(500, ARRAY[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15], 1, 300, '{}', NULL, '{}')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("outbox_retrying_idx"), "the claim uses the index:\n{plan}");
    let method: String = db
        .query_one(
            "SELECT am.amname::text FROM pg_class AS c JOIN pg_am AS am ON am.oid = c.relam \
             WHERE c.relname = 'outbox_retrying_idx'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(method, "hash", "which is a hash index");
}
