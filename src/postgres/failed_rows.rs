//! The rows the relay could not publish, as the operator's commands see them: grouped by error
//! and the keys they hold back (`outbox-relay status`), where given rows stand, and re-queuing
//! them (`outbox-relay retry`).

use crate::postgres::error::{OutboxError, describe_pg_error};
use crate::postgres::layout::{Layout, attempts_sql, is_set};
use crate::postgres::notify::{CHANNEL, RESCAN_PAYLOAD};
use crate::postgres::outbox::Outbox;
use crate::postgres::params::{Value, statement_params};

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

/// Rows the relay could not publish (yet), as `status` groups them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stuck {
    /// Given up on (until `retry`).
    Failed,
    /// Failing with errors of their own, retried after a backoff, not given up on yet.
    Failing,
}

statement_params! {
    /// The parameters of [`Layout::retry_sql`]; with both NULL, every failed row.
    pub enum RetryParam {
        /// The ids to re-queue (`text[]`), or NULL.
        Ids,
        /// The key whose rows to re-queue (text), or NULL.
        Key,
    }
}

statement_params! {
    /// The parameter of [`Layout::row_states_sql`].
    pub enum RowStatesParam {
        /// The ids of the rows (`text[]`).
        Ids,
    }
}

/// A text value of a user's row for a report (`status`, `audit`). In a SQL_ASCII database it
/// may not be UTF-8; the report shows that rather than failing.
pub(in crate::postgres) fn readable_text<I>(row: &tokio_postgres::Row, column: I) -> Option<String>
where
    I: tokio_postgres::row::RowIndex + std::fmt::Display,
{
    row.try_get::<_, Option<String>>(column).unwrap_or_else(|_| Some("(not valid UTF-8)".to_owned()))
}

impl Outbox {
    /// Re-queues failed rows (given up on, or waiting out a retry backoff) by id, by key, or
    /// all (both `None`); returns the ids re-queued.
    pub async fn retry(&self, ids: Option<&[String]>, key: Option<&str>) -> Result<Vec<String>, OutboxError> {
        let Some(sql) = self.layout.retry_sql() else { return Ok(Vec::new()) };
        let ids: Option<Vec<String>> = ids.map(|ids| ids.to_vec());
        let values = RetryParam::values(|param| -> Value<'_> {
            match param {
                RetryParam::Ids => &ids,
                RetryParam::Key => &key,
            }
        });
        let rows = self.client.query(&sql, &values).await.map_err(OutboxError::query("retry"))?;
        let requeued =
            rows.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>().map_err(OutboxError::query("retry"))?;
        // The claim floor never passes an unpublished row, so running relays find the re-queued
        // rows at their next claim; the notification wakes idle ones at once.
        let notify = "SELECT pg_notify($1, $2)";
        if let Err(e) = self.client.execute(notify, &[&CHANNEL, &RESCAN_PAYLOAD]).await {
            tracing::debug!(
                error = %describe_pg_error(&e),
                "rows re-queued, but idle relays were not woken; they find them at their next poll"
            );
        }
        Ok(requeued)
    }

    /// What became of the rows with these ids; ids of no row are left out.
    pub async fn row_states(&self, ids: &[String]) -> Result<Vec<RowState>, OutboxError> {
        let what = "read rows";
        let values = RowStatesParam::values(|param| -> Value<'_> {
            match param {
                RowStatesParam::Ids => &ids,
            }
        });
        let rows = self.client.query(&self.layout.row_states_sql(), &values).await.map_err(OutboxError::query(what))?;
        rows.iter()
            .map(|r| {
                Ok(RowState {
                    id: r.try_get("id")?,
                    published: r.try_get("published")?,
                    failed: r.try_get("failed")?,
                    attempts: r.try_get("attempts")?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(OutboxError::query(what))
    }

    /// The `stuck` rows grouped by their last error, most frequent first; none when the table
    /// cannot tell such rows apart.
    pub async fn rows_by_error(&self, stuck: Stuck) -> Result<Vec<FailedGroup>, OutboxError> {
        let what = match stuck {
            Stuck::Failed => "failed rows",
            Stuck::Failing => "failing rows",
        };
        let Some(sql) = self.layout.rows_by_error_sql(stuck) else { return Ok(Vec::new()) };
        let rows = self.client.query(&sql, &[]).await.map_err(OutboxError::query(what))?;
        rows.iter()
            .map(|r| {
                Ok(FailedGroup {
                    error: r.try_get("error")?,
                    count: r.try_get("count")?,
                    first_ids: r.try_get("first_ids")?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(OutboxError::query(what))
    }

    /// Keys held back by a failed row.
    pub async fn parked_keys(&self) -> Result<Vec<ParkedKey>, OutboxError> {
        let what = "parked keys";
        let Some(sql) = self.layout.parked_keys_sql() else { return Ok(Vec::new()) };
        let rows = self.client.query(&sql, &[]).await.map_err(OutboxError::query(what))?;
        rows.iter()
            .map(|r| {
                Ok(ParkedKey {
                    key: readable_text(r, "key").unwrap_or_default(),
                    failed_id: r.try_get("failed_id")?,
                    waiting: r.try_get("waiting")?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(OutboxError::query(what))
    }
}

impl Layout {
    /// Re-queues failed rows (given up on, or waiting out a retry backoff): clears failed-at,
    /// attempts and last attempt. Parameters `RetryParam`. Returns the `id`s re-queued.
    pub fn retry_sql(&self) -> Option<String> {
        let m = &self.mapping;
        let (ids, key_param) = (RetryParam::Ids, RetryParam::Key);
        let failed_at = m.failed_at.as_ref()?;
        let mut sets = vec![format!("{failed_at} = NULL")];
        if let Some(attempts) = &m.attempts {
            sets.push(format!("{attempts} = 0"));
        }
        if let Some(last_attempt_at) = &m.last_attempt_at {
            sets.push(format!("{last_attempt_at} = NULL"));
        }
        let key_filter = match &m.key {
            Some(key) => format!("({key_param}::text IS NULL OR {key}::text = {key_param}::text)"),
            None => format!("{key_param}::text IS NULL"),
        };
        // A row waiting out its retry backoff is re-queued too: the operator who fixed the
        // cause need not wait for the backoff (up to `relay.retry_backoff_max`).
        let has_failed = match &m.attempts {
            Some(attempts) => format!("({failed_at} IS NOT NULL OR {attempts} > 0)"),
            None => format!("{failed_at} IS NOT NULL"),
        };
        Some(format!(
            "UPDATE {table} SET {sets} WHERE {has_failed} {unpublished} \
             AND ({ids}::text[] IS NULL OR {id} = ANY({ids}::text[]::{ty}[])) AND {key_filter} RETURNING {id}::text AS id",
            table = m.table_sql(),
            sets = sets.join(", "),
            unpublished = match &m.published_at {
                Some(p) => format!("AND {p} IS NULL"),
                None => String::new(),
            },
            id = m.id,
            ty = self.id_type,
        ))
    }

    /// The state of the rows whose ids are given (`RowStatesParam`): `id`, `published`,
    /// `failed` (for good), `attempts` (failed ones). Ids that match no row are absent.
    pub fn row_states_sql(&self) -> String {
        let m = &self.mapping;
        format!(
            "SELECT o.{id}::text AS id, {published} AS published, {failed} AS failed, {attempts} AS attempts \
             FROM {table} AS o WHERE o.{id} = ANY({ids}::text[]::{ty}[])",
            published = is_set(&m.published_at),
            failed = is_set(&m.failed_at),
            attempts = attempts_sql(self),
            id = m.id,
            table = m.table_sql(),
            ids = RowStatesParam::Ids,
            ty = self.id_type,
        )
    }

    /// The `stuck` rows grouped by error: `error`, `count`, `first_ids` (text[]). `None` when
    /// the table has no column that tells such rows apart.
    pub fn rows_by_error_sql(&self, stuck: Stuck) -> Option<String> {
        let m = &self.mapping;
        let condition = match stuck {
            Stuck::Failed => format!("{} IS NOT NULL", m.failed_at.as_ref()?),
            Stuck::Failing => {
                let not_failed = m.failed_at.as_ref().map(|f| format!(" AND {f} IS NULL")).unwrap_or_default();
                format!("{} > 0{not_failed}", m.attempts.as_ref()?)
            }
        };
        Some(self.by_error_sql(&condition))
    }

    /// Unpublished rows matching `condition` grouped by their last error.
    fn by_error_sql(&self, condition: &str) -> String {
        let m = &self.mapping;
        let error = match &m.last_error {
            Some(e) => format!("coalesce({e}, '(no error recorded)')"),
            None => "'(no error column)'".to_owned(),
        };
        format!(
            "SELECT {error} AS error, count(*) AS count, (array_agg({id}::text ORDER BY {order}))[1:10] AS first_ids \
             FROM {table} WHERE {condition} {unpublished} GROUP BY 1 ORDER BY 2 DESC",
            id = m.id,
            order = m.order_by,
            table = m.table_sql(),
            unpublished = match &m.published_at {
                Some(p) => format!("AND {p} IS NULL"),
                None => String::new(),
            },
        )
    }

    /// Keys held back by a failed row (`on_poison = "park_key"`): `key`, the failed row's id
    /// (`failed_id`), and how many later rows wait behind it (`waiting`).
    pub fn parked_keys_sql(&self) -> Option<String> {
        let m = &self.mapping;
        let (key, failed_at) = (m.key.as_ref()?, m.failed_at.as_ref()?);
        if m.on_poison != crate::config::OnPoison::ParkKey {
            return None;
        }
        let unpublished = |a: &str| match &m.published_at {
            Some(p) => format!("AND {a}.{p} IS NULL"),
            None => String::new(),
        };
        // A key whose failed row has no later row waiting holds nothing back: it is listed with
        // the failed rows, not as parked. The failed row named is the key's first in claim order.
        Some(format!(
            "SELECT key, failed_id, waiting FROM (\
               SELECT f.{key}::text AS key, (array_agg(f.{id}::text ORDER BY f.{order}))[1] AS failed_id, \
                      (SELECT count(*) FROM {table} AS w WHERE w.{key} = f.{key} {wu} AND w.{failed_at} IS NULL \
                         AND w.{order} > min(f.{order})) AS waiting \
               FROM {table} AS f WHERE f.{failed_at} IS NOT NULL {fu} AND f.{key} IS NOT NULL \
               GROUP BY f.{key}) AS p \
             WHERE waiting > 0 ORDER BY waiting DESC LIMIT 100",
            id = m.id,
            order = m.order_by,
            table = m.table_sql(),
            wu = unpublished("w"),
            fu = unpublished("f"),
        ))
    }
}
