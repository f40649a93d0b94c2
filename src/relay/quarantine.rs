//! Rows whose outcome the database refuses to record, kept apart so that every other row flows.
//!
//! Marks and failure records are written for a whole batch in one statement. When PostgreSQL
//! refuses that statement because of one row (a trigger that raises for it, a constraint or an
//! index its values do not fit: [`crate::postgres::error::OutboxError::is_refused_for_a_row`]), retrying
//! the batch would fail forever and stop the relay. Instead the batch is written row by row,
//! and each row the database refuses is named in an ERROR line and kept here:
//! - a row acknowledged but not marked is left out of every claim, so it is not published
//!   again while the relay runs (a restart publishes it once more, as after any crash);
//! - a row whose failure could not be recorded is left out of claims too, and its key is held,
//!   so that later rows of its key wait for it as they would behind any failing row.
//!
//! Each is written again after a backoff (doubling to `LONGEST_WAIT`) until the database takes
//! it, for example once the trigger is fixed.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::postgres::row::{RowFailure, RowId, RowRef};

/// The first wait before a refused row is written again.
const FIRST_WAIT: Duration = Duration::from_secs(1);

/// The longest wait between two tries.
const LONGEST_WAIT: Duration = Duration::from_secs(60);

/// What could not be written for a row.
#[derive(Debug, Clone)]
pub enum Unwritten {
    /// Its mark: the broker acknowledged its record.
    Mark {
        /// Its topic (for the per-topic counter, once marked).
        topic: String,
    },
    /// A failed attempt of its own (`outage: false`) or during an outage.
    Failure {
        /// The failure.
        failure: RowFailure,
        /// Whether it failed because of an outage (not counted toward giving up).
        outage: bool,
    },
}

/// A row the database refused to record.
#[derive(Debug, Clone)]
pub struct QuarantinedRow {
    /// The row.
    pub row: RowRef,
    /// Its key, held while a failure waits to be recorded.
    pub key: Option<String>,
    /// What is still to be written.
    pub unwritten: Unwritten,
    /// When to try again.
    next_try: Instant,
    /// The wait after the next refusal.
    wait: Duration,
}

/// The rows kept apart.
#[derive(Debug, Default)]
pub struct Quarantine {
    rows: Vec<QuarantinedRow>,
}

impl Quarantine {
    /// Keeps `row` apart until `unwritten` can be written.
    pub fn add(&mut self, row: RowRef, key: Option<String>, unwritten: Unwritten, now: Instant) {
        self.rows.push(QuarantinedRow { row, key, unwritten, next_try: now + FIRST_WAIT, wait: FIRST_WAIT * 2 });
    }

    /// Puts back a row the database refused again, to be tried after a longer wait.
    pub fn refused_again(&mut self, mut row: QuarantinedRow, now: Instant) {
        row.next_try = now + row.wait;
        row.wait = (row.wait * 2).min(LONGEST_WAIT);
        self.rows.push(row);
    }

    /// Takes out the rows due for another try.
    pub fn take_due(&mut self, now: Instant) -> Vec<QuarantinedRow> {
        let (due, waiting) = std::mem::take(&mut self.rows).into_iter().partition(|r| r.next_try <= now);
        self.rows = waiting;
        due
    }

    /// The ids of the rows kept apart, which claims leave out.
    pub fn row_ids(&self) -> impl Iterator<Item = &RowId> {
        self.rows.iter().map(|r| &r.row.id)
    }

    /// The keys held behind a failure not yet recorded.
    pub fn held_keys(&self) -> HashSet<String> {
        self.rows
            .iter()
            .filter(|r| matches!(r.unwritten, Unwritten::Failure { .. }))
            .filter_map(|r| r.key.clone())
            .collect()
    }

    /// How many rows are kept apart.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> RowRef {
        RowRef { id: id.into(), event_id: None }
    }

    #[test]
    fn a_refused_row_is_tried_again_after_a_growing_wait_and_only_failures_hold_their_key() {
        let t0 = Instant::now();
        let mut quarantine = Quarantine::default();
        quarantine.add(row("1"), Some("K".into()), Unwritten::Mark { topic: "t".into() }, t0);
        let failure = RowFailure { row: row("2"), key: Some("L".into()), error: "boom".into() };
        quarantine.add(row("2"), Some("L".into()), Unwritten::Failure { failure, outage: false }, t0);
        assert_eq!(quarantine.row_ids().map(RowId::as_str).collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(quarantine.held_keys(), HashSet::from(["L".to_owned()]), "a published row holds nothing back");
        assert!(quarantine.take_due(t0).is_empty());
        let due = quarantine.take_due(t0 + FIRST_WAIT);
        assert_eq!(due.len(), 2);
        assert!(quarantine.is_empty());
        for row in due {
            quarantine.refused_again(row, t0 + FIRST_WAIT);
        }
        assert!(quarantine.take_due(t0 + FIRST_WAIT * 2).is_empty(), "the wait doubles");
        assert_eq!(quarantine.take_due(t0 + FIRST_WAIT * 3).len(), 2);
    }
}
