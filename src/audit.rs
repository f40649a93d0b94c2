//! Reconciliation of the outbox table with a topic: the last safety net.
//!
//! `audit` reads the rows of a range and the topic from the start of that range to its current
//! end, and reports what an operator must act on: rows marked published that the topic does not
//! have (lost), event ids the topic has more than once (duplicated, as at-least-once delivery
//! allows), duplicates whose copies differ (which the relay should never produce), and rows still
//! pending or failing. It only reads; it changes neither the table nor the topic.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::{Config, MarkMode};
use crate::outbox::{Outbox, OutboxError, RowRange};
use crate::record::EVENT_ID_HEADER;
use crate::table::Mapping;

/// Records whose timestamps are this much earlier than `--since` are still read: the relay's
/// clock and the database's may differ a little.
const CLOCK_SKEW_ALLOWANCE_MS: i64 = 5 * 60 * 1000;

/// How long one poll for the next record may block before the reader checks again.
const POLL_TIMEOUT: Duration = Duration::from_millis(500);

/// How long the topic may stay silent before a partition that never reported its end counts
/// as unreadable. Transient errors (a broker down, a leader moving) do not count as progress:
/// they are retried until this limit.
const READ_STALL_LIMIT: Duration = Duration::from_secs(60);

/// How long offsets_for_times may take, retries of transient errors included.
const OFFSET_LOOKUP_LIMIT: Duration = Duration::from_secs(30);

/// The pause between two attempts of a request that failed with a transient error.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// The shortest wait given to one attempt of a request, however little of its time is left.
const MIN_ATTEMPT: Duration = Duration::from_millis(200);

/// A failure that kept `audit` from producing a report.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The database side failed.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// No broker answered.
    #[error(
        "kafka.brokers = \"{brokers}\": no broker answered within {waited:?} ({source}); check the addresses and \
         that this host can reach them (kafka.startup_timeout sets the wait)"
    )]
    Unreachable {
        /// The configured bootstrap servers.
        brokers: String,
        /// How long audit waited.
        waited: Duration,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// The topic could not be read.
    #[error("reading topic {topic}: {source}")]
    Kafka {
        /// The topic.
        topic: String,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// The topic does not exist on the cluster.
    #[error("topic {0} does not exist on the cluster")]
    UnknownTopic(String),
    /// The requested range cannot be checked with this table.
    #[error("{0}")]
    InvalidRange(String),
    /// The topic stopped answering before its end was reached.
    #[error(
        "reading topic {topic}: no progress for {READ_STALL_LIMIT:?} before the end of every partition was reached{}",
        last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )]
    Stalled {
        /// The topic.
        topic: String,
        /// The last transient error retried, if any.
        last_error: Option<KafkaError>,
    },
}

/// Ids of one kind of finding: how many, and the first few.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// How many rows (or event ids) are in this category.
    pub count: u64,
    /// The first few, in table order.
    pub first: Vec<String>,
}

impl Finding {
    fn add(&mut self, id: impl Into<String>, show: usize) {
        self.count += 1;
        if self.first.len() < show {
            self.first.push(id.into());
        }
    }
}

/// What was read from one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PartitionSpan {
    /// The partition.
    pub partition: i32,
    /// Offset of the first record read, if any.
    pub first_offset: Option<i64>,
    /// Offset of the last record read, if any.
    pub last_offset: Option<i64>,
    /// Records read.
    pub records: u64,
}

/// The result of one audit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    /// The topic audited.
    pub topic: String,
    /// The table audited.
    pub table: String,
    /// The row range requested.
    pub range: RangeReport,
    /// Rows in the range destined for the topic.
    pub rows: u64,
    /// Lowest and highest id among them.
    pub first_id: Option<String>,
    /// Highest id among them.
    pub last_id: Option<String>,
    /// Records read from the topic (all of them, including ones outside the range).
    pub records_read: u64,
    /// Per-partition spans of what was read.
    pub partitions: Vec<PartitionSpan>,
    /// Rows marked published and found on the topic.
    pub published: u64,
    /// Rows marked published but absent from the topic.
    pub lost: Finding,
    /// Event ids found more than once; `extra_copies` counts the copies beyond the first.
    pub duplicated: Finding,
    /// Copies beyond the first, over all duplicated event ids.
    pub extra_copies: u64,
    /// Duplicated event ids whose copies differ in key, value or headers.
    pub conflicting: Finding,
    /// Duplicated event ids with identical copies on different partitions: a repeat after the
    /// topic's partition count changed moved to the partition its key hashes to now.
    pub moved: Finding,
    /// Unpublished rows that have not failed yet.
    pub pending: Finding,
    /// Unpublished rows failing with errors of their own, retried after a backoff, with their
    /// last error (`status` says "failing" too).
    pub failing: Finding,
    /// Unpublished rows the relay gave up on, waiting for `outbox-relay retry`, with their last
    /// error.
    pub failed: Finding,
    /// Pending rows already on the topic (sent, not yet marked: in flight, or a crash between
    /// publish and mark that the next run will repeat).
    pub pending_on_topic: u64,
    /// False when the table cannot tell published rows from deleted ones (`mark = "delete"`),
    /// so lost rows cannot be detected.
    pub lost_detectable: bool,
}

/// The range as requested, echoed in the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RangeReport {
    /// `--from-id`.
    pub from_id: Option<String>,
    /// `--to-id`.
    pub to_id: Option<String>,
    /// `--since`.
    pub since: Option<String>,
    /// `--until`.
    pub until: Option<String>,
}

impl AuditReport {
    /// Whether the audit found nothing an operator must repair: no lost row, no conflicting
    /// duplicate.
    pub fn is_clean(&self) -> bool {
        self.lost.count == 0 && self.conflicting.count == 0
    }

    /// The report for a person.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let ids = |f: &Finding| {
            if f.first.is_empty() { String::new() } else { format!("; first: {}", f.first.join(", ")) }
        };
        out.push_str(&format!("audit of topic {} against table {}\n", self.topic, self.table));
        let r = &self.range;
        let bound = |b: &Option<String>| b.clone().unwrap_or_else(|| "*".to_owned());
        out.push_str(&format!(
            "  range      ids {}..{}, created {}..{}\n",
            bound(&r.from_id),
            bound(&r.to_id),
            bound(&r.since),
            bound(&r.until)
        ));
        out.push_str(&format!(
            "  rows       {} for this topic (ids {}..{})\n",
            self.rows,
            self.first_id.as_deref().unwrap_or("-"),
            self.last_id.as_deref().unwrap_or("-")
        ));
        let spans: Vec<String> = self
            .partitions
            .iter()
            .map(|p| match (p.first_offset, p.last_offset) {
                (Some(a), Some(b)) => format!("p{} {a}..{b}", p.partition),
                _ => format!("p{} empty", p.partition),
            })
            .collect();
        out.push_str(&format!("  topic      {} records read ({})\n", self.records_read, spans.join(", ")));
        out.push_str(&format!("  published  {} rows found on the topic\n", self.published));
        if self.lost_detectable {
            out.push_str(&format!(
                "  lost       {} rows marked published but not on the topic{}\n",
                self.lost.count,
                ids(&self.lost)
            ));
        } else {
            out.push_str("  lost       not detectable: mark = \"delete\" removes published rows from the table\n");
        }
        let among = if self.lost_detectable { "" } else { " among the rows still in the table" };
        out.push_str(&format!(
            "  duplicated {} rows on the topic more than once{among} ({} extra copies){}\n",
            self.duplicated.count,
            self.extra_copies,
            ids(&self.duplicated)
        ));
        out.push_str(&format!(
            "  conflicting {} duplicated rows whose copies differ{}\n",
            self.conflicting.count,
            ids(&self.conflicting)
        ));
        out.push_str(&format!(
            "  moved      {} duplicated rows with equal copies on another partition (partitions added){}\n",
            self.moved.count,
            ids(&self.moved)
        ));
        out.push_str(&format!(
            "  pending    {} rows ({} of them already on the topic: sent, not marked yet; the relay marks them, \
             or publishes them again if it stops first){}\n",
            self.pending.count,
            self.pending_on_topic,
            ids(&self.pending)
        ));
        out.push_str(&format!(
            "  failing    {} rows with errors of their own, retried after a backoff{}\n",
            self.failing.count,
            ids(&self.failing)
        ));
        out.push_str(&format!(
            "  failed     {} rows given up on, waiting for `outbox-relay retry`{}\n",
            self.failed.count,
            ids(&self.failed)
        ));
        out.push_str(match (self.is_clean(), self.lost_detectable) {
            (true, true) => "result: nothing lost\n",
            (true, false) => {
                "result: nothing wrong among the rows still in the table; with mark = \"delete\" published rows \
                 are gone, so neither lost nor duplicated ones can be seen\n"
            }
            (false, _) => "result: PROBLEMS FOUND\n",
        });
        out
    }
}

/// What the topic says about one event id.
struct Seen {
    copies: u64,
    /// Digest of the first copy's key, value and headers.
    first_identity: u64,
    first_partition: i32,
    /// A copy's bytes differ from the first's.
    conflicting: bool,
    /// A copy sits on another partition than the first.
    moved: bool,
}

/// Audits `topic` against the rows of `range`, listing up to `show` ids per finding.
pub async fn audit(config: &Config, topic: &str, range: &RowRange, show: usize) -> Result<AuditReport, AuditError> {
    let mapping = Mapping::from_config(config).map_err(AuditError::InvalidRange)?;
    if (range.since.is_some() || range.until.is_some()) && mapping.created_at.is_none() {
        return Err(AuditError::InvalidRange(
            "--since/--until need a created-at column (outbox.columns.created_at)".to_owned(),
        ));
    }
    let outbox = Outbox::connect(config, &mapping).await?;
    if let (Some(from), Some(to)) = (&range.from_id, &range.to_id) {
        let empty = outbox.id_range_is_empty(from, to).await.map_err(|e| {
            AuditError::InvalidRange(format!("--from-id {from} / --to-id {to}: not ids of the table ({e})"))
        })?;
        if empty {
            return Err(AuditError::InvalidRange(format!(
                "--from-id {from} is after --to-id {to}: the range holds no row (swap them?)"
            )));
        }
    }
    for (flag, bound) in [("--since", &range.since), ("--until", &range.until)] {
        if let Some(time) = bound {
            outbox.epoch_millis(time).await.map_err(|e| {
                AuditError::InvalidRange(format!("{flag} \"{time}\": not a time PostgreSQL can read ({e})"))
            })?;
        }
    }
    let topic_filter = match mapping.topic {
        crate::table::TopicSource::Column(_) => Some(topic),
        crate::table::TopicSource::Template(_) => None,
    };
    let rows: Vec<_> = outbox
        .audit_rows(range, topic_filter)
        .await?
        .into_iter()
        .filter(|row| mapping.topic.topic(&row.topic_values).is_ok_and(|t| t == topic))
        .collect();
    let start_ms = match &range.since {
        Some(since) => Some(outbox.epoch_millis(since).await? - CLOCK_SKEW_ALLOWANCE_MS),
        None => None,
    };

    let seen: HashMap<String, Seen> = rows
        .iter()
        .map(|row| {
            let unseen = Seen { copies: 0, first_identity: 0, first_partition: 0, conflicting: false, moved: false };
            (row.event_id.clone(), unseen)
        })
        .collect();
    // librdkafka's consumer API blocks; keep it off the async workers.
    let (reader_config, reader_topic) = (config.clone(), topic.to_owned());
    let TopicRead { records: records_read, partitions, seen } =
        tokio::task::spawn_blocking(move || read_topic(&reader_config, &reader_topic, start_ms, seen))
            .await
            .map_err(|e| AuditError::InvalidRange(format!("the topic reader stopped: {e}")))??;

    let mut report = AuditReport {
        topic: topic.to_owned(),
        table: mapping.table_name(),
        range: RangeReport {
            from_id: range.from_id.clone(),
            to_id: range.to_id.clone(),
            since: range.since.clone(),
            until: range.until.clone(),
        },
        rows: rows.len() as u64,
        first_id: rows.first().map(|r| r.id.clone()),
        last_id: rows.last().map(|r| r.id.clone()),
        records_read,
        partitions,
        lost_detectable: config.outbox.mark == MarkMode::Update,
        ..AuditReport::default()
    };
    for row in &rows {
        let on_topic = seen.get(&row.event_id).map(|s| (s.copies, s.conflicting, s.moved)).unwrap_or((0, false, false));
        match (row.published, on_topic.0) {
            (true, 0) => report.lost.add(&row.id, show),
            (true, _) => report.published += 1,
            (false, copies) => {
                if copies > 0 {
                    report.pending_on_topic += 1;
                }
                let error = row.last_error.as_deref().unwrap_or("no error recorded");
                if row.failed {
                    report.failed.add(format!("{} ({error})", row.id), show);
                } else if row.attempts > 0 {
                    report.failing.add(format!("{} ({error})", row.id), show);
                } else {
                    report.pending.add(&row.id, show);
                }
            }
        }
        // Every finding lists rows by their id; those about copies on the topic add the event
        // id, which is what a consumer sees.
        let with_event = || format!("{} (event {})", row.id, row.event_id);
        if on_topic.0 > 1 {
            report.duplicated.add(with_event(), show);
            report.extra_copies += on_topic.0 - 1;
        }
        if on_topic.1 {
            report.conflicting.add(with_event(), show);
        } else if on_topic.2 {
            report.moved.add(with_event(), show);
        }
    }
    Ok(report)
}

/// What reading the topic found.
struct TopicRead {
    /// Records read.
    records: u64,
    /// What was read from each partition.
    partitions: Vec<PartitionSpan>,
    /// The copies of each audited event id.
    seen: HashMap<String, Seen>,
}

/// Reads every partition of `topic` from `start_ms` (or the beginning) to its current end,
/// counting the copies of each event id in `seen`.
fn read_topic(
    config: &Config,
    topic: &str,
    start_ms: Option<i64>,
    mut seen: HashMap<String, Seen>,
) -> Result<TopicRead, AuditError> {
    let kafka = |source| AuditError::Kafka { topic: topic.to_owned(), source };
    let consumer: BaseConsumer<QuietContext> = crate::publisher::reader_config(config)
        .set("group.id", "outbox-relay-audit")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create_with_context(QuietContext)
        .map_err(kafka)?;
    let waited = config.kafka.startup_timeout;
    let metadata = retrying(waited, |left| consumer.fetch_metadata(Some(topic), left))
        .map_err(|source| AuditError::Unreachable { brokers: config.kafka.brokers.clone(), waited, source })?;
    let partitions = match metadata.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => t.partitions().len() as i32,
        _ => return Err(AuditError::UnknownTopic(topic.to_owned())),
    };
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        let offset = match start_ms {
            Some(ms) => Offset::Offset(ms),
            None => Offset::Beginning,
        };
        assignment.add_partition_offset(topic, partition, offset).map_err(kafka)?;
    }
    if start_ms.is_some() {
        assignment = retrying(OFFSET_LOOKUP_LIMIT, |left| consumer.offsets_for_times(assignment.clone(), left))
            .map_err(kafka)?;
    }
    consumer.assign(&assignment).map_err(kafka)?;

    let mut spans: Vec<PartitionSpan> =
        (0..partitions).map(|partition| PartitionSpan { partition, ..PartitionSpan::default() }).collect();
    let mut ended = vec![false; partitions as usize];
    let mut records = 0u64;
    let mut last_progress = Instant::now();
    let mut last_error = None;
    while ended.iter().any(|e| !e) {
        match consumer.poll(POLL_TIMEOUT) {
            Some(Ok(message)) => {
                last_progress = Instant::now();
                records += 1;
                let span = &mut spans[message.partition() as usize];
                span.first_offset.get_or_insert(message.offset());
                span.last_offset = Some(message.offset());
                span.records += 1;
                let Some(event_id) = event_id_of(&message) else {
                    continue;
                };
                if let Some(entry) = seen.get_mut(&event_id) {
                    let identity = identity_of(&message);
                    if entry.copies == 0 {
                        entry.first_identity = identity;
                        entry.first_partition = message.partition();
                    } else {
                        entry.conflicting |= entry.first_identity != identity;
                        entry.moved |= entry.first_partition != message.partition();
                    }
                    entry.copies += 1;
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                last_progress = Instant::now();
                if let Some(ended) = ended.get_mut(partition as usize) {
                    *ended = true;
                }
            }
            // librdkafka reconnects and finds the new leaders itself; the stall limit bounds
            // how long that may take.
            Some(Err(e)) if is_transient(&e) => {
                tracing::debug!(topic, error = %e, "transient error while reading the topic; retrying");
                last_error = Some(e);
            }
            Some(Err(e)) => return Err(kafka(e)),
            None => {}
        }
        if last_progress.elapsed() > READ_STALL_LIMIT {
            return Err(AuditError::Stalled { topic: topic.to_owned(), last_error });
        }
    }
    Ok(TopicRead { records, partitions: spans, seen })
}

/// Whether a Kafka error may go away by itself while a request is repeated: a broker down or
/// unreachable for a while, a leader moving, a request timing out. Any other error (a missing
/// topic, an authorization failure, a fatal error) ends the audit at once.
fn is_transient(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    if matches!(error, KafkaError::MessageConsumptionFatal(_)) {
        return false;
    }
    matches!(
        error.rdkafka_error_code(),
        Some(
            BrokerTransportFailure
                | AllBrokersDown
                | NotLeaderForPartition
                | LeaderNotAvailable
                | PreferredLeaderNotAvailable
                | RequestTimedOut
                | OperationTimedOut
                | TimedOutQueue
                | NetworkException
                | BrokerNotAvailable
                | ReplicaNotAvailable
                | NotController
                | KafkaStorageError
                | FencedLeaderEpoch
                | UnknownLeaderEpoch
                | OffsetNotAvailable
        )
    )
}

/// Runs `attempt` (given the time left) until it succeeds, fails with an error that is not
/// transient, or `within` has passed; then returns its last result.
fn retrying<T>(within: Duration, mut attempt: impl FnMut(Duration) -> KafkaResult<T>) -> KafkaResult<T> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match attempt(left.max(MIN_ATTEMPT)) {
            Err(e) if is_transient(&e) && Instant::now() + RETRY_PAUSE < deadline => {
                tracing::debug!(error = %e, "transient Kafka error; retrying");
                std::thread::sleep(RETRY_PAUSE);
            }
            result => return result,
        }
    }
}

/// librdkafka's own log lines and errors at debug level only: `audit` reports what went wrong
/// itself, in one line, and a healthy run prints nothing but its report.
struct QuietContext;

impl ClientContext for QuietContext {
    fn log(&self, _level: RDKafkaLogLevel, facility: &str, message: &str) {
        tracing::debug!(target: "librdkafka", facility, "{message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "librdkafka", error = %error, "{reason}");
    }
}

impl ConsumerContext for QuietContext {}

fn event_id_of<M: Message>(message: &M) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == EVENT_ID_HEADER)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A digest of what makes two copies of an event the same record: its bytes. The partition is
/// not part of it: after partitions are added to a topic, a key hashes to another partition,
/// and a repeat lands there with the same bytes.
fn identity_of<M: Message>(message: &M) -> u64 {
    let mut hasher = DefaultHasher::new();
    message.key().hash(&mut hasher);
    message.payload().hash(&mut hasher);
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            header.key.hash(&mut hasher);
            header.value.hash(&mut hasher);
        }
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_are_the_ones_a_retry_may_cure() {
        assert!(is_transient(&KafkaError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure)));
        assert!(is_transient(&KafkaError::MessageConsumption(RDKafkaErrorCode::AllBrokersDown)));
        assert!(is_transient(&KafkaError::MessageConsumption(RDKafkaErrorCode::NotLeaderForPartition)));
        assert!(is_transient(&KafkaError::MetadataFetch(RDKafkaErrorCode::RequestTimedOut)));
        assert!(!is_transient(&KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::AllBrokersDown)));
        assert!(!is_transient(&KafkaError::MessageConsumption(RDKafkaErrorCode::TopicAuthorizationFailed)));
        assert!(!is_transient(&KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition)));
    }

    #[test]
    fn a_transient_error_is_retried_within_the_time_given_and_a_lasting_one_is_not() {
        let mut attempts = 0;
        let result = retrying(Duration::from_secs(5), |_| {
            attempts += 1;
            if attempts < 3 {
                Err(KafkaError::MetadataFetch(RDKafkaErrorCode::BrokerTransportFailure))
            } else {
                Ok(attempts)
            }
        });
        assert_eq!(result.ok(), Some(3));
        let mut attempts = 0;
        let result: KafkaResult<()> = retrying(Duration::from_secs(5), |_| {
            attempts += 1;
            Err(KafkaError::MetadataFetch(RDKafkaErrorCode::TopicAuthorizationFailed))
        });
        assert!(result.is_err());
        assert_eq!(attempts, 1);
    }
}
