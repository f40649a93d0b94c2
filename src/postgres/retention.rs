//! The retention statement: deleting rows published long enough ago, in batches. When and how
//! often is [`crate::service::retention`]'s business.

use std::time::Duration;

use crate::postgres::error::OutboxError;
use crate::postgres::layout::Layout;
use crate::postgres::outbox::Outbox;
use crate::postgres::params::{Value, statement_params};

statement_params! {
    /// The parameters of [`Layout::retention_delete_sql`].
    pub enum RetentionParam {
        /// How long ago a row must have been published, in seconds (`float8`).
        PublishedBefore,
        /// The most rows one statement deletes (`int8`).
        Limit,
    }
}

impl Outbox {
    /// Deletes up to `limit` rows published more than `age` ago; returns how many.
    pub async fn delete_published(&self, age: Duration, limit: i64) -> Result<u64, OutboxError> {
        let Some(sql) = self.layout.retention_delete_sql() else { return Ok(0) };
        let age = age.as_secs_f64();
        let values = RetentionParam::values(|param| -> Value<'_> {
            match param {
                RetentionParam::PublishedBefore => &age,
                RetentionParam::Limit => &limit,
            }
        });
        self.client.execute(&sql, &values).await.map_err(OutboxError::query("retention"))
    }
}

impl Layout {
    /// Deletes up to `RetentionParam::Limit` rows published more than
    /// `RetentionParam::PublishedBefore` seconds ago, oldest ids first, skipping rows another
    /// session has locked. `None` without a published-at column.
    pub fn retention_delete_sql(&self) -> Option<String> {
        let m = &self.mapping;
        let published_at = m.published_at.as_ref()?;
        Some(format!(
            "DELETE FROM {table} WHERE {id} IN (SELECT {id} FROM {table} \
             WHERE {published_at} IS NOT NULL AND {published_at} < now() - {before}::float8 * interval '1 second' \
             ORDER BY {id} LIMIT {limit} FOR UPDATE SKIP LOCKED)",
            table = m.table_sql(),
            id = m.id,
            before = RetentionParam::PublishedBefore,
            limit = RetentionParam::Limit,
        ))
    }
}
