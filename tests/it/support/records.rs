//! A topic's records as a consumer sees them ([`Received`]: partition, offset, key, value,
//! headers): reading a topic back, exactly or up to a count, and producing a copy of a record as
//! a crash between publish and mark would. [`RawRecord`]s are the same records from several
//! topics with their bytes untouched, for comparing two producers' output byte for byte.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::environment::{PATIENCE, unique_name};

/// One record read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Partition it was on.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// Key as text.
    pub key: Option<String>,
    /// Value bytes; `None` for a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Received {
    /// The value of header `name` as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()))
    }

    /// The `event_id` header.
    pub fn event_id(&self) -> String {
        self.header("event_id").expect("every record carries an event_id header")
    }

    /// The payload as text.
    pub fn payload_text(&self) -> Option<String> {
        self.payload.as_ref().map(|p| String::from_utf8_lossy(p).into_owned())
    }
}

/// Which records of transactions a reader sees (Kafka's `isolation.level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Committed records only (librdkafka's default, and the one every reader here used
    /// before exactly-once delivery).
    ReadCommitted,
    /// Every record written, aborted transactions' included.
    ReadUncommitted,
}

fn consumer(brokers: &str) -> StreamConsumer {
    consumer_with(brokers, Isolation::ReadCommitted)
}

fn consumer_with(brokers: &str, isolation: Isolation) -> StreamConsumer {
    let isolation = match isolation {
        Isolation::ReadCommitted => "read_committed",
        Isolation::ReadUncommitted => "read_uncommitted",
    };
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", isolation)
        .create()
        .expect("consumer")
}

/// Assigns every partition of `topic` to `consumer`, from the first offset.
fn assign_from_beginning(consumer: &StreamConsumer, topic: &str, partitions: i32) {
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment.add_partition_offset(topic, p, Offset::Beginning).expect("assignment");
    }
    consumer.assign(&assignment).expect("assign");
}

/// Number of partitions of `topic`.
pub fn partition_count(brokers: &str, topic: &str) -> i32 {
    let consumer = consumer(brokers);
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    metadata.topics().iter().find(|t| t.name() == topic).map(|t| t.partitions().len() as i32).unwrap_or(0)
}

/// Reads `topic` from the beginning until `expected` records arrived; panics if they do not
/// arrive within [`PATIENCE`]. Records are returned in arrival order (per-partition order).
pub async fn consume(brokers: &str, topic: &str, expected: usize) -> Vec<Received> {
    let consumer = consumer(brokers);
    let partitions = partition_count(brokers, topic);
    assign_from_beginning(&consumer, topic, partitions);
    let mut received = Vec::with_capacity(expected);
    let deadline = Instant::now() + PATIENCE;
    while received.len() < expected {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let message = match tokio::time::timeout(remaining, consumer.recv()).await {
            Ok(Ok(message)) => message,
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) => panic!("received {} of {expected} records from {topic} within {PATIENCE:?}", received.len()),
        };
        let record = to_received(&message);
        if record.header(SENTINEL_HEADER).is_none() {
            received.push(record);
        }
    }
    received
}

/// Header marking the harness's own end-of-topic records.
const SENTINEL_HEADER: &str = "outbox-test-sentinel";

/// Everything on `topic` right now, exactly: writes a sentinel record to every partition, then
/// reads from the beginning until each partition's sentinel arrives, and returns the records
/// before them. (Counting by high watermarks is not an option: tansu 0.6 reports them short.)
pub async fn read_topic(brokers: &str, topic: &str) -> Vec<Received> {
    read_topic_as(brokers, topic, Isolation::ReadCommitted).await
}

/// As [`read_topic`], as a reader with `isolation` sees the topic.
pub async fn read_topic_as(brokers: &str, topic: &str, isolation: Isolation) -> Vec<Received> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let partitions = partition_count(brokers, topic);
    // Earlier calls left sentinels too; this call stops only at its own.
    let sentinel = unique_name("end");
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers).create().expect("producer");
    for p in 0..partitions {
        let headers = OwnedHeaders::new().insert(Header { key: SENTINEL_HEADER, value: Some(sentinel.as_str()) });
        producer
            .send(FutureRecord::<(), ()>::to(topic).partition(p).headers(headers), Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("sentinel to {topic}/{p}: {e}"));
    }
    let consumer = consumer_with(brokers, isolation);
    assign_from_beginning(&consumer, topic, partitions);
    let mut ended = HashSet::new();
    let mut records = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while ended.len() < partitions as usize {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let message = match tokio::time::timeout(remaining, consumer.recv()).await {
            Ok(Ok(message)) => message,
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) => panic!("reading {topic}: sentinels of {} partitions missing", partitions as usize - ended.len()),
        };
        let received = to_received(&message);
        match received.header(SENTINEL_HEADER) {
            Some(id) if id == sentinel => {
                ended.insert(received.partition);
            }
            Some(_) => {}
            None if !ended.contains(&received.partition) => records.push(received),
            None => {}
        }
    }
    records
}

fn to_received(message: &rdkafka::message::BorrowedMessage<'_>) -> Received {
    let headers = message
        .headers()
        .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(|v| v.to_vec()))).collect())
        .unwrap_or_default();
    Received {
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        payload: message.payload().map(|p| p.to_vec()),
        headers,
    }
}

/// Produces `record` to `topic` again (same partition, key, value and headers), as a crash
/// between publish and mark would; `payload` replaces the value when given.
pub async fn produce_copy(brokers: &str, topic: &str, record: &Received, payload: Option<&[u8]>) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers).create().expect("producer");
    let mut headers = OwnedHeaders::new();
    for (key, value) in &record.headers {
        headers = headers.insert(Header { key, value: value.as_deref() });
    }
    let mut copy = FutureRecord::<[u8], [u8]>::to(topic).partition(record.partition).headers(headers);
    let key = record.key.as_ref().map(|k| k.as_bytes().to_vec());
    if let Some(key) = &key {
        copy = copy.key(key.as_slice());
    }
    let value = payload.map(|p| p.to_vec()).or_else(|| record.payload.clone());
    if let Some(value) = &value {
        copy = copy.payload(value.as_slice());
    }
    producer.send(copy, Duration::from_secs(30)).await.unwrap_or_else(|(e, _)| panic!("produce a copy: {e}"));
}

/// One record exactly as a consumer receives it, from any topic: for comparing the bytes two
/// producers wrote, where [`Received`] reads one topic and decodes its key as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    /// Topic it was on.
    pub topic: String,
    /// Partition it was on.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// Key bytes; `None` for a record without a key.
    pub key: Option<Vec<u8>>,
    /// Value bytes; `None` for a tombstone.
    pub value: Option<Vec<u8>>,
    /// Headers in order, each value `None` when the header has none.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The record's timestamp (milliseconds since the epoch), if it has one.
    pub timestamp: Option<i64>,
}

impl RawRecord {
    /// The value of the first header called `name`, if it has one.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n == name).and_then(|(_, v)| v.as_deref())
    }
}

/// Reads `topics` from the beginning until `expected` records arrived (the harness's own
/// end-of-topic sentinels left out) and returns them, each partition's in offset order; panics
/// if they do not arrive `within`.
pub async fn consume_records(brokers: &str, topics: &[&str], expected: usize, within: Duration) -> Vec<RawRecord> {
    let consumer = consumer(brokers);
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        let partitions = partition_count(brokers, topic);
        assert!(partitions > 0, "topic {topic} does not exist");
        for p in 0..partitions {
            assignment.add_partition_offset(topic, p, Offset::Beginning).expect("assignment");
        }
    }
    consumer.assign(&assignment).expect("assign");
    let mut records = Vec::with_capacity(expected);
    let deadline = Instant::now() + within;
    while records.len() < expected {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let message = match tokio::time::timeout(remaining, consumer.recv()).await {
            Ok(Ok(message)) => message,
            Ok(Err(e)) => panic!("reading {topics:?}: {e}"),
            Err(_) => panic!("received {} of {expected} records from {topics:?} within {within:?}", records.len()),
        };
        let record = to_raw_record(&message);
        if record.header(SENTINEL_HEADER).is_none() {
            records.push(record);
        }
    }
    records
}

fn to_raw_record(message: &rdkafka::message::BorrowedMessage<'_>) -> RawRecord {
    RawRecord {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers: message
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect())
            .unwrap_or_default(),
        timestamp: message.timestamp().to_millis(),
    }
}
