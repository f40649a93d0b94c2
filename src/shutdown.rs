//! Graceful shutdown, passed explicitly to every loop that must stop.
//!
//! SIGTERM or SIGINT *requests* shutdown: the relay stops claiming new rows, finishes the batch
//! in flight (its delivery reports and its mark) and exits. The grace period bounds that: a
//! batch whose reports have not arrived when it ends is abandoned unmarked, which is safe,
//! because unmarked rows are simply published again by the next run.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A handle on the process-wide shutdown request. Clones share the same request.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    requested: CancellationToken,
}

impl Shutdown {
    /// A shutdown that nothing has requested yet.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Asks every holder to stop.
    pub fn request(&self) {
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

    /// Completes `grace` after shutdown is requested: the point at which in-flight work is
    /// abandoned.
    pub async fn grace_expired(&self, grace: Duration) {
        self.requested().await;
        tokio::time::sleep(grace).await;
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

/// Exit status after a second signal, as shells report a process ended by SIGINT.
const EXIT_INTERRUPTED: i32 = 130;
