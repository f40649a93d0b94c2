//! Exactly-once batches (`kafka.delivery = "exactly_once"`): a batch goes out in one Kafka
//! transaction per shard, each with the shard's progress record, and is marked after the
//! commit; a shard is taken only after its previous producer is fenced and its last committed
//! batch marked.
//!
//! Why a `read_committed` consumer sees each row once, whatever crashes, takeovers and broker
//! failures interleave (the README gives the long form):
//! - a shard's records are written only by the producer with its transactional id, and a new
//!   one (a takeover, a restart) fences the old one in `init_transactions`, which also ends the
//!   old one's open transaction: aborted, or its commit completed;
//! - a transaction either commits with its records and the progress record naming its rows, or
//!   shows none of them: aborted records stay unpublished in the table and go out again;
//! - a committed batch is marked after the commit; if a crash (of the relay, or of PostgreSQL
//!   before the mark reached its WAL) comes first, the next owner of the shard reads the shard's
//!   latest progress record after fencing and marks those rows before it claims anything
//!   ([`Relay::ready_transactions`]);
//! - the topic keeps only a shard's latest progress record, so a batch's mark is durable
//!   (`synchronous_commit = on` on the relay's session) before the shard's next transaction
//!   commits: a batch claims nothing before the batch before it is marked, and with this mode
//!   no batch is claimed ahead.
//!
//! A record the broker refuses fails the transaction's commit: the transaction is aborted,
//! the row whose own error it was is charged an attempt (it then waits out its backoff and goes
//! out alone for its key, and is given up after `relay.max_attempts`), and the other rows go out
//! again in the next transaction, not charged.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{Cut, Relay, RelayError};
use crate::kafka::delivery::Outcome;
use crate::kafka::progress::{Progress, ProgressRow, ProgressTopic};
use crate::kafka::publisher::{Published, PublisherError};
use crate::kafka::record::Record;
use crate::kafka::transactions::{ShardProducer, StartError, TransactionError};
use crate::postgres::outbox::Outbox;
use crate::postgres::row::{RowId, RowRef};

/// How long one commit or abort may wait for the cluster before it is tried again.
const TRANSACTION_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `init_transactions` of a shard may wait once the relay has run a transaction: a
/// cluster that does not answer then is an outage, waited out.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The transactional side of the loop: the progress topic, and a started and repaired
/// producer for each shard held.
pub(super) struct Transactions {
    topic: ProgressTopic,
    /// A producer for each shard held whose previous producer was fenced and whose last
    /// committed batch is marked: only these shards' rows are produced.
    producers: BTreeMap<i32, ShardProducer>,
    /// The database and the table, as transactional ids and progress records name them;
    /// read at the first connection.
    names: Option<(String, String)>,
    /// Whether a shard's producer ever started: until then the cluster's refusal is a
    /// configuration problem (a broker without transactions), after it an outage.
    ever_started: bool,
}

impl Transactions {
    /// Checks the progress topic (it exists and is compacted); `None` with at-least-once
    /// delivery.
    pub(super) async fn start(config: &crate::config::Config) -> Result<Option<Transactions>, RelayError> {
        if config.kafka.delivery != crate::config::Delivery::ExactlyOnce {
            return Ok(None);
        }
        let name = config.kafka.exactly_once.progress_topic.clone();
        let config = config.clone();
        let topic = tokio::task::spawn_blocking(move || ProgressTopic::check(&config))
            .await
            .map_err(|e| PublisherError::ProgressTopicUnreadable { topic: name, error: e.to_string() })??;
        Ok(Some(Transactions { topic, producers: BTreeMap::new(), names: None, ever_started: false }))
    }

    /// Forgets every shard's producer: the shards' locks went with the database session, and
    /// a shard taken again must fence and repair again.
    pub(super) fn forget(&mut self) {
        self.producers.clear();
    }

    /// Aborts every open transaction (at shutdown, when the grace period cut a batch short):
    /// never left for the broker's transaction timeout, which would hold back `read_committed`
    /// consumers of its partitions until then.
    pub(super) async fn abort_open(&mut self) {
        for producer in self.producers.values_mut().filter(|p| p.is_open()) {
            if let Err(e) = producer.abort(TRANSACTION_STEP_TIMEOUT).await {
                warn!(shard = producer.shard, error = %e, "could not abort the open transaction at shutdown");
            }
        }
    }
}

/// How one shard's transaction ended.
enum Ended {
    Committed,
    Aborted,
    /// The producer is fenced or failed: it is dropped, and the shard fenced and repaired again
    /// before its next batch.
    ProducerGone,
}

impl Relay {
    /// Makes every shard held ready for transactions before anything is claimed: starts its
    /// producer (which fences the previous one), reads its latest progress record and marks the
    /// rows it names. Drops the producers of shards no longer held.
    pub(super) async fn ready_transactions(
        &self,
        tx: &mut Transactions,
        outbox: &Outbox,
        owned: &[i32],
    ) -> Result<(), Cut> {
        tx.producers.retain(|shard, _| owned.contains(shard));
        let missing: Vec<i32> = owned.iter().copied().filter(|s| !tx.producers.contains_key(s)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if tx.names.is_none() {
            match outbox.database_and_table().await {
                Ok(names) => tx.names = Some(names),
                Err(e) => return Err(self.outage(format!("reading the database's name: {e}")).await),
            }
        }
        let Some((database, table)) = tx.names.clone() else { return Err(Cut::NextTurn) };
        // Every missing shard at once: each start is a few round trips to the transaction
        // coordinator, and a relay taking over sixteen shards one after another waited seconds.
        let ever_started = tx.ever_started;
        let tx_ref = &*tx;
        let readied = futures::future::join_all(missing.iter().map(|&shard| {
            let (database, table) = (database.as_str(), table.as_str());
            async move {
                let producer = self.start_shard(shard, database, table, ever_started).await?;
                self.repair(tx_ref, outbox, &producer, database, table).await?;
                Ok::<_, Cut>(producer)
            }
        }))
        .await;
        let mut first_cut = None;
        for readied in readied {
            match readied {
                Ok(producer) => {
                    info!(shard = producer.shard, transactional_id = %producer.transactional_id, "shard ready for transactions");
                    tx.ever_started = true;
                    tx.producers.insert(producer.shard, producer);
                }
                // A configuration problem outranks an outage.
                Err(cut @ Cut::Fail(_)) => first_cut = Some(cut),
                Err(cut) => {
                    first_cut.get_or_insert(cut);
                }
            }
        }
        first_cut.map_or(Ok(()), Err)
    }

    /// Starts `shard`'s producer, which fences the one before it.
    async fn start_shard(
        &self,
        shard: i32,
        database: &str,
        table: &str,
        ever_started: bool,
    ) -> Result<ShardProducer, Cut> {
        let transactional_id = self.config.kafka.exactly_once.transactional_id(database, table, shard);
        let within = if ever_started { INIT_TIMEOUT } else { self.config.kafka.startup_timeout };
        let started = ShardProducer::start(
            &self.config,
            self.metrics.clone(),
            self.health.clone(),
            shard,
            transactional_id,
            within,
        )
        .await;
        match started {
            Ok(producer) => Ok(producer),
            Err(StartError::Create(e)) => Err(Cut::Fail(e.into())),
            Err(StartError::Init { error, .. }) if !ever_started => {
                Err(Cut::Fail(PublisherError::TransactionsRefused { error }.into()))
            }
            Err(e) if e.is_permanent() => {
                Err(Cut::Fail(PublisherError::TransactionsRefused { error: e.to_string() }.into()))
            }
            Err(e) => Err(self.outage(e.to_string()).await),
        }
    }

    /// Marks the rows of the shard's latest committed batch, which a crash may have left
    /// unmarked. Runs after the shard's producer fenced the one before it.
    async fn repair(
        &self,
        tx: &Transactions,
        outbox: &Outbox,
        producer: &ShardProducer,
        database: &str,
        table: &str,
    ) -> Result<(), Cut> {
        let (config, topic, key) = (self.config.clone(), tx.topic.clone(), producer.transactional_id.clone());
        let within = self.config.kafka.startup_timeout;
        let read = tokio::task::spawn_blocking(move || topic.read_latest(&config, &key, within))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let progress = match read {
            Ok(Some(progress)) => progress,
            Ok(None) => return Ok(()),
            Err(e) => return Err(self.outage(format!("reading the progress topic: {e}")).await),
        };
        if progress.database != database || progress.table != table || progress.shard != producer.shard {
            return Err(Cut::Fail(
                PublisherError::TransactionalIdTaken {
                    transactional_id: producer.transactional_id.clone(),
                    other: format!(
                        "the relay of table {} in database {} (shard {})",
                        progress.table, progress.database, progress.shard
                    ),
                }
                .into(),
            ));
        }
        // Where the event id is the row id itself, nothing tells a row from one that took its id
        // since in a table that replaced this one (renamed and recreated, restored): the batch is
        // repaired only in the table of the OID it was claimed from. A `TRUNCATE ... RESTART
        // IDENTITY` keeps the OID and is not told apart (the README says so).
        let mapping = &self.mapping;
        if mapping.event_id == mapping.id && progress.table_oid != outbox.table_oid() {
            warn!(
                shard = producer.shard,
                "the shard's last committed batch was claimed from another table of this name; not marking its rows"
            );
            return Ok(());
        }
        let rows: Vec<RowRef> = progress
            .rows
            .iter()
            .map(|row| RowRef { id: RowId::from(row.id.clone()), event_id: row.event_id.clone() })
            .collect();
        match outbox.mark_published(&rows).await {
            Ok(marked) => {
                if marked > 0 {
                    info!(
                        shard = producer.shard,
                        rows = marked,
                        "marked the rows of the shard's last committed batch, which were not marked yet"
                    );
                }
                Ok(())
            }
            Err(e) => Err(self.outage(format!("marking the shard's last committed batch: {e}")).await),
        }
    }

    /// Waits out an outage met while readying the shards, then starts the next turn.
    async fn outage(&self, what: String) -> Cut {
        let delay = self.config.relay.backoff_initial.max(Duration::from_secs(1));
        warn!(error = %what, retry_in = ?delay, "exactly-once delivery cannot start a shard yet; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.shutdown.requested() => {}
        }
        Cut::NextTurn
    }

    /// Produces `records` (of rows `rows`, shards `shards`, in the batch's order) in one
    /// transaction per shard, all at once, and returns each record's outcome: acknowledged only
    /// if its transaction committed.
    pub(super) async fn deliver_in_transactions(
        &self,
        tx: &mut Transactions,
        table_oid: u32,
        records: &[Record],
        rows: &[RowRef],
        shards: &[i32],
    ) -> Published {
        let mut outcomes = vec![Outcome::Deferred; records.len()];
        let mut by_shard: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
        for (index, shard) in shards.iter().enumerate() {
            by_shard.entry(*shard).or_default().push(index);
        }
        let Some((database, table)) = tx.names.clone() else {
            return Published { outcomes, unacknowledged: Vec::new() };
        };
        let Transactions { topic, producers, .. } = tx;
        let topic = &*topic;
        let work = producers.iter_mut().filter_map(|(shard, producer)| {
            let indices = by_shard.remove(shard)?;
            let progress = Progress {
                format: crate::kafka::progress::FORMAT,
                database: database.clone(),
                table: table.clone(),
                table_oid,
                shard: *shard,
                rows: Vec::new(),
            };
            Some(async move {
                let records: Vec<Record> = indices.iter().map(|i| records[*i].clone()).collect();
                let rows: Vec<RowRef> = indices.iter().map(|i| rows[*i].clone()).collect();
                let (outcomes, ended) = self.one_transaction(producer, topic, &records, &rows, progress).await;
                (indices, outcomes, ended, *shard)
            })
        });
        let results = futures::future::join_all(work).await;
        for (indices, shard_outcomes, ended, shard) in results {
            for (index, outcome) in indices.into_iter().zip(shard_outcomes) {
                outcomes[index] = outcome;
            }
            if let Ended::ProducerGone = ended {
                producers.remove(&shard);
            }
        }
        // Rows of a shard without a producer (it was dropped this turn) wait for the next batch.
        Published { outcomes, unacknowledged: Vec::new() }
    }

    /// One shard's transaction: its records, then its progress record, then the commit. Returns
    /// each record's outcome (acknowledged only if committed) and how the transaction ended.
    async fn one_transaction(
        &self,
        producer: &mut ShardProducer,
        topic: &ProgressTopic,
        records: &[Record],
        rows: &[RowRef],
        mut progress: Progress,
    ) -> (Vec<Outcome>, Ended) {
        let deferred = || vec![Outcome::Deferred; records.len()];
        if let Err(e) = producer.begin() {
            warn!(shard = producer.shard, error = %e, "could not begin a transaction");
            return (deferred(), ended_by(&e));
        }
        // The progress record goes out with the records, naming all of them, rather than after
        // their acknowledgements: a round trip less per transaction. Should some record not be
        // sent after all (a row refused before sending), a second progress record names only
        // those acknowledged; the reader takes the last one of the shard, and the commit makes
        // both visible at once or neither.
        progress.rows = progress_rows(rows, 0..rows.len());
        let announced = producer.send_progress(topic, &progress);
        let published = producer.publisher.publish(records, self.config.relay.stalled_partition_after).await;
        let outcomes = published.outcomes;
        let acked: Vec<usize> = (0..outcomes.len()).filter(|i| matches!(outcomes[*i], Outcome::Acked { .. })).collect();
        let all_reported = !outcomes.iter().any(|o| matches!(o, Outcome::StillInFlight));
        let committed = match announced {
            Err(e) => Err(e),
            Ok(_) if acked.is_empty() || !all_reported => {
                Err(TransactionError::Abortable("records of the batch were not acknowledged".to_owned()))
            }
            Ok(announced) => {
                // The crash tests stop the process here, with the shard's records written in an
                // open transaction, and the fencing tests freeze it here.
                fail::fail_point!("relay-before-commit", |_| std::process::abort());
                let mut progress_records = vec![announced];
                if acked.len() < records.len() {
                    progress.rows = progress_rows(rows, acked.iter().copied());
                    match producer.send_progress(topic, &progress) {
                        Ok(corrected) => progress_records.push(corrected),
                        Err(e) => return self.abort(producer, outcomes, e, &acked).await,
                    }
                }
                self.commit_with_progress(producer, progress_records).await
            }
        };
        match committed {
            Ok(()) => {
                self.metrics.transactions.with_label_values(&["committed"]).inc();
                (outcomes, Ended::Committed)
            }
            Err(e) => self.abort(producer, outcomes, e, &acked).await,
        }
    }

    /// Ends a transaction that cannot commit: aborts it, or, when the producer is fenced or
    /// failed, leaves it to the producer's successor. No row of it is acknowledged.
    async fn abort(
        &self,
        producer: &mut ShardProducer,
        mut outcomes: Vec<Outcome>,
        error: TransactionError,
        acked: &[usize],
    ) -> (Vec<Outcome>, Ended) {
        self.metrics.transactions.with_label_values(&["aborted"]).inc();
        let deferred = vec![Outcome::Deferred; outcomes.len()];
        if let TransactionError::Fenced(_) | TransactionError::Fatal(_) = error {
            warn!(shard = producer.shard, error = %error, "the shard's producer can no longer write; its batch goes out again");
            return (deferred, Ended::ProducerGone);
        }
        if !acked.is_empty() || outcomes.iter().any(|o| matches!(o, Outcome::StillInFlight)) {
            warn!(shard = producer.shard, error = %error, "aborting the shard's transaction; its rows go out again");
        }
        if let Err(abort) = producer.abort(TRANSACTION_STEP_TIMEOUT).await {
            warn!(shard = producer.shard, error = %abort, "could not abort the transaction; starting the shard again");
            return (deferred, Ended::ProducerGone);
        }
        charge_only_own_failures(&mut outcomes);
        (outcomes, Ended::Aborted)
    }

    /// Awaits the progress records, then commits, retrying a commit that timed out.
    async fn commit_with_progress(
        &self,
        producer: &mut ShardProducer,
        progress_records: Vec<rdkafka::producer::DeliveryFuture>,
    ) -> Result<(), TransactionError> {
        for delivery in progress_records {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    return Err(TransactionError::Abortable(format!("the progress record was not written: {e}")));
                }
                Err(_) => {
                    return Err(TransactionError::Abortable("the producer closed before the progress record".into()));
                }
            }
        }
        let started = Instant::now();
        loop {
            match producer.commit(TRANSACTION_STEP_TIMEOUT).await {
                Ok(()) => {
                    self.metrics.transaction_commit.observe(started.elapsed().as_secs_f64());
                    return Ok(());
                }
                Err(TransactionError::Retriable(e)) if !self.shutdown.is_requested() => {
                    warn!(shard = producer.shard, error = %e, "the commit did not complete yet; trying again");
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The progress rows of `rows` at `indices`.
fn progress_rows(rows: &[RowRef], indices: impl IntoIterator<Item = usize>) -> Vec<ProgressRow> {
    indices
        .into_iter()
        .map(|i| ProgressRow { id: rows[i].id.to_string(), event_id: rows[i].event_id.clone() })
        .collect()
}

fn ended_by(error: &TransactionError) -> Ended {
    match error {
        TransactionError::Fenced(_) | TransactionError::Fatal(_) => Ended::ProducerGone,
        _ => Ended::Aborted,
    }
}

/// The outcomes of an aborted transaction's records: nothing of it is visible, so no row is
/// acknowledged; a row is charged only for a failure of its own. The broker refuses whole
/// record batches (one record too large fails every record batched with it) and, in a
/// transaction, a record cannot be sent again alone to find which: of the records refused
/// together only the first is charged. The others go out again uncharged; should the culprit
/// be among them, the next transaction charges it.
fn charge_only_own_failures(outcomes: &mut [Outcome]) {
    let batch_refusal = |o: &Outcome| matches!(o, Outcome::Failed(f) if !f.transient && matches!(f.reason, "message_too_large" | "invalid_record"));
    let mut charged_a_batch_refusal = false;
    for outcome in outcomes.iter_mut() {
        let keep = match &*outcome {
            Outcome::Failed(f) if !f.transient => {
                if batch_refusal(outcome) {
                    !std::mem::replace(&mut charged_a_batch_refusal, true)
                } else {
                    true
                }
            }
            _ => false,
        };
        if !keep {
            *outcome = Outcome::Deferred;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::delivery::DeliveryError;
    use std::time::SystemTime;

    fn failed(reason: &'static str, transient: bool) -> Outcome {
        Outcome::Failed(DeliveryError { reason, message: reason.to_owned(), transient, producer_unusable: false })
    }

    #[test]
    fn an_aborted_transaction_acknowledges_nothing_and_charges_a_batch_refusal_once() {
        let mut outcomes = vec![
            Outcome::Acked { at: SystemTime::now() },
            failed("message_too_large", false),
            failed("message_too_large", false),
            failed("unknown_topic", false),
            failed("other", true),
            Outcome::StillInFlight,
        ];
        charge_only_own_failures(&mut outcomes);
        let charged: Vec<bool> = outcomes.iter().map(|o| matches!(o, Outcome::Failed(_))).collect();
        assert_eq!(charged, [false, true, false, true, false, false]);
    }
}
