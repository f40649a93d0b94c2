//! What `outbox-relay audit` reads of the table: the rows of a range with their state and
//! topic, and the two conversions it asks the database for so that it reads ids and times as
//! PostgreSQL does.

use crate::postgres::error::OutboxError;
use crate::postgres::failed_rows::readable_text;
use crate::postgres::layout::{Layout, TopicSource, attempts_sql, is_set, text_or_null};
use crate::postgres::outbox::Outbox;
use crate::postgres::params::{Value, statement_params};

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

statement_params! {
    /// The parameters of [`Layout::audit_rows_sql`], each NULL for "no bound".
    pub enum AuditParam {
        /// The lowest id (text, inclusive).
        FromId,
        /// The highest id (text, inclusive).
        ToId,
        /// The earliest creation time (a text timestamp, inclusive).
        Since,
        /// The latest creation time (a text timestamp, exclusive).
        Until,
        /// The topic, when it comes from a column (a template's topic is checked row by row
        /// instead).
        Topic,
    }
}

/// The topic column, or each of the template's columns, is named this followed by its
/// position in [`TopicSource::columns`] (`topic_0`, ...).
const TOPIC_PREFIX: &str = "topic_";

impl Outbox {
    /// The rows in `range` (and with `topic`, when the topic is a column), in claim order.
    pub async fn audit_rows(&self, range: &RowRange, topic: Option<&str>) -> Result<Vec<AuditRow>, OutboxError> {
        let what = "audit rows";
        let values = AuditParam::values(|param| -> Value<'_> {
            match param {
                AuditParam::FromId => &range.from_id,
                AuditParam::ToId => &range.to_id,
                AuditParam::Since => &range.since,
                AuditParam::Until => &range.until,
                AuditParam::Topic => &topic,
            }
        });
        let rows = self.client.query(&self.layout.audit_rows_sql(), &values).await.map_err(OutboxError::query(what))?;
        rows.iter()
            .map(|r| {
                Ok(AuditRow {
                    id: r.try_get("id")?,
                    event_id: r.try_get("event_id")?,
                    published: r.try_get("published")?,
                    attempts: r.try_get("attempts")?,
                    last_error: r.try_get("last_error")?,
                    failed: r.try_get("failed")?,
                    topic_values: r
                        .columns()
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.name().starts_with(TOPIC_PREFIX))
                        .map(|(i, _)| readable_text(r, i))
                        .collect(),
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(OutboxError::query(what))
    }

    /// Whether id `from` sorts after id `to` in the table's id type: a range holding no row.
    pub async fn id_range_is_empty(&self, from: &str, to: &str) -> Result<bool, OutboxError> {
        let sql = format!("SELECT $1::text::{ty} > $2::text::{ty}", ty = self.layout.id_type);
        let row = self.client.query_one(&sql, &[&from, &to]).await.map_err(OutboxError::query("compare ids"))?;
        row.try_get(0).map_err(OutboxError::query("compare ids"))
    }

    /// Milliseconds since the epoch of a timestamp as PostgreSQL reads it (so `audit` accepts
    /// the same formats in `--since` as the database does).
    pub async fn epoch_millis(&self, timestamp: &str) -> Result<i64, OutboxError> {
        let row = self
            .client
            .query_one("SELECT (extract(epoch FROM $1::text::timestamptz) * 1000)::int8", &[&timestamp])
            .await
            .map_err(OutboxError::query("read timestamp"))?;
        row.try_get(0).map_err(OutboxError::query("read timestamp"))
    }
}

impl Layout {
    /// Rows for `audit`, in claim order (`AuditParam`): `id`, `event_id`, `published`,
    /// `attempts`, `last_error`, `failed`, then the topic columns.
    pub fn audit_rows_sql(&self) -> String {
        use AuditParam::*;
        let m = &self.mapping;
        let (published, attempts) = (is_set(&m.published_at), attempts_sql(self));
        let last_error = text_or_null(&m.last_error);
        let mut filters = vec![
            format!("({FromId}::text IS NULL OR o.{id} >= {FromId}::text::{ty})", id = m.id, ty = self.id_type),
            format!("({ToId}::text IS NULL OR o.{id} <= {ToId}::text::{ty})", id = m.id, ty = self.id_type),
        ];
        if let Some(created_at) = &m.created_at {
            filters.push(format!("({Since}::text IS NULL OR o.{created_at} >= {Since}::text::timestamptz)"));
            filters.push(format!("({Until}::text IS NULL OR o.{created_at} < {Until}::text::timestamptz)"));
        } else {
            // Keep the time bounds typed; the caller refuses a time range without a created-at column.
            filters.push(format!("({Since}::text IS NULL AND {Until}::text IS NULL)"));
        }
        match &m.topic {
            TopicSource::Column(c) => filters.push(format!("({Topic}::text IS NULL OR o.{c} = {Topic}::text)")),
            TopicSource::Template(_) | TopicSource::Route(_) => {
                filters.push(format!("({Topic}::text IS NULL OR true)"))
            }
        }
        let topic: Vec<String> =
            m.topic.columns().iter().enumerate().map(|(i, c)| format!("o.{c}::text AS {TOPIC_PREFIX}{i}")).collect();
        format!(
            "SELECT o.{id}::text AS id, o.{event_id}::text AS event_id, {published} AS published, \
             {attempts} AS attempts, {last_error} AS last_error, {failed} AS failed, {topic} \
             FROM {table} AS o WHERE {filters} ORDER BY o.{order}",
            id = m.id,
            event_id = m.event_id,
            failed = is_set(&m.failed_at),
            topic = topic.join(", "),
            table = m.table_sql(),
            filters = filters.join(" AND "),
            order = m.order_by,
        )
    }
}
