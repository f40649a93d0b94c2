//! Existing outbox tables are relayed without a schema change: column names are configurable,
//! the topic can be a template over columns, and payloads of type jsonb, json, text and bytea
//! are sent as stored.

mod support;

use outbox_relay::config::MarkMode;
use support::*;

/// `config` for Debezium's outbox layout in table `outboxevent`: uuid ids that are also the
/// event ids, the topic from `aggregatetype`, the key from `aggregateid`, rows deleted once
/// published, none of the relay's bookkeeping columns.
fn debezium_config(mut config: outbox_relay::Config) -> outbox_relay::Config {
    config.outbox.table = "outboxevent".into();
    config.outbox.topic_template = Some("outbox.event.{aggregatetype}".into());
    config.outbox.mark = MarkMode::Delete;
    let columns = &mut config.outbox.columns;
    columns.id = "id".into();
    columns.event_id = "id".into();
    columns.key = Some("aggregateid".into());
    for unused in [
        &mut columns.topic,
        &mut columns.headers,
        &mut columns.published_at,
        &mut columns.attempts,
        &mut columns.last_error,
        &mut columns.xact_id,
        &mut columns.last_attempt_at,
        &mut columns.failed_at,
    ] {
        *unused = None;
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debezium_style_table_is_relayed_with_a_topic_template_and_deleted_on_publish() {
    let env = TestEnv::start().await;
    let db = env.client().await;
    // Debezium's outbox event router layout, unchanged.
    db.batch_execute(
        "CREATE TABLE outboxevent (
            id            uuid NOT NULL PRIMARY KEY,
            aggregatetype varchar(255) NOT NULL,
            aggregateid   varchar(255) NOT NULL,
            type          varchar(255) NOT NULL,
            payload       jsonb
        );
        -- The README's recipe: a column that keeps each aggregate's events in insertion order.
        ALTER TABLE outboxevent ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE;",
    )
    .await
    .unwrap();
    let order = unique_name("order");
    let customer = unique_name("customer");
    create_topic(&env.brokers, &format!("outbox.event.{order}"), 2).await;
    create_topic(&env.brokers, &format!("outbox.event.{customer}"), 1).await;
    db.execute(
        "INSERT INTO outboxevent VALUES \
         (gen_random_uuid(), $1, 'o-1', 'OrderCreated', '{\"id\": \"o-1\"}'), \
         (gen_random_uuid(), $2, 'c-9', 'CustomerMoved', '{\"id\": \"c-9\"}')",
        &[&order, &customer],
    )
    .await
    .unwrap();
    let ids: Vec<(String, String)> = db
        .query("SELECT id::text, aggregatetype FROM outboxevent", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    let mut config = debezium_config(env.config());
    config.outbox.columns.order_by = Some("seq".into());
    config.outbox.columns.created_at = None;
    config.validate().expect("a Debezium layout is a valid configuration");
    let relay = env.spawn_relay(config);

    let orders = consume(&env.brokers, &format!("outbox.event.{order}"), 1).await;
    let customers = consume(&env.brokers, &format!("outbox.event.{customer}"), 1).await;
    wait_until(PATIENCE, "published rows to be deleted", || async {
        db.query_one("SELECT count(*) FROM outboxevent", &[]).await.unwrap().get::<_, i64>(0) == 0
    })
    .await;
    relay.stop().await.expect("clean stop");

    assert_eq!(orders[0].key.as_deref(), Some("o-1"));
    assert_eq!(customers[0].key.as_deref(), Some("c-9"));
    let order_id = ids.iter().find(|(_, t)| *t == order).map(|(id, _)| id.clone()).unwrap();
    assert_eq!(orders[0].event_id(), order_id, "the uuid id is the event_id");
    assert_eq!(orders[0].payload_text().as_deref(), Some(r#"{"id": "o-1"}"#));
}

/// Creates `name` with a payload column of `payload_type` and custom column names everywhere,
/// inserts one row with `payload_sql`, relays it and returns the record's value.
async fn relay_one_payload(env: &TestEnv, payload_type: &str, payload_sql: &str) -> Option<Vec<u8>> {
    let db = env.client().await;
    let table = unique_name("events");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (
            seq      bigserial PRIMARY KEY,
            uid      uuid NOT NULL DEFAULT gen_random_uuid(),
            dest     text NOT NULL,
            msg_key  text,
            body     {payload_type},
            meta     json,
            sent_at  timestamptz,
            made_at  timestamptz NOT NULL DEFAULT now(),
            tries    int NOT NULL DEFAULT 0,
            problem  text
        )"
    ))
    .await
    .unwrap();
    let topic = env.create_topic(1).await;
    db.execute(
        &format!("INSERT INTO {table} (dest, msg_key, body, meta) VALUES ($1, 'k', {payload_sql}, '{{\"h\": \"v\"}}')"),
        &[&topic],
    )
    .await
    .unwrap();

    let mut config = env.config();
    config.outbox.table = table.clone();
    let columns = &mut config.outbox.columns;
    columns.id = "seq".into();
    columns.event_id = "uid".into();
    columns.topic = Some("dest".into());
    columns.key = Some("msg_key".into());
    columns.payload = "body".into();
    columns.headers = Some("meta".into());
    columns.published_at = Some("sent_at".into());
    columns.created_at = Some("made_at".into());
    columns.attempts = Some("tries".into());
    columns.last_error = Some("problem".into());
    columns.xact_id = None;
    columns.last_attempt_at = None;
    columns.failed_at = None;
    let relay = env.spawn_relay(config);
    let records = consume(&env.brokers, &topic, 1).await;
    wait_until(PATIENCE, "the row to be marked", || async {
        let sql = format!("SELECT count(*) FROM {table} WHERE sent_at IS NULL");
        db.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) == 0
    })
    .await;
    relay.stop().await.expect("clean stop");
    assert_eq!(records[0].header("h").as_deref(), Some("v"), "json headers column");
    records[0].payload.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_columns_of_type_jsonb_json_text_and_bytea_are_sent_as_stored() {
    let env = TestEnv::start().await;
    let jsonb = relay_one_payload(&env, "jsonb", "'{\"b\": 2,  \"a\": 1}'").await;
    assert_eq!(jsonb.as_deref(), Some(br#"{"a": 1, "b": 2}"#.as_slice()), "jsonb as PostgreSQL renders it");
    let json = relay_one_payload(&env, "json", "'{\"b\": 2,  \"a\": 1}'").await;
    assert_eq!(json.as_deref(), Some(br#"{"b": 2,  "a": 1}"#.as_slice()), "json exactly as written");
    let text = relay_one_payload(&env, "text", "'plain text, ünïcode'").await;
    assert_eq!(text.as_deref(), Some("plain text, ünïcode".as_bytes()));
    let bytes = relay_one_payload(&env, "bytea", "'\\x00ff10'::bytea").await;
    assert_eq!(bytes.as_deref(), Some([0x00u8, 0xff, 0x10].as_slice()), "bytea byte for byte");
    let tombstone = relay_one_payload(&env, "bytea", "NULL").await;
    assert_eq!(tombstone, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_column_of_an_unsupported_type_is_refused_by_name() {
    let env = TestEnv::start().await;
    env.client()
        .await
        .batch_execute(
            "CREATE TABLE numbers (id bigint PRIMARY KEY, event_id uuid, topic text, key text, payload integer, \
             headers jsonb, created_at timestamptz, published_at timestamptz, attempts int, last_error text)",
        )
        .await
        .unwrap();
    let mut config = env.config();
    config.outbox.table = "numbers".into();
    config.outbox.columns.xact_id = None;
    config.outbox.columns.last_attempt_at = None;
    config.outbox.columns.failed_at = None;
    let relay = outbox_relay::Relay::new(config, outbox_relay::Shutdown::new()).unwrap();
    let err = relay.run().await.expect_err("the relay refuses the table");
    assert!(err.is_config_problem());
    let message = err.to_string();
    assert!(message.contains("outbox.columns.payload") && message.contains("type integer"), "{message}");
}

/// Runs `outbox-relay run` on `config` and returns its exit code and standard error.
fn run_binary(env: &TestEnv, config: &outbox_relay::Config) -> (i32, String) {
    let path = write_config(env, config);
    let (code, _, stderr) = run_command(&["--config", path.to_str().unwrap(), "run"], &[("RUST_LOG", "off")]);
    (code, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_column_that_cannot_keep_a_keys_insertion_order_is_refused_naming_the_fix() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE outboxevent (id uuid NOT NULL PRIMARY KEY, aggregatetype text NOT NULL, \
           aggregateid text NOT NULL, payload jsonb, created_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .unwrap();
    let mut debezium = debezium_config(env.owner_config());

    // Random or time-ordered uuids, and timestamps that tie.
    let (code, stderr) = run_binary(&env, &debezium);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("outbox.columns.order_by") && stderr.contains("is uuid"), "{stderr}");
    assert!(stderr.contains("ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY"), "the fix: {stderr}");
    assert!(stderr.contains("outbox.per_key_order = false"), "the opt-out: {stderr}");
    debezium.outbox.columns.order_by = Some("created_at".into());
    let (code, stderr) = run_binary(&env, &debezium);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("timestamp with time zone"), "{stderr}");

    // The standard table, once its identity hands out ids in blocks.
    db.batch_execute("ALTER TABLE outbox ALTER COLUMN id SET CACHE 50").await.unwrap();
    let (code, stderr) = run_binary(&env, &env.config());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("CACHE 50") && stderr.contains("SET CACHE 1"), "{stderr}");

    // An operator who needs no per-key order says so, and the table is relayed as it is.
    let topic = unique_name("order");
    create_topic(&env.brokers, &format!("outbox.event.{topic}"), 1).await;
    db.execute("INSERT INTO outboxevent VALUES (gen_random_uuid(), $1, 'o-1', '{}')", &[&topic]).await.unwrap();
    debezium.outbox.per_key_order = false;
    let relay = env.spawn_relay(debezium);
    consume(&env.brokers, &format!("outbox.event.{topic}"), 1).await;
    relay.stop().await.expect("clean stop");
}
