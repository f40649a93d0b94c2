//! Which shards of the table this relay publishes, and how it keeps them only while it is alive.
//!
//! Keys are hashed into `relay.shards` shards; each shard is published by exactly one relay,
//! the one holding its PostgreSQL advisory lock. Locks are session locks on the relay's claim
//! connection: if the relay dies or loses the connection, PostgreSQL releases them and another
//! relay takes the shards over at its next rebalance. Each relay also holds a membership lock,
//! so every relay can count the others and aim for its share, `ceil(shards / relays)`: it takes
//! free shards up to that share and hands back shards beyond it (only between batches, so a
//! shard changes hands with nothing of it in flight, which keeps per-key order).
//!
//! The locks are keyed by the table's OID, so every spelling of the table names the same
//! shards, and only locks of the current database count. Every relay of a table declares the
//! shard count it runs with (a shared lock keyed by the count), and a relay whose count differs
//! from a running relay's refuses to start: two counts would split keys two ways.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use tracing::info;

use crate::outbox::{Outbox, OutboxError};

/// This relay's shards.
#[derive(Debug)]
pub struct Shards {
    count: u32,
    owned: BTreeSet<i32>,
    /// This relay's number among the table's relays, once registered.
    member: Option<i32>,
    interval: Duration,
    last_rebalance: Option<Instant>,
    /// Another relay's session idle this long belongs to a frozen relay.
    takeover_after: Duration,
}

impl Shards {
    /// No shards yet; `count` shards in all, rebalanced at most every `interval`; another
    /// relay idle for `takeover_after` looks frozen.
    pub fn new(count: u32, interval: Duration, takeover_after: Duration) -> Shards {
        Shards { count, owned: BTreeSet::new(), member: None, interval, last_rebalance: None, takeover_after }
    }

    /// The shards this relay may claim rows of.
    pub fn owned(&self) -> Vec<i32> {
        self.owned.iter().copied().collect()
    }

    /// The connection that held the locks is gone, and with it the locks.
    pub fn forget(&mut self) {
        if !self.owned.is_empty() {
            info!(shards = self.owned.len(), "database connection lost: shards released");
        }
        self.owned.clear();
        self.member = None;
        self.last_rebalance = None;
    }

    /// Whether the next [`Shards::rebalance`] would do anything.
    pub fn rebalance_due(&self) -> bool {
        self.last_rebalance.is_none_or(|at| at.elapsed() >= self.interval)
    }

    /// Registers this relay (first making sure every relay of the table runs with the same
    /// shard count, and none of an earlier version runs), then takes free shards up to its share and hands back shards beyond it. Does
    /// nothing if the last rebalance was less than the interval ago. Call only with no batch in
    /// flight.
    pub async fn rebalance(&mut self, outbox: &Outbox) -> Result<(), OutboxError> {
        if !self.rebalance_due() {
            return Ok(());
        }
        self.last_rebalance = Some(Instant::now());
        if self.member.is_none() {
            outbox.check_no_earlier_version().await?;
            outbox.declare_shard_count(self.count).await?;
        }
        while self.member.is_none() {
            let candidate = random_instance();
            if outbox.join(candidate).await? {
                self.member = Some(candidate);
            }
        }
        let ownership = outbox.ownership(self.takeover_after).await?;
        let relays = ownership.relays.iter().filter(|r| r.member).count().max(1) as u32;
        let share = self.count.div_ceil(relays) as usize;
        let before = self.owned.clone();

        while self.owned.len() > share {
            if let Some(shard) = self.owned.pop_last() {
                outbox.unlock_shard(shard).await?;
            }
        }
        if self.owned.len() < share {
            let taken: BTreeSet<i32> = ownership.shards.iter().map(|owner| owner.shard).collect();
            for shard in (0..self.count as i32).filter(|s| !taken.contains(s)) {
                if self.owned.len() >= share {
                    break;
                }
                if outbox.lock_shard(shard).await? {
                    self.owned.insert(shard);
                }
            }
        }
        if self.owned != before {
            info!(
                relays,
                owned = self.owned.len(),
                shards = ?self.owned,
                "shards now published by this relay"
            );
        }
        Ok(())
    }
}

/// A number identifying this relay among the table's relays (collisions are retried).
fn random_instance() -> i32 {
    let n = RandomState::new().hash_one(Instant::now());
    (n & 0x7fff_ffff) as i32
}
