//! Telling the operator that a row failed: once per row and failure, not once per attempt.
//!
//! A row that fails for a reason of its own is reported at once at error level, with what
//! fixes it: the relay keeps retrying it with a growing backoff, and an operator should not
//! learn of it only when it is given up on minutes later. Every further attempt that fails the
//! same way is logged at debug level only (and counted, as every attempt is, in
//! `outbox_relay_publish_errors_total{reason}`): a backlog of failing rows would otherwise
//! write an error line per row per attempt and drown the one line that says what to do.

use std::collections::HashMap;
use std::sync::Mutex;

use tracing::{debug, error};

/// Rows remembered at most; past it the memory starts over (and each row is reported once more).
const REMEMBERED_ROWS: usize = 100_000;

/// The failures already reported, by row id.
#[derive(Debug, Default)]
pub struct RowFailureReports {
    reported: Mutex<HashMap<String, &'static str>>,
}

impl RowFailureReports {
    /// Reports row `id`'s failure of kind `reason` at error level, unless this failure of this
    /// row was reported already.
    pub fn report(&self, id: &str, reason: &'static str, error: &str) {
        let first = match self.reported.lock() {
            Ok(mut reported) => {
                if reported.len() >= REMEMBERED_ROWS {
                    reported.clear();
                }
                reported.insert(id.to_owned(), reason) != Some(reason)
            }
            Err(_) => true,
        };
        if !first {
            debug!(row = %id, reason, error, "the row failed again the same way");
            return;
        }
        error!(
            row = %id,
            reason,
            error,
            "a row failed with an error of its own: {}; it is retried after a backoff until relay.max_attempts, and once \
             the cause is fixed `outbox-relay retry --id {id}` tries it again at once (later attempts that fail the same \
             way are logged at debug level)",
            fix(reason)
        );
    }

    /// Forgets rows that no longer fail (published, or given up on), so that a later failure of
    /// theirs is reported again.
    pub fn forget<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        if let Ok(mut reported) = self.reported.lock()
            && !reported.is_empty()
        {
            for id in ids {
                reported.remove(id);
            }
        }
    }
}

/// What fixes a row failure of kind `reason` (a label of `metrics::PUBLISH_ERROR_REASONS`).
fn fix(reason: &str) -> &'static str {
    match reason {
        "unknown_topic" => "create its topic (the relay never creates topics) or correct the row's topic",
        "message_too_large" => {
            "the record alone is over a size limit (the error names it): make the row smaller, or raise the topic's \
             max.message.bytes and kafka.properties.message.max.bytes past it"
        }
        "not_authorized" => "grant the relay's Kafka principal WRITE on the topic",
        "invalid_record" => "correct the row: the broker refused the record (the error says why)",
        "invalid_row" => "correct the row: it cannot become a Kafka record (the error says which column)",
        "partition_out_of_range" => {
            "correct the row's partition column (outbox.record.placements), or add partitions to the topic"
        }
        _ => "see the error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_reported_once_until_it_changes_or_the_row_is_forgotten() {
        let reports = RowFailureReports::default();
        let reported = |reports: &RowFailureReports| reports.reported.lock().map(|r| r.len()).unwrap_or(0);
        reports.report("7", "unknown_topic", "no topic");
        reports.report("7", "unknown_topic", "no topic");
        assert_eq!(reported(&reports), 1);
        assert_eq!(reports.reported.lock().unwrap().get("7"), Some(&"unknown_topic"));
        reports.report("7", "message_too_large", "too large");
        assert_eq!(reports.reported.lock().unwrap().get("7"), Some(&"message_too_large"), "a new failure is news");
        reports.forget(["7"]);
        assert_eq!(reported(&reports), 0);
    }
}
