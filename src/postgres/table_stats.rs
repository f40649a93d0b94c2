//! The table's gauges: how many rows are pending, failing, failed and held back by an open
//! transaction, how old the oldest are, and which transaction holds the commit horizon back.
//! Read by [`crate::service::stats`] on a connection of its own and by `outbox-relay status`.

use crate::postgres::error::OutboxError;
use crate::postgres::layout::Layout;
use crate::postgres::outbox::Outbox;

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

/// The result columns of [`Layout::pending_stats_sql`], one per field of [`PendingStats`].
mod stats_column {
    pub const ROWS: &str = "pending_rows";
    pub const OLDEST_AGE: &str = "oldest_age_seconds";
    pub const FAILED_ROWS: &str = "failed_rows";
    pub const HELD_ROWS: &str = "held_rows";
    pub const OLDEST_HELD_AGE: &str = "oldest_held_age_seconds";
    pub const FAILING_ROWS: &str = "failing_rows";
}

impl Outbox {
    /// Counts pending, failed and held-back rows and the age of the oldest pending one.
    pub async fn pending_stats(&self) -> Result<PendingStats, OutboxError> {
        use stats_column::*;
        let what = "stats";
        let row = self.client.query_one(&self.statements.pending_stats, &[]).await.map_err(OutboxError::query(what))?;
        let decode = || -> Result<PendingStats, tokio_postgres::Error> {
            Ok(PendingStats {
                rows: row.try_get(ROWS)?,
                oldest_age_seconds: row.try_get(OLDEST_AGE)?,
                failed_rows: row.try_get(FAILED_ROWS)?,
                held_rows: row.try_get(HELD_ROWS)?,
                oldest_held_age_seconds: row.try_get(OLDEST_HELD_AGE)?,
                failing_rows: row.try_get(FAILING_ROWS)?,
            })
        };
        decode().map_err(OutboxError::query(what))
    }

    /// The open transaction that holds the commit horizon back, if any. `held_rows` are the
    /// stats of the same moment: their oldest held row's age stands in for the transaction's
    /// age when PostgreSQL hides that from the relay's role. Its pid is never hidden; a
    /// prepared transaction has none, and its gid instead.
    pub async fn oldest_transaction(&self, held_rows: &PendingStats) -> Result<Option<OldestTransaction>, OutboxError> {
        let what = "oldest transaction";
        let row = self.client.query_opt(OLDEST_TRANSACTION_SQL, &[]).await.map_err(OutboxError::query(what))?;
        let Some(r) = row else { return Ok(None) };
        let decode = || -> Result<OldestTransaction, tokio_postgres::Error> {
            Ok(OldestTransaction {
                pid: r.try_get("pid")?,
                prepared: r.try_get("gid")?,
                seconds: r.try_get::<_, Option<f64>>("seconds")?.or(held_rows.oldest_held_age_seconds).unwrap_or(0.0),
                state: r.try_get("state")?,
                query: r.try_get("query")?,
            })
        };
        decode().map(Some).map_err(OutboxError::query(what))
    }
}

impl Layout {
    /// The table's gauges, one row of the columns named in `stats_column`: pending rows (not
    /// failed), age in seconds of the oldest of them (NULL without a created-at column or
    /// pending rows), failed rows, pending rows held back by the commit horizon, the age in
    /// seconds of the oldest of those (NULL as for the pending age), and failing rows (not
    /// failed for good, with failed attempts of their own).
    pub fn pending_stats_sql(&self) -> String {
        use stats_column::*;
        let m = &self.mapping;
        let failed = match &m.failed_at {
            Some(f) => format!("{f} IS NOT NULL"),
            None => "false".to_owned(),
        };
        let age = match &m.created_at {
            Some(created_at) => {
                format!("extract(epoch FROM now() - min({created_at}) FILTER (WHERE NOT ({failed})))::float8")
            }
            None => "NULL::float8".to_owned(),
        };
        let is_held = match &m.xact_id {
            Some(h) => format!("{h} >= pg_snapshot_xmin(pg_current_snapshot())"),
            None => "false".to_owned(),
        };
        let held_age = match &m.created_at {
            Some(created_at) => {
                format!("extract(epoch FROM now() - min({created_at}) FILTER (WHERE {is_held}))::float8")
            }
            None => "NULL::float8".to_owned(),
        };
        let failing = match &m.attempts {
            Some(attempts) => format!("NOT ({failed}) AND {attempts} > 0"),
            None => "false".to_owned(),
        };
        let unpublished = match &m.published_at {
            Some(published_at) => format!("WHERE {published_at} IS NULL"),
            None => String::new(),
        };
        format!(
            "SELECT count(*) FILTER (WHERE NOT ({failed})) AS {ROWS}, {age} AS {OLDEST_AGE}, \
             count(*) FILTER (WHERE {failed}) AS {FAILED_ROWS}, count(*) FILTER (WHERE {is_held}) AS {HELD_ROWS}, \
             {held_age} AS {OLDEST_HELD_AGE}, count(*) FILTER (WHERE {failing}) AS {FAILING_ROWS} \
             FROM {table} {unpublished}",
            table = m.table_sql(),
        )
    }
}

/// The oldest transaction that holds an xid, the one that holds the commit horizon back: a
/// session's, or a prepared transaction's (two-phase commit), which has no session. Returns
/// `pid` (NULL for a prepared transaction), `seconds` since it began (since it was prepared),
/// `state`, the start of its current `query`, and a prepared transaction's `gid`.
const OLDEST_TRANSACTION_SQL: &str = "SELECT pid, seconds, state, query, gid FROM ( \
       SELECT pid, extract(epoch FROM now() - xact_start)::float8 AS seconds, coalesce(state, '') AS state, \
              left(coalesce(query, ''), 200) AS query, NULL::text AS gid, age(backend_xid) AS age \
       FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
       UNION ALL \
       SELECT NULL::int4, extract(epoch FROM now() - prepared)::float8, 'prepared', '', gid, age(transaction) \
       FROM pg_prepared_xacts) AS t \
     ORDER BY age DESC LIMIT 1";
