//! The relay's session with the outbox table: one connection, its layout checked against the
//! catalog, its shard lock keys, and the relay's statements prepared on it once.
//!
//! [`Outbox`] holds what every statement of the session shares; the statements themselves live
//! beside the code that runs them and decodes their rows, each file by what it does:
//! `claim`, `mark`,
//! `shard_locks`, `catalog`,
//! `table_stats`, `failed_rows`,
//! `audit_rows` and `retention`. Opening a session (connect, check the layout, derive the lock
//! keys, prepare) is `open`, so that this file, which every statement file imports, imports
//! none of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use postgres_openssl::MakeTlsConnector;
use tokio_postgres::{CancelToken, Client, Statement};

use crate::config::Config;
use crate::postgres::error::{OutboxError, describe_pg_error};
use crate::postgres::layout::{Layout, LayoutError, Mapping, OrderColumn, OrderSequence};

/// A connection to the database holding the outbox table, with the relay's statements
/// prepared on it.
pub struct Outbox {
    pub(in crate::postgres) client: Client,
    pub(in crate::postgres) layout: Arc<Layout>,
    /// The statements run often enough to be prepared, once per connection.
    pub(in crate::postgres) statements: Prepared,
    /// Retry backoff bounds in seconds, for the claim's per-row backoff.
    pub(in crate::postgres) retry_backoff: (f64, f64),
    /// Attempts caused by a row before it is given up on.
    pub(in crate::postgres) max_attempts: i32,
    /// What the catalog said of the claim order column at connect.
    pub(in crate::postgres) order_column: OrderColumn,
    /// The keys of the advisory locks the table's relays share it through.
    pub(in crate::postgres) locks: LockKeys,
    /// When this session last showed that it exists (and so still holds its locks).
    pub(in crate::postgres) proof: SessionProof,
    /// This session's backend process id, as `pg_stat_activity` and `pg_locks` show it.
    pub(in crate::postgres) backend_pid: i32,
    /// Cancels the statement this session is running.
    pub(in crate::postgres) canceller: StatementCanceller,
}

/// The advisory lock keys of one table (`shard_locks::LOCK_KEYS_SQL`): classids derived from the table's
/// OID, so every spelling of the table names the same locks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::postgres) struct LockKeys {
    /// The classid of the membership locks.
    pub(in crate::postgres) member: i32,
    /// The classid of the shard locks.
    pub(in crate::postgres) shard: i32,
    /// The classid of the shard-count locks.
    pub(in crate::postgres) shard_count: i32,
    /// The table, schema-qualified, for messages.
    pub(in crate::postgres) table: String,
    /// The table's OID when the keys were derived: every claim checks that the name still
    /// resolves to it.
    pub(in crate::postgres) table_oid: u32,
}

/// The statements prepared on a session, each built by the [`Layout`] method of the module
/// that runs it.
pub(in crate::postgres) struct Prepared {
    /// [`Layout::claim_sql`].
    pub(in crate::postgres) claim: Statement,
    /// [`Layout::mark_published_sql`].
    pub(in crate::postgres) mark_published: Statement,
    /// [`Layout::record_row_failures_sql`]; `None` when the table has nothing to record in.
    pub(in crate::postgres) record_row_failures: Option<Statement>,
    /// [`Layout::record_outage_failures_sql`]; `None` without a last-error column.
    pub(in crate::postgres) record_outage_failures: Option<Statement>,
    /// [`Layout::pending_stats_sql`].
    pub(in crate::postgres) pending_stats: Statement,
}

/// Asks PostgreSQL to cancel the statement a session is running, as `pg_cancel_backend` would,
/// over a connection of its own: the session itself may be busy waiting on a lock.
#[derive(Clone)]
pub struct StatementCanceller {
    pub(in crate::postgres) token: CancelToken,
    pub(in crate::postgres) tls: MakeTlsConnector,
}

impl StatementCanceller {
    /// The longest wait for the cancel request to reach the server.
    const WAIT: Duration = Duration::from_secs(1);

    /// Sends the cancel request; a session running nothing ignores it. Returns whether it was
    /// sent (the server does not say whether it cancelled anything).
    pub async fn cancel(&self) -> bool {
        match tokio::time::timeout(Self::WAIT, self.token.cancel_query(self.tls.clone())).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::debug!(error = %describe_pg_error(&e), "could not send a cancel request");
                false
            }
            Err(_) => {
                tracing::debug!("the cancel request did not reach the server in time");
                false
            }
        }
    }
}

/// When a session last proved that it exists: the moment a statement was *sent* that then
/// succeeded. Another relay may end this session only after it has been idle for
/// `relay.takeover_after`, and idle means since the server last began or ended a statement
/// of it, which is no earlier than that moment: so until the moment plus the shortest
/// `relay.takeover_after` this session, and every advisory lock it holds, is certain to exist.
#[derive(Debug)]
pub(in crate::postgres) struct SessionProof {
    /// A moment before the session was opened.
    base: Instant,
    /// Milliseconds after `base` at which the last proving statement was sent.
    sent_ms: AtomicU64,
}

impl SessionProof {
    pub(in crate::postgres) fn new(base: Instant) -> SessionProof {
        SessionProof { base, sent_ms: AtomicU64::new(0) }
    }

    /// A statement sent at `sent` succeeded. Statements may run concurrently on one
    /// connection, so the latest sending moment wins, whatever order they finish in.
    pub(in crate::postgres) fn proved(&self, sent: Instant) {
        let ms = u64::try_from(sent.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX);
        self.sent_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn age(&self) -> Duration {
        self.base.elapsed().saturating_sub(Duration::from_millis(self.sent_ms.load(Ordering::Relaxed)))
    }
}

/// The configured column mapping, or the configuration error that says what is wrong with it.
pub fn mapping_of(config: &Config) -> Result<Mapping, OutboxError> {
    Mapping::from_config(config).map_err(|problem| OutboxError::Layout(LayoutError { key: "outbox".into(), problem }))
}

impl Outbox {
    /// This session's backend process id.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// What cancels the statement this session is running, usable while it runs.
    pub fn canceller(&self) -> StatementCanceller {
        self.canceller.clone()
    }

    /// Whether claims may start at a floor ([`crate::relay::claim_floor`]): the order column is an
    /// integer fed by a sequence whose ids grow with time. Every claim reads the sequence again
    /// (`crate::postgres::claim::ClaimView::ids_grow_with_time`).
    pub fn ids_grow_with_time(&self) -> bool {
        self.layout.orders_by_integer()
            && self.order_column.sequence.as_ref().is_some_and(OrderSequence::grows_with_time)
    }

    /// What the catalog said of the claim order column at connect.
    pub fn order_column(&self) -> &OrderColumn {
        &self.order_column
    }

    /// The layout this connection was checked against.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether the connection is gone; a closed connection must be replaced.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The OID of the table this connection claims from, and whose shard locks it takes.
    pub fn table_oid(&self) -> u32 {
        self.locks.table_oid
    }

    /// The database's name and the table's schema-qualified name, as the server has them now.
    pub async fn database_and_table(&self) -> Result<(String, String), OutboxError> {
        let row = self
            .client
            .query_one(
                "SELECT current_database()::text, n.nspname || '.' || c.relname FROM pg_class AS c \
                 JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = $1",
                &[&self.locks.table_oid],
            )
            .await
            .map_err(OutboxError::query("read the database's name"))?;
        Ok((
            row.try_get(0).map_err(OutboxError::query("read the database's name"))?,
            row.try_get(1).map_err(OutboxError::query("read the table's name"))?,
        ))
    }

    /// The PostgreSQL server's system identifier (`pg_control_system()`), which its physical
    /// standbys share and another server (a new `initdb`) does not.
    pub async fn server_identifier(&self) -> Result<String, OutboxError> {
        let row = self
            .client
            .query_one("SELECT system_identifier::text FROM pg_control_system()", &[])
            .await
            .map_err(OutboxError::query("read the server's system identifier"))?;
        row.try_get(0).map_err(OutboxError::query("read the server's system identifier"))
    }

    /// The value of a run-time setting on this connection (`SHOW name`); `name` is a setting
    /// name written in the code, never input.
    pub async fn setting(&self, name: &'static str) -> Result<String, OutboxError> {
        let row =
            self.client.query_one(&format!("SHOW {name}"), &[]).await.map_err(OutboxError::query("show setting"))?;
        row.try_get(0).map_err(OutboxError::query("show setting"))
    }

    /// Runs a statement that does nothing, to show that this session exists: other relays
    /// watch it (`RelaySession::looks_frozen`), and it proves the session's locks are held.
    pub async fn ping(&self) -> Result<(), OutboxError> {
        let sent = Instant::now();
        self.client.batch_execute("SELECT 1").await.map_err(OutboxError::query("heartbeat"))?;
        self.proof.proved(sent);
        Ok(())
    }

    /// How long ago this session last proved that it exists: the sending of the last
    /// statement that then succeeded.
    pub fn proved_alive_ago(&self) -> Duration {
        self.proof.age()
    }

    /// Makes sure that this session, and so every lock it holds, existed at most `within`
    /// ago: if it has not proved that lately, runs a statement now. An error means the session
    /// is gone (or unreachable) and its shards may be another relay's.
    pub async fn confirm_session(&self, within: Duration) -> Result<(), OutboxError> {
        if self.proof.age() < within {
            return Ok(());
        }
        self.ping().await
    }
}
