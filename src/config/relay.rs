//! `[relay]`: how the loop batches, polls, backs off, shares shards and stops.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The shortest `relay.takeover_after`. A relay keeps its claim session visibly active at
/// least every second (the relay loop's heartbeat), and hands a batch to the producer only
/// if that session proved itself within the last 1.5 s: both hold for any mix of relays whose
/// `takeover_after` is at least this, so relays need not agree on it.
pub const MIN_TAKEOVER_AFTER: Duration = Duration::from_secs(3);

/// `[relay]`: the loop's pacing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Most rows claimed and produced in one batch.
    pub batch_size: usize,
    /// Most bytes of row data (payloads, keys, headers) in one batch; a single row larger than
    /// this goes out alone. Bounds the relay's memory whatever the rows' sizes: a batch in
    /// flight, its copy in librdkafka's queue and the batch claimed ahead.
    pub batch_bytes: usize,
    /// How long an idle relay waits before looking for new rows again.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// First wait after a database or broker failure; doubles up to `backoff_max`.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest wait between retries.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// After SIGTERM, how long the relay may spend finishing its in-flight batch. Rows
    /// still unacknowledged then stay unpublished and are sent again by the next run.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How often the pending-row metrics are refreshed.
    #[serde(with = "humantime_serde")]
    pub stats_interval: Duration,
    /// Failed attempts caused by a row itself (not by an outage) before the relay gives up on it
    /// and marks it failed.
    pub max_attempts: u32,
    /// Wait before retrying a row after its first failed attempt; doubles per attempt.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_initial: Duration,
    /// Longest wait between attempts of one row.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// What a failed row does to later rows of its key: `park_key` holds them back (per-key
    /// order wins) until `outbox-relay retry`; `skip` lets them flow.
    pub on_poison: OnPoison,
    /// Shards the table's keys are split into, each published by exactly one relay. Every
    /// relay of a table must use the same number.
    pub shards: u32,
    /// How often a relay checks shard ownership: takes free shards, hands back extra ones,
    /// and takes over the shards of relays that look frozen.
    #[serde(with = "humantime_serde")]
    pub rebalance_interval: Duration,
    /// How long another relay's database session may stay idle before this relay ends it
    /// (`pg_terminate_backend`) and so takes its shards over: a relay runs a statement about
    /// every second whatever it is doing, so a session idle this long belongs to a relay that
    /// is frozen (stopped, hung, paused with its host). At least [`MIN_TAKEOVER_AFTER`].
    #[serde(with = "humantime_serde")]
    pub takeover_after: Duration,
    /// LISTEN for NOTIFY on the `outbox_relay` channel: from `outbox-relay retry`, and from
    /// the `outbox_relay_notify` trigger on tables that keep it.
    pub listen: bool,
    /// How often an idle relay asks PostgreSQL whether the commit horizon moved (one trivial
    /// query), so that new rows go out without waiting for the next poll and without a NOTIFY
    /// in the writers' transactions; for a second after the horizon last moved, four times as
    /// often. Zero turns it off.
    #[serde(with = "humantime_serde")]
    pub commit_watch_interval: Duration,
    /// How often a claim starts at the beginning of the table instead of at the claim floor,
    /// to pick up rows made claimable again out of band (an operator setting `published_at`
    /// back to NULL). Zero: every claim starts at the beginning.
    #[serde(with = "humantime_serde")]
    pub full_scan_interval: Duration,
    /// Log a warning naming the blocking backend when an open transaction has held rows back
    /// for longer than this.
    #[serde(with = "humantime_serde")]
    pub holdback_warning: Duration,
    /// How long a batch waits for its last acknowledgements while the brokers are up before
    /// its unacknowledged records are set aside: they stay in flight (never abandoned), their
    /// rows and the later rows of their keys wait, and every other row flows. One partition
    /// the broker cannot write (too few in-sync replicas, an offline log directory, a deleted
    /// topic) so holds back only the rows routed to it.
    #[serde(with = "humantime_serde")]
    pub stalled_partition_after: Duration,
}

/// What a row that has failed for good does to the later rows of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPoison {
    /// Later rows of the key wait until the failed row is retried or removed.
    ParkKey,
    /// Later rows of the key are published; the failed row is left behind.
    Skip,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 1000,
            batch_bytes: 16 * 1024 * 1024,
            poll_interval: Duration::from_millis(200),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            stats_interval: Duration::from_secs(5),
            max_attempts: 10,
            retry_backoff_initial: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(300),
            on_poison: OnPoison::ParkKey,
            shards: 16,
            rebalance_interval: Duration::from_secs(1),
            takeover_after: Duration::from_secs(30),
            listen: true,
            commit_watch_interval: Duration::from_millis(20),
            full_scan_interval: Duration::from_secs(10),
            holdback_warning: Duration::from_secs(30),
            stalled_partition_after: Duration::from_secs(5),
        }
    }
}
