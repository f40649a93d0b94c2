//! Writing outcomes back: marking rows published, and recording failed attempts.
//!
//! A row is marked published only through [`Outbox::mark_published`], and the relay calls it
//! only with ids whose delivery report said the broker has the record. Nothing here decides
//! that. Every statement finds its rows by id *and* event id ([`RowRef`]), so that a row that
//! is no longer the one claimed (its table was replaced) is left alone.

use std::time::Instant;

use crate::postgres::error::OutboxError;
use crate::postgres::layout::Layout;
use crate::postgres::outbox::Outbox;
use crate::postgres::params::{Value, statement_params};
use crate::postgres::row::{RowFailure, RowRef};

statement_params! {
    /// The parameters of [`Layout::mark_published_sql`].
    pub enum MarkParam {
        /// The rows' ids, as text.
        Ids,
        /// Their event ids, as text (NULL to match by id alone).
        EventIds,
    }
}

statement_params! {
    /// The parameters of [`Layout::record_row_failures_sql`].
    pub enum RowFailureParam {
        /// The rows' ids, as text.
        Ids,
        /// The error of each.
        Errors,
        /// The attempts after which a row is given up on (`int4`).
        MaxAttempts,
        /// Their event ids, as text.
        EventIds,
    }
}

statement_params! {
    /// The parameters of [`Layout::record_outage_failures_sql`].
    pub enum OutageFailureParam {
        /// The rows' ids, as text.
        Ids,
        /// The error of each.
        Errors,
        /// Their event ids, as text.
        EventIds,
    }
}

/// The result columns of [`Layout::record_row_failures_sql`].
mod given_up_column {
    /// The row's id as text.
    pub const ID: &str = "id";
    /// Whether the row was given up on by this attempt (or before).
    pub const GIVEN_UP: &str = "given_up";
}

/// Rows as the statements that write outcomes take them: ids, event ids and, for failures,
/// errors, each an array in the same order.
struct Rows {
    ids: Vec<String>,
    event_ids: Vec<Option<String>>,
    errors: Vec<String>,
}

impl Rows {
    fn of<'a>(rows: impl IntoIterator<Item = &'a RowRef>) -> Rows {
        let (ids, event_ids) = rows.into_iter().map(|row| (row.id.to_string(), row.event_id.clone())).unzip();
        Rows { ids, event_ids, errors: Vec::new() }
    }

    fn of_failures(failures: &[RowFailure]) -> Rows {
        Rows { errors: failures.iter().map(|f| f.error.clone()).collect(), ..Rows::of(failures.iter().map(|f| &f.row)) }
    }
}

impl Outbox {
    /// Marks rows the broker acknowledged; returns how many changed. Marking a row twice is a
    /// no-op, so a retry after a lost connection is safe; a row that is no longer there under
    /// its id and event id (its table was replaced) is not marked.
    pub async fn mark_published(&self, rows: &[RowRef]) -> Result<u64, OutboxError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let rows = Rows::of(rows);
        let values = MarkParam::values(|param| -> Value<'_> {
            match param {
                MarkParam::Ids => &rows.ids,
                MarkParam::EventIds => &rows.event_ids,
            }
        });
        let sent = Instant::now();
        let marked = self
            .client
            .execute(&self.statements.mark_published, &values)
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
        let mut given_up = Vec::new();
        if let (Some(statement), false) = (&self.statements.record_row_failures, row_failures.is_empty()) {
            let rows = Rows::of_failures(row_failures);
            let values = RowFailureParam::values(|param| -> Value<'_> {
                match param {
                    RowFailureParam::Ids => &rows.ids,
                    RowFailureParam::Errors => &rows.errors,
                    RowFailureParam::MaxAttempts => &self.max_attempts,
                    RowFailureParam::EventIds => &rows.event_ids,
                }
            });
            let result = self.client.query(statement, &values).await.map_err(OutboxError::query("record failures"))?;
            given_up.extend(
                result
                    .iter()
                    .filter(|r| r.get::<_, bool>(given_up_column::GIVEN_UP))
                    .map(|r| r.get::<_, String>(given_up_column::ID)),
            );
        }
        if let (Some(statement), false) = (&self.statements.record_outage_failures, outage_failures.is_empty()) {
            let rows = Rows::of_failures(outage_failures);
            let values = OutageFailureParam::values(|param| -> Value<'_> {
                match param {
                    OutageFailureParam::Ids => &rows.ids,
                    OutageFailureParam::Errors => &rows.errors,
                    OutageFailureParam::EventIds => &rows.event_ids,
                }
            });
            self.client.execute(statement, &values).await.map_err(OutboxError::query("record failures"))?;
        }
        Ok(given_up)
    }
}

impl Layout {
    /// Marks the rows the broker acknowledged (`MarkParam`): sets the published-at column, or
    /// deletes them with `outbox.mark = "delete"`.
    pub fn mark_published_sql(&self) -> String {
        let m = &self.mapping;
        let claimed = format!(
            "unnest({ids}::text[], {event_ids}::text[]) AS m(id, event_id)",
            ids = MarkParam::Ids,
            event_ids = MarkParam::EventIds
        );
        let is_claimed = self.is_the_claimed_row("t", "m");
        // A published row keeps no error from an earlier attempt: the update writes a whole new
        // row version anyway, so clearing it costs nothing.
        let clear_error = match &m.last_error {
            Some(last_error) => format!(", {last_error} = NULL"),
            None => String::new(),
        };
        match &m.published_at {
            Some(published_at) => format!(
                "UPDATE {table} AS t SET {published_at} = now(){clear_error} FROM {claimed} \
                 WHERE {is_claimed} AND t.{published_at} IS NULL",
                table = m.table_sql()
            ),
            None => format!("DELETE FROM {table} AS t USING {claimed} WHERE {is_claimed}", table = m.table_sql()),
        }
    }

    /// Records attempts that failed because of the row itself (`RowFailureParam`). Counts
    /// the attempt, starts the backoff, and gives up (sets the failed-at column) at the limit.
    /// Returns each row's id and whether it is given up on. `None` when the table has no
    /// attempts or last-error column.
    pub fn record_row_failures_sql(&self) -> Option<String> {
        let m = &self.mapping;
        let mut sets = Vec::new();
        if let Some(attempts) = &m.attempts {
            sets.push(format!("{attempts} = t.{attempts} + 1"));
        }
        if let Some(last_error) = &m.last_error {
            sets.push(format!("{last_error} = {}", self.error_value("f")));
        }
        if sets.is_empty() {
            return None;
        }
        if let Some(last_attempt_at) = &m.last_attempt_at {
            sets.push(format!("{last_attempt_at} = now()"));
        }
        let max_attempts = RowFailureParam::MaxAttempts;
        let given_up = match (&m.failed_at, &m.attempts) {
            (Some(failed_at), Some(attempts)) => {
                sets.push(format!("{failed_at} = CASE WHEN t.{attempts} + 1 >= {max_attempts} THEN now() END"));
                format!("t.{failed_at} IS NOT NULL")
            }
            _ => format!("{max_attempts}::int4 IS NULL"),
        };
        Some(format!(
            "UPDATE {table} AS t SET {sets} \
             FROM unnest({ids}::text[], {errors}::text[], {event_ids}::text[]) AS f(id, error, event_id) \
             WHERE {is_claimed} RETURNING t.{id}::text AS {id_column}, {given_up} AS {given_up_column}",
            table = m.table_sql(),
            sets = sets.join(", "),
            ids = RowFailureParam::Ids,
            errors = RowFailureParam::Errors,
            event_ids = RowFailureParam::EventIds,
            id = m.id,
            is_claimed = self.is_the_claimed_row("t", "f"),
            id_column = given_up_column::ID,
            given_up_column = given_up_column::GIVEN_UP,
        ))
    }

    /// Records attempts that failed for reasons outside the row, an outage
    /// (`OutageFailureParam`). Only the error is kept; the attempt does not count toward
    /// giving up.
    pub fn record_outage_failures_sql(&self) -> Option<String> {
        let m = &self.mapping;
        let last_error = m.last_error.as_ref()?;
        Some(format!(
            "UPDATE {table} AS t SET {last_error} = {error} \
             FROM unnest({ids}::text[], {errors}::text[], {event_ids}::text[]) AS f(id, error, event_id) \
             WHERE {is_claimed}",
            error = self.error_value("f"),
            table = m.table_sql(),
            ids = OutageFailureParam::Ids,
            errors = OutageFailureParam::Errors,
            event_ids = OutageFailureParam::EventIds,
            is_claimed = self.is_the_claimed_row("t", "f"),
        ))
    }

    /// The error of failure `f`, cut to the last-error column's length if it has one.
    fn error_value(&self, f: &str) -> String {
        match &self.last_error_type {
            Some(ty) => format!("{f}.error::{ty}"),
            None => format!("{f}.error"),
        }
    }

    /// The condition that row `t` is the one claimed as `f.id`, `f.event_id` (see
    /// [`RowRef`]); a NULL event id matches by id alone.
    fn is_the_claimed_row(&self, t: &str, f: &str) -> String {
        let m = &self.mapping;
        format!(
            "{t}.{id} = {f}.id::{ty} AND ({f}.event_id IS NULL OR {t}.{event_id}::text = {f}.event_id)",
            id = m.id,
            ty = self.id_type,
            event_id = m.event_id,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{MarkParam, OutageFailureParam, RowFailureParam};

    fn placeholders<P: ToString>(all: &[P]) -> Vec<String> {
        all.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn each_statement_numbers_its_parameters_in_the_order_they_are_declared() {
        assert_eq!(placeholders(MarkParam::ALL), ["$1", "$2"]);
        assert_eq!(placeholders(RowFailureParam::ALL), ["$1", "$2", "$3", "$4"]);
        assert_eq!(placeholders(OutageFailureParam::ALL), ["$1", "$2", "$3"]);
    }
}
