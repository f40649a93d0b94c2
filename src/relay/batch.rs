//! The loop's batch state as types: what one claim returned, what a batch still owes the table,
//! and what one turn hands to the next.
//!
//! Batches overlap, but only in these ways (the variants of [`Pending`]):
//! - nothing is owed: the next turn claims afresh;
//! - an outcome is owed and must be written before anything else is claimed or any shard
//!   changes hands (a mark the database did not take, or the reports of records set aside);
//! - a batch was acknowledged whole while the next one was claimed ahead: its outcome is
//!   written while that next batch is produced;
//! - within one turn only, a batch claimed ahead whose companion mark was written on its own
//!   (shards were due to be rebalanced, which happens only with nothing unmarked).
//!
//! Records set aside for a stalled partition ([`crate::relay::stalled`]) are not a state of the
//! batch: they live beside it, whatever it is, until their reports come and are folded into
//! the outcome owed.

use std::collections::HashSet;

use crate::postgres::row::{OutboxRow, RowFailure, RowId, RowKey, RowRef, UnreadableRow};
use crate::service::shutdown::Abandoned;

use super::claim_floor::ClaimFloor;
use super::stalled::SetAside;

/// The rows of one claim: each decoded, or its id and why it could not be.
#[derive(Debug, Default)]
pub(super) struct Claimed {
    pub(super) rows: Vec<Result<OutboxRow, UnreadableRow>>,
    /// Whether the claim may have left claimable rows behind (it reached its row or byte
    /// limit), so the relay claims again at once instead of idling.
    pub(super) full: bool,
}

impl Claimed {
    /// The ids of the rows claimed, which a claim made meanwhile leaves out. An id that could
    /// not be read cannot be left out by id; such a batch fails a row, so whatever is claimed
    /// ahead of it is dropped anyway.
    pub(super) fn row_ids(&self) -> Vec<RowId> {
        self.rows
            .iter()
            .map(|row| match row {
                Ok(row) => row.id.as_str(),
                Err(unreadable) => unreadable.id.as_str(),
            })
            .filter(|id| !id.is_empty())
            .map(RowId::from)
            .collect()
    }
}

/// The next batch, claimed while the one before it awaited its reports, and the shards it was
/// claimed for: it is produced only if the relay still holds exactly those.
#[derive(Debug)]
pub(super) struct Ahead {
    pub(super) shards: Vec<i32>,
    pub(super) claimed: Claimed,
}

/// Where and how the claims of a turn look: the shards held, the claim floor, and what they
/// must leave out because it is still in flight after its batch ([`crate::relay::stalled`]).
pub(super) struct Claiming<'a> {
    pub(super) shards: &'a [i32],
    pub(super) floor: &'a mut ClaimFloor,
    /// Rows set aside in flight: never claimed again while their records may still be written.
    pub(super) set_aside: Vec<RowId>,
    /// Keys held behind a row set aside: none of their rows is claimed.
    pub(super) held_keys: Vec<String>,
}

/// A row the broker acknowledged, and its topic (for the per-topic counter).
#[derive(Debug)]
pub(super) struct AckedRow {
    pub(super) row: RowRef,
    pub(super) topic: String,
}

/// Rows of a batch whose outcome must still be written to the table.
#[derive(Debug, Default)]
pub(super) struct Settlement {
    /// Acknowledged rows: marked only because the broker acknowledged each of them.
    pub(super) acked: Vec<AckedRow>,
    /// Rows that failed because of themselves (bad row, unknown topic, too large).
    pub(super) row_failures: Vec<RowFailure>,
    /// Rows that failed because of an outage.
    pub(super) outage_failures: Vec<RowFailure>,
    /// Set once the acknowledged rows are marked, so a retry does not count them twice.
    pub(super) acked_marked: bool,
}

impl Settlement {
    /// Takes over what is left of `earlier`'s outcome, to be written with this one.
    pub(super) fn absorb(&mut self, earlier: Settlement) {
        if !earlier.acked_marked {
            self.acked.extend(earlier.acked);
        }
        self.row_failures.extend(earlier.row_failures);
        self.outage_failures.extend(earlier.outage_failures);
    }

    /// How many rows failed, for whatever reason.
    pub(super) fn failed(&self) -> usize {
        self.row_failures.len() + self.outage_failures.len()
    }

    /// What abandoning this outcome leaves unpublished: its acknowledged rows not yet marked,
    /// if any (failures not recorded leave nothing that was published).
    pub(super) fn unmarked(&self) -> Option<Abandoned> {
        let rows = if self.acked_marked { 0 } else { self.acked.len() };
        (rows > 0).then_some(Abandoned::Unmarked { rows })
    }
}

/// What a batch still owes the table between two turns: exactly the states that can occur.
#[derive(Debug, Default)]
pub(super) enum Pending {
    /// Nothing: every outcome is written.
    #[default]
    Nothing,
    /// An outcome the table must take before anything else is claimed and before a shard
    /// changes hands: a mark the database did not take, or reports of records set aside.
    Unsettled(Settlement),
    /// A batch of which every row was acknowledged, and the next batch, claimed while it awaited
    /// its reports: its outcome is written while that batch is produced.
    MarkWithNext { settlement: Settlement, ahead: Ahead },
    /// The next batch, claimed ahead, with nothing owed before it: the mark that was to go with
    /// it was written on its own, as the shards were due to be rebalanced. Lives only from
    /// that write to the batch step of the same turn.
    Claimed(Ahead),
}

impl Pending {
    /// Folds `reported` (the reports of records set aside) into what is owed.
    pub(super) fn absorb(&mut self, mut reported: Settlement) {
        match self {
            Pending::Nothing => *self = Pending::Unsettled(reported),
            Pending::Unsettled(settlement) | Pending::MarkWithNext { settlement, .. } => {
                reported.absorb(std::mem::take(settlement));
                *settlement = reported;
            }
            Pending::Claimed(_) => {
                if let Pending::Claimed(ahead) = std::mem::take(self) {
                    *self = Pending::MarkWithNext { settlement: reported, ahead };
                }
            }
        }
    }

    /// Drops the batch claimed ahead: what it was to be marked with is owed on its own, to be
    /// written before anything else happens.
    pub(super) fn without_ahead(self) -> Pending {
        match self {
            Pending::MarkWithNext { settlement, .. } => Pending::Unsettled(settlement),
            Pending::Claimed(_) => Pending::Nothing,
            other => other,
        }
    }

    /// What abandoning this leaves unpublished.
    pub(super) fn unmarked(&self) -> Option<Abandoned> {
        match self {
            Pending::Nothing | Pending::Claimed(_) => None,
            Pending::Unsettled(settlement) | Pending::MarkWithNext { settlement, .. } => settlement.unmarked(),
        }
    }
}

/// What one batch step found.
pub(super) enum Turn {
    /// Nothing to publish right now.
    Idle,
    /// A batch went out and its outcome is recorded, or owed as `pending` says.
    Relayed {
        /// Whether the claim reached its row or byte limit: more rows may be waiting.
        full: bool,
        /// No record was acknowledged and some failed for reasons outside the rows.
        broker_unavailable: bool,
        /// The broker disowned the producer session; the next batch needs a new producer.
        producer_unusable: bool,
        /// What the batch leaves owed: nothing, an outcome to write before the next claim, or
        /// an outcome to write while the batch claimed ahead is produced.
        pending: Pending,
        /// Records whose partition stalled: still in flight, their reports to come.
        set_aside: Vec<SetAside>,
    },
    /// The outcome could not be recorded; it must be before the next claim.
    Unsettled(Settlement, crate::postgres::error::OutboxError),
    /// Shutdown's grace period ended with reports outstanding; the rows stay unpublished.
    Abandoned { rows: usize },
}

/// Keys whose earlier row failed in the batch being built: their later rows wait.
#[derive(Debug, Default)]
pub(super) struct HeldKeys {
    keys: HashSet<String>,
    /// A row whose key could not be read failed: any keyed row after it may share that key.
    every_keyed_row: bool,
}

impl HeldKeys {
    /// Later rows of `key` wait.
    pub(super) fn hold(&mut self, key: RowKey) {
        match key {
            RowKey::Known(Some(key)) => {
                self.keys.insert(key);
            }
            // A keyless row has no order to keep.
            RowKey::Known(None) => {}
            RowKey::Unreadable => self.every_keyed_row = true,
        }
    }

    /// Whether a row of `key` must wait.
    pub(super) fn holds(&self, key: Option<&str>) -> bool {
        key.is_some_and(|key| self.every_keyed_row || self.keys.contains(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_row_holds_back_its_key_and_an_unreadable_key_holds_every_keyed_row() {
        let mut held = HeldKeys::default();
        held.hold(RowKey::Known(None));
        assert!(!held.holds(Some("K")), "a keyless row holds nothing");
        held.hold(RowKey::Known(Some("K".into())));
        assert!(held.holds(Some("K")) && !held.holds(Some("L")) && !held.holds(None));
        held.hold(RowKey::Unreadable);
        assert!(held.holds(Some("L")), "any keyed row may share an unreadable key");
        assert!(!held.holds(None), "keyless rows have no order to keep");
    }
}
