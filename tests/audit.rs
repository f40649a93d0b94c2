//! `outbox-relay audit` reconciles the table with the topic: it finds rows marked published
//! that never reached the topic, duplicated event ids (and copies that differ), and rows
//! pending or failed; it exits 0 only when nothing is lost.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;

/// Relays `count` rows of `topic`, stops the relay, and returns the records by event id.
async fn relayed(env: &TestEnv, topic: &str, count: usize) -> HashMap<String, Received> {
    let db = env.client().await;
    let events: Vec<NewEvent> = (0..count).map(|n| NewEvent::keyed(topic, &format!("k{}", n % 3), n)).collect();
    insert_events(&db, &events).await;
    let relay = env.spawn_relay(env.config());
    let received = consume(&env.brokers, topic, count).await;
    wait_until(PATIENCE, "rows marked", || async { unpublished_count(&db).await == 0 }).await;
    relay.stop().await.expect("clean stop");
    received.into_iter().map(|r| (r.event_id(), r)).collect()
}

fn audit(env: &TestEnv, args: &[&str]) -> (i32, String, String) {
    let path = write_config(env, &env.config());
    let mut full = vec!["--config", path.to_str().unwrap(), "audit"];
    full.extend_from_slice(args);
    run_command(&full, &[("RUST_LOG", "off")])
}

fn audit_json(env: &TestEnv, args: &[&str]) -> (i32, serde_json::Value) {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let (code, stdout, stderr) = audit(env, &with_json);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
    (code, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_relay_run_audits_clean() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    relayed(&env, &topic, 50).await;

    let (code, stdout, stderr) = audit(&env, &["--topic", &topic]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("published  50 rows found on the topic"), "{stdout}");
    assert!(stdout.contains("lost       0 rows"), "{stdout}");
    assert!(stdout.contains("result: nothing lost"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_lost_duplicated_conflicting_pending_and_failed_rows() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let records = relayed(&env, &topic, 20).await;
    let db = env.client().await;

    // A row marked published that was never sent: what a relay that marks too early would do.
    let lost_id: i64 = db
        .query_one(
            "INSERT INTO outbox (topic, key, payload, published_at) VALUES ($1, 'k0', '{}', now()) RETURNING id",
            &[&topic],
        )
        .await
        .unwrap()
        .get(0);
    // A crash between publish and mark: the same record twice.
    let mut event_ids: Vec<&String> = records.keys().collect();
    event_ids.sort();
    let duplicate = &records[event_ids[0]];
    produce_copy(&env.brokers, &topic, duplicate, None).await;
    // A copy that differs, which the relay must never produce.
    let conflicting = &records[event_ids[1]];
    produce_copy(&env.brokers, &topic, conflicting, Some(b"{\"tampered\":true}")).await;
    // A row not yet relayed, and one that keeps failing.
    db.execute("INSERT INTO outbox (topic, key, payload) VALUES ($1, 'p', '{}')", &[&topic]).await.unwrap();
    db.execute(
        "INSERT INTO outbox (topic, key, payload, attempts, last_error) VALUES ($1, 'f', '{}', 3, 'Broker: Message size too large')",
        &[&topic],
    )
    .await
    .unwrap();

    let (code, report) = audit_json(&env, &["--topic", &topic]);
    assert_eq!(code, 1, "lost rows make audit fail: {report:#}");
    assert_eq!(report["rows"], 23);
    assert_eq!(report["published"], 20);
    assert_eq!(report["lost"]["count"], 1);
    assert_eq!(report["lost"]["first"][0], lost_id.to_string());
    assert_eq!(report["duplicated"]["count"], 2);
    assert_eq!(report["extra_copies"], 2);
    assert_eq!(report["conflicting"]["count"], 1);
    let first = report["conflicting"]["first"][0].as_str().unwrap();
    assert!(first.ends_with(&format!("(event {})", conflicting.event_id())), "row id, then event id: {first}");
    assert_eq!(report["pending"]["count"], 1);
    assert_eq!(report["failing"]["count"], 1, "a row still retried is failing, as `status` says");
    assert_eq!(report["failed"]["count"], 0);
    assert!(report["failing"]["first"][0].as_str().unwrap().contains("Message size too large"), "{report:#}");
    assert_eq!(report["records_read"], 22);

    let (code, stdout, _) = audit(&env, &["--topic", &topic]);
    assert_eq!(code, 1);
    assert!(
        stdout.contains(&format!("lost       1 rows marked published but not on the topic; first: {lost_id}")),
        "{stdout}"
    );
    assert!(stdout.contains("result: PROBLEMS FOUND"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_checks_only_the_requested_id_or_time_range() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    relayed(&env, &topic, 10).await;
    let db = env.client().await;
    let lost_id: i64 = db
        .query_one(
            "INSERT INTO outbox (topic, payload, published_at, created_at) \
             VALUES ($1, '{}', now(), now() - interval '2 days') RETURNING id",
            &[&topic],
        )
        .await
        .unwrap()
        .get(0);

    let (code, report) = audit_json(&env, &["--topic", &topic, "--to-id", &(lost_id - 1).to_string()]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["rows"], 10);
    let (code, report) = audit_json(&env, &["--topic", &topic, "--from-id", &lost_id.to_string()]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["rows"], 1);

    let since = db.query_one("SELECT (now() - interval '1 day')::text", &[]).await.unwrap().get::<_, String>(0);
    let (code, report) = audit_json(&env, &["--topic", &topic, "--since", &since]);
    assert_eq!(code, 0, "the backdated lost row is outside the time range: {report:#}");
    assert_eq!(report["rows"], 10);
    let (code, report) = audit_json(&env, &["--topic", &topic, "--until", &since]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["rows"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_of_a_missing_topic_or_a_bad_time_fails_clearly() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let (code, _, stderr) = audit(&env, &["--topic", &unique_name("missing")]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    let topic = env.create_topic(1).await;
    let (code, _, stderr) = audit(&env, &["--topic", &topic, "--since", "yesterday-ish"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("--since \"yesterday-ish\"") && stderr.contains("timestamp"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_on_another_partition_after_partitions_were_added_is_a_duplicate_not_a_conflict() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let records = relayed(&env, &topic, 10).await;
    // Partitions were added and then the relay repeated a record: murmur2 over the new count
    // put its key on another partition, with the same bytes.
    let original = records.values().next().unwrap();
    let mut moved = original.clone();
    moved.partition = 1 - original.partition;
    produce_copy(&env.brokers, &topic, &moved, None).await;

    let (code, report) = audit_json(&env, &["--topic", &topic]);
    assert_eq!(code, 0, "nothing to repair: {report:#}");
    assert_eq!(report["duplicated"]["count"], 1);
    assert_eq!(report["conflicting"]["count"], 0, "{report:#}");
    assert_eq!(report["moved"]["count"], 1);
    assert!(report["moved"]["first"][0].as_str().unwrap().contains(&original.event_id()), "{report:#}");
    let (_, stdout, _) = audit(&env, &["--topic", &topic]);
    assert!(stdout.contains("moved      1 duplicated rows with equal copies on another partition"), "{stdout}");
}

/// Issue 16: a healthy audit printed librdkafka's end-of-partition events as errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_audit_prints_its_report_and_nothing_else() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    relayed(&env, &topic, 10).await;
    let path = write_config(&env, &env.config());
    let (code, stdout, stderr) = run_command(&["--config", path.to_str().unwrap(), "audit", "--topic", &topic], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("result: nothing lost"), "{stdout}");
    assert!(!stderr.contains("ERROR") && !stderr.contains("WARN"), "a healthy run logs no error: {stderr}");
}

/// Issue 16: `--from-id 10 --to-id 5` said "nothing lost" and exited 0; a range that cannot
/// hold a row is a mistake (exit 3, as the README says for a bad range).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_id_range_is_refused_with_exit_3() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let (code, stdout, stderr) = audit(&env, &["--topic", &topic, "--from-id", "10", "--to-id", "5"]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(stderr.contains("--from-id") && stderr.contains("--to-id"), "{stderr}");
}

/// Issue 16: with a wrong broker address, audit waited 30 s, then printed some 90 librdkafka
/// error lines before its own. It now says so in one line, sooner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_against_a_broker_that_never_answers_fails_with_one_line() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let mut config = env.config();
    config.kafka.brokers = format!("127.0.0.1:{}", free_port());
    config.kafka.startup_timeout = std::time::Duration::from_secs(3);
    let path = write_config(&env, &config);
    let (code, stdout, stderr) = run_command(&["--config", path.to_str().unwrap(), "audit", "--topic", "t"], &[]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("kafka.brokers"), "{stderr}");
}

/// Issue 16: with `mark = "delete"` the audit said "duplicated 0, nothing lost" though it can
/// see neither: published rows are gone from the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mark_delete_the_audit_says_what_it_cannot_see() {
    let env = TestEnv::start().await;
    env.migrate().await;
    env.allow_relay_to_delete();
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    insert_events(&db, &(0..5).map(|n| NewEvent::keyed(&topic, "k", n)).collect::<Vec<_>>()).await;
    let mut config = env.config();
    config.outbox.mark = outbox_relay::config::MarkMode::Delete;
    let relay = env.spawn_relay(config.clone());
    consume(&env.brokers, &topic, 5).await;
    wait_until(PATIENCE, "published rows deleted", || async {
        db.query_one("SELECT count(*) FROM outbox", &[]).await.unwrap().get::<_, i64>(0) == 0
    })
    .await;
    relay.stop().await.expect("clean stop");

    let path = write_config(&env, &config);
    let args = ["--config", path.to_str().unwrap(), "audit", "--topic", &topic];
    let (code, stdout, stderr) = run_command(&args, &[("RUST_LOG", "off")]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("lost       not detectable"), "{stdout}");
    assert!(stdout.contains("among the rows still in the table"), "{stdout}");
    assert!(stdout.contains("neither lost nor duplicated ones can be seen"), "{stdout}");
    assert!(!stdout.contains("result: nothing lost"), "{stdout}");
}

/// Issue 21: a broker unreachable for a moment made the audit exit 3 at librdkafka's first
/// transport error. Here the only broker restarts while the audit starts: it refuses
/// connections until it serves again, and the audit waits for it within its timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_waits_out_a_broker_restarting_under_it() {
    let mut env = TestEnv::start_with_own_broker().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    relayed(&env, &topic, 10).await;
    env.broker.as_mut().expect("own broker").stop(1);
    let mut config = env.config();
    config.kafka.startup_timeout = Duration::from_secs(90);
    let path = write_config(&env, &config).to_str().unwrap().to_owned();
    let audit_topic = topic.clone();
    let audit = std::thread::spawn(move || {
        run_command(&["--config", &path, "audit", "--topic", &audit_topic, "--json"], &[("RUST_LOG", "off")])
    });
    // The node takes seconds to serve again: the audit meets refused connections meanwhile.
    env.broker.as_mut().expect("own broker").restart(1);
    let (code, stdout, stderr) = audit.join().expect("the audit's thread");
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(report["published"], 10, "{report:#}");
}
