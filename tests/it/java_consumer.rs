//! A consumer nobody on this project wrote reads what the relay wrote: Apache Kafka's own Java
//! client (`tests/java/ReadTopic.java`, run with Java 17's source launcher on the kafka-clients
//! jar `scripts/kafka.sh fetch` caches) reads a topic the relay filled, and what it reads must be
//! the database's rows: every keyed record on the partition Java's default partitioner picks
//! for its key, the row's headers then `event_id`, tombstones as a null value.
//!
//! The other tests read topics with librdkafka, the library the relay produces with: a mistake
//! the two share (a partitioner, an encoding) would pass them all. Java's client is the one most
//! consumers (Kafka Streams, Kafka Connect, Spring) run.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use crate::support::*;
use serde::Deserialize;

/// One record as `ReadTopic.java` prints it.
#[derive(Debug, Deserialize)]
struct JavaRecord {
    partition: i32,
    offset: i64,
    key: Option<String>,
    value: Option<String>,
    headers: Vec<(String, Option<String>)>,
    /// The partition Java's default partitioner picks for `key`; `None` for a keyless record.
    java_partition: Option<i32>,
}

impl JavaRecord {
    fn event_id(&self) -> &str {
        let ids: Vec<&str> =
            self.headers.iter().filter(|(name, _)| name == "event_id").filter_map(|(_, v)| v.as_deref()).collect();
        assert_eq!(ids.len(), 1, "one event_id header per record: {self:?}");
        ids[0]
    }
}

/// One outbox row as the database has it.
#[derive(Debug)]
struct Row {
    event_id: String,
    key: Option<String>,
    /// The payload as the relay sends it (jsonb's text); `None` for SQL NULL.
    payload: Option<String>,
    /// The headers object's entries in the order PostgreSQL keeps them.
    headers: Vec<(String, Option<String>)>,
}

/// Every row of the outbox, in id order.
async fn rows(db: &tokio_postgres::Client) -> Vec<Row> {
    let sql = "SELECT event_id::text, key, payload::text, \
               ARRAY(SELECT h.key FROM jsonb_each_text(headers) WITH ORDINALITY AS h ORDER BY ordinality), \
               ARRAY(SELECT h.value FROM jsonb_each_text(headers) WITH ORDINALITY AS h ORDER BY ordinality) \
               FROM outbox ORDER BY id";
    let rows = db.query(sql, &[]).await.expect("outbox rows");
    rows.iter()
        .map(|r| {
            let names: Vec<String> = r.get(3);
            let values: Vec<Option<String>> = r.get(4);
            Row {
                event_id: r.get(0),
                key: r.get(1),
                payload: r.get(2),
                headers: names.into_iter().zip(values).collect(),
            }
        })
        .collect()
}

/// Reads all of `topic` with `tests/java/ReadTopic.java`.
fn read_with_java(brokers: &str, topic: &str) -> Vec<JavaRecord> {
    let java = std::env::var("JAVA").unwrap_or_else(|_| "java".to_owned());
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/java/ReadTopic.java");
    let out = Command::new(&java)
        .arg("-cp")
        .arg(kafka::jars().join("*"))
        .arg(&source)
        .args([brokers, topic])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "Java is missing ({java}: {e}): this test runs Apache Kafka's Java client with Java 17's source \
                 launcher; install a JDK 17 or newer (Debian: apt-get install openjdk-17-jdk-headless) or set JAVA"
            )
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && !has_compiler(&java) {
        panic!(
            "{java} cannot run a Java source file: it is a runtime without the compiler (jdk.compiler); install a \
             JDK 17 or newer (Debian: apt-get install openjdk-17-jdk-headless) or set JAVA to one\n{stderr}"
        );
    }
    assert!(out.status.success(), "{} failed:\n{stderr}", source.display());
    String::from_utf8(out.stdout)
        .expect("UTF-8 output")
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("ReadTopic printed {line:?}: {e}")))
        .collect()
}

/// Whether `java` has the compiler its source launcher needs (a JDK, not a bare runtime).
fn has_compiler(java: &str) -> bool {
    Command::new(java)
        .arg("--list-modules")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).lines().any(|m| m.starts_with("jdk.compiler@")))
}

/// Keyed events over many partitions, keyless ones, a tombstone, and headers (one with a null
/// value, one a forged `event_id` the relay replaces).
fn events(topic: &str) -> Vec<NewEvent> {
    let mut events = Vec::new();
    for n in 0..4 {
        for key in ["order-1", "order-2", "customer-17", "sku-AX-9", "ü-ключ", "k", "a-little-bit-long-string"] {
            events.push(NewEvent::keyed(topic, key, n));
        }
        events.push(NewEvent { key: None, ..NewEvent::keyed(topic, "", n) });
    }
    events.push(NewEvent { payload: None, ..NewEvent::keyed(topic, "order-2", 99) });
    events.push(NewEvent {
        headers: Some(r#"{"type": "OrderPaid", "correlation_id": "c-1", "trace": null}"#.into()),
        ..NewEvent::keyed(topic, "order-1", 100)
    });
    events.push(NewEvent {
        headers: Some(r#"{"event_id": "forged", "source": "shop \"eu\"\n"}"#.into()),
        ..NewEvent::keyed(topic, "customer-17", 101)
    });
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javas_own_client_reads_every_row_as_written_on_the_partition_java_picks() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(6).await;
    let db = env.client().await;
    insert_events(&db, &events(&topic)).await;

    let relay = env.spawn_relay(env.config());
    wait_until(PATIENCE, "every row marked", || async { unpublished_count(&db).await == 0 }).await;
    relay.stop().await.expect("clean stop");

    let rows = rows(&db).await;
    let records = read_with_java(&env.brokers, &topic);
    assert_eq!(records.len(), rows.len(), "one record per row: {records:#?}");
    let by_event: HashMap<&str, &JavaRecord> = records.iter().map(|r| (r.event_id(), r)).collect();
    assert_eq!(by_event.len(), rows.len(), "no record twice");

    for row in &rows {
        let record = by_event.get(row.event_id.as_str()).unwrap_or_else(|| panic!("no record for {row:?}"));
        assert_eq!(record.key, row.key, "{row:?}");
        assert_eq!(record.value, row.payload, "the value is the payload, a NULL payload a null value: {row:?}");
        let mut headers: Vec<_> = row.headers.iter().filter(|(name, _)| name != "event_id").cloned().collect();
        headers.push(("event_id".to_owned(), Some(row.event_id.clone())));
        assert_eq!(record.headers, headers, "the row's headers in order, then its event_id");
        if row.key.is_some() {
            assert_eq!(
                Some(record.partition),
                record.java_partition,
                "key {:?} is on the partition Java's partitioner picks",
                row.key
            );
        }
    }

    // Per key, the offsets follow the ids (rows are in id order).
    let mut last_offset: HashMap<&str, i64> = HashMap::new();
    for row in rows.iter().filter(|r| r.key.is_some()) {
        let record = by_event[row.event_id.as_str()];
        if let Some(previous) = last_offset.insert(row.key.as_deref().unwrap(), record.offset) {
            assert!(record.offset > previous, "key {:?} out of order at {record:?}", row.key);
        }
    }
    let partitions: std::collections::HashSet<i32> = records.iter().map(|r| r.partition).collect();
    assert!(partitions.len() >= 3, "the keys spread over the partitions, so a wrong partitioner shows: {partitions:?}");
}
