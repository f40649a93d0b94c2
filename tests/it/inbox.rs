//! Effectively-once processing on the consumer side: the example consumer, using the inbox,
//! applies a non-idempotent effect once per event on a topic that holds real duplicates from a
//! relay crash, and a consumer crash between its database commit and its offset commit is
//! harmless too.
#![cfg(feature = "failpoints")]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use crate::support::*;
use outbox_relay::inbox::{Event, INBOX_SQL, Inbox};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;

const ACCOUNTS: usize = 12;

fn deposit(topic: &str, n: usize) -> NewEvent {
    let account = format!("acct-{}", n % ACCOUNTS);
    NewEvent {
        topic: topic.to_owned(),
        key: Some(account.clone()),
        payload: Some(format!(r#"{{"account": "{account}", "amount": {}}}"#, n % 7 + 1)),
        headers: None,
    }
}

/// The example binary, built next to this test by `cargo nextest run --all-targets`.
fn balance_consumer() -> PathBuf {
    let deps = std::env::current_exe().expect("test path");
    let bin = deps.parent().and_then(|d| d.parent()).expect("target dir").join("examples").join("balance_consumer");
    assert!(bin.exists(), "{} is missing: build it with cargo build --examples", bin.display());
    bin
}

/// Runs the example consumer to the end of the topic and returns its summary line.
fn run_balance_consumer(env: &TestEnv, topic: &str, group: &str) -> String {
    let out = Command::new(balance_consumer())
        .args([env.database_url.as_str(), env.brokers.as_str(), topic, group, "--stop-at-end"])
        .output()
        .expect("run balance_consumer");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

async fn balances(db: &tokio_postgres::Client) -> HashMap<String, i64> {
    db.query("SELECT account, balance FROM accounts", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Each event of the table applied once: the balances an exactly-once consumer must reach.
async fn expected_balances(db: &tokio_postgres::Client) -> HashMap<String, i64> {
    db.query("SELECT payload->>'account', sum((payload->>'amount')::bigint)::int8 FROM outbox GROUP BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_consumer_applies_each_event_once_despite_relay_and_consumer_crashes() {
    const ROWS: usize = 1_200;
    const BATCH: usize = 300;
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    let db = env.client().await;
    insert_events(&db, &(0..ROWS).map(|n| deposit(&topic, n)).collect::<Vec<_>>()).await;

    // A relay crash after the broker took the second batch: that batch is on the topic twice.
    let mut config = env.config();
    config.relay.batch_size = BATCH;
    let mut crashing =
        spawn_relay_process_with_env(&env, &config, &[("FAILPOINTS", "relay-before-mark=1*off->return")]);
    assert_eq!(crashing.wait().await, None, "the relay crashed on the fault; log:\n{}", crashing.log());
    let mut relay = spawn_relay_process(&env, &config);
    wait_until(PATIENCE, "every row marked", || async { unpublished_count(&db).await == 0 }).await;
    let records = read_topic(&env.brokers, &topic).await;
    assert_eq!(records.len(), ROWS + BATCH, "the topic holds real duplicates");

    // Without the inbox, applying every record would count the duplicated batch twice.
    let expected = expected_balances(&db).await;
    let mut naive: HashMap<String, i64> = HashMap::new();
    for record in &records {
        let deposit: serde_json::Value = serde_json::from_slice(record.payload.as_deref().unwrap()).unwrap();
        *naive.entry(deposit["account"].as_str().unwrap().to_owned()).or_default() +=
            deposit["amount"].as_i64().unwrap();
    }
    assert_ne!(naive, expected, "the duplicates would change the balances");

    let group = unique_name("balances");
    let summary = run_balance_consumer(&env, &topic, &group);
    assert!(summary.contains(&format!("applied {ROWS} events, skipped {BATCH} duplicates")), "{summary}");
    assert_eq!(balances(&db).await, expected, "each event applied exactly once");

    // A consumer that dies after its database commit and before its offset commit: the next
    // run gets the message again and must skip it.
    insert_events(&db, &[deposit(&topic, ROWS)]).await;
    wait_until(PATIENCE, "the new row marked", || async { unpublished_count(&db).await == 0 }).await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0));
    apply_without_committing_the_offset(&env, &topic, &group).await;
    let expected = expected_balances(&db).await;
    assert_eq!(balances(&db).await, expected, "the crashed consumer's effect is committed");
    let summary = run_balance_consumer(&env, &topic, &group);
    assert!(summary.contains("applied 0 events, skipped 1 duplicates"), "redelivered, then skipped: {summary}");
    assert_eq!(balances(&db).await, expected, "and not applied twice");
}

/// Reads the group's next message and applies it through the inbox, committing the database
/// transaction but never the Kafka offset, as a consumer killed between the two would.
async fn apply_without_committing_the_offset(env: &TestEnv, topic: &str, group: &str) {
    let mut db = env.client().await;
    db.batch_execute(INBOX_SQL).await.unwrap();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let message = tokio::time::timeout(PATIENCE, consumer.recv()).await.expect("the new message").unwrap();
    let event = Event::from_message(&message).unwrap();
    let deposit: serde_json::Value = serde_json::from_slice(event.payload.unwrap()).unwrap();
    let tx = db.transaction().await.unwrap();
    assert!(Inbox::new(group).record(&tx, &event).await.unwrap(), "a new event");
    tx.execute(
        "UPDATE accounts SET balance = balance + $2 WHERE account = $1",
        &[&deposit["account"].as_str().unwrap(), &deposit["amount"].as_i64().unwrap()],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_deletes_only_old_inbox_rows_of_its_own_consumer() {
    let env = TestEnv::start().await;
    let db = env.client().await;
    db.batch_execute(INBOX_SQL).await.unwrap();
    db.batch_execute(
        "INSERT INTO outbox_inbox (consumer, event_id, topic, kafka_partition, kafka_offset, processed_at) \
         SELECT c, c || n, 't', 0, n, now() - (n || ' days')::interval \
         FROM generate_series(1, 10) n, unnest(ARRAY['mine', 'theirs']) c",
    )
    .await
    .unwrap();
    let pruned = Inbox::new("mine").prune(&db, std::time::Duration::from_secs(7 * 86_400 + 3_600)).await.unwrap();
    assert_eq!(pruned, 3, "days 8, 9 and 10");
    let left: i64 = db.query_one("SELECT count(*) FROM outbox_inbox", &[]).await.unwrap().get(0);
    assert_eq!(left, 17, "the other consumer's rows are kept");
}

/// An inbox table of `name` with the columns of `sql/inbox.sql`, partitioned by `scheme`.
async fn partitioned_inbox(db: &tokio_postgres::Client, name: &str, scheme: &str, partitions: &[&str]) {
    db.batch_execute(&format!(
        "CREATE TABLE {name} (consumer text NOT NULL, event_id text NOT NULL, topic text NOT NULL, \
           kafka_partition int NOT NULL, kafka_offset bigint NOT NULL, processed_at timestamptz NOT NULL DEFAULT now(), \
           PRIMARY KEY (consumer, event_id)) PARTITION BY {scheme}"
    ))
    .await
    .unwrap();
    for (i, bound) in partitions.iter().enumerate() {
        db.batch_execute(&format!("CREATE TABLE {name}_{i} PARTITION OF {name} FOR VALUES {bound}")).await.unwrap();
    }
    // Old rows of "billing", fresh rows of "shipping" for the same events.
    db.batch_execute(&format!(
        "INSERT INTO {name} (consumer, event_id, topic, kafka_partition, kafka_offset, processed_at) \
         SELECT 'billing', 'e' || n, 't', 0, n, now() - interval '30 days' FROM generate_series(1, 100) n; \
         INSERT INTO {name} (consumer, event_id, topic, kafka_partition, kafka_offset) \
         SELECT 'shipping', 'e' || n, 't', 0, n FROM generate_series(1, 100) n"
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_a_partitioned_inbox_deletes_only_its_own_old_rows() {
    let env = TestEnv::start().await;
    let db = env.client().await;
    let schemes = [
        ("inbox_by_consumer", "LIST (consumer)", vec!["IN ('billing')", "IN ('shipping')"]),
        (
            "inbox_by_event",
            "HASH (event_id)",
            vec![
                "WITH (MODULUS 4, REMAINDER 0)",
                "WITH (MODULUS 4, REMAINDER 1)",
                "WITH (MODULUS 4, REMAINDER 2)",
                "WITH (MODULUS 4, REMAINDER 3)",
            ],
        ),
    ];
    for (name, scheme, partitions) in schemes {
        partitioned_inbox(&db, name, scheme, &partitions).await;
        let inbox = Inbox::with_table(name, "billing").unwrap();
        let pruned = inbox.prune(&db, std::time::Duration::from_secs(7 * 86_400)).await.unwrap();
        assert_eq!(pruned, 100, "{scheme}: billing's old rows");
        let sql = format!("SELECT consumer, count(*) FROM {name} GROUP BY 1");
        let left: Vec<(String, i64)> =
            db.query(&sql, &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(left, [("shipping".to_owned(), 100)], "{scheme}: shipping's fresh rows are all kept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_handling_fails_is_delivered_again_before_the_next_one() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let mut db = env.client().await;
    Inbox::create_table(&mut db).await.unwrap();
    db.batch_execute("CREATE TABLE applied (n int)").await.unwrap();
    insert_events(&db, &(0..3).map(|n| NewEvent::keyed(&topic, "k", n)).collect::<Vec<_>>()).await;
    let relay = env.spawn_relay(env.config());
    wait_until(PATIENCE, "the rows to be published", || async { unpublished_count(&db).await == 0 }).await;
    relay.stop().await.unwrap();

    let config = outbox_relay::inbox::consumer_config(&env.brokers, &unique_name("group"));
    outbox_relay::inbox::check_consumer_config(&config).unwrap();
    let consumer: StreamConsumer = config.create().unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let inbox = Inbox::new("applier");
    let mut failed_once = false;
    let mut deliveries = Vec::new();
    while deliveries.iter().filter(|(_, ok)| *ok).count() < 3 {
        let message = match tokio::time::timeout(PATIENCE, consumer.recv()).await {
            Ok(message) => message.unwrap(),
            Err(_) => panic!("no message after {deliveries:?}"),
        };
        let n: i32 = serde_json::from_slice::<serde_json::Value>(message.payload().unwrap()).unwrap()["n"]
            .as_i64()
            .unwrap() as i32;
        let outcome = inbox
            .handle(&mut db, &consumer, &message, async |tx, _event| {
                // The first message of the batch: tansu 0.6 answers a fetch from an offset
                // inside a record batch with nothing (Apache Kafka returns the batch).
                if n == 0 && !failed_once {
                    return Err("the handler's database call timed out".into());
                }
                tx.execute("INSERT INTO applied VALUES ($1)", &[&n]).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
            .await;
        if outcome.is_err() {
            failed_once = true;
        }
        deliveries.push((n, outcome.is_ok()));
    }
    assert_eq!(deliveries, [(0, false), (0, true), (1, true), (2, true)], "the failed message comes again first");
    let applied: Vec<i32> =
        db.query("SELECT n FROM applied ORDER BY n", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(applied, [0, 1, 2], "each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_example_consumers_started_at_once_on_a_fresh_database_apply_each_event_once() {
    const ROWS: usize = 300;
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    let db = env.client().await;
    insert_events(&db, &(0..ROWS).map(|n| deposit(&topic, n)).collect::<Vec<_>>()).await;
    let relay = env.spawn_relay(env.config());
    wait_until(PATIENCE, "every row marked", || async { unpublished_count(&db).await == 0 }).await;
    relay.stop().await.unwrap();

    // Both create the inbox and accounts tables at the same moment, in one consumer group.
    let group = unique_name("balances");
    let start = || {
        Command::new(balance_consumer())
            .args([env.database_url.as_str(), env.brokers.as_str(), topic.as_str(), group.as_str(), "--stop-at-end"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start balance_consumer")
    };
    let (first, second) = (start(), start());
    let mut applied = 0;
    for child in [first, second] {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let count: usize = stdout.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect(&stdout);
        applied += count;
    }
    assert_eq!(applied, ROWS, "the two consumers split the events");
    assert_eq!(balances(&db).await, expected_balances(&db).await, "each event applied exactly once");
}

/// A payload the example consumer cannot apply (not JSON, a deposit without its amount, a
/// tombstone) would fail again however often it is read: the consumer parks it, with its event
/// id, position and why, logs that, and goes on. It used to exit on the first one and, restarted,
/// exit on it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_consumer_parks_a_bad_payload_and_goes_on() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    let mut events: Vec<NewEvent> = (0..10).map(|n| deposit(&topic, n)).collect();
    let bad = |payload: Option<&str>| NewEvent {
        topic: topic.clone(),
        key: Some("acct-0".to_owned()),
        payload: payload.map(str::to_owned),
        headers: None,
    };
    events.insert(3, bad(Some(r#"{"account": "acct-0"}"#)));
    events.insert(7, bad(Some(r#""not a deposit""#)));
    events.push(bad(None));
    insert_events(&db, &events).await;
    let relay = env.spawn_relay(env.config());
    wait_until(PATIENCE, "every row published", || async { unpublished_count(&db).await == 0 }).await;
    relay.stop().await.unwrap();

    let group = unique_name("parking");
    let out = Command::new(balance_consumer())
        .args([env.database_url.as_str(), env.brokers.as_str(), topic.as_str(), group.as_str(), "--stop-at-end"])
        .output()
        .expect("run balance_consumer");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "applied 10 events, skipped 0 duplicates, parked 3 bad payloads");

    let parked: Vec<(String, i64, String)> = db
        .query("SELECT event_id, \"offset\", error FROM parked_events ORDER BY \"offset\"", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let offsets: Vec<i64> = parked.iter().map(|p| p.1).collect();
    assert_eq!(offsets, [3, 7, 12], "one partition: offsets follow the rows");
    assert!(parked[0].2.contains("missing field `amount`"), "{parked:?}");
    assert!(parked[2].2.contains("tombstone"), "{parked:?}");
    for (event_id, offset, _) in &parked {
        assert!(stderr.contains(&format!("parked event {event_id} ({topic}[0]@{offset})")), "logged: {stderr}");
    }
    let expected: HashMap<String, i64> = db
        .query(
            "SELECT payload->>'account', sum((payload->>'amount')::bigint)::int8 FROM outbox \
             WHERE jsonb_typeof(payload->'amount') = 'number' GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(balances(&db).await, expected, "the good events applied once each");

    // The parked records' offsets were committed: the next run starts past them.
    insert_events(&db, &[deposit(&topic, 10)]).await;
    let relay = env.spawn_relay(env.config());
    wait_until(PATIENCE, "the new row published", || async { unpublished_count(&db).await == 0 }).await;
    relay.stop().await.unwrap();
    let again = run_balance_consumer(&env, &topic, &group);
    assert_eq!(again.trim(), "applied 1 events, skipped 0 duplicates, parked 0 bad payloads");
}

/// Records in Debezium's shape (`examples/debezium.toml`) carry the event id in header `id`: an
/// inbox told so deduplicates them; the default one refuses them, naming the header it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_reads_the_event_id_from_the_header_the_relay_writes_it_to() {
    use crate::debezium_examples::{DEBEZIUM_TABLE, connection_vars, example, run_debezium_sql};
    use outbox_relay::inbox::{Handled, InboxError};

    let env = TestEnv::start().await;
    let mut db = env.client().await;
    db.batch_execute(DEBEZIUM_TABLE).await.unwrap();
    run_debezium_sql(&env);
    db.batch_execute(INBOX_SQL).await.unwrap();
    let aggregate = unique_name("order");
    let topic = format!("outbox.event.{aggregate}");
    create_topic(&env.brokers, &topic, 1).await;
    db.execute(
        "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload) \
         VALUES (gen_random_uuid(), $1, 'o-1', 'OrderCreated', '{\"n\": 1}')",
        &[&aggregate],
    )
    .await
    .unwrap();
    let connection = connection_vars(&env);
    let vars: Vec<(&str, &str)> = connection.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut relay = spawn_relay_process_from(&example("debezium.toml"), &vars, &env.path(""));
    let published = consume(&env.brokers, &topic, 1).await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "{}", relay.log());
    // A copy, as a relay crash between publish and mark makes one.
    produce_copy(&env.brokers, &topic, &published[0], None).await;

    let group = unique_name("group");
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let inbox = Inbox::new(&group).with_event_id_header("id");
    let mut applied = 0;
    for expected in [Handled::Applied, Handled::Duplicate] {
        let message = tokio::time::timeout(PATIENCE, consumer.recv()).await.expect("a message").unwrap();
        match Event::from_message(&message) {
            Err(InboxError::MissingEventId { header, .. }) => assert_eq!(header, "event_id"),
            other => panic!("the default inbox finds no event_id header: {other:?}"),
        }
        let handled = inbox
            .handle(&mut db, &consumer, &message, async |_, _| {
                applied += 1;
                Ok::<_, tokio_postgres::Error>(())
            })
            .await
            .unwrap();
        assert_eq!(handled, expected);
    }
    assert_eq!(applied, 1, "the copy is skipped");
}
