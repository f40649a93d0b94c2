//! The loop that joins the table and the producer: claim, produce, await every report, mark.
//!
//! Invariants this loop keeps, and the step that keeps each:
//! - a row is marked published only after its own delivery report said the broker has it
//!   (`Relay::sort_reports` alone puts rows among the acknowledged; `Relay::settle` marks
//!   only those);
//! - a row whose delivery failed is never marked; it records the error and is tried again,
//!   with backoff when the row itself was the cause, until `relay.max_attempts`
//!   (`Relay::settle`);
//! - rows are claimed only from the shards this relay holds, and a shard changes hands only
//!   between batches, so per-key order survives scale-out and takeover (`Relay::write_owed`
//!   writes every outcome owed once a rebalance is due, and `Relay::hold_shards` rebalances
//!   only with nothing set aside);
//! - a batch goes to the producer only if the session holding the shards' locks proved within
//!   [`shards::FENCE`] that it still exists, so a relay that wakes after its shards were taken
//!   over does not publish what it claimed before (`Relay::relay_batch`); and the loop keeps
//!   that session visibly active whatever it waits for ([`shards::with_heartbeat`]), so only a
//!   frozen relay loses it;
//! - a batch is produced only after every row of the batch before it was acknowledged; the
//!   next batch may be claimed while the current one awaits its reports, leaving the rows in
//!   flight out, and is dropped unclaimed if any of them failed; an acknowledged batch is
//!   marked while the next one is produced, and always before anything else is claimed
//!   (`batch::Pending` names these states; `Relay::deliver_overlapping` claims ahead only
//!   after the mark before, `Relay::write_owed` writes an outcome owed before the next claim);
//! - a database or broker outage pauses the loop with capped backoff; it never ends it (every
//!   step that meets one ends the turn with `Relay::pause`);
//! - after a shutdown request no new batch is claimed; the batch in flight is finished
//!   (reports and mark) within the grace period, or left unmarked to be sent again: every wait
//!   of the loop, on the broker or on PostgreSQL, ends with the grace period, the relay's
//!   statement still running is cancelled, and the relay says what it abandoned
//!   (`Relay::finish_at_shutdown`, `Relay::stop`, [`RelayError::Abandoned`]).
//!
//! [`Relay::run`] reads as the pipeline: start, then turns of `Relay::turn` until a step
//! stops the loop. Each step of a turn either hands on to the next or ends the turn early with
//! a `Cut`.

mod batch;
pub mod claim_floor;
mod exactly_once;
mod failpoints;
mod publish;
pub mod quarantine;
pub mod row_failures;
mod settle;
pub mod shards;
pub mod stalled;
mod transaction_stalls;
pub mod wakeup;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use self::batch::{Claiming, Pending, Turn};
use self::claim_floor::ClaimFloor;
use self::exactly_once::Transactions;
use self::publish::Producing;
use self::quarantine::Quarantine;
use self::row_failures::RowFailureReports;
use self::settle::HealthStep;
use self::shards::Shards;
use self::stalled::{SetAside, StalledRecords};
use self::wakeup::{CommitSignal, Wakeup};
use crate::config::Config;
use crate::kafka::client_context::{BrokerRefusal, ClusterUnavailable};
use crate::kafka::publisher::{Publisher, PublisherError};
use crate::postgres::error::OutboxError;
use crate::postgres::layout::Mapping;
use crate::postgres::outbox::{Outbox, StatementCanceller};
use crate::service::backoff::Backoff;
use crate::service::health::{Health, LockWait};
use crate::service::metrics::{self, Metrics, ServeError};
use crate::service::shutdown::{Abandoned, Shutdown};

/// After this many consecutive batches of which the broker took nothing, the relay starts a
/// new producer session (new producer id, metadata and connections).
const FRESH_PRODUCER_AFTER_REFUSED_BATCHES: u32 = 3;

/// Most records set aside at once (in batches): past it no new batch is claimed until some
/// are acknowledged, so a stalled partition cannot fill librdkafka's queue.
const SET_ASIDE_BATCHES: usize = 10;

/// Why the relay stopped other than by a clean shutdown. Outages are not in this list: the
/// relay waits them out.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The table does not match the configuration (missing, or a column of the wrong type).
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The producer could not be created from the configuration.
    #[error(transparent)]
    Publisher(#[from] PublisherError),
    /// The metrics endpoint could not be opened.
    #[error(transparent)]
    Metrics(#[from] ServeError),
    /// No broker answered at startup.
    #[error(
        "kafka.brokers = \"{brokers}\": no broker answered within {waited:?} ({error}); check the addresses and \
         that this host can reach them (kafka.startup_timeout sets the wait; once a broker has answered, outages \
         are waited out)"
    )]
    BrokersUnreachable {
        /// The configured bootstrap servers.
        brokers: String,
        /// How long the relay waited.
        waited: Duration,
        /// librdkafka's last answer.
        error: String,
    },
    /// A broker refused the relay's credentials or certificates at startup.
    #[error(
        "kafka.brokers = \"{brokers}\": the broker refused the relay at startup: {refusal}; the relay does not retry a \
         refusal at startup (once a broker has accepted it, refusals are waited out like outages)"
    )]
    BrokersRefused {
        /// The configured bootstrap servers.
        brokers: String,
        /// What was refused, and what to check.
        refusal: BrokerRefusal,
    },
    /// Shutdown was requested and its grace period ended before the batch in flight was
    /// finished: its rows stay unpublished and are published again by the next run.
    #[error(
        "shutdown grace period over (relay.shutdown_timeout = {grace:?}) {what}{}: the batch in flight is abandoned, \
         its rows stay unpublished and the next run publishes them (those the broker has already, a second time; \
         consumers deduplicate by event_id)",
        lock_wait.as_ref().map(|wait| format!(
            "; its statement was waiting for {} held by {}",
            wait.waiting_for,
            wait.holders()
        )).unwrap_or_default()
    )]
    Abandoned {
        /// The grace period.
        grace: Duration,
        /// What was left unfinished.
        what: Abandoned,
        /// The lock another session held that the relay's statement was waiting on, when one was.
        lock_wait: Option<Box<LockWait>>,
    },
}

impl RelayError {
    /// Whether the operator must change configuration or schema (exit code 2) rather than
    /// something outside the relay having failed.
    pub fn is_config_problem(&self) -> bool {
        matches!(
            self,
            RelayError::Outbox(
                OutboxError::Layout(_)
                    | OutboxError::Refused(_)
                    | OutboxError::TableMissing(_)
                    | OutboxError::MissingPrivileges { .. }
                    | OutboxError::ShardCountMismatch { .. }
                    | OutboxError::EarlierVersionRunning { .. }
            )
        ) || matches!(
            self,
            RelayError::Publisher(_) | RelayError::BrokersUnreachable { .. } | RelayError::BrokersRefused { .. }
        )
    }
}

/// One relay: the configuration, its metrics and the shutdown it obeys.
pub struct Relay {
    config: Config,
    mapping: Mapping,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: Shutdown,
    /// Rows the next claim may return: `relay.batch_size`, or fewer while rows are so large
    /// that `relay.batch_bytes` cuts claims short.
    claim_limit: AtomicUsize,
    /// Which row failures were already reported.
    failure_reports: RowFailureReports,
    /// Rows whose outcome the database refused to record (never held across an await).
    quarantine: std::sync::Mutex<Quarantine>,
}

impl Relay {
    /// A relay for a validated configuration.
    pub fn new(config: Config, shutdown: Shutdown) -> Result<Relay, RelayError> {
        let mapping = crate::postgres::outbox::mapping_of(&config)?;
        let claim_limit = AtomicUsize::new(config.relay.batch_size);
        Ok(Relay {
            config,
            mapping,
            metrics: Metrics::new(),
            health: Arc::new(Health::new()),
            shutdown,
            claim_limit,
            failure_reports: RowFailureReports::default(),
            quarantine: std::sync::Mutex::new(Quarantine::default()),
        })
    }

    /// The relay's metrics, also served at `/metrics`.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// What `/healthz` and `/readyz` answer.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Connects the claim connection and checks that the relay's role may do everything the
    /// loop will do, so a missing grant stops the relay before it publishes a row it could not
    /// then mark. A grant revoked while the relay runs fails the next mark; the reconnect that
    /// follows finds it missing here and stops the relay, leaving the batch unmarked (published
    /// again once the grant is back, as after a crash).
    async fn connect(&self) -> Result<Outbox, OutboxError> {
        let outbox = Outbox::connect(&self.config, &self.mapping).await?;
        if self.mapping.per_key_order {
            outbox.layout().check_per_key_order(outbox.order_column())?;
        }
        let retention = self.config.retention.delete_published_after.is_some();
        outbox.check_privileges(&self.mapping.privileges_needed(retention)).await?;
        Ok(outbox)
    }

    fn new_publisher(&self) -> Result<Publisher, PublisherError> {
        Publisher::new(&self.config, self.metrics.clone(), self.health.clone())
    }
}

/// What the loop keeps from one turn to the next.
struct LoopState {
    /// The producer; replaced only by [`Relay::fresh_producer`].
    publisher: Publisher,
    /// With `kafka.delivery = "exactly_once"`, the shards' transactional producers.
    transactions: Option<Transactions>,
    /// The claim connection between turns; `None` after a database error, so that the next
    /// turn connects again (and the shards' locks went with the old session).
    connection: Option<Outbox>,
    /// Cancels what the claim session runs when the grace period cuts a statement short.
    canceller: Option<StatementCanceller>,
    /// Whether a connection ever succeeded: until then, a refused login is a mistake.
    ever_connected: bool,
    /// The shards held, and when to rebalance them.
    shards: Shards,
    /// Where claims start; built again for each connection.
    floor: ClaimFloor,
    /// What the last batch still owes the table.
    pending: Pending,
    /// Records still in flight after their batch stopped waiting (a stalled partition).
    stalled: StalledRecords,
    /// The pause after an outage, growing while it lasts.
    backoff: Backoff,
    /// Consecutive batches of which the broker took nothing.
    refused_batches: u32,
    /// When the shutdown grace period ends, once shutdown is requested.
    deadline: Option<Instant>,
}

/// Why a turn ends before its last step.
enum Cut {
    /// The next turn starts (any pause the step needed is taken).
    NextTurn,
    /// The loop ends for shutdown, with what the grace period left unfinished, if anything.
    Stop(Option<Abandoned>),
    /// The loop ends because the configuration does not fit.
    Fail(RelayError),
}

impl From<RelayError> for Cut {
    fn from(e: RelayError) -> Cut {
        Cut::Fail(e)
    }
}

impl From<PublisherError> for Cut {
    fn from(e: PublisherError) -> Cut {
        Cut::Fail(e.into())
    }
}

impl From<OutboxError> for Cut {
    fn from(e: OutboxError) -> Cut {
        Cut::Fail(e.into())
    }
}

impl Relay {
    /// Runs until shutdown is requested, or until the configuration turns out not to fit the
    /// table. Database and broker outages are waited out.
    pub async fn run(self) -> Result<(), RelayError> {
        let Some(publisher) = self.start().await? else {
            return Ok(());
        };
        let transactions = Transactions::start(&self.config).await?;
        let relay = &self.config.relay;
        let mut state = LoopState {
            publisher,
            transactions,
            connection: None,
            canceller: None,
            ever_connected: false,
            shards: Shards::new(relay.shards, relay.rebalance_interval, relay.takeover_after),
            floor: ClaimFloor::new(relay.full_scan_interval, false),
            pending: Pending::Nothing,
            stalled: StalledRecords::default(),
            backoff: Backoff::new(relay.backoff_initial, relay.backoff_max),
            refused_batches: 0,
            deadline: None,
        };
        let signal = if self.mapping.xact_id.is_some() { CommitSignal::Horizon } else { CommitSignal::AnyCommit };
        let wakeup = Wakeup::start(&self.config, signal, self.shutdown.clone());
        let abandoned = loop {
            match self.turn(&mut state, &wakeup).await {
                Ok(()) | Err(Cut::NextTurn) => {}
                Err(Cut::Stop(abandoned)) => break abandoned,
                Err(Cut::Fail(e)) => return Err(e),
            }
        };
        self.stop(state, abandoned).await
    }

    /// Serves the metrics, starts a producer and waits for a broker to answer, then starts the
    /// background tasks. `None` when shutdown is requested first.
    async fn start(&self) -> Result<Option<Publisher>, RelayError> {
        // Validation resolved `metrics.listen` already; a configuration built in code is resolved
        // here the same way.
        if let Ok(Some(addr)) = self.config.metrics.address() {
            let health = (self.health.clone(), self.config.health.clone());
            metrics::serve(addr, self.metrics.clone(), health.0, health.1, self.shutdown.clone()).await?;
        }
        let publisher = self.new_publisher()?;
        // No shard is taken before a broker answers: a relay pointed at a wrong address would
        // otherwise hold its shards' rows back from the relays that can publish them.
        let waited = self.config.kafka.startup_timeout;
        tokio::select! {
            answer = publisher.wait_for_cluster(waited) => answer.map_err(|e| {
                let brokers = self.config.kafka.brokers.clone();
                match e {
                    ClusterUnavailable::Unreachable(e) => {
                        RelayError::BrokersUnreachable { brokers, waited, error: e.to_string() }
                    }
                    ClusterUnavailable::Refused(refusal) => RelayError::BrokersRefused { brokers, refusal },
                }
            })?,
            _ = self.shutdown.requested() => return Ok(None),
        }
        self.spawn_background_tasks();
        info!(table = %self.mapping.table_name(), brokers = %self.config.kafka.brokers, "relay starting");
        if let Some((name, value)) = crate::kafka::settings::abandoning_timeout(&self.config) {
            warn!(
                property = name,
                value,
                "kafka.properties.{name} lets librdkafka give up on a record the broker may have written after all: \
                 the relay then sends it again, a duplicate without any relay stop. Remove it (the relay's default, 0, \
                 never gives up) unless duplicates are acceptable"
            );
        }
        Ok(Some(publisher))
    }

    /// Retention, the lock watch and the table statistics, each on its own connection.
    fn spawn_background_tasks(&self) {
        if self.config.retention.delete_published_after.is_some() {
            tokio::spawn(crate::service::retention::run(
                self.config.clone(),
                self.mapping.clone(),
                self.metrics.clone(),
                self.shutdown.clone(),
            ));
        }
        tokio::spawn(crate::service::lock_watch::watch(
            self.config.clone(),
            self.health.clone(),
            self.shutdown.clone(),
        ));
        tokio::spawn(crate::service::stats::report(
            self.config.clone(),
            self.mapping.clone(),
            self.metrics.clone(),
            self.health.clone(),
            self.shutdown.clone(),
        ));
    }

    /// One turn of the loop: finish up if shutting down, connect, write what is owed, hold
    /// shards, then relay one batch and pace the next turn.
    async fn turn(&self, st: &mut LoopState, wakeup: &Wakeup) -> Result<(), Cut> {
        if self.shutdown.is_requested() {
            // Nothing more is produced: a mark that would go with the next batch goes alone.
            st.pending = std::mem::take(&mut st.pending).without_ahead();
            self.finish_at_shutdown(st).await?;
        }
        let outbox = self.connected(st).await?;
        self.write_owed(st, &outbox).await?;
        if self.shutdown.is_requested() {
            return Err(Cut::Stop(None));
        }
        let owned = self.hold_shards(st, &outbox).await?;
        if owned.is_empty() {
            // More relays than shards: this one stands by until a shard is free.
            st.pending = std::mem::take(&mut st.pending).without_ahead();
            self.idle(wakeup, &outbox).await;
            st.connection = Some(outbox);
            return Ok(());
        }
        if let Some(transactions) = st.transactions.as_mut()
            && let Err(cut) = self.ready_transactions(transactions, &outbox, &owned).await
        {
            st.connection = Some(outbox);
            return Err(cut);
        }
        if wakeup.take_rescan_request() {
            st.floor.rescan();
        }
        if self.too_much_set_aside(st) {
            self.wait_for_a_report(st, &outbox).await;
            st.connection = Some(outbox);
            return Ok(());
        }
        let turn = self.batch_step(st, &outbox, &owned).await?;
        self.after_batch(st, outbox, turn, wakeup).await?;
        self.replace_failed_producer(st)
    }

    /// Once shutdown is requested, stops the loop as soon as nothing is owed and nothing is in
    /// flight, or when the grace period ends, saying what it leaves unfinished. Records set
    /// aside are finished like a batch in flight: their reports are awaited within the grace
    /// period, then written.
    async fn finish_at_shutdown(&self, st: &mut LoopState) -> Result<(), Cut> {
        let deadline = *st.deadline.get_or_insert_with(|| self.grace_deadline());
        let nothing_owed = |st: &LoopState| matches!(st.pending, Pending::Nothing);
        if nothing_owed(st) && !st.stalled.is_empty() && Instant::now() < deadline {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(remaining, st.stalled.any_reported()).await;
            if let Some(reported) = self.take_reported(&mut st.stalled) {
                st.pending = Pending::Unsettled(reported);
            }
        }
        if nothing_owed(st) && st.stalled.is_empty() {
            return Err(Cut::Stop(None));
        }
        if Instant::now() >= deadline {
            let unacknowledged =
                || (!st.stalled.is_empty()).then(|| Abandoned::Unacknowledged { rows: st.stalled.len() });
            return Err(Cut::Stop(st.pending.unmarked().or_else(unacknowledged)));
        }
        Ok(())
    }

    /// The claim connection: the one kept from the last turn, or a new one. A new connection
    /// holds no shard and nothing claimed ahead (the locks went with the old session); a
    /// database outage is waited out, a refused login before any connection succeeded is not.
    async fn connected(&self, st: &mut LoopState) -> Result<Outbox, Cut> {
        if let Some(outbox) = st.connection.take().filter(|c| !c.is_closed()) {
            return Ok(outbox);
        }
        st.pending = std::mem::take(&mut st.pending).without_ahead();
        st.shards.forget();
        if let Some(transactions) = &mut st.transactions {
            transactions.forget();
        }
        self.metrics.shards_owned.set(0);
        self.health.set_database_connected(false);
        self.health.set_claim_session(None);
        let Some(connected) = self.within_grace(self.connect()).await else {
            return Err(Cut::Stop(st.pending.unmarked()));
        };
        match connected {
            Ok(outbox) => {
                st.ever_connected = true;
                self.health.set_database_connected(true);
                self.health.set_claim_session(Some(outbox.backend_pid()));
                st.canceller = Some(outbox.canceller());
                st.floor = ClaimFloor::new(self.config.relay.full_scan_interval, outbox.ids_grow_with_time());
                info!(table = %self.mapping.table_name(), "connected to PostgreSQL");
                warn_about_layout(&outbox);
                Ok(outbox)
            }
            // Before the first connection, a database that does not exist or a login the server
            // refuses is a configuration mistake, not an outage: waiting would never help. After
            // it, the same answer (a database being restored, a password being rotated) is
            // waited out.
            Err(e) if !st.ever_connected && e.is_refused_login() => Err(OutboxError::Refused(Box::new(e)).into()),
            Err(e) if e.is_transient() => {
                let delay = st.backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "database unavailable; retrying");
                self.pause(delay, st.deadline).await;
                Err(Cut::NextTurn)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes what must be in the table before anything else is claimed: the reports of records
    /// set aside, the rows kept apart that are due, an outcome the table did not take yet, and,
    /// when the shards are about to be rebalanced, the mark that would have gone with the next
    /// batch (a shard changes hands only with nothing of it unmarked).
    async fn write_owed(&self, st: &mut LoopState, outbox: &Outbox) -> Result<(), Cut> {
        if let Some(reported) = self.take_reported(&mut st.stalled) {
            st.pending.absorb(reported);
        }
        st.stalled.report(&self.metrics, &self.health, Instant::now());
        if self.within_grace(self.write_quarantined(outbox)).await.is_none() {
            return Err(Cut::Stop(st.pending.unmarked()));
        }
        let (mut settlement, ahead) = match std::mem::take(&mut st.pending) {
            Pending::Unsettled(settlement) => (settlement, None),
            Pending::MarkWithNext { settlement, ahead } if st.shards.rebalance_due() => (settlement, Some(ahead)),
            other => {
                st.pending = other;
                return Ok(());
            }
        };
        match self.within_grace(self.settle_step(outbox, &mut settlement)).await {
            Some(Ok(())) => {
                st.pending = ahead.map_or(Pending::Nothing, Pending::Claimed);
                Ok(())
            }
            Some(Err(e)) => {
                let delay = st.backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "could not mark the last batch; retrying");
                st.pending = Pending::Unsettled(settlement);
                self.pause(delay, st.deadline).await;
                Err(Cut::NextTurn)
            }
            None => Err(Cut::Stop(settlement.unmarked())),
        }
    }

    /// Rebalances the shards when due and returns those held. Runs between batches, with nothing
    /// of any shard in flight, so shards may change hands; not while records are set aside in
    /// flight, whose rows another relay would send again.
    async fn hold_shards(&self, st: &mut LoopState, outbox: &Outbox) -> Result<Vec<i32>, Cut> {
        if st.stalled.is_empty() {
            let Some(rebalanced) = self.within_grace(st.shards.rebalance(outbox)).await else {
                return Err(Cut::Stop(st.pending.unmarked()));
            };
            if let Err(e) = rebalanced {
                if !e.is_transient() {
                    return Err(e.into());
                }
                let delay = st.backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "database error; reconnecting");
                self.pause(delay, st.deadline).await;
                return Err(Cut::NextTurn);
            }
        }
        let owned = st.shards.owned();
        self.metrics.shards_owned.set(owned.len() as i64);
        Ok(owned)
    }

    /// Whether enough records are set aside in flight that no batch is claimed until a report
    /// comes (a batch claimed ahead is produced all the same).
    fn too_much_set_aside(&self, st: &LoopState) -> bool {
        st.stalled.len() >= SET_ASIDE_BATCHES * self.config.relay.batch_size
            && !matches!(st.pending, Pending::MarkWithNext { .. })
    }

    /// Waits for a report of a record set aside, the poll interval, or shutdown.
    async fn wait_for_a_report(&self, st: &mut LoopState, outbox: &Outbox) {
        st.pending = std::mem::take(&mut st.pending).without_ahead();
        let stalled = &mut st.stalled;
        let wait = async {
            tokio::select! {
                _ = stalled.any_reported() => {}
                _ = tokio::time::sleep(self.config.relay.poll_interval) => {}
                _ = self.shutdown.requested() => {}
            }
        };
        self.with_heartbeat(outbox, wait).await;
    }

    /// Relays one batch of the shards `owned` ([`Relay::relay_batch`]) as a step the liveness
    /// probe watches, within the grace period once shutdown is requested.
    async fn batch_step(
        &self,
        st: &mut LoopState,
        outbox: &Outbox,
        owned: &[i32],
    ) -> Result<Result<Turn, OutboxError>, Cut> {
        let _step = HealthStep::start(&self.health);
        let mut set_aside: Vec<crate::postgres::row::RowId> = st.stalled.row_ids().cloned().collect();
        let mut held_keys = st.stalled.held_keys();
        if let Some(transactions) = st.transactions.as_mut() {
            let (rows, keys) = transactions.held(&self.metrics, &self.health);
            set_aside.extend(rows);
            held_keys.extend(keys);
        }
        let claiming = Claiming { shards: owned, floor: &mut st.floor, set_aside, held_keys };
        let pending = std::mem::take(&mut st.pending);
        let producing = Producing { publisher: &st.publisher, transactions: st.transactions.as_mut() };
        let batch = self.relay_batch(outbox, producing, pending, claiming);
        self.within_grace(self.with_heartbeat(outbox, batch)).await.ok_or(Cut::Stop(Some(Abandoned::StatementRunning)))
    }

    /// Takes in what a batch step found, and paces the next turn: idles when the shards are
    /// drained, backs off during an outage. The connection is kept unless the database failed.
    async fn after_batch(
        &self,
        st: &mut LoopState,
        outbox: Outbox,
        turn: Result<Turn, OutboxError>,
        wakeup: &Wakeup,
    ) -> Result<(), Cut> {
        match turn {
            Ok(Turn::Idle) => {
                st.backoff.reset();
                self.idle(wakeup, &outbox).await;
                st.connection = Some(outbox);
            }
            Ok(Turn::Relayed { full, broker_unavailable, producer_unusable, pending, set_aside }) => {
                let has_next = matches!(pending, Pending::MarkWithNext { .. });
                st.pending = pending;
                self.keep_set_aside(st, set_aside);
                self.renew_producer_if_stuck(st, producer_unusable, broker_unavailable)?;
                if broker_unavailable {
                    let delay = st.backoff.next_delay();
                    warn!(retry_in = ?delay, "the broker took none of the batch; backing off");
                    // A broker outage is not a frozen relay: it keeps its shards meanwhile.
                    self.with_heartbeat(&outbox, self.pause(delay, st.deadline)).await;
                } else {
                    st.backoff.reset();
                    if !full && !has_next {
                        // A partial batch: the shards are drained for now.
                        self.idle(wakeup, &outbox).await;
                    }
                }
                st.connection = Some(outbox);
            }
            Ok(Turn::Unsettled(settlement, e)) => {
                let delay = st.backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "could not mark the batch; retrying before claiming more");
                st.pending = Pending::Unsettled(settlement);
                self.pause(delay, st.deadline).await;
            }
            Ok(Turn::Abandoned { rows }) => return Err(Cut::Stop(Some(Abandoned::Unacknowledged { rows }))),
            Err(e @ OutboxError::TableReplaced { .. }) => {
                // Nothing was published from the other table; the connection is dropped with
                // its locks, and the next turn connects to the table there is now.
                error!(error = %e, "the outbox table was replaced; reconnecting");
                self.metrics.table_changes.with_label_values(&["replaced"]).inc();
            }
            Err(e) => {
                let delay = st.backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "database error; reconnecting");
                self.pause(delay, st.deadline).await;
            }
        }
        Ok(())
    }

    /// Keeps the records a batch set aside in flight, and says at once which partitions stall.
    fn keep_set_aside(&self, st: &mut LoopState, set_aside: Vec<SetAside>) {
        if !set_aside.is_empty() {
            st.stalled.set_aside(set_aside);
            st.stalled.report(&self.metrics, &self.health, Instant::now());
        }
    }

    /// Starts a new producer session when the broker disowned this one, or when it took nothing
    /// from several batches in a row; never while records are set aside in flight, which a new
    /// producer would abandon (they settle first: a broken session fails them, and they go out
    /// again).
    fn renew_producer_if_stuck(
        &self,
        st: &mut LoopState,
        producer_unusable: bool,
        broker_unavailable: bool,
    ) -> Result<(), RelayError> {
        st.refused_batches = if broker_unavailable { st.refused_batches + 1 } else { 0 };
        if !st.stalled.is_empty() {
            return Ok(());
        }
        if producer_unusable {
            warn!("the broker refused this producer session; starting a new producer");
            self.fresh_producer(st)?;
        } else if st.refused_batches >= FRESH_PRODUCER_AFTER_REFUSED_BATCHES {
            // librdkafka recovers most producer-state problems by itself, but one it cannot (a
            // broker that lost the producer id, as after a restart with fresh storage) shows
            // only as timeouts. A new session costs nothing during a real outage and ends that
            // kind of stall.
            warn!(
                batches = st.refused_batches,
                "nothing delivered in consecutive batches; starting a new producer session"
            );
            self.fresh_producer(st)?;
            st.refused_batches = 0;
        }
        Ok(())
    }

    /// Replaces a producer that hit a fatal error.
    fn replace_failed_producer(&self, st: &mut LoopState) -> Result<(), Cut> {
        if let Some(fatal) = st.publisher.fatal_error() {
            error!(error = %fatal, "the Kafka producer hit a fatal error; replacing it");
            self.fresh_producer(st)?;
        }
        Ok(())
    }

    /// Replaces the producer with a new session: the one place the loop restarts a producer.
    fn fresh_producer(&self, st: &mut LoopState) -> Result<(), RelayError> {
        st.publisher = self.new_publisher()?;
        self.metrics.producer_restarts.inc();
        Ok(())
    }

    /// Ends the loop: cancels the statement the grace period cut short, flushes the producer
    /// within what is left of the grace period, and says what was abandoned, if anything.
    async fn stop(&self, mut st: LoopState, abandoned: Option<Abandoned>) -> Result<(), RelayError> {
        if let Some(transactions) = &mut st.transactions {
            transactions.abort_open().await;
        }
        if abandoned.is_some()
            && let Some(canceller) = &st.canceller
        {
            // The statement cut short may still run in PostgreSQL (waiting on a lock, say),
            // holding the session, and with it the shards' locks, until it ends.
            canceller.cancel().await;
        }
        let flush_time = st.deadline.map(|d| d.saturating_duration_since(Instant::now())).unwrap_or_default();
        if let Err(e) = st.publisher.flush(flush_time) {
            tracing::debug!(error = %e, "flush at shutdown incomplete");
        }
        if let Some(what) = abandoned {
            return Err(RelayError::Abandoned {
                grace: self.config.relay.shutdown_timeout,
                what,
                lock_wait: self.health.lock_wait().map(Box::new),
            });
        }
        info!("relay stopped");
        Ok(())
    }

    /// When the shutdown grace period ends, once shutdown is requested.
    fn grace_deadline(&self) -> Instant {
        let grace = self.config.relay.shutdown_timeout;
        self.shutdown.deadline(grace).unwrap_or_else(|| Instant::now() + grace)
    }

    /// Runs `work`, a step that may wait on PostgreSQL or the broker, unless the shutdown grace
    /// period ends first (`None`).
    async fn within_grace<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        self.shutdown.within_grace(self.config.relay.shutdown_timeout, work).await
    }

    /// Waits for a wake-up (rows committed), the poll interval, or shutdown, keeping the claim
    /// session visibly alive however long the poll interval is.
    async fn idle(&self, wakeup: &Wakeup, outbox: &Outbox) {
        let wait = async {
            tokio::select! {
                _ = tokio::time::sleep(self.config.relay.poll_interval) => {}
                _ = wakeup.notified() => {}
                _ = self.shutdown.requested() => {}
            }
        };
        self.with_heartbeat(outbox, wait).await
    }

    /// Runs `work` (a step of the loop, or a wait) while the claim connection keeps showing
    /// other relays that this one is alive ([`shards::with_heartbeat`]).
    async fn with_heartbeat<T>(&self, outbox: &Outbox, work: impl Future<Output = T>) -> T {
        let every = shards::heartbeat_interval(self.config.relay.takeover_after);
        shards::with_heartbeat(outbox, every, &self.health, work).await
    }

    /// Waits `delay`, cut short by a shutdown request; once shutdown is requested, never past
    /// the grace deadline.
    async fn pause(&self, delay: Duration, deadline: Option<Instant>) {
        match deadline {
            Some(deadline) => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(delay.min(remaining)).await;
            }
            None => {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.shutdown.requested() => {}
                }
            }
        }
    }
}

/// Warnings about a table layout that weakens a guarantee.
fn warn_about_layout(outbox: &Outbox) {
    let layout = outbox.layout();
    let order_by = layout.mapping.order_by.as_str();
    if !layout.mapping.per_key_order {
        warn!(
            column = %order_by,
            "outbox.per_key_order = false: a key's rows are published in the order of this column, which need not be the order they were inserted in"
        );
    } else if outbox.order_column().sequence.is_none() {
        warn!(
            column = %order_by,
            "the order column is not fed by a sequence: a key's rows are published in the order of its values, so the application must assign them in insertion order"
        );
    }
    if layout.mapping.xact_id.is_none() {
        warn!(
            "outbox.columns.xact_id is not set: a row whose transaction commits late can be overtaken by a later row of its key"
        );
    }
}
