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
//!
//! A relay that is frozen (SIGSTOP, a hung call, a paused VM) keeps its session, and the
//! kernel answers its TCP keepalives, so its locks would stay forever. So a relay's liveness is
//! its session's activity: the loop runs a statement on its claim connection at least every
//! [`heartbeat_interval`] whatever it is waiting for ([`with_heartbeat`]), and a rebalance ends
//! the session of any other relay of the table idle for longer than `relay.takeover_after`,
//! which releases its locks. A frozen relay that wakes must not publish a batch it claimed
//! before: the loop hands a batch to the producer only after its session proved itself within
//! [`FENCE`] ([`Outbox::confirm_session`]), and a session that was ended cannot.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::postgres::error::OutboxError;

use crate::postgres::outbox::Outbox;

use crate::postgres::shard_locks::{Ownership, Termination};
use crate::service::health::Health;

/// The longest a live relay's claim session stays idle: the heartbeat's upper bound, whatever
/// `relay.takeover_after` is, so that relays need not agree on that setting (it is at least
/// [`crate::config::MIN_TAKEOVER_AFTER`], three times this).
const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// A batch goes to the producer only if the claim session proved, within this long, that it
/// still exists. Another relay can end the session only after it has been idle for
/// `relay.takeover_after`, at least [`crate::config::MIN_TAKEOVER_AFTER`] (3 s): the other
/// half is the margin for the moment between the check and the hand-over, and for clocks.
pub const FENCE: Duration = Duration::from_millis(1500);

/// How often the claim connection runs a statement at the least: a fifth of
/// `relay.takeover_after`, and at least once a second (but not more than ten times).
pub fn heartbeat_interval(takeover_after: Duration) -> Duration {
    (takeover_after / 5).clamp(Duration::from_millis(100), MAX_HEARTBEAT_INTERVAL)
}

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
    /// Whether the warning that PostgreSQL hides other relays' activity was given.
    warned_hidden: bool,
    /// Whether the warning that this relay may not end frozen relays' sessions was given.
    warned_not_allowed: bool,
}

impl Shards {
    /// No shards yet; `count` shards in all, rebalanced at most every `interval`; another
    /// relay idle for `takeover_after` is ended and its shards taken over.
    pub fn new(count: u32, interval: Duration, takeover_after: Duration) -> Shards {
        Shards {
            count,
            owned: BTreeSet::new(),
            member: None,
            interval,
            last_rebalance: None,
            takeover_after,
            warned_hidden: false,
            warned_not_allowed: false,
        }
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
    /// shard count, and none of an earlier version runs), ends the sessions of relays that look
    /// frozen, then takes free shards up to its share and hands back shards beyond it. Does
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
        if self.take_over_frozen(outbox, &ownership).await? {
            // Their locks go as their backends exit: look again at the next turn of the loop
            // rather than a whole interval later.
            self.last_rebalance = None;
        }
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

    /// Ends the session of every other relay of the table that looks frozen, so that its
    /// locks are released; true if it ended any.
    async fn take_over_frozen(&mut self, outbox: &Outbox, ownership: &Ownership) -> Result<bool, OutboxError> {
        let mut ended_any = false;
        for relay in ownership.relays.iter().filter(|r| !r.mine) {
            if relay.state.is_none() && !self.warned_hidden {
                self.warned_hidden = true;
                warn!(
                    pid = relay.pid,
                    "PostgreSQL hides another relay's session activity from this relay's role, so this relay \
                     cannot tell whether that one is frozen, and a frozen relay keeps its shards: run every \
                     relay of a table as one role, or GRANT pg_read_all_stats (and pg_signal_backend) to the relays' roles"
                );
            }
            // Only a session holding both a membership and a shard-count lock is surely a relay
            // of this version, not another application whose advisory lock keys collide.
            if !relay.looks_frozen || !relay.member || relay.shard_count.is_none() {
                continue;
            }
            match outbox.terminate_if_frozen(relay.pid, self.takeover_after).await? {
                Termination::Ended => {
                    ended_any = true;
                    warn!(
                        pid = relay.pid,
                        client = %relay.client,
                        shards = relay.shards.len(),
                        idle_seconds = relay.idle_seconds.unwrap_or_default().round(),
                        "another relay of the table looks frozen (its session idle longer than relay.takeover_after): \
                         ended its session, so that its shards are taken over"
                    );
                }
                Termination::NoLongerFrozen => debug!(pid = relay.pid, "a relay that looked frozen is active again"),
                Termination::NotAllowed(reason) => {
                    if !self.warned_not_allowed {
                        self.warned_not_allowed = true;
                        warn!(
                            pid = relay.pid,
                            client = %relay.client,
                            shards = relay.shards.len(),
                            error = %reason,
                            "another relay of the table looks frozen, but this relay's role may not end its session, \
                             so its shards stay unpublished: run every relay of a table as one role, or GRANT \
                             pg_signal_backend to the relays' roles"
                        );
                    }
                }
            }
        }
        Ok(ended_any)
    }
}

/// Runs `work` while keeping the claim session visibly alive: whenever the session has run no
/// statement for [`heartbeat_interval`], a trivial one. It runs in the caller's task, not a
/// task of its own, so a loop stuck in a blocking call stops it, its session goes idle, and
/// another relay takes its shards over. A lost connection shows in readiness at once.
pub async fn with_heartbeat<T>(outbox: &Outbox, every: Duration, health: &Health, work: impl Future<Output = T>) -> T {
    tokio::select! {
        biased;
        done = work => done,
        never = heartbeat(outbox, every, health) => match never {},
    }
}

async fn heartbeat(outbox: &Outbox, every: Duration, health: &Health) -> Infallible {
    loop {
        tokio::time::sleep(every.saturating_sub(outbox.proved_alive_ago())).await;
        if outbox.proved_alive_ago() < every {
            continue;
        }
        if let Err(e) = outbox.ping().await {
            // The work on this connection meets the same problem and handles it.
            debug!(error = %e, "heartbeat failed");
            if outbox.is_closed() {
                health.set_database_connected(false);
                return std::future::pending().await;
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// A number identifying this relay among the table's relays (collisions are retried).
fn random_instance() -> i32 {
    let n = RandomState::new().hash_one(Instant::now());
    (n & 0x7fff_ffff) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MIN_TAKEOVER_AFTER;

    #[test]
    fn a_live_relay_heartbeats_well_within_any_other_relays_takeover_time() {
        for takeover_after in [MIN_TAKEOVER_AFTER, Duration::from_secs(30), Duration::from_secs(3600)] {
            let every = heartbeat_interval(takeover_after);
            assert!(every <= takeover_after / 5, "{every:?} for {takeover_after:?}");
            assert!(every * 3 <= MIN_TAKEOVER_AFTER, "{every:?} for {takeover_after:?}");
        }
        assert!(FENCE * 2 <= MIN_TAKEOVER_AFTER, "a fenced batch leaves half the shortest takeover time as margin");
    }
}
