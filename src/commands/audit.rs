//! Reconciliation of the outbox table with a topic: the last safety net.
//!
//! `audit` reads the rows of a range and the topic from the start of that range to its current
//! end, and reports what an operator must act on: rows marked published that the topic does not
//! have (lost), event ids the topic has more than once (duplicated, as at-least-once delivery
//! allows), duplicates whose copies differ (which the relay should never produce), and rows still
//! pending or failing. It only reads; it changes neither the table nor the topic.
//!
//! A topic removes records itself: retention (or `kafka-delete-records`) moves a partition's log
//! start offset up, and compaction keeps only the latest record of each key. A row marked
//! published whose record the topic may have removed that way is *expired*, not lost. A removed
//! record cannot be seen, so the audit only rules out removals that cannot have happened: a row
//! created after the earliest record left on every trimmed partition was published after it, so
//! retention cannot explain its absence; on a compacted topic a row is expired only while its key
//! has a record written after the row was created. Its guess: it does not predict the row's
//! partition, so any trimmed partition may explain a row. Without a created-at column neither
//! bound is known, and any absent row counts as expired once a partition is trimmed, or when its
//! key has a record on a compacted topic.

use std::collections::HashMap;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::commands::{Outcome, Report};
use crate::config::{Config, MarkMode};
use crate::postgres::audit_rows::RowRange;
use crate::postgres::error::OutboxError;
use crate::postgres::layout::{Layout, Mapping};
use crate::postgres::outbox::Outbox;

/// Records whose timestamps are this much earlier than `--since` are still read: the relay's
/// clock and the database's may differ a little. The same allowance applies when a row's
/// creation time is compared with a record's timestamp to decide whether the topic may have
/// removed the row's record.
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
    /// The partition's log start offset once read: records below it are gone (retention or
    /// delete-records removed them).
    pub log_start_offset: i64,
    /// The partition's end offset (high watermark) once read.
    pub end_offset: i64,
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
    /// How the topic was read (`--isolation`).
    pub isolation: Isolation,
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
    /// Rows marked published but absent from the topic, which nothing the topic does itself
    /// explains.
    pub lost: Finding,
    /// Rows marked published but absent from the topic, whose records the topic may have removed
    /// itself (below a partition's log start offset, or compacted away), with the reason.
    pub expired: Finding,
    /// The topic's `cleanup.policy` (`delete`, `compact` or both); `None` when the brokers did
    /// not say, and then compaction explains no absent row.
    pub cleanup_policy: Option<String>,
    /// Why the `cleanup.policy` is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cleanup_policy_error: Option<String>,
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
    /// duplicate. Expired rows are what the topic's own retention or compaction does.
    pub fn is_clean(&self) -> bool {
        self.lost.count == 0 && self.conflicting.count == 0
    }
}

impl Report for AuditReport {
    fn outcome(&self) -> Outcome {
        if self.is_clean() { Outcome::Done } else { Outcome::NeedsAction }
    }

    fn render_text(&self) -> String {
        let mut out = String::new();
        let ids = |f: &Finding| {
            if f.first.is_empty() { String::new() } else { format!("; first: {}", f.first.join(", ")) }
        };
        out.push_str(&format!("audit of topic {} against table {}\n", self.topic, self.table));
        let r = &self.range;
        let bound = |b: &Option<String>| b.clone().unwrap_or_else(|| "*".to_owned());
        out.push_str(&format!(
            "  range      ids {}..{}, created {}..{}; read {}\n",
            bound(&r.from_id),
            bound(&r.to_id),
            bound(&r.since),
            bound(&r.until),
            self.isolation.as_property()
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
            .map(|p| {
                let read = match (p.first_offset, p.last_offset) {
                    (Some(a), Some(b)) => format!("p{} {a}..{b}", p.partition),
                    _ => format!("p{} empty", p.partition),
                };
                if p.log_start_offset > 0 { format!("{read}, log start {}", p.log_start_offset) } else { read }
            })
            .collect();
        out.push_str(&format!("  topic      {} records read ({})\n", self.records_read, spans.join("; ")));
        out.push_str(&match (&self.cleanup_policy, &self.cleanup_policy_error) {
            (Some(policy), _) => format!("  cleanup    cleanup.policy={policy}\n"),
            (None, error) => format!(
                "  cleanup    cleanup.policy unknown ({}): compaction explains no absent row\n",
                error.as_deref().unwrap_or("not described")
            ),
        });
        out.push_str(&format!("  published  {} rows found on the topic\n", self.published));
        if self.lost_detectable {
            out.push_str(&format!(
                "  lost       {} rows marked published but not on the topic{}\n",
                self.lost.count,
                ids(&self.lost)
            ));
            out.push_str(&format!(
                "  expired    {} rows marked published whose records the topic itself may have removed \
                 (retention, delete-records, compaction){}\n",
                self.expired.count,
                ids(&self.expired)
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

/// Which records of Kafka transactions the audit reads, as a consumer with this
/// `isolation.level` would (`--isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Isolation {
    /// Every record written, those of aborted transactions included: what the Java client's
    /// consumers see by default. Without transactions (`kafka.delivery = "at_least_once"`)
    /// both levels read the same records.
    #[default]
    ReadUncommitted,
    /// Records of committed transactions only (librdkafka's default, Kafka Streams with
    /// exactly-once): with `kafka.delivery = "exactly_once"` these show no duplicate.
    ReadCommitted,
}

impl Isolation {
    fn as_property(self) -> &'static str {
        match self {
            Isolation::ReadUncommitted => "read_uncommitted",
            Isolation::ReadCommitted => "read_committed",
        }
    }
}

/// Audits `topic` against the rows of `range`, reading it as a consumer of `isolation`,
/// listing up to `show` ids per finding.
pub async fn audit(
    config: &Config,
    topic: &str,
    range: &RowRange,
    isolation: Isolation,
    show: usize,
) -> Result<AuditReport, AuditError> {
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
        crate::postgres::layout::TopicSource::Column(_) => Some(topic),
        crate::postgres::layout::TopicSource::Template(_) | crate::postgres::layout::TopicSource::Route(_) => None,
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
    let TopicRead { records: records_read, partitions, seen, cleanup_policy, removals } =
        tokio::task::spawn_blocking(move || read_topic(&reader_config, &reader_topic, isolation, start_ms, seen))
            .await
            .map_err(|e| AuditError::InvalidRange(format!("the topic reader stopped: {e}")))??;
    let absent: Vec<String> = rows
        .iter()
        .filter(|row| row.published && seen.get(&row.event_id).is_none_or(|s| s.copies == 0))
        .map(|row| row.id.clone())
        .collect();
    // Only when the topic may have removed records is it worth asking the table about them.
    let absent_rows = if absent.is_empty() || removals.is_empty() {
        HashMap::new()
    } else {
        absent_rows(config, outbox.layout(), &absent).await?
    };

    let mut report = AuditReport {
        topic: topic.to_owned(),
        table: mapping.table_name(),
        range: RangeReport {
            from_id: range.from_id.clone(),
            to_id: range.to_id.clone(),
            since: range.since.clone(),
            until: range.until.clone(),
        },
        isolation,
        rows: rows.len() as u64,
        first_id: rows.first().map(|r| r.id.clone()),
        last_id: rows.last().map(|r| r.id.clone()),
        records_read,
        partitions,
        cleanup_policy: cleanup_policy.as_ref().ok().cloned(),
        cleanup_policy_error: cleanup_policy.err(),
        lost_detectable: config.outbox.mark == MarkMode::Update,
        ..AuditReport::default()
    };
    for row in &rows {
        let on_topic = seen.get(&row.event_id).map(|s| (s.copies, s.conflicting, s.moved)).unwrap_or((0, false, false));
        match (row.published, on_topic.0) {
            (true, 0) => match absent_rows.get(&row.id).and_then(|absent| removals.explain(absent)) {
                Some(removal) => report.expired.add(format!("{} ({removal})", row.id), show),
                None => report.lost.add(&row.id, show),
            },
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

/// What the table says of a row marked published that the topic does not have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct AbsentRow {
    /// Its record's key (the key column as text).
    key: Option<String>,
    /// When it was created, in milliseconds since the epoch; `None` without a created-at column.
    created_ms: Option<i64>,
}

/// Reads the key and creation time of the rows `ids` (rows marked published that the topic does
/// not have), by id.
async fn absent_rows(
    config: &Config,
    layout: &Layout,
    ids: &[String],
) -> Result<HashMap<String, AbsentRow>, AuditError> {
    let m = &layout.mapping;
    let key = m.key.as_ref().map_or_else(|| "NULL::text".to_owned(), |key| format!("o.{key}::text"));
    let created_ms = m.created_at.as_ref().map_or_else(
        || "NULL::int8".to_owned(),
        |created_at| format!("(extract(epoch FROM o.{created_at}) * 1000)::int8"),
    );
    let sql = format!(
        "SELECT o.{id}::text AS id, {key} AS key, {created_ms} AS created_ms \
         FROM {table} AS o WHERE o.{id} = ANY($1::text[]::{id_type}[])",
        id = m.id,
        table = m.table_sql(),
        id_type = layout.id_type,
    );
    let client = crate::postgres::connect::connect_client(config).await?;
    let rows = client
        .query(&sql, &[&ids])
        .await
        .map_err(|source| OutboxError::Query { what: "audit: keys of absent rows", source })?;
    let mut absent = HashMap::with_capacity(rows.len());
    for row in rows {
        let read = |source| OutboxError::Query { what: "audit: keys of absent rows", source };
        let id: String = row.try_get("id").map_err(read)?;
        let key: Option<String> = row.try_get("key").map_err(read)?;
        let created_ms: Option<i64> = row.try_get("created_ms").map_err(read)?;
        absent.insert(id, AbsentRow { key, created_ms });
    }
    Ok(absent)
}

/// Why a row marked published may be absent from the topic without having been lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// Its record may have been below the partition's log start offset: retention or
    /// delete-records removed the records there.
    BelowLogStart {
        /// The partition.
        partition: i32,
        /// Its log start offset.
        log_start_offset: i64,
    },
    /// The topic is compacted and the row's key has a record written after the row was created:
    /// compaction keeps only the latest record of a key.
    Compacted,
}

impl fmt::Display for Removal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Removal::BelowLogStart { partition, log_start_offset } => {
                write!(f, "below log start offset {log_start_offset} of partition {partition}")
            }
            Removal::Compacted => write!(f, "compacted topic: its key has a later record"),
        }
    }
}

/// A partition whose log start offset rose above where the audit began reading it: records the
/// audit would have read are gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TrimmedPartition {
    partition: i32,
    log_start_offset: i64,
    /// Timestamp of the earliest record left (the first one read); `None` when none is left.
    earliest_left_ms: Option<i64>,
}

/// What the topic itself may have removed: the grounds for calling an absent row expired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TopicRemovals {
    /// Partitions with records gone from their start.
    trimmed: Vec<TrimmedPartition>,
    /// On a compacted topic, the newest record timestamp of each key (by [`key_digest`]);
    /// `None` when the topic is not compacted.
    compacted_keys: Option<HashMap<u64, i64>>,
}

impl TopicRemovals {
    /// Whether the topic cannot have removed any record.
    fn is_empty(&self) -> bool {
        self.trimmed.is_empty() && self.compacted_keys.is_none()
    }

    /// Why the topic may have removed the record of `row`, or `None` if nothing it does explains
    /// the row's absence (the row is lost).
    fn explain(&self, row: &AbsentRow) -> Option<Removal> {
        // Compaction removes a record only once a later record of its key exists, and that one
        // stays (unless it is a tombstone past delete.retention.ms: then the row counts as lost).
        // A record written before the row was created cannot be later than the row's record.
        if let (Some(keys), Some(key)) = (&self.compacted_keys, &row.key) {
            let newest = keys.get(&key_digest(Some(key.as_bytes())));
            if newest.is_some_and(|newest| row.created_ms.is_none_or(|c| *newest >= c - CLOCK_SKEW_ALLOWANCE_MS)) {
                return Some(Removal::Compacted);
            }
        }
        // Retention removes a partition's oldest records first. A row created after the earliest
        // record left was published after it, so its record would be above the log start. The
        // audit does not predict the row's partition (partitions may have been added since, and
        // a row without a key goes to any of them), so any trimmed partition may hold it.
        self.trimmed
            .iter()
            .find(|t| match (row.created_ms, t.earliest_left_ms) {
                (Some(created), Some(earliest)) => created <= earliest + CLOCK_SKEW_ALLOWANCE_MS,
                _ => true,
            })
            .map(|t| Removal::BelowLogStart { partition: t.partition, log_start_offset: t.log_start_offset })
    }
}

/// What reading the topic found.
struct TopicRead {
    /// Records read.
    records: u64,
    /// What was read from each partition.
    partitions: Vec<PartitionSpan>,
    /// The copies of each audited event id.
    seen: HashMap<String, Seen>,
    /// The topic's cleanup.policy, or why it is unknown.
    cleanup_policy: Result<String, String>,
    /// What the topic itself may have removed.
    removals: TopicRemovals,
}

/// Reads every partition of `topic` from `start_ms` (or the beginning) to its current end,
/// counting the copies of each event id in `seen`, and what the topic may have removed itself.
fn read_topic(
    config: &Config,
    topic: &str,
    isolation: Isolation,
    start_ms: Option<i64>,
    mut seen: HashMap<String, Seen>,
) -> Result<TopicRead, AuditError> {
    let kafka = |source| AuditError::Kafka { topic: topic.to_owned(), source };
    let consumer: BaseConsumer<QuietContext> = crate::kafka::settings::reader_config(config)
        .set("group.id", "outbox-relay-audit")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation.as_property())
        .create_with_context(QuietContext)
        .map_err(kafka)?;
    let waited = config.kafka.startup_timeout;
    let metadata = retrying(waited, |left| consumer.fetch_metadata(Some(topic), left))
        .map_err(|source| AuditError::Unreachable { brokers: config.kafka.brokers.clone(), waited, source })?;
    let partitions = match metadata.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => t.partitions().len() as i32,
        _ => return Err(AuditError::UnknownTopic(topic.to_owned())),
    };
    let cleanup_policy = cleanup_policy(config, topic);
    let mut compacted_keys =
        cleanup_policy.as_ref().is_ok_and(|policy| policy.contains("compact")).then(HashMap::<u64, i64>::new);
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
    // Where each partition's read begins: `None` at its log start, whatever that is.
    let read_from: Vec<Option<Offset>> = (0..partitions)
        .map(|p| assignment.find_partition(topic, p).map(|e| e.offset()).filter(|o| *o != Offset::Beginning))
        .collect();
    consumer.assign(&assignment).map_err(kafka)?;

    let mut spans: Vec<PartitionSpan> =
        (0..partitions).map(|partition| PartitionSpan { partition, ..PartitionSpan::default() }).collect();
    let mut earliest_left_ms: Vec<Option<i64>> = vec![None; partitions as usize];
    let mut ended = vec![false; partitions as usize];
    let mut records = 0u64;
    let mut last_progress = Instant::now();
    let mut last_error = None;
    while ended.iter().any(|e| !e) {
        match consumer.poll(POLL_TIMEOUT) {
            Some(Ok(message)) => {
                last_progress = Instant::now();
                records += 1;
                let Some(span) = spans.get_mut(message.partition() as usize) else {
                    continue;
                };
                let timestamp = message.timestamp().to_millis();
                if span.first_offset.is_none() {
                    span.first_offset = Some(message.offset());
                    earliest_left_ms[message.partition() as usize] = timestamp;
                }
                span.last_offset = Some(message.offset());
                span.records += 1;
                if let (Some(keys), Some(key)) = (&mut compacted_keys, message.key()) {
                    // A record without a timestamp may be the latest of its key.
                    let timestamp = timestamp.unwrap_or(i64::MAX);
                    let newest = keys.entry(key_digest(Some(key))).or_insert(timestamp);
                    *newest = (*newest).max(timestamp);
                }
                let Some(event_id) = event_id_of(&message, &config.outbox.record.event_id_header) else {
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

    // The log start offsets after the read: a record removed before or during it is below them.
    let mut trimmed = Vec::new();
    for span in &mut spans {
        let (low, high) =
            retrying(waited, |left| consumer.fetch_watermarks(topic, span.partition, left)).map_err(kafka)?;
        span.log_start_offset = low;
        span.end_offset = high;
        // A read from a time (`--since`) began at the first record of that time or later; only
        // when nothing is left before that point may the records gone have been of that time.
        // `End`: no record was of that time when the read began.
        let began_at = match read_from[span.partition as usize] {
            None => 0,
            Some(Offset::Offset(offset)) => offset,
            Some(_) => high,
        };
        if low > 0 && began_at <= low {
            trimmed.push(TrimmedPartition {
                partition: span.partition,
                log_start_offset: low,
                earliest_left_ms: earliest_left_ms[span.partition as usize],
            });
        }
    }
    let removals = TopicRemovals { trimmed, compacted_keys };
    Ok(TopicRead { records, partitions: spans, seen, cleanup_policy, removals })
}

/// The topic's `cleanup.policy` as the brokers describe it, or why it could not be read (an
/// authorization without DescribeConfigs, say): the audit goes on without it.
fn cleanup_policy(config: &Config, topic: &str) -> Result<String, String> {
    let admin: AdminClient<QuietContext> =
        crate::kafka::settings::reader_config(config).create_with_context(QuietContext).map_err(|e| e.to_string())?;
    let resource = [ResourceSpecifier::Topic(topic)];
    let described = retrying(config.kafka.startup_timeout, |left| {
        let options = AdminOptions::new().request_timeout(Some(left));
        // The admin client completes its futures from its own thread: no runtime needed here.
        let mut results = futures::executor::block_on(admin.describe_configs(&resource, &options))?;
        match results.pop() {
            Some(Ok(described)) => Ok(described),
            Some(Err(code)) => Err(KafkaError::MetadataFetch(code)),
            None => Err(KafkaError::MetadataFetch(RDKafkaErrorCode::Fail)),
        }
    })
    .map_err(|e| format!("describing topic {topic}'s configuration: {e}"))?;
    // A topic without an explicit policy has the broker's default, which describe reports too.
    Ok(described.get("cleanup.policy").and_then(|entry| entry.value.clone()).unwrap_or_else(|| "delete".to_owned()))
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

/// A digest of a record key, to remember the keys of a compacted topic in little memory.
fn key_digest(key: Option<&[u8]>) -> u64 {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

/// The event id of a record: the value of its header named `header`
/// (`outbox.record.event_id_header`).
fn event_id_of<M: Message>(message: &M, header: &str) -> Option<String> {
    let headers = message.headers()?;
    headers.iter().find(|h| h.key == header).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
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

    const MINUTE: i64 = 60_000;

    fn absent(key: Option<&str>, created_ms: Option<i64>) -> AbsentRow {
        AbsentRow { key: key.map(str::to_owned), created_ms }
    }

    fn trimmed(earliest_left_ms: Option<i64>) -> TopicRemovals {
        let partition = TrimmedPartition { partition: 1, log_start_offset: 40, earliest_left_ms };
        TopicRemovals { trimmed: vec![partition], compacted_keys: None }
    }

    fn compacted(key: &str, newest_ms: i64) -> TopicRemovals {
        let keys = HashMap::from([(key_digest(Some(key.as_bytes())), newest_ms)]);
        TopicRemovals { trimmed: Vec::new(), compacted_keys: Some(keys) }
    }

    #[test]
    fn a_row_created_before_the_earliest_record_left_may_be_below_the_log_start() {
        let removals = trimmed(Some(100 * MINUTE));
        assert_eq!(
            removals.explain(&absent(Some("k"), Some(90 * MINUTE))),
            Some(Removal::BelowLogStart { partition: 1, log_start_offset: 40 })
        );
        // Within the clock allowance of the earliest record, the order is not certain.
        assert!(removals.explain(&absent(Some("k"), Some(104 * MINUTE))).is_some());
    }

    #[test]
    fn a_row_created_after_the_earliest_record_left_is_lost() {
        assert_eq!(trimmed(Some(100 * MINUTE)).explain(&absent(Some("k"), Some(106 * MINUTE))), None);
    }

    #[test]
    fn without_a_creation_time_or_a_record_left_any_row_may_be_below_the_log_start() {
        assert!(trimmed(Some(100 * MINUTE)).explain(&absent(None, None)).is_some());
        assert!(trimmed(None).explain(&absent(None, Some(1_000 * MINUTE))).is_some());
    }

    #[test]
    fn nothing_removed_explains_nothing() {
        let removals = TopicRemovals::default();
        assert!(removals.is_empty());
        assert_eq!(removals.explain(&absent(Some("k"), None)), None);
    }

    #[test]
    fn on_a_compacted_topic_a_later_record_of_the_key_explains_the_row() {
        let removals = compacted("order-7", 100 * MINUTE);
        assert_eq!(removals.explain(&absent(Some("order-7"), Some(90 * MINUTE))), Some(Removal::Compacted));
        assert_eq!(removals.explain(&absent(Some("order-7"), None)), Some(Removal::Compacted));
    }

    #[test]
    fn on_a_compacted_topic_only_a_later_record_of_the_same_key_explains_the_row() {
        let removals = compacted("order-7", 100 * MINUTE);
        assert_eq!(removals.explain(&absent(Some("order-8"), Some(90 * MINUTE))), None, "another key");
        assert_eq!(removals.explain(&absent(None, Some(90 * MINUTE))), None, "no key");
        // The key's newest record was written before this row existed: it cannot be later than
        // the row's record, so compaction cannot have removed the row's record for it.
        assert_eq!(removals.explain(&absent(Some("order-7"), Some(110 * MINUTE))), None);
    }

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
