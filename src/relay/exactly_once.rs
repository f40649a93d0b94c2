//! Exactly-once batches (`kafka.delivery = "exactly_once"`): a batch goes out in one Kafka
//! transaction of the relay's producer, with a progress record for each shard it has rows of,
//! and is marked after the commit; a shard's rows go out only once the producer its progress
//! records name is fenced, its committed rows marked, and a record naming this relay's producer
//! committed.
//!
//! Why a `read_committed` consumer sees each row once, whatever crashes, takeovers and broker
//! failures interleave (the README gives the long form):
//! - a shard is taken ([`Relay::ready_transactions`]) by starting a producer with the shard's
//!   own transactional id (which fences any other relay still taking it); fencing every
//!   producer its latest progress records name (read as written, committed or not, and as
//!   committed), which ends their open transactions (aborted, or their commit completed) and
//!   stops them writing; then reading its latest committed record and marking the rows it
//!   names; then committing, with the shard's own producer, a record naming this relay's
//!   producer its owner. Its rows go out only after: so the latest record of a shard always
//!   names the one producer that may hold its rows in an open transaction, and the next owner
//!   fences it. A producer is never reused once fenced: a new one has a new transactional id
//!   and takes every shard again;
//! - a transaction either commits with its records and the progress records naming their rows,
//!   or shows none of them: aborted records stay unpublished in the table and go out again;
//! - a committed batch is marked after the commit, while the next batch's transaction runs; the
//!   next transaction's progress records name both batches' rows, and nothing is claimed for
//!   the one after until the mark is written (`synchronous_commit = on`), so a shard's latest
//!   committed record always names every row of it committed and perhaps not marked: a crash (of
//!   the relay, or of PostgreSQL before the mark reached its WAL) is repaired by the next owner.
//!
//! A record the broker refuses fails the transaction's commit: the transaction is aborted,
//! the row whose own error it was is charged an attempt (it then waits out its backoff and goes
//! out alone for its key, and is given up after `relay.max_attempts`), and the other rows go out
//! again in the next transaction, not charged. A partition that stalls the transaction (no
//! report for `relay.stalled_partition_after`) aborts it too, and its keys are held out of the
//! next claims ([`super::transaction_stalls`]) so that the other rows go on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::error::RDKafkaErrorCode;
use tracing::{info, warn};

use super::transaction_stalls::{StalledRecord, TransactionStalls};
use super::{Cut, Relay, RelayError};
use crate::kafka::delivery::Outcome;
use crate::kafka::progress::{Isolation, Progress, ProgressRow, ProgressTopic, ReadError};
use crate::kafka::publisher::{Published, PublisherError};
use crate::kafka::record::Record;
use crate::kafka::transactions::{StartError, TransactionError, TransactionalProducer, fence};
use crate::postgres::outbox::Outbox;
use crate::postgres::row::{RowId, RowRef};
use crate::service::health::Health;
use crate::service::metrics::Metrics;

/// How long one commit or abort may wait for the cluster before it is tried again.
const TRANSACTION_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the background fencing of a dropped producer waits for its transaction's abort to
/// complete ([`Relay::fence_in_background`]): the broker's default transaction timeout.
const ABANDONED_ABORT_WAIT: Duration = Duration::from_secs(60);

/// How long `init_transactions` may wait once the relay has run a transaction: a cluster that
/// does not answer then is an outage, waited out.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times the shards' committed records are read again after fencing a producer they
/// named that the records as written did not: fencing completes a commit under way, which may
/// then be the latest.
const FENCING_ROUNDS: usize = 3;

/// The transactional side of the loop: the progress topic, the relay's producer, and the
/// shards taken for it.
pub(super) struct Transactions {
    topic: ProgressTopic,
    /// The relay's producer; `None` before the first turn and after it was fenced or failed.
    producer: Option<TransactionalProducer>,
    /// The shards taken for the producer: the producers their progress records named are
    /// fenced, the rows those records named are marked, and a record naming this producer is
    /// committed. Only these shards' rows are produced.
    taken: BTreeSet<i32>,
    /// The database and the table, as progress records name them; read at the first connection.
    names: Option<(String, String)>,
    /// The PostgreSQL server's system identifier, as progress records name it; read with the
    /// names, empty when the server would not tell.
    server: String,
    /// Whether a producer ever started: until then the cluster's refusal is a configuration
    /// problem (a broker without transactions), after it an outage.
    ever_started: bool,
    /// The rows, by shard, of the last transaction committed: their mark runs while the next
    /// transaction does, so its progress records name them too.
    last_committed: BTreeMap<i32, Vec<ProgressRow>>,
    /// Keys held back after their partition stalled a transaction.
    stalls: TransactionStalls,
    /// Producers this relay replaced after aborting their transaction itself (or giving up on
    /// an abort of one it never asked to commit): nothing they wrote can commit any more, so a
    /// take need not fence them. Fencing one would wait until
    /// its abort completes, which, when its records went to a partition the broker cannot write
    /// (the stall that made the relay abort), is as long as that partition stays unwritable.
    retired: BTreeSet<String>,
}

impl Transactions {
    /// Checks the progress topic (it exists and is compacted); `None` with at-least-once
    /// delivery.
    pub(super) async fn start(config: &crate::config::Config) -> Result<Option<Transactions>, RelayError> {
        if config.kafka.delivery != crate::config::Delivery::ExactlyOnce {
            return Ok(None);
        }
        let name = config.kafka.exactly_once.progress_topic.clone();
        let stalled_after = config.relay.stalled_partition_after;
        let config = config.clone();
        let topic = tokio::task::spawn_blocking(move || ProgressTopic::check(&config))
            .await
            .map_err(|e| PublisherError::ProgressTopicUnreadable { topic: name, error: e.to_string() })??;
        Ok(Some(Transactions {
            topic,
            producer: None,
            taken: BTreeSet::new(),
            names: None,
            server: String::new(),
            ever_started: false,
            last_committed: BTreeMap::new(),
            stalls: TransactionStalls::new(stalled_after),
            retired: BTreeSet::new(),
        }))
    }

    /// Forgets the shards taken: their locks went with the database session, and a shard
    /// locked again must be taken again (another relay may have written it meanwhile).
    pub(super) fn forget(&mut self) {
        self.taken.clear();
    }

    /// Aborts the open transaction (at shutdown, when the grace period cut a batch short):
    /// never left for the broker's transaction timeout, which would hold back `read_committed`
    /// consumers of its partitions until then.
    pub(super) async fn abort_open(&mut self) {
        if let Some(producer) = self.producer.as_mut().filter(|p| p.is_open())
            && let Err(e) = producer.abort(TRANSACTION_STEP_TIMEOUT).await
        {
            warn!(transactional_id = %producer.transactional_id, error = %e, "could not abort the open transaction at shutdown");
        }
    }

    /// The rows and keys held back after a partition stalled a transaction, to leave out of
    /// the next claim; reported to the operator.
    pub(super) fn held(&mut self, metrics: &Metrics, health: &Health) -> (Vec<RowId>, Vec<String>) {
        let held = self.stalls.held(Instant::now());
        self.stalls.report(metrics, health);
        held
    }

    /// The key of `shard`'s progress records.
    fn key(&self, config: &crate::config::Config, shard: i32) -> Option<String> {
        let (database, table) = self.names.as_ref()?;
        Some(config.kafka.exactly_once.progress_key(database, table, shard))
    }
}

/// How a transaction ended.
enum Ended {
    /// Committed; the rows of each shard it committed.
    Committed(BTreeMap<i32, Vec<ProgressRow>>),
    Aborted,
    /// The producer is fenced or failed: it is dropped, and a new one takes the shards again
    /// before the next batch.
    ProducerGone,
    /// Aborted, or never asked to commit and so bound to end aborted, and the producer is
    /// replaced ([`Relay::abort`] says why): as [`Ended::ProducerGone`], but the producer needs
    /// no fencing. `abort_pending`: the abort did not complete, and the coordinator is to be
    /// asked to abort the transaction by fencing the producer in the background.
    ProducerRetired {
        abort_pending: bool,
    },
}

impl Relay {
    /// Makes the relay ready for transactions on every shard held, before anything is claimed:
    /// starts a producer if there is none, and takes each shard not taken yet for it.
    pub(super) async fn ready_transactions(
        &self,
        tx: &mut Transactions,
        outbox: &Outbox,
        owned: &[i32],
    ) -> Result<(), Cut> {
        tx.taken.retain(|shard| owned.contains(shard));
        tx.last_committed.retain(|shard, _| owned.contains(shard));
        if tx.producer.is_some() && owned.iter().all(|shard| tx.taken.contains(shard)) {
            return Ok(());
        }
        if tx.names.is_none() {
            match outbox.database_and_table().await {
                Ok(names) => tx.names = Some(names),
                Err(e) => return Err(self.outage(format!("reading the database's name: {e}")).await),
            }
            match outbox.server_identifier().await {
                Ok(server) => tx.server = server,
                Err(e) => warn!(
                    error = %e,
                    "cannot read the PostgreSQL server's system identifier: the progress records will not name it, and \
                     a relay of another server with databases and tables of the same names is not told apart"
                ),
            }
        }
        let Some((database, table)) = tx.names.clone() else { return Err(Cut::NextTurn) };
        let new_producer = tx.producer.is_none();
        if new_producer {
            // A new producer writes no shard before a record naming it is committed there.
            tx.taken.clear();
            let producer = self.start_producer(&database, &table, tx.ever_started).await?;
            info!(transactional_id = %producer.transactional_id, "started the transactional producer");
            tx.ever_started = true;
            tx.producer = Some(producer);
        }
        let missing: Vec<i32> = owned.iter().copied().filter(|s| !tx.taken.contains(s)).collect();
        self.take_shards(tx, outbox, &missing).await?;
        tx.taken.extend(missing);
        if new_producer {
            // Every shard held now names the new producer: none names a retired one.
            tx.retired.clear();
        }
        Ok(())
    }

    /// Starts a producer with a new transactional id.
    async fn start_producer(
        &self,
        database: &str,
        table: &str,
        ever_started: bool,
    ) -> Result<TransactionalProducer, Cut> {
        let transactional_id = self.config.kafka.exactly_once.transactional_id(database, table);
        let within = if ever_started { INIT_TIMEOUT } else { self.config.kafka.startup_timeout };
        let started = TransactionalProducer::start(
            &self.config,
            self.metrics.clone(),
            self.health.clone(),
            transactional_id,
            within,
        )
        .await;
        match started {
            Ok(producer) => Ok(producer),
            Err(e) => Err(self.start_failed(e, ever_started).await),
        }
    }

    /// What a producer that could not start (or fence another) means: a configuration problem
    /// before any producer started, or one the cluster says is permanent; an outage otherwise.
    async fn start_failed(&self, error: StartError, ever_started: bool) -> Cut {
        match error {
            StartError::Create(e) => Cut::Fail(e.into()),
            StartError::Init {
                transactional_id,
                error,
                code: Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed),
            } => {
                let prefix = self.config.kafka.exactly_once.transactional_id_prefix.clone();
                Cut::Fail(PublisherError::TransactionalIdRefused { transactional_id, prefix, error }.into())
            }
            StartError::Init { error, .. } if !ever_started => {
                Cut::Fail(PublisherError::TransactionsRefused { error }.into())
            }
            e if e.is_permanent() => Cut::Fail(PublisherError::TransactionsRefused { error: e.to_string() }.into()),
            e => self.outage(e.to_string()).await,
        }
    }

    /// Takes `shards` for the relay's producer: fences the producers their progress records
    /// name, marks the rows their latest committed records name (which a crash may have left
    /// unmarked), and commits a record for each naming this relay's producer.
    async fn take_shards(&self, tx: &mut Transactions, outbox: &Outbox, shards: &[i32]) -> Result<(), Cut> {
        if shards.is_empty() {
            return Ok(());
        }
        let Some(own_id) = tx.producer.as_ref().map(|p| p.transactional_id.clone()) else { return Err(Cut::NextTurn) };
        let keys: BTreeMap<String, i32> =
            shards.iter().filter_map(|&shard| Some((tx.key(&self.config, shard)?, shard))).collect();
        let key_list: Vec<String> = keys.keys().cloned().collect();
        // Each shard's own transactional id (its progress key) first: its `init_transactions`
        // fences a relay still taking the shard, one whose database session (and with it the
        // shard's lock) ended meanwhile. Its record naming its producer could otherwise commit
        // after this relay's and be the shard's latest, naming a producer that never writes
        // the shard rather than this relay's, which the next owner would then not fence.
        let takers = self.start_takers(&keys).await?;
        // The records as written name the last producer to write each shard, even one whose
        // transaction is open (frozen, or killed) and holds back a committed read.
        let written = self.read_progress(tx, &key_list, Isolation::ReadUncommitted).await?;
        // The shards' own ids are fenced already, by the takers' start (a record of format 1
        // names one: its producer per shard had the key as its id), and the producers this
        // relay retired after aborting need no fencing.
        let mut fenced: BTreeSet<String> = key_list.iter().cloned().collect();
        fenced.extend(tx.retired.iter().cloned());
        self.fence_owners(&written, &own_id, &mut fenced).await?;
        let mut committed = self.read_progress(tx, &key_list, Isolation::ReadCommitted).await?;
        for _ in 0..FENCING_ROUNDS {
            let before = fenced.len();
            self.fence_owners(&committed, &own_id, &mut fenced).await?;
            if fenced.len() == before {
                break;
            }
            committed = self.read_progress(tx, &key_list, Isolation::ReadCommitted).await?;
        }
        self.repair(tx, outbox, &keys, &committed).await?;
        // The takeover tests hold a relay here while another takes its shards.
        if let Some(ms) = super::failpoints::millis("relay-before-taking-ownership") {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        self.claim_ownership(tx, takers, &own_id).await
    }

    /// Starts a producer with each shard's progress key as its transactional id, all at once.
    async fn start_takers(&self, keys: &BTreeMap<String, i32>) -> Result<Vec<(i32, TransactionalProducer)>, Cut> {
        let within = INIT_TIMEOUT.max(self.config.kafka.startup_timeout);
        let started = futures::future::join_all(keys.iter().map(|(key, &shard)| async move {
            let taker = TransactionalProducer::start(
                &self.config,
                self.metrics.clone(),
                self.health.clone(),
                key.clone(),
                within,
            )
            .await;
            taker.map(|taker| (shard, taker))
        }))
        .await;
        let mut takers = Vec::with_capacity(started.len());
        for taker in started {
            match taker {
                Ok(taker) => takers.push(taker),
                Err(e) => return Err(self.start_failed(e, true).await),
            }
        }
        Ok(takers)
    }

    /// Reads the latest progress records of `keys` as `isolation` sees them.
    async fn read_progress(
        &self,
        tx: &Transactions,
        keys: &[String],
        isolation: Isolation,
    ) -> Result<HashMap<String, Progress>, Cut> {
        let (config, topic, keys) = (self.config.clone(), tx.topic.clone(), keys.to_vec());
        let within = self.config.kafka.startup_timeout;
        let read = tokio::task::spawn_blocking(move || topic.read_latest_of(&config, &keys, isolation, within))
            .await
            .unwrap_or_else(|e| Err(ReadError::Failed(e.to_string())));
        match read {
            Ok(latest) => Ok(latest),
            Err(ReadError::Refused(error)) => {
                Err(Cut::Fail(PublisherError::ProgressTopicRefused { topic: tx.topic.name.clone(), error }.into()))
            }
            Err(e) => Err(self.outage(format!("reading the progress topic: {e}")).await),
        }
    }

    /// Fences every producer `latest` names but this relay's own and those in `fenced`, all at
    /// once, and adds them to `fenced`.
    async fn fence_owners(
        &self,
        latest: &HashMap<String, Progress>,
        own_id: &str,
        fenced: &mut BTreeSet<String>,
    ) -> Result<(), Cut> {
        let owners: BTreeSet<&str> = latest
            .values()
            .map(|p| p.owner.as_str())
            .filter(|owner| !owner.is_empty() && *owner != own_id && !fenced.contains(*owner))
            .collect();
        let within = INIT_TIMEOUT.max(self.config.kafka.startup_timeout);
        let results = futures::future::join_all(owners.iter().map(|owner| fence(&self.config, owner, within))).await;
        for (owner, result) in owners.iter().zip(results) {
            match result {
                Ok(()) => {
                    info!(transactional_id = %owner, "fenced the producer that wrote a shard before");
                    fenced.insert((*owner).to_owned());
                }
                Err(e) => return Err(self.start_failed(e, true).await),
            }
        }
        Ok(())
    }

    /// Marks the rows the shards' latest committed records name, once their producers are
    /// fenced.
    async fn repair(
        &self,
        tx: &Transactions,
        outbox: &Outbox,
        keys: &BTreeMap<String, i32>,
        committed: &HashMap<String, Progress>,
    ) -> Result<(), Cut> {
        let Some((database, table)) = tx.names.as_ref() else { return Err(Cut::NextTurn) };
        let mut rows: Vec<RowRef> = Vec::new();
        for (key, &shard) in keys {
            let Some(progress) = committed.get(key) else { continue };
            if progress.database != *database || progress.table != *table || progress.shard != shard {
                return Err(Cut::Fail(
                    PublisherError::ProgressKeyTaken {
                        key: key.clone(),
                        other: format!(
                            "the relay of table {} in database {} (shard {})",
                            progress.table, progress.database, progress.shard
                        ),
                    }
                    .into(),
                ));
            }
            // Another server's database and table of the same names: its rows are not this
            // table's, whatever their ids, and its relays and this one would fence each other.
            if !progress.server.is_empty() && !tx.server.is_empty() && progress.server != tx.server {
                return Err(Cut::Fail(
                    PublisherError::ProgressKeyTaken {
                        key: key.clone(),
                        other: format!(
                            "the relay of table {} in database {} of another PostgreSQL server (system identifier {}, \
                             this one's is {}; a database restored from a dump to a new server is another server too)",
                            progress.table, progress.database, progress.server, tx.server
                        ),
                    }
                    .into(),
                ));
            }
            // Where the event id is the row id itself, nothing tells a row from one that took
            // its id since in a table that replaced this one (renamed and recreated, restored):
            // the batch is repaired only in the table of the OID it was claimed from. A
            // `TRUNCATE ... RESTART IDENTITY` keeps the OID and is not told apart (the README
            // says so).
            let mapping = &self.mapping;
            if mapping.event_id == mapping.id && !progress.rows.is_empty() && progress.table_oid != outbox.table_oid() {
                warn!(
                    shard,
                    "the shard's last committed batch was claimed from another table of this name; not marking its rows"
                );
                continue;
            }
            rows.extend(
                progress
                    .rows
                    .iter()
                    .map(|row| RowRef { id: RowId::from(row.id.clone()), event_id: row.event_id.clone() }),
            );
        }
        match outbox.mark_published(&rows).await {
            Ok(marked) => {
                if marked > 0 {
                    info!(
                        rows = marked,
                        "marked the rows of the shards' last committed batches, which were not marked yet"
                    );
                }
                Ok(())
            }
            Err(e) => Err(self.outage(format!("marking the shards' last committed batches: {e}")).await),
        }
    }

    /// Commits a progress record for each shard naming this relay's producer (`owner`), and no
    /// rows (those named before are marked now), each with the shard's own producer (`takers`),
    /// all at once.
    async fn claim_ownership(
        &self,
        tx: &Transactions,
        takers: Vec<(i32, TransactionalProducer)>,
        owner: &str,
    ) -> Result<(), Cut> {
        let Some((database, table)) = tx.names.clone() else { return Err(Cut::NextTurn) };
        let topic = &tx.topic;
        let claimed = futures::future::join_all(takers.into_iter().map(|(shard, mut taker)| {
            let progress = Progress {
                format: crate::kafka::progress::FORMAT,
                database: database.clone(),
                table: table.clone(),
                table_oid: 0,
                server: tx.server.clone(),
                shard,
                owner: owner.to_owned(),
                rows: Vec::new(),
            };
            async move {
                let key = taker.transactional_id.clone();
                let committed = async {
                    taker.begin()?;
                    let record = taker.send_progress(topic, &key, &progress)?;
                    // The commit before the record's report: a record the transaction cannot
                    // take (the progress topic refuses the relay's principal) is purged unsent,
                    // its report saying only that, and the commit, which librdkafka then refuses
                    // (it commits only a transaction whose every record was written), says why.
                    self.commit(&mut taker).await?;
                    progress_written(record).await
                }
                .await;
                if committed.is_err() {
                    let _ = taker.abort(TRANSACTION_STEP_TIMEOUT).await;
                }
                committed
            }
        }))
        .await;
        let mut first_error = None;
        for result in claimed {
            let outcome = if result.is_ok() { "committed" } else { "aborted" };
            self.metrics.transactions.with_label_values(&[outcome]).inc();
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            None => Ok(()),
            Some(TransactionError::Refused(e)) => {
                let error = format!("writing to it: {e}");
                Err(Cut::Fail(PublisherError::ProgressTopicRefused { topic: topic.name.clone(), error }.into()))
            }
            Some(e) => Err(self.outage(format!("committing the shards' new owner: {e}")).await),
        }
    }

    /// Fences the relay's own producer `transactional_id`, dropped with its transaction open,
    /// without waiting: its `init_transactions` makes the coordinator abort that transaction
    /// now, and returns only once every partition the transaction wrote has its marker, which a
    /// stalled partition may hold back for long.
    fn fence_in_background(&self, transactional_id: String) {
        let config = self.config.clone();
        tokio::spawn(async move {
            match fence(&config, &transactional_id, ABANDONED_ABORT_WAIT).await {
                Ok(()) => info!(transactional_id, "the transaction left open by a dropped producer is aborted"),
                Err(e) => warn!(
                    transactional_id,
                    error = %e,
                    "fencing a dropped producer did not complete; the broker aborts its transaction at its timeout"
                ),
            }
        });
    }

    /// Waits out an outage met while readying the shards, then starts the next turn.
    async fn outage(&self, what: String) -> Cut {
        let delay = self.config.relay.backoff_initial.max(Duration::from_secs(1));
        warn!(error = %what, retry_in = ?delay, "exactly-once delivery cannot take its shards yet; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.shutdown.requested() => {}
        }
        Cut::NextTurn
    }

    /// Produces `records` (of rows `rows`, shards `shards`, in the batch's order) in one
    /// transaction, and returns each record's outcome: acknowledged only if the transaction
    /// committed. Rows of a shard not taken wait.
    pub(super) async fn deliver_in_transaction(
        &self,
        tx: &mut Transactions,
        table_oid: u32,
        records: &[Record],
        rows: &[RowRef],
        shards: &[i32],
    ) -> Published {
        let mut outcomes = vec![Outcome::Deferred; records.len()];
        let chosen: Vec<usize> = (0..records.len()).filter(|&i| tx.taken.contains(&shards[i])).collect();
        let keys: BTreeMap<i32, String> =
            chosen.iter().filter_map(|&i| Some((shards[i], tx.key(&self.config, shards[i])?))).collect();
        let Some((database, table)) = tx.names.clone() else {
            return Published { outcomes, unacknowledged: Vec::new() };
        };
        let Transactions { topic, producer, last_committed, stalls, retired, server, .. } = tx;
        let Some(producer_ref) = producer.as_mut() else {
            return Published { outcomes, unacknowledged: Vec::new() };
        };
        if chosen.is_empty() {
            return Published { outcomes, unacknowledged: Vec::new() };
        }
        let batch = Batch {
            records: chosen.iter().map(|&i| records[i].clone()).collect(),
            rows: chosen.iter().map(|&i| rows[i].clone()).collect(),
            shards: chosen.iter().map(|&i| shards[i]).collect(),
            keys,
            carried: last_committed,
            template: Progress {
                format: crate::kafka::progress::FORMAT,
                database,
                table,
                table_oid,
                server: server.clone(),
                shard: 0,
                owner: producer_ref.transactional_id.clone(),
                rows: Vec::new(),
            },
        };
        let (batch_outcomes, ended, stalled) = self.one_transaction(producer_ref, topic, &batch).await;
        for (&index, outcome) in chosen.iter().zip(batch_outcomes) {
            outcomes[index] = outcome;
        }
        let stalled: Vec<StalledRecord> = stalled
            .into_iter()
            .map(|i| StalledRecord {
                row: batch.rows[i].id.clone(),
                key: batch.records[i].key.clone(),
                topic: batch.records[i].topic.clone(),
                partition: producer_ref.publisher.partition_of(&batch.records[i]),
            })
            .collect();
        stalls.hold(stalled, Instant::now());
        match ended {
            Ended::Committed(rows) => {
                // Lazy: the partitions written are worked out only while some partition is held.
                let publisher = &producer_ref.publisher;
                let written = chosen
                    .iter()
                    .enumerate()
                    .filter(|(_, index)| matches!(outcomes[**index], Outcome::Acked { .. }))
                    .filter_map(|(i, _)| {
                        let record = &batch.records[i];
                        Some((record.topic.as_str(), publisher.partition_of(record)?))
                    });
                stalls.committed(written);
                *last_committed = rows;
            }
            Ended::Aborted => {}
            Ended::ProducerGone => *producer = None,
            Ended::ProducerRetired { abort_pending } => {
                if let Some(replaced) = producer.take() {
                    let id = replaced.transactional_id.clone();
                    // Dropped first: its records in flight are purged, and it sends nothing more.
                    drop(replaced);
                    if abort_pending {
                        self.fence_in_background(id.clone());
                    }
                    retired.insert(id);
                }
            }
        }
        Published { outcomes, unacknowledged: Vec::new() }
    }

    /// One transaction: the progress records, the records, then the commit. Returns each
    /// record's outcome (acknowledged only if committed) and how the transaction ended.
    async fn one_transaction(
        &self,
        producer: &mut TransactionalProducer,
        topic: &ProgressTopic,
        batch: &Batch<'_>,
    ) -> (Vec<Outcome>, Ended, Vec<usize>) {
        let deferred = || vec![Outcome::Deferred; batch.records.len()];
        if let Err(e) = producer.begin() {
            warn!(transactional_id = %producer.transactional_id, error = %e, "could not begin a transaction");
            return (deferred(), ended_by(&e), Vec::new());
        }
        // The progress records go out with the records, naming all of them, rather than after
        // their acknowledgements: a round trip less per transaction. Should some record not be
        // sent after all (a row refused before sending), a second progress record of its shard
        // names only those acknowledged; the reader takes the last one of the shard, and the
        // commit makes both visible at once or neither.
        let mut progress_records = Vec::with_capacity(batch.keys.len());
        for (&shard, key) in &batch.keys {
            match producer.send_progress(topic, key, &batch.progress(shard, |_| true)) {
                Ok(announced) => progress_records.push(announced),
                Err(e) => return with_no_stall(self.abort(producer, deferred(), e, &[]).await),
            }
        }
        let published = producer.publisher.publish(&batch.records, self.config.relay.stalled_partition_after).await;
        let outcomes = published.outcomes;
        let acked: Vec<usize> = (0..outcomes.len()).filter(|i| matches!(outcomes[*i], Outcome::Acked { .. })).collect();
        let all_reported = !outcomes.iter().any(|o| matches!(o, Outcome::StillInFlight));
        if acked.is_empty() || !all_reported {
            // Records still unacknowledged after relay.stalled_partition_after: their keys are
            // held back, so that the next transactions carry the other rows.
            let stalled: Vec<usize> =
                (0..outcomes.len()).filter(|&i| matches!(outcomes[i], Outcome::StillInFlight)).collect();
            let e = TransactionError::Abortable("records of the batch were not acknowledged".to_owned());
            let (outcomes, ended) = self.abort(producer, outcomes, e, &acked).await;
            return (outcomes, ended, stalled);
        }
        // The crash tests stop the process here, with the batch's records written in an open
        // transaction, and the fencing tests freeze it here.
        fail::fail_point!("relay-before-commit", |_| std::process::abort());
        // The shutdown tests hold the transaction open here, as a slow broker would.
        if let Some(ms) = super::failpoints::millis("relay-delay-commit") {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if acked.len() < batch.records.len() {
            let is_acked = |i: usize| matches!(outcomes[i], Outcome::Acked { .. });
            let short: BTreeSet<i32> = (0..outcomes.len()).filter(|&i| !is_acked(i)).map(|i| batch.shards[i]).collect();
            for (shard, key) in batch.keys.iter().filter(|(shard, _)| short.contains(shard)) {
                match producer.send_progress(topic, key, &batch.progress(*shard, is_acked)) {
                    Ok(corrected) => progress_records.push(corrected),
                    Err(e) => return with_no_stall(self.abort(producer, outcomes, e, &acked).await),
                }
            }
        }
        match self.commit_with_progress(producer, progress_records).await {
            Ok(()) => {
                self.metrics.transactions.with_label_values(&["committed"]).inc();
                // A record is delivered when consumers reading committed data can see it: at the
                // commit, not at its acknowledgement (`published_at`, the latency metric).
                let committed_at = SystemTime::now();
                let mut outcomes = outcomes;
                for outcome in &mut outcomes {
                    if let Outcome::Acked { at } = outcome {
                        *at = committed_at;
                    }
                }
                let mut committed: BTreeMap<i32, Vec<ProgressRow>> = BTreeMap::new();
                for &i in &acked {
                    committed.entry(batch.shards[i]).or_default().push(progress_row(&batch.rows[i]));
                }
                (outcomes, Ended::Committed(committed), Vec::new())
            }
            Err(e) => with_no_stall(self.abort(producer, outcomes, e, &acked).await),
        }
    }

    /// Ends a transaction that cannot commit: aborts it, or, when the producer is fenced or
    /// failed, leaves it to the next owners of its shards. No row of it is acknowledged.
    async fn abort(
        &self,
        producer: &mut TransactionalProducer,
        mut outcomes: Vec<Outcome>,
        error: TransactionError,
        acked: &[usize],
    ) -> (Vec<Outcome>, Ended) {
        self.metrics.transactions.with_label_values(&["aborted"]).inc();
        let deferred = vec![Outcome::Deferred; outcomes.len()];
        let id = &producer.transactional_id;
        if let TransactionError::Fenced(_) | TransactionError::Fatal(_) = error {
            warn!(transactional_id = %id, error = %error, "the producer can no longer write; its batch goes out again");
            return (deferred, Ended::ProducerGone);
        }
        if !acked.is_empty() || outcomes.iter().any(|o| matches!(o, Outcome::StillInFlight)) {
            warn!(transactional_id = %id, error = %error, "aborting the transaction; its rows go out again");
        }
        // Records whose fate the producer does not know (in flight when the transaction was
        // abandoned, or failed in a way that may have left them written) may sit in the log,
        // in this aborted transaction, under their sequence numbers. After the abort librdkafka
        // gives the next records of the partition those same numbers with the same producer id
        // and epoch, and the broker, taking them for retries, answers with the aborted copies'
        // offsets: acknowledged, committed, marked, and never visible. The three-node test
        // lost 260 rows so when a partition's leader was killed. So such a producer is
        // replaced: a new one has a new producer id.
        let uncertain = outcomes
            .iter()
            .any(|o| matches!(o, Outcome::StillInFlight) || matches!(o, Outcome::Failed(f) if f.transient));
        let aborted = producer.abort(TRANSACTION_STEP_TIMEOUT).await;
        charge_only_own_failures(&mut outcomes);
        match aborted {
            // Never asked to commit, the transaction can only end aborted. librdkafka sends the
            // abort only once the records in flight are answered, and a record to a partition
            // that lost its in-sync replicas may wait in the leader until the transaction's
            // timeout. So the producer is dropped, and the coordinator is asked to abort its
            // transaction at once by fencing it, in the background: the markers reach every
            // partition that takes them (the progress topic's among them, which the next take
            // reads) while the stalled one holds its own back.
            Err(abort) if !producer.commit_requested() => {
                warn!(
                    transactional_id = %producer.transactional_id,
                    error = %abort,
                    "could not abort the transaction; starting a new producer, and fencing this one in the background \
                     (its transaction, never committed, ends aborted)"
                );
                (deferred, Ended::ProducerRetired { abort_pending: true })
            }
            Err(abort) => {
                warn!(transactional_id = %producer.transactional_id, error = %abort, "could not abort the transaction; starting a new producer");
                (deferred, Ended::ProducerGone)
            }
            Ok(()) if uncertain => {
                warn!(
                    transactional_id = %producer.transactional_id,
                    "records of the aborted transaction may have been written; starting a new producer, whose records \
                     the broker cannot take for theirs"
                );
                (outcomes, Ended::ProducerRetired { abort_pending: false })
            }
            Ok(()) => (outcomes, Ended::Aborted),
        }
    }

    /// Awaits the progress records, then commits, retrying a commit that timed out.
    async fn commit_with_progress(
        &self,
        producer: &mut TransactionalProducer,
        progress_records: Vec<rdkafka::producer::DeliveryFuture>,
    ) -> Result<(), TransactionError> {
        for delivery in progress_records {
            progress_written(delivery).await?;
        }
        self.commit(producer).await
    }

    /// Commits the open transaction, retrying a commit that timed out.
    async fn commit(&self, producer: &mut TransactionalProducer) -> Result<(), TransactionError> {
        let started = Instant::now();
        loop {
            match producer.commit(TRANSACTION_STEP_TIMEOUT).await {
                Ok(()) => {
                    self.metrics.transaction_commit.observe(started.elapsed().as_secs_f64());
                    return Ok(());
                }
                Err(TransactionError::Retriable(e)) if !self.shutdown.is_requested() => {
                    warn!(transactional_id = %producer.transactional_id, error = %e, "the commit did not complete yet; trying again");
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A batch as one transaction carries it.
struct Batch<'a> {
    records: Vec<Record>,
    rows: Vec<RowRef>,
    /// The shard of each row.
    shards: Vec<i32>,
    /// The progress key of each shard with rows here.
    keys: BTreeMap<i32, String>,
    /// The rows of the last transaction committed, whose mark may be under way.
    carried: &'a BTreeMap<i32, Vec<ProgressRow>>,
    /// The progress record, but its shard and rows.
    template: Progress,
}

impl Batch<'_> {
    /// The progress record of `shard`: its rows here that `include` keeps, and its rows of the
    /// last transaction committed.
    fn progress(&self, shard: i32, include: impl Fn(usize) -> bool) -> Progress {
        let mut rows: Vec<ProgressRow> = (0..self.rows.len())
            .filter(|&i| self.shards[i] == shard && include(i))
            .map(|i| progress_row(&self.rows[i]))
            .collect();
        rows.extend(self.carried.get(&shard).into_iter().flatten().cloned());
        Progress { shard, rows, ..self.template.clone() }
    }
}

/// Whether the progress record of `delivery` was written.
async fn progress_written(delivery: rdkafka::producer::DeliveryFuture) -> Result<(), TransactionError> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(TransactionError::Abortable(format!("the progress record was not written: {e}"))),
        Err(_) => Err(TransactionError::Abortable("the producer closed before the progress record".into())),
    }
}

fn progress_row(row: &RowRef) -> ProgressRow {
    ProgressRow { id: row.id.to_string(), event_id: row.event_id.clone() }
}

/// A transaction's end with no record stalled.
fn with_no_stall((outcomes, ended): (Vec<Outcome>, Ended)) -> (Vec<Outcome>, Ended, Vec<usize>) {
    (outcomes, ended, Vec::new())
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
