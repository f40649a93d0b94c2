//! `outbox-relay audit` reconciles the table with the topic: it finds rows marked published
//! that never reached the topic, duplicated event ids (and copies that differ), and rows
//! pending or failed; it exits 0 only when nothing is lost. Rows whose records the topic
//! removed itself (retention, delete-records, compaction) are expired, not lost.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

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

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client")
}

/// Creates a one-partition topic with the given topic configuration and returns its name.
async fn create_topic_with(env: &TestEnv, configs: &[(&str, &str)]) -> String {
    let name = unique_name("topic");
    let mut topic = NewTopic::new(&name, 1, TopicReplication::Fixed(-1));
    for (key, value) in configs {
        topic = topic.set(key, value);
    }
    for result in admin(&env.brokers).create_topics(&[topic], &AdminOptions::new()).await.expect("create topic") {
        result.unwrap_or_else(|(topic, e)| panic!("create topic {topic}: {e}"));
    }
    wait_until(PATIENCE, "the new topic's metadata", || async { partition_count(&env.brokers, &name) == 1 }).await;
    name
}

/// What `kafka-delete-records` does: removes every record of each partition of `topic`, which
/// moves its log start offset to its end, as retention does once every segment is old enough.
async fn delete_all_records(brokers: &str, topic: &str) {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().expect("consumer");
    let mut offsets = TopicPartitionList::new();
    for partition in 0..partition_count(brokers, topic) {
        let (_, end) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)).expect("watermarks");
        offsets.add_partition_offset(topic, partition, Offset::Offset(end)).expect("offsets");
    }
    let deleted = admin(brokers).delete_records(&offsets, &AdminOptions::new()).await.expect("delete records");
    for element in deleted.elements() {
        assert!(element.error().is_ok(), "delete records of partition {}: {:?}", element.partition(), element.error());
    }
}

/// The keys of every record on `topic` now (one partition), read to its end.
fn keys_on(brokers: &str, topic: &str) -> Vec<Option<String>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("reader"))
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning).expect("assignment");
    consumer.assign(&assignment).expect("assign");
    let mut keys = Vec::new();
    loop {
        match consumer.poll(Duration::from_secs(10)) {
            Some(Ok(message)) => keys.push(message.key().map(|k| String::from_utf8_lossy(k).into_owned())),
            Some(Err(KafkaError::PartitionEOF(_))) => return keys,
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => panic!("reading {topic}: no end of partition within 10 s"),
        }
    }
}

/// A record of another key, which rolls the active segment once `segment.ms` has passed.
async fn produce_filler(brokers: &str, topic: &str) {
    let filler = Received {
        partition: 0,
        offset: 0,
        key: Some(unique_name("filler")),
        payload: Some(b"{}".to_vec()),
        headers: Vec::new(),
    };
    produce_copy(brokers, topic, &filler, None).await;
}

/// Issue 21: records that retention (here delete-records, which does the same to the log start
/// offset) removed were reported lost, and the audit exited 1 on a topic doing its job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_whose_records_retention_removed_are_expired_not_lost() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    relayed(&env, &topic, 20).await;
    delete_all_records(&env.brokers, &topic).await;

    let (code, report) = audit_json(&env, &["--topic", &topic]);
    assert_eq!(code, 0, "expired rows are not a failure: {report:#}");
    assert_eq!(report["lost"]["count"], 0, "{report:#}");
    assert_eq!(report["expired"]["count"], 20, "{report:#}");
    assert_eq!(report["published"], 0);
    let first = report["expired"]["first"][0].as_str().unwrap();
    assert!(first.contains("below log start offset"), "each row says why: {first}");
    let log_starts: Vec<i64> =
        report["partitions"].as_array().unwrap().iter().map(|p| p["log_start_offset"].as_i64().unwrap()).collect();
    assert_eq!(log_starts.iter().sum::<i64>(), 20, "every record was deleted: {report:#}");
    // Read from a time on, the audit begins where that time's records would be: gone too.
    let db = env.client().await;
    let since = db.query_one("SELECT (now() - interval '1 day')::text", &[]).await.unwrap().get::<_, String>(0);
    let (code, report) = audit_json(&env, &["--topic", &topic, "--since", &since]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["expired"]["count"], 20, "{report:#}");

    let (code, stdout, _) = audit(&env, &["--topic", &topic]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("expired    20 rows marked published"), "{stdout}");
    assert!(stdout.contains("lost       0 rows"), "{stdout}");
    assert!(stdout.contains("result: nothing lost"), "{stdout}");
}

/// A trimmed topic does not hide a loss: a row created after the earliest record left on the
/// topic was published after it, so retention cannot have removed its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_newer_than_every_record_left_on_a_trimmed_topic_is_still_lost() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    relayed(&env, &topic, 5).await;
    delete_all_records(&env.brokers, &topic).await;
    relayed(&env, &topic, 5).await;
    let db = env.client().await;
    // Created well after the records left on the topic, beyond the clock allowance: never sent.
    let lost_id: i64 = db
        .query_one(
            "INSERT INTO outbox (topic, key, payload, published_at, created_at) \
             VALUES ($1, 'k0', '{}', now(), now() + interval '10 minutes') RETURNING id",
            &[&topic],
        )
        .await
        .unwrap()
        .get(0);

    let (code, report) = audit_json(&env, &["--topic", &topic]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["expired"]["count"], 5, "the deleted records: {report:#}");
    assert_eq!(report["published"], 5, "{report:#}");
    assert_eq!(report["lost"]["count"], 1, "{report:#}");
    assert_eq!(report["lost"]["first"][0], lost_id.to_string());
}

/// Issue 21: compaction keeps only a key's latest record; the rows of the records it removed
/// were reported lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_whose_records_compaction_replaced_are_expired_not_lost() {
    let env = TestEnv::start().await;
    env.migrate().await;
    // Segments roll as soon as a record comes 100 ms after the segment began, and any dirty
    // segment is worth cleaning. The cleaner looks every 15 s (the broker's default backoff).
    let topic = create_topic_with(
        &env,
        &[("cleanup.policy", "compact"), ("segment.ms", "100"), ("min.cleanable.dirty.ratio", "0.01")],
    )
    .await;
    let db = env.client().await;
    let mut events: Vec<NewEvent> = (0..3).map(|n| NewEvent::keyed(&topic, "order-7", n)).collect();
    events.push(NewEvent::keyed(&topic, "order-8", 3));
    let ids = insert_events(&db, &events).await;
    let relay = env.spawn_relay(env.config());
    consume(&env.brokers, &topic, 4).await;
    wait_until(PATIENCE, "rows marked", || async { unpublished_count(&db).await == 0 }).await;
    relay.stop().await.expect("clean stop");
    let (brokers, topic_name) = (env.brokers.clone(), topic.clone());
    wait_until(PATIENCE, "compaction of order-7's older records", || {
        let (brokers, topic) = (brokers.clone(), topic_name.clone());
        async move {
            produce_filler(&brokers, &topic).await;
            let keys = keys_on(&brokers, &topic);
            keys.iter().filter(|k| k.as_deref() == Some("order-7")).count() == 1
        }
    })
    .await;

    let (code, report) = audit_json(&env, &["--topic", &topic]);
    assert_eq!(code, 0, "compacted rows are not a failure: {report:#}");
    assert_eq!(report["cleanup_policy"], "compact");
    assert_eq!(report["lost"]["count"], 0, "{report:#}");
    assert_eq!(report["published"], 2, "order-7's latest and order-8: {report:#}");
    assert_eq!(report["expired"]["count"], 2, "{report:#}");
    let expired: Vec<&str> =
        report["expired"]["first"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(
        expired,
        [ids[0], ids[1]].map(|id| format!("{id} (compacted topic: its key has a later record)")),
        "{report:#}"
    );
    let (_, stdout, _) = audit(&env, &["--topic", &topic]);
    assert!(stdout.contains("cleanup.policy=compact"), "{stdout}");
}

/// A row marked published that was never produced, on a topic that removed nothing (log start 0,
/// not compacted), is lost: expired is no excuse there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_never_produced_on_a_topic_that_removed_nothing_is_lost() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    relayed(&env, &topic, 5).await;
    let db = env.client().await;
    let lost_id: i64 = db
        .query_one(
            "INSERT INTO outbox (topic, key, payload, published_at) VALUES ($1, 'k0', '{}', now()) RETURNING id",
            &[&topic],
        )
        .await
        .unwrap()
        .get(0);

    let (code, report) = audit_json(&env, &["--topic", &topic]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["lost"]["count"], 1, "{report:#}");
    assert_eq!(report["lost"]["first"][0], lost_id.to_string());
    assert_eq!(report["expired"]["count"], 0, "{report:#}");
    assert_eq!(report["cleanup_policy"], "delete", "{report:#}");
    assert_eq!(report["partitions"][0]["log_start_offset"], 0, "{report:#}");
    let (_, stdout, _) = audit(&env, &["--topic", &topic]);
    assert!(stdout.contains("expired    0 rows"), "{stdout}");
    assert!(stdout.contains("result: PROBLEMS FOUND"), "{stdout}");
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
