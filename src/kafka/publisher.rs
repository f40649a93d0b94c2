//! Sending records and collecting their delivery reports into per-row outcomes.
//!
//! The producer is idempotent with `acks=all`, so librdkafka's own retries neither duplicate
//! nor reorder records within a partition, and an acknowledged record is on every in-sync
//! replica. Before sending, the publisher checks each topic once (that it exists, and what its
//! configuration lets the broker refuse, see `topic_limits`); reports are classified in
//! `delivery`, librdkafka's logs and statistics handled in `client_context`, and settings
//! built in [`settings`](crate::kafka::settings). This module reports outcomes; it never
//! touches the table.

use crate::config::Config;
use crate::kafka::client_context::RelayContext;
use crate::kafka::delivery::{classify, outcome_of};
use crate::kafka::partitioner::java_partition;
use crate::kafka::record::Record;
use crate::kafka::settings::{producer_config, reader_config};
use crate::kafka::topic_limits::{ProducerBatching, TopicLimits};
use crate::service::health::Health;
use crate::service::metrics::Metrics;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::kafka::client_context::{BrokerRefusal, ClusterUnavailable};
use crate::kafka::delivery::{DeliveryError, Outcome};

/// A failure at the Kafka boundary that is not about one record.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    /// librdkafka refused to create the producer.
    #[error("kafka.properties: librdkafka cannot create the producer with this configuration: {0}")]
    Create(KafkaError),
    /// `kafka.delivery = "exactly_once"` and the progress topic does not exist.
    #[error(
        "kafka.exactly_once.progress_topic: topic {topic} does not exist; create it compacted (cleanup.policy=compact), \
         e.g. with 1 partition and the cluster's replication factor: the relay never creates topics"
    )]
    ProgressTopicMissing {
        /// The topic.
        topic: String,
    },
    /// `kafka.delivery = "exactly_once"` and the progress topic may delete records.
    #[error(
        "kafka.exactly_once.progress_topic: topic {topic} has cleanup.policy={policy}; it must be \"compact\" alone \
         (each shard's last progress record must be kept for good, or a crash before a mark publishes its batch \
         again): alter the topic's cleanup.policy to compact"
    )]
    ProgressTopicNotCompacted {
        /// The topic.
        topic: String,
        /// Its cleanup policy.
        policy: String,
    },
    /// `kafka.delivery = "exactly_once"` and the progress topic could not be read.
    #[error("kafka.exactly_once.progress_topic: could not read topic {topic}: {error}")]
    ProgressTopicUnreadable {
        /// The topic.
        topic: String,
        /// Why.
        error: String,
    },
    /// `kafka.delivery = "exactly_once"` and the cluster refused the relay's principal the
    /// progress topic (its ACLs).
    #[error(
        "kafka.exactly_once.progress_topic: the cluster refused the relay's principal access to topic {topic} \
         ({error}); with ACLs, the principal needs Read, Write and DescribeConfigs on it (see the README)"
    )]
    ProgressTopicRefused {
        /// The topic.
        topic: String,
        /// What was refused, and librdkafka's answer.
        error: String,
    },
    /// `kafka.delivery = "exactly_once"` and the cluster refused the relay's principal a
    /// transactional id (its ACLs).
    #[error(
        "kafka.exactly_once.transactional_id_prefix: the cluster refused the relay's principal transactional id \
         {transactional_id} ({error}); with ACLs, the principal needs Write on the transactional ids that start \
         with \"{prefix}.\" (a prefixed ACL; see the README)"
    )]
    TransactionalIdRefused {
        /// The transactional id.
        transactional_id: String,
        /// `kafka.exactly_once.transactional_id_prefix`.
        prefix: String,
        /// librdkafka's answer.
        error: String,
    },
    /// `kafka.delivery = "exactly_once"` and the cluster cannot do transactions for the relay.
    #[error(
        "kafka.delivery = \"exactly_once\": the cluster refused a transactional producer ({error}); it needs brokers \
         with transactions (Apache Kafka 0.11 or later with a transaction state log that can be created: \
         transaction.state.log.replication.factor and min.insync.replicas no higher than the brokers there are) \
         and, with ACLs, Write on the transactional ids that start with kafka.exactly_once.transactional_id_prefix \
         and a dot (see the README); or use kafka.delivery = \"at_least_once\""
    )]
    TransactionsRefused {
        /// librdkafka's answer.
        error: String,
    },
    /// `kafka.delivery = "exactly_once"` and another relay's table writes progress records
    /// under this relay's keys.
    #[error(
        "kafka.exactly_once.transactional_id_prefix: the progress key {key} is used by {other}; each table's \
         relays need their own prefix: set kafka.exactly_once.transactional_id_prefix to a name nothing else uses"
    )]
    ProgressKeyTaken {
        /// The key.
        key: String,
        /// Who else wrote under it.
        other: String,
    },
}

/// What [`Publisher::publish`] knows of a batch when it returns.
pub struct Published {
    /// Each record's outcome, in the batch's order.
    pub outcomes: Vec<Outcome>,
    /// The reports still to come, for the records whose outcome is [`Outcome::StillInFlight`].
    pub unacknowledged: Vec<PendingReport>,
}

/// The delivery report of a record still in flight; resolves to the record's index in its
/// batch and its outcome.
pub struct PendingReport {
    /// The record's index in its batch.
    pub index: usize,
    report: DeliveryFuture,
}

impl Future for PendingReport {
    type Output = (usize, Outcome);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let index = self.index;
        Pin::new(&mut self.report).poll(cx).map(|report| (index, outcome_of(report)))
    }
}

/// The Kafka producer with the relay's settings.
pub struct Publisher {
    pub(super) producer: FutureProducer<RelayContext>,
    /// Reads topics' configurations ([`TopicLimits`]).
    admin: AdminClient<DefaultClientContext>,
    /// How the producer batches records, for the limits' checks.
    batching: ProducerBatching,
    /// Topics the cluster confirmed to exist, when, and their limits. A record for a topic that
    /// does not exist would otherwise hold its whole batch for librdkafka's metadata
    /// propagation wait.
    known_topics: Mutex<HashMap<String, KnownTopic>>,
    metrics: Arc<Metrics>,
    /// The producer context's record of the last refusal (the context itself is wrapped by
    /// the producer and out of reach).
    last_refusal: Arc<Mutex<Option<BrokerRefusal>>>,
    /// Whether records go out in transactions: a record refused there fails the transaction,
    /// so a refused batch is not sent again record by record (the sends would fail too).
    transactional: bool,
}

/// A topic the cluster confirmed.
#[derive(Debug, Clone, Copy)]
struct KnownTopic {
    /// When the cluster confirmed it.
    checked_at: Instant,
    limits: TopicLimits,
    /// Its partition count then.
    partitions: usize,
}

/// How long a topic check may wait for the cluster's answer; without one the records are
/// produced and librdkafka decides.
const TOPIC_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one metadata request of the startup check may wait.
const CLUSTER_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a confirmed topic is trusted before it is checked again.
const TOPIC_RECHECK_AFTER: Duration = Duration::from_secs(60);

impl Publisher {
    /// Creates the producer. It connects lazily, so an unreachable broker is not an error here;
    /// librdkafka keeps reconnecting and the relay sees it as failed deliveries.
    pub fn new(config: &Config, metrics: Arc<Metrics>, health: Arc<Health>) -> Result<Publisher, PublisherError> {
        Publisher::with_settings(producer_config(config), config, metrics, health, false)
    }

    /// A producer whose records go out in Kafka transactions, with `transactional_id`
    /// ([`crate::kafka::transactions`]).
    pub fn transactional(
        config: &Config,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        transactional_id: &str,
    ) -> Result<Publisher, PublisherError> {
        let settings = crate::kafka::settings::transactional_producer_config(config, transactional_id);
        Publisher::with_settings(settings, config, metrics, health, true)
    }

    fn with_settings(
        settings: rdkafka::ClientConfig,
        config: &Config,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        transactional: bool,
    ) -> Result<Publisher, PublisherError> {
        let last_refusal = Arc::new(Mutex::new(None));
        let context = RelayContext::new(metrics.clone(), health, last_refusal.clone());
        let producer = settings.create_with_context(context).map_err(PublisherError::Create)?;
        let admin = reader_config(config).create().map_err(PublisherError::Create)?;
        Ok(Publisher {
            producer,
            admin,
            batching: ProducerBatching::of(config),
            known_topics: Mutex::new(HashMap::new()),
            metrics,
            last_refusal,
            transactional,
        })
    }

    /// Waits until a broker of the cluster answers a metadata request, for at most `within`.
    /// A broker that refuses the relay's credentials or certificates ends the wait at the end
    /// of that attempt: at startup that is a mistake in the configuration, which waiting does
    /// not fix.
    pub async fn wait_for_cluster(&self, within: Duration) -> Result<(), ClusterUnavailable> {
        let deadline = Instant::now() + within;
        loop {
            let producer = self.producer.clone();
            let wait = deadline.saturating_duration_since(Instant::now()).min(CLUSTER_CHECK_TIMEOUT);
            let answer = tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, wait).map(|_| ()))
                .await
                .unwrap_or(Err(KafkaError::MetadataFetch(RDKafkaErrorCode::Fail)));
            let refusal = self.last_refusal.lock().ok().and_then(|r| r.clone());
            match (answer, refusal) {
                (Ok(()), _) => return Ok(()),
                (Err(_), Some(refusal)) => return Err(ClusterUnavailable::Refused(refusal)),
                (Err(e), None) if Instant::now() >= deadline => return Err(ClusterUnavailable::Unreachable(e)),
                // An address that fails at once (refused, not resolvable) is asked again shortly.
                (Err(_), None) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(Duration::from_millis(200).min(left)).await
                }
            }
        }
    }

    /// Sends every record and waits for every delivery report. Records of one topic and key
    /// are enqueued in the given order; the idempotent producer keeps that order per partition.
    ///
    /// A record the broker would refuse whatever it is batched with (over its topic's size
    /// limit, keyless on a compacted topic) fails before it is sent, and a topic whose limit is
    /// below librdkafka's batch size has no more of its records in flight than fit in one
    /// batch: the broker refuses whole batches, and a refused batch must not charge the rows of
    /// other keys. Should a batch be refused anyway (limits that could not be read), its
    /// records are sent again one at a time before any is charged.
    ///
    /// The wait for the reports ends early when none has come for `stalled_after` while a
    /// broker answers: a partition that cannot be written (too few in-sync replicas, an offline
    /// log directory, a deleted topic) must not hold back the rest. Its records stay in flight
    /// ([`Outcome::StillInFlight`]); while no broker answers, the wait goes on.
    pub async fn publish(&self, records: &[Record], stalled_after: Duration) -> Published {
        let mut outcomes = vec![Outcome::Deferred; records.len()];
        let mut in_flight: Vec<(usize, DeliveryFuture)> = Vec::with_capacity(records.len());
        // Keys whose earlier record failed before it could be sent: their later records wait, so
        // that a key's events never overtake each other (on any topic). Keyless records have no
        // order to keep.
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut next_to_await = 0;
        let topics = self.check_topics(records).await;
        // Bytes of each size-bounded topic's records enqueued since the last full drain.
        let mut bounded_bytes: HashMap<&str, usize> = HashMap::new();

        for (index, record) in records.iter().enumerate() {
            let key = record.key.as_deref();
            if key.is_some_and(|k| blocked.contains(k)) {
                continue;
            }
            let limits = match topics.get(&record.topic) {
                Some(Err(error)) => {
                    outcomes[index] = Outcome::Failed(error.clone());
                    blocked.extend(key);
                    continue;
                }
                Some(Ok(limits)) => *limits,
                None => TopicLimits::default(),
            };
            if let Some(error) = self.partition_out_of_range(record) {
                outcomes[index] = Outcome::Failed(error);
                blocked.extend(key);
                continue;
            }
            if let Some(refusal) = self.batching.refusal(record, &limits) {
                // The row's own error: it will not fit, or not be valid, later either.
                outcomes[index] = Outcome::Failed(DeliveryError {
                    reason: refusal.reason,
                    message: refusal.message,
                    transient: false,
                    producer_unusable: false,
                });
                blocked.extend(key);
                continue;
            }
            if let Some(limit) = self.batching.in_flight_limit(&limits) {
                let size = crate::kafka::topic_limits::record_size(record);
                let enqueued = bounded_bytes
                    .entry(record.topic.as_str())
                    .or_insert(crate::kafka::topic_limits::batch_size_alone(record) - size);
                if *enqueued + size > limit {
                    // Let everything in flight be acknowledged first, so that librdkafka
                    // never has more of this topic to batch than its limit.
                    for (done, delivery) in in_flight.iter_mut().skip(next_to_await) {
                        outcomes[*done] = outcome_of(delivery.await);
                    }
                    next_to_await = in_flight.len();
                    bounded_bytes.clear();
                    bounded_bytes.insert(record.topic.as_str(), crate::kafka::topic_limits::batch_size_alone(record));
                } else {
                    *enqueued += size;
                }
            }
            loop {
                match self.producer.send_result(future_record(record)) {
                    Ok(delivery) => {
                        in_flight.push((index, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                        if next_to_await < in_flight.len() =>
                    {
                        // The local queue is full: wait for the oldest record to be acknowledged,
                        // which frees its slot, then try again.
                        let (done, delivery) = &mut in_flight[next_to_await];
                        outcomes[*done] = outcome_of(delivery.await);
                        next_to_await += 1;
                    }
                    Err((error, _)) => {
                        outcomes[index] = Outcome::Failed(classify(&error));
                        blocked.extend(key);
                        break;
                    }
                }
            }
        }
        let sent: HashSet<usize> = in_flight.iter().map(|(index, _)| *index).collect();
        let mut pending: FuturesUnordered<PendingReport> =
            in_flight.into_iter().skip(next_to_await).map(|(index, report)| PendingReport { index, report }).collect();
        loop {
            tokio::select! {
                report = pending.next() => match report {
                    Some((index, outcome)) => outcomes[index] = outcome,
                    None => break,
                },
                _ = tokio::time::sleep(stalled_after) => {
                    if self.metrics.kafka_brokers_up.get() > 0 {
                        break;
                    }
                }
            }
        }
        let unacknowledged: Vec<PendingReport> = pending.into_iter().collect();
        for report in &unacknowledged {
            outcomes[report.index] = Outcome::StillInFlight;
        }
        if !self.transactional {
            self.resend_refused_batch(records, &sent, &mut outcomes).await;
        }
        Published { outcomes, unacknowledged }
    }

    /// The partition a keyed record goes to, as the producer's murmur2 partitioner picks it,
    /// from the partition count the last topic check saw; `None` for a keyless record (its
    /// partition is picked at random) or a topic not checked.
    pub fn partition_of(&self, record: &Record) -> Option<i32> {
        if record.partition.is_some() {
            return record.partition;
        }
        let key = record.key.as_deref()?;
        let partitions = self.known_topics.lock().ok()?.get(&record.topic)?.partitions;
        Some(java_partition(key.as_bytes(), partitions))
    }

    /// The row's own error when a placed partition column names a partition the topic lacks
    /// (as of the last topic check): librdkafka would fail it as an unknown partition, which
    /// says nothing of the column.
    fn partition_out_of_range(&self, record: &Record) -> Option<DeliveryError> {
        let partition = record.partition?;
        let partitions = self.known_topics.lock().ok()?.get(&record.topic)?.partitions;
        (usize::try_from(partition).ok()? >= partitions).then(|| DeliveryError {
            reason: "partition_out_of_range",
            message: format!(
                "the row names partition {partition} (outbox.record.placements), but topic \"{}\" has {partitions} (0 to {}); \
                 fix the row's partition column, or add partitions to the topic",
                record.topic,
                partitions.saturating_sub(1)
            ),
            transient: false,
            producer_unusable: false,
        })
    }

    /// Sends the records a broker refused as a batch (several refused for a batch-level
    /// reason) again, one at a time and in order, so that only a record refused on its own is
    /// charged to its row; a later record of the same key then waits, as before sending.
    /// `sent` are the records that reached the producer (the others failed before sending).
    async fn resend_refused_batch(&self, records: &[Record], sent: &HashSet<usize>, outcomes: &mut [Outcome]) {
        let refused_as_batch = |outcome: &Outcome| {
            matches!(outcome, Outcome::Failed(f) if !f.transient
                && matches!(f.reason, "message_too_large" | "invalid_record"))
        };
        let refused: Vec<usize> =
            (0..records.len()).filter(|i| sent.contains(i) && refused_as_batch(&outcomes[*i])).collect();
        if refused.len() < 2 {
            return;
        }
        tracing::warn!(
            records = refused.len(),
            "the broker refused a whole batch; sending its records again one at a time, so that only a record refused \
             on its own fails its row"
        );
        let mut blocked: HashSet<&str> = HashSet::new();
        for index in refused {
            let record = &records[index];
            let key = record.key.as_deref();
            if key.is_some_and(|k| blocked.contains(k)) {
                outcomes[index] = Outcome::Deferred;
                continue;
            }
            let outcome = match self.producer.send_result(future_record(record)) {
                Ok(delivery) => outcome_of(delivery.await),
                Err((error, _)) => Outcome::Failed(classify(&error)),
            };
            if let Outcome::Failed(_) = &outcome {
                blocked.extend(key);
            } else if let Some(key) = key {
                let overtaken =
                    records[index + 1..].iter().zip(&outcomes[index + 1..]).any(|(later, later_outcome)| {
                        later.key.as_deref() == Some(key) && matches!(later_outcome, Outcome::Acked { .. })
                    });
                if overtaken {
                    self.metrics.key_order_breaks.inc();
                    tracing::error!(
                        key,
                        topic = %record.topic,
                        "a record of this key refused with its batch was sent again after the broker had acknowledged a \
                         later record of the key: the key's order is broken on the topic (see \
                         outbox_relay_key_order_breaks_total in the README)"
                    );
                }
            }
            outcomes[index] = outcome;
        }
    }

    /// What the cluster says of each topic of `records`: the error for its records if it does
    /// not exist (or may not be written), else its limits ([`TopicLimits`]). Topics it confirms
    /// are remembered for a minute; a topic it does not answer for is left out, and its records
    /// are produced for librdkafka to decide.
    async fn check_topics(&self, records: &[Record]) -> HashMap<String, Result<TopicLimits, DeliveryError>> {
        let mut checked: HashMap<String, Result<TopicLimits, DeliveryError>> = HashMap::new();
        let mut unchecked: HashSet<&str> = HashSet::new();
        // A row naming a partition beyond the count last seen may name one added since: the
        // topic is checked again rather than the row charged for a stale count.
        let mut highest_named: HashMap<&str, usize> = HashMap::new();
        for record in records {
            if let Some(partition) = record.partition.and_then(|p| usize::try_from(p).ok()) {
                let highest = highest_named.entry(record.topic.as_str()).or_default();
                *highest = (*highest).max(partition);
            }
        }
        if let Ok(known) = self.known_topics.lock() {
            for topic in records.iter().map(|r| r.topic.as_str()) {
                let names_unknown_partition = highest_named
                    .get(topic)
                    .is_some_and(|highest| known.get(topic).is_some_and(|known| *highest >= known.partitions));
                match known.get(topic) {
                    Some(known) if known.checked_at.elapsed() <= TOPIC_RECHECK_AFTER && !names_unknown_partition => {
                        checked.insert(topic.to_owned(), Ok(known.limits));
                    }
                    _ => {
                        unchecked.insert(topic);
                    }
                }
            }
        }
        for topic in unchecked {
            let producer = self.producer.clone();
            let name = topic.to_owned();
            let answer = tokio::task::spawn_blocking(move || {
                producer.client().fetch_metadata(Some(&name), TOPIC_CHECK_TIMEOUT).map(|metadata| {
                    metadata.topics().iter().find(|t| t.name() == name).map(|t| (t.error(), t.partitions().len()))
                })
            })
            .await;
            let (verdict, partitions) = match answer {
                Ok(Ok(Some((None, partitions)))) if partitions > 0 => (None, partitions),
                Ok(Ok(Some((Some(error), _)))) => (Some(RDKafkaErrorCode::from(error)), 0),
                Ok(Ok(_)) => (Some(RDKafkaErrorCode::UnknownTopicOrPartition), 0),
                // No answer (broker unreachable): no verdict, produce and let librdkafka decide.
                _ => continue,
            };
            let failure = |reason: &'static str, message: String| DeliveryError {
                reason,
                message,
                transient: false,
                producer_unusable: false,
            };
            match verdict {
                None => {
                    let limits = self.topic_limits(topic).await;
                    tracing::debug!(topic, ?limits, "topic confirmed");
                    if let Ok(mut known) = self.known_topics.lock() {
                        let checked_at = Instant::now();
                        known.insert(topic.to_owned(), KnownTopic { checked_at, limits, partitions });
                    }
                    checked.insert(topic.to_owned(), Ok(limits));
                }
                Some(code @ (RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)) => {
                    let message = format!(
                        "topic {topic} does not exist on the cluster ({code}); create it: the relay never creates topics"
                    );
                    checked.insert(topic.to_owned(), Err(failure("unknown_topic", message)));
                }
                Some(code @ RDKafkaErrorCode::TopicAuthorizationFailed) => {
                    let message = format!("not authorized to write to topic {topic} ({code})");
                    checked.insert(topic.to_owned(), Err(failure("not_authorized", message)));
                }
                Some(_) => {}
            }
        }
        checked
    }

    /// The topic's size limit and cleanup policy, or no limits if the cluster does not say
    /// (a principal without `DescribeConfigs`, say): records are then sent, and a batch the
    /// broker refuses is sent again record by record.
    async fn topic_limits(&self, topic: &str) -> TopicLimits {
        let options = AdminOptions::new().request_timeout(Some(TOPIC_CHECK_TIMEOUT));
        let described = self.admin.describe_configs([&ResourceSpecifier::Topic(topic)], &options).await;
        match described.as_deref() {
            Ok([Ok(resource)]) => {
                let entries = resource.entries.iter().map(|e| (e.name.as_str(), e.value.as_deref())).collect();
                TopicLimits::from_entries(&entries)
            }
            other => {
                tracing::debug!(topic, answer = ?other.err(), "could not read the topic's configuration");
                TopicLimits::default()
            }
        }
    }

    /// Waits up to `timeout` for queued records to be delivered (at shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }

    /// A fatal producer error (the idempotent producer lost its guarantees, for example after a
    /// sequence gap); the producer must be replaced.
    pub fn fatal_error(&self) -> Option<String> {
        self.producer.client().fatal_error().map(|(code, reason)| format!("{code:?}: {reason}"))
    }
}

fn future_record(record: &Record) -> FutureRecord<'_, str, [u8]> {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
    for (name, value) in &record.headers {
        headers = headers.insert(Header { key: name, value: value.as_deref() });
    }
    let mut future = FutureRecord::to(&record.topic).headers(headers);
    if let Some(partition) = record.partition {
        future = future.partition(partition);
    }
    if let Some(timestamp_ms) = record.timestamp_ms {
        future = future.timestamp(timestamp_ms);
    }
    if let Some(key) = &record.key {
        future = future.key(key.as_str());
    }
    if let Some(payload) = &record.payload {
        future = future.payload(payload.as_slice());
    }
    future
}
