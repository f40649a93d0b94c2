//! `outbox-relay retry`: re-queue rows with failed attempts, so the relay tries them again at
//! once.
//!
//! Both kinds of row are re-queued: those the relay gave up on (after `relay.max_attempts`) and
//! those still waiting out a backoff. For ids named on the command line the report says what
//! became of each one, including the ids that were not re-queued and why: a row already
//! published is a note (the goal of a retry is met, whoever met it), a row that never failed or
//! does not exist is a problem.

use crate::commands::{Outcome, Report};
use crate::config::Config;
use crate::postgres::error::OutboxError;
use crate::postgres::failed_rows::RowState;
use crate::postgres::layout::Mapping;
use crate::postgres::outbox::Outbox;

/// Which failed rows to re-queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These rows, by id as text.
    Ids(Vec<String>),
    /// The failed rows of this key.
    Key(String),
    /// Every failed row.
    All,
}

/// Why `retry` re-queued nothing.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    /// The configured column mapping is invalid.
    #[error("{0}")]
    Mapping(String),
    /// Connecting to the table, or checking it against the mapping, failed.
    #[error(transparent)]
    Connect(OutboxError),
    /// The table records no failures, so there is nothing a retry could re-queue.
    #[error("outbox.columns.failed_at is not set, so no row is ever marked failed")]
    NoFailedAt,
    /// The ids given are not values of the table's id column.
    #[error(
        "--id {}: not ids of table {table} (its id column is {id_type}); see `outbox-relay status` for failed rows",
        ids.join(",")
    )]
    NotIds {
        /// The ids as given.
        ids: Vec<String>,
        /// The table.
        table: String,
        /// The type of its id column.
        id_type: String,
    },
    /// A statement failed once connected.
    #[error(transparent)]
    Query(OutboxError),
}

/// What a retry did.
#[derive(Debug)]
pub struct RetryReport {
    /// How many rows were re-queued, whichever way they were selected.
    pub requeued: usize,
    /// What became of each id asked for: first those re-queued, then the others, each group in
    /// the order asked.
    pub rows: Vec<RowRetry>,
    /// Why what became of the ids not re-queued could not be read, when it could not: they are
    /// then missing from `rows`.
    pub unexplained: Option<OutboxError>,
}

/// What became of one id asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowRetry {
    /// The id as given.
    pub id: String,
    /// What became of it.
    pub fate: Fate,
}

/// What a retry did with one row, or why it did nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Re-queued after the relay had given up on it.
    GivenUpOn {
        /// Its failed attempts before the retry.
        attempts: i64,
    },
    /// Re-queued while it waited out a backoff.
    Failing {
        /// Its failed attempts before the retry.
        attempts: i64,
    },
    /// Re-queued; what it was before is unknown.
    Requeued,
    /// Not re-queued: already published, so there is nothing to do.
    AlreadyPublished,
    /// Not re-queued: it is pending and never failed.
    NeverFailed,
    /// Not re-queued: the table has no row with this id.
    NoSuchRow,
}

impl Fate {
    /// Whether the operator asked for something that could not be done.
    fn is_problem(&self) -> bool {
        matches!(self, Fate::NeverFailed | Fate::NoSuchRow)
    }
}

/// Re-queues the selected rows and, for ids, says what became of each.
pub async fn retry(config: &Config, selection: &Selection) -> Result<RetryReport, RetryError> {
    let mapping = Mapping::from_config(config).map_err(RetryError::Mapping)?;
    let outbox = Outbox::connect(config, &mapping).await.map_err(RetryError::Connect)?;
    if outbox.layout().retry_sql().is_none() {
        return Err(RetryError::NoFailedAt);
    }
    let (ids, key) = match selection {
        Selection::Ids(ids) => (ids.as_slice(), None),
        Selection::Key(key) => (&[][..], Some(key.as_str())),
        Selection::All => (&[][..], None),
    };
    // What the ids asked for were before the retry, to say what became of each.
    let before = if ids.is_empty() {
        Vec::new()
    } else {
        match outbox.row_states(ids).await {
            Ok(states) => states,
            Err(e) if e.is_invalid_value() => Vec::new(), // reported by the retry below
            Err(e) => return Err(RetryError::Query(e)),
        }
    };
    let requeued = match outbox.retry((!ids.is_empty()).then_some(ids), key).await {
        Ok(requeued) => requeued,
        Err(e) if e.is_invalid_value() => {
            return Err(RetryError::NotIds {
                ids: ids.to_vec(),
                table: mapping.table_name(),
                id_type: outbox.layout().id_type.clone(),
            });
        }
        Err(e) => return Err(RetryError::Query(e)),
    };
    let mut report = RetryReport { requeued: requeued.len(), rows: Vec::new(), unexplained: None };
    for id in ids.iter().filter(|id| requeued.contains(id)) {
        let fate = match before.iter().find(|s| &s.id == id) {
            Some(RowState { failed: true, attempts, .. }) => Fate::GivenUpOn { attempts: *attempts },
            Some(RowState { attempts, .. }) => Fate::Failing { attempts: *attempts },
            None => Fate::Requeued,
        };
        report.rows.push(RowRetry { id: id.clone(), fate });
    }
    // Say what became of each id asked for that was not re-queued, as it is now.
    let not_requeued: Vec<String> = ids.iter().filter(|id| !requeued.contains(id)).cloned().collect();
    if not_requeued.is_empty() {
        return Ok(report);
    }
    // The rows are re-queued by now: a failure to read the others must not hide that.
    let states = match outbox.row_states(&not_requeued).await {
        Ok(states) => states,
        Err(e) => {
            report.unexplained = Some(e);
            return Ok(report);
        }
    };
    for id in not_requeued {
        let fate = match states.iter().find(|s| s.id == id) {
            // The goal of a retry is the row published: already met, whoever met it (the
            // relay's own retry often comes first).
            Some(s) if s.published => Fate::AlreadyPublished,
            Some(_) => Fate::NeverFailed,
            None => Fate::NoSuchRow,
        };
        report.rows.push(RowRetry { id, fate });
    }
    Ok(report)
}

/// "1 failed attempt", "3 failed attempts".
fn failed_attempts(n: i64) -> String {
    if n == 1 { "1 failed attempt".to_owned() } else { format!("{n} failed attempts") }
}

impl Report for RetryReport {
    fn render_text(&self) -> String {
        // Rows given up on and rows still being retried (waiting out a backoff) are both
        // re-queued; "failed rows" would misname the second kind.
        let rows = if self.requeued == 1 { "row" } else { "rows" };
        let mut out = format!("re-queued {} {rows} with failed attempts\n", self.requeued);
        for RowRetry { id, fate } in &self.rows {
            let line = match fate {
                Fate::GivenUpOn { attempts } => {
                    format!("row {id}: given up on after {}; re-queued", failed_attempts(*attempts))
                }
                Fate::Failing { attempts } => {
                    format!("row {id}: failing ({}, waiting out a backoff); re-queued", failed_attempts(*attempts))
                }
                Fate::Requeued => format!("row {id}: re-queued"),
                Fate::AlreadyPublished => format!("row {id}: already published; nothing to do"),
                Fate::NeverFailed | Fate::NoSuchRow => continue,
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    fn outcome(&self) -> Outcome {
        if self.unexplained.is_some() || self.rows.iter().any(|row| row.fate.is_problem()) {
            Outcome::NeedsAction
        } else {
            Outcome::Done
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self
            .rows
            .iter()
            .filter_map(|RowRetry { id, fate }| match fate {
                Fate::NeverFailed => Some(format!("retry: row {id}: pending, never failed: nothing to re-queue")),
                Fate::NoSuchRow => Some(format!("retry: row {id}: no such row")),
                _ => None,
            })
            .collect();
        if let Some(e) = &self.unexplained {
            problems.push(format!("retry: {e}"));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rows: &[(&str, Fate)]) -> RetryReport {
        let rows: Vec<RowRetry> =
            rows.iter().map(|(id, fate)| RowRetry { id: id.to_string(), fate: fate.clone() }).collect();
        let requeued = rows.iter().filter(|r| !r.fate.is_problem() && r.fate != Fate::AlreadyPublished).count();
        RetryReport { requeued, rows, unexplained: None }
    }

    #[test]
    fn each_requeued_id_says_what_it_was_before() {
        let report = report(&[
            ("1", Fate::GivenUpOn { attempts: 1 }),
            ("2", Fate::Failing { attempts: 3 }),
            ("3", Fate::Requeued),
        ]);
        assert_eq!(
            report.render_text(),
            "re-queued 3 rows with failed attempts\n\
             row 1: given up on after 1 failed attempt; re-queued\n\
             row 2: failing (3 failed attempts, waiting out a backoff); re-queued\n\
             row 3: re-queued\n"
        );
        assert_eq!(report.outcome(), Outcome::Done);
        assert!(report.problems().is_empty());
    }

    #[test]
    fn an_id_already_published_is_a_note_but_one_never_failed_or_missing_is_a_problem() {
        let report = report(&[("7", Fate::AlreadyPublished), ("8", Fate::NeverFailed), ("9", Fate::NoSuchRow)]);
        assert_eq!(
            report.render_text(),
            "re-queued 0 rows with failed attempts\nrow 7: already published; nothing to do\n"
        );
        assert_eq!(
            report.problems(),
            ["retry: row 8: pending, never failed: nothing to re-queue", "retry: row 9: no such row"]
        );
        assert_eq!(report.outcome(), Outcome::NeedsAction);
    }

    #[test]
    fn one_requeued_row_is_a_row() {
        assert_eq!(
            report(&[("1", Fate::Requeued)]).render_text(),
            "re-queued 1 row with failed attempts\nrow 1: re-queued\n"
        );
    }
}
