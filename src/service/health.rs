//! What the probes answer, kept as plain atomics that the loop updates and `/healthz` and
//! `/readyz` read, so a probe never waits for the database or the broker.
//!
//! - Alive (`/healthz`): the loop is not stuck in one step (a claim, a mark) for longer than
//!   `health.liveness_timeout`. Waiting between polls, backing off during an outage or waiting
//!   for the broker's acknowledgements (however long) is not being stuck; nor is a statement
//!   waiting on a lock another session holds, which the relay reports (readiness, a warning)
//!   instead: a restart would only wait on the same lock again.
//! - Ready (`/readyz`): connected to PostgreSQL, the brokers reachable, and, whenever the relay
//!   has rows it could publish, some of them acknowledged within `health.readiness_window`.
//!   Rows it cannot claim yet (parked behind a failed row, waiting for an open transaction)
//!   do not make it unready; an outage or a stalled pipeline does, and so (unless
//!   `health.stuck_rows_fail_readiness` is off) do rows failing with errors of their own or
//!   given up on, which only an operator can unstick.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::HealthConfig;

/// A lock wait this long makes the relay unready: shorter ones come and go in normal operation.
pub const LOCK_WAIT_REPORTED_AFTER: Duration = Duration::from_secs(1);

/// Milliseconds since the epoch, 0 meaning "not set".
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1).max(1)
}

/// A statement of the relay waiting on a lock that other sessions hold.
#[derive(Debug, Clone, PartialEq)]
pub struct LockWait {
    /// The waiting session's backend pid.
    pub pid: i32,
    /// How long its statement has run, nearly all of it waiting.
    pub seconds: f64,
    /// The start of that statement.
    pub query: String,
    /// The lock it waits for: "a row lock (transactionid ShareLock)" (a row another
    /// transaction has locked or changed), "a lock on outbox (AccessShareLock)", ...
    pub waiting_for: String,
    /// The sessions it waits for (`pg_blocking_pids`): holders of the lock, or sessions queued
    /// ahead of it for the lock.
    pub blocking_pids: Vec<i32>,
    /// The first of them: `idle in transaction`, `active`, ...; `None` when PostgreSQL hides
    /// another role's session from the relay's role (or it just ended).
    pub blocker_state: Option<String>,
    /// How long its transaction has been open; `None` when hidden.
    pub blocker_seconds: Option<f64>,
    /// The start of its current or last statement (what took the lock, often);
    /// `<insufficient privilege>` when hidden.
    pub blocker_query: Option<String>,
}

impl LockWait {
    /// How many characters of a statement a description shows.
    const STATEMENT_SHOWN: usize = 60;

    /// Who holds the lock: "backend pid 4712 (idle in transaction, transaction open 40 s:
    /// SELECT ...)".
    pub fn holders(&self) -> String {
        let pids = self.blocking_pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
        let mut text = format!("{} {pids}", if self.blocking_pids.len() == 1 { "backend pid" } else { "backend pids" });
        match &self.blocker_state {
            Some(state) => {
                text.push_str(&format!(" ({state}"));
                if let Some(seconds) = self.blocker_seconds {
                    text.push_str(&format!(", transaction open {seconds:.0} s"));
                }
                if let Some(query) = &self.blocker_query {
                    text.push_str(&format!(": {}", shortened(query, Self::STATEMENT_SHOWN)));
                }
                text.push(')');
            }
            None => text.push_str(" (PostgreSQL hides its activity from the relay's role; pg_read_all_stats shows it)"),
        }
        text
    }
}

impl std::fmt::Display for LockWait {
    /// "a statement of the relay (backend pid 4711: UPDATE ...) has waited 12 s for a row lock
    /// (transactionid ShareLock) held by backend pid 4712 (idle in transaction, ...)"
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a statement of the relay (backend pid {}: {}) has waited {:.0} s for {} held by {}",
            self.pid,
            shortened(&self.query, Self::STATEMENT_SHOWN),
            self.seconds,
            self.waiting_for,
            self.holders()
        )
    }
}

/// The first `chars` characters of a statement on one line, with an ellipsis if it goes on.
fn shortened(statement: &str, chars: usize) -> String {
    let flat = statement.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(chars) {
        Some((cut, _)) => format!("{}...", &flat[..cut]),
        None => flat,
    }
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
    /// Partitions keeping records unacknowledged, described ([`crate::relay::stalled`]).
    stalled_partitions: Mutex<Vec<String>>,
    /// Backend pid of the claim session, the one the loop's statements run on (0: none).
    claim_session: AtomicI32,
    /// What the claim session's statement waits for, as last seen from another connection
    /// (`None` when it was seen not waiting on a lock).
    lock_wait: Mutex<Option<LockWait>>,
}

/// A probe's answer, also its JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
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

    /// The backend pid of the claim session, or `None` while there is none.
    pub fn set_claim_session(&self, pid: Option<i32>) {
        self.claim_session.store(pid.unwrap_or(0), Ordering::Relaxed);
        if pid.is_none() {
            self.lock_wait_seen(None);
        }
    }

    /// The backend pid of the claim session, if connected.
    pub fn claim_session(&self) -> Option<i32> {
        Some(self.claim_session.load(Ordering::Relaxed)).filter(|pid| *pid != 0)
    }

    /// The claim session was seen waiting on a lock other sessions hold (`Some`), or not. While
    /// it waits, each sighting restarts the step's clock, as an acknowledgement does: the wait
    /// is another session's doing, reported rather than counted as a stuck loop. Once sightings
    /// stop (the lock was released, or nothing watches any more), the step is timed again.
    pub fn lock_wait_seen(&self, wait: Option<LockWait>) {
        if wait.is_some() {
            let now = now_ms();
            let _ =
                self.busy_since.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |since| (since != 0).then_some(now));
        }
        if let Ok(mut seen) = self.lock_wait.lock() {
            *seen = wait;
        }
    }

    /// The lock wait last seen, if the claim session was waiting then.
    pub fn lock_wait(&self) -> Option<LockWait> {
        self.lock_wait.lock().ok().and_then(|seen| seen.clone())
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
        if let Some(wait) = self.lock_wait()
            && wait.seconds >= LOCK_WAIT_REPORTED_AFTER.as_secs_f64()
        {
            reasons.push(format!(
                "{wait}; the relay goes on once that lock is released (the holder commits or rolls back; \
                 pg_terminate_backend(pid) ends a session that will not)"
            ));
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

    fn row_lock_wait(seconds: f64) -> LockWait {
        LockWait {
            pid: 4711,
            seconds,
            query: "UPDATE outbox SET published_at = now()".into(),
            waiting_for: "a row lock (transactionid ShareLock)".into(),
            blocking_pids: vec![4712],
            blocker_state: Some("idle in transaction".into()),
            blocker_seconds: Some(40.0),
            blocker_query: Some("SELECT * FROM outbox FOR UPDATE".into()),
        }
    }

    #[test]
    fn a_statement_waiting_on_another_sessions_lock_is_reported_not_taken_for_a_stuck_loop() {
        let health = Health::new();
        health.set_database_connected(true);
        health.set_brokers_up(true);
        health.step_started();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!health.alive(Duration::from_millis(15)).ok, "a step this long is stuck, unless it waits on a lock");
        health.lock_wait_seen(Some(row_lock_wait(0.5)));
        assert!(health.alive(Duration::from_millis(15)).ok, "each sighting of the wait restarts the step's clock");
        assert!(health.ready(&HealthConfig::default()).ok, "a wait under a second is not worth a reason");

        health.lock_wait_seen(Some(row_lock_wait(12.0)));
        let verdict = health.ready(&HealthConfig::default());
        assert!(!verdict.ok, "{verdict:?}");
        assert!(verdict.reasons[0].contains("held by backend pid 4712 (idle in transaction"), "{verdict:?}");

        health.lock_wait_seen(None);
        assert!(health.ready(&HealthConfig::default()).ok, "the reason goes with the wait");
        std::thread::sleep(Duration::from_millis(20));
        assert!(!health.alive(Duration::from_millis(15)).ok, "without sightings the step is timed again");
        health.step_finished();
        health.lock_wait_seen(Some(row_lock_wait(1.0)));
        assert!(health.alive(Duration::ZERO).ok, "a sighting between steps starts no step");
    }

    #[test]
    fn a_lock_wait_is_forgotten_with_the_session_that_waited() {
        let health = Health::new();
        health.set_claim_session(Some(4711));
        health.lock_wait_seen(Some(row_lock_wait(3.0)));
        health.set_claim_session(None);
        assert_eq!((health.claim_session(), health.lock_wait()), (None, None));
    }

    #[test]
    fn a_lock_wait_names_the_lock_and_its_holder_on_one_short_line() {
        let mut wait = LockWait {
            pid: 4711,
            seconds: 12.4,
            query: format!("UPDATE \"outbox\" AS t\n   SET \"published_at\" = now() {}", "x".repeat(300)),
            waiting_for: "a row lock (transactionid ShareLock)".into(),
            blocking_pids: vec![4712],
            blocker_state: Some("idle in transaction".into()),
            blocker_seconds: Some(40.0),
            blocker_query: Some("SELECT * FROM outbox WHERE key = 'k' FOR UPDATE".into()),
        };
        let text = wait.to_string();
        assert!(
            text.starts_with(
                "a statement of the relay (backend pid 4711: UPDATE \"outbox\" AS t SET \"published_at\" = now() xxx"
            ),
            "{text}"
        );
        assert!(
            text.contains("...) has waited 12 s for a row lock (transactionid ShareLock) held by backend pid 4712 \
                           (idle in transaction, transaction open 40 s: SELECT * FROM outbox WHERE key = 'k' FOR UPDATE)"),
            "{text}"
        );
        assert!(!text.contains('\n') && text.len() < 300, "{text}");
        wait.blocking_pids = vec![4712, 4713];
        wait.blocker_state = None;
        assert!(wait.holders().starts_with("backend pids 4712, 4713 (PostgreSQL hides"), "{}", wait.holders());
    }

    #[test]
    fn lost_connections_are_reasons() {
        let health = Health::new();
        let verdict = health.ready(&window(Duration::from_secs(60)));
        assert!(!verdict.ok);
        assert_eq!(verdict.reasons.len(), 2, "{verdict:?}");
    }
}
