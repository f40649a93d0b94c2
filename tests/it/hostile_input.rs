//! Hostile input: whatever the application writes into the outbox table and whatever the
//! operator writes into the configuration, the relay answers with a record, a poison row or a
//! configuration error. It never panics, and nothing of a row that cannot be encoded reaches
//! the topic: a row is published whole or not at all.
//!
//! The row tests run the relay against a real PostgreSQL and broker and read the topic back;
//! the configuration tests throw generated files and environment variables at the real loader.

use std::collections::HashSet;

use crate::support::*;
use outbox_relay::config::ConfigError;
use proptest::prelude::*;
use tokio_postgres::Client;

// ---------------------------------------------------------------------------------------------
// Rows

/// The standard table with the loosest column types the relay accepts (payload `bytea`,
/// headers `text`), so that rows can hold what `jsonb` would refuse at insert: an empty value,
/// binary bytes, headers that are not JSON.
async fn loose_outbox(env: &TestEnv) -> Client {
    env.migrate().await;
    let db = env.client().await;
    db.batch_execute(
        "ALTER TABLE outbox ALTER COLUMN payload TYPE bytea USING convert_to(payload::text, 'UTF8'), \
                            ALTER COLUMN headers TYPE text",
    )
    .await
    .unwrap();
    db
}

/// Inserts one row into the loose table and returns its event id.
async fn insert_row(
    db: &Client,
    topic: &str,
    key: Option<&str>,
    payload: Option<&[u8]>,
    headers: Option<&str>,
) -> String {
    db.query_one(
        "INSERT INTO outbox (topic, key, payload, headers) VALUES ($1, $2, $3, $4) RETURNING event_id::text",
        &[&topic, &key, &payload, &headers],
    )
    .await
    .unwrap()
    .get(0)
}

/// A row's fate: whether it is published, whether the relay gave up on it, its attempts and
/// last error.
#[derive(Debug)]
struct RowState {
    published: bool,
    failed: bool,
    attempts: i32,
    last_error: Option<String>,
}

async fn row_state(db: &Client, event_id: &str) -> RowState {
    let row = db
        .query_one(
            "SELECT published_at IS NOT NULL, failed_at IS NOT NULL, attempts, last_error \
             FROM outbox WHERE event_id = $1::text::uuid",
            &[&event_id],
        )
        .await
        .unwrap();
    RowState { published: row.get(0), failed: row.get(1), attempts: row.get(2), last_error: row.get(3) }
}

/// Waits until every row of `good` is published and every row of `poison` given up on.
async fn wait_for_fates(db: &Client, good: &[&str], poison: &[&str]) {
    wait_until(PATIENCE, "the good rows to be published and the poison rows given up on", || async {
        for id in good {
            if !row_state(db, id).await.published {
                return false;
            }
        }
        for id in poison {
            if !row_state(db, id).await.failed {
                return false;
            }
        }
        true
    })
    .await;
}

/// Asserts that `topic` holds exactly one record of each of `good` and nothing else.
async fn assert_topic_holds_exactly(brokers: &str, topic: &str, good: &[&str]) -> Vec<Received> {
    let records = read_topic(brokers, topic).await;
    let published: Vec<String> = records.iter().map(Received::event_id).collect();
    let expected: HashSet<String> = good.iter().map(|id| id.to_string()).collect();
    assert_eq!(published.len(), good.len(), "one record per good row and nothing else: {published:?}");
    assert_eq!(published.into_iter().collect::<HashSet<_>>(), expected);
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_payload_a_null_key_and_binary_bytes_are_published_as_stored() {
    let env = TestEnv::start().await;
    let db = loose_outbox(&env).await;
    let topic = env.create_topic(1).await;
    let empty = insert_row(&db, &topic, Some("empty"), Some(b""), None).await;
    let keyless = insert_row(&db, &topic, None, Some(br#"{"n": 1}"#), Some("{}")).await;
    let binary_bytes: &[u8] = &[0x00, 0xff, 0xfe, b'\n', 0xc3];
    let binary = insert_row(&db, &topic, Some("binary"), Some(binary_bytes), Some(r#"{"a": "\u00ff"}"#)).await;

    let relay = env.spawn_relay(env.poison_config(2));
    wait_for_fates(&db, &[&empty, &keyless, &binary], &[]).await;
    let records = assert_topic_holds_exactly(&env.brokers, &topic, &[&empty, &keyless, &binary]).await;
    let record = |id: &str| records.iter().find(|r| r.event_id() == id).unwrap().clone();

    assert_eq!(record(&empty).payload, Some(Vec::new()), "an empty value, not a tombstone");
    assert_eq!(record(&keyless).key, None);
    assert_eq!(record(&keyless).payload_text().as_deref(), Some(r#"{"n": 1}"#));
    assert_eq!(record(&binary).payload.as_deref(), Some(binary_bytes), "bytea is sent byte for byte");
    assert_eq!(record(&binary).header("a").as_deref(), Some("\u{ff}"));
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_cannot_be_encoded_are_poison_rows_and_nothing_of_them_is_published() {
    let env = TestEnv::start().await;
    let db = loose_outbox(&env).await;
    let topic = env.create_topic(1).await;
    let small = br#"{"n": 1}"#.as_slice();
    let oversized = vec![b'x'; 20_000];

    let before = insert_row(&db, &topic, Some("before"), Some(small), None).await;
    let poison = [
        (insert_row(&db, &topic, Some("p1"), Some(small), Some("not json")).await, "headers are not valid JSON"),
        (insert_row(&db, &topic, Some("p2"), Some(small), Some("[1, 2]")).await, "found an array"),
        (insert_row(&db, &topic, Some("p3"), Some(small), Some(r#"{"retries": 3}"#)).await, "\"retries\" is a number"),
        (insert_row(&db, &topic, Some("p4"), Some(small), Some(r#"{"m": {"a": "b"}}"#)).await, "\"m\" is an object"),
        (
            insert_row(&db, "no spaces allowed", Some("p5"), Some(small), None).await,
            "\"no spaces allowed\" is not a valid Kafka topic name",
        ),
        (insert_row(&db, &topic, Some("p6"), Some(&oversized), None).await, "MessageSizeTooLarge"),
    ];
    let after = insert_row(&db, &topic, Some("after"), Some(small), Some(r#"{"type": "ok"}"#)).await;

    let mut config = env.poison_config(2);
    // The producer refuses a record larger than this before it is sent.
    config.kafka.properties.insert("message.max.bytes".into(), "10000".into());
    let relay = env.spawn_relay(config.clone());
    let poison_ids: Vec<&str> = poison.iter().map(|(id, _)| id.as_str()).collect();
    wait_for_fates(&db, &[&before, &after], &poison_ids).await;

    for (id, problem) in &poison {
        let state = row_state(&db, id).await;
        assert!(!state.published, "{id}: {state:?}");
        assert_eq!(state.attempts, config.relay.max_attempts as i32, "{id}: retried up to max_attempts: {state:?}");
        let error = state.last_error.unwrap_or_default();
        assert!(error.contains(problem), "{id}: the error names the problem ({problem}): {error}");
    }
    assert_topic_holds_exactly(&env.brokers, &topic, &[&before, &after]).await;
    assert!(!relay.is_finished(), "poison rows never stop the relay");
    relay.stop().await.expect("clean stop");
}

// A SQL_ASCII database stores text bytes unchecked, so a text column can hold bytes that are not
// UTF-8. Under client_encoding UTF8 the server would fail every claim that selects such a row
// ("invalid byte sequence for encoding "UTF8""), stalling the table; the relay asks for the bytes
// as stored instead, and the one row fails when it is decoded.

/// A migrated outbox in a new SQL_ASCII database: a relay configuration for it and a connection.
async fn sql_ascii_outbox(env: &TestEnv) -> (outbox_relay::Config, Client) {
    let database = unique_name("ascii");
    env.client()
        .await
        .batch_execute(&format!(
            "CREATE DATABASE {database} ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"
        ))
        .await
        .unwrap();
    let mut url = url::Url::parse(&env.database_url).unwrap();
    url.set_path(&format!("/{database}"));
    let mut config = env.poison_config(2);
    config.database.url = url.to_string();
    outbox_relay::postgres::schema::migrate(&config).await.expect("migrate a SQL_ASCII database");
    let db = connect(&config.database.url).await;
    (config, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_text_column_is_a_poison_row() {
    let env = TestEnv::start().await;
    let (config, db) = sql_ascii_outbox(&env).await;
    let topic = env.create_topic(1).await;

    let insert = |key_sql: &'static str| {
        let sql =
            format!("INSERT INTO outbox (topic, key, payload) VALUES ($1, {key_sql}, '{{}}') RETURNING event_id::text");
        let (db, topic) = (&db, topic.clone());
        async move { db.query_one(&sql, &[&topic]).await.unwrap().get::<_, String>(0) }
    };
    let before = insert("'before'").await;
    let bad = insert(r"convert_from('\xff'::bytea, 'SQL_ASCII')").await;
    let after = insert("'after'").await;
    let stored: Vec<u8> = db
        .query_one("SELECT convert_to(key, 'SQL_ASCII') FROM outbox WHERE event_id = $1::text::uuid", &[&bad])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, [0xff], "the key holds the byte 0xff");

    let relay = env.spawn_relay(config);
    wait_for_fates(&db, &[&before, &after], &[&bad]).await;
    let error = row_state(&db, &bad).await.last_error.unwrap_or_default();
    assert!(error.contains("cannot read key") && error.contains("invalid utf-8"), "names the column: {error}");
    assert_topic_holds_exactly(&env.brokers, &topic, &[&before, &after]).await;
    relay.stop().await.expect("clean stop");
}

/// One rule for every column a record is built from: bytes that are not UTF-8 in a column that
/// holds text (text, json, jsonb) make the row a poison row naming the column, never a record
/// of garbage. jsonb used to be sent as stored: the same byte that made a key a poison row went
/// out to consumers inside a payload. (bytea is bytes, sent as stored.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_jsonb_payload_or_headers_is_a_poison_row_as_in_a_key() {
    let env = TestEnv::start().await;
    let (config, db) = sql_ascii_outbox(&env).await;
    let topic = env.create_topic(1).await;
    // '{"a": "<0xff>"}': PostgreSQL's JSON parser takes the byte as it is in a SQL_ASCII database.
    let bad_json = r"convert_from('\x7b2261223a2022ff227d'::bytea, 'SQL_ASCII')::jsonb";
    // Each row on a key of its own, so that the good rows are not parked behind the bad ones.
    let insert = |payload_sql: &str, headers_sql: &str| {
        let sql = format!(
            "INSERT INTO outbox (topic, key, payload, headers) \
             VALUES ($1, gen_random_uuid()::text, {payload_sql}, {headers_sql}) RETURNING event_id::text"
        );
        let (db, topic) = (&db, topic.clone());
        async move { db.query_one(&sql, &[&topic]).await.unwrap().get::<_, String>(0) }
    };
    let before = insert("'{}'", "NULL").await;
    let bad_payload = insert(bad_json, "NULL").await;
    let bad_headers = insert("'{}'", bad_json).await;
    let after = insert("'{}'", "NULL").await;
    let stored: Vec<u8> = db
        .query_one(
            "SELECT convert_to(payload::text, 'SQL_ASCII') FROM outbox WHERE event_id = $1::text::uuid",
            &[&bad_payload],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored.contains(&0xff), "the payload holds the byte 0xff: {stored:?}");

    let relay = env.spawn_relay(config);
    wait_for_fates(&db, &[&before, &after], &[&bad_payload, &bad_headers]).await;
    for (id, column) in [(&bad_payload, "payload"), (&bad_headers, "headers")] {
        let error = row_state(&db, id).await.last_error.unwrap_or_default();
        assert!(
            error.contains(&format!("cannot read {column}")) && error.contains("invalid utf-8"),
            "names the column: {error}"
        );
    }
    assert_topic_holds_exactly(&env.brokers, &topic, &[&before, &after]).await;
    relay.stop().await.expect("clean stop");
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// Every key of the configuration, dotted (`relay.batch_size`), read off the defaults so that
/// keys added later are fuzzed too.
fn config_keys() -> Vec<String> {
    fn walk(table: &toml::Table, prefix: &str, keys: &mut Vec<String>) {
        for (name, value) in table {
            let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
            match value {
                toml::Value::Table(inner) => walk(inner, &key, keys),
                _ => keys.push(key),
            }
        }
    }
    let defaults: toml::Table = toml::from_str(&outbox_relay::Config::default().to_redacted_toml()).unwrap();
    let mut keys = Vec::new();
    walk(&defaults, "", &mut keys);
    // librdkafka properties: a few that the relay checks itself, some real ones, and any name.
    for property in ["acks", "enable.idempotence", "transactional.id", "message.max.bytes", "linger.ms", "debug"] {
        keys.push(format!("kafka.properties.{property}"));
    }
    keys
}

fn config_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(config_keys()),
        1 => "[a-z_.]{0,12}\\.[a-z_.]{0,12}",
        1 => any::<String>().prop_map(|name| format!("kafka.properties.{name}")),
    ]
}

/// Values that validators parse: numbers, durations, addresses, URLs, templates, and any text.
fn config_text_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "-?[0-9]{1,25}(ms|s|m|h|d|y)?",
        "postgres(ql)?://[a-z:@%]{0,8}[a-z0-9.]{0,6}(:[0-9a-z]{0,8})?(/[a-z]{0,4})?(\\?[a-z=&]{0,12})?",
        "(host|port|password|user|dbname)\\s?=\\s?'?[a-z0-9 \\\\']{0,8}",
        "[a-z0-9.:\\[\\]]{0,20}",
        "[{}a-z._]{0,16}",
    ]
}

fn config_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        4 => config_text_value().prop_map(toml::Value::String),
        1 => any::<i64>().prop_map(toml::Value::Integer),
        1 => any::<f64>().prop_map(toml::Value::Float),
        1 => any::<bool>().prop_map(toml::Value::Boolean),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|map| toml::Value::Table(map.into_iter().collect())),
        ]
    })
}

/// A TOML document setting some configuration keys (known or not) to generated values.
fn config_document() -> impl Strategy<Value = String> {
    prop::collection::vec((config_key(), config_value()), 0..6).prop_map(|settings| {
        let mut document = toml::Table::new();
        for (key, value) in settings {
            let mut table = &mut document;
            let mut parts: Vec<&str> = key.split('.').collect();
            let last = parts.pop().unwrap_or_default();
            for part in parts {
                let entry = table.entry(part).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if !entry.is_table() {
                    *entry = toml::Value::Table(toml::Table::new());
                }
                table = entry.as_table_mut().unwrap();
            }
            table.insert(last.to_owned(), value);
        }
        toml::to_string(&document).unwrap_or_default()
    })
}

/// A configuration file's bytes: a generated document, any text, or any bytes.
fn config_file() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => config_document().prop_map(String::into_bytes),
        1 => any::<String>().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

/// An environment variable for the loader: a configuration key in `OUTBOX_RELAY_` form, or any
/// name after the prefix; the value is any text an environment can hold (no NUL).
fn config_env_var() -> impl Strategy<Value = (String, String)> {
    let name = prop_oneof![
        4 => config_key().prop_map(|key| key.to_ascii_uppercase().replace('.', "__")),
        1 => "[A-Za-z0-9_]{0,16}",
    ];
    let value = prop_oneof![config_text_value(), config_value().prop_map(|v| v.to_string())];
    (name, value.prop_map(|v| v.replace('\0', "")))
        .prop_filter("an environment variable name holds no = or NUL", |(name, _)| !name.contains(['=', '\0']))
        .prop_map(|(name, value)| (format!("OUTBOX_RELAY_{name}"), value))
}

/// Loads `file` (if any) and `vars` through [`outbox_relay::Config::load`] in a figment jail
/// (its own directory and environment, restored afterwards).
#[allow(clippy::result_large_err)] // the jail's closure returns figment's own (large) error type
fn load(file: Option<&[u8]>, vars: &[(String, String)]) -> Result<outbox_relay::Config, ConfigError> {
    let mut result = None;
    figment::Jail::expect_with(|jail| {
        let path = jail.directory().join("relay.toml");
        if let Some(bytes) = file {
            std::fs::write(&path, bytes).unwrap();
        }
        for (name, value) in vars {
            jail.set_env(name, value);
        }
        result = Some(outbox_relay::Config::load(file.map(|_| path.as_path())));
        Ok(())
    });
    result.expect("the jail ran")
}

/// A loaded configuration validates again; a refused one says what is wrong. (Its key can be
/// empty: a file that sets the key `""` is refused as an unknown key named "".)
fn assert_loaded_or_refused(result: Result<outbox_relay::Config, ConfigError>) -> Result<(), TestCaseError> {
    match result {
        Ok(config) => prop_assert_eq!(config.validate(), Ok(())),
        Err(error) => prop_assert!(!error.problem.is_empty(), "{:?}", error),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_config_file_loads_or_is_a_config_error(file in config_file()) {
        assert_loaded_or_refused(load(Some(&file), &[]))?;
    }

    #[test]
    fn any_environment_loads_or_is_a_config_error(vars in prop::collection::vec(config_env_var(), 0..5)) {
        assert_loaded_or_refused(load(None, &vars))?;
    }
}

#[test]
fn a_config_file_nested_deeper_than_the_parser_allows_is_a_config_error() {
    let file = format!("x = {}{}", "[".repeat(100_000), "]".repeat(100_000));
    let error = load(Some(file.as_bytes()), &[]).unwrap_err();
    assert_eq!(error.key, "config", "{error}");
}

#[test]
fn a_config_file_that_is_not_utf8_is_a_config_error() {
    let error = load(Some(b"[relay]\nbatch_size = \"\xff\"\n"), &[]).unwrap_err();
    assert!(error.problem.contains("UTF-8"), "{error}");
}

#[test]
fn a_quoted_environment_value_that_figment_cannot_unescape_is_a_config_error_not_a_panic() {
    // figment 0.10.19 slices such a value at a character index; "é" is two bytes, so it panicked.
    let vars = [("OUTBOX_RELAY_LOG__LEVEL".to_owned(), r#""é\n""#.to_owned())];
    let error = load(None, &vars).unwrap_err();
    assert_eq!(error.key, "log.level");
    assert!(error.problem.contains("OUTBOX_RELAY_LOG__LEVEL"), "{error}");
}
