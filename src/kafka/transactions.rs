//! Kafka transactions for `kafka.delivery = "exactly_once"`: the relay's transactional
//! producer, the fencing of another's, and what each step of a transaction can answer.
//!
//! A relay's producer has a transactional id of its own
//! ([`crate::config::ExactlyOnce::transactional_id`]), which the progress records of the shards
//! it writes name. A new owner of a shard fences the producer they name at once ([`fence`]):
//! `init_transactions` with its id aborts its open transaction, and its next step fails with
//! [`TransactionError::Fenced`]. A transaction's records become visible to `read_committed`
//! consumers only when it commits, together with its progress records
//! ([`crate::kafka::progress`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureRecord, Producer};

use crate::config::Config;
use crate::kafka::progress::{Progress, ProgressTopic};
use crate::kafka::publisher::{Publisher, PublisherError};
use crate::service::health::Health;
use crate::service::metrics::Metrics;

/// How long a commit waits for the transaction's delivery reports to be released
/// ([`TransactionalProducer::reports_released`]).
const REPORTS_RELEASE_WAIT: Duration = Duration::from_millis(50);

/// What a transaction step answered other than success.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransactionError {
    /// A newer producer with this one's transactional id exists (another relay took one of its
    /// shards and fenced it): this one may do nothing more, and its open transaction was
    /// aborted.
    #[error("fenced by a newer producer with the same transactional id: {0}")]
    Fenced(String),
    /// The transaction cannot commit (a record failed, a broker refused a step); it must be
    /// aborted, and none of its records becomes visible.
    #[error("the transaction must be aborted: {0}")]
    Abortable(String),
    /// The cluster refused the relay's principal a topic of the transaction (its ACLs); the
    /// transaction must be aborted, as [`TransactionError::Abortable`].
    #[error("the transaction must be aborted: {0}")]
    Refused(String),
    /// The step timed out or met a passing broker error; it may be called again.
    #[error("{0}")]
    Retriable(String),
    /// The producer cannot go on (a fatal error); a new one must be created.
    #[error("the transactional producer failed: {0}")]
    Fatal(String),
}

impl TransactionError {
    fn of(error: KafkaError) -> TransactionError {
        let text = error.to_string();
        let code = error.rdkafka_error_code();
        if matches!(
            code,
            Some(
                RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::InvalidProducerIdMapping
            )
        ) {
            return TransactionError::Fenced(text);
        }
        if code == Some(RDKafkaErrorCode::TopicAuthorizationFailed) {
            return TransactionError::Refused(text);
        }
        match &error {
            KafkaError::Transaction(e) if e.is_fatal() => TransactionError::Fatal(text),
            KafkaError::Transaction(e) if e.txn_requires_abort() => TransactionError::Abortable(text),
            KafkaError::Transaction(e) if e.is_retriable() => TransactionError::Retriable(text),
            _ => TransactionError::Abortable(text),
        }
    }
}

/// A relay's transactional producer: a [`Publisher`] whose records go out in transactions.
pub struct TransactionalProducer {
    /// Its transactional id.
    pub transactional_id: String,
    /// The producer; its `publish` sends a transaction's records.
    pub publisher: Publisher,
    /// Whether a transaction was begun and neither committed nor aborted.
    open: bool,
    /// Whether the open transaction was asked to commit: it may then end committed.
    commit_requested: bool,
}

impl TransactionalProducer {
    /// Creates a producer with `transactional_id` and runs its `init_transactions`.
    pub async fn start(
        config: &Config,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        transactional_id: String,
        within: Duration,
    ) -> Result<TransactionalProducer, StartError> {
        let publisher =
            Publisher::transactional(config, metrics, health, &transactional_id).map_err(StartError::Create)?;
        let producer = publisher.producer.clone();
        match tokio::task::spawn_blocking(move || producer.init_transactions(within)).await {
            Ok(Ok(())) => {
                Ok(TransactionalProducer { transactional_id, publisher, open: false, commit_requested: false })
            }
            Ok(Err(e)) => {
                Err(StartError::Init { transactional_id, error: e.to_string(), code: e.rdkafka_error_code() })
            }
            Err(e) => Err(StartError::Init { transactional_id, error: e.to_string(), code: None }),
        }
    }

    /// Begins a transaction.
    pub fn begin(&mut self) -> Result<(), TransactionError> {
        self.publisher.producer.begin_transaction().map_err(TransactionError::of)?;
        self.open = true;
        self.commit_requested = false;
        Ok(())
    }

    /// Sends a shard's progress record within the open transaction, keyed `key`, to the key's
    /// partition of the progress topic.
    pub fn send_progress(
        &self,
        topic: &ProgressTopic,
        key: &str,
        progress: &Progress,
    ) -> Result<DeliveryFuture, TransactionError> {
        let value = progress.to_json();
        let record =
            FutureRecord::to(&topic.name).key(key).payload(value.as_slice()).partition(topic.partition_of(key));
        self.publisher.producer.send_result(record).map_err(|(e, _)| TransactionError::of(e))
    }

    /// Commits the open transaction: its records, the progress record with them, become
    /// visible to `read_committed` consumers at once.
    pub async fn commit(&mut self, within: Duration) -> Result<(), TransactionError> {
        self.reports_released().await;
        self.commit_requested = true;
        let producer = self.publisher.producer.clone();
        blocking(move || producer.commit_transaction(within)).await?;
        self.open = false;
        Ok(())
    }

    /// Waits, briefly, until librdkafka counts no record of this producer as outstanding.
    /// rdkafka's `commit_transaction` flushes first, and its flush, finding a delivery report
    /// still counted (the polling thread completes a report's future before it releases the
    /// report's event), polls for a whole 100 ms: at 5k rows/s one commit in ten waited that
    /// long. Every record of the transaction is acknowledged when this is called, so the count
    /// reaches zero within a moment; should it not, the commit's own flush waits.
    async fn reports_released(&self) {
        let deadline = Instant::now() + REPORTS_RELEASE_WAIT;
        while self.publisher.producer.in_flight_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Aborts the open transaction, if any: none of its records becomes visible to
    /// `read_committed` consumers.
    pub async fn abort(&mut self, within: Duration) -> Result<(), TransactionError> {
        if !self.open {
            return Ok(());
        }
        let producer = self.publisher.producer.clone();
        blocking(move || producer.abort_transaction(within)).await?;
        self.open = false;
        Ok(())
    }

    /// Whether a transaction is open.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Whether the open transaction (or the last one) was asked to commit, whatever the answer:
    /// one that never was can only end aborted.
    pub fn commit_requested(&self) -> bool {
        self.commit_requested
    }
}

/// Fences every producer with `transactional_id`: `init_transactions` with it, which aborts
/// that producer's open transaction (or completes its commit, if the commit had begun) and
/// makes its every later step fail. The producer that fenced is then dropped.
pub async fn fence(config: &Config, transactional_id: &str, within: Duration) -> Result<(), StartError> {
    let settings = crate::kafka::settings::transactional_producer_config(config, transactional_id);
    let fencer: rdkafka::producer::BaseProducer =
        settings.create().map_err(|e| StartError::Create(PublisherError::Create(e)))?;
    let id = transactional_id.to_owned();
    match tokio::task::spawn_blocking(move || fencer.init_transactions(within)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            Err(StartError::Init { transactional_id: id, error: e.to_string(), code: e.rdkafka_error_code() })
        }
        Err(e) => Err(StartError::Init { transactional_id: id, error: e.to_string(), code: None }),
    }
}

/// Runs a transaction step, which blocks until the cluster answers, off the async threads.
async fn blocking(step: impl FnOnce() -> Result<(), KafkaError> + Send + 'static) -> Result<(), TransactionError> {
    match tokio::task::spawn_blocking(step).await {
        Ok(answer) => answer.map_err(TransactionError::of),
        Err(e) => Err(TransactionError::Fatal(format!("the transaction step's thread failed: {e}"))),
    }
}

/// Why a transactional producer could not start (or fence another).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// librdkafka refused the configuration.
    #[error(transparent)]
    Create(PublisherError),
    /// `init_transactions` failed.
    #[error("init_transactions of transactional id {transactional_id}: {error}")]
    Init {
        /// The transactional id.
        transactional_id: String,
        /// librdkafka's answer.
        error: String,
        /// Its code, when it has one.
        code: Option<RDKafkaErrorCode>,
    },
}

impl StartError {
    /// Whether the cluster cannot do transactions at all, or will not let this relay use them,
    /// rather than being unavailable for now: a configuration problem.
    pub fn is_permanent(&self) -> bool {
        match self {
            StartError::Create(_) => true,
            StartError::Init { code, .. } => matches!(
                code,
                Some(
                    RDKafkaErrorCode::UnsupportedVersion
                        | RDKafkaErrorCode::UnsupportedForMessageFormat
                        | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                        | RDKafkaErrorCode::ClusterAuthorizationFailed
                        | RDKafkaErrorCode::UnsupportedFeature
                )
            ),
        }
    }
}
