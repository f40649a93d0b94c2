//! Wake-ups: the outbox trigger sends a NOTIFY when rows commit, and the relay, idle between
//! polls, goes back to claiming at once instead of waiting out the poll interval.
//!
//! `outbox-relay retry` sends one too, with [`RESCAN_PAYLOAD`]: the rows it re-queued may lie
//! below the claim floor, so the next claim starts at the beginning ([`crate::claim_floor`]).
//!
//! Notifications are only a hint. A lost one (the LISTEN connection dropped, a connection
//! pooler that does not pass them on, a table without the trigger) costs at most one poll
//! interval; the relay never depends on them for correctness.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::shutdown::Shutdown;

/// The channel the outbox trigger notifies (`sql/migrations/0002_order_retries_notify.sql`).
pub const CHANNEL: &str = "outbox_relay";

/// The payload of the notification `outbox-relay retry` sends: rows may have become claimable
/// anywhere in the table, not only at its end.
pub const RESCAN_PAYLOAD: &str = "outbox-relay:rescan";

/// A source of "rows may have arrived" hints.
#[derive(Debug, Clone)]
pub struct Wakeup {
    notify: Arc<Notify>,
    /// Set by a [`RESCAN_PAYLOAD`] notification until the relay takes it.
    rescan: Arc<AtomicBool>,
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

    /// Listens on [`CHANNEL`] over a connection of its own until shutdown, reconnecting with
    /// backoff when it drops.
    pub fn listen(config: &Config, shutdown: Shutdown) -> Wakeup {
        let wakeup = Wakeup::disabled();
        tokio::spawn(listen_until_shutdown(config.clone(), wakeup.clone(), shutdown));
        wakeup
    }

    /// Completes at the next hint (at once if one came since the last call).
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

async fn listen_until_shutdown(config: Config, wakeup: Wakeup, shutdown: Shutdown) {
    let mut backoff = Backoff::new(config.relay.backoff_initial, config.relay.backoff_max);
    loop {
        let ended = tokio::select! {
            ended = listen_once(&config, &wakeup) => ended,
            _ = shutdown.requested() => return,
        };
        if ended.was_listening {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        warn!(error = %ended.reason, retry_in = ?delay, "LISTEN connection lost; polling until it is back");
        // A commit, or a retry, may have happened while no one listened.
        wakeup.rescan.store(true, Ordering::Release);
        wakeup.notify.notify_one();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.requested() => return,
        }
    }
}

/// Why a LISTEN connection ended.
struct Ended {
    reason: String,
    /// Whether LISTEN had succeeded (so the next attempt starts with a short backoff).
    was_listening: bool,
}

/// Runs one LISTEN connection until it fails.
async fn listen_once(config: &Config, wakeup: &Wakeup) -> Ended {
    let (client, mut connection) = match crate::outbox::connect_raw(config).await {
        Ok(pair) => pair,
        Err(e) => return Ended { reason: e.to_string(), was_listening: false },
    };
    let wakeup = wakeup.clone();
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let forward = async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    if note.payload() == RESCAN_PAYLOAD {
                        wakeup.rescan.store(true, Ordering::Release);
                    }
                    wakeup.notify.notify_one();
                }
                Ok(_) => {}
                Err(e) => return crate::outbox::describe_pg_error(&e),
            }
        }
        "the server closed the connection".to_owned()
    };
    let listen = async {
        if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
            return Ended { reason: crate::outbox::describe_pg_error(&e), was_listening: false };
        }
        debug!(channel = CHANNEL, "listening for new rows");
        // Keep the client (and so the connection) alive while notifications are forwarded.
        std::future::pending::<Ended>().await
    };
    tokio::select! {
        reason = forward => Ended { reason, was_listening: true },
        ended = listen => ended,
    }
}
