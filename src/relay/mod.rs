//! The loop that joins the table and the producer: claim, produce, await every report, mark.
//!
//! Invariants this loop keeps:
//! - a row is marked published only after its own delivery report said the broker has it;
//! - a row whose delivery failed is never marked; it records the error and is tried again,
//!   with backoff when the row itself was the cause, until `relay.max_attempts`;
//! - rows are claimed only from the shards this relay holds, and a shard changes hands only
//!   between batches, so per-key order survives scale-out and takeover;
//! - a batch goes to the producer only if the session holding the shards' locks proved within
//!   [`shards::FENCE`] that it still exists, so a relay that wakes after its shards were taken
//!   over does not publish what it claimed before; and the loop keeps that session visibly
//!   active whatever it waits for ([`shards::with_heartbeat`]), so only a frozen relay loses it;
//! - a batch is produced only after every row of the batch before it was acknowledged; the
//!   next batch may be claimed while the current one awaits its reports, leaving the rows in
//!   flight out, and is dropped unclaimed if any of them failed; an acknowledged batch is
//!   marked while the next one is produced, and always before anything else is claimed;
//! - a database or broker outage pauses the loop with capped backoff; it never ends it;
//! - after a shutdown request no new batch is claimed; the batch in flight is finished
//!   (reports and mark) within the grace period, or left unmarked to be sent again: every wait
//!   of the loop, on the broker or on PostgreSQL, ends with the grace period, the relay's
//!   statement still running is cancelled, and the relay says what it abandoned
//!   ([`RelayError::Abandoned`]).

pub mod backoff;
pub mod claim_floor;
pub mod quarantine;
pub mod row_failures;
pub mod shards;
pub mod stalled;
pub mod wakeup;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use tracing::field::Empty;
use tracing::{Instrument, debug, error, info, info_span, warn};

use self::backoff::Backoff;
use self::claim_floor::{ClaimFloor, Observation};
use self::quarantine::{Quarantine, QuarantinedRow, Unwritten};
use self::row_failures::RowFailureReports;
use self::shards::Shards;
use self::stalled::{SetAside, StalledRecords};
use self::wakeup::{CommitSignal, Wakeup};
use crate::config::{Config, OnPoison};
use crate::kafka::publisher::{BrokerRefusal, ClusterUnavailable, Outcome, PendingReport, Publisher, PublisherError};
use crate::kafka::record::{OutboxRow, Record, RowFailure, RowKey, RowRef, UnreadableRow};
use crate::postgres::layout::Mapping;
use crate::postgres::outbox::{Outbox, OutboxError, StatementCanceller};
use crate::service::health::{Health, LockWait};
use crate::service::metrics::{self, Metrics, ServeError};
use crate::service::shutdown::{Abandoned, Shutdown};

/// After this many consecutive batches of which the broker took nothing, the relay starts a
/// new producer session (new producer id, metadata and connections).
const FRESH_PRODUCER_AFTER_REFUSED_BATCHES: u32 = 3;

/// Rows returned by a claim: each decoded, or its id and why it could not be.
/// The rows of one claim: each decoded, or its id and why it could not be.
#[derive(Debug, Default)]
struct Claimed {
    rows: Vec<Result<OutboxRow, UnreadableRow>>,
    /// Whether the claim may have left claimable rows behind (it reached its row or byte
    /// limit), so the relay claims again at once instead of idling.
    full: bool,
}

/// Where and how the next claims of a turn look: the shards held, the claim floor, and what
/// they must leave out because it is still in flight after its batch ([`crate::relay::stalled`]).
struct Claiming<'a> {
    shards: &'a [i32],
    floor: &'a mut ClaimFloor,
    /// Rows set aside in flight: never claimed again while their records may still be written.
    set_aside: Vec<String>,
    /// Keys held behind a row set aside: none of their rows is claimed.
    held_keys: Vec<String>,
}

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

/// A row the broker acknowledged, and its topic (for the per-topic counter).
#[derive(Debug)]
struct AckedRow {
    row: RowRef,
    topic: String,
}

/// Rows of a batch whose outcome must still be written to the table.
#[derive(Debug, Default)]
struct Settlement {
    /// Acknowledged rows.
    acked: Vec<AckedRow>,
    /// Rows that failed because of themselves (bad row, unknown topic, too large).
    row_failures: Vec<RowFailure>,
    /// Rows that failed because of an outage.
    outage_failures: Vec<RowFailure>,
    /// Set once the acknowledged rows are marked, so a retry does not count them twice.
    acked_marked: bool,
}

impl Settlement {
    /// Takes over what is left of `earlier`'s outcome, to be written with this one.
    fn absorb(&mut self, earlier: Settlement) {
        if !earlier.acked_marked {
            self.acked.extend(earlier.acked);
        }
        self.row_failures.extend(earlier.row_failures);
        self.outage_failures.extend(earlier.outage_failures);
    }
}

/// Keys whose earlier row failed in the batch being built: their later rows wait.
#[derive(Debug, Default)]
struct HeldKeys {
    keys: HashSet<String>,
    /// A row whose key could not be read failed: any keyed row after it may share that key.
    every_keyed_row: bool,
}

impl HeldKeys {
    /// Later rows of `key` wait.
    fn hold(&mut self, key: RowKey) {
        match key {
            RowKey::Known(Some(key)) => {
                self.keys.insert(key);
            }
            // A keyless row has no order to keep.
            RowKey::Known(None) => {}
            RowKey::Unreadable => self.every_keyed_row = true,
        }
    }

    /// Whether a row of `key` must wait.
    fn holds(&self, key: Option<&str>) -> bool {
        key.is_some_and(|key| self.every_keyed_row || self.keys.contains(key))
    }
}

/// What one turn of the loop found.
enum Turn {
    /// Nothing to publish right now.
    Idle,
    /// A batch went out and its outcome is recorded.
    Relayed {
        /// Whether the claim reached its row or byte limit: more rows may be waiting.
        full: bool,
        /// No record was acknowledged and some failed for reasons outside the rows.
        broker_unavailable: bool,
        /// The broker disowned the producer session; the next batch needs a new producer.
        producer_unusable: bool,
        /// The next batch, claimed while this one awaited its reports; only when every row of
        /// this one was acknowledged.
        ahead: Option<Claimed>,
        /// This batch's outcome when the next batch is claimed: it is written while the next
        /// batch is produced, and before anything else is claimed.
        to_mark: Option<Settlement>,
        /// Records whose partition stalled: still in flight, their reports to come.
        set_aside: Vec<SetAside>,
    },
    /// The outcome could not be recorded; it must be before the next claim.
    Unsettled(Settlement, OutboxError),
    /// Shutdown's grace period ended with reports outstanding; the rows stay unpublished.
    Abandoned { rows: usize },
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

    /// Runs until shutdown is requested, or until the configuration turns out not to fit the
    /// table. Database and broker outages are waited out.
    pub async fn run(self) -> Result<(), RelayError> {
        // Validation resolved `metrics.listen` already; a configuration built in code is resolved
        // here the same way.
        if let Ok(Some(addr)) = self.config.metrics.address() {
            let health = (self.health.clone(), self.config.health.clone());
            metrics::serve(addr, self.metrics.clone(), health.0, health.1, self.shutdown.clone()).await?;
        }
        let mut publisher = self.new_publisher()?;
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
            _ = self.shutdown.requested() => return Ok(()),
        }
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
        let signal = if self.mapping.xact_id.is_some() { CommitSignal::Horizon } else { CommitSignal::AnyCommit };
        let wakeup = Wakeup::start(&self.config, signal, self.shutdown.clone());
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

        let relay = &self.config.relay;
        let mut backoff = Backoff::new(relay.backoff_initial, relay.backoff_max);
        // Whether a connection ever succeeded: until then, a refused login is a mistake.
        let mut ever_connected = false;
        let mut shards = Shards::new(relay.shards, relay.rebalance_interval, relay.takeover_after);
        let mut connection: Option<Outbox> = None;
        // Where claims start; built again for each connection.
        let mut floor = ClaimFloor::new(relay.full_scan_interval, false);
        let mut unsettled: Option<Settlement> = None;
        // An acknowledged batch whose mark goes with the next batch's publish (see relay_batch).
        let mut to_mark: Option<Settlement> = None;
        // The next batch claimed ahead, and the shards it was claimed for.
        let mut claimed_ahead: Option<(Vec<i32>, Claimed)> = None;
        let mut deadline: Option<Instant> = None;
        // Consecutive batches of which the broker took nothing.
        let mut refused_batches = 0u32;
        // Records still in flight after their batch stopped waiting (a stalled partition).
        let mut stalled = StalledRecords::default();
        // Cancels what the claim session runs when the grace period cuts a statement short.
        let mut canceller: Option<StatementCanceller> = None;
        // What the grace period ended before, if it did.
        let mut abandoned: Option<Abandoned> = None;

        loop {
            // Only the next batch's publish may run alongside a pending mark: before a shutdown,
            // a rebalance (which may hand the rows' shard to another relay) or a claim, it is
            // written on its own.
            if unsettled.is_none()
                && (self.shutdown.is_requested() || claimed_ahead.is_none() || shards.rebalance_due())
            {
                unsettled = to_mark.take();
            }
            if self.shutdown.is_requested() {
                let deadline = *deadline.get_or_insert_with(|| self.grace_deadline());
                if unsettled.is_none() && !stalled.is_empty() && Instant::now() < deadline {
                    // Records set aside are finished like a batch in flight: their reports are
                    // awaited within the grace period, then written.
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let _ = tokio::time::timeout(remaining, stalled.any_reported()).await;
                    unsettled = self.take_reported(&mut stalled);
                }
                if unsettled.is_none() && stalled.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    abandoned = unmarked(unsettled.iter());
                    if abandoned.is_none() && !stalled.is_empty() {
                        abandoned = Some(Abandoned::Unacknowledged { rows: stalled.len() });
                    }
                    break;
                }
            }

            let outbox = match connection.take().filter(|c| !c.is_closed()) {
                Some(outbox) => outbox,
                None => {
                    claimed_ahead = None;
                    shards.forget();
                    self.metrics.shards_owned.set(0);
                    self.health.set_database_connected(false);
                    self.health.set_claim_session(None);
                    let Some(connected) = self.within_grace(self.connect()).await else {
                        abandoned = unmarked(unsettled.iter().chain(&to_mark));
                        break;
                    };
                    match connected {
                        Ok(outbox) => {
                            ever_connected = true;
                            self.health.set_database_connected(true);
                            self.health.set_claim_session(Some(outbox.backend_pid()));
                            canceller = Some(outbox.canceller());
                            floor = ClaimFloor::new(relay.full_scan_interval, outbox.ids_grow_with_time());
                            info!(table = %self.mapping.table_name(), "connected to PostgreSQL");
                            warn_about_layout(&outbox);
                            outbox
                        }
                        // Before the first connection, a database that does not exist or a
                        // login the server refuses is a configuration mistake, not an outage:
                        // waiting would never help. After it, the same answer (a database
                        // being restored, a password being rotated) is waited out.
                        Err(e) if !ever_connected && e.is_refused_login() => {
                            return Err(OutboxError::Refused(Box::new(e)).into());
                        }
                        Err(e) if e.is_transient() => {
                            let delay = backoff.next_delay();
                            warn!(error = %e, retry_in = ?delay, "database unavailable; retrying");
                            self.pause(delay, deadline).await;
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            };

            if let Some(reported) = self.take_reported(&mut stalled) {
                match &mut unsettled {
                    Some(settlement) => settlement.absorb(reported),
                    None => unsettled = Some(reported),
                }
            }
            stalled.report(&self.metrics, &self.health, Instant::now());
            if self.within_grace(self.write_quarantined(&outbox)).await.is_none() {
                abandoned = unmarked(unsettled.iter().chain(&to_mark));
                break;
            }
            if let Some(mut settlement) = unsettled.take() {
                match self.within_grace(self.settle_step(&outbox, &mut settlement)).await {
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        let delay = backoff.next_delay();
                        warn!(error = %e, retry_in = ?delay, "could not mark the last batch; retrying");
                        unsettled = Some(settlement);
                        self.pause(delay, deadline).await;
                        continue;
                    }
                    None => {
                        abandoned = unmarked([&settlement].into_iter());
                        break;
                    }
                }
            }
            if self.shutdown.is_requested() {
                break;
            }

            // Between batches: nothing of any shard is in flight, so shards may change hands;
            // not while records are set aside in flight, whose rows another relay would send again.
            let rebalanced = if stalled.is_empty() {
                let Some(rebalanced) = self.within_grace(shards.rebalance(&outbox)).await else {
                    abandoned = unmarked(to_mark.iter());
                    break;
                };
                rebalanced
            } else {
                Ok(())
            };
            if let Err(e) = rebalanced {
                if !e.is_transient() {
                    return Err(e.into());
                }
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "database error; reconnecting");
                self.pause(delay, deadline).await;
                continue;
            }
            let owned = shards.owned();
            self.metrics.shards_owned.set(owned.len() as i64);
            // Rows claimed ahead for shards this relay no longer holds belong to another relay.
            let ahead = claimed_ahead.take().filter(|(claimed_for, _)| *claimed_for == owned).map(|(_, rows)| rows);
            if owned.is_empty() {
                // More relays than shards: this one stands by until a shard is free.
                self.idle(&wakeup, &outbox).await;
                connection = Some(outbox);
                continue;
            }

            if wakeup.take_rescan_request() {
                floor.rescan();
            }
            if stalled.len() >= SET_ASIDE_BATCHES * relay.batch_size && to_mark.is_none() {
                // Enough in flight already: wait for a report before claiming more.
                let wait = async {
                    tokio::select! {
                        _ = stalled.any_reported() => {}
                        _ = tokio::time::sleep(relay.poll_interval) => {}
                        _ = self.shutdown.requested() => {}
                    }
                };
                self.with_heartbeat(&outbox, wait).await;
                connection = Some(outbox);
                continue;
            }
            self.health.step_started();
            let claiming = Claiming {
                shards: &owned,
                floor: &mut floor,
                set_aside: stalled.row_ids().map(str::to_owned).collect(),
                held_keys: stalled.held_keys(),
            };
            let batch = self.relay_batch(&outbox, &publisher, ahead, to_mark.take(), claiming);
            let turn = self.within_grace(self.with_heartbeat(&outbox, batch)).await;
            self.health.step_finished();
            let Some(turn) = turn else {
                abandoned = Some(Abandoned::StatementRunning);
                break;
            };
            match turn {
                Ok(Turn::Idle) => {
                    backoff.reset();
                    self.idle(&wakeup, &outbox).await;
                    connection = Some(outbox);
                }
                Ok(Turn::Relayed {
                    full,
                    broker_unavailable,
                    producer_unusable,
                    ahead,
                    to_mark: marking,
                    set_aside,
                }) => {
                    to_mark = marking;
                    if !set_aside.is_empty() {
                        stalled.set_aside(set_aside);
                        stalled.report(&self.metrics, &self.health, Instant::now());
                    }
                    let has_next = ahead.is_some();
                    claimed_ahead = ahead.map(|rows| (owned, rows));
                    refused_batches = if broker_unavailable { refused_batches + 1 } else { 0 };
                    if !stalled.is_empty() {
                        // A new producer would abandon the records set aside in flight; they
                        // settle first (a broken session fails them, and they go out again).
                    } else if producer_unusable {
                        warn!("the broker refused this producer session; starting a new producer");
                        publisher = self.new_publisher()?;
                        self.metrics.producer_restarts.inc();
                    } else if refused_batches >= FRESH_PRODUCER_AFTER_REFUSED_BATCHES {
                        // librdkafka recovers most producer-state problems by itself, but one
                        // it cannot (a broker that lost the producer id, as after a restart
                        // with fresh storage) shows only as timeouts. A new session costs
                        // nothing during a real outage and ends that kind of stall.
                        warn!(
                            batches = refused_batches,
                            "nothing delivered in consecutive batches; starting a new producer session"
                        );
                        publisher = self.new_publisher()?;
                        self.metrics.producer_restarts.inc();
                        refused_batches = 0;
                    }
                    if broker_unavailable {
                        let delay = backoff.next_delay();
                        warn!(retry_in = ?delay, "the broker took none of the batch; backing off");
                        // A broker outage is not a frozen relay: it keeps its shards meanwhile.
                        self.with_heartbeat(&outbox, self.pause(delay, deadline)).await;
                    } else {
                        backoff.reset();
                        if !full && !has_next {
                            // A partial batch: the shards are drained for now.
                            self.idle(&wakeup, &outbox).await;
                        }
                    }
                    connection = Some(outbox);
                }
                Ok(Turn::Unsettled(settlement, e)) => {
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in = ?delay, "could not mark the batch; retrying before claiming more");
                    unsettled = Some(settlement);
                    self.pause(delay, deadline).await;
                }
                Ok(Turn::Abandoned { rows }) => {
                    abandoned = Some(Abandoned::Unacknowledged { rows });
                    break;
                }
                Err(e @ OutboxError::TableReplaced { .. }) => {
                    // Nothing was published from the other table; the connection is dropped
                    // with its locks, and the next turn connects to the table there is now.
                    error!(error = %e, "the outbox table was replaced; reconnecting");
                    self.metrics.table_changes.with_label_values(&["replaced"]).inc();
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in = ?delay, "database error; reconnecting");
                    self.pause(delay, deadline).await;
                }
            }

            if let Some(fatal) = publisher.fatal_error() {
                error!(error = %fatal, "the Kafka producer hit a fatal error; replacing it");
                publisher = self.new_publisher()?;
                self.metrics.producer_restarts.inc();
            }
        }

        if abandoned.is_some()
            && let Some(canceller) = &canceller
        {
            // The statement cut short may still run in PostgreSQL (waiting on a lock, say),
            // holding the session, and with it the shards' locks, until it ends.
            canceller.cancel().await;
        }
        let flush_time = deadline.map(|d| d.saturating_duration_since(Instant::now())).unwrap_or_default();
        if let Err(e) = publisher.flush(flush_time) {
            debug!(error = %e, "flush at shutdown incomplete");
        }
        if let Some(what) = abandoned {
            return Err(RelayError::Abandoned {
                grace: relay.shutdown_timeout,
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

    /// Awaits `delivery`, the reports of a batch of `records` records, for as long as it takes
    /// (librdkafka never abandons a record), saying every so often that the broker keeps the
    /// batch waiting. Meanwhile the wait does not count against liveness.
    async fn awaiting_acknowledgements<T>(&self, delivery: impl Future<Output = T>, records: usize) -> T {
        self.health.awaiting_broker(true);
        let started = Instant::now();
        tokio::pin!(delivery);
        let outcome = loop {
            tokio::select! {
                outcome = &mut delivery => break outcome,
                _ = tokio::time::sleep(ACKNOWLEDGEMENT_WAIT_WARNING) => warn!(
                    records,
                    waiting_s = started.elapsed().as_secs(),
                    brokers_up = self.metrics.kafka_brokers_up.get(),
                    "the broker has not acknowledged this batch yet; still waiting (records are never abandoned, since \
                     one the broker already wrote would be sent twice)"
                ),
            }
        };
        self.health.awaiting_broker(false);
        outcome
    }

    /// Claims one batch of `shards` (or takes the one claimed ahead), publishes it, awaits every
    /// report and records the outcome.
    async fn relay_batch(
        &self,
        outbox: &Outbox,
        publisher: &Publisher,
        ahead: Option<Claimed>,
        mut previous: Option<Settlement>,
        mut claiming: Claiming<'_>,
    ) -> Result<Turn, OutboxError> {
        let started = Instant::now();
        let claimed = match ahead {
            Some(rows) => rows,
            None => {
                // A claim now would find the previous batch's rows still unpublished.
                if let Some(mut earlier) = previous.take()
                    && let Err(e) = self.settle(outbox, &mut earlier).await
                {
                    return Ok(Turn::Unsettled(earlier, e));
                }
                self.claim(outbox, &mut claiming, &[]).await?
            }
        };
        if claimed.rows.is_empty() {
            self.health.progress();
            return Ok(Turn::Idle);
        }
        // The ownership tests block the loop here, with a batch claimed and not yet produced,
        // until another relay has taken its shards over.
        fail::fail_point!("relay-before-produce");
        // A relay frozen since it claimed these rows (or since the previous batch, for rows
        // claimed ahead) may have lost its shards to another relay, which publishes the rows
        // itself: hand them to the producer only if the session holding the locks still exists.
        if let Err(e) = outbox.confirm_session(shards::FENCE).await {
            warn!(
                rows = claimed.rows.len(),
                error = %e,
                "the session holding this relay's shards did not answer: dropping the claimed batch unpublished, \
                 since another relay may own its shards now"
            );
            return match previous {
                Some(earlier) => Ok(Turn::Unsettled(earlier, e)),
                None => Err(e),
            };
        }
        let claimed_count = claimed.rows.len();
        self.health.work_claimed();
        self.metrics.batch_size.observe(claimed_count as f64);
        let span = info_span!(
            "batch",
            rows = claimed_count,
            acknowledged = Empty,
            failed = Empty,
            claim_ms = millis(started.elapsed()),
            deliver_ms = Empty,
            mark_ms = Empty,
            duration_ms = Empty
        );
        let outcome = self
            .publish_and_settle(outbox, publisher, claimed, previous, started, claiming)
            .instrument(span.clone())
            .await;
        if let Ok(Turn::Relayed { .. }) = &outcome {
            span.record("duration_ms", started.elapsed().as_millis() as u64);
        }
        outcome
    }

    /// Publishes claimed rows and awaits every report. Meanwhile the database writes the
    /// `previous` batch's outcome and then claims the next one. This batch's
    /// outcome is written now, or, when the next batch is claimed, handed back to be written
    /// while that one is produced: the database's work overlaps the broker's, and still no row
    /// is marked before its own report, nothing is claimed before the rows before it are
    /// marked, and the next batch goes out only after every row of this one was acknowledged.
    async fn publish_and_settle(
        &self,
        outbox: &Outbox,
        publisher: &Publisher,
        claimed: Claimed,
        previous: Option<Settlement>,
        started: Instant,
        mut claiming: Claiming<'_>,
    ) -> Result<Turn, OutboxError> {
        let Claimed { rows: claimed, full } = claimed;
        let claimed_count = claimed.len();
        debug!(rows = claimed_count, "claimed a batch");
        let in_flight: Vec<String> = claimed
            .iter()
            .map(|row| match row {
                Ok(row) => row.id.clone(),
                Err(unreadable) => unreadable.id.clone(),
            })
            // An id that could not be read cannot be left out by id; such a batch fails a row,
            // so whatever is claimed ahead is dropped anyway.
            .filter(|id| !id.is_empty())
            .collect();

        let mut settlement = Settlement::default();
        let mut records = Vec::with_capacity(claimed.len());
        let mut ids = Vec::with_capacity(claimed.len());
        let mut created = Vec::with_capacity(claimed.len());
        // A row that fails here holds back the later rows of its key in this batch, exactly as
        // a failed row holds them back in later claims: they are not produced, and stay
        // unpublished and untouched until the failed row is published or (with `skip`) given up.
        let mut held = HeldKeys::default();
        let mut deferred = 0;
        for row in claimed {
            let built = match row {
                Ok(row) if held.holds(row.key.as_deref()) => {
                    deferred += 1;
                    continue;
                }
                Ok(row) => match Record::from_row(&row, &self.mapping.topic) {
                    Ok(record) => Ok((row.row_ref(), row.created_at, record)),
                    Err(problem) => Err(UnreadableRow {
                        id: row.id,
                        event_id: Some(row.event_id),
                        key: RowKey::Known(row.key),
                        problem,
                    }),
                },
                Err(unreadable) => Err(unreadable),
            };
            match built {
                Ok((id, created_at, record)) => {
                    if self.config.log.payloads {
                        debug!(
                            row = %id,
                            topic = %record.topic,
                            key = ?record.key,
                            payload = %record.payload.as_deref().map(String::from_utf8_lossy).unwrap_or_default(),
                            "record"
                        );
                    }
                    ids.push(id);
                    created.push(created_at);
                    records.push(record);
                }
                Err(UnreadableRow { id, event_id, key, problem }) => {
                    self.failure_reports.report(&id, "invalid_row", &problem);
                    self.metrics.publish_errors.with_label_values(&["invalid_row"]).inc();
                    let key_of_held = key.clone();
                    held.hold(key);
                    if !id.is_empty() {
                        let key = match key_of_held {
                            RowKey::Known(key) => key,
                            RowKey::Unreadable => None,
                        };
                        settlement.row_failures.push(RowFailure { row: RowRef { id, event_id }, key, error: problem });
                    }
                }
            }
        }
        if deferred > 0 {
            debug!(rows = deferred, "rows wait behind an earlier row of their key that failed in this batch");
        }

        let delivery_started = Instant::now();
        // The next batch is claimed even after a short one: under a steady stream rows commit
        // while a batch is produced, and claiming them meanwhile lets this batch's mark overlap
        // their publish (at 5k rows/s this halved the p99 latency). An idle table costs one
        // empty claim per batch.
        let mark_previous_and_claim_next = async {
            if let Some(mut earlier) = previous
                && let Err(e) = self.settle(outbox, &mut earlier).await
            {
                // Nothing is claimed ahead over rows that may still look unpublished.
                return (Some((earlier, e)), None);
            }
            (None, self.claim_ahead(outbox, &mut claiming, &in_flight).await)
        };
        let stalled_after = self.config.relay.stalled_partition_after;
        let deliver = self.awaiting_acknowledgements(publisher.publish(&records, stalled_after), records.len());
        let sent_at = Instant::now();
        let deliver_and_claim_next = async { tokio::join!(deliver, mark_previous_and_claim_next) };
        let (published, (previous_unsettled, ahead)) = tokio::select! {
            both = deliver_and_claim_next => both,
            _ = self.shutdown.grace_expired(self.config.relay.shutdown_timeout) => {
                return Ok(Turn::Abandoned { rows: records.len() });
            }
        };

        // The crash tests stop the process here, after the broker acknowledged the batch and
        // before any row of it is marked: the window that makes delivery at-least-once.
        fail::fail_point!("relay-before-mark", |_| std::process::abort());

        let mut producer_unusable = false;
        let mut first_failure = None;
        // Keys of records the broker refused: a later record of such a key that it acknowledged
        // went out ahead of its predecessor. Only a rejection after sending can do that (failures
        // found before sending hold the key back); it is reported, since it cannot be undone.
        let mut refused_keys: HashSet<String> = HashSet::new();
        let mut pending: HashMap<usize, PendingReport> =
            published.unacknowledged.into_iter().map(|report| (report.index, report)).collect();
        let mut set_aside = Vec::new();
        let rows = ids.into_iter().zip(records).zip(published.outcomes).zip(created).enumerate();
        for (index, (((id, record), outcome), created_at)) in rows {
            if let (Outcome::Acked { .. }, Some(key)) = (&outcome, &record.key)
                && refused_keys.contains(key)
            {
                self.metrics.key_order_breaks.inc();
                error!(
                    row = %id,
                    key = %key,
                    "the broker acknowledged this record after refusing an earlier record of its key in the same batch: \
                     the key's order is broken on the topic (see outbox_relay_key_order_breaks_total in the README)"
                );
            }
            if let (Outcome::Failed(failure), Some(key)) = (&outcome, &record.key)
                && !failure.transient
            {
                refused_keys.insert(key.clone());
            }
            match outcome {
                Outcome::Acked { at } => {
                    if let (Some(created_at), Ok(acked_at)) = (created_at, at.duration_since(UNIX_EPOCH)) {
                        // Clocks of the database and the relay host; a negative skew counts as 0.
                        self.metrics.delivery_latency.observe((acked_at.as_secs_f64() - created_at).max(0.0));
                    }
                    settlement.acked.push(AckedRow { row: id, topic: record.topic });
                }
                Outcome::Failed(failure) => {
                    self.metrics.publish_errors.with_label_values(&[failure.reason]).inc();
                    producer_unusable |= failure.producer_unusable;
                    first_failure.get_or_insert_with(|| format!("row {id}: {}", failure.message));
                    let key = record.key;
                    if failure.transient {
                        settlement.outage_failures.push(RowFailure { row: id, key, error: failure.message });
                    } else {
                        self.failure_reports.report(&id.id, failure.reason, &failure.message);
                        settlement.row_failures.push(RowFailure { row: id, key, error: failure.message });
                    }
                }
                Outcome::Deferred => {}
                Outcome::StillInFlight => {
                    if let Some(report) = pending.remove(&index) {
                        let partition = publisher.partition_of(&record);
                        set_aside.push(SetAside::new(
                            id,
                            record.key,
                            record.topic,
                            partition,
                            created_at,
                            sent_at,
                            report,
                        ));
                    }
                }
            }
        }
        if let Some(first) = first_failure {
            warn!(
                failed = settlement.row_failures.len() + settlement.outage_failures.len(),
                acknowledged = settlement.acked.len(),
                first = %first,
                "some records of the batch were not delivered; their rows stay unpublished"
            );
        }
        let broker_unavailable = settlement.acked.is_empty() && !settlement.outage_failures.is_empty();
        // The batch claimed ahead assumed every row of this one would be published: a failed or
        // deferred row must be retried (or hold its key) before anything claimed after it.
        let ahead = if settlement.acked.len() == claimed_count { ahead } else { None };
        if !settlement.acked.is_empty() {
            self.health.progress();
        }
        let span = tracing::Span::current();
        span.record("acknowledged", settlement.acked.len());
        span.record("failed", settlement.row_failures.len() + settlement.outage_failures.len());
        span.record("deliver_ms", millis(delivery_started.elapsed()));

        if !set_aside.is_empty() {
            warn!(
                records = set_aside.len(),
                acknowledged = settlement.acked.len(),
                "records of this batch still wait for the broker after relay.stalled_partition_after: set aside in flight, \
                 so that the rest goes on (their rows and the later rows of their keys wait)"
            );
        }
        // The records set aside are never dropped with their batch: a batch whose outcome could
        // not be written goes back as one to write before the next claim, with them.
        let relayed = |ahead, to_mark, set_aside| Turn::Relayed {
            full,
            broker_unavailable,
            producer_unusable,
            ahead,
            to_mark,
            set_aside,
        };
        if let Some((earlier, e)) = previous_unsettled {
            settlement.absorb(earlier);
            if set_aside.is_empty() {
                return Ok(Turn::Unsettled(settlement, e));
            }
            warn!(error = %e, "could not mark the previous batch; it is written again before the next claim");
            return Ok(relayed(None, Some(settlement), set_aside));
        }
        if ahead.is_some() {
            self.metrics.batch_duration.observe(started.elapsed().as_secs_f64());
            return Ok(relayed(ahead, Some(settlement), set_aside));
        }
        let mark_started = Instant::now();
        if let Err(e) = self.settle(outbox, &mut settlement).await {
            if set_aside.is_empty() {
                return Ok(Turn::Unsettled(settlement, e));
            }
            warn!(error = %e, "could not mark the batch; it is written again before the next claim");
            return Ok(relayed(ahead, Some(settlement), set_aside));
        }
        span.record("mark_ms", millis(mark_started.elapsed()));
        self.metrics.batch_duration.observe(started.elapsed().as_secs_f64());
        Ok(relayed(ahead, None, set_aside))
    }

    /// Claims the batch after `in_flight` while that one awaits its delivery reports, so that
    /// the database's work overlaps the broker's. The rows in flight are left out (they are not
    /// marked yet); everything else follows the claim's usual rules, as if they were published.
    async fn claim_ahead(&self, outbox: &Outbox, claiming: &mut Claiming<'_>, in_flight: &[String]) -> Option<Claimed> {
        match self.claim(outbox, claiming, in_flight).await {
            Ok(claimed) if !claimed.rows.is_empty() => Some(claimed),
            Ok(_) => None,
            Err(e) => {
                // The mark that follows meets the same problem and handles it.
                debug!(error = %e, "could not claim the next batch ahead");
                None
            }
        }
    }

    /// Claims the next batch of `shards` but `in_flight`, starting at the claim floor, and lets
    /// the floor learn from what the claim saw.
    async fn claim(
        &self,
        outbox: &Outbox,
        claiming: &mut Claiming<'_>,
        in_flight: &[String],
    ) -> Result<Claimed, OutboxError> {
        let Claiming { shards, floor, set_aside, held_keys } = claiming;
        let mut left_out: Vec<String> = in_flight.iter().chain(set_aside.iter()).cloned().collect();
        // Read at each claim: the mark written just before it may have kept rows apart.
        let mut held: Vec<String> = held_keys.clone();
        if let Ok(quarantine) = self.quarantine.lock()
            && !quarantine.is_empty()
        {
            left_out.extend(quarantine.row_ids().map(str::to_owned));
            held.extend(quarantine.held_keys());
        }
        let (in_flight, held_keys) = (left_out.as_slice(), held.as_slice());
        let start = floor.start(shards, Instant::now());
        let limit = self.claim_limit.load(Ordering::Relaxed);
        let batch_bytes = self.config.relay.batch_bytes;
        let mut claim = outbox.claim(limit, batch_bytes, shards, in_flight, start, held_keys).await?;
        if floor.observe(start, claim.view.as_ref(), Instant::now()) == Observation::IdsReused {
            self.metrics.table_changes.with_label_values(&["ids_reused"]).inc();
            // The floor is gone: claim again from the beginning, where the rows that took the
            // reused ids are.
            let start = floor.start(shards, Instant::now());
            claim = outbox.claim(limit, batch_bytes, shards, in_flight, start, held_keys).await?;
            floor.observe(start, claim.view.as_ref(), Instant::now());
        }
        // Rows too large for a whole window of them: ask for no more rows than fitted, so the
        // database does not read and send rows the relay would only read past; grow back as
        // the rows get smaller.
        let next = if claim.full && claim.rows.len() < limit {
            claim.rows.len().max(1)
        } else {
            limit.saturating_mul(2).min(self.config.relay.batch_size)
        };
        self.claim_limit.store(next, Ordering::Relaxed);
        Ok(Claimed { rows: claim.rows, full: claim.full })
    }

    /// The outcome of the records set aside whose reports have come, to be written as a
    /// batch's is; `None` when none has come.
    fn take_reported(&self, stalled: &mut StalledRecords) -> Option<Settlement> {
        let reported = stalled.take_reported();
        if reported.is_empty() {
            return None;
        }
        let mut settlement = Settlement::default();
        for (record, outcome) in reported {
            match outcome {
                Outcome::Acked { at } => {
                    if let (Some(created_at), Ok(acked_at)) = (record.created_at, at.duration_since(UNIX_EPOCH)) {
                        self.metrics.delivery_latency.observe((acked_at.as_secs_f64() - created_at).max(0.0));
                    }
                    settlement.acked.push(AckedRow { row: record.row, topic: record.topic });
                }
                Outcome::Failed(failure) => {
                    self.metrics.publish_errors.with_label_values(&[failure.reason]).inc();
                    let failed = RowFailure { row: record.row, key: record.key, error: failure.message };
                    if failure.transient {
                        settlement.outage_failures.push(failed);
                    } else {
                        self.failure_reports.report(&failed.row.id, failure.reason, &failed.error);
                        settlement.row_failures.push(failed);
                    }
                }
                // A report resolves to an acknowledgement or a failure only.
                Outcome::Deferred | Outcome::StillInFlight => {}
            }
        }
        if !settlement.acked.is_empty() {
            self.health.progress();
        }
        info!(
            acknowledged = settlement.acked.len(),
            failed = settlement.row_failures.len() + settlement.outage_failures.len(),
            "reports came for records set aside while their partition stalled"
        );
        Some(settlement)
    }

    /// [`Relay::settle`] as a step the liveness probe watches.
    async fn settle_step(&self, outbox: &Outbox, settlement: &mut Settlement) -> Result<(), OutboxError> {
        self.health.step_started();
        let result = self.settle(outbox, settlement).await;
        self.health.step_finished();
        result
    }

    /// Writes a batch's outcome: marks the acknowledged rows, records the failed ones.
    async fn settle(&self, outbox: &Outbox, settlement: &mut Settlement) -> Result<(), OutboxError> {
        if !settlement.acked_marked {
            let rows: Vec<RowRef> = settlement.acked.iter().map(|acked| acked.row.clone()).collect();
            match outbox.mark_published(&rows).await {
                Ok(_) => {}
                Err(e) if e.is_refused_for_a_row() => self.mark_row_by_row(outbox, settlement, &e).await?,
                Err(e) => return Err(e),
            }
            settlement.acked_marked = true;
            for acked in &settlement.acked {
                self.metrics.published.with_label_values(&[&acked.topic]).inc();
            }
            self.failure_reports.forget(settlement.acked.iter().map(|acked| acked.row.id.as_str()));
        }
        let given_up = match outbox.record_failures(&settlement.row_failures, &settlement.outage_failures).await {
            Ok(given_up) => given_up,
            Err(e) if e.is_refused_for_a_row() => self.record_failures_row_by_row(outbox, settlement, &e).await?,
            Err(e) => return Err(e),
        };
        let row_retries = settlement.row_failures.len().saturating_sub(given_up.len());
        self.metrics.retries.with_label_values(&["row"]).inc_by(row_retries as u64);
        self.metrics.retries.with_label_values(&["outage"]).inc_by(settlement.outage_failures.len() as u64);
        for id in &given_up {
            let failure = settlement.row_failures.iter().find(|f| f.row.id == *id);
            let error = failure.map(|f| f.error.as_str()).unwrap_or("");
            warn!(
                row = %id,
                error,
                attempts = self.config.relay.max_attempts,
                "giving up on a row: marked failed; `outbox-relay retry` re-queues it"
            );
            if let (OnPoison::Skip, Some(key)) = (self.config.relay.on_poison, failure.and_then(|f| f.key.as_ref())) {
                // Its key's later rows go ahead without it now: should it ever be published, it
                // comes after them.
                self.metrics.key_order_breaks.inc();
                error!(
                    row = %id,
                    key = %key,
                    "relay.on_poison = \"skip\": the key's later rows are published without this row, so the key's order \
                     on the topic is broken (see outbox_relay_key_order_breaks_total in the README)"
                );
            }
        }
        self.failure_reports.forget(given_up.iter().map(String::as_str));
        debug!(
            published = settlement.acked.len(),
            failed = settlement.row_failures.len() + settlement.outage_failures.len(),
            "batch settled"
        );
        Ok(())
    }

    /// Marks a batch's acknowledged rows one by one after the database refused the batch's mark
    /// (`refused`) because of some row: each row it refuses again is kept apart and named.
    async fn mark_row_by_row(
        &self,
        outbox: &Outbox,
        settlement: &Settlement,
        refused: &OutboxError,
    ) -> Result<(), OutboxError> {
        warn!(rows = settlement.acked.len(), error = %refused, "the database refused a batch's mark; marking row by row");
        for acked in &settlement.acked {
            match outbox.mark_published(std::slice::from_ref(&acked.row)).await {
                Ok(_) => {}
                Err(e) if e.is_refused_for_a_row() => {
                    error!(
                        row = %acked.row,
                        error = %e,
                        "the broker acknowledged this row but the database refuses to mark it published; it is not \
                         published again while the relay runs, and marked once the database takes it (a restart before \
                         that publishes it once more)"
                    );
                    self.keep_apart(acked.row.clone(), None, Unwritten::Mark { topic: acked.topic.clone() });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Records a batch's failures one by one after the database refused the batch's record
    /// (`refused`): each row it refuses again is kept apart, its key held, and named. Returns
    /// the rows given up on.
    async fn record_failures_row_by_row(
        &self,
        outbox: &Outbox,
        settlement: &Settlement,
        refused: &OutboxError,
    ) -> Result<Vec<String>, OutboxError> {
        warn!(error = %refused, "the database refused to record a batch's failures; recording them row by row");
        let mut given_up = Vec::new();
        let failures = settlement.row_failures.iter().map(|f| (f, false));
        for (failure, outage) in failures.chain(settlement.outage_failures.iter().map(|f| (f, true))) {
            let (rows, outages) = if outage {
                (&[][..], std::slice::from_ref(failure))
            } else {
                (std::slice::from_ref(failure), &[][..])
            };
            match outbox.record_failures(rows, outages).await {
                Ok(ids) => given_up.extend(ids),
                Err(e) if e.is_refused_for_a_row() => {
                    error!(
                        row = %failure.row,
                        error = %e,
                        "the database refuses to record this row's failed attempt; the row and the later rows of its key \
                         wait until it does"
                    );
                    let unwritten = Unwritten::Failure { failure: failure.clone(), outage };
                    self.keep_apart(failure.row.clone(), failure.key.clone(), unwritten);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(given_up)
    }

    /// Keeps `row` apart until `unwritten` can be written ([`crate::relay::quarantine`]).
    fn keep_apart(&self, row: RowRef, key: Option<String>, unwritten: Unwritten) {
        if let Ok(mut quarantine) = self.quarantine.lock() {
            quarantine.add(row, key, unwritten, Instant::now());
        }
    }

    /// Tries again to write what the database refused for rows kept apart, for those due.
    async fn write_quarantined(&self, outbox: &Outbox) {
        let due = match self.quarantine.lock() {
            Ok(mut quarantine) => quarantine.take_due(Instant::now()),
            Err(_) => return,
        };
        for kept in due {
            let written = match &kept.unwritten {
                Unwritten::Mark { .. } => outbox.mark_published(std::slice::from_ref(&kept.row)).await.map(|_| ()),
                Unwritten::Failure { failure, outage: false } => {
                    outbox.record_failures(std::slice::from_ref(failure), &[]).await.map(|_| ())
                }
                Unwritten::Failure { failure, outage: true } => {
                    outbox.record_failures(&[], std::slice::from_ref(failure)).await.map(|_| ())
                }
            };
            self.after_quarantined_write(kept, written);
        }
    }

    /// Releases a row kept apart once written, or keeps it for another try.
    fn after_quarantined_write(&self, kept: QuarantinedRow, written: Result<(), OutboxError>) {
        match written {
            Ok(()) => {
                info!(row = %kept.row, "the database took what it had refused for this row; it is released");
            }
            Err(e) => {
                debug!(row = %kept.row, error = %e, "the database still refuses this row's outcome");
                if let Ok(mut quarantine) = self.quarantine.lock() {
                    quarantine.refused_again(kept, Instant::now());
                }
            }
        }
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

/// What abandoning these settlements leaves unpublished: their acknowledged rows not yet
/// marked, if any (failures not recorded leave nothing that was published).
fn unmarked<'a>(settlements: impl Iterator<Item = &'a Settlement>) -> Option<Abandoned> {
    let rows: usize = settlements.filter(|s| !s.acked_marked).map(|s| s.acked.len()).sum();
    (rows > 0).then_some(Abandoned::Unmarked { rows })
}

/// A duration in milliseconds to a hundredth, for the batch span's fields (a float's full
/// digits, `0.7458290000000001`, only make the log harder to read).
fn millis(elapsed: Duration) -> f64 {
    (elapsed.as_secs_f64() * 100_000.0).round() / 100.0
}

/// How long a batch waits for its acknowledgements before the relay says so, and how often it
/// says so again: long enough that a leader election passes unremarked.
const ACKNOWLEDGEMENT_WAIT_WARNING: Duration = Duration::from_secs(15);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_row_holds_back_its_key_and_an_unreadable_key_holds_every_keyed_row() {
        let mut held = HeldKeys::default();
        held.hold(RowKey::Known(None));
        assert!(!held.holds(Some("K")), "a keyless row holds nothing");
        held.hold(RowKey::Known(Some("K".into())));
        assert!(held.holds(Some("K")) && !held.holds(Some("L")) && !held.holds(None));
        held.hold(RowKey::Unreadable);
        assert!(held.holds(Some("L")), "any keyed row may share an unreadable key");
        assert!(!held.holds(None), "keyless rows have no order to keep");
    }

    #[test]
    fn batch_timings_are_logged_to_a_hundredth_of_a_millisecond() {
        assert_eq!(millis(Duration::from_nanos(745_829)), 0.75);
        assert_eq!(millis(Duration::from_millis(12)), 12.0);
    }
}
