//! What the probes answer, kept as plain atomics that the loop updates and `/healthz` and
//! `/readyz` read, so a probe never waits for the database or the broker.
//!
//! - Alive (`/healthz`): the loop is not stuck in one step (a claim, a mark) for longer than
//!   `health.liveness_timeout`. Waiting between polls, backing off during an outage or waiting
//!   for the broker's acknowledgements (however long) is not being stuck.
//! - Ready (`/readyz`): connected to PostgreSQL, the brokers reachable, and, whenever the relay
//!   has rows it could publish, some of them acknowledged within `health.readiness_window`.
//!   Rows it cannot claim yet (parked behind a failed row, waiting for an open transaction)
//!   do not make it unready; an outage or a stalled pipeline does, and so (unless
//!   `health.stuck_rows_fail_readiness` is off) do rows failing with errors of their own or
//!   given up on, which only an operator can unstick.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::HealthConfig;

/// Milliseconds since the epoch, 0 meaning "not set".
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1).max(1)
}

/// The relay's health, shared by the loop (writer) and the probes (readers).
#[derive(Debug, Default)]
pub struct Health {
    /// When the current step began, if the loop is in one.
    busy_since: AtomicU64,
    /// Whether the step is waiting for the broker's acknowledgements, which takes as long as a
    /// broker outage does: not a stuck relay (a restart would not help, and would send the
    /// batch again).
    awaiting_broker: AtomicBool,
    /// Whether the claim connection is up.
    database_connected: AtomicBool,
    /// Whether librdkafka reports at least one broker up (from its statistics and errors).
    brokers_up: AtomicBool,
    /// Since when the relay has had claimable rows without getting any acknowledged.
    waiting_for_progress_since: AtomicU64,
    /// Rows failing with errors of their own (retried after a backoff), as last counted.
    failing_rows: AtomicU64,
    /// Rows given up on (waiting for `outbox-relay retry`), as last counted.
    failed_rows: AtomicU64,
    /// Partitions keeping records unacknowledged, described ([`crate::stalled`]).
    stalled_partitions: Mutex<Vec<String>>,
}

/// A probe's answer, also its JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Whether the probe passes.
    pub ok: bool,
    /// Why not, when it does not.
    pub reasons: Vec<String>,
}

impl Health {
    /// A relay that has not connected to anything yet.
    pub fn new() -> Health {
        Health::default()
    }

    /// The loop starts a step that should finish on its own (claim, publish, mark).
    pub fn step_started(&self) {
        self.busy_since.store(now_ms(), Ordering::Relaxed);
    }

    /// The step finished; the loop is between steps (or waiting by design).
    pub fn step_finished(&self) {
        self.busy_since.store(0, Ordering::Relaxed);
    }

    /// The step waits for (`true`) or has received (`false`) the broker's acknowledgements.
    pub fn awaiting_broker(&self, waiting: bool) {
        if !waiting && self.busy_since.load(Ordering::Relaxed) != 0 {
            // The rest of the step (marking) is timed from here.
            self.busy_since.store(now_ms(), Ordering::Relaxed);
        }
        self.awaiting_broker.store(waiting, Ordering::Relaxed);
    }

    /// The table's latest counts of failing and failed rows.
    pub fn set_stuck_rows(&self, failing: i64, failed: i64) {
        self.failing_rows.store(failing.max(0) as u64, Ordering::Relaxed);
        self.failed_rows.store(failed.max(0) as u64, Ordering::Relaxed);
    }

    /// The partitions that keep records unacknowledged, each described for `/readyz`.
    pub fn set_stalled_partitions(&self, reasons: Vec<String>) {
        if let Ok(mut stalled) = self.stalled_partitions.lock() {
            *stalled = reasons;
        }
    }

    /// The claim connection came up or went away.
    pub fn set_database_connected(&self, connected: bool) {
        self.database_connected.store(connected, Ordering::Relaxed);
    }

    /// librdkafka reports brokers up or all down.
    pub fn set_brokers_up(&self, up: bool) {
        self.brokers_up.store(up, Ordering::Relaxed);
    }

    /// A claim returned rows the relay will now try to publish.
    pub fn work_claimed(&self) {
        let _ = self.waiting_for_progress_since.compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Rows were acknowledged, or there is nothing to publish: no progress is owed.
    pub fn progress(&self) {
        self.waiting_for_progress_since.store(0, Ordering::Relaxed);
        self.brokers_up.store(true, Ordering::Relaxed);
    }

    /// The liveness verdict.
    pub fn alive(&self, liveness_timeout: Duration) -> Verdict {
        let busy_since = self.busy_since.load(Ordering::Relaxed);
        let stuck_for = now_ms().saturating_sub(busy_since);
        let awaiting_broker = self.awaiting_broker.load(Ordering::Relaxed);
        if busy_since != 0 && !awaiting_broker && stuck_for >= liveness_timeout.as_millis() as u64 {
            return Verdict {
                ok: false,
                reasons: vec![format!("the relay loop has been in one step for {} s", stuck_for / 1000)],
            };
        }
        Verdict { ok: true, reasons: Vec::new() }
    }

    /// The readiness verdict.
    pub fn ready(&self, config: &HealthConfig) -> Verdict {
        let readiness_window = config.readiness_window;
        let mut reasons = Vec::new();
        if !self.database_connected.load(Ordering::Relaxed) {
            reasons.push("not connected to PostgreSQL".to_owned());
        }
        if !self.brokers_up.load(Ordering::Relaxed) {
            reasons.push("no Kafka broker reachable".to_owned());
        }
        let waiting_since = self.waiting_for_progress_since.load(Ordering::Relaxed);
        if waiting_since != 0 {
            let waiting_for = now_ms().saturating_sub(waiting_since);
            if waiting_for >= readiness_window.as_millis() as u64 {
                reasons.push(format!("rows to publish, none acknowledged for {} s", waiting_for / 1000));
            }
        }
        if let Ok(stalled) = self.stalled_partitions.lock() {
            reasons.extend(stalled.iter().cloned());
        }
        if config.stuck_rows_fail_readiness {
            let failing = self.failing_rows.load(Ordering::Relaxed);
            if failing > 0 {
                reasons.push(format!(
                    "{failing} rows failing with errors of their own, retried after a backoff: \
                     `outbox-relay status` names them and their errors"
                ));
            }
            let failed = self.failed_rows.load(Ordering::Relaxed);
            if failed > 0 {
                reasons.push(format!(
                    "{failed} rows given up on: fix the cause, then `outbox-relay retry` (`outbox-relay status` names them)"
                ));
            }
        }
        Verdict { ok: reasons.is_empty(), reasons }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(readiness_window: Duration) -> HealthConfig {
        HealthConfig { readiness_window, ..HealthConfig::default() }
    }

    #[test]
    fn failing_or_failed_rows_make_the_relay_unready_unless_turned_off() {
        let health = Health::new();
        health.set_database_connected(true);
        health.set_brokers_up(true);
        health.set_stuck_rows(1, 0);
        let verdict = health.ready(&HealthConfig::default());
        assert!(!verdict.ok && verdict.reasons[0].contains("1 rows failing"), "{verdict:?}");
        health.set_stuck_rows(0, 2);
        assert!(health.ready(&HealthConfig::default()).reasons[0].contains("2 rows given up on"));
        let off = HealthConfig { stuck_rows_fail_readiness: false, ..HealthConfig::default() };
        assert!(health.ready(&off).ok);
        health.set_stuck_rows(0, 0);
        assert!(health.ready(&HealthConfig::default()).ok);
    }

    #[test]
    fn a_connected_relay_without_work_is_ready_and_alive() {
        let health = Health::new();
        health.set_database_connected(true);
        health.set_brokers_up(true);
        assert!(health.ready(&window(Duration::from_secs(60))).ok);
        assert!(health.alive(Duration::from_secs(60)).ok);
    }

    #[test]
    fn claimed_work_without_acknowledgements_makes_the_relay_unready_after_the_window() {
        let health = Health::new();
        health.set_database_connected(true);
        health.set_brokers_up(true);
        health.work_claimed();
        assert!(health.ready(&window(Duration::from_secs(60))).ok, "within the window");
        let verdict = health.ready(&window(Duration::ZERO));
        assert!(!verdict.ok && verdict.reasons[0].contains("none acknowledged"), "{verdict:?}");
        health.progress();
        assert!(health.ready(&window(Duration::ZERO)).ok, "progress clears it");
    }

    #[test]
    fn waiting_for_the_broker_is_not_being_stuck_and_the_rest_of_the_step_is_timed_afresh() {
        let health = Health::new();
        health.step_started();
        health.awaiting_broker(true);
        assert!(health.alive(Duration::ZERO).ok, "a broker outage is not a stuck relay");
        std::thread::sleep(Duration::from_millis(20));
        health.awaiting_broker(false);
        assert!(health.alive(Duration::from_millis(15)).ok, "the wait is not counted against the mark");
        assert!(!health.alive(Duration::ZERO).ok, "the rest of the step is timed");
    }

    #[test]
    fn a_step_stuck_past_the_timeout_is_not_alive() {
        let health = Health::new();
        health.step_started();
        assert!(health.alive(Duration::from_secs(60)).ok, "within the timeout");
        assert!(!health.alive(Duration::ZERO).ok);
        health.step_finished();
        assert!(health.alive(Duration::ZERO).ok);
    }

    #[test]
    fn lost_connections_are_reasons() {
        let health = Health::new();
        let verdict = health.ready(&window(Duration::from_secs(60)));
        assert!(!verdict.ok);
        assert_eq!(verdict.reasons.len(), 2, "{verdict:?}");
    }
}
