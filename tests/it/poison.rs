//! Poison rows: a row that cannot be published is retried with backoff up to
//! `relay.max_attempts`, then marked failed with its error. It never stops other keys and never
//! crashes the relay; with `on_poison = "park_key"` later rows of its key wait until
//! `outbox-relay retry` re-queues it, with `"skip"` they flow.

use crate::support::*;
use outbox_relay::config::OnPoison;

async fn failed_count(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM outbox WHERE failed_at IS NOT NULL", &[]).await.unwrap().get(0)
}

async fn published_keys(db: &tokio_postgres::Client) -> Vec<String> {
    db.query("SELECT key || ':' || (payload->>'n') FROM outbox WHERE published_at IS NOT NULL ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn command(env: &TestEnv, config: &outbox_relay::Config, args: &[&str]) -> (i32, String, String) {
    let path = write_config(env, config);
    let mut full = vec!["--config", path.to_str().unwrap()];
    full.extend_from_slice(args);
    run_command(&full, &[("RUST_LOG", "off")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_too_large_and_a_row_for_a_missing_topic_fail_and_park_only_their_keys() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let missing = unique_name("missing");
    let db = env.client().await;
    let huge = "x".repeat(3 * 1024 * 1024);
    let mut too_large = NewEvent::keyed(&topic, "A", 1);
    too_large.payload = Some(format!(r#"{{"n": 1, "blob": "{huge}"}}"#));
    insert_events(
        &db,
        &[
            too_large,
            NewEvent::keyed(&topic, "A", 2),
            NewEvent::keyed(&missing, "B", 1),
            NewEvent::keyed(&topic, "B", 2),
            NewEvent::keyed(&topic, "C", 1),
            NewEvent::keyed(&topic, "C", 2),
        ],
    )
    .await;

    let config = env.poison_config(3);
    let relay = env.spawn_relay(config.clone());
    wait_until(PATIENCE, "both poison rows to be given up on", || async { failed_count(&db).await == 2 }).await;
    wait_until(PATIENCE, "the healthy key to flow", || async { published_keys(&db).await == ["C:1", "C:2"] }).await;

    let rows = db
        .query("SELECT key, attempts, last_error FROM outbox WHERE failed_at IS NOT NULL ORDER BY key", &[])
        .await
        .unwrap();
    let errors: Vec<(String, i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(errors[0].0, "A");
    assert_eq!(errors[0].1, 3, "retried up to relay.max_attempts");
    assert!(errors[0].2.contains("over topic") && errors[0].2.contains("max.message.bytes"), "{}", errors[0].2);
    assert_eq!(errors[1].0, "B");
    assert!(errors[1].2.contains("does not exist"), "{}", errors[1].2);
    assert!(relay.metrics.publish_errors.with_label_values(&["message_too_large"]).get() >= 3);
    assert!(relay.metrics.publish_errors.with_label_values(&["unknown_topic"]).get() >= 3);
    assert_eq!(relay.metrics.retries.with_label_values(&["row"]).get(), 4, "two attempts of each row were retried");
    wait_until(PATIENCE, "the failed-rows gauge", || async { relay.metrics.failed_rows.get() == 2 }).await;
    assert!(!relay.is_finished(), "poison rows never stop the relay");
    assert_eq!(unpublished_count(&db).await, 4, "A:2 and B:2 wait behind their keys' failed rows");

    let (code, stdout, stderr) = command(&env, &config, &["status", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["failed_rows"], 2, "{status:#}");
    assert_eq!(status["pending_rows"], 2, "{status:#}");
    let parked: Vec<&str> =
        status["parked_keys"].as_array().unwrap().iter().map(|p| p["key"].as_str().unwrap()).collect();
    assert_eq!(parked.len(), 2, "{status:#}");
    assert!(parked.contains(&"A") && parked.contains(&"B"), "{status:#}");
    assert_eq!(status["failed_by_error"].as_array().unwrap().len(), 2, "{status:#}");
    let (_, text, _) = command(&env, &config, &["status"]);
    assert!(text.contains("failed     2 rows") && text.contains("key B behind failed row"), "{text}");

    // The operator creates the topic and re-queues key B: its rows go out, in order.
    create_topic(&env.brokers, &missing, 1).await;
    let (code, stdout, stderr) = command(&env, &config, &["retry", "--key", "B"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("re-queued 1 row with failed attempts"), "{stdout}");
    wait_until(PATIENCE, "key B to flow after the retry", || async {
        published_keys(&db).await == ["B:1", "B:2", "C:1", "C:2"]
    })
    .await;
    assert_eq!(failed_count(&db).await, 1, "A's oversized row stays failed");
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_poison_skip_later_rows_of_a_failed_key_flow() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    let mut bad = NewEvent::keyed(&topic, "A", 1);
    bad.headers = Some(r#"{"retries": 3}"#.into());
    insert_events(&db, &[bad, NewEvent::keyed(&topic, "A", 2)]).await;

    let mut config = env.poison_config(3);
    config.relay.on_poison = OnPoison::Skip;
    let relay = env.spawn_relay(config);
    wait_until(PATIENCE, "the bad row to fail and the next to flow", || async {
        failed_count(&db).await == 1 && published_keys(&db).await == ["A:2"]
    })
    .await;
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_topic_in_a_custom_table_is_a_poison_row_not_a_crash() {
    let env = TestEnv::start().await;
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE events (
            id bigserial PRIMARY KEY, event_id uuid NOT NULL DEFAULT gen_random_uuid(),
            destination text, key text, payload jsonb, created_at timestamptz NOT NULL DEFAULT now(),
            published_at timestamptz, attempts int NOT NULL DEFAULT 0, last_error text,
            last_attempt_at timestamptz, failed_at timestamptz)",
    )
    .await
    .unwrap();
    let topic = env.create_topic(1).await;
    db.execute("INSERT INTO events (destination, key, payload) VALUES (NULL, 'X', '{}'), ($1, 'Y', '{}')", &[&topic])
        .await
        .unwrap();
    let mut config = env.poison_config(3);
    config.outbox.table = "events".into();
    config.outbox.columns.topic = Some("destination".into());
    config.outbox.columns.headers = None;
    config.outbox.columns.xact_id = None;
    let relay = env.spawn_relay(config);
    consume(&env.brokers, &topic, 1).await;
    wait_until(PATIENCE, "the row without a topic to be given up on", || async {
        let row =
            db.query_one("SELECT failed_at IS NOT NULL, last_error FROM events WHERE key = 'X'", &[]).await.unwrap();
        row.get::<_, bool>(0)
    })
    .await;
    let error: String = db.query_one("SELECT last_error FROM events WHERE key = 'X'", &[]).await.unwrap().get(0);
    assert!(error.contains("\"destination\" is NULL"), "{error}");
    assert!(!relay.is_finished());
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_longer_than_a_varchar_last_error_column_is_cut_to_fit_and_recorded() {
    let env = TestEnv::start().await;
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE events (
            id bigserial PRIMARY KEY, event_id uuid NOT NULL DEFAULT gen_random_uuid(),
            topic text, key text, payload jsonb, created_at timestamptz NOT NULL DEFAULT now(),
            published_at timestamptz, attempts int NOT NULL DEFAULT 0, last_error varchar(40),
            last_attempt_at timestamptz, failed_at timestamptz)",
    )
    .await
    .unwrap();
    let topic = env.create_topic(1).await;
    let missing = unique_name("missing");
    db.execute("INSERT INTO events (topic, key, payload) VALUES ($1, 'X', '{}'), ($2, 'Y', '{}')", &[&missing, &topic])
        .await
        .unwrap();
    let mut config = env.poison_config(3);
    config.outbox.table = "events".into();
    config.outbox.columns.headers = None;
    config.outbox.columns.xact_id = None;
    let relay = env.spawn_relay(config);
    consume(&env.brokers, &topic, 1).await;
    wait_until(PATIENCE, "the row for a missing topic to be given up on", || async {
        db.query_one("SELECT failed_at IS NOT NULL FROM events WHERE key = 'X'", &[]).await.unwrap().get::<_, bool>(0)
    })
    .await;
    let (attempts, error): (i32, String) = db
        .query_one("SELECT attempts, last_error FROM events WHERE key = 'X'", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(attempts, 3, "every attempt recorded, though the error is longer than the column");
    assert_eq!(error.chars().count(), 40, "cut to varchar(40): {error}");
    assert!(error.starts_with("topic missing_"), "{error}");
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_by_id_and_all_requeue_failed_rows_and_nothing_else() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let db = env.client().await;
    db.batch_execute(
        "INSERT INTO outbox (topic, key, payload, attempts, last_error, failed_at) \
         SELECT 't', 'k' || n, '{}', 3, 'boom', now() FROM generate_series(1, 4) n; \
         INSERT INTO outbox (topic, key, payload) VALUES ('t', 'pending', '{}')",
    )
    .await
    .unwrap();
    let config = env.config();
    let (code, stdout, _) = command(&env, &config, &["retry", "--id", "1,2"]);
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "re-queued 2 rows with failed attempts",
            "row 1: given up on after 3 failed attempts; re-queued",
            "row 2: given up on after 3 failed attempts; re-queued"
        ]
    );
    let (_, stdout, _) = command(&env, &config, &["retry", "--all"]);
    assert_eq!(stdout.trim(), "re-queued 2 rows with failed attempts");
    let row = db.query_one("SELECT count(*), max(attempts) FROM outbox WHERE failed_at IS NULL", &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i32>(1)), (5, 0), "attempts reset, failed_at cleared");
    let (code, _, stderr) = command(&env, &config, &["retry"]);
    assert_eq!(code, 2, "one of --id, --key or --all is required: {stderr}");

    // Ids that name nothing to re-queue say so, each with its reason.
    let (code, _, stderr) = command(&env, &config, &["retry", "--id", "abc"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not ids of table outbox") && stderr.contains("bigint"), "{stderr}");
    let (code, stdout, stderr) = command(&env, &config, &["retry", "--id", "5,999"]);
    assert_eq!((code, stdout.trim()), (1, "re-queued 0 rows with failed attempts"), "{stderr}");
    assert!(stderr.contains("row 5: pending, never failed") && stderr.contains("row 999: no such row"), "{stderr}");

    // A row waiting out its retry backoff is re-queued too, so it is tried at once.
    db.batch_execute(
        "UPDATE outbox SET attempts = 2, last_error = 'boom', last_attempt_at = now() WHERE key = 'pending'",
    )
    .await
    .unwrap();
    let (code, stdout, _) = command(&env, &config, &["retry", "--key", "pending"]);
    assert_eq!((code, stdout.trim()), (0, "re-queued 1 row with failed attempts"), "not called failed: it was failing");
    let backoff: Option<std::time::SystemTime> =
        db.query_one("SELECT last_attempt_at FROM outbox WHERE key = 'pending'", &[]).await.unwrap().get(0);
    assert_eq!(backoff, None, "its backoff is over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_claimed_ahead_is_dropped_when_a_row_in_flight_fails() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let missing = unique_name("missing");
    let db = env.client().await;
    // Batches of four: the first (A:1, A:2 for a missing topic, A:3, B:1) fills its batch, so the
    // second (A:4, A:5, B:2, B:3) is claimed while the first awaits its reports.
    let mut rows = vec![NewEvent::keyed(&topic, "A", 1), NewEvent::keyed(&missing, "A", 2)];
    rows.extend([NewEvent::keyed(&topic, "A", 3), NewEvent::keyed(&topic, "B", 1)]);
    rows.extend([NewEvent::keyed(&topic, "A", 4), NewEvent::keyed(&topic, "A", 5)]);
    rows.extend([NewEvent::keyed(&topic, "B", 2), NewEvent::keyed(&topic, "B", 3)]);
    insert_events(&db, &rows).await;

    let mut config = env.poison_config(3);
    config.relay.batch_size = 4;
    let relay = env.spawn_relay(config);
    wait_until(PATIENCE, "the poison row to be given up on", || async { failed_count(&db).await == 1 }).await;
    wait_until(PATIENCE, "key B to flow", || async {
        published_keys(&db).await.iter().filter(|k| k.starts_with('B')).count() == 3
    })
    .await;
    let published: Vec<String> = published_keys(&db).await.into_iter().filter(|k| k.starts_with('A')).collect();
    assert_eq!(published, ["A:1"], "nothing of A after its failed row, though A:4 and A:5 were claimed ahead");
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_relay_rejects_holds_back_its_key_in_its_batch_and_on_every_retry() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    // One batch: K's second row can never become a record (a header value that is a number).
    let mut bad = NewEvent::keyed(&topic, "K", 2);
    bad.headers = Some(r#"{"a": 1}"#.into());
    let ids = insert_events(
        &db,
        &[
            NewEvent::keyed(&topic, "K", 1),
            bad,
            NewEvent::keyed(&topic, "K", 3),
            NewEvent::keyed(&topic, "L", 1),
            NewEvent::keyed(&topic, "K", 4),
        ],
    )
    .await;
    let bad_id = ids[1];
    // A bad row with nothing of its key after it: failed, but it parks nothing.
    let mut lone = NewEvent::keyed(&topic, "Z", 1);
    lone.headers = Some(r#"{"z": []}"#.into());
    insert_events(&db, &[lone]).await;

    let mut config = env.poison_config(4);
    config.relay.retry_backoff_initial = std::time::Duration::from_millis(300);
    config.relay.retry_backoff_max = std::time::Duration::from_millis(300);
    let relay = env.spawn_relay(config.clone());
    // While the bad row waits out its backoff, another row of K arrives: it must not go out
    // with the bad row's next attempt.
    wait_until(PATIENCE, "the bad row's first failed attempt", || async {
        db.query_one("SELECT attempts >= 1 FROM outbox WHERE id = $1", &[&bad_id]).await.unwrap().get(0)
    })
    .await;
    insert_events(&db, &[NewEvent::keyed(&topic, "K", 5)]).await;
    wait_until(PATIENCE, "the bad rows to be given up on", || async { failed_count(&db).await == 2 }).await;
    wait_until(PATIENCE, "the rows before it and of other keys to flow", || async {
        published_keys(&db).await == ["K:1", "L:1"]
    })
    .await;

    let (_, text, _) = command(&env, &config, &["status"]);
    assert!(text.contains(&format!("key K behind failed row {bad_id}: 3 rows waiting")), "{text}");
    assert!(text.contains("parked     1 keys") && !text.contains("key Z behind"), "Z holds nothing back: {text}");

    // The operator fixes the row and re-queues the key: K arrives whole and in order.
    db.execute("UPDATE outbox SET headers = '{\"a\": \"1\"}' WHERE id = $1", &[&bad_id]).await.unwrap();
    let (code, _, stderr) = command(&env, &config, &["retry", "--key", "K"]);
    assert_eq!(code, 0, "{stderr}");
    wait_until(PATIENCE, "key K to flow after the retry", || async { unpublished_count(&db).await == 1 }).await;
    let error: Option<String> =
        db.query_one("SELECT last_error FROM outbox WHERE id = $1", &[&bad_id]).await.unwrap().get(0);
    assert_eq!(error, None, "a published row keeps no error from an earlier attempt");
    relay.stop().await.expect("clean stop");
    let records = read_topic(&env.brokers, &topic).await;
    assert_eq!(records.iter().filter(|r| r.key.as_deref() == Some("K")).count(), 5, "each row of K once");
    assert_eq!(key_sequence(&records, "K"), [1, 2, 3, 4, 5], "in the order written");
}

/// Issue 16: a row that retrying cannot fix was invisible for minutes (`status` said pending,
/// `/readyz` stayed 200) while the relay retried it with a growing backoff. Its first failure
/// is now reported: an error naming the fix, `status` calls it failing with its error, the
/// gauge counts it and `/readyz` fails, all before its second attempt; once the operator
/// fixed the cause, `retry --id` publishes it at once, without waiting out the backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_cannot_succeed_is_reported_at_its_first_failure_and_retry_publishes_it_once_fixed() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let missing = unique_name("missing");
    let db = env.client().await;
    insert_events(&db, &[NewEvent::keyed(&missing, "m", 1)]).await;
    let id: i64 = db.query_one("SELECT id FROM outbox", &[]).await.unwrap().get(0);

    let addr = format!("127.0.0.1:{}", free_port());
    let mut config = env.config();
    config.metrics.listen = addr.clone();
    config.relay.stats_interval = std::time::Duration::from_millis(200);
    // The second attempt is an hour away: whatever is reported came from the first failure.
    config.relay.retry_backoff_initial = std::time::Duration::from_secs(3600);
    config.relay.retry_backoff_max = std::time::Duration::from_secs(3600);
    config.kafka.properties.insert("topic.metadata.propagation.max.ms".into(), "500".into());
    let relay = spawn_relay_process(&env, &config);

    wait_until(PATIENCE, "/readyz to name the failing row", || async {
        let (status, reasons) = http_get(&addr, "/readyz").await;
        status == 503 && reasons.contains("1 rows failing")
    })
    .await;
    let log = relay.log();
    assert!(log.contains("a row failed with an error of its own") && log.contains("create its topic"), "{log}");
    assert!(log.contains(&format!("retry --id {id}")), "{log}");
    assert_eq!(sample(&scrape(&addr).await, "outbox_relay_failing_rows"), Some(1.0));
    let (code, text, stderr) = command(&env, &config, &["status"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(text.contains("failing    1 of them"), "{text}");
    assert!(text.contains(&format!("(ids {id})")) && text.contains("does not exist"), "{text}");
    let attempts: i32 = db.query_one("SELECT attempts FROM outbox", &[]).await.unwrap().get(0);
    assert_eq!(attempts, 1, "reported at the first failure");

    create_topic(&env.brokers, &missing, 1).await;
    let (code, stdout, stderr) = command(&env, &config, &["retry", "--id", &id.to_string()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    wait_until(PATIENCE, "the fixed row published and /readyz passing", || async {
        unpublished_count(&db).await == 0 && http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
    consume(&env.brokers, &missing, 1).await;
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_row_is_reported_once_and_giving_up_on_it_under_skip_counts_an_order_break() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let missing = unique_name("missing");
    let db = env.client().await;
    insert_events(
        &db,
        &[NewEvent::keyed(&missing, "K", 1), NewEvent::keyed(&topic, "K", 2), NewEvent::keyed(&topic, "L", 1)],
    )
    .await;
    let mut config = env.poison_config(4);
    config.relay.on_poison = OnPoison::Skip;
    let metrics = format!("127.0.0.1:{}", free_port());
    config.metrics.listen = metrics.clone();
    let relay = spawn_relay_process(&env, &config);

    wait_until(PATIENCE, "K's later row published once its failed row is given up on", || async {
        failed_count(&db).await == 1 && published_keys(&db).await.contains(&"K:2".to_owned())
    })
    .await;
    let attempts: i32 = db
        .query_one("SELECT attempts FROM outbox WHERE key = 'K' AND failed_at IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 4);
    let log = relay.log();
    assert_eq!(
        log.matches("a row failed with an error of its own").count(),
        1,
        "one error line for one failure, not one per attempt:\n{log}"
    );
    let breaks = sample(&scrape(&metrics).await, "outbox_relay_key_order_breaks_total");
    assert_eq!(breaks, Some(1.0), "K's row 2 went out without row 1: counted");
    assert!(log.contains("relay.on_poison = \"skip\": the key's later rows are published without this row"), "{log}");
}

/// Issue 21: `retry --all` re-queued a key's failed row together with the key's failed
/// follower, both with their attempts back at zero, so both went out in one batch; when the
/// first was refused again after sending, the follower was already on its topic, ahead of it.
/// A row re-queued by `retry` still goes out alone for its key, as a row being retried does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_all_publishes_a_keys_failed_rows_in_order_even_when_the_first_fails_again() {
    let env = TestEnv::start().await;
    env.migrate().await;
    // K's first row goes to a topic that refuses it (over its max.message.bytes once compressed,
    // which the relay cannot tell before sending), its later rows to another topic.
    let strict = create_topic_with(&env.brokers, 1, &[("max.message.bytes", "100000")]).await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    // K's first two rows were given up on (as the rows of a batch the broker refused are), and
    // its third waits behind them. 384 KB of hex digits: no repeats for lz4 to shrink.
    db.execute(
        "INSERT INTO outbox (topic, key, payload, attempts, last_error, last_attempt_at, failed_at) VALUES \
           ($1, 'K', json_build_object('n', 1, 'pad', \
              (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 12000) AS i)), 3, 'refused', now(), now()), \
           ($2, 'K', '{\"n\": 2}', 3, 'refused', now(), now())",
        &[&strict, &topic],
    )
    .await
    .unwrap();
    insert_events(&db, &[NewEvent::keyed(&topic, "K", 3)]).await;
    let mut config = env.poison_config(100);
    config.kafka.properties.insert("compression.type".into(), "lz4".into());
    let relay = env.spawn_relay(config.clone());

    let (code, stdout, stderr) = command(&env, &config, &["retry", "--all"]);
    assert_eq!((code, stdout.trim()), (0, "re-queued 2 rows with failed attempts"), "{stderr}");
    wait_until(PATIENCE, "K's first row to be refused again", || async {
        db.query_one("SELECT attempts > 0 FROM outbox WHERE payload->>'n' = '1'", &[]).await.unwrap().get(0)
    })
    .await;
    assert_eq!(published_keys(&db).await, Vec::<String>::new(), "nothing of K went out ahead of its first row");

    // The operator raises the topic's limit: K goes out whole, in order.
    alter_topic(&env.brokers, &strict, &[("max.message.bytes", "1000000")]).await;
    wait_until(PATIENCE, "every row of K published", || async { unpublished_count(&db).await == 0 }).await;
    let marked: Vec<i64> = db
        .query("SELECT (payload->>'n')::int8 FROM outbox ORDER BY published_at, id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(marked, [1, 2, 3], "each row of K published only after the one before it");
    assert_eq!(key_sequence(&read_topic(&env.brokers, &strict).await, "K"), [1]);
    assert_eq!(key_sequence(&read_topic(&env.brokers, &topic).await, "K"), [2, 3]);
    assert_eq!(relay.metrics.key_order_breaks.get(), 0, "no record of K was acknowledged after a refused one");
    relay.stop().await.expect("clean stop");
}

/// A row the relay is still retrying (failing, not given up on) is named as such, and asking to
/// retry a row that is already published (the relay's own retry came first) is success with a
/// note: the operator's goal, the row published, is met.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_by_id_of_a_published_row_is_success_and_a_failing_row_is_not_called_failed() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let db = env.client().await;
    db.batch_execute(
        "INSERT INTO outbox (topic, key, payload, published_at) VALUES ('t', 'done', '{}', now()); \
         INSERT INTO outbox (topic, key, payload, attempts, last_error, last_attempt_at) \
         VALUES ('t', 'failing', '{}', 2, 'boom', now())",
    )
    .await
    .unwrap();
    let config = env.config();

    let (code, stdout, stderr) = command(&env, &config, &["retry", "--id", "1"]);
    assert_eq!(code, 0, "already published is the goal met: {stdout}{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["re-queued 0 rows with failed attempts", "row 1: already published; nothing to do"]
    );
    assert!(stderr.is_empty(), "{stderr}");

    let (code, stdout, stderr) = command(&env, &config, &["retry", "--id", "2,1"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "re-queued 1 row with failed attempts",
            "row 2: failing (2 failed attempts, waiting out a backoff); re-queued",
            "row 1: already published; nothing to do"
        ]
    );
    assert!(!stdout.contains("failed rows") && !stdout.contains("given up"), "it was not given up on: {stdout}");
}

/// A btree entry holds at most 2,704 bytes: with 0002's btree index on (key, id), recording the
/// failure of a row with a 3,200-character key failed ("index row size 3224 exceeds btree
/// version 4 maximum 2704"), the relay retried recording it forever and no other row went out.
/// Migration 0005's hash index stores only the key's hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_row_with_a_very_long_key_is_recorded_and_other_keys_flow() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let missing = unique_name("missing");
    let db = env.client().await;
    // 3,200 characters that do not compress (PostgreSQL compresses a long index entry first,
    // and "kkk..." would fit): hex digits of a pseudo-random sequence.
    let long_key: String = (1..=200u64)
        .map(|i| {
            let mut z = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            format!("{:016x}", z ^ (z >> 27))
        })
        .collect();
    assert_eq!(long_key.len(), 3200);
    let mut events = vec![NewEvent::keyed(&missing, &long_key, 0)];
    events.extend((1..=50).map(|n| NewEvent::keyed(&topic, &format!("other-{n}"), n)));
    insert_events(&db, &events).await;

    let relay = env.spawn_relay(env.poison_config(100));
    wait_until(PATIENCE, "the long key's failure to be recorded and the 50 other rows published", || async {
        let row = db
            .query_one("SELECT attempts, last_error FROM outbox WHERE key = $1 AND published_at IS NULL", &[&long_key])
            .await
            .unwrap();
        let recorded = row.get::<_, i32>(0) > 0 && row.get::<_, Option<String>>(1).is_some();
        recorded && unpublished_count(&db).await == 1
    })
    .await;
    let error: String =
        db.query_one("SELECT last_error FROM outbox WHERE key = $1", &[&long_key]).await.unwrap().get(0);
    assert!(error.contains(&missing) || error.to_lowercase().contains("topic"), "the row's own error: {error}");
    let records = read_topic(&env.brokers, &topic).await;
    assert_eq!(records.len(), 50, "every other row published once");
    assert!(!relay.is_finished());
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_database_refuses_to_record_are_kept_apart_named_and_written_once_it_takes_them() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let missing = unique_name("missing");
    let db = env.client().await;
    // A trigger that refuses to mark one row, and to record another's failed attempt.
    db.batch_execute(
        "CREATE FUNCTION refuse_some() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.key = 'cursed' AND NEW.published_at IS NOT NULL THEN RAISE EXCEPTION 'cursed rows stay'; END IF; \
           IF NEW.key = 'doomed' AND NEW.attempts > OLD.attempts THEN RAISE EXCEPTION 'doomed rows stay'; END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER refuse_some BEFORE UPDATE ON outbox FOR EACH ROW EXECUTE FUNCTION refuse_some();",
    )
    .await
    .unwrap();
    let mut events: Vec<NewEvent> = (0..20).map(|n| NewEvent::keyed(&topic, &format!("k{}", n % 4), n)).collect();
    events.insert(5, NewEvent::keyed(&topic, "cursed", 0));
    events.insert(10, NewEvent::keyed(&missing, "doomed", 0));
    events.push(NewEvent::keyed(&topic, "doomed", 1));
    insert_events(&db, &events).await;
    let cursed_id: i64 = db.query_one("SELECT id FROM outbox WHERE key = 'cursed'", &[]).await.unwrap().get(0);
    let relay = spawn_relay_process(&env, &env.poison_config(5));

    wait_until(PATIENCE, "every other row published", || async { unpublished_count(&db).await == 3 }).await;
    relay.wait_for_log(&format!("row={cursed_id} ")).await;
    relay.wait_for_log("refuses to mark it published").await;
    relay.wait_for_log("refuses to record this row's failed attempt").await;
    // Tried again (at debug level) while the trigger stands; never published again meanwhile.
    wait_until(PATIENCE, "two more tries of both rows", || async {
        relay.log().matches("the database still refuses this row's outcome").count() >= 4
    })
    .await;
    let records = read_topic(&env.brokers, &topic).await;
    assert_eq!(records.iter().filter(|r| r.key.as_deref() == Some("cursed")).count(), 1, "published once");
    assert!(identical_duplicates(&records).is_empty(), "nothing published twice");
    assert!(!records.iter().any(|r| r.key.as_deref() == Some("doomed")), "the key waits behind its failing row");

    db.batch_execute("DROP TRIGGER refuse_some ON outbox").await.unwrap();
    wait_until(PATIENCE, "the cursed row marked once the database takes it", || async {
        db.query_one("SELECT published_at IS NOT NULL FROM outbox WHERE key = 'cursed'", &[])
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    wait_until(PATIENCE, "the doomed row's failure recorded", || async {
        db.query_one("SELECT attempts > 0 FROM outbox WHERE key = 'doomed' AND topic <> $1", &[&topic])
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    relay.wait_for_log("is released").await;
}
