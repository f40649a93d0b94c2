//! Everything that touches the outbox table: connect, claim, mark, record failures, stats.
//!
//! A row is marked published only through [`Outbox::mark_published`], and the relay calls it
//! only with ids whose delivery report said the broker has the record. Nothing here decides
//! that; this module executes the statements `table.rs` writes, prepared once per connection.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{Client, NoTls, Statement};

use crate::config::{Config, redact_connection_string};
use crate::record::OutboxRow;
use crate::table::{AUDIT_TOPIC_COLUMN, Layout, LayoutError, Mapping, TABLE_COLUMNS_SQL, claim_columns};

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
    /// A statement failed (including a lost connection).
    #[error("PostgreSQL {what} failed: {}", describe_pg_error(source))]
    Query {
        /// Which statement.
        what: &'static str,
        /// The driver's error.
        source: tokio_postgres::Error,
    },
    /// The configured table does not exist.
    #[error(
        "outbox.table: table {0} does not exist; create it with `outbox-relay migrate` or point outbox.table at your table"
    )]
    TableMissing(String),
    /// A column does not fit its configured role.
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

impl OutboxError {
    /// Whether waiting and retrying can help. A layout that does not match the table will not
    /// fix itself; a dropped connection will.
    pub fn is_transient(&self) -> bool {
        matches!(self, OutboxError::Connect { .. } | OutboxError::Query { .. })
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
    mark_failed: Option<Statement>,
    pending_stats: Statement,
}

/// Pending rows as seen by one stats query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PendingStats {
    /// Rows not yet published.
    pub rows: i64,
    /// Age of the oldest of them, when the table has a created-at column and rows are pending.
    pub oldest_age_seconds: Option<f64>,
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

/// Opens a plain connection (no statements prepared), for migrations and checks.
pub async fn connect_client(config: &Config) -> Result<Client, OutboxError> {
    let target = describe_target(&config.database.url);
    let mut pg: tokio_postgres::Config =
        config.database.url.parse().map_err(|source| OutboxError::Connect { target: target.clone(), source })?;
    if pg.get_application_name().is_none() {
        pg.application_name(APPLICATION_NAME);
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    let (client, connection) =
        pg.connect(NoTls).await.map_err(|source| OutboxError::Connect { target: target.clone(), source })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(database = %target, error = %e, "PostgreSQL connection closed");
        }
    });
    Ok(client)
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

/// `host:port/dbname` of a connection string, for messages that must not carry a password.
pub fn describe_target(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
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

impl Outbox {
    /// Connects, checks the configured mapping against the table and prepares the statements.
    pub async fn connect(config: &Config, mapping: &Mapping) -> Result<Outbox, OutboxError> {
        let client = connect_client(config).await?;
        let layout = Arc::new(resolve_layout(&client, mapping).await?);
        let claim = client.prepare(&layout.claim_sql()).await.map_err(OutboxError::query("prepare claim"))?;
        let mark_published =
            client.prepare(&layout.mark_published_sql()).await.map_err(OutboxError::query("prepare mark"))?;
        let mark_failed = match layout.mark_failed_sql() {
            Some(sql) => Some(client.prepare(&sql).await.map_err(OutboxError::query("prepare mark-failed"))?),
            None => None,
        };
        let pending_stats =
            client.prepare(&layout.pending_stats_sql()).await.map_err(OutboxError::query("prepare stats"))?;
        Ok(Outbox { client, layout, claim, mark_published, mark_failed, pending_stats })
    }

    /// The layout this connection was checked against.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether the connection is gone; a closed connection must be replaced.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The next unpublished rows in claim order, at most `limit`. A row whose columns cannot be
    /// decoded comes back as `Err((id, problem))` so that the rest of the batch still flows.
    pub async fn claim(&self, limit: usize) -> Result<Vec<Result<OutboxRow, (String, String)>>, OutboxError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.client.query(&self.claim, &[&limit]).await.map_err(OutboxError::query("claim"))?;
        Ok(rows.iter().map(decode_row).collect())
    }

    /// Marks rows the broker acknowledged; returns how many changed. Marking a row twice is a
    /// no-op, so a retry after a lost connection is safe.
    pub async fn mark_published(&self, ids: &[String]) -> Result<u64, OutboxError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.client.execute(&self.mark_published, &[&ids]).await.map_err(OutboxError::query("mark published"))
    }

    /// Records a failed attempt for each `(id, error)`: attempts + 1 and the error text, where
    /// the table has those columns. The rows stay unpublished.
    pub async fn mark_failed(&self, failures: &[(String, String)]) -> Result<u64, OutboxError> {
        let Some(statement) = &self.mark_failed else {
            return Ok(0);
        };
        if failures.is_empty() {
            return Ok(0);
        }
        let ids: Vec<&str> = failures.iter().map(|(id, _)| id.as_str()).collect();
        let errors: Vec<&str> = failures.iter().map(|(_, e)| e.as_str()).collect();
        self.client.execute(statement, &[&ids, &errors]).await.map_err(OutboxError::query("mark failed"))
    }

    /// Counts pending rows and the age of the oldest.
    pub async fn pending_stats(&self) -> Result<PendingStats, OutboxError> {
        let row = self.client.query_one(&self.pending_stats, &[]).await.map_err(OutboxError::query("stats"))?;
        Ok(PendingStats { rows: row.get(0), oldest_age_seconds: row.get(1) })
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
                topic_values: (AUDIT_TOPIC_COLUMN..r.len()).map(|i| r.get(i)).collect(),
            })
            .collect())
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

    /// Tries to become the one relay publishing this table, with a session advisory lock that
    /// PostgreSQL releases when this connection ends. Two relays publishing one table would
    /// send every row twice and interleave keys.
    pub async fn try_lead(&self) -> Result<bool, OutboxError> {
        let key = self.leadership_key();
        let row = self
            .client
            .query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&key])
            .await
            .map_err(OutboxError::query("leadership lock"))?;
        Ok(row.get(0))
    }

    /// The backend pid holding the leadership lock, if any, for the standby's log line.
    pub async fn leader_pid(&self) -> Result<Option<i32>, OutboxError> {
        let key = self.leadership_key();
        let row = self
            .client
            .query_opt(
                "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                 AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0)",
                &[&key],
            )
            .await
            .map_err(OutboxError::query("leader lookup"))?;
        Ok(row.map(|r| r.get(0)))
    }

    fn leadership_key(&self) -> String {
        format!("outbox-relay:{}", self.layout.mapping.table_name())
    }
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

fn decode_row(row: &tokio_postgres::Row) -> Result<OutboxRow, (String, String)> {
    // The id is selected as text and is what marks the row, so it is read first; a row whose
    // id cannot be read cannot be marked either way, and the claim fails as a whole.
    let id: String = match row.try_get(claim_columns::ID) {
        Ok(id) => id,
        Err(e) => return Err((String::new(), format!("id: {e}"))),
    };
    let field = |name: &str, e: tokio_postgres::Error| (id.clone(), format!("cannot read {name}: {e}"));
    let event_id: String = row.try_get(claim_columns::EVENT_ID).map_err(|e| field("event_id", e))?;
    let key: Option<String> = row.try_get(claim_columns::KEY).map_err(|e| field("key", e))?;
    let payload: Option<RawPayload> = row.try_get(claim_columns::PAYLOAD).map_err(|e| field("payload", e))?;
    let headers: Option<String> = row.try_get(claim_columns::HEADERS).map_err(|e| field("headers", e))?;
    let mut topic_values = Vec::with_capacity(row.len() - claim_columns::TOPIC);
    for i in claim_columns::TOPIC..row.len() {
        topic_values.push(row.try_get::<_, Option<String>>(i).map_err(|e| field("topic", e))?);
    }
    Ok(OutboxRow { id, event_id, key, payload: payload.map(|p| p.0), headers, topic_values })
}

/// The payload column's bytes as the record value: JSON text for json and jsonb, UTF-8 for
/// text, the stored bytes for bytea.
struct RawPayload(Vec<u8>);

/// jsonb's binary wire format starts with this version byte, followed by the JSON text.
const JSONB_FORMAT_VERSION: u8 = 1;

impl<'a> FromSql<'a> for RawPayload {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            return match raw.split_first() {
                Some((&JSONB_FORMAT_VERSION, json)) => Ok(RawPayload(json.to_vec())),
                _ => Err("unsupported jsonb wire format version".into()),
            };
        }
        if matches!(*ty, Type::TEXT | Type::VARCHAR | Type::BPCHAR) {
            std::str::from_utf8(raw)?;
        }
        Ok(RawPayload(raw.to_vec()))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSONB | Type::JSON | Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::BYTEA)
    }
}
