//! Records set aside while their partition stalls, so that one partition the broker cannot
//! write holds back only the rows routed to it.
//!
//! A batch waits for every delivery report, but not forever while the brokers answer: after
//! `relay.stalled_partition_after` without a report, its unacknowledged records are set aside
//! here. They stay in flight: librdkafka never abandons a record (a record the broker wrote
//! late must not be sent twice), and its report, when it comes, settles the row as any other.
//! Until then:
//! - the row is left out of every claim, so it is not sent again;
//! - its key is held: no later row of the key is claimed, so nothing overtakes it;
//! - its shard does not change hands (the loop does not rebalance), so no other relay sends it;
//! - the producer is not replaced, which would abandon it.
//!
//! The operator sees which topic and partition wait and since when: a warning every
//! `WARN_EVERY`, `outbox_relay_stalled_records{topic,partition}`, and a `/readyz` reason.

use std::collections::{BTreeMap, HashSet};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::kafka::delivery::Outcome;

use crate::kafka::publisher::PendingReport;
use crate::postgres::row::{RowId, RowRef};
use crate::service::health::Health;
use crate::service::metrics::Metrics;

/// How often the relay says again which partitions keep records waiting.
const WARN_EVERY: Duration = Duration::from_secs(15);

/// A record set aside, and the row it came from.
pub struct SetAside {
    /// The row.
    pub row: RowRef,
    /// Its key: later rows of it wait.
    pub key: Option<String>,
    /// Its topic.
    pub topic: String,
    /// Its partition, when the relay can tell (a keyed record of a checked topic).
    pub partition: Option<i32>,
    /// When its row was created, for the delivery latency.
    pub created_at: Option<f64>,
    /// When its batch was sent.
    pub sent_at: Instant,
    /// Its delivery report.
    pub report: PendingReport,
    /// Its outcome, once the report came.
    outcome: Option<Outcome>,
}

impl SetAside {
    /// A record of a batch whose wait ended before its report came.
    pub fn new(
        row: RowRef,
        key: Option<String>,
        topic: String,
        partition: Option<i32>,
        created_at: Option<f64>,
        sent_at: Instant,
        report: PendingReport,
    ) -> SetAside {
        SetAside { row, key, topic, partition, created_at, sent_at, report, outcome: None }
    }
}

/// The records set aside, oldest first.
#[derive(Default)]
pub struct StalledRecords {
    records: Vec<SetAside>,
    last_warned: Option<Instant>,
    /// The metric's label pairs set last time, to clear the ones that no longer wait.
    labelled: HashSet<(String, String)>,
}

impl StalledRecords {
    /// Adds records a batch stopped waiting for.
    pub fn set_aside(&mut self, records: Vec<SetAside>) {
        self.records.extend(records);
    }

    /// How many records wait.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The ids of the rows that wait, which claims must leave out.
    pub fn row_ids(&self) -> impl Iterator<Item = &RowId> {
        self.records.iter().map(|r| &r.row.id)
    }

    /// The keys held behind a waiting record.
    pub fn held_keys(&self) -> Vec<String> {
        let keys: HashSet<&str> = self.records.iter().filter_map(|r| r.key.as_deref()).collect();
        keys.into_iter().map(str::to_owned).collect()
    }

    /// Polls every report that has not come; true if any has (now or before).
    fn poll_reports(&mut self, cx: &mut Context<'_>) -> bool {
        let mut any = false;
        for record in &mut self.records {
            if record.outcome.is_none()
                && let Poll::Ready((_, outcome)) = Pin::new(&mut record.report).poll(cx)
            {
                record.outcome = Some(outcome);
            }
            any |= record.outcome.is_some();
        }
        any
    }

    /// Waits until a report has come (forever when none waits).
    pub async fn any_reported(&mut self) {
        std::future::poll_fn(|cx| if self.poll_reports(cx) { Poll::Ready(()) } else { Poll::Pending }).await
    }

    /// Takes out the records whose reports have come, with their outcomes.
    pub fn take_reported(&mut self) -> Vec<(SetAside, Outcome)> {
        let waker = futures::task::noop_waker();
        self.poll_reports(&mut Context::from_waker(&waker));
        let (reported, waiting): (Vec<SetAside>, Vec<SetAside>) =
            std::mem::take(&mut self.records).into_iter().partition(|r| r.outcome.is_some());
        self.records = waiting;
        reported
            .into_iter()
            .filter_map(|mut record| {
                let outcome = record.outcome.take()?;
                Some((record, outcome))
            })
            .collect()
    }

    /// The partitions that keep records waiting: topic, partition (`?` when unknown), records,
    /// and the oldest one's send time.
    fn by_partition(&self) -> BTreeMap<(String, String), (usize, Instant)> {
        let mut partitions: BTreeMap<(String, String), (usize, Instant)> = BTreeMap::new();
        for record in &self.records {
            let partition = record.partition.map_or_else(|| "?".to_owned(), |p| p.to_string());
            let entry = partitions.entry((record.topic.clone(), partition)).or_insert((0, record.sent_at));
            entry.0 += 1;
            entry.1 = entry.1.min(record.sent_at);
        }
        partitions
    }

    /// Tells the operator which partitions keep records waiting: the metric and readiness
    /// always, a warning every `WARN_EVERY`.
    pub fn report(&mut self, metrics: &Metrics, health: &Health, now: Instant) {
        if self.records.is_empty() && self.labelled.is_empty() {
            // Nothing waits, and nothing was reported as waiting: every turn passes here.
            return;
        }
        let partitions = self.by_partition();
        let mut reasons = Vec::new();
        let mut labelled = HashSet::new();
        for ((topic, partition), (records, since)) in &partitions {
            let waiting_s = now.saturating_duration_since(*since).as_secs();
            metrics.stalled_records.with_label_values(&[topic, partition]).set(*records as i64);
            labelled.insert((topic.clone(), partition.clone()));
            reasons.push(format!(
                "{records} records for topic {topic} partition {partition} unacknowledged for {waiting_s} s (the rows of \
                 their keys wait; other rows flow)"
            ));
        }
        for (topic, partition) in self.labelled.difference(&labelled) {
            let _ = metrics.stalled_records.remove_label_values(&[topic, partition]);
        }
        self.labelled = labelled;
        health.set_stalled_partitions(reasons.clone());
        if reasons.is_empty() {
            self.last_warned = None;
            return;
        }
        if self.last_warned.is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY) {
            self.last_warned = Some(now);
            let first_row = self.records.first().map(|r| r.row.id.to_string()).unwrap_or_default();
            warn!(
                partitions = %reasons.join("; "),
                first_row,
                "the broker has not acknowledged these records: they stay in flight and are never sent twice; their rows \
                 and the later rows of their keys wait, every other row is published (a partition without enough \
                 in-sync replicas, an offline log directory or a deleted topic; kafka-topics --describe tells which)"
            );
        }
    }
}
