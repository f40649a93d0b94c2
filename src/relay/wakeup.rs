//! Wake-ups: an idle relay, between polls, goes back to claiming as soon as rows may have
//! become claimable, instead of waiting out the poll interval.
//!
//! Two sources, on one connection of their own:
//! - **The commit watch**: every `relay.commit_watch_interval` a trivial query reads the
//!   commit horizon. A row is claimable once its transaction and every older one have ended,
//!   which is exactly when the horizon (`pg_snapshot_xmin`) passes it, so a horizon that has
//!   not moved means nothing new is claimable and the relay sleeps on. It needs nothing from
//!   the writers: no trigger, no NOTIFY in their transaction (which PostgreSQL refuses to
//!   PREPARE, so two-phase commit works), no lock in their commit path. A table without an
//!   `xact_id` column makes rows claimable at commit, so there any change of the snapshot
//!   (a transaction that writes starting or ending) counts.
//! - **LISTEN** (`relay.listen`): for tables that keep the `outbox_relay_notify` trigger, and
//!   for `outbox-relay retry`, which sends `RESCAN_PAYLOAD`.
//!
//! Wake-ups are only hints. A lost one (the connection dropped, a connection pooler that does
//! not pass notifications on) costs at most one poll interval; the relay never depends on them
//! for correctness.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tracing::{debug, warn};

use crate::config::Config;
use crate::postgres::connect::connect_raw;
use crate::postgres::error::describe_pg_error;
use crate::service::backoff::Backoff;
use crate::service::reconnect::{self, Lost};
use crate::service::shutdown::Shutdown;

use crate::postgres::notify::{CHANNEL, RESCAN_PAYLOAD};

/// How long after the horizon last moved the commit watch looks more often.
const BUSY_FOR: Duration = Duration::from_secs(1);

/// How many times more often the watch looks while commits keep coming.
const BUSY_SPEEDUP: u32 = 4;

/// How long the commit watch waits before its next look: `interval` on a quiet table, so an
/// idle relay costs PostgreSQL one trivial query per interval, and a quarter of it for
/// [`BUSY_FOR`] after the horizon last moved. A row committed while the relay idles waits for
/// the next look, on average half the pause: in the benchmark (1,000 to 10,000 rows/s, linger
/// 1 ms) the faster pace took the median commit-to-mark from 16-21 ms to 9-10 ms, and the extra
/// looks are few next to the writes that moved the horizon.
fn next_look(interval: Duration, last_moved: Option<Instant>, now: Instant) -> Duration {
    match last_moved {
        Some(moved) if now.saturating_duration_since(moved) < BUSY_FOR => interval / BUSY_SPEEDUP,
        _ => interval,
    }
}

/// A source of "rows may have arrived" hints.
#[derive(Debug, Clone)]
pub struct Wakeup {
    notify: Arc<Notify>,
    /// Set by a [`RESCAN_PAYLOAD`] notification until the relay takes it.
    rescan: Arc<AtomicBool>,
}

/// What the commit watch compares between two looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitSignal {
    /// The commit horizon: rows carry their transaction's id (`xact_id`) and are claimable
    /// only below it.
    Horizon,
    /// The whole snapshot: rows are claimable as soon as their transaction commits.
    AnyCommit,
}

impl CommitSignal {
    /// The statement that reads it, as text.
    fn sql(self) -> &'static str {
        match self {
            CommitSignal::Horizon => "SELECT pg_snapshot_xmin(pg_current_snapshot())::text",
            CommitSignal::AnyCommit => "SELECT pg_current_snapshot()::text",
        }
    }
}

impl Wakeup {
    /// Hints that never come: the relay polls.
    pub fn disabled() -> Wakeup {
        Wakeup { notify: Arc::new(Notify::new()), rescan: Arc::new(AtomicBool::new(false)) }
    }

    /// Whether a rescan was asked for since the last call.
    pub fn take_rescan_request(&self) -> bool {
        self.rescan.swap(false, Ordering::AcqRel)
    }

    /// Watches for commits (`signal`, every `relay.commit_watch_interval`) and, with
    /// `relay.listen`, listens on `CHANNEL`, over a connection of its own until shutdown,
    /// reconnecting with backoff when it drops.
    pub fn start(config: &Config, signal: CommitSignal, shutdown: Shutdown) -> Wakeup {
        let wakeup = Wakeup::disabled();
        if config.relay.listen || !config.relay.commit_watch_interval.is_zero() {
            tokio::spawn(watch_until_shutdown(config.clone(), signal, wakeup.clone(), shutdown));
        }
        wakeup
    }

    /// Completes at the next hint (at once if one came since the last call).
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

async fn watch_until_shutdown(config: Config, signal: CommitSignal, wakeup: Wakeup, shutdown: Shutdown) {
    let backoff = Backoff::new(config.relay.backoff_initial, config.relay.backoff_max);
    let session = || watch_once(&config, signal, &wakeup);
    let lost = |ended: &Lost, delay: Duration| {
        warn!(error = %ended.reason, retry_in = ?delay, "wake-up connection lost; polling until it is back");
        // A commit, or a retry, may have happened while no one watched.
        wakeup.rescan.store(true, Ordering::Release);
        wakeup.notify.notify_one();
    };
    reconnect::until_shutdown(backoff, &shutdown, session, lost).await;
}

/// Runs one wake-up connection until it fails.
async fn watch_once(config: &Config, signal: CommitSignal, wakeup: &Wakeup) -> Lost {
    let (client, mut connection) = match connect_raw(config).await {
        Ok(pair) => pair,
        Err(e) => return Lost { reason: e.to_string(), was_set_up: false },
    };
    let forwarded = wakeup.clone();
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let forward = async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    if note.payload() == RESCAN_PAYLOAD {
                        forwarded.rescan.store(true, Ordering::Release);
                    }
                    forwarded.notify.notify_one();
                }
                Ok(_) => {}
                Err(e) => return describe_pg_error(&e),
            }
        }
        "the server closed the connection".to_owned()
    };
    let watch = async {
        if config.relay.listen {
            if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                return Lost { reason: describe_pg_error(&e), was_set_up: false };
            }
            debug!(channel = CHANNEL, "listening for new rows");
        }
        // Rows may have committed between the relay's last claim and now, unseen by anyone.
        wakeup.notify.notify_one();
        let interval = config.relay.commit_watch_interval;
        if interval.is_zero() {
            // Keep the client (and so the connection) alive while notifications are forwarded.
            return std::future::pending::<Lost>().await;
        }
        let mut last_seen: Option<String> = None;
        let mut last_moved: Option<Instant> = None;
        loop {
            tokio::time::sleep(next_look(interval, last_moved, Instant::now())).await;
            match client.query_one(signal.sql(), &[]).await {
                Ok(row) => {
                    let seen: Option<String> = row.get(0);
                    if seen != last_seen {
                        last_seen = seen;
                        last_moved = Some(Instant::now());
                        wakeup.notify.notify_one();
                    }
                }
                Err(e) => return Lost { reason: describe_pg_error(&e), was_set_up: true },
            }
        }
    };
    tokio::select! {
        reason = forward => Lost { reason, was_set_up: true },
        ended = watch => ended,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_watch_looks_more_often_only_while_commits_keep_coming() {
        let interval = Duration::from_millis(20);
        let now = Instant::now();
        assert_eq!(next_look(interval, None, now), interval, "a table never seen moving is watched at the interval");
        let just_moved = now.checked_sub(Duration::from_millis(100));
        assert_eq!(next_look(interval, just_moved, now), Duration::from_millis(5));
        let long_quiet = now.checked_sub(BUSY_FOR + Duration::from_millis(1));
        assert_eq!(next_look(interval, long_quiet, now), interval, "a quiet table costs one look per interval again");
    }
}
