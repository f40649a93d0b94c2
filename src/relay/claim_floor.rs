//! Where the claim starts: the lowest position in claim order that can still hold a row the
//! relay will publish, so that each claim skips the long run of already-published rows.
//!
//! Why it matters: marking a row published leaves a dead entry behind in the index the claim
//! walks (the partial index of unpublished rows, or the primary key with `mark = "delete"`), and
//! those entries stay until VACUUM removes them. A claim that starts at the beginning steps over
//! every one of them; on a backlog of millions that was the larger part of each claim's time,
//! and the drain rate fell as the backlog grew. With a floor, a claim starts near its first
//! unpublished row whatever the table's history.
//!
//! The invariant: every row of the relay's shards below the floor is published. Rows that are
//! unpublished for any reason (claimable, in flight, waiting out a retry backoff, failed for
//! good, or waiting behind such a row of their key) are at or above it, so whatever makes one
//! of them claimable again (`outbox-relay retry`, a backoff ending) is seen by the very next
//! claim, together with every later row of its key: nothing can overtake it from above the
//! floor. The price is that a failed row keeps the floor at itself until it is retried. What
//! else can break the invariant, and how each case is met:
//!
//! - **Rows that commit late.** A transaction may take its id from the sequence, then commit
//!   after later ids were published. Such a row is invisible to a claim whose snapshot saw the
//!   transaction running, so a floor taken from that claim could pass it. A candidate floor is
//!   therefore promoted only after two later claims' snapshot horizons (`xmin`) have passed the
//!   candidate claim's `xmax`: by then every transaction that had taken an id below the
//!   candidate has ended and its rows are visible, and the promoting claim's own first
//!   unpublished row (which sees them) caps the new floor. The second horizon covers a
//!   transaction that took its id just before the candidate's snapshot and its transaction id
//!   just after.
//! - **Ids that do not grow with time**: a sequence with a cache (each session holds a block of
//!   ids) or a descending one, ids the application assigns, an order column that is not an
//!   integer. The floor is then never used (see [`ClaimFloor::new`]); the claim starts at the
//!   beginning. The sequence can change while the relay runs (`ALTER SEQUENCE ... CACHE 50`), so
//!   every claim reads it again (`ClaimView::ids_grow_with_time`) and the floor is dropped the
//!   moment it no longer holds.
//! - **Rows set back to unpublished by hand** (`published_at = NULL`): a full claim from the
//!   beginning every `relay.full_scan_interval` picks those up and lowers the floor to them.
//! - **A change of shards**: rows of a newly held shard may lie anywhere, so the floor is
//!   forgotten and built again from the beginning.
//! - **Ids handed out again**: `TRUNCATE ... RESTART IDENTITY`, `ALTER SEQUENCE ... RESTART`
//!   or a `setval` backwards make new rows take ids below the floor. Every claim reads the
//!   table's storage file (a `TRUNCATE` gives it a new one) and the sequence's last value (where
//!   the relay may read it: `GRANT SELECT ON SEQUENCE`); when the file changed or the value went
//!   back, the floor is forgotten and a claim that started at it is thrown away unpublished
//!   ([`Observation::IdsReused`]), since its rows may be later rows of keys whose earlier rows
//!   lie below it. A table replaced under its name (a new OID) is the connection's business:
//!   [`crate::postgres::error::OutboxError::TableReplaced`].
//!
//! The floor is only ever an optimisation: forgetting it costs speed, never rows.

use std::time::{Duration, Instant};

use tracing::{debug, error, info};

// The claim decodes these from its rows; the floor is what reads them.
use crate::postgres::claim::{ClaimView, TableIdentity};

impl TableIdentity {
    /// Why ids below a floor built on `earlier` may have been handed out again by the time of
    /// `self`, or `None` if they cannot have been (as far as the relay can see).
    fn ids_reused_since(&self, earlier: &TableIdentity) -> Option<&'static str> {
        if self.filenode != earlier.filenode {
            return Some("the table was truncated or rewritten (it has new storage)");
        }
        if self.sequence != earlier.sequence {
            return Some("the order column's sequence was replaced");
        }
        match (earlier.sequence_last_value, self.sequence_last_value) {
            (Some(before), Some(now)) if now < before => Some("the order column's sequence was set back"),
            (Some(_), None) => Some("the order column's sequence was restarted"),
            _ => None,
        }
    }
}

/// What the relay must do with a claim the floor has just learnt from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// The claim's rows may be published.
    Valid,
    /// The claim started at a floor below which ids have been handed out again: its rows may
    /// overtake earlier rows of their keys. They must not be published; the next claim starts
    /// at the beginning.
    IdsReused,
}

/// How many later claims' horizons must pass a candidate's snapshot before it becomes the floor.
const HORIZONS_BEFORE_PROMOTION: u8 = 2;

/// A floor waiting for the transactions that could still add rows below it to end.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    /// The first unpublished row of the claim it came from.
    value: i64,
    /// The transaction id the next claim's `xmin` must reach.
    wait_for: u64,
    /// Horizons still to pass, including `wait_for`.
    horizons_left: u8,
}

/// The claim floor of one relay's claim loop.
#[derive(Debug)]
pub struct ClaimFloor {
    /// Whether the order column's ids grow with time, as the last claim read it; while they do
    /// not, claims start at the beginning.
    ids_grow_with_time: bool,
    /// Claims start here; `None` is the beginning.
    floor: Option<i64>,
    candidate: Option<Candidate>,
    /// The shards the floor was built for.
    shards: Vec<i32>,
    full_scan_interval: Duration,
    /// When the last claim from the beginning ran; `None` forces one.
    last_full_scan: Option<Instant>,
    /// The table as the last claim saw it.
    last_seen: Option<TableIdentity>,
}

impl ClaimFloor {
    /// A floor with a claim from the beginning at least every `full_scan_interval`, used while
    /// the order column's ids grow with time (`ids_grow_with_time`: what the catalog said at
    /// connect; every claim then says it again).
    pub fn new(full_scan_interval: Duration, ids_grow_with_time: bool) -> ClaimFloor {
        ClaimFloor {
            ids_grow_with_time,
            floor: None,
            candidate: None,
            shards: Vec::new(),
            full_scan_interval,
            last_full_scan: None,
            last_seen: None,
        }
    }

    /// Where the next claim of `shards` starts (`None`: at the beginning).
    pub fn start(&mut self, shards: &[i32], now: Instant) -> Option<i64> {
        if !self.ids_grow_with_time {
            return None;
        }
        if self.shards != shards {
            self.forget();
            self.shards = shards.to_vec();
        }
        let full_scan_due = self.last_full_scan.is_none_or(|at| now.duration_since(at) >= self.full_scan_interval);
        if full_scan_due {
            return None;
        }
        self.floor
    }

    /// Learns from a claim that started at `started_at` (as returned by [`ClaimFloor::start`])
    /// and saw `view` (`None` if that could not be read, which teaches nothing), and says
    /// whether the claim's rows may be published.
    pub fn observe(&mut self, started_at: Option<i64>, view: Option<&ClaimView>, now: Instant) -> Observation {
        let Some(view) = view else { return Observation::Valid };
        let earlier = self.last_seen.replace(view.table);
        if let Some(why) = earlier.and_then(|earlier| view.table.ids_reused_since(&earlier)) {
            self.forget();
            if started_at.is_some() {
                error!(
                    cause = why,
                    "ids below the claim floor may have been handed out again: the claim that started at the floor is \
                     dropped unpublished, and claims start at the beginning again"
                );
                return Observation::IdsReused;
            }
            info!(cause = why, "the claim floor starts over");
            return Observation::Valid;
        }
        self.observe_rows(started_at, view, now);
        Observation::Valid
    }

    /// [`ClaimFloor::observe`] for a claim of a table whose ids were not reused.
    fn observe_rows(&mut self, started_at: Option<i64>, view: &ClaimView, now: Instant) {
        if view.ids_grow_with_time != self.ids_grow_with_time {
            self.ids_grow_with_time = view.ids_grow_with_time;
            self.forget();
            if view.ids_grow_with_time {
                info!("the order column's sequence hands out ids in insertion order again: the claim floor is back");
            } else {
                error!(
                    "the order column's sequence no longer hands out ids in insertion order (it has a cache, counts down \
                     or cycles): claims now start at the beginning, and a key's rows that take ids out of order are \
                     published in id order, not insertion order; ALTER SEQUENCE ... CACHE 1 restores both"
                );
            }
            return;
        }
        if !self.ids_grow_with_time {
            return;
        }
        if started_at.is_none() {
            self.last_full_scan = Some(now);
            // Rows made claimable again below the floor: the floor comes down to them.
            if let (Some(floor), Some(first_unpublished)) = (self.floor, view.first_unpublished)
                && first_unpublished < floor
            {
                debug!(floor, first_unpublished, "a claim from the beginning found rows below the claim floor");
                self.floor = Some(first_unpublished);
            }
        }
        if let Some(mut candidate) = self.candidate
            && view.xmin >= candidate.wait_for
        {
            candidate.horizons_left -= 1;
            if candidate.horizons_left == 0 {
                // This claim sees every row that commits below the candidate; its first
                // unpublished row, if lower, is where claiming must go on.
                let promoted = view.first_unpublished.map_or(candidate.value, |first| first.min(candidate.value));
                if self.floor.is_none_or(|floor| promoted > floor) {
                    self.floor = Some(promoted);
                }
                self.candidate = None;
            } else {
                candidate.wait_for = view.xmax;
                self.candidate = Some(candidate);
            }
        }
        if self.candidate.is_none()
            && let Some(first_unpublished) = view.first_unpublished
            && self.floor.is_none_or(|floor| first_unpublished > floor)
        {
            self.candidate = Some(Candidate {
                value: first_unpublished,
                wait_for: view.xmax,
                horizons_left: HORIZONS_BEFORE_PROMOTION,
            });
        }
    }

    /// Makes the next claim start at the beginning: rows below the floor may have become
    /// claimable (`outbox-relay retry`).
    pub fn rescan(&mut self) {
        self.last_full_scan = None;
    }

    /// Drops the floor and any candidate: the next claims start at the beginning and build it
    /// again.
    pub fn forget(&mut self) {
        self.floor = None;
        self.candidate = None;
        self.last_full_scan = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARDS: [i32; 2] = [0, 1];
    const LONG: Duration = Duration::from_secs(3600);

    fn view(first_unpublished: Option<i64>, xmin: u64, xmax: u64) -> ClaimView {
        ClaimView { first_unpublished, xmin, xmax, ids_grow_with_time: true, table: TableIdentity::default() }
    }

    /// Runs one claim: where it starts, then what it saw.
    fn claim(floor: &mut ClaimFloor, now: Instant, seen: ClaimView) -> Option<i64> {
        let start = floor.start(&SHARDS, now);
        floor.observe(start, Some(&seen), now);
        start
    }

    /// Three claims whose first live row is 1000, with the horizons passing: the floor is then 1000.
    fn risen_to_1000(floor: &mut ClaimFloor, now: Instant) {
        for xid in 0..3 {
            claim(floor, now, view(Some(1000), xid * 10, xid * 10 + 10));
        }
        assert_eq!(floor.start(&SHARDS, now), Some(1000));
    }

    #[test]
    fn the_floor_rises_to_a_first_unpublished_row_once_two_horizons_pass_it() {
        let mut floor = ClaimFloor::new(LONG, true);
        let now = Instant::now();
        assert_eq!(claim(&mut floor, now, view(Some(1000), 50, 60)), None);
        // xmin 59 < 60: a transaction that may hold an id below 1000 is still running.
        assert_eq!(claim(&mut floor, now, view(Some(2000), 59, 61)), None);
        assert_eq!(claim(&mut floor, now, view(Some(3000), 60, 62)), None, "first horizon");
        assert_eq!(claim(&mut floor, now, view(Some(4000), 61, 63)), None);
        assert_eq!(claim(&mut floor, now, view(Some(5000), 62, 64)), None, "second horizon: promoted");
        assert_eq!(floor.start(&SHARDS, now), Some(1000));
    }

    #[test]
    fn a_late_row_seen_at_promotion_caps_the_floor() {
        let mut floor = ClaimFloor::new(LONG, true);
        let now = Instant::now();
        claim(&mut floor, now, view(Some(1000), 10, 20));
        claim(&mut floor, now, view(Some(2000), 20, 30));
        // The transaction that held id 900 committed; this claim sees row 900 as first live.
        claim(&mut floor, now, view(Some(900), 30, 40));
        assert_eq!(floor.start(&SHARDS, now), Some(900));
    }

    #[test]
    fn the_floor_never_falls_by_promotion_and_only_a_full_scan_lowers_it() {
        let mut floor = ClaimFloor::new(Duration::from_secs(10), true);
        let t0 = Instant::now();
        risen_to_1000(&mut floor, t0);
        // Between full scans, claims start at the floor.
        assert_eq!(claim(&mut floor, t0 + Duration::from_secs(5), view(Some(1500), 40, 50)), Some(1000));
        // The full scan finds a retried row at 10.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(claim(&mut floor, t1, view(Some(10), 50, 60)), None);
        assert_eq!(floor.start(&SHARDS, t1), Some(10));
    }

    #[test]
    fn a_rescan_request_makes_the_next_claim_start_at_the_beginning() {
        let mut floor = ClaimFloor::new(LONG, true);
        let now = Instant::now();
        risen_to_1000(&mut floor, now);
        floor.rescan();
        assert_eq!(claim(&mut floor, now, view(Some(5), 40, 50)), None);
        assert_eq!(floor.start(&SHARDS, now), Some(5));
    }

    #[test]
    fn other_shards_forget_the_floor() {
        let mut floor = ClaimFloor::new(LONG, true);
        let now = Instant::now();
        risen_to_1000(&mut floor, now);
        assert_eq!(floor.start(&[0, 1, 2], now), None);
    }

    #[test]
    fn a_full_scan_that_claims_nothing_still_counts() {
        let mut floor = ClaimFloor::new(Duration::from_secs(10), true);
        let t0 = Instant::now();
        risen_to_1000(&mut floor, t0);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(floor.start(&SHARDS, t1), None);
        floor.observe(None, Some(&view(None, 40, 50)), t1);
        assert_eq!(
            floor.start(&SHARDS, t1 + Duration::from_secs(1)),
            Some(1000),
            "an idle relay does not scan it all at every poll"
        );
    }

    /// A claim's view of a sequence that no longer hands out ids in order.
    #[test]
    fn new_storage_or_a_sequence_set_back_drops_the_floor_and_the_claim_that_started_at_it() {
        let t0 = Instant::now();
        let mut floor = ClaimFloor::new(Duration::from_secs(3600), true);
        let table =
            TableIdentity { oid: Some(1), filenode: Some(10), sequence: Some(2), sequence_last_value: Some(500) };
        let seen = |first, xmin, xmax, table| ClaimView { table, ..view(first, xmin, xmax) };
        let start = floor.start(&[0], t0);
        floor.observe(start, Some(&seen(Some(400), 10, 20, table)), t0);
        for (xmin, xmax) in [(20, 30), (30, 40)] {
            let start = floor.start(&[0], t0);
            assert_eq!(floor.observe(start, Some(&seen(Some(450), xmin, xmax, table)), t0), Observation::Valid);
        }
        assert!(floor.start(&[0], t0).is_some(), "a floor once the horizons passed");

        let truncated = TableIdentity { filenode: Some(11), ..table };
        let start = floor.start(&[0], t0);
        assert_eq!(floor.observe(start, Some(&seen(Some(450), 40, 50, truncated)), t0), Observation::IdsReused);
        assert_eq!(floor.start(&[0], t0), None, "claims start at the beginning again");
        assert_eq!(floor.observe(None, Some(&seen(Some(1), 50, 60, truncated)), t0), Observation::Valid);

        let set_back = TableIdentity { sequence_last_value: Some(3), ..truncated };
        assert_eq!(
            floor.observe(None, Some(&seen(Some(1), 60, 70, set_back)), t0),
            Observation::Valid,
            "a claim from the beginning is valid whatever happened"
        );
        let restarted = TableIdentity { sequence_last_value: None, ..set_back };
        assert_eq!(set_back.ids_reused_since(&truncated), Some("the order column's sequence was set back"));
        assert_eq!(restarted.ids_reused_since(&set_back), Some("the order column's sequence was restarted"));
        let advanced = TableIdentity { sequence_last_value: Some(900), ..truncated };
        assert_eq!(advanced.ids_reused_since(&truncated), None, "ids going on is no change");
    }

    fn out_of_order(first_unpublished: Option<i64>, xmin: u64, xmax: u64) -> ClaimView {
        ClaimView { ids_grow_with_time: false, ..view(first_unpublished, xmin, xmax) }
    }

    #[test]
    fn ids_that_do_not_grow_with_time_keep_every_claim_at_the_beginning() {
        let mut floor = ClaimFloor::new(LONG, false);
        let now = Instant::now();
        for xid in 0..5 {
            let start = floor.start(&SHARDS, now);
            floor.observe(start, Some(&out_of_order(Some(1000 * xid as i64), xid * 10, xid * 10 + 10)), now);
            assert_eq!(start, None);
        }
    }

    #[test]
    fn a_sequence_altered_to_cache_ids_drops_the_floor_at_the_next_claim() {
        let mut floor = ClaimFloor::new(LONG, true);
        let now = Instant::now();
        risen_to_1000(&mut floor, now);
        // The claim that starts at the floor reads the altered sequence.
        let start = floor.start(&SHARDS, now);
        assert_eq!(start, Some(1000));
        floor.observe(start, Some(&out_of_order(Some(1500), 40, 50)), now);
        assert_eq!(floor.start(&SHARDS, now), None, "a row with a cached lower id may lie below the floor");
        floor.observe(None, Some(&out_of_order(Some(990), 50, 60)), now);
        assert_eq!(floor.start(&SHARDS, now), None);
        // CACHE 1 again: the floor is built anew, from the beginning.
        floor.observe(None, Some(&view(Some(990), 60, 70)), now);
        assert_eq!(floor.start(&SHARDS, now), None);
        risen_to_1000(&mut floor, now);
    }
}
