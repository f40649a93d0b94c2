//! Existing outbox tables are relayed without a schema change: column names are configurable,
//! the topic can be a template over columns, and payloads of type jsonb, json, text and bytea
//! are sent as stored.

use crate::debezium_examples::DEBEZIUM_TABLE;
use crate::support::*;
use outbox_relay::config::MarkMode;

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

/// Runs `outbox-relay check` on `config` with `settings` (config keys and values, given as the
/// environment variables that override them), returning exit code and standard output.
fn run_check(env: &TestEnv, config: &outbox_relay::Config, settings: &[(String, String)]) -> (i32, String) {
    let path = write_config(env, config);
    let vars: Vec<(String, String)> =
        settings.iter().map(|(key, value)| (setting_variable(key), value.clone())).collect();
    let mut all: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.push(("RUST_LOG", "off"));
    let (code, stdout, stderr) = run_command(&["--config", path.to_str().unwrap(), "check"], &all);
    assert!(code == 0 || code == 1, "check exits 0 or 1 on a table it can read: {code}\n{stdout}\n{stderr}");
    (code, stdout)
}

/// `outbox.columns.xact_id` as the environment variable that sets it.
fn setting_variable(key: &str) -> String {
    format!("OUTBOX_RELAY_{}", key.replace('.', "__").to_uppercase())
}

/// The statements and settings a `check` report prints under "run:" and "then set:".
fn fixes(report: &str) -> (Vec<String>, Vec<(String, String)>) {
    let (mut statements, mut settings) = (Vec::new(), Vec::new());
    let mut section = "";
    for line in report.lines() {
        match line.trim() {
            "run:" => section = "run",
            "then set:" => section = "set",
            text if line.starts_with("           ") && section == "run" => statements.push(text.to_owned()),
            text if line.starts_with("           ") && section == "set" => {
                let (key, value) = text.split_once(" = ").expect("key = \"value\"");
                settings.push((key.to_owned(), value.trim_matches('"').to_owned()));
            }
            _ => section = "",
        }
    }
    (statements, settings)
}

/// The verdict `check` printed for `guarantee`.
fn verdict<'a>(report: &'a str, guarantee: &str) -> &'a str {
    report
        .lines()
        .find(|line| line.split_whitespace().skip(1).collect::<Vec<_>>().join(" ").starts_with(guarantee))
        .and_then(|line| line.split_whitespace().next())
        .unwrap_or_else(|| panic!("no line for {guarantee} in:\n{report}"))
}

/// Debezium's table as Debezium creates it: `check` names each gap with the statements and
/// settings that close it. Running what it prints (as the table's owner), round after round,
/// leaves nothing lacking, and the relay, logged in as its own role, then publishes each
/// aggregate's events in the order they were written although the ids are random uuids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_what_a_debezium_table_lacks_and_what_it_prints_closes_the_gap() {
    let env = TestEnv::start().await;
    env.migrate().await; // the relay logs in as its own role from here on
    let db = env.client().await;
    db.batch_execute(DEBEZIUM_TABLE).await.unwrap();
    let mut config = debezium_config(env.config());
    config.outbox.columns.created_at = None;

    let (code, report) = run_check(&env, &config, &[]);
    assert_eq!(code, 1, "{report}");
    for lacking in ["per-key order", "commit-order safety", "poison rows", "privileges"] {
        assert_eq!(verdict(&report, lacking), "lacking", "{lacking}:\n{report}");
    }
    assert_eq!(verdict(&report, "event ids"), "ok", "the primary key: {report}");
    assert_eq!(verdict(&report, "two-phase commit"), "ok", "{report}");
    assert!(report.contains("is uuid"), "names why the order does not hold: {report}");

    let mut settings = Vec::new();
    let mut rounds = 0;
    let mut last = (code, report);
    while last.0 != 0 {
        rounds += 1;
        assert!(rounds <= 3, "check still lacks after {rounds} rounds:\n{}", last.1);
        let (statements, new_settings) = fixes(&last.1);
        assert!(!statements.is_empty() || !new_settings.is_empty(), "lacking, with nothing to do:\n{}", last.1);
        for statement in &statements {
            db.batch_execute(statement).await.unwrap_or_else(|e| panic!("{statement}: {e:?}"));
        }
        settings.extend(new_settings);
        last = run_check(&env, &config, &settings);
    }
    assert!(last.1.contains("nothing lacking"), "{}", last.1);
    assert_eq!(verdict(&last.1, "index for retries"), "ok", "asked for once attempts existed: {}", last.1);

    // Four aggregates written at once, each by its own writer, one transaction per event.
    let aggregate_type = unique_name("order");
    let topic = format!("outbox.event.{aggregate_type}");
    create_topic(&env.brokers, &topic, 3).await;
    let vars: Vec<(String, String)> = settings.iter().map(|(k, v)| (setting_variable(k), v.clone())).collect();
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut relay = spawn_relay_process_with_env(&env, &config, &vars);
    const EVENTS: i32 = 50;
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let (env_url, aggregate_type) = (env.database_url.clone(), aggregate_type.clone());
            tokio::spawn(async move {
                let db = connect(&env_url).await;
                for n in 0..EVENTS {
                    db.execute(
                        "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload) \
                         VALUES (gen_random_uuid(), $1, $2, 'Changed', jsonb_build_object('n', $3::int))",
                        &[&aggregate_type, &format!("agg-{writer}"), &n],
                    )
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let records = consume(&env.brokers, &topic, 4 * EVENTS as usize).await;
    wait_until(PATIENCE, "published rows to be deleted", || async {
        db.query_one("SELECT count(*) FROM outboxevent", &[]).await.unwrap().get::<_, i64>(0) == 0
    })
    .await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "clean stop; log: {}", relay.log_path.display());
    for writer in 0..4 {
        let key = format!("agg-{writer}");
        let order: Vec<i64> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(key.as_str()))
            .map(|r| {
                serde_json::from_str::<serde_json::Value>(&r.payload_text().unwrap()).unwrap()["n"].as_i64().unwrap()
            })
            .collect();
        assert_eq!(order, (0..EVENTS as i64).collect::<Vec<_>>(), "{key} in the order it was written");
    }
}

/// The README's recipe for Debezium's table, run as written: its SQL block on the table as
/// Debezium creates it and its two TOML blocks as the configuration leave nothing lacking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_custom_table_recipe_leaves_nothing_lacking() {
    let env = TestEnv::start().await;
    let db = env.client().await;
    db.batch_execute(DEBEZIUM_TABLE).await.unwrap();
    let readme = include_str!("../../README.md");
    let section = &readme[readme.find("Already have an outbox table?").expect("the custom-table section")..];
    let block = |fence: &str, nth: usize| -> String {
        let start = section.match_indices(fence).nth(nth).expect("the README's block").0 + fence.len();
        section[start..start + section[start..].find("\n```").unwrap()].to_owned()
    };
    let (layout, recipe, columns) = (block("```toml\n", 0), block("```sql\n", 0), block("```toml\n", 1));
    db.batch_execute(&recipe).await.unwrap_or_else(|e| panic!("the README's SQL: {e:?}\n{recipe}"));

    // The first TOML block with the second's keys set in it, over the test's connection settings.
    let mut readme_config: toml::Table = toml::from_str(&layout).expect("the README's configuration");
    let overrides: toml::Table = toml::from_str(&columns).expect("the README's columns");
    let target = readme_config["outbox"].as_table_mut().unwrap()["columns"].as_table_mut().unwrap();
    for (key, value) in overrides["outbox"]["columns"].as_table().unwrap() {
        target.insert(key.clone(), value.clone());
    }
    let mut config: toml::Table = toml::from_str(&toml::to_string(&env.owner_config()).unwrap()).unwrap();
    config.insert("outbox".into(), readme_config["outbox"].clone());
    let path = env.path("readme.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let (code, report, stderr) = run_command(&["--config", path.to_str().unwrap(), "check"], &[("RUST_LOG", "off")]);
    assert_eq!(code, 0, "{report}{stderr}");
    assert!(report.contains("nothing lacking"), "{report}");
    for guarantee in ["per-key order", "commit-order safety", "poison rows", "index for claims", "index for retries"] {
        assert_eq!(verdict(&report, guarantee), "ok", "{guarantee}: {report}");
    }
}

/// The standard table lacks nothing; a lost index, a lost default and a NOTIFY trigger are each
/// named, and what `check` prints puts the first two back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_nothing_lacking_on_the_standard_table_and_names_what_goes_missing() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let db = env.client().await;
    let config = env.config();
    let (code, report) = run_check(&env, &config, &[]);
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("nothing lacking"), "{report}");

    db.batch_execute(
        "DROP INDEX outbox_unpublished_idx; DROP INDEX outbox_retrying_idx; \
         ALTER TABLE outbox ALTER COLUMN xact_id DROP DEFAULT; \
         CREATE TRIGGER outbox_relay_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION outbox_relay_notify()",
    )
    .await
    .unwrap();
    let (code, report) = run_check(&env, &config, &[]);
    assert_eq!(code, 1, "{report}");
    for lacking in ["index for claims", "index for retries", "commit-order safety"] {
        assert_eq!(verdict(&report, lacking), "lacking", "{lacking}:\n{report}");
    }
    assert!(report.contains("outbox_pkey also holds published rows"), "the primary key is not enough: {report}");
    assert_eq!(verdict(&report, "two-phase commit"), "note", "a note, not a gap: {report}");
    assert!(report.contains("DROP TRIGGER \"outbox_relay_notify\" ON \"outbox\";"), "{report}");

    let (statements, settings) = fixes(&report);
    assert!(settings.is_empty(), "the columns are all there: {settings:?}");
    for statement in statements.iter().filter(|s| !s.starts_with("DROP TRIGGER")) {
        db.batch_execute(statement).await.unwrap_or_else(|e| panic!("{statement}: {e:?}"));
    }
    let (code, report) = run_check(&env, &config, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(verdict(&report, "two-phase commit"), "note", "{report}");
}

/// The README's partitioned outbox without its indexes: everything `check` prints is accepted
/// by PostgreSQL (which refuses `CONCURRENTLY` on a partitioned table, and a unique index
/// without the partition key), and once it has run nothing is lacking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_on_a_partitioned_table_prints_statements_postgresql_accepts_there() {
    let env = TestEnv::start().await;
    let readme = include_str!("../../README.md");
    let section = &readme[readme.find("For very high volume, partition the outbox").expect("the README's section")..];
    let sql = &section[section.find("```sql\n").expect("its SQL block") + 7..];
    let sql = &sql[..sql.find("```").expect("the end of the block")];
    let without_indexes: String =
        sql.lines().filter(|line| !line.starts_with("CREATE INDEX")).collect::<Vec<_>>().join("\n");
    let migration = include_str!("../../sql/migrations/0003_time_ordered_event_ids.sql");
    let function =
        &migration[migration.find("CREATE OR REPLACE FUNCTION").unwrap()..migration.find("$$;").unwrap() + 3];
    let db = env.client().await;
    db.batch_execute(function).await.unwrap();
    db.batch_execute(&without_indexes).await.unwrap_or_else(|e| panic!("the README's SQL: {e:?}"));
    db.batch_execute("CREATE TABLE outbox_today PARTITION OF outbox DEFAULT").await.unwrap();
    let config = env.owner_config();

    let (code, report) = run_check(&env, &config, &[]);
    assert_eq!(code, 1, "{report}");
    for lacking in ["index for claims", "index for retries", "event ids"] {
        assert_eq!(verdict(&report, lacking), "lacking", "{lacking}:\n{report}");
    }
    let (statements, settings) = fixes(&report);
    assert!(settings.is_empty(), "{settings:?}");
    assert!(statements.iter().all(|s| !s.contains("CONCURRENTLY")), "refused on a partitioned table: {statements:?}");
    for statement in &statements {
        db.batch_execute(statement).await.unwrap_or_else(|e| panic!("PostgreSQL refuses {statement}: {e:?}"));
    }
    let (code, report) = run_check(&env, &config, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(verdict(&report, "index for claims"), "ok", "{report}");
    assert_eq!(verdict(&report, "index for retries"), "ok", "{report}");
    assert_eq!(verdict(&report, "event ids"), "note", "unique with the partition key, the most it can be: {report}");
}

/// Index predicates are read for what they mean: `NOT (published_at IS NOT NULL)` is
/// `published_at IS NULL` and `attempts >= 1` is `attempts > 0`, indexes the planner uses. A
/// btree on (key, id) for failing rows is lacking (a long key overflows it); what `check` prints
/// puts migration 0005's hash index, under its name, in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reads_index_predicates_for_their_meaning_and_replaces_a_btree_retry_index() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let db = env.client().await;
    let config = env.config();
    db.batch_execute(
        "DROP INDEX outbox_unpublished_idx; DROP INDEX outbox_retrying_idx; \
         CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE NOT (published_at IS NOT NULL); \
         CREATE INDEX outbox_retrying_idx ON outbox USING hash (key) \
             WHERE NOT (published_at IS NOT NULL) AND attempts >= 1",
    )
    .await
    .unwrap();
    let (code, report) = run_check(&env, &config, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(verdict(&report, "index for claims"), "ok", "{report}");
    assert_eq!(verdict(&report, "index for retries"), "ok", "{report}");

    // 0002's btree, as a table migrated before 0005 has it.
    db.batch_execute(
        "DROP INDEX outbox_retrying_idx; \
         CREATE INDEX outbox_retrying_idx ON outbox (key, id) WHERE published_at IS NULL AND attempts > 0",
    )
    .await
    .unwrap();
    let (code, report) = run_check(&env, &config, &[]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(verdict(&report, "index for retries"), "lacking", "{report}");
    assert!(report.contains("2,704 bytes"), "says why a btree is not enough: {report}");
    let (statements, _) = fixes(&report);
    for statement in &statements {
        db.batch_execute(statement).await.unwrap_or_else(|e| panic!("{statement}: {e:?}"));
    }
    let (code, report) = run_check(&env, &config, &[]);
    assert_eq!(code, 0, "{report}");
    let method: String = db
        .query_one(
            "SELECT am.amname::text FROM pg_class AS c JOIN pg_am AS am ON am.oid = c.relam \
             WHERE c.relname = 'outbox_retrying_idx'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(method, "hash");
}
