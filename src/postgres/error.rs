//! What went wrong at the database boundary, said once: [`OutboxError`] for every statement
//! and connection of the relay and its commands, and [`describe_pg_error`] for the text of a
//! driver error wherever one is shown (the relay, `migrate`, the inbox, the wake-up watch).
//!
//! tokio-postgres's own `Display` says only "db error" for everything the server reports, so
//! no driver error reaches an operator without passing through [`describe_pg_error`].

use crate::postgres::layout::{LayoutError, Privilege};

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
    #[error("PostgreSQL {what} failed: {}{}", describe_pg_error(source), privilege_hint(source, RELAY_ROLE_REMEDY))]
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

    /// Wraps the driver's error of the statement `what`.
    pub(in crate::postgres) fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> OutboxError {
        move |source| OutboxError::Query { what, source }
    }
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

/// What the relay's role can do about a statement refused for want of a privilege: it lost a
/// grant it had when the relay started (which checks them).
pub const RELAY_ROLE_REMEDY: &str =
    "the relay's role lacks a privilege on the table; the table's owner must grant it, see sql/relay_role.sql";

/// `remedy` in parentheses when the server refused a statement for want of a privilege, so
/// that the message says who must do what; empty for other errors. Each boundary says its own
/// remedy (the relay's role lacks a grant; `migrate` runs as the wrong role).
pub fn privilege_hint(error: &tokio_postgres::Error, remedy: &str) -> String {
    match error.code() {
        Some(code) if *code == tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE => format!(" ({remedy})"),
        _ => String::new(),
    }
}
