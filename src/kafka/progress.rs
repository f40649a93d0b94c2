//! The progress topic of `kafka.delivery = "exactly_once"`: each shard's owner and last
//! committed batch.
//!
//! Every transaction carries, besides its records, one progress record for each shard it has
//! rows of, keyed by the shard ([`crate::config::ExactlyOnce::progress_key`]), naming the
//! transactional id that wrote it, the PostgreSQL server, and the rows (ids and event ids)
//! committed and perhaps not yet marked. The topic is compacted, so it keeps each shard's latest. A relay that takes a
//! shard (at start, after a reconnect, from another relay) first fences the producers the
//! shard's latest records name, then reads the shard's latest committed record and marks the
//! rows it names, then commits a record naming itself the owner: a batch committed to Kafka
//! whose mark a crash prevented is never published again, and the next relay to take the shard
//! knows whom to fence.
//!
//! This module reads and checks the topic; it never touches the table.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::kafka::partitioner::java_partition;
use crate::kafka::publisher::PublisherError;
use crate::kafka::settings::reader_config;

/// How long one poll of the progress partition waits.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// The format of the progress record's value; a reader refuses a later one rather than guess.
/// Format 1 (a producer per shard, keyed by its transactional id) had no `owner`: its writer's
/// transactional id was the key.
pub const FORMAT: u32 = 2;

/// A shard's owner and its batches committed and perhaps not yet marked, as its progress
/// record holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The value's format ([`FORMAT`]).
    pub format: u32,
    /// The database the rows are in (`current_database()`).
    pub database: String,
    /// The table, schema-qualified as the server names it.
    pub table: String,
    /// The table's OID when the batch was claimed.
    pub table_oid: u32,
    /// The PostgreSQL server's system identifier; empty when it could not be read (and in
    /// records written before it was recorded). Two servers with databases and tables of the
    /// same names would otherwise share their progress keys.
    #[serde(default)]
    pub server: String,
    /// The shard.
    pub shard: i32,
    /// The transactional id that wrote the record: the producer a new owner of the shard must
    /// fence.
    #[serde(default)]
    pub owner: String,
    /// The rows committed by this record's transaction and by the one before it, whose mark may
    /// still be under way: every row of the shard committed and perhaps not yet marked.
    pub rows: Vec<ProgressRow>,
}

/// One row of a committed batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRow {
    /// The row's id, as text.
    pub id: String,
    /// The row's event id, as text; the mark checks it, so a row that took the id since (after
    /// a restore, a truncate restarting the identity) is not taken for this one.
    pub event_id: Option<String>,
}

impl Progress {
    /// The record's value.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the value of the record of `key`; an error for one this relay cannot read (see
    /// [`FORMAT`]).
    pub fn from_json(key: &[u8], value: &[u8]) -> Result<Progress, String> {
        let mut progress: Progress = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        match progress.format {
            FORMAT => {}
            1 => progress.owner = String::from_utf8_lossy(key).into_owned(),
            later => return Err(format!("format {later} (this relay reads formats 1 and {FORMAT})")),
        }
        Ok(progress)
    }
}

/// The progress topic, checked to exist and be compacted.
#[derive(Debug, Clone)]
pub struct ProgressTopic {
    /// Its name (`kafka.exactly_once.progress_topic`).
    pub name: String,
    /// Its partition count when checked.
    pub partitions: i32,
}

impl ProgressTopic {
    /// Checks that the progress topic exists and keeps each key's latest record for good
    /// (`cleanup.policy=compact`, without `delete`: a shard quiet for longer than the retention
    /// would lose its last record, and a crash before its mark would publish the batch again).
    pub fn check(config: &Config) -> Result<ProgressTopic, PublisherError> {
        let name = config.kafka.exactly_once.progress_topic.clone();
        let consumer: BaseConsumer = reader_config(config).create().map_err(PublisherError::Create)?;
        let waited = config.kafka.startup_timeout;
        let metadata = consumer
            .fetch_metadata(Some(&name), waited)
            .map_err(|e| PublisherError::ProgressTopicUnreadable { topic: name.clone(), error: e.to_string() })?;
        let partitions = match metadata.topics().iter().find(|t| t.name() == name) {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => t.partitions().len() as i32,
            _ => return Err(PublisherError::ProgressTopicMissing { topic: name }),
        };
        let policy = cleanup_policy(config, &name, waited).map_err(|e| match e {
            ReadError::Refused(error) => PublisherError::ProgressTopicRefused { topic: name.clone(), error },
            ReadError::Failed(error) => PublisherError::ProgressTopicUnreadable { topic: name.clone(), error },
        })?;
        let policies: Vec<&str> = policy.split(',').map(str::trim).collect();
        if !policies.contains(&"compact") || policies.contains(&"delete") {
            return Err(PublisherError::ProgressTopicNotCompacted { topic: name, policy });
        }
        Ok(ProgressTopic { name, partitions })
    }

    /// The partition holding `key`'s records: the relay writes each progress record to it
    /// explicitly, so readers need not trust a partitioner.
    pub fn partition_of(&self, key: &str) -> i32 {
        java_partition(key.as_bytes(), self.partitions as usize)
    }

    /// The latest committed progress record of `key` ([`ProgressTopic::read_latest_of`]).
    pub fn read_latest(&self, config: &Config, key: &str, within: Duration) -> Result<Option<Progress>, String> {
        let mut latest = self
            .read_latest_of(config, &[key.to_owned()], Isolation::ReadCommitted, within)
            .map_err(|e| e.to_string())?;
        Ok(latest.remove(key))
    }

    /// The latest progress record of each of `keys` that has one, read from the start of its
    /// partition to the end the partition had when the read began. `ReadCommitted` sees only
    /// committed records, and passes a transaction open below that end only once it has
    /// ended: call it only after the producers that may hold one are fenced, or it waits for
    /// the broker to abort them. `ReadUncommitted` sees every record written, aborted or still
    /// open: the latest names the last producer to write for the key. Blocks; run it off the
    /// async threads.
    pub fn read_latest_of(
        &self,
        config: &Config,
        keys: &[String],
        isolation: Isolation,
        within: Duration,
    ) -> Result<HashMap<String, Progress>, ReadError> {
        let mut latest = HashMap::new();
        let partitions: BTreeMap<i32, ()> = keys.iter().map(|k| (self.partition_of(k), ())).collect();
        if partitions.is_empty() {
            return Ok(latest);
        }
        let consumer: BaseConsumer = reader_config(config)
            .set("group.id", "outbox-relay-progress")
            .set("enable.auto.commit", "false")
            .set("isolation.level", isolation.as_str())
            .create()
            .map_err(|e| ReadError::Failed(e.to_string()))?;
        let deadline = Instant::now() + within;
        let left = || deadline.saturating_duration_since(Instant::now());
        // The end is the high watermark, asked by a read_uncommitted client: asked by a
        // read_committed consumer, the broker answers the last stable offset, which an open
        // transaction of another relay holds back, and a read that stopped there missed a
        // shard's last commit when it was written after: the batch was published again (seen
        // in the twelve-kill test).
        let watermarks: BaseConsumer = reader_config(config)
            .set("isolation.level", "read_uncommitted")
            .create()
            .map_err(|e| ReadError::Failed(e.to_string()))?;
        let mut ends = BTreeMap::new();
        let mut assignment = TopicPartitionList::new();
        for &partition in partitions.keys() {
            let (_, end) = watermarks
                .fetch_watermarks(&self.name, partition, left())
                .map_err(|e| ReadError::Failed(format!("reading the end of {}[{partition}]: {e}", self.name)))?;
            ends.insert(partition, end);
            assignment
                .add_partition_offset(&self.name, partition, Offset::Beginning)
                .map_err(|e: KafkaError| ReadError::Failed(e.to_string()))?;
        }
        consumer.assign(&assignment).map_err(|e| ReadError::Failed(e.to_string()))?;
        // The read ends at each partition's end as it was before: every record of a key written
        // (or, read_committed, committed) by then is below it, and a read_committed consumer
        // passes it only once every transaction below it has ended. Transaction markers take
        // offsets too, so the positions are followed rather than the records.
        let reached = |consumer: &BaseConsumer| {
            ends.iter().all(|(&partition, &end)| position(consumer, &self.name, partition) >= end)
        };
        while !reached(&consumer) {
            if Instant::now() >= deadline {
                return Err(ReadError::Failed(format!(
                    "reading {} to the ends {ends:?} took longer than {within:?}",
                    self.name
                )));
            }
            match consumer.poll(POLL_TIMEOUT) {
                Some(Ok(message)) => {
                    let Some(key) = message.key().and_then(|k| std::str::from_utf8(k).ok()) else { continue };
                    if !keys.iter().any(|k| k == key) {
                        continue;
                    }
                    match message.payload() {
                        Some(value) => {
                            let progress = Progress::from_json(key.as_bytes(), value).map_err(|e| {
                                let (partition, offset) = (message.partition(), message.offset());
                                ReadError::Failed(format!(
                                    "the progress record at {}[{partition}]@{offset}: {e}",
                                    self.name
                                ))
                            })?;
                            latest.insert(key.to_owned(), progress);
                        }
                        // A tombstone: nothing owed, no owner.
                        None => {
                            latest.remove(key);
                        }
                    }
                }
                None => {}
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::TopicAuthorizationFailed) => {
                    return Err(ReadError::Refused(format!("reading it: {e}")));
                }
                Some(Err(e)) => tracing::debug!(error = %e, "reading the progress topic; retrying"),
            }
        }
        Ok(latest)
    }
}

/// Why the progress topic could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The cluster refused the relay's principal (the topic's ACLs): waiting does not fix it.
    #[error("{0}")]
    Refused(String),
    /// Anything else: a broker unavailable, a record this relay cannot read.
    #[error("{0}")]
    Failed(String),
}

/// Which records a read of the progress topic sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Committed records only, as a `read_committed` consumer.
    ReadCommitted,
    /// Every record written, as a `read_uncommitted` consumer.
    ReadUncommitted,
}

impl Isolation {
    fn as_str(self) -> &'static str {
        match self {
            Isolation::ReadCommitted => "read_committed",
            Isolation::ReadUncommitted => "read_uncommitted",
        }
    }
}

/// The consumer's next offset in the partition; 0 before it has one.
fn position(consumer: &BaseConsumer, topic: &str, partition: i32) -> i64 {
    let Ok(positions) = consumer.position() else { return 0 };
    match positions.find_partition(topic, partition).map(|p| p.offset()) {
        Some(Offset::Offset(offset)) => offset,
        _ => 0,
    }
}

/// The topic's `cleanup.policy` as the brokers describe it.
fn cleanup_policy(config: &Config, topic: &str, within: Duration) -> Result<String, ReadError> {
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        reader_config(config).create().map_err(|e| ReadError::Failed(e.to_string()))?;
    let options = AdminOptions::new().request_timeout(Some(within));
    let resource = [ResourceSpecifier::Topic(topic)];
    // The admin client completes its futures from its own thread.
    let mut described = futures::executor::block_on(admin.describe_configs(&resource, &options))
        .map_err(|e| ReadError::Failed(format!("describing its configuration: {e}")))?;
    match described.pop() {
        // A topic has every setting described, defaults included. None is how a refusal
        // arrives: rust-rdkafka (0.39) passes on no error of a single resource, and a broker
        // refuses a principal without DescribeConfigs on the topic (its ACLs).
        Some(Ok(resource)) if resource.entries.is_empty() => Err(ReadError::Refused(
            "describing its configuration: the brokers described none of its settings".to_owned(),
        )),
        Some(Ok(resource)) => {
            Ok(resource.get("cleanup.policy").and_then(|entry| entry.value.clone()).unwrap_or_else(|| "delete".into()))
        }
        Some(Err(code)) => Err(ReadError::Failed(format!("describing its configuration: {code}"))),
        None => Err(ReadError::Failed("describing its configuration: no answer".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress() -> Progress {
        Progress {
            format: FORMAT,
            database: "shop".into(),
            table: "public.outbox".into(),
            table_oid: 16384,
            server: "7715379757901493163".into(),
            shard: 3,
            owner: "relay.shop.public.outbox.7f3a".into(),
            rows: vec![ProgressRow { id: "41".into(), event_id: Some("0190c7a4-0000-7000-8000-000000000001".into()) }],
        }
    }

    #[test]
    fn a_progress_record_reads_back_as_written() {
        assert_eq!(Progress::from_json(b"k", &progress().to_json()), Ok(progress()));
    }

    #[test]
    fn a_record_written_before_the_server_was_recorded_names_none() {
        let mut value: serde_json::Value = serde_json::from_slice(&progress().to_json()).expect("json");
        value.as_object_mut().expect("object").remove("server");
        let read = Progress::from_json(b"k", &serde_json::to_vec(&value).expect("json")).expect("reads");
        assert_eq!(read.server, "");
    }

    #[test]
    fn a_record_of_format_one_was_written_by_the_producer_its_key_names() {
        let old = Progress { format: 1, owner: String::new(), ..progress() };
        let read = Progress::from_json(b"relay.shop.public.outbox.3", &old.to_json()).expect("format 1 reads");
        assert_eq!(read.owner, "relay.shop.public.outbox.3");
    }

    #[test]
    fn a_progress_record_of_another_format_is_refused_not_guessed() {
        let later = Progress { format: FORMAT + 1, ..progress() };
        let refused = Progress::from_json(b"k", &later.to_json()).unwrap_err();
        assert!(refused.contains("format 3"), "{refused}");
    }
}
