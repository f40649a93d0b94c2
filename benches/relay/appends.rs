//! A topic's records as the broker appended them: one measure for every relay. The benchmark's
//! topics use `message.timestamp.type=LogAppendTime`, so each record's timestamp is the
//! broker's clock when it appended the record, whoever produced it; a writer on the same
//! machine puts its intended commit time in the payload, so append − intended is the relay's
//! commit-to-append latency.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::{Offset, TopicPartitionList};

use super::PARTITIONS;
use super::support::environment::unique_name;
use super::support::topics::create_topic_with;

/// The key of a row written before the measurement to warm a relay up (connections, the
/// producer's metadata of the topic); left out of every figure.
pub const WARM_UP_KEY: &str = "warm-up";

/// One record read back.
pub struct Appended {
    /// The broker's append time, milliseconds since the epoch.
    pub append_ms: i64,
    /// The intended commit time the writer put in the payload (`intended_ms`), if any.
    pub intended_ms: Option<f64>,
}

/// Creates a topic with a unique name and the benchmark's partitions, its timestamps the
/// broker's append times, and returns its name.
pub async fn create_append_time_topic(brokers: &str) -> String {
    create_topic_with(brokers, PARTITIONS, &[("message.timestamp.type", "LogAppendTime")]).await
}

fn consumer(brokers: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("bench-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// Waits until `topic` holds `records` records (the sum of its partitions' high watermarks),
/// checking every 50 ms; panics after `within`.
pub async fn wait_for(brokers: &str, topic: &str, records: i64, within: Duration) {
    let consumer = consumer(brokers);
    let deadline = Instant::now() + within;
    loop {
        let held: i64 = (0..PARTITIONS)
            .map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).map(|(_, high)| high).unwrap_or(0))
            .sum();
        if held >= records {
            return;
        }
        assert!(Instant::now() < deadline, "{topic} holds {held} of {records} records after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads all `records` records of `topic` back (blocking: run it on a blocking thread), the
/// warm-up rows left out.
pub fn read_back(brokers: &str, topic: &str, records: i64) -> Vec<Appended> {
    let consumer = consumer(brokers);
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment.add_partition_offset(topic, p, Offset::Beginning).expect("assignment");
    }
    consumer.assign(&assignment).expect("assign");
    let mut appended = Vec::with_capacity(records as usize);
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen < records {
        assert!(Instant::now() < deadline, "read {seen} of {records} records of {topic} back");
        let Some(message) = consumer.poll(Duration::from_millis(500)) else { continue };
        let message = message.expect("a record");
        seen += 1;
        if message.key() == Some(WARM_UP_KEY.as_bytes()) {
            continue;
        }
        let Timestamp::LogAppendTime(append_ms) = message.timestamp() else {
            panic!("{topic}'s records carry {:?}, not the broker's append time", message.timestamp())
        };
        let intended_ms = message
            .payload()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
            .and_then(|v| v["intended_ms"].as_f64());
        appended.push(Appended { append_ms, intended_ms });
    }
    appended
}

/// The `q` quantile (0 to 1) of sorted `values`, by nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}
