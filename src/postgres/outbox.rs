//! Everything that touches the outbox table: connect, claim, mark, record failures, stats.
//!
//! A row is marked published only through [`Outbox::mark_published`], and the relay calls it
//! only with ids whose delivery report said the broker has the record. Nothing here decides
//! that; this module executes the statements `table.rs` writes, prepared once per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{CancelToken, Client, Statement};

use crate::config::{Config, redact_connection_string};
use crate::kafka::record::{OutboxRow, RowFailure, RowKey, RowRef, UnreadableRow};
use crate::postgres::layout::{
    AUDIT_TOPIC_COLUMN, CATALOG_COLUMNS_SQL, CATALOG_INDEXES_SQL, CATALOG_NOTIFY_TRIGGERS_SQL, CatalogColumn,
    LOCK_KEYS_SQL, LOCK_SHARD_COUNT_SQL, Layout, LayoutError, MISSING_PRIVILEGES_SQL, Mapping, OLD_VERSION_HOLDERS_SQL,
    ORDER_COLUMN_SQL, OTHER_SHARD_COUNTS_SQL, OWNERSHIP_SQL, OrderColumn, OrderSequence, Privilege, TABLE_COLUMNS_SQL,
    TERMINATE_FROZEN_SQL, TRY_LOCK_SQL, TableCatalog, TableIndex, UNLOCK_SHARD_COUNT_SQL, UNLOCK_SQL, claim_columns,
};
use crate::postgres::tls::ConnectOptions;
use crate::relay::claim_floor::{ClaimView, TableIdentity};

/// Default `application_name`, so operators can find the relay in `pg_stat_activity`.
const APPLICATION_NAME: &str = "outbox-relay";

/// How long a connection attempt may take when the URL does not say.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A failure at the database boundary.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The database could not be reached or refused the login.
    #[error("cannot connect to PostgreSQL at {target}: {}", describe_pg_error(source))]
    Connect {
        /// Host and database, without credentials.
        target: String,
        /// The driver's error.
        source: tokio_postgres::Error,
    },
    /// The connection settings cannot be used: a TLS file that cannot be read, say.
    #[error("cannot connect to PostgreSQL at {target}: {problem}")]
    Settings {
        /// Host and database, without credentials.
        target: String,
        /// What is wrong, naming the key.
        problem: String,
    },
    /// A statement failed (including a lost connection).
    #[error("PostgreSQL {what} failed: {}{}", describe_pg_error(source), privilege_hint(source))]
    Query {
        /// Which statement.
        what: &'static str,
        /// The driver's error.
        source: tokio_postgres::Error,
    },
    /// The server refused the login at startup: the database does not exist, or the role or
    /// its password was refused. A configuration problem, not an outage.
    #[error("{0}; check database.url (and database.password), the relay does not retry a login refused at startup")]
    Refused(Box<OutboxError>),
    /// The table's name now resolves to another table than the one this connection's locks
    /// and claims were for: renamed and replaced, or dropped and restored from a dump. The
    /// relay drops the connection, which frees its shards, and connects again to the table
    /// the name resolves to now.
    #[error(
        "outbox.table: table {table} was replaced under the relay: its name resolved to the table of OID {was} \
         and now resolves to {now}; the rows left unpublished in the old table (now {old_name}) are not published \
         by this relay. Reconnecting to the table the name resolves to now, with that table's shard locks"
    )]
    TableReplaced {
        /// The table, schema-qualified, as the relay connected to it.
        table: String,
        /// The OID the relay connected to.
        was: u32,
        /// What the name resolves to now: an OID, or "no table".
        now: String,
        /// What the old OID is called now (`outbox_old`), or "dropped".
        old_name: String,
    },
    /// The configured table does not exist.
    #[error(
        "outbox.table: table {0} does not exist; create it with `outbox-relay migrate` or point outbox.table at your table"
    )]
    TableMissing(String),
    /// A column does not fit its configured role.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The role the relay logs in as lacks privileges it needs on the table.
    #[error(
        "database.url: role {role} lacks privileges the relay needs on table {table}: {}; \
         as the table's owner, grant them (for the standard table: psql -v relay_role={role} -f sql/relay_role.sql, \
         with -v allow_delete=on for DELETE)",
        missing.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
    )]
    MissingPrivileges {
        /// The role of the relay's login.
        role: String,
        /// The table, as configured.
        table: String,
        /// What it lacks, and what for.
        missing: Vec<Privilege>,
    },
    /// Other relays of the table run with a different `relay.shards`: the two counts would
    /// hash keys to different shards, so both would publish some keys and neither others.
    #[error(
        "relay.shards = {ours}, but {}; every relay of a table must use the same count. \
         To change it, stop every relay of the table, then start them with the new value",
        others.iter().map(|other| other.describe(table)).collect::<Vec<_>>().join(", and ")
    )]
    ShardCountMismatch {
        /// The table, schema-qualified.
        table: String,
        /// This relay's `relay.shards`.
        ours: u32,
        /// The other counts in use, with the relays using them.
        others: Vec<OtherShardCount>,
    },
    /// Relays of an earlier version, which name their locks after the configured table text,
    /// run on the table: they cannot see this version's locks, so both would publish the same
    /// shards.
    #[error(
        "relays of an earlier outbox-relay version run on table {table} (backend pids {}): they \
         cannot see this version's shard locks, and both would publish the same rows. Stop them, \
         then start the relays of this version",
        pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
    )]
    EarlierVersionRunning {
        /// The table, schema-qualified.
        table: String,
        /// Backend pids of their sessions.
        pids: Vec<i32>,
    },
}

/// Relays of a table running with a `relay.shards` other than this relay's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherShardCount {
    /// Their `relay.shards`.
    pub shard_count: i64,
    /// Backend pids of their sessions.
    pub pids: Vec<i32>,
}

impl OtherShardCount {
    /// "1 other relay of table public.outbox (pid 4711) runs with relay.shards = 16".
    fn describe(&self, table: &str) -> String {
        let pids = self.pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
        match self.pids.len() {
            1 => format!("1 other relay of table {table} (pid {pids}) runs with relay.shards = {}", self.shard_count),
            n => {
                format!("{n} other relays of table {table} (pids {pids}) run with relay.shards = {}", self.shard_count)
            }
        }
    }
}

impl OutboxError {
    /// Whether waiting and retrying can help. A layout that does not match the table will not
    /// fix itself; a dropped connection will.
    pub fn is_transient(&self) -> bool {
        matches!(self, OutboxError::Connect { .. } | OutboxError::Query { .. } | OutboxError::TableReplaced { .. })
    }

    /// Whether the server refused a statement because of the values of some row it touched:
    /// a data exception (a value too long, say), an integrity constraint, a program limit (an
    /// index entry too large) or an exception a trigger raised. Writing the same rows again
    /// fails the same way; writing them one by one finds the row.
    pub fn is_refused_for_a_row(&self) -> bool {
        let OutboxError::Query { source, .. } = self else { return false };
        source.code().is_some_and(|code| {
            let code = code.code();
            code.starts_with("22") || code.starts_with("23") || code.starts_with("54") || code == "P0001"
        })
    }

    /// Whether the server refused the login itself: no such database, no such role, a wrong
    /// password, or no `pg_hba.conf` entry for it.
    pub fn is_refused_login(&self) -> bool {
        use tokio_postgres::error::SqlState;
        matches!(self, OutboxError::Connect { source, .. } if source.code().is_some_and(|c| {
            *c == SqlState::INVALID_CATALOG_NAME
                || *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        }))
    }

    /// Whether the server refused a value as not of the column's type (an id given on the
    /// command line that is not an id of the table, say).
    pub fn is_invalid_value(&self) -> bool {
        use tokio_postgres::error::SqlState;
        matches!(self, OutboxError::Query { source, .. }
            if source.code().is_some_and(|c| *c == SqlState::INVALID_TEXT_REPRESENTATION || *c == SqlState::NUMERIC_VALUE_OUT_OF_RANGE))
    }

    fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> OutboxError {
        move |source| OutboxError::Query { what, source }
    }
}

/// A connection to the database holding the outbox table, with the relay's statements
/// prepared on it.
pub struct Outbox {
    client: Client,
    layout: Arc<Layout>,
    claim: Statement,
    mark_published: Statement,
    record_row_failures: Option<Statement>,
    record_outage_failures: Option<Statement>,
    pending_stats: Statement,
    /// Retry backoff bounds in seconds, for the claim's per-row backoff.
    retry_backoff: (f64, f64),
    /// Attempts caused by a row before it is given up on.
    max_attempts: i32,
    /// What the catalog said of the claim order column at connect.
    order_column: OrderColumn,
    /// The keys of the advisory locks the table's relays share it through.
    locks: LockKeys,
    /// When this session last showed that it exists (and so still holds its locks).
    proof: SessionProof,
    /// This session's backend process id, as `pg_stat_activity` and `pg_locks` show it.
    backend_pid: i32,
    /// Cancels the statement this session is running.
    canceller: StatementCanceller,
}

/// Asks PostgreSQL to cancel the statement a session is running, as `pg_cancel_backend` would,
/// over a connection of its own: the session itself may be busy waiting on a lock.
#[derive(Clone)]
pub struct StatementCanceller {
    token: CancelToken,
    tls: MakeTlsConnector,
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

/// The advisory lock keys of one table ([`LOCK_KEYS_SQL`]): classids derived from the table's
/// OID, so every spelling of the table names the same locks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LockKeys {
    member: i32,
    shard: i32,
    shard_count: i32,
    /// The table, schema-qualified, for messages.
    table: String,
    /// The table's OID when the keys were derived: every claim checks that the name still
    /// resolves to it.
    table_oid: u32,
}

/// When a session last proved that it exists: the moment a statement was *sent* that then
/// succeeded. Another relay may end this session only after it has been idle for
/// `relay.takeover_after`, and idle means since the server last began or ended a statement
/// of it, which is no earlier than that moment: so until the moment plus the shortest
/// `relay.takeover_after` this session, and every advisory lock it holds, is certain to exist.
#[derive(Debug)]
struct SessionProof {
    /// A moment before the session was opened.
    base: Instant,
    /// Milliseconds after `base` at which the last proving statement was sent.
    sent_ms: AtomicU64,
}

impl SessionProof {
    fn new(base: Instant) -> SessionProof {
        SessionProof { base, sent_ms: AtomicU64::new(0) }
    }

    /// A statement sent at `sent` succeeded. Statements may run concurrently on one
    /// connection, so the latest sending moment wins, whatever order they finish in.
    fn proved(&self, sent: Instant) {
        let ms = u64::try_from(sent.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX);
        self.sent_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn age(&self) -> Duration {
        self.base.elapsed().saturating_sub(Duration::from_millis(self.sent_ms.load(Ordering::Relaxed)))
    }
}

/// What became of a relay that looked frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Termination {
    /// Its session was ended; PostgreSQL releases its locks as the backend exits.
    Ended,
    /// It ran a statement since it was seen idle (or its session is already gone).
    NoLongerFrozen,
    /// This relay's role may not end that session; the server's message.
    NotAllowed(String),
}

/// The result of one claim: its rows, and what the claim floor learns from it.
#[derive(Debug, Default)]
pub struct Claim {
    /// The claimed rows in claim order, each decoded or its id and why it could not be.
    pub rows: Vec<Result<OutboxRow, UnreadableRow>>,
    /// What the claim saw besides its rows; `None` only if that could not be read.
    pub view: Option<ClaimView>,
    /// Whether it may have left claimable rows behind: it returned its row limit, or stopped
    /// at its byte limit.
    pub full: bool,
}

/// Pending rows as seen by one stats query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PendingStats {
    /// Rows not yet published, failed ones excepted.
    pub rows: i64,
    /// Age of the oldest of them, when the table has a created-at column and rows are pending.
    pub oldest_age_seconds: Option<f64>,
    /// Rows the relay gave up on (until `retry`).
    pub failed_rows: i64,
    /// Pending rows not yet publishable because a transaction that was open when they were
    /// inserted is still open.
    pub held_rows: i64,
    /// Age of the oldest held-back row, when the table has a created-at column and rows are
    /// held back.
    pub oldest_held_age_seconds: Option<f64>,
    /// Rows failing with errors of their own, not given up on yet (0 without an attempts
    /// column).
    pub failing_rows: i64,
}

/// The open transaction that holds the commit horizon back.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OldestTransaction {
    /// Its backend's process id (for `pg_terminate_backend` if it must go); `None` for a
    /// prepared transaction, which no session holds.
    pub pid: Option<i32>,
    /// The global id of a prepared transaction (two-phase commit): it ends only with
    /// `COMMIT PREPARED` or `ROLLBACK PREPARED`, typically from its transaction manager.
    pub prepared: Option<String>,
    /// How long it has been open; when the relay's role may not see that (another role's
    /// session, without `pg_read_all_stats`), how long the oldest row it holds back has waited.
    pub seconds: f64,
    /// `active`, `idle in transaction`, ...; empty when the relay's role may not see it.
    pub state: String,
    /// The start of its current or last query; PostgreSQL's `<insufficient privilege>` when
    /// the relay's role may not see it.
    pub query: String,
}

/// Failed rows that share an error.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FailedGroup {
    /// The last error.
    pub error: String,
    /// How many rows.
    pub count: i64,
    /// The first ids.
    pub first_ids: Vec<String>,
}

/// Where one row stands, for a command that names rows by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowState {
    /// Its id as text.
    pub id: String,
    /// Marked published.
    pub published: bool,
    /// Given up on (until `retry`).
    pub failed: bool,
    /// Failed attempts so far.
    pub attempts: i64,
}

/// A key held back by a failed row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParkedKey {
    /// The key.
    pub key: String,
    /// The failed row holding it.
    pub failed_id: String,
    /// Later rows of the key waiting behind it.
    pub waiting: i64,
}

/// The relays of a table and the shards they hold, as PostgreSQL's lock table shows them (in
/// the current database only).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Ownership {
    /// Every session holding one of the table's relay locks: one per running relay, by pid.
    pub relays: Vec<RelaySession>,
    /// Held shards and their holders, by shard.
    pub shards: Vec<ShardOwner>,
}

/// A running relay, as its database session shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RelaySession {
    /// Backend pid of the relay's claim session.
    pub pid: i32,
    /// The relay's address as the database sees it (`-` when hidden or a local socket).
    pub client: String,
    /// The session's `application_name`.
    pub application_name: String,
    /// The `relay.shards` it runs with; `None` before it has said (it is joining).
    pub shard_count: Option<i64>,
    /// `active`, `idle`, ...; `None` when PostgreSQL hides another role's session from this
    /// one (without `pg_read_all_stats`).
    pub state: Option<String>,
    /// Seconds since its session last began or ended a statement; `None` when hidden.
    pub idle_seconds: Option<f64>,
    /// Whether it has been idle longer than `relay.takeover_after`: a live relay runs a
    /// statement about every second, so this one is frozen or cut off.
    pub looks_frozen: bool,
    /// The shards it holds.
    pub shards: Vec<i32>,
    /// Whether it counts itself among the table's relays (holds its membership lock).
    #[serde(skip)]
    pub member: bool,
    /// Whether this is the session that asked.
    #[serde(skip)]
    pub mine: bool,
}

/// A held shard and the relay holding it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShardOwner {
    /// The shard.
    pub shard: i32,
    /// Backend pid of the holder's session.
    pub pid: i32,
    /// The holder's address as the database sees it.
    pub client: String,
}

/// One row as `audit` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// The row's id as text.
    pub id: String,
    /// Its event id.
    pub event_id: String,
    /// Whether it is marked published.
    pub published: bool,
    /// Failed attempts so far (0 without an attempts column).
    pub attempts: i64,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// Whether the relay gave up on it (until `retry`).
    pub failed: bool,
    /// Values of the topic column or the template's columns.
    pub topic_values: Vec<Option<String>>,
}

/// Bounds on the rows `audit` checks; `None` is unbounded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowRange {
    /// Lowest id, inclusive.
    pub from_id: Option<String>,
    /// Highest id, inclusive.
    pub to_id: Option<String>,
    /// Earliest creation time, inclusive (any timestamp PostgreSQL parses).
    pub since: Option<String>,
    /// Latest creation time, exclusive.
    pub until: Option<String>,
}

/// The driven half of a connection: plain TCP or TLS, as `database.sslmode` and the server
/// agree.
pub type PgConnection =
    tokio_postgres::Connection<tokio_postgres::Socket, postgres_openssl::TlsStream<tokio_postgres::Socket>>;

/// Opens a plain connection (no statements prepared), for migrations and checks.
pub async fn connect_client(config: &Config) -> Result<Client, OutboxError> {
    Ok(connect_session(config).await?.0)
}

/// [`connect_client`], with the TLS connector the connection was opened with (a cancel request
/// opens a connection of its own, as the session's did).
async fn connect_session(config: &Config) -> Result<(Client, MakeTlsConnector), OutboxError> {
    let (client, connection, tls) = open(config).await?;
    let target = describe_target(&config.database.url);
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(database = %target, error = %e, "PostgreSQL connection closed");
        }
    });
    // A SQL_ASCII database stores any bytes in text columns. Asked for UTF-8, the server fails
    // the whole query at the first value that is not UTF-8, so one bad row would stop every
    // claim; asked for the bytes as stored, the relay can fail that row alone when it decodes it.
    let encoding = client.query_one("SHOW server_encoding", &[]).await.map_err(OutboxError::query("show encoding"))?;
    if encoding.try_get::<_, String>(0).is_ok_and(|e| e == "SQL_ASCII") {
        client
            .batch_execute("SET client_encoding = 'SQL_ASCII'")
            .await
            .map_err(OutboxError::query("set client_encoding"))?;
    }
    // A relay killed with -9 (or cut off) leaves its statement running until the server next
    // writes to the dead socket: a claim waiting on a lock kept its shard locks for the whole
    // wait. PostgreSQL 14 and later can check the socket while a statement runs and cancel it.
    let version = client.query_one("SHOW server_version_num", &[]).await.map_err(OutboxError::query("show version"))?;
    if version.try_get::<_, String>(0).ok().and_then(|v| v.parse::<u32>().ok()).is_some_and(|v| v >= 140_000) {
        client
            .batch_execute(&format!("SET client_connection_check_interval = {}", CLIENT_CHECK_INTERVAL_MS))
            .await
            .map_err(OutboxError::query("set client_connection_check_interval"))?;
    }
    Ok((client, tls))
}

/// How often PostgreSQL checks, during a statement, that the relay is still connected.
const CLIENT_CHECK_INTERVAL_MS: u32 = 1000;

/// A text value of a user's row for a report (`status`, `audit`). In a SQL_ASCII database it
/// may not be UTF-8; the report shows that rather than failing.
fn readable_text(row: &tokio_postgres::Row, index: usize) -> Option<String> {
    row.try_get::<_, Option<String>>(index).unwrap_or_else(|_| Some("(not valid UTF-8)".to_owned()))
}

/// A connection whose `Connection` half the caller drives (to receive notifications).
pub async fn connect_raw(config: &Config) -> Result<(Client, PgConnection), OutboxError> {
    let (client, connection, _) = open(config).await?;
    Ok((client, connection))
}

async fn open(config: &Config) -> Result<(Client, PgConnection, MakeTlsConnector), OutboxError> {
    let target = describe_target(&config.database.url);
    let settings = |problem: String| OutboxError::Settings { target: target.clone(), problem };
    let options = ConnectOptions::from_config(&config.database).map_err(|e| settings(e.to_string()))?;
    let connector = options.connector().map_err(settings)?;
    let mut pg = options.pg;
    if pg.get_application_name().is_none() {
        pg.application_name(APPLICATION_NAME);
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    let (client, connection) =
        pg.connect(connector.clone()).await.map_err(|source| OutboxError::Connect { target, source })?;
    Ok((client, connection, connector))
}

/// The useful part of a tokio-postgres error. Its own `Display` says only "db error" for
/// everything the server reports; the server's message, detail and hint are what an operator
/// needs.
pub fn describe_pg_error(error: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    if let Some(db) = error.as_db_error() {
        let mut text = format!("{}: {}", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" ({detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; hint: {hint}"));
        }
        return text;
    }
    match error.source() {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// What to do about a statement the server refused for want of a privilege: the relay's role
/// lost a grant it had when the relay started (which checks them). Empty for other errors.
fn privilege_hint(error: &tokio_postgres::Error) -> &'static str {
    match error.code() {
        Some(code) if *code == tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE => {
            " (the relay's role lacks a privilege on the table; the table's owner must grant it, see sql/relay_role.sql)"
        }
        _ => "",
    }
}

/// `host:port/dbname` of a connection string, for messages that must not carry a password.
pub fn describe_target(url: &str) -> String {
    match crate::postgres::tls::without_tls_parameters(url).parse::<tokio_postgres::Config>() {
        Ok(pg) => {
            let host = pg
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(name) => name.clone(),
                    tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".to_owned());
            let port = pg.get_ports().first().copied().unwrap_or(5432);
            format!("{host}:{port}/{}", pg.get_dbname().unwrap_or("(default)"))
        }
        Err(_) => redact_connection_string(url),
    }
}

/// The configured column mapping, or the configuration error that says what is wrong with it.
pub fn mapping_of(config: &Config) -> Result<Mapping, OutboxError> {
    Mapping::from_config(config).map_err(|problem| OutboxError::Layout(LayoutError { key: "outbox".into(), problem }))
}

impl Outbox {
    /// Connects, checks the configured mapping against the table and prepares the statements.
    pub async fn connect(config: &Config, mapping: &Mapping) -> Result<Outbox, OutboxError> {
        let connecting = Instant::now();
        let (client, tls) = connect_session(config).await?;
        let backend_pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(OutboxError::query("read the backend pid"))?
            .get(0);
        let canceller = StatementCanceller { token: client.cancel_token(), tls };
        let layout = Arc::new(resolve_layout(&client, mapping).await?);
        let locks = resolve_lock_keys(&client, mapping).await?;
        let claim = client.prepare(&layout.claim_sql()).await.map_err(OutboxError::query("prepare claim"))?;
        let mark_published =
            client.prepare(&layout.mark_published_sql()).await.map_err(OutboxError::query("prepare mark"))?;
        let record_row_failures = match layout.record_row_failures_sql() {
            Some(sql) => Some(client.prepare(&sql).await.map_err(OutboxError::query("prepare record failures"))?),
            None => None,
        };
        let record_outage_failures = match layout.record_outage_failures_sql() {
            Some(sql) => Some(client.prepare(&sql).await.map_err(OutboxError::query("prepare record failures"))?),
            None => None,
        };
        let pending_stats =
            client.prepare(&layout.pending_stats_sql()).await.map_err(OutboxError::query("prepare stats"))?;
        // Server-side keepalives: if this relay's host dies without closing the connection,
        // PostgreSQL notices within about 15 s and frees its shards for another relay.
        client
            .batch_execute("SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 5")
            .await
            .map_err(OutboxError::query("set keepalives"))?;
        // PostgreSQL switches a prepared statement to a generic plan after five executions when
        // that plan looks no costlier. For the claim it is costlier: without the parameters'
        // values the planner cannot see how few rows the window and the shard list select, and
        // on a backlog of some ten thousand rows the generic plan took 180 ms where the custom one
        // takes 10. Planning each claim costs well under a millisecond.
        client
            .batch_execute("SET plan_cache_mode = force_custom_plan")
            .await
            .map_err(OutboxError::query("set plan_cache_mode"))?;
        // Marks need not survive a PostgreSQL crash: a lost one re-publishes its row (see
        // `database.synchronous_commit`). The rows themselves are the application's commits.
        if !config.database.synchronous_commit {
            client
                .batch_execute("SET synchronous_commit = off")
                .await
                .map_err(OutboxError::query("set synchronous_commit"))?;
        }
        let order_column = read_order_column(&client, &layout).await?;
        let relay = &config.relay;
        Ok(Outbox {
            client,
            layout,
            claim,
            mark_published,
            record_row_failures,
            record_outage_failures,
            pending_stats,
            retry_backoff: (relay.retry_backoff_initial.as_secs_f64(), relay.retry_backoff_max.as_secs_f64()),
            max_attempts: i32::try_from(relay.max_attempts).unwrap_or(i32::MAX),
            order_column,
            locks,
            proof: SessionProof::new(connecting),
            backend_pid,
            canceller,
        })
    }

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
    /// ([`ClaimView::ids_grow_with_time`]).
    pub fn ids_grow_with_time(&self) -> bool {
        self.layout.orders_by_integer()
            && self.order_column.sequence.as_ref().is_some_and(OrderSequence::grows_with_time)
    }

    /// What the catalog said of the claim order column at connect.
    pub fn order_column(&self) -> &OrderColumn {
        &self.order_column
    }

    /// Fails with [`OutboxError::MissingPrivileges`] unless this connection's role holds every
    /// privilege in `needed` on the table.
    pub async fn check_privileges(&self, needed: &[Privilege]) -> Result<(), OutboxError> {
        let privileges: Vec<&str> = needed.iter().map(|p| p.privilege).collect();
        let columns: Vec<&str> = needed.iter().map(|p| p.column.as_ref().map_or("", |c| c.as_str())).collect();
        let row = self
            .client
            .query_one(MISSING_PRIVILEGES_SQL, &[&self.layout.mapping.table_sql(), &privileges, &columns])
            .await
            .map_err(OutboxError::query("check privileges"))?;
        let missing: Vec<i64> = row.get(1);
        if missing.is_empty() {
            return Ok(());
        }
        Err(OutboxError::MissingPrivileges {
            role: row.get(0),
            table: self.layout.mapping.table_name(),
            missing: missing
                .iter()
                .filter_map(|n| usize::try_from(*n).ok().and_then(|n| n.checked_sub(1)).and_then(|i| needed.get(i)))
                .cloned()
                .collect(),
        })
    }

    /// What the catalog says of the table's columns, indexes and triggers, for `outbox-relay
    /// check`.
    pub async fn catalog(&self) -> Result<TableCatalog, OutboxError> {
        let table = self.layout.mapping.table_sql();
        let what = "read the table's catalog";
        let columns = self.client.query(CATALOG_COLUMNS_SQL, &[&table]).await.map_err(OutboxError::query(what))?;
        let indexes = self.client.query(CATALOG_INDEXES_SQL, &[&table]).await.map_err(OutboxError::query(what))?;
        let triggers =
            self.client.query(CATALOG_NOTIFY_TRIGGERS_SQL, &[&table]).await.map_err(OutboxError::query(what))?;
        let role = self.client.query_one("SELECT current_user::text", &[]).await.map_err(OutboxError::query(what))?;
        let decode = || -> Result<TableCatalog, tokio_postgres::Error> {
            Ok(TableCatalog {
                columns: columns
                    .iter()
                    .map(|r| {
                        Ok(CatalogColumn {
                            name: r.try_get(0)?,
                            quoted: r.try_get(1)?,
                            data_type: r.try_get(2)?,
                            default: r.try_get(3)?,
                        })
                    })
                    .collect::<Result<_, tokio_postgres::Error>>()?,
                indexes: indexes
                    .iter()
                    .map(|r| {
                        Ok(TableIndex {
                            name: r.try_get(0)?,
                            unique: r.try_get(1)?,
                            valid: r.try_get(2)?,
                            columns: r.try_get(3)?,
                            predicate: r.try_get(4)?,
                        })
                    })
                    .collect::<Result<_, tokio_postgres::Error>>()?,
                notify_triggers: triggers.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?,
                role: role.try_get(0)?,
            })
        };
        decode().map_err(OutboxError::query(what))
    }

    /// The layout this connection was checked against.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether the connection is gone; a closed connection must be replaced.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The next unpublished rows in claim order, at most `limit` rows and, past the first row,
    /// at most `max_bytes` of row data, leaving out the rows `in_flight` (ids as text), starting
    /// at claim-order value `start` (`None`: at the beginning; it is up to
    /// [`crate::relay::claim_floor::ClaimFloor`] to decide), and leaving out every row of the
    /// `held_keys`. A row larger than `max_bytes` comes alone.
    /// A row whose columns cannot be decoded comes back as an [`UnreadableRow`] so that the
    /// rest of the batch still flows.
    ///
    /// Rows are decoded as they arrive and the claim stops reading at the byte limit, so the
    /// relay's memory is bounded by it whatever the rows' sizes (the rest of the result is
    /// discarded as it arrives: the rows are not claimed, only read past).
    pub async fn claim(
        &self,
        limit: usize,
        max_bytes: usize,
        shards: &[i32],
        in_flight: &[String],
        start: Option<i64>,
        held_keys: &[String],
    ) -> Result<Claim, OutboxError> {
        let limit_param = i64::try_from(limit).unwrap_or(i64::MAX);
        let (initial, max) = self.retry_backoff;
        let sent = Instant::now();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
            [&limit_param, &shards, &initial, &max, &in_flight, &start, &held_keys];
        let stream = self.client.query_raw(&self.claim, params).await.map_err(OutboxError::query("claim"))?;
        futures::pin_mut!(stream);
        let mut claim = Claim::default();
        let mut bytes = 0usize;
        // Every claim returns at least one row, carrying what the claim floor learns; when
        // nothing was claimed, it is the only row and its row columns are NULL.
        while let Some(row) = stream.try_next().await.map_err(OutboxError::query("claim"))? {
            if claim.view.is_none() {
                claim.view = decode_view(&row);
            }
            if matches!(row.try_get::<_, Option<String>>(claim_columns::ID), Ok(None)) {
                continue;
            }
            let decoded = decode_row(&row);
            let size = decoded_size(&decoded);
            if !claim.rows.is_empty() && bytes.saturating_add(size) > max_bytes {
                claim.full = true;
                break;
            }
            bytes = bytes.saturating_add(size);
            claim.rows.push(decoded);
        }
        self.proof.proved(sent);
        claim.full |= claim.rows.len() >= limit;
        if let Some(view) = &claim.view
            && view.table.oid != Some(self.locks.table_oid)
        {
            // The rows came from the table the name resolves to now, whose shards this
            // session's locks do not cover: none of them may be published through it.
            return Err(self.table_replaced(view.table.oid).await);
        }
        Ok(claim)
    }

    /// The error for a table whose name resolves to `now` instead of this connection's table.
    async fn table_replaced(&self, now: Option<u32>) -> OutboxError {
        let was = self.locks.table_oid;
        let old_name = match self.client.query_one(OID_NAME_SQL, &[&was]).await {
            Ok(row) => row.get::<_, Option<String>>(0).unwrap_or_else(|| "dropped".to_owned()),
            Err(_) => "unknown".to_owned(),
        };
        OutboxError::TableReplaced {
            table: self.locks.table.clone(),
            was,
            now: now.map_or_else(|| "no table".to_owned(), |oid| format!("the table of OID {oid}")),
            old_name,
        }
    }

    /// The OID of the table this connection claims from, and whose shard locks it takes.
    pub fn table_oid(&self) -> u32 {
        self.locks.table_oid
    }

    /// The value of a run-time setting on this connection (`SHOW name`); `name` is a setting
    /// name written in the code, never input.
    pub async fn setting(&self, name: &'static str) -> Result<String, OutboxError> {
        let row =
            self.client.query_one(&format!("SHOW {name}"), &[]).await.map_err(OutboxError::query("show setting"))?;
        Ok(row.get(0))
    }

    /// Marks rows the broker acknowledged; returns how many changed. Marking a row twice is a
    /// no-op, so a retry after a lost connection is safe; a row that is no longer there under
    /// its id and event id (its table was replaced) is not marked.
    pub async fn mark_published(&self, rows: &[RowRef]) -> Result<u64, OutboxError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let (ids, event_ids) = split_refs(rows);
        let sent = Instant::now();
        let marked = self
            .client
            .execute(&self.mark_published, &[&ids, &event_ids])
            .await
            .map_err(OutboxError::query("mark published"))?;
        self.proof.proved(sent);
        Ok(marked)
    }

    /// Records failed attempts. `row_failures` (caused by the rows: an unknown topic, a record
    /// too large, bad headers) count toward giving up and start the row's retry backoff;
    /// `outage_failures` (the broker down) only keep the error. Returns the ids given up on.
    pub async fn record_failures(
        &self,
        row_failures: &[RowFailure],
        outage_failures: &[RowFailure],
    ) -> Result<Vec<String>, OutboxError> {
        let split = |failures: &[RowFailure]| -> (Vec<String>, Vec<String>, Vec<Option<String>>) {
            let (ids, event_ids) = split_refs(failures.iter().map(|f| &f.row));
            (ids, failures.iter().map(|f| f.error.clone()).collect(), event_ids)
        };
        let mut given_up = Vec::new();
        if let (Some(statement), false) = (&self.record_row_failures, row_failures.is_empty()) {
            let (ids, errors, event_ids) = split(row_failures);
            let rows = self
                .client
                .query(statement, &[&ids, &errors, &self.max_attempts, &event_ids])
                .await
                .map_err(OutboxError::query("record failures"))?;
            given_up.extend(rows.iter().filter(|r| r.get::<_, bool>(1)).map(|r| r.get::<_, String>(0)));
        }
        if let (Some(statement), false) = (&self.record_outage_failures, outage_failures.is_empty()) {
            let (ids, errors, event_ids) = split(outage_failures);
            self.client
                .execute(statement, &[&ids, &errors, &event_ids])
                .await
                .map_err(OutboxError::query("record failures"))?;
        }
        Ok(given_up)
    }

    /// Counts pending, failed and held-back rows and the age of the oldest pending one.
    pub async fn pending_stats(&self) -> Result<PendingStats, OutboxError> {
        let row = self.client.query_one(&self.pending_stats, &[]).await.map_err(OutboxError::query("stats"))?;
        Ok(PendingStats {
            rows: row.get(0),
            oldest_age_seconds: row.get(1),
            failed_rows: row.get(2),
            held_rows: row.get(3),
            oldest_held_age_seconds: row.get(4),
            failing_rows: row.get(5),
        })
    }

    /// The open transaction that holds the commit horizon back, if any. `held_rows` are the
    /// stats of the same moment: their oldest held row's age stands in for the transaction's
    /// age when PostgreSQL hides that from the relay's role. Its pid is never hidden; a
    /// prepared transaction has none, and its gid instead.
    pub async fn oldest_transaction(&self, held_rows: &PendingStats) -> Result<Option<OldestTransaction>, OutboxError> {
        let row = self
            .client
            .query_opt(crate::postgres::layout::OLDEST_TRANSACTION_SQL, &[])
            .await
            .map_err(OutboxError::query("oldest transaction"))?;
        Ok(row.map(|r| OldestTransaction {
            pid: r.get(0),
            prepared: r.get(4),
            seconds: r.get::<_, Option<f64>>(1).or(held_rows.oldest_held_age_seconds).unwrap_or(0.0),
            state: r.get(2),
            query: r.get(3),
        }))
    }

    /// Deletes up to `limit` rows published more than `age` ago; returns how many.
    pub async fn delete_published(&self, age: std::time::Duration, limit: i64) -> Result<u64, OutboxError> {
        let Some(sql) = self.layout.retention_delete_sql() else { return Ok(0) };
        self.client.execute(&sql, &[&age.as_secs_f64(), &limit]).await.map_err(OutboxError::query("retention"))
    }

    /// Re-queues failed rows (given up on, or waiting out a retry backoff) by id, by key, or
    /// all (both `None`); returns the ids re-queued.
    pub async fn retry(&self, ids: Option<&[String]>, key: Option<&str>) -> Result<Vec<String>, OutboxError> {
        let Some(sql) = self.layout.retry_sql() else { return Ok(Vec::new()) };
        let ids: Option<Vec<String>> = ids.map(|ids| ids.to_vec());
        let rows = self.client.query(&sql, &[&ids, &key]).await.map_err(OutboxError::query("retry"))?;
        let requeued = rows.iter().map(|r| r.get(0)).collect();
        // The claim floor never passes an unpublished row, so running relays find the re-queued
        // rows at their next claim; the notification wakes idle ones at once.
        let notify = "SELECT pg_notify($1, $2)";
        if let Err(e) =
            self.client.execute(notify, &[&crate::relay::wakeup::CHANNEL, &crate::relay::wakeup::RESCAN_PAYLOAD]).await
        {
            tracing::debug!(
                error = %describe_pg_error(&e),
                "rows re-queued, but idle relays were not woken; they find them at their next poll"
            );
        }
        Ok(requeued)
    }

    /// What became of the rows with these ids; ids of no row are left out.
    pub async fn row_states(&self, ids: &[String]) -> Result<Vec<RowState>, OutboxError> {
        let rows =
            self.client.query(&self.layout.row_states_sql(), &[&ids]).await.map_err(OutboxError::query("read rows"))?;
        Ok(rows
            .iter()
            .map(|r| RowState { id: r.get(0), published: r.get(1), failed: r.get(2), attempts: r.get(3) })
            .collect())
    }

    /// Failed rows grouped by their last error, most frequent first.
    pub async fn failed_by_error(&self) -> Result<Vec<FailedGroup>, OutboxError> {
        let Some(sql) = self.layout.failed_by_error_sql() else { return Ok(Vec::new()) };
        let rows = self.client.query(&sql, &[]).await.map_err(OutboxError::query("failed rows"))?;
        Ok(rows.iter().map(|r| FailedGroup { error: r.get(0), count: r.get(1), first_ids: r.get(2) }).collect())
    }

    /// Failing rows (retried after a backoff) grouped by their last error.
    pub async fn failing_by_error(&self) -> Result<Vec<FailedGroup>, OutboxError> {
        let Some(sql) = self.layout.failing_by_error_sql() else { return Ok(Vec::new()) };
        let rows = self.client.query(&sql, &[]).await.map_err(OutboxError::query("failing rows"))?;
        Ok(rows.iter().map(|r| FailedGroup { error: r.get(0), count: r.get(1), first_ids: r.get(2) }).collect())
    }

    /// Keys held back by a failed row.
    pub async fn parked_keys(&self) -> Result<Vec<ParkedKey>, OutboxError> {
        let Some(sql) = self.layout.parked_keys_sql() else { return Ok(Vec::new()) };
        let rows = self.client.query(&sql, &[]).await.map_err(OutboxError::query("parked keys"))?;
        Ok(rows
            .iter()
            .map(|r| ParkedKey { key: readable_text(r, 0).unwrap_or_default(), failed_id: r.get(1), waiting: r.get(2) })
            .collect())
    }

    /// The rows in `range` (and with `topic`, when the topic is a column), in claim order.
    pub async fn audit_rows(&self, range: &RowRange, topic: Option<&str>) -> Result<Vec<AuditRow>, OutboxError> {
        let rows = self
            .client
            .query(&self.layout.audit_rows_sql(), &[&range.from_id, &range.to_id, &range.since, &range.until, &topic])
            .await
            .map_err(OutboxError::query("audit rows"))?;
        Ok(rows
            .iter()
            .map(|r| AuditRow {
                id: r.get(0),
                event_id: r.get(1),
                published: r.get(2),
                attempts: r.get(3),
                last_error: r.get(4),
                failed: r.get(5),
                topic_values: (AUDIT_TOPIC_COLUMN..r.len()).map(|i| readable_text(r, i)).collect(),
            })
            .collect())
    }

    /// Whether id `from` sorts after id `to` in the table's id type: a range holding no row.
    pub async fn id_range_is_empty(&self, from: &str, to: &str) -> Result<bool, OutboxError> {
        let sql = format!("SELECT $1::text::{ty} > $2::text::{ty}", ty = self.layout.id_type);
        let row = self.client.query_one(&sql, &[&from, &to]).await.map_err(OutboxError::query("compare ids"))?;
        Ok(row.get(0))
    }

    /// Milliseconds since the epoch of a timestamp as PostgreSQL reads it (so `audit` accepts
    /// the same formats in `--since` as the database does).
    pub async fn epoch_millis(&self, timestamp: &str) -> Result<i64, OutboxError> {
        let row = self
            .client
            .query_one("SELECT (extract(epoch FROM $1::text::timestamptz) * 1000)::int8", &[&timestamp])
            .await
            .map_err(OutboxError::query("read timestamp"))?;
        Ok(row.get(0))
    }

    /// Runs a statement that does nothing, to show that this session exists: other relays
    /// watch it ([`RelaySession::looks_frozen`]), and it proves the session's locks are held.
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

    /// Fails with [`OutboxError::EarlierVersionRunning`] if relays of an earlier version,
    /// whose lock keys derive from the table's name rather than its OID, hold locks of this
    /// table under any of its usual spellings (as configured, qualified, bare).
    pub async fn check_no_earlier_version(&self) -> Result<(), OutboxError> {
        let configured = self.layout.mapping.table_name();
        let bare = self.locks.table.rsplit('.').next().unwrap_or(&self.locks.table).to_owned();
        let spellings = vec![configured, self.locks.table.clone(), bare];
        let rows = self
            .client
            .query(OLD_VERSION_HOLDERS_SQL, &[&spellings])
            .await
            .map_err(OutboxError::query("look for relays of an earlier version"))?;
        if rows.is_empty() {
            return Ok(());
        }
        let pids =
            rows.iter().map(|r| r.try_get("pid")).collect::<Result<_, _>>().map_err(OutboxError::query("read pids"))?;
        Err(OutboxError::EarlierVersionRunning { table: self.locks.table.clone(), pids })
    }

    /// Declares that this relay runs with `shard_count` shards (a shared lock every relay with
    /// that count holds), then fails with [`OutboxError::ShardCountMismatch`], having taken
    /// the declaration back, if another relay of the table runs with a different count. Two
    /// relays racing with different counts both declare before they look, so at least one of
    /// them sees the other.
    pub async fn declare_shard_count(&self, shard_count: u32) -> Result<(), OutboxError> {
        let count = i32::try_from(shard_count).unwrap_or(i32::MAX);
        let key = self.locks.shard_count;
        self.client
            .query_one(LOCK_SHARD_COUNT_SQL, &[&key, &count])
            .await
            .map_err(OutboxError::query("declare the shard count"))?;
        let rows = self
            .client
            .query(OTHER_SHARD_COUNTS_SQL, &[&key, &count])
            .await
            .map_err(OutboxError::query("read other relays' shard counts"))?;
        if rows.is_empty() {
            return Ok(());
        }
        let others = rows
            .iter()
            .map(|r| Ok(OtherShardCount { shard_count: r.try_get("shard_count")?, pids: r.try_get("pids")? }))
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(OutboxError::query("read other relays' shard counts"))?;
        // The session ends as the relay stops anyway; releasing now keeps a retry clean.
        if let Err(e) = self.client.query_one(UNLOCK_SHARD_COUNT_SQL, &[&key, &count]).await {
            tracing::debug!(error = %describe_pg_error(&e), "could not take the shard count back");
        }
        Err(OutboxError::ShardCountMismatch { table: self.locks.table.clone(), ours: shard_count, others })
    }

    /// Registers this relay as a member of the table's relays, under `instance`; false if
    /// another relay already uses that number.
    pub async fn join(&self, instance: i32) -> Result<bool, OutboxError> {
        self.try_lock(self.locks.member, instance, "join").await
    }

    /// Takes `shard` for this relay (a session lock, released if the connection ends); false if
    /// another relay holds it.
    pub async fn lock_shard(&self, shard: i32) -> Result<bool, OutboxError> {
        self.try_lock(self.locks.shard, shard, "lock shard").await
    }

    async fn try_lock(&self, classid: i32, number: i32, what: &'static str) -> Result<bool, OutboxError> {
        let row = self.client.query_one(TRY_LOCK_SQL, &[&classid, &number]).await.map_err(OutboxError::query(what))?;
        row.try_get(0).map_err(OutboxError::query(what))
    }

    /// Hands `shard` back.
    pub async fn unlock_shard(&self, shard: i32) -> Result<(), OutboxError> {
        self.client
            .query_one(UNLOCK_SQL, &[&self.locks.shard, &shard])
            .await
            .map_err(OutboxError::query("unlock shard"))?;
        Ok(())
    }

    /// The table's relays and the shards they hold; a relay idle longer than
    /// `takeover_after` looks frozen.
    pub async fn ownership(&self, takeover_after: Duration) -> Result<Ownership, OutboxError> {
        let keys = &self.locks;
        let sent = Instant::now();
        let rows = self
            .client
            .query(OWNERSHIP_SQL, &[&keys.member, &keys.shard, &keys.shard_count, &takeover_after.as_secs_f64()])
            .await
            .map_err(OutboxError::query("shard ownership"))?;
        self.proof.proved(sent);
        decode_ownership(&rows).map_err(OutboxError::query("shard ownership"))
    }

    /// Ends the session `pid` if it still looks frozen (idle longer than `takeover_after`),
    /// which releases its locks.
    pub async fn terminate_if_frozen(&self, pid: i32, takeover_after: Duration) -> Result<Termination, OutboxError> {
        match self.client.query_opt(TERMINATE_FROZEN_SQL, &[&pid, &takeover_after.as_secs_f64()]).await {
            Ok(Some(row)) if row.try_get("ended").unwrap_or(false) => Ok(Termination::Ended),
            Ok(_) => Ok(Termination::NoLongerFrozen),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
                Ok(Termination::NotAllowed(describe_pg_error(&e)))
            }
            Err(e) => Err(OutboxError::Query { what: "end a frozen relay's session", source: e }),
        }
    }
}

/// The rows of [`OWNERSHIP_SQL`] as relays and shard owners.
fn decode_ownership(rows: &[tokio_postgres::Row]) -> Result<Ownership, tokio_postgres::Error> {
    let mut ownership = Ownership::default();
    for row in rows {
        let pid: i32 = row.try_get("pid")?;
        let number: i64 = row.try_get("number")?;
        let index = match ownership.relays.iter().position(|r| r.pid == pid) {
            Some(index) => index,
            None => {
                ownership.relays.push(RelaySession {
                    pid,
                    client: row.try_get("client")?,
                    application_name: row.try_get("application_name")?,
                    shard_count: None,
                    state: row.try_get("state")?,
                    idle_seconds: row.try_get("idle_seconds")?,
                    looks_frozen: row.try_get("looks_frozen")?,
                    shards: Vec::new(),
                    member: false,
                    mine: row.try_get("mine")?,
                });
                ownership.relays.len() - 1
            }
        };
        let relay = &mut ownership.relays[index];
        match row.try_get::<_, String>("kind")?.as_str() {
            "member" => relay.member = true,
            "count" => relay.shard_count = Some(number),
            _ => {
                let shard = i32::try_from(number).unwrap_or(i32::MAX);
                relay.shards.push(shard);
                ownership.shards.push(ShardOwner { shard, pid, client: relay.client.clone() });
            }
        }
    }
    ownership.relays.sort_by_key(|r| r.pid);
    Ok(ownership)
}

/// The lock keys of the mapped table; [`OutboxError::TableMissing`] if it is gone.
async fn resolve_lock_keys(client: &Client, mapping: &Mapping) -> Result<LockKeys, OutboxError> {
    let what = "read the table's lock keys";
    let row = client.query_opt(LOCK_KEYS_SQL, &[&mapping.table_sql()]).await.map_err(OutboxError::query(what))?;
    let Some(row) = row else { return Err(OutboxError::TableMissing(mapping.table_name())) };
    let keys = || -> Result<LockKeys, tokio_postgres::Error> {
        Ok(LockKeys {
            member: row.try_get("member")?,
            shard: row.try_get("shard")?,
            shard_count: row.try_get("shard_count")?,
            table: row.try_get("qualified_name")?,
            table_oid: row.try_get("table_oid")?,
        })
    };
    keys().map_err(OutboxError::query(what))
}

async fn resolve_layout(client: &Client, mapping: &Mapping) -> Result<Layout, OutboxError> {
    let table = mapping.table_sql();
    let rows = client.query(TABLE_COLUMNS_SQL, &[&table]).await.map_err(OutboxError::query("read table columns"))?;
    if rows.is_empty() {
        return Err(OutboxError::TableMissing(mapping.table_name()));
    }
    let columns: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(mapping.resolve(&columns)?)
}

/// What the catalog says of the claim order column: `NOT NULL`, unique, and its sequence.
async fn read_order_column(client: &Client, layout: &Layout) -> Result<OrderColumn, OutboxError> {
    let mapping = &layout.mapping;
    let row = client
        .query_opt(ORDER_COLUMN_SQL, &[&mapping.table_sql(), &mapping.order_by.as_str()])
        .await
        .map_err(OutboxError::query("read the order column"))?;
    let Some(row) = row else {
        // The layout was just resolved against the same catalog; a concurrent DROP COLUMN.
        return Err(OutboxError::TableMissing(mapping.table_name()));
    };
    let sequence = row.get::<_, Option<String>>(2).map(|name| OrderSequence {
        name,
        increment: row.get(3),
        cache: row.get(4),
        cycles: row.get(5),
    });
    Ok(OrderColumn { not_null: row.get(0), unique: row.get(1), sequence })
}

/// The claim floor's part of a claimed row; `None` if it cannot be read, which only costs the
/// floor one observation.
fn decode_view(row: &tokio_postgres::Row) -> Option<ClaimView> {
    let xid = |i: usize| row.try_get::<_, String>(i).ok().and_then(|text| text.parse::<u64>().ok());
    Some(ClaimView {
        first_unpublished: row.try_get(claim_columns::FIRST_UNPUBLISHED).ok()?,
        ids_grow_with_time: row.try_get(claim_columns::IDS_GROW_WITH_TIME).ok()?,
        xmin: xid(claim_columns::SNAPSHOT_XMIN)?,
        xmax: xid(claim_columns::SNAPSHOT_XMAX)?,
        table: TableIdentity {
            oid: row.try_get::<_, Option<i64>>(claim_columns::TABLE_OID).ok()?.and_then(|oid| u32::try_from(oid).ok()),
            filenode: row.try_get(claim_columns::TABLE_FILENODE).ok()?,
            sequence: row.try_get(claim_columns::SEQUENCE_OID).ok()?,
            sequence_last_value: row.try_get(claim_columns::SEQUENCE_LAST_VALUE).ok()?,
        },
    })
}

/// The ids and event ids of `rows`, as the statements that write outcomes take them.
fn split_refs<'a>(rows: impl IntoIterator<Item = &'a RowRef>) -> (Vec<String>, Vec<Option<String>>) {
    rows.into_iter().map(|row| (row.id.to_string(), row.event_id.clone())).unzip()
}

/// The name of the table of OID `$1` now, or NULL when no table has it.
const OID_NAME_SQL: &str = "SELECT (SELECT c.oid::regclass::text FROM pg_class AS c WHERE c.oid = $1)";

/// The bytes a claimed row holds in the relay's memory, near enough: its variable-length values.
fn decoded_size(row: &Result<OutboxRow, UnreadableRow>) -> usize {
    let text = |t: &Option<String>| t.as_ref().map_or(0, String::len);
    match row {
        Ok(row) => {
            row.id.len()
                + row.event_id.len()
                + text(&row.key)
                + row.payload.as_ref().map_or(0, Vec::len)
                + text(&row.headers)
                + text(&row.traceparent)
                + row.topic_values.iter().map(text).sum::<usize>()
        }
        Err(unreadable) => unreadable.id.len() + unreadable.problem.len(),
    }
}

fn decode_row(row: &tokio_postgres::Row) -> Result<OutboxRow, UnreadableRow> {
    // The id is selected as text and is what marks the row, so it is read first; a row whose
    // id cannot be read cannot be marked either way, and the claim fails as a whole. The key
    // comes next: a row that fails holds back the later rows of its key.
    let id: String = match row.try_get(claim_columns::ID) {
        Ok(id) => id,
        Err(e) => {
            return Err(UnreadableRow {
                id: String::new(),
                event_id: None,
                key: RowKey::Unreadable,
                problem: format!("id: {e}"),
            });
        }
    };
    // The driver's own message says only "error deserializing column 2"; its cause says what is
    // wrong with the value ("invalid utf-8 sequence ..."), which is what the row's error must say.
    let problem = |name: &str, e: tokio_postgres::Error| format!("cannot read {name}: {}", describe_pg_error(&e));
    let key: Option<String> = match row.try_get(claim_columns::KEY) {
        Ok(key) => key,
        Err(e) => {
            return Err(UnreadableRow { id, event_id: None, key: RowKey::Unreadable, problem: problem("key", e) });
        }
    };
    let event_id: String = row.try_get(claim_columns::EVENT_ID).map_err(|e| UnreadableRow {
        id: id.clone(),
        event_id: None,
        key: RowKey::Known(key.clone()),
        problem: problem("event_id", e),
    })?;
    let field = |name: &str, e: tokio_postgres::Error| UnreadableRow {
        id: id.clone(),
        event_id: Some(event_id.clone()),
        key: RowKey::Known(key.clone()),
        problem: problem(name, e),
    };
    let payload: Option<RawPayload> = row.try_get(claim_columns::PAYLOAD).map_err(|e| field("payload", e))?;
    let headers: Option<String> = row.try_get(claim_columns::HEADERS).map_err(|e| field("headers", e))?;
    let created_at: Option<f64> = row.try_get(claim_columns::CREATED_AT).map_err(|e| field("created_at", e))?;
    let traceparent: Option<String> = row.try_get(claim_columns::TRACEPARENT).map_err(|e| field("traceparent", e))?;
    let mut topic_values = Vec::with_capacity(row.len() - claim_columns::TOPIC);
    for i in claim_columns::TOPIC..row.len() {
        topic_values.push(row.try_get::<_, Option<String>>(i).map_err(|e| field("topic", e))?);
    }
    Ok(OutboxRow { id, event_id, key, payload: payload.map(|p| p.0), headers, created_at, traceparent, topic_values })
}

/// The payload column's bytes as the record value: JSON text for json and jsonb, UTF-8 for
/// text, the stored bytes for bytea. Text and JSON must be UTF-8, as every other text column
/// of the row must (a SQL_ASCII database stores any bytes): bytes that are not are refused, so
/// the row fails with its own error instead of reaching consumers as garbage.
struct RawPayload(Vec<u8>);

/// jsonb's binary wire format starts with this version byte, followed by the JSON text.
const JSONB_FORMAT_VERSION: u8 = 1;

impl<'a> FromSql<'a> for RawPayload {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            return match raw.split_first() {
                Some((&JSONB_FORMAT_VERSION, json)) => {
                    std::str::from_utf8(json)?;
                    Ok(RawPayload(json.to_vec()))
                }
                _ => Err("unsupported jsonb wire format version".into()),
            };
        }
        if matches!(*ty, Type::JSON | Type::TEXT | Type::VARCHAR | Type::BPCHAR) {
            std::str::from_utf8(raw)?;
        }
        Ok(RawPayload(raw.to_vec()))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSONB | Type::JSON | Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::BYTEA)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Any bytes, valid UTF-8 text, and jsonb's wire format (a version byte before the text).
    fn column_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            any::<String>().prop_map(String::into_bytes),
            (any::<u8>(), any::<String>()).prop_map(|(version, json)| [vec![version], json.into_bytes()].concat()),
            Just(Vec::new()),
        ]
    }

    /// The payload column types the layout accepts.
    const PAYLOAD_TYPES: [Type; 6] = [Type::JSONB, Type::JSON, Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::BYTEA];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_payload_bytes_decode_whole_or_are_refused(
            ty in prop::sample::select(PAYLOAD_TYPES.to_vec()),
            raw in column_bytes(),
        ) {
            let decoded = RawPayload::from_sql(&ty, &raw).map(|p| p.0);
            if ty == Type::JSONB {
                match raw.split_first() {
                    Some((&JSONB_FORMAT_VERSION, json)) if std::str::from_utf8(json).is_ok() => {
                        prop_assert_eq!(decoded.ok(), Some(json.to_vec()))
                    }
                    Some((&JSONB_FORMAT_VERSION, _)) => prop_assert!(decoded.is_err(), "JSON that is not UTF-8 is refused"),
                    _ => prop_assert!(decoded.is_err(), "jsonb without its version byte is refused"),
                }
            } else if ty == Type::BYTEA {
                prop_assert_eq!(decoded.ok(), Some(raw), "stored bytes are sent as they are");
            } else if std::str::from_utf8(&raw).is_ok() {
                prop_assert_eq!(decoded.ok(), Some(raw));
            } else {
                prop_assert!(decoded.is_err(), "text and JSON that are not UTF-8 are refused");
            }
        }
    }
}
