//! How a background task (table gauges, retention, lock-wait watch, wake-ups) keeps a database
//! connection of its own: the connection is kept while it is open and opened again when it is
//! lost, and a lost connection only pauses the task, never the relay loop.
//!
//! Two shapes of task share it. A task that works in turns ([`crate::service::stats`],
//! [`crate::service::retention`], [`crate::service::lock_watch`]) asks [`Reconnecting::get`]
//! for the connection at each turn and keeps its own pace: a connection that cannot be opened
//! is tried again at the next turn. A task that holds one session open until it fails
//! ([`crate::relay::wakeup`]) runs it with [`until_shutdown`], which waits out a [`Backoff`]
//! between sessions and reports each loss once.

use std::future::Future;
use std::time::Duration;

use tokio_postgres::Client;

use crate::postgres::error::OutboxError;
use crate::postgres::outbox::Outbox;
use crate::service::backoff::Backoff;
use crate::service::shutdown::Shutdown;

/// A connection a background task can keep: it says when it is gone for good.
pub trait Connection {
    /// Whether the connection is closed and must be replaced.
    fn is_closed(&self) -> bool;
}

impl Connection for Outbox {
    fn is_closed(&self) -> bool {
        Outbox::is_closed(self)
    }
}

impl Connection for Client {
    fn is_closed(&self) -> bool {
        Client::is_closed(self)
    }
}

/// A background task's own connection: kept while it is open, opened again by the next
/// [`Reconnecting::get`] once it has closed or the task gave it up.
pub struct Reconnecting<C> {
    /// The connection of the last turn, if it was opened and not given up.
    current: Option<C>,
}

impl<C: Connection> Default for Reconnecting<C> {
    fn default() -> Self {
        Reconnecting { current: None }
    }
}

impl<C: Connection> Reconnecting<C> {
    /// No connection yet: the first [`Reconnecting::get`] opens one.
    pub fn new() -> Reconnecting<C> {
        Reconnecting::default()
    }

    /// The open connection, or a new one from `connect` when there is none or it has closed.
    /// A failure to connect leaves none, so the next call tries again.
    pub async fn get<F>(&mut self, connect: impl FnOnce() -> F) -> Result<&C, OutboxError>
    where
        F: Future<Output = Result<C, OutboxError>>,
    {
        let connection = match self.current.take().filter(|c| !c.is_closed()) {
            Some(open) => open,
            None => connect().await?,
        };
        Ok(self.current.insert(connection))
    }

    /// Gives the connection up after a failure that may have left it unusable: the next
    /// [`Reconnecting::get`] opens another.
    pub fn give_up(&mut self) {
        self.current = None;
    }
}

/// Why a session of a background task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// What failed, for the log.
    pub reason: String,
    /// Whether the session had been set up (so the next attempt starts with the shortest
    /// backoff again).
    pub was_set_up: bool,
}

/// Runs `session` again and again until shutdown. Each run opens its own connection and works
/// until the connection is lost; then `lost` hears why and how long the task now waits (to
/// say so once, and to do what the task must while it has no connection), and the task waits
/// out `backoff`, which starts again from its shortest wait after a session that was set up.
pub async fn until_shutdown<F>(
    mut backoff: Backoff,
    shutdown: &Shutdown,
    mut session: impl FnMut() -> F,
    mut lost: impl FnMut(&Lost, Duration),
) where
    F: Future<Output = Lost>,
{
    loop {
        let ended = tokio::select! {
            ended = session() => ended,
            _ = shutdown.requested() => return,
        };
        if ended.was_set_up {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        lost(&ended, delay);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.requested() => return,
        }
    }
}
