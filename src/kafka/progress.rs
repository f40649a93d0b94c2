//! The progress topic of `kafka.delivery = "exactly_once"`: each shard's last committed batch.
//!
//! Every transaction of a shard carries, besides its records, one progress record keyed by the
//! shard's transactional id that names the rows of the batch (ids and event ids). The topic is
//! compacted, so it keeps each shard's latest. A relay that takes a shard (at start, after a
//! reconnect, from another relay) first fences the shard's previous producer, then reads the
//! shard's latest progress record as a `read_committed` consumer and marks the rows it names:
//! a batch committed to Kafka whose mark the crash prevented is never published again.
//!
//! This module reads and checks the topic; it never touches the table.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
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
pub const FORMAT: u32 = 1;

/// A shard's last committed batch, as its progress record holds it.
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
    /// The shard.
    pub shard: i32,
    /// The rows the batch's transaction published.
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

    /// Reads a record's value; `None` for one this relay cannot read (see [`FORMAT`]).
    pub fn from_json(value: &[u8]) -> Result<Progress, String> {
        let progress: Progress = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        if progress.format != FORMAT {
            return Err(format!("format {} (this relay reads format {FORMAT})", progress.format));
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
        let policy = cleanup_policy(config, &name, waited)
            .map_err(|error| PublisherError::ProgressTopicUnreadable { topic: name.clone(), error })?;
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

    /// The latest committed progress record of `key`, read as a `read_committed` consumer from
    /// the start of its partition to the end it had when the read began; `None` if the key
    /// has none. Call it only after `init_transactions` of the key's producer returned: until
    /// then the previous owner's last transaction may still be committing, and a read begun
    /// before would miss it. Blocks; run it off the async threads.
    pub fn read_latest(&self, config: &Config, key: &str, within: Duration) -> Result<Option<Progress>, String> {
        let partition = self.partition_of(key);
        let consumer: BaseConsumer = reader_config(config)
            .set("group.id", "outbox-relay-progress")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + within;
        let left = || deadline.saturating_duration_since(Instant::now());
        // The end is the high watermark, asked by a read_uncommitted client: asked by this
        // read_committed consumer, the broker answers the last stable offset, which an open
        // transaction of another shard holds back (a relay killed mid-batch leaves one per
        // shard until each is fenced), and a read that stopped there missed this shard's last
        // commit when it was written after: the batch was published again (seen in the
        // twelve-kill test).
        let watermarks: BaseConsumer =
            reader_config(config).set("isolation.level", "read_uncommitted").create().map_err(|e| e.to_string())?;
        let (_, end) = watermarks
            .fetch_watermarks(&self.name, partition, left())
            .map_err(|e| format!("reading the end of {}[{partition}]: {e}", self.name))?;
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&self.name, partition, Offset::Beginning)
            .map_err(|e: KafkaError| e.to_string())?;
        consumer.assign(&assignment).map_err(|e| e.to_string())?;
        let mut latest = None;
        // The read ends at the partition's end as it was before: every record of this key
        // committed by then is below it, and a read_committed consumer passes it only once every
        // transaction below it has ended. Transaction markers take offsets too, so the position
        // is followed rather than the records.
        while position(&consumer, &self.name, partition) < end {
            if Instant::now() >= deadline {
                return Err(format!("reading {}[{partition}] to offset {end} took longer than {within:?}", self.name));
            }
            match consumer.poll(POLL_TIMEOUT) {
                Some(Ok(message)) if message.key() == Some(key.as_bytes()) => {
                    latest = match message.payload() {
                        Some(value) => Some(Progress::from_json(value).map_err(|e| {
                            format!("the progress record at {}[{partition}]@{}: {e}", self.name, message.offset())
                        })?),
                        // A tombstone: nothing owed.
                        None => None,
                    };
                }
                Some(Ok(_)) | None => {}
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => tracing::debug!(error = %e, "reading the progress topic; retrying"),
            }
        }
        Ok(latest)
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
fn cleanup_policy(config: &Config, topic: &str, within: Duration) -> Result<String, String> {
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        reader_config(config).create().map_err(|e| e.to_string())?;
    let options = AdminOptions::new().request_timeout(Some(within));
    let resource = [ResourceSpecifier::Topic(topic)];
    // The admin client completes its futures from its own thread.
    let mut described = futures::executor::block_on(admin.describe_configs(&resource, &options))
        .map_err(|e| format!("describing its configuration: {e}"))?;
    match described.pop() {
        Some(Ok(resource)) => {
            Ok(resource.get("cleanup.policy").and_then(|entry| entry.value.clone()).unwrap_or_else(|| "delete".into()))
        }
        Some(Err(code)) => Err(format!("describing its configuration: {code}")),
        None => Err("describing its configuration: no answer".to_owned()),
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
            shard: 3,
            rows: vec![ProgressRow { id: "41".into(), event_id: Some("0190c7a4-0000-7000-8000-000000000001".into()) }],
        }
    }

    #[test]
    fn a_progress_record_reads_back_as_written() {
        assert_eq!(Progress::from_json(&progress().to_json()), Ok(progress()));
    }

    #[test]
    fn a_progress_record_of_another_format_is_refused_not_guessed() {
        let later = Progress { format: FORMAT + 1, ..progress() };
        let refused = Progress::from_json(&later.to_json()).unwrap_err();
        assert!(refused.contains("format 2"), "{refused}");
    }
}
