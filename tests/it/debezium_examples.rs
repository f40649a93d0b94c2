//! `examples/debezium.sql` and `examples/debezium.toml` exactly as shipped, on Debezium's
//! documented outbox table: the SQL adds what the relay needs without rewriting the table or
//! changing the application's INSERT, and the configuration relays the table as Debezium's
//! router does with its documented example. Bad record-shape settings and a row naming a
//! partition its topic lacks are refused with errors that name them.
//! (`debezium_compare.rs` compares the records with Debezium's own, byte for byte.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::support::*;

/// Debezium's outbox table as its documentation creates it.
pub const DEBEZIUM_TABLE: &str = "CREATE TABLE outboxevent (
    id            uuid NOT NULL PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid   varchar(255) NOT NULL,
    type          varchar(255) NOT NULL,
    payload       jsonb
)";

/// A file of `examples/`.
pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name)
}

/// Runs `examples/debezium.sql` with psql as its header says, as the table's owner.
pub fn run_debezium_sql(env: &TestEnv) {
    let script = example("debezium.sql");
    let out = run_psql(&env.database_url, &["-f", script.to_str().unwrap()]).expect("run psql");
    assert!(
        out.status.success(),
        "examples/debezium.sql failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `examples/debezium.toml` leaves to its user, as environment variables: where the
/// database and the brokers are, and no metrics endpoint (tests run side by side).
pub fn connection_vars(env: &TestEnv) -> Vec<(&'static str, String)> {
    vec![
        ("OUTBOX_RELAY_DATABASE__URL", env.database_url.clone()),
        ("OUTBOX_RELAY_KAFKA__BROKERS", env.brokers.clone()),
        ("OUTBOX_RELAY_METRICS__LISTEN", String::new()),
    ]
}

fn vars<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The application's INSERT, as Debezium's documentation writes it: no column of the relay's.
const APPLICATION_INSERT: &str = "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload) VALUES (gen_random_uuid(), $1, $2, $3, $4::text::jsonb)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debezium_examples_relay_debeziums_table_as_its_router_does_without_a_table_rewrite() {
    let env = TestEnv::start().await;
    let db = env.client().await;
    db.batch_execute(DEBEZIUM_TABLE).await.unwrap();
    // Rows Debezium already published, in the table when the SQL runs.
    for n in 0..3 {
        db.execute(APPLICATION_INSERT, &[&"before", &"b-1", &"Old", &format!(r#"{{"n": {n}}}"#)]).await.unwrap();
    }
    let filenode = |db: tokio_postgres::Client| async move {
        db.query_one("SELECT pg_relation_filenode('outboxevent')::int8", &[]).await.unwrap().get::<_, i64>(0)
    };
    let before = filenode(env.client().await).await;
    run_debezium_sql(&env);
    run_debezium_sql(&env); // an operator running it twice changes nothing
    assert_eq!(filenode(env.client().await).await, before, "the SQL rewrote the table");
    let old: Vec<(i64, i32)> = db
        .query("SELECT seq, attempts FROM outboxevent", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(old, vec![(0, 0); 3], "rows already there get the constant defaults");
    // The migration guide: the rows Debezium published go before the relay starts.
    db.execute("DELETE FROM outboxevent WHERE seq = 0", &[]).await.unwrap();

    let connection = connection_vars(&env);
    let config = example("debezium.toml");
    let (code, report, stderr) = run_command(
        &["--config", config.to_str().unwrap(), "check"],
        &[vars(&connection), vec![("RUST_LOG", "off")]].concat(),
    );
    assert_eq!(code, 0, "check on the example's table and configuration: {report}{stderr}");
    assert!(report.contains("nothing lacking"), "{report}");

    let (order, customer) = (unique_name("order"), unique_name("customer"));
    let (order_topic, customer_topic) = (format!("outbox.event.{order}"), format!("outbox.event.{customer}"));
    create_topic(&env.brokers, &order_topic, 3).await;
    create_topic(&env.brokers, &customer_topic, 1).await;
    // Interleaved aggregates, several events of each per transaction.
    const PER_AGGREGATE: usize = 12;
    let aggregates = [(&order, "o-1"), (&order, "o-2"), (&order, "ö-3"), (&customer, "c-1")];
    let mut writer = env.client().await;
    for round in 0..PER_AGGREGATE / 4 {
        let tx = writer.transaction().await.unwrap();
        for step in 0..4 {
            let n = round * 4 + step;
            for (aggregatetype, aggregateid) in aggregates {
                let payload = format!(r#"{{"n": {n}, "aggregate": "{aggregateid}"}}"#);
                let kind = if n == 0 { "Created" } else { "Changed" };
                tx.execute(APPLICATION_INSERT, &[aggregatetype, &aggregateid, &kind, &payload]).await.unwrap();
            }
        }
        tx.commit().await.unwrap();
    }
    let mut expected: HashMap<String, (String, String, String, String)> = HashMap::new();
    for row in db
        .query("SELECT id::text, aggregatetype, aggregateid, type, payload::text FROM outboxevent", &[])
        .await
        .unwrap()
    {
        expected.insert(row.get(0), (row.get(1), row.get(2), row.get(3), row.get(4)));
    }
    assert_eq!(expected.len(), PER_AGGREGATE * aggregates.len());

    let mut relay = spawn_relay_process_from(&config, &vars(&connection), &env.path(""));
    let orders = consume(&env.brokers, &order_topic, PER_AGGREGATE * 3).await;
    let customers = consume(&env.brokers, &customer_topic, PER_AGGREGATE).await;
    wait_until(PATIENCE, "every published row deleted", || async {
        db.query_one("SELECT count(*) FROM outboxevent", &[]).await.unwrap().get::<_, i64>(0) == 0
    })
    .await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "{}", relay.log());

    for (topic, records, partitions) in [(&order, &orders, 3), (&customer, &customers, 1)] {
        let mut last_n: HashMap<String, i64> = HashMap::new();
        for record in records.iter() {
            let id = record.header("id").expect("Debezium's id header");
            let (aggregatetype, aggregateid, kind, payload) = &expected[&id];
            assert_eq!(aggregatetype, topic);
            assert_eq!(record.key.as_deref(), Some(aggregateid.as_str()), "key: the aggregate id");
            assert_eq!(record.payload_text().as_deref(), Some(payload.as_str()), "value: the payload as stored");
            let headers: Vec<(&str, Option<&[u8]>)> =
                record.headers.iter().map(|(n, v)| (n.as_str(), v.as_deref())).collect();
            assert_eq!(headers, [("id", Some(id.as_bytes())), ("eventType", Some(kind.as_bytes()))]);
            assert_eq!(record.partition, java_partition(aggregateid.as_bytes(), partitions), "murmur2 of the key");
            let n = serde_json::from_str::<serde_json::Value>(payload).unwrap()["n"].as_i64().unwrap();
            let previous = last_n.insert(aggregateid.clone(), n);
            assert!(previous.is_none_or(|p| p + 1 == n), "{aggregateid}: {n} after {previous:?}: out of order");
        }
    }
}

/// The shipped configuration with `edit` applied to its text, written to the test's directory.
fn edited_example(env: &TestEnv, edit: impl Fn(&str) -> String) -> PathBuf {
    let shipped = std::fs::read_to_string(example("debezium.toml")).unwrap();
    let edited = edit(&shipped);
    assert_ne!(edited, shipped, "the edit applies to the shipped file");
    let path = env.path(&format!("{}.toml", unique_name("debezium")));
    std::fs::write(&path, edited).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_record_shape_settings_exit_2_with_one_line_naming_the_key() {
    let env = TestEnv::start().await;
    let db = env.client().await;
    db.batch_execute(DEBEZIUM_TABLE).await.unwrap();
    run_debezium_sql(&env);
    let connection = connection_vars(&env);
    let placements = r#"placements = ["type:header:eventType"]"#;
    let cases: [(&str, &str, &str, &[&str]); 8] = [
        (placements, r#"placements = ["kind:header:eventType"]"#, "outbox.record.placements", &["no column \"kind\""]),
        (
            placements,
            r#"placements = ["type:partition"]"#,
            "outbox.record.placements",
            &["\"type\"", "a partition is a number"],
        ),
        (placements, r#"placements = ["type:body"]"#, "outbox.record.placements", &["\"body\" is not a placement"]),
        (placements, r#"placements = ["type:envelope"]"#, "outbox.record.placements", &["json_string"]),
        (placements, r#"placements = ["type:header:id"]"#, "outbox.record.placements", &["event id's header"]),
        (r#"event_id_header = "id""#, r#"event_id_header = """#, "outbox.record.event_id_header", &["is empty"]),
        (
            r#"regex = "(?<routedByValue>.*)""#,
            r#"regex = "(?<routedByValue>.*""#,
            "outbox.topic_route.regex",
            &["does not compile"],
        ),
        (
            "${routedByValue}",
            "${aggregate}",
            "outbox.topic_route.replacement",
            &["\"aggregate\"", "which outbox.topic_route.regex lacks"],
        ),
    ];
    for (shipped, bad, key, says) in cases {
        let path = edited_example(&env, |text| text.replacen(shipped, bad, 1));
        let (code, _, stderr) = run_command(
            &["--config", path.to_str().unwrap(), "run"],
            &[vars(&connection), vec![("RUST_LOG", "off")]].concat(),
        );
        assert_eq!(code, 2, "{bad}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{bad}: one line, not {stderr}");
        assert!(lines[0].contains(key), "{bad}: names {key}: {stderr}");
        for said in says {
            assert!(lines[0].contains(said), "{bad}: says {said}: {stderr}");
        }
    }
}

/// Debezium's table with the `extra` columns (`name type`), prepared by `examples/debezium.sql`,
/// and a topic of `partitions` for a new aggregate type: the table's client, the aggregate
/// type and its topic.
async fn prepared_table(env: &TestEnv, extra: &[&str], partitions: i32) -> (tokio_postgres::Client, String, String) {
    let db = env.client().await;
    db.batch_execute(DEBEZIUM_TABLE).await.unwrap();
    for column in extra {
        db.batch_execute(&format!("ALTER TABLE outboxevent ADD COLUMN {column}")).await.unwrap();
    }
    run_debezium_sql(env);
    let aggregate = unique_name("order");
    let topic = format!("outbox.event.{aggregate}");
    create_topic(&env.brokers, &topic, partitions).await;
    (db, aggregate, topic)
}

/// The relay's environment for the poison-row tests: the connection, a row given up after two
/// quick attempts, and with `exactly_once` transactions.
async fn poison_vars(env: &TestEnv, exactly_once: bool) -> Vec<(&'static str, String)> {
    let mut vars = connection_vars(env);
    vars.extend([
        ("OUTBOX_RELAY_RELAY__MAX_ATTEMPTS", "2".to_owned()),
        ("OUTBOX_RELAY_RELAY__RETRY_BACKOFF_INITIAL", "50ms".to_owned()),
    ]);
    if exactly_once {
        with_exactly_once(env, &mut vars).await;
    }
    vars
}

/// Waits until the relay gives up on a row (`what`), and returns its aggregate id and error.
async fn given_up_row(db: &tokio_postgres::Client, what: &str) -> (String, String) {
    let given_up = "SELECT aggregateid, last_error FROM outboxevent WHERE failed_at IS NOT NULL";
    wait_until(PATIENCE, &format!("{what} given up on"), || async {
        db.query_opt(given_up, &[]).await.unwrap().is_some()
    })
    .await;
    let row = db.query_one(given_up, &[]).await.unwrap();
    (row.get(0), row.get(1))
}

/// `vars` with exactly-once delivery, its own compacted progress topic and transactional ids.
pub async fn with_exactly_once(env: &TestEnv, vars: &mut Vec<(&'static str, String)>) {
    let progress = create_topic_with(&env.brokers, 1, &[("cleanup.policy", "compact")]).await;
    vars.extend([
        ("OUTBOX_RELAY_KAFKA__DELIVERY", "exactly_once".to_owned()),
        ("OUTBOX_RELAY_KAFKA__EXACTLY_ONCE__PROGRESS_TOPIC", progress),
        ("OUTBOX_RELAY_KAFKA__EXACTLY_ONCE__TRANSACTIONAL_ID_PREFIX", unique_name("relay")),
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_column_places_records_and_a_partition_the_topic_lacks_fails_only_its_row() {
    partition_column(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_column_places_records_and_a_partition_the_topic_lacks_fails_only_its_row_in_transactions() {
    partition_column(true).await;
}

async fn partition_column(exactly_once: bool) {
    let env = TestEnv::start().await;
    let (db, aggregate, topic) = prepared_table(&env, &["partition_no int"], 2).await;
    let insert = "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload, partition_no) \
                  VALUES (gen_random_uuid(), $1, $2, 'T', $3::text::jsonb, $4)";
    for (key, n, partition) in [
        ("placed", 1, Some(1)),
        ("hashed", 2, None),
        ("missing", 3, Some(5)),
        ("missing", 4, Some(0)),
        ("after", 5, Some(0)),
    ] {
        db.execute(insert, &[&aggregate, &key, &format!(r#"{{"n": {n}}}"#), &partition]).await.unwrap();
    }
    let path = edited_example(&env, |text| {
        text.replacen(
            r#"placements = ["type:header:eventType"]"#,
            r#"placements = ["type:header:eventType", "partition_no:partition"]"#,
            1,
        )
    });
    let connection = poison_vars(&env, exactly_once).await;
    let mut relay = spawn_relay_process_from(&path, &vars(&connection), &env.path(""));
    let records = consume(&env.brokers, &topic, 3).await;
    let failed = given_up_row(&db, "the row naming partition 5").await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "{}", relay.log());

    let by_key: HashMap<&str, i32> = records.iter().map(|r| (r.key.as_deref().unwrap(), r.partition)).collect();
    assert_eq!(by_key["placed"], 1, "the partition column's partition");
    assert_eq!(by_key["hashed"], java_partition(b"hashed", 2), "NULL: the key's partition");
    assert_eq!(by_key["after"], 0);
    assert!(!by_key.contains_key("missing"), "{records:?}");
    assert_eq!(failed.0, "missing");
    assert!(failed.1.contains("partition 5") && failed.1.contains("has 2"), "a clear error: {}", failed.1);
    let waiting: i64 = db
        .query_one("SELECT count(*) FROM outboxevent WHERE aggregateid = 'missing' AND failed_at IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(waiting, 1, "the key's later row waits behind it (relay.on_poison = park_key)");
}

/// Debezium's timestamp and tracing columns on a real broker: the record carries the row's
/// time as its timestamp (a NULL one: the time it is sent) and the writer's trace context as
/// headers; a time the topic refuses (Kafka 4 takes none more than an hour ahead) fails only
/// its row, refused before sending with the topic's limit named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timestamp_and_tracing_columns_reach_the_record_and_a_refused_time_fails_only_its_row() {
    timestamp_and_tracing_columns(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timestamp_and_tracing_columns_reach_the_record_and_a_refused_time_fails_only_its_row_in_transactions() {
    timestamp_and_tracing_columns(true).await;
}

async fn timestamp_and_tracing_columns(exactly_once: bool) {
    let env = TestEnv::start().await;
    let (db, aggregate, topic) = prepared_table(&env, &["occurred_at timestamp", "tracingspancontext text"], 1).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let context = format!("#Sat Dec 05 02:00:00 UTC 2026\ntraceparent={traceparent}\ntracestate=congo\\=t61rcWkgMzE\n");
    let insert = "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload, occurred_at, tracingspancontext) \
                  VALUES (gen_random_uuid(), $1, $2, 'T', '{}', $3::text::timestamp, $4)";
    let rows: [(&str, Option<&str>, Option<&str>); 4] = [
        ("past", Some("2020-01-02 03:04:05.678901"), Some(context.as_str())),
        ("unset", None, None),
        ("future", Some("2999-01-01 00:00:00"), None),
        ("after", Some("2021-06-01 00:00:00"), None),
    ];
    for (key, occurred_at, context) in rows {
        db.execute(insert, &[&aggregate, &key, &occurred_at, &context]).await.unwrap();
    }
    let path = edited_example(&env, |text| {
        text.replacen(
            "published_at = \"\"",
            "published_at = \"\"\ntimestamp = \"occurred_at\"\ntracing_context = \"tracingspancontext\"",
            1,
        )
    });
    let connection = poison_vars(&env, exactly_once).await;
    let before_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let mut relay = spawn_relay_process_from(&path, &vars(&connection), &env.path(""));
    let records = consume_records(&env.brokers, &[&topic], 3, PATIENCE).await;
    let (_, error) = given_up_row(&db, "the row with a time an hour ahead").await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "{}", relay.log());

    let by_key: HashMap<&[u8], &RawRecord> = records.iter().map(|r| (r.key.as_deref().unwrap(), r)).collect();
    let past = by_key[b"past".as_slice()];
    assert_eq!(past.timestamp, Some(1_577_934_245_678), "2020-01-02 03:04:05.678 UTC, cut to the millisecond");
    assert_eq!(past.header("traceparent"), Some(traceparent.as_bytes()));
    assert_eq!(past.header("tracestate"), Some(b"congo=t61rcWkgMzE".as_slice()));
    let names: Vec<&str> = past.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["traceparent", "tracestate", "id", "eventType"]);
    assert!(by_key[b"unset".as_slice()].timestamp.is_some_and(|t| t >= before_ms - 1000), "NULL: the time it is sent");
    assert_eq!(by_key[b"after".as_slice()].timestamp, Some(1_622_505_600_000));
    assert!(!by_key.contains_key(b"future".as_slice()));
    assert!(error.to_lowercase().contains("timestamp"), "the reason: {error}");
}

/// Partitions added to a live topic: a row naming one of them goes there at once, not charged
/// an attempt for the count the relay saw before (it checks the topic again first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_naming_a_partition_added_while_the_relay_runs_goes_there_uncharged() {
    let env = TestEnv::start().await;
    let (db, aggregate, topic) = prepared_table(&env, &["partition_no int"], 2).await;
    let insert = "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload, partition_no) \
                  VALUES (gen_random_uuid(), $1, $2, 'T', '{}', $3)";
    db.execute(insert, &[&aggregate, &"before", &Some(1i32)]).await.unwrap();
    let path = edited_example(&env, |text| {
        text.replacen(
            r#"placements = ["type:header:eventType"]"#,
            r#"placements = ["type:header:eventType", "partition_no:partition"]"#,
            1,
        )
    });
    let connection = poison_vars(&env, false).await;
    let mut relay = spawn_relay_process_from(&path, &vars(&connection), &env.path(""));
    consume(&env.brokers, &topic, 1).await;
    add_partitions(&env.brokers, &topic, 4).await;
    db.execute(insert, &[&aggregate, &"added", &Some(3i32)]).await.unwrap();
    let records = consume(&env.brokers, &topic, 2).await;
    wait_until(PATIENCE, "both rows published", || async {
        db.query_one("SELECT count(*) FROM outboxevent", &[]).await.unwrap().get::<_, i64>(0) == 0
    })
    .await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "{}", relay.log());
    let added = records.iter().find(|r| r.key.as_deref() == Some("added")).expect("the new partition's row");
    assert_eq!(added.partition, 3);
    assert!(
        !relay.log().contains("partition_out_of_range") && !relay.log().contains("names partition 3"),
        "{}",
        relay.log()
    );
}
