//! Keys held back after a partition stalled a transaction (`kafka.delivery = "exactly_once"`),
//! so that one partition the broker cannot write holds back only the rows routed to it.
//!
//! In a transaction, a record still unacknowledged after `relay.stalled_partition_after`
//! cannot be set aside in flight as with at-least-once delivery ([`crate::relay::stalled`]):
//! no row of a transaction counts until it commits, and a transaction waiting on a stalled
//! partition could only wait with it. So the transaction is aborted, and the stalled records'
//! keys (and keyless rows, by id) are held out of the claims: the other rows go out in the next
//! transactions, and no later row of a held key overtakes the held one.
//!
//! A partition's hold ends as soon as a committed transaction wrote to that partition (rows of
//! other keys go there too), or else when the wait is over ([`FIRST_WAIT`] times
//! `relay.stalled_partition_after`), when the held rows are tried again. Each such retry costs
//! one batch a wait of `relay.stalled_partition_after`, so a partition that stalls again doubles
//! the wait, up to [`MAX_WAIT`] times it: a partition down for good costs the other rows under 2%
//! of their time.
//!
//! The operator sees which topic and partition wait: `outbox_relay_stalled_records` and a
//! `/readyz` reason, as with at-least-once delivery.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::postgres::row::RowId;
use crate::service::health::Health;
use crate::service::metrics::Metrics;

/// How long the rows of a stalled partition are held back the first time, in
/// `relay.stalled_partition_after`s (30 s by default).
const FIRST_WAIT: u32 = 6;

/// The longest they are held back, however often the partition stalls again, in
/// `relay.stalled_partition_after`s (5 minutes by default).
const MAX_WAIT: u32 = 60;

/// A record a transaction waited for in vain.
pub struct StalledRecord {
    pub row: RowId,
    pub key: Option<String>,
    pub topic: String,
    /// Its partition, when the relay can tell (a keyed record of a checked topic).
    pub partition: Option<i32>,
}

/// A topic's partition, `None` when the relay cannot tell which (a keyless record).
type Partition = (String, Option<i32>);

/// What one stalled partition holds back.
#[derive(Default)]
struct Hold {
    keys: HashSet<String>,
    rows: HashSet<RowId>,
}

/// The keys and rows held back, by partition, and until when.
pub struct TransactionStalls {
    holds: BTreeMap<Partition, Hold>,
    /// Labels of `outbox_relay_stalled_records` set, to reset once their partition is released.
    labelled: BTreeSet<(String, String)>,
    retry_at: Option<Instant>,
    /// The wait after the next stall.
    wait: Duration,
    /// `relay.stalled_partition_after`, the unit of the waits.
    stalled_after: Duration,
}

impl TransactionStalls {
    /// No key held; `stalled_after` is `relay.stalled_partition_after`.
    pub fn new(stalled_after: Duration) -> TransactionStalls {
        TransactionStalls {
            holds: BTreeMap::new(),
            labelled: BTreeSet::new(),
            retry_at: None,
            wait: stalled_after * FIRST_WAIT,
            stalled_after,
        }
    }

    /// Holds back the keys (or, keyless, the rows) of `stalled` until the wait is over or their
    /// partition took a committed record, and doubles the wait for the next stall.
    pub fn hold(&mut self, stalled: Vec<StalledRecord>, now: Instant) {
        if stalled.is_empty() {
            return;
        }
        for record in stalled {
            let hold = self.holds.entry((record.topic, record.partition)).or_default();
            match record.key {
                Some(key) => {
                    hold.keys.insert(key);
                }
                None => {
                    hold.rows.insert(record.row);
                }
            }
        }
        let wait = self.wait;
        self.retry_at = Some(now + wait);
        self.wait = (wait * 2).min(self.stalled_after * MAX_WAIT);
        warn!(
            partitions = %self.partition_names().join(", "),
            keys = self.holds.values().map(|h| h.keys.len()).sum::<usize>(),
            keyless_rows = self.holds.values().map(|h| h.rows.len()).sum::<usize>(),
            retry_in = ?wait,
            "records were not acknowledged within relay.stalled_partition_after: the transaction is aborted, and the \
             rows of their keys wait before they go out again while the other rows go on"
        );
    }

    /// The rows and keys to leave out of claims now: none once the wait is over, when they
    /// go out again.
    pub fn held(&mut self, now: Instant) -> (Vec<RowId>, Vec<String>) {
        if self.retry_at.is_some_and(|at| now >= at) {
            self.holds.clear();
            self.retry_at = None;
        }
        let rows = self.holds.values().flat_map(|h| h.rows.iter().cloned()).collect();
        let keys = self.holds.values().flat_map(|h| h.keys.iter().cloned()).collect();
        (rows, keys)
    }

    /// A transaction committed records to `written` partitions: their holds end, since the
    /// broker writes them again. Once nothing is held, the next stall waits the first wait again.
    /// `written` is read only while something is held: on the hot path it costs nothing.
    pub fn committed<'a>(&mut self, written: impl IntoIterator<Item = (&'a str, i32)>) {
        if self.holds.is_empty() {
            self.wait = self.stalled_after * FIRST_WAIT;
            return;
        }
        for (topic, partition) in written {
            if self.holds.remove(&(topic.to_owned(), Some(partition))).is_some() {
                info!(topic, partition, "a transaction wrote to a stalled partition again: its held rows go out now");
            }
        }
        if self.holds.is_empty() {
            self.retry_at = None;
        }
    }

    /// Tells the operator which partitions hold rows back: the metric and `/readyz`.
    pub fn report(&mut self, metrics: &Metrics, health: &Health) {
        if self.holds.is_empty() && self.labelled.is_empty() {
            return;
        }
        let mut reasons = Vec::new();
        let mut labelled = BTreeSet::new();
        for ((topic, partition), hold) in &self.holds {
            let partition = partition_label(*partition);
            let rows = hold.keys.len() + hold.rows.len();
            metrics.stalled_records.with_label_values(&[topic, &partition]).set(rows as i64);
            reasons.push(format!(
                "records for topic {topic} partition {partition} were not acknowledged within \
                 relay.stalled_partition_after ({rows} keys or keyless rows wait; other rows flow)"
            ));
            labelled.insert((topic.clone(), partition));
        }
        for (topic, partition) in self.labelled.difference(&labelled) {
            let _ = metrics.stalled_records.remove_label_values(&[topic, partition]);
        }
        self.labelled = labelled;
        health.set_stalled_partitions(reasons);
    }

    fn partition_names(&self) -> Vec<String> {
        self.holds.keys().map(|(topic, p)| format!("topic {topic} partition {}", partition_label(*p))).collect()
    }
}

fn partition_label(partition: Option<i32>) -> String {
    partition.map_or_else(|| "?".to_owned(), |p| p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALLED_AFTER: Duration = Duration::from_secs(5);
    const FIRST: Duration = Duration::from_secs(30);

    fn stalled(row: &str, key: Option<&str>, partition: i32) -> StalledRecord {
        StalledRecord {
            row: RowId::from(row.to_owned()),
            key: key.map(str::to_owned),
            topic: "t".into(),
            partition: key.map(|_| partition),
        }
    }

    #[test]
    fn stalled_keys_are_held_until_the_wait_is_over_and_a_repeated_stall_waits_twice_as_long() {
        let mut stalls = TransactionStalls::new(STALLED_AFTER);
        let start = Instant::now();
        stalls.hold(vec![stalled("1", Some("a"), 1), stalled("2", None, 1)], start);
        assert_eq!(
            stalls.held(start + FIRST - Duration::from_secs(1)),
            (vec![RowId::from("2".to_owned())], vec!["a".to_owned()])
        );
        assert_eq!(stalls.held(start + FIRST), (vec![], vec![]));
        let again = start + FIRST;
        stalls.hold(vec![stalled("1", Some("a"), 1)], again);
        assert_eq!(stalls.held(again + FIRST).1, vec!["a".to_owned()]);
        assert!(stalls.held(again + 2 * FIRST).1.is_empty());
        // A commit while nothing is held: the next stall waits the first wait again.
        stalls.committed([]);
        stalls.hold(vec![stalled("1", Some("a"), 1)], again);
        assert!(stalls.held(again + FIRST).1.is_empty());
    }

    #[test]
    fn a_commit_to_a_stalled_partition_releases_its_keys_and_only_its_own() {
        let mut stalls = TransactionStalls::new(STALLED_AFTER);
        let start = Instant::now();
        stalls.hold(vec![stalled("1", Some("a"), 1), stalled("2", Some("b"), 2), stalled("3", None, 0)], start);
        stalls.committed([("t", 1), ("other", 2)]);
        let (rows, mut keys) = stalls.held(start);
        keys.sort();
        assert_eq!((rows, keys), (vec![RowId::from("3".to_owned())], vec!["b".to_owned()]));
        stalls.committed([("t", 2)]);
        assert_eq!(stalls.held(start).1, Vec::<String>::new());
        assert_eq!(stalls.held(start).0, vec![RowId::from("3".to_owned())], "a keyless row waits out the wait");
    }
}
