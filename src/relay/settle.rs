//! Writing a batch's outcome to the table: the mark of the acknowledged rows and the failed
//! attempts of the others, and, when the database refuses that for one row, writing it row by
//! row and keeping the refused rows apart ([`crate::relay::quarantine`]).
//!
//! This is the only place that marks rows published, and it is handed only rows whose own
//! delivery report acknowledged them ([`Settlement::acked`]).

use std::time::Instant;

use tracing::{debug, error, info, warn};

use super::Relay;
use super::batch::Settlement;
use super::quarantine::{QuarantinedRow, Unwritten};
use crate::config::OnPoison;
use crate::postgres::error::OutboxError;
use crate::postgres::outbox::Outbox;
use crate::postgres::row::{RowId, RowRef};
use crate::service::health::Health;

/// A step of the loop the liveness probe watches: started when made, finished when dropped,
/// so that no path out of the step (an error, a cancelled wait) leaves it open.
pub(super) struct HealthStep<'a>(&'a Health);

impl<'a> HealthStep<'a> {
    /// Tells `health` a step started.
    pub(super) fn start(health: &'a Health) -> HealthStep<'a> {
        health.step_started();
        HealthStep(health)
    }
}

impl Drop for HealthStep<'_> {
    fn drop(&mut self) {
        self.0.step_finished();
    }
}

impl Relay {
    /// [`Relay::settle`] as a step the liveness probe watches.
    pub(super) async fn settle_step(&self, outbox: &Outbox, settlement: &mut Settlement) -> Result<(), OutboxError> {
        let _step = HealthStep::start(&self.health);
        self.settle(outbox, settlement).await
    }

    /// Writes a batch's outcome: marks the acknowledged rows (each acknowledged by its own
    /// report), records the failed ones, and gives up on those past `relay.max_attempts`.
    pub(super) async fn settle(&self, outbox: &Outbox, settlement: &mut Settlement) -> Result<(), OutboxError> {
        if !settlement.acked_marked {
            let rows: Vec<RowRef> = settlement.acked.iter().map(|acked| acked.row.clone()).collect();
            match outbox.mark_published(&rows).await {
                Ok(_) => {}
                Err(e) if e.is_refused_for_a_row() => self.mark_row_by_row(outbox, settlement, &e).await?,
                Err(e) => return Err(e),
            }
            settlement.acked_marked = true;
            for acked in &settlement.acked {
                self.metrics.published.with_label_values(&[&acked.topic]).inc();
            }
            self.failure_reports.forget(settlement.acked.iter().map(|acked| acked.row.id.as_str()));
        }
        let given_up: Vec<RowId> =
            match outbox.record_failures(&settlement.row_failures, &settlement.outage_failures).await {
                Ok(given_up) => given_up.into_iter().map(RowId::from).collect(),
                Err(e) if e.is_refused_for_a_row() => self.record_failures_row_by_row(outbox, settlement, &e).await?,
                Err(e) => return Err(e),
            };
        let row_retries = settlement.row_failures.len().saturating_sub(given_up.len());
        self.metrics.retries.with_label_values(&["row"]).inc_by(row_retries as u64);
        self.metrics.retries.with_label_values(&["outage"]).inc_by(settlement.outage_failures.len() as u64);
        for id in &given_up {
            let failure = settlement.row_failures.iter().find(|f| f.row.id == *id);
            let error = failure.map(|f| f.error.as_str()).unwrap_or("");
            warn!(
                row = %id,
                error,
                attempts = self.config.relay.max_attempts,
                "giving up on a row: marked failed; `outbox-relay retry` re-queues it"
            );
            if let (OnPoison::Skip, Some(key)) = (self.config.relay.on_poison, failure.and_then(|f| f.key.as_ref())) {
                // Its key's later rows go ahead without it now: should it ever be published, it
                // comes after them.
                self.metrics.key_order_breaks.inc();
                error!(
                    row = %id,
                    key = %key,
                    "relay.on_poison = \"skip\": the key's later rows are published without this row, so the key's order \
                     on the topic is broken (see outbox_relay_key_order_breaks_total in the README)"
                );
            }
        }
        self.failure_reports.forget(given_up.iter().map(RowId::as_str));
        debug!(
            published = settlement.acked.len(),
            failed = settlement.row_failures.len() + settlement.outage_failures.len(),
            "batch settled"
        );
        Ok(())
    }

    /// Marks a batch's acknowledged rows one by one after the database refused the batch's mark
    /// (`refused`) because of some row: each row it refuses again is kept apart and named.
    async fn mark_row_by_row(
        &self,
        outbox: &Outbox,
        settlement: &Settlement,
        refused: &OutboxError,
    ) -> Result<(), OutboxError> {
        warn!(rows = settlement.acked.len(), error = %refused, "the database refused a batch's mark; marking row by row");
        for acked in &settlement.acked {
            match outbox.mark_published(std::slice::from_ref(&acked.row)).await {
                Ok(_) => {}
                Err(e) if e.is_refused_for_a_row() => {
                    error!(
                        row = %acked.row,
                        error = %e,
                        "the broker acknowledged this row but the database refuses to mark it published; it is not \
                         published again while the relay runs, and marked once the database takes it (a restart before \
                         that publishes it once more)"
                    );
                    self.keep_apart(acked.row.clone(), None, Unwritten::Mark { topic: acked.topic.clone() });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Records a batch's failures one by one after the database refused the batch's record
    /// (`refused`): each row it refuses again is kept apart, its key held, and named. Returns
    /// the rows given up on.
    async fn record_failures_row_by_row(
        &self,
        outbox: &Outbox,
        settlement: &Settlement,
        refused: &OutboxError,
    ) -> Result<Vec<RowId>, OutboxError> {
        warn!(error = %refused, "the database refused to record a batch's failures; recording them row by row");
        let mut given_up = Vec::new();
        let failures = settlement.row_failures.iter().map(|f| (f, false));
        for (failure, outage) in failures.chain(settlement.outage_failures.iter().map(|f| (f, true))) {
            let (rows, outages) = if outage {
                (&[][..], std::slice::from_ref(failure))
            } else {
                (std::slice::from_ref(failure), &[][..])
            };
            match outbox.record_failures(rows, outages).await {
                Ok(ids) => given_up.extend(ids.into_iter().map(RowId::from)),
                Err(e) if e.is_refused_for_a_row() => {
                    error!(
                        row = %failure.row,
                        error = %e,
                        "the database refuses to record this row's failed attempt; the row and the later rows of its key \
                         wait until it does"
                    );
                    let unwritten = Unwritten::Failure { failure: failure.clone(), outage };
                    self.keep_apart(failure.row.clone(), failure.key.clone(), unwritten);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(given_up)
    }

    /// Keeps `row` apart until `unwritten` can be written ([`crate::relay::quarantine`]).
    fn keep_apart(&self, row: RowRef, key: Option<String>, unwritten: Unwritten) {
        if let Ok(mut quarantine) = self.quarantine.lock() {
            quarantine.add(row, key, unwritten, Instant::now());
        }
    }

    /// Tries again to write what the database refused for rows kept apart, for those due.
    pub(super) async fn write_quarantined(&self, outbox: &Outbox) {
        let due = match self.quarantine.lock() {
            Ok(mut quarantine) => quarantine.take_due(Instant::now()),
            Err(_) => return,
        };
        for kept in due {
            let written = match &kept.unwritten {
                Unwritten::Mark { .. } => outbox.mark_published(std::slice::from_ref(&kept.row)).await.map(|_| ()),
                Unwritten::Failure { failure, outage: false } => {
                    outbox.record_failures(std::slice::from_ref(failure), &[]).await.map(|_| ())
                }
                Unwritten::Failure { failure, outage: true } => {
                    outbox.record_failures(&[], std::slice::from_ref(failure)).await.map(|_| ())
                }
            };
            self.after_quarantined_write(kept, written);
        }
    }

    /// Releases a row kept apart once written, or keeps it for another try.
    fn after_quarantined_write(&self, kept: QuarantinedRow, written: Result<(), OutboxError>) {
        match written {
            Ok(()) => {
                info!(row = %kept.row, "the database took what it had refused for this row; it is released");
            }
            Err(e) => {
                debug!(row = %kept.row, error = %e, "the database still refuses this row's outcome");
                if let Ok(mut quarantine) = self.quarantine.lock() {
                    quarantine.refused_again(kept, Instant::now());
                }
            }
        }
    }
}
