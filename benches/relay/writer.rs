//! The latency runs' writer: at a fixed rate, one insert transaction every [`TICK`], each
//! tick at its intended time, so that a writer or relay that falls behind shows as latency
//! rather than as a lower rate. Both the latency section and the Debezium section write so.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::KEYS;

/// How often the writer commits.
pub const TICK: Duration = Duration::from_millis(10);

/// A writer of `rate` rows a second for `run`.
pub struct FixedRate {
    /// Rows in each transaction.
    pub per_tick: usize,
    /// Transactions in the run.
    pub ticks: u64,
}

/// What a run of the writer did.
pub struct Written {
    /// Ticks the writer began more than a tick after their intended time.
    pub late_ticks: u64,
    /// When each tick's commit returned to the writer, seconds since the epoch.
    pub committed: Vec<f64>,
}

impl FixedRate {
    pub fn new(rate: u64, run: Duration) -> FixedRate {
        FixedRate {
            per_tick: (rate as usize * TICK.as_millis() as usize / 1000).max(1),
            ticks: (run.as_millis() / TICK.as_millis()) as u64,
        }
    }

    /// Rows the whole run writes.
    pub fn rows(&self) -> i64 {
        (self.ticks as usize * self.per_tick) as i64
    }

    /// The keys of one transaction's rows, spread over the benchmark's keys.
    pub fn keys(&self) -> Vec<String> {
        (0..self.per_tick).map(|i| format!("key-{}", i as i64 % KEYS)).collect()
    }

    /// Calls `commit(tick, intended)` at each tick's intended time (`intended` in seconds since
    /// the epoch), starting 100 ms from now; `commit` inserts and commits that tick's rows.
    pub async fn run(&self, mut commit: impl AsyncFnMut(u64, f64)) -> Written {
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        let start_wall = SystemTime::now() + Duration::from_millis(100);
        let mut written = Written { late_ticks: 0, committed: Vec::with_capacity(self.ticks as usize) };
        for tick in 0..self.ticks {
            let due = start + TICK * tick as u32;
            if tokio::time::Instant::now() > due + TICK {
                written.late_ticks += 1;
            }
            tokio::time::sleep_until(due).await;
            let intended = seconds_since_epoch(start_wall + TICK * tick as u32);
            commit(tick, intended).await;
            written.committed.push(seconds_since_epoch(SystemTime::now()));
        }
        written
    }
}

fn seconds_since_epoch(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}
