//! Everything that touches Kafka: producer setup, sending a batch of records, and reading the
//! delivery reports back into a per-row outcome.
//!
//! The producer is idempotent with `acks=all`, so librdkafka's own retries neither duplicate
//! nor reorder records within a partition, and an acknowledged record is on every in-sync
//! replica. Keys are partitioned with murmur2 as the Java client does, so a key lands where a
//! Java producer would put it. This module reports outcomes; it never touches the table.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;

use crate::config::Config;
use crate::kafka::record::Record;
use crate::kafka::topic_limits::{ProducerBatching, TopicLimits};
use crate::service::health::Health;
use crate::service::metrics::Metrics;

/// Producer settings the relay chooses. Users may override the tunable ones through
/// `kafka.properties`; the guarantee-bearing ones are refused by config validation.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("client.id", "outbox-relay"),
    ("enable.idempotence", "true"),
    ("acks", "all"),
    // Java-compatible murmur2 for keyed records; NULL keys are spread at random.
    ("partitioner", "murmur2_random"),
    // Never give up on a record (0 is no limit). A record that times out may have been
    // written by a broker that was only slow, and the relay would then send it again: a
    // duplicate without any relay stop. Waiting instead, librdkafka retries with the same
    // producer id and sequence numbers, which the broker deduplicates. An outage shows in
    // readiness, the metrics and a periodic warning, never as row errors.
    (MESSAGE_TIMEOUT, "0"),
    // Queue depth and broker round-trip times for the metrics.
    ("statistics.interval.ms", "5000"),
    // The relay hands librdkafka a whole batch at once and waits for it, so lingering only
    // delays the batch: librdkafka's 5 ms default cost a quarter of the drain rate in the
    // benchmark. 1 ms still lets the records of a batch share produce requests.
    ("linger.ms", "1"),
];

/// librdkafka's limit on how long a record may wait for its acknowledgement;
/// `delivery.timeout.ms` is another name for it.
pub const MESSAGE_TIMEOUT: &str = "message.timeout.ms";

/// The user's `message.timeout.ms` (or `delivery.timeout.ms`) when it lets librdkafka abandon
/// a record: records abandoned after it are sent again and may reach the topic twice.
pub fn abandoning_timeout(config: &Config) -> Option<(&'static str, &str)> {
    [MESSAGE_TIMEOUT, "delivery.timeout.ms"].into_iter().find_map(|name| {
        config.kafka.properties.get(name).map(String::as_str).filter(|v| v.trim() != "0").map(|v| (name, v))
    })
}

/// A failure at the Kafka boundary that is not about one record.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    /// librdkafka refused to create the producer.
    #[error("kafka.properties: librdkafka cannot create the producer with this configuration: {0}")]
    Create(KafkaError),
}

/// Why one record did not reach the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryError {
    /// A short, fixed label for metrics (`message_timeout`, `unknown_topic`, ...).
    pub reason: &'static str,
    /// The full error, stored in the row's last-error column.
    pub message: String,
    /// Whether the broker side may accept it later without any change to the row.
    pub transient: bool,
    /// Whether the broker has disowned this producer session (fenced, or lost its sequence
    /// state), so that no later record from it can succeed: the producer must be replaced.
    pub producer_unusable: bool,
}

/// What happened to one record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The broker acknowledged it (its report arrived at `at`); its row may be marked published.
    Acked {
        /// When the relay received the acknowledgement.
        at: SystemTime,
    },
    /// It was not delivered; its row stays unpublished and records the error.
    Failed(DeliveryError),
    /// It was not sent because an earlier record of the same key failed before it could be
    /// sent; sending it would have overtaken that record. The row stays unpublished, untouched.
    Deferred,
    /// It was sent and its report had not come when the batch stopped waiting (its partition
    /// stalled while the brokers answered): the record stays in flight, and its report comes
    /// through [`Published::unacknowledged`].
    StillInFlight,
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
    producer: FutureProducer<RelayContext>,
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

/// The librdkafka configuration for a relay: the `[kafka]` section's settings, and beneath
/// them the relay's defaults, which a user property may override.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut client = config.kafka.producer_settings();
    for (name, value) in PRODUCER_DEFAULTS {
        if client.get(name).is_none() {
            client.set(*name, *value);
        }
    }
    client.set_log_level(log_level(config));
    client
}

/// Info, or Debug when `kafka.properties.debug` asks librdkafka for debug contexts (which it
/// would otherwise compute and then drop).
fn log_level(config: &Config) -> RDKafkaLogLevel {
    if config.kafka.properties.contains_key("debug") { RDKafkaLogLevel::Debug } else { RDKafkaLogLevel::Info }
}

/// Property prefixes that say how to reach and authenticate to the cluster. Tools that read
/// topics (`audit`) take these from `kafka.properties` and leave the producer tuning out.
const CONNECTION_PROPERTY_PREFIXES: &[&str] =
    &["security.", "sasl.", "ssl.", "client.", "socket.", "broker.", "api.version", "metadata.", "reconnect."];

/// The librdkafka configuration for reading topics: brokers, and the connection and security
/// properties of `kafka.properties`.
pub fn reader_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.brokers);
    for (name, value) in &config.kafka.properties {
        if CONNECTION_PROPERTY_PREFIXES.iter().any(|p| name.starts_with(p)) {
            client.set(name, value);
        }
    }
    for (name, value) in config.kafka.security_properties() {
        client.set(name, value);
    }
    client.set_log_level(if config.kafka.properties.contains_key("debug") {
        RDKafkaLogLevel::Debug
    } else {
        RDKafkaLogLevel::Warning
    });
    client
}

impl Publisher {
    /// Creates the producer. It connects lazily, so an unreachable broker is not an error here;
    /// librdkafka keeps reconnecting and the relay sees it as failed deliveries.
    pub fn new(config: &Config, metrics: Arc<Metrics>, health: Arc<Health>) -> Result<Publisher, PublisherError> {
        let last_refusal = Arc::new(Mutex::new(None));
        let context = RelayContext {
            last_logged: Mutex::default(),
            last_refusal: last_refusal.clone(),
            metrics: metrics.clone(),
            health,
        };
        let producer = producer_config(config).create_with_context(context).map_err(PublisherError::Create)?;
        let admin = reader_config(config).create().map_err(PublisherError::Create)?;
        Ok(Publisher {
            producer,
            admin,
            batching: ProducerBatching::of(config),
            known_topics: Mutex::new(HashMap::new()),
            metrics,
            last_refusal,
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
        self.resend_refused_batch(records, &sent, &mut outcomes).await;
        Published { outcomes, unacknowledged }
    }

    /// The partition a keyed record goes to, as the producer's murmur2 partitioner picks it,
    /// from the partition count the last topic check saw; `None` for a keyless record (its
    /// partition is picked at random) or a topic not checked.
    pub fn partition_of(&self, record: &Record) -> Option<i32> {
        let key = record.key.as_deref()?;
        let partitions = self.known_topics.lock().ok()?.get(&record.topic)?.partitions;
        Some(java_partition(key.as_bytes(), partitions))
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
        if let Ok(known) = self.known_topics.lock() {
            for topic in records.iter().map(|r| r.topic.as_str()) {
                match known.get(topic) {
                    Some(known) if known.checked_at.elapsed() <= TOPIC_RECHECK_AFTER => {
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

/// The partition Java's default partitioner (and librdkafka's `murmur2_random`) gives a key.
fn java_partition(key: &[u8], partitions: usize) -> i32 {
    let positive = murmur2(key) & 0x7fff_ffff;
    (positive as i64 % partitions.max(1) as i64) as i32
}

/// Kafka's murmur2 hash of a key, as its Java client computes it.
fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    let mut h = SEED ^ length as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

fn future_record(record: &Record) -> FutureRecord<'_, str, [u8]> {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
    for (name, value) in &record.headers {
        headers = headers.insert(Header { key: name, value: value.as_deref() });
    }
    let mut future = FutureRecord::to(&record.topic).headers(headers);
    if let Some(key) = &record.key {
        future = future.key(key.as_str());
    }
    if let Some(payload) = &record.payload {
        future = future.payload(payload.as_slice());
    }
    future
}

fn outcome_of(
    report: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
) -> Outcome {
    match report {
        Ok(Ok(_)) => Outcome::Acked { at: SystemTime::now() },
        Ok(Err((error, _))) => Outcome::Failed(classify(&error)),
        Err(_) => Outcome::Failed(DeliveryError {
            reason: "producer_closed",
            message: "the producer was closed before the delivery report arrived".to_owned(),
            transient: true,
            producer_unusable: true,
        }),
    }
}

/// Labels a Kafka error for metrics and decides whether it is about the record or the cluster.
pub fn classify(error: &KafkaError) -> DeliveryError {
    use RDKafkaErrorCode as C;
    let code = error.rdkafka_error_code();
    // librdkafka recovers an idempotent producer from most of these itself, but a broker that
    // keeps refusing the session (seen with brokers that fence an epoch bump) leaves it stuck;
    // a new producer gets a new producer id and starts clean.
    let producer_unusable = matches!(
        code,
        Some(
            C::ProducerFenced
                | C::InvalidProducerEpoch
                | C::OutOfOrderSequenceNumber
                | C::UnknownProducerId
                | C::InvalidProducerIdMapping
        )
    );
    if producer_unusable {
        return DeliveryError {
            reason: "producer_fenced",
            message: error.to_string(),
            transient: true,
            producer_unusable,
        };
    }
    let (reason, transient) = match code {
        Some(C::MessageTimedOut) => ("message_timeout", true),
        Some(C::QueueFull) => ("queue_full", true),
        Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition) => ("unknown_topic", false),
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => ("message_too_large", false),
        Some(C::TopicAuthorizationFailed) => ("not_authorized", false),
        // The producer itself may not write (the IdempotentWrite ACL): no row can succeed, so
        // charging each row an attempt would only park every key until `retry --all`. Waited
        // out as an outage: readiness fails and the error is logged until the grant is fixed.
        Some(C::ClusterAuthorizationFailed) => ("not_authorized", true),
        Some(C::InvalidRecord | C::InvalidMessage | C::InvalidArgument) => ("invalid_record", false),
        Some(C::AllBrokersDown | C::BrokerTransportFailure) => ("broker_unavailable", true),
        _ => ("other", true),
    };
    DeliveryError { reason, message: error.to_string(), transient, producer_unusable }
}

/// How long an identical client error stays quiet after it was logged. librdkafka reports a
/// down broker on every reconnect attempt; once per window is enough for an operator.
const REPEATED_ERROR_QUIET: Duration = Duration::from_secs(30);

/// Routes librdkafka's own log lines and errors into `tracing`, and its statistics into the
/// metrics and the readiness state.
pub struct RelayContext {
    /// When each kind of client error was last logged.
    last_logged: Mutex<HashMap<String, Instant>>,
    /// The last time a broker refused the relay's credentials or certificates: what to check,
    /// and librdkafka's reason. Read while the relay waits for the cluster at startup, where a
    /// refusal is a configuration mistake rather than an outage.
    last_refusal: Arc<Mutex<Option<BrokerRefusal>>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl ClientContext for RelayContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        // Connection failures ("FAIL") also arrive through `error` below, which rate-limits them.
        if facility == "FAIL" {
            tracing::debug!(target: "librdkafka", facility, "{message}");
            return;
        }
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn stats(&self, statistics: Statistics) {
        self.metrics.kafka_queue_messages.set(statistics.msg_cnt as i64);
        let mut up = 0;
        // Bootstrap entries (node id -1) stand for the configured addresses, not brokers.
        for (name, broker) in statistics.brokers.iter().filter(|(_, b)| b.nodeid >= 0) {
            if broker.state == "UP" {
                up += 1;
            }
            if let Some(rtt) = &broker.rtt {
                self.metrics.kafka_broker_rtt.with_label_values(&[name]).set(rtt.avg as f64 / 1_000_000.0);
            }
        }
        self.metrics.kafka_brokers_up.set(up);
        self.health.set_brokers_up(up > 0);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.metrics.kafka_brokers_up.set(0);
            self.health.set_brokers_up(false);
        }
        let kind = error.rdkafka_error_code().map(|c| format!("{c:?}")).unwrap_or_else(|| error.to_string());
        let now = Instant::now();
        let quiet = match self.last_logged.lock() {
            Ok(mut last) => {
                let recent = last.get(&kind).is_some_and(|at| now.duration_since(*at) < REPEATED_ERROR_QUIET);
                if !recent {
                    last.insert(kind, now);
                }
                recent
            }
            Err(_) => false,
        };
        let hint = security_hint(&error, reason);
        if let (Some(hint), Ok(mut last)) = (hint, self.last_refusal.lock()) {
            *last = Some(BrokerRefusal { hint, reason: reason.to_owned() });
        }
        match (quiet, hint) {
            (true, _) => tracing::debug!(target: "librdkafka", error = %error, "Kafka client error: {reason}"),
            // A refused credential or certificate does not fix itself: say what to change.
            (false, Some(hint)) => {
                tracing::error!(target: "librdkafka", error = %error, hint, "Kafka client error: {reason}")
            }
            (false, None) => tracing::warn!(target: "librdkafka", error = %error, "Kafka client error: {reason}"),
        }
    }
}

/// Why no broker could be used at startup.
#[derive(Debug, thiserror::Error)]
pub enum ClusterUnavailable {
    /// No broker answered; librdkafka's last answer.
    #[error("{0}")]
    Unreachable(KafkaError),
    /// A broker answered but refused the relay's credentials or certificates.
    #[error("{0}")]
    Refused(BrokerRefusal),
}

/// A broker refusing the relay's credentials or certificates.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{hint} ({reason})")]
pub struct BrokerRefusal {
    /// What the operator should check, naming the configuration keys.
    pub hint: &'static str,
    /// librdkafka's reason.
    pub reason: String,
}

/// What the operator should check when librdkafka reports an authentication or TLS failure.
fn security_hint(error: &KafkaError, reason: &str) -> Option<&'static str> {
    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Authentication) {
        return Some(
            "the brokers refused the relay's credentials: check kafka.sasl.mechanism, kafka.sasl.username and the password",
        );
    }
    let reason = reason.to_ascii_lowercase();
    if reason.contains("certificate verify failed") {
        Some(
            "the broker's certificate is not trusted: check kafka.tls.ca_file, and that the certificate names the host in kafka.brokers",
        )
    } else if reason.contains("certificate required") || reason.contains("alert bad certificate") {
        // OpenSSL brokers send "certificate required"; Apache Kafka (Java) sends "bad
        // certificate", for a missing certificate as for one it does not trust.
        Some(
            "the broker asks for a client certificate it trusts: set kafka.tls.cert_file and kafka.tls.key_file to one signed by a CA the broker trusts",
        )
    } else if reason.contains("ssl handshake failed") || reason.contains("wrong version number") {
        Some("the TLS handshake failed: check that kafka.security_protocol matches the broker's listener")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_go_to_the_partitions_javas_partitioner_picks() {
        // Values from Kafka's own Utils.murmur2 tests and DefaultPartitioner.
        assert_eq!(murmur2(b"21"), -973932308);
        assert_eq!(murmur2(b"foobar"), -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1486304829);
        assert_eq!(murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"), -58897971);
        assert_eq!(murmur2(b"abc"), 479470107);
        assert_eq!(java_partition(b"foobar", 3), ((-790332482i32 & 0x7fff_ffff) % 3));
    }

    #[test]
    fn every_classified_reason_is_a_declared_metric_label() {
        use RDKafkaErrorCode as C;
        let codes = [
            C::MessageTimedOut,
            C::QueueFull,
            C::UnknownTopicOrPartition,
            C::MessageSizeTooLarge,
            C::TopicAuthorizationFailed,
            C::InvalidRecord,
            C::AllBrokersDown,
            C::ProducerFenced,
            C::OutOfOrderSequenceNumber,
            C::RequestTimedOut,
        ];
        for code in codes {
            let failure = classify(&KafkaError::MessageProduction(code));
            assert!(
                crate::service::metrics::PUBLISH_ERROR_REASONS.contains(&failure.reason),
                "{code:?} -> {}",
                failure.reason
            );
        }
    }

    /// The README's table "Broker errors: outage or row". librdkafka retries these itself while
    /// `message.timeout.ms = 0`; should one reach a delivery report (a user's timeout), it must
    /// not count toward `relay.max_attempts`.
    #[test]
    fn a_cluster_fault_is_an_outage_never_the_rows_error() {
        use RDKafkaErrorCode as C;
        let cluster_faults = [
            C::NotEnoughReplicas,
            C::NotEnoughReplicasAfterAppend,
            C::NotLeaderForPartition,
            C::LeaderNotAvailable,
            C::RequestTimedOut,
            C::OperationTimedOut,
            C::MessageTimedOut,
            C::NetworkException,
            C::KafkaStorageError,
            C::BrokerTransportFailure,
            C::AllBrokersDown,
            C::Fatal,
            C::ClusterAuthorizationFailed,
        ];
        for code in cluster_faults {
            let failure = classify(&KafkaError::MessageProduction(code));
            assert!(failure.transient && !failure.producer_unusable, "{code:?} -> {failure:?}");
        }
        for code in [C::OutOfOrderSequenceNumber, C::UnknownProducerId, C::InvalidProducerEpoch, C::ProducerFenced] {
            let failure = classify(&KafkaError::MessageProduction(code));
            assert!(failure.transient && failure.producer_unusable, "{code:?}: a new session, not the row's error");
        }
    }

    #[test]
    fn a_fenced_producer_must_be_replaced_but_a_timeout_does_not_need_it() {
        let fenced = classify(&KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced));
        assert!(fenced.producer_unusable && fenced.transient);
        let timeout = classify(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut));
        assert!(!timeout.producer_unusable && timeout.transient);
        let too_large = classify(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(!too_large.transient, "a record too large for the broker will not fit later either");
    }

    #[test]
    fn a_refused_client_certificate_is_hinted_from_openssl_and_from_kafkas_own_brokers() {
        let error = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        // As librdkafka reports them: an OpenSSL server's alert, then Apache Kafka's (Java's).
        for reason in [
            "ssl://localhost:9093/bootstrap: SSL handshake failed: error:0A00045C:SSL routines::tlsv13 alert certificate required: SSL alert number 116",
            "ssl://localhost:9093/bootstrap: Receive failed: error:0A000412:SSL routines::sslv3 alert bad certificate: SSL alert number 42 (after 7ms in state APIVERSION_QUERY)",
        ] {
            let hint = security_hint(&error, reason).unwrap_or_default();
            assert!(hint.contains("client certificate"), "{reason}: {hint}");
        }
    }
}
