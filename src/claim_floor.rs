//! Where the claim starts: the lowest position in claim order that can still hold a row the
//! relay will publish, so that each claim skips the long run of already-published rows.
//!
//! Why it matters: marking a row published leaves a dead entry behind in the index the claim
//! walks (the partial index of unpublished rows, or the primary key with `mark = "delete"`), and
//! those entries stay until VACUUM removes them. A claim that starts at the beginning steps over
//! every one of them; on a backlog of millions that was the larger part of each claim's time,
//! and the drain rate fell as the backlog grew. With a floor, a claim starts near its first live
//! row whatever the table's history.
//!
//! The invariant: every row below the floor that the relay may ever claim has been published,
//! has failed for good, belongs to another relay's shard, or waits behind a failed row of its
//! key. What can break it, and how each case is met:
//!
//! - **Rows that commit late.** A transaction may take its id from the sequence, then commit
//!   after later ids were published. Such a row is invisible to a claim whose snapshot saw the
//!   transaction running, so a floor taken from that claim could pass it. A candidate floor is
//!   therefore promoted only after two later claims' snapshot horizons (`xmin`) have passed the
//!   candidate claim's `xmax`: by then every transaction that had taken an id below the
//!   candidate has ended and its rows are visible, and the promoting claim's own first live row
//!   (which sees them) caps the new floor. The second horizon covers a transaction that took
//!   its id just before the candidate's snapshot and its transaction id just after.
//! - **Ids that do not grow with time**: a sequence with a cache (each session holds a block of
//!   ids) or a descending one, ids the application assigns, an order column that is not an
//!   integer. The floor is then never used ([`ClaimFloor::disabled`]); the claim starts at the
//!   beginning as before.
//! - **Rows made claimable again out of band**: `outbox-relay retry` (which notifies the relay,
//!   and the next claim starts at the beginning), or an operator setting `published_at` back to
//!   NULL. A full claim from the beginning every `relay.full_scan_interval` picks those up and
//!   lowers the floor to them.
//! - **Rows the relay itself claimed and has not published** (in flight, failed, in backoff):
//!   they are unpublished and not failed for good, so the first live row of every claim, which
//!   caps every candidate, is at or below them.
//! - **A change of shards**: rows of a newly held shard may lie anywhere, so the floor is
//!   forgotten and built again from the beginning.
//!
//! The floor is only ever an optimisation: forgetting it costs speed, never rows.

use std::time::{Duration, Instant};

use tracing::debug;

/// What one claim saw, besides its rows: where its first live row was, and its snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimView {
    /// The lowest claim-order value, at or above where the claim started, of a row that is
    /// unpublished, not failed, of the claimed shards and not held back by a failed row of its
    /// key; `None` when there is none.
    pub first_live: Option<i64>,
    /// The claim snapshot's `xmin`: every transaction below it had ended.
    pub xmin: u64,
    /// The claim snapshot's `xmax`: every transaction from it on had not started.
    pub xmax: u64,
}

/// How many later claims' horizons must pass a candidate's snapshot before it becomes the floor.
const HORIZONS_BEFORE_PROMOTION: u8 = 2;

/// A floor waiting for the transactions that could still add rows below it to end.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    /// The first live row of the claim it came from.
    value: i64,
    /// The transaction id the next claim's `xmin` must reach.
    wait_for: u64,
    /// Horizons still to pass, including `wait_for`.
    horizons_left: u8,
}

/// The claim floor of one relay's claim loop.
#[derive(Debug)]
pub struct ClaimFloor {
    /// False when ids do not grow with time; the claim then always starts at the beginning.
    enabled: bool,
    /// Claims start here; `None` is the beginning.
    floor: Option<i64>,
    candidate: Option<Candidate>,
    /// The shards the floor was built for.
    shards: Vec<i32>,
    full_scan_interval: Duration,
    /// When the last claim from the beginning ran; `None` forces one.
    last_full_scan: Option<Instant>,
}

impl ClaimFloor {
    /// A floor for ids that grow with time, with a claim from the beginning at least every
    /// `full_scan_interval`.
    pub fn new(full_scan_interval: Duration) -> ClaimFloor {
        ClaimFloor {
            enabled: true,
            floor: None,
            candidate: None,
            shards: Vec::new(),
            full_scan_interval,
            last_full_scan: None,
        }
    }

    /// No floor: every claim starts at the beginning.
    pub fn disabled() -> ClaimFloor {
        ClaimFloor { enabled: false, ..ClaimFloor::new(Duration::MAX) }
    }

    /// Where the next claim of `shards` starts (`None`: at the beginning).
    pub fn start(&mut self, shards: &[i32], now: Instant) -> Option<i64> {
        if !self.enabled {
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
    /// and saw `view`; `None` when it claimed nothing, which still counts as a full scan.
    pub fn observe(&mut self, started_at: Option<i64>, view: Option<&ClaimView>, now: Instant) {
        if !self.enabled {
            return;
        }
        if started_at.is_none() {
            self.last_full_scan = Some(now);
        }
        let Some(view) = view else { return };
        if started_at.is_none() {
            // Rows made claimable again below the floor: the floor comes down to them.
            if let (Some(floor), Some(first_live)) = (self.floor, view.first_live)
                && first_live < floor
            {
                debug!(floor, first_live, "a claim from the beginning found rows below the claim floor");
                self.floor = Some(first_live);
            }
        }
        if let Some(mut candidate) = self.candidate
            && view.xmin >= candidate.wait_for
        {
            candidate.horizons_left -= 1;
            if candidate.horizons_left == 0 {
                // This claim sees every row that commits below the candidate; its first live
                // row, if lower, is where claiming must go on.
                let promoted = view.first_live.map_or(candidate.value, |first| first.min(candidate.value));
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
            && let Some(first_live) = view.first_live
            && self.floor.is_none_or(|floor| first_live > floor)
        {
            self.candidate =
                Some(Candidate { value: first_live, wait_for: view.xmax, horizons_left: HORIZONS_BEFORE_PROMOTION });
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

    fn view(first_live: Option<i64>, xmin: u64, xmax: u64) -> ClaimView {
        ClaimView { first_live, xmin, xmax }
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
    fn the_floor_rises_to_a_first_live_row_once_two_horizons_pass_it() {
        let mut floor = ClaimFloor::new(LONG);
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
        let mut floor = ClaimFloor::new(LONG);
        let now = Instant::now();
        claim(&mut floor, now, view(Some(1000), 10, 20));
        claim(&mut floor, now, view(Some(2000), 20, 30));
        // The transaction that held id 900 committed; this claim sees row 900 as first live.
        claim(&mut floor, now, view(Some(900), 30, 40));
        assert_eq!(floor.start(&SHARDS, now), Some(900));
    }

    #[test]
    fn the_floor_never_falls_by_promotion_and_only_a_full_scan_lowers_it() {
        let mut floor = ClaimFloor::new(Duration::from_secs(10));
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
        let mut floor = ClaimFloor::new(LONG);
        let now = Instant::now();
        risen_to_1000(&mut floor, now);
        floor.rescan();
        assert_eq!(claim(&mut floor, now, view(Some(5), 40, 50)), None);
        assert_eq!(floor.start(&SHARDS, now), Some(5));
    }

    #[test]
    fn other_shards_forget_the_floor() {
        let mut floor = ClaimFloor::new(LONG);
        let now = Instant::now();
        risen_to_1000(&mut floor, now);
        assert_eq!(floor.start(&[0, 1, 2], now), None);
    }

    #[test]
    fn a_full_scan_that_claims_nothing_still_counts() {
        let mut floor = ClaimFloor::new(Duration::from_secs(10));
        let t0 = Instant::now();
        risen_to_1000(&mut floor, t0);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(floor.start(&SHARDS, t1), None);
        floor.observe(None, None, t1);
        assert_eq!(
            floor.start(&SHARDS, t1 + Duration::from_secs(1)),
            Some(1000),
            "an idle relay does not scan it all at every poll"
        );
    }

    #[test]
    fn a_disabled_floor_always_starts_at_the_beginning() {
        let mut floor = ClaimFloor::disabled();
        let now = Instant::now();
        for xid in 0..5 {
            assert_eq!(claim(&mut floor, now, view(Some(1000 * xid as i64), xid * 10, xid * 10 + 10)), None);
        }
    }
}
