//! Graceful shutdown, passed explicitly to every loop that must stop.
//!
//! SIGTERM or SIGINT *requests* shutdown: the relay stops claiming new rows, finishes the batch
//! in flight (its delivery reports and its mark) and exits. The grace period bounds that: a
//! batch whose reports have not arrived, or whose mark has not been written, when it ends is
//! abandoned unmarked, which is safe, because unmarked rows are simply published again by the
//! next run; the relay then says what it abandoned ([`Abandoned`]) and exits with a status of
//! its own, since that is no clean stop.
//!
//! The grace period runs from the request, whatever the relay is doing: every wait of the loop
//! that can outlast it (a delivery report, a statement waiting on another session's lock) is
//! bounded by [`Shutdown::within_grace`], so that no database or broker can keep the relay
//! past `relay.shutdown_timeout`.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A handle on the process-wide shutdown request. Clones share the same request.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    requested: CancellationToken,
    /// When shutdown was first requested: the grace period counts from here, however late a
    /// loop notices the request.
    requested_at: Arc<OnceLock<Instant>>,
}

impl Shutdown {
    /// A shutdown that nothing has requested yet.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Asks every holder to stop.
    pub fn request(&self) {
        self.requested_at.get_or_init(Instant::now);
        self.requested.cancel();
    }

    /// Whether shutdown has been requested.
    pub fn is_requested(&self) -> bool {
        self.requested.is_cancelled()
    }

    /// Completes when shutdown is requested.
    pub async fn requested(&self) {
        self.requested.cancelled().await
    }

    /// The end of the grace period `grace`, once shutdown is requested.
    pub fn deadline(&self, grace: Duration) -> Option<std::time::Instant> {
        self.requested_at.get().map(|at| (*at + grace).into_std())
    }

    /// Completes `grace` after shutdown was requested: the point at which in-flight work is
    /// abandoned.
    pub async fn grace_expired(&self, grace: Duration) {
        self.requested().await;
        let at = self.requested_at.get().copied().unwrap_or_else(Instant::now);
        tokio::time::sleep_until(at + grace).await;
    }

    /// Runs `work` unless the grace period `grace` ends first (`None`): before shutdown is
    /// requested, for as long as `work` takes. Should both be ready at once, `work`'s own answer
    /// wins: it may say better what it leaves unfinished.
    pub async fn within_grace<T>(&self, grace: Duration, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            done = work => Some(done),
            _ = self.grace_expired(grace) => None,
        }
    }

    /// Requests shutdown on the first SIGTERM or SIGINT; a second one exits the process at once
    /// (status 130), for an operator who will not wait for the grace period. Exiting early is
    /// safe: rows not yet marked are published again by the next run. Returns an error if the
    /// signal handlers cannot be installed.
    pub fn on_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let shutdown = self.clone();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "shutdown requested: finishing the batch in flight");
            shutdown.request();
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::warn!(signal = name, "second signal: exiting now; unmarked rows will be published again");
            std::process::exit(EXIT_INTERRUPTED);
        });
        Ok(())
    }
}

/// What a shutdown's grace period ended before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Abandoned {
    /// Delivery reports were outstanding.
    Unacknowledged {
        /// Records sent.
        rows: usize,
    },
    /// The broker had acknowledged rows whose mark could not be written.
    Unmarked {
        /// Rows acknowledged.
        rows: usize,
    },
    /// A statement of the batch in flight (its claim, or a mark) had not finished.
    StatementRunning,
}

impl std::fmt::Display for Abandoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Abandoned::Unacknowledged { rows } => write!(f, "with delivery reports of {rows} records outstanding"),
            Abandoned::Unmarked { rows } => write!(f, "before {rows} acknowledged rows could be marked"),
            Abandoned::StatementRunning => {
                write!(f, "while a statement of the batch in flight (its claim or a mark) was running in PostgreSQL")
            }
        }
    }
}

/// Exit status after a second signal, as shells report a process ended by SIGINT.
const EXIT_INTERRUPTED: i32 = 130;

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn the_grace_period_counts_from_the_request_not_from_when_a_wait_begins() {
        let shutdown = Shutdown::new();
        assert_eq!(shutdown.deadline(GRACE), None);
        shutdown.request();
        let deadline = shutdown.deadline(GRACE).expect("requested");
        tokio::time::sleep(GRACE / 2).await;
        shutdown.grace_expired(GRACE).await;
        let late = std::time::Instant::now().saturating_duration_since(deadline);
        assert!(late < GRACE / 2, "a wait begun halfway ends with the grace period, {late:?} after it");
    }

    #[tokio::test]
    async fn a_wait_is_cut_at_the_end_of_the_grace_period_and_only_then() {
        let shutdown = Shutdown::new();
        let quick = shutdown.within_grace(GRACE, async { 7 });
        assert_eq!(quick.await, Some(7), "without a request, work runs to its end");
        shutdown.request();
        let forever = shutdown.within_grace(GRACE, std::future::pending::<()>());
        assert_eq!(tokio::time::timeout(GRACE * 5, forever).await, Ok(None), "cut when the grace period ends");
        let ready = shutdown.within_grace(GRACE, async { 8 });
        assert_eq!(ready.await, Some(8), "work that is ready wins over an expired grace period");
    }
}
