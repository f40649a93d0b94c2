//! The batch step: claim (or take the batch claimed ahead), turn the rows into records, produce
//! them and await every report while the database writes the batch before and claims the next,
//! then sort the reports into the outcome to write.
//!
//! Each step keeps one of the loop's invariants ([`crate::relay`]): [`Relay::relay_batch`]
//! claims nothing before the batch before it is marked and hands the producer nothing unless
//! the shards' session is confirmed; [`Relay::deliver_overlapping`] claims ahead only once the
//! batch before is marked, and leaves the rows in flight out; [`Relay::sort_reports`] puts a
//! row among the acknowledged only on its own report; [`Relay::finish_batch`] keeps the batch
//! claimed ahead only when every row of this one was acknowledged.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, UNIX_EPOCH};

use tracing::field::Empty;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::Relay;
use super::batch::{AckedRow, Ahead, Claimed, Claiming, HeldKeys, Pending, Settlement, Turn};
use super::claim_floor::Observation;
use super::exactly_once::Transactions;
use super::shards;
use super::stalled::{SetAside, StalledRecords};
use crate::kafka::delivery::Outcome;
use crate::kafka::publisher::{PendingReport, Published, Publisher};
use crate::kafka::record::Record;
use crate::postgres::error::OutboxError;
use crate::postgres::layout::Layout;
use crate::postgres::outbox::Outbox;
use crate::postgres::row::{OutboxRow, RowFailure, RowId, RowKey, RowRef, UnreadableRow};

/// How long a batch waits for its acknowledgements before the relay says so, and how often it
/// says so again: long enough that a leader election passes unremarked.
const ACKNOWLEDGEMENT_WAIT_WARNING: Duration = Duration::from_secs(15);

/// A claimed batch turned into records: what goes to the producer, and the rows that could not
/// become a record.
struct Prepared {
    /// The records to produce, in the batch's order.
    records: Vec<Record>,
    /// The row of each record, in the same order.
    rows: Vec<RowRef>,
    /// When the row of each record was created, in the same order (for the delivery latency).
    created: Vec<Option<f64>>,
    /// The shard of each record's row, in the same order (for exactly-once delivery).
    shards: Vec<i32>,
    /// The rows that failed before anything was sent.
    settlement: Settlement,
}

/// What a batch is produced with: the relay's producer and, with exactly-once delivery, the
/// shards' transactional producers, which then carry the records.
pub(super) struct Producing<'a> {
    pub(super) publisher: &'a Publisher,
    pub(super) transactions: Option<&'a mut Transactions>,
}

/// A record's row, as its outcome is written and counted.
struct SentRow {
    row: RowRef,
    key: Option<String>,
    topic: String,
    created_at: Option<f64>,
}

/// What the database did while the broker had the batch.
struct Overlap {
    /// The batch before, when its outcome could not be written.
    previous_unsettled: Option<(Settlement, OutboxError)>,
    /// The next batch, claimed meanwhile.
    ahead: Option<Ahead>,
}

/// The reports of a batch, sorted.
struct Sorted {
    settlement: Settlement,
    producer_unusable: bool,
    /// Records still in flight when the batch stopped waiting.
    set_aside: Vec<SetAside>,
}

impl Relay {
    /// Claims one batch (or takes the one claimed ahead in `pending`), publishes it, awaits
    /// every report and records the outcome. `pending` is what the batch before still owes:
    /// nothing, or its outcome to be marked with this batch (written before any claim when no
    /// batch was claimed ahead for the shards held now).
    pub(super) async fn relay_batch(
        &self,
        outbox: &Outbox,
        producing: Producing<'_>,
        pending: Pending,
        mut claiming: Claiming<'_>,
    ) -> Result<Turn, OutboxError> {
        let started = Instant::now();
        let (ahead, mut previous) = match pending {
            Pending::Nothing => (None, None),
            Pending::Claimed(ahead) => (Some(ahead.claimed).filter(|_| ahead.shards == claiming.shards), None),
            Pending::MarkWithNext { settlement, ahead } if ahead.shards == claiming.shards => {
                (Some(ahead.claimed), Some(settlement))
            }
            // Rows claimed ahead for shards this relay no longer holds belong to another relay.
            Pending::MarkWithNext { settlement, .. } | Pending::Unsettled(settlement) => (None, Some(settlement)),
        };
        let claimed = match ahead {
            Some(rows) => rows,
            None => {
                // A claim now would find the previous batch's rows still unpublished.
                if let Some(mut earlier) = previous.take()
                    && let Err(e) = self.settle(outbox, &mut earlier).await
                {
                    return Ok(Turn::Unsettled(earlier, e));
                }
                self.claim(outbox, &mut claiming, &[]).await?
            }
        };
        if claimed.rows.is_empty() {
            self.health.progress();
            return Ok(Turn::Idle);
        }
        // The ownership tests block the loop here, with a batch claimed and not yet produced,
        // until another relay has taken its shards over.
        fail::fail_point!("relay-before-produce");
        // A relay frozen since it claimed these rows (or since the previous batch, for rows
        // claimed ahead) may have lost its shards to another relay, which publishes the rows
        // itself: hand them to the producer only if the session holding the locks still exists.
        if let Err(e) = outbox.confirm_session(shards::FENCE).await {
            warn!(
                rows = claimed.rows.len(),
                error = %e,
                "the session holding this relay's shards did not answer: dropping the claimed batch unpublished, \
                 since another relay may own its shards now"
            );
            return match previous {
                Some(earlier) => Ok(Turn::Unsettled(earlier, e)),
                None => Err(e),
            };
        }
        let claimed_count = claimed.rows.len();
        self.health.work_claimed();
        self.metrics.batch_size.observe(claimed_count as f64);
        let span = info_span!(
            "batch",
            rows = claimed_count,
            acknowledged = Empty,
            failed = Empty,
            claim_ms = millis(started.elapsed()),
            deliver_ms = Empty,
            acks_ms = Empty,
            previous_mark_ms = Empty,
            claim_ahead_ms = Empty,
            mark_ms = Empty,
            duration_ms = Empty
        );
        let outcome = self
            .publish_and_settle(outbox, producing, claimed, previous, started, claiming)
            .instrument(span.clone())
            .await;
        if let Ok(Turn::Relayed { .. }) = &outcome {
            span.record("duration_ms", started.elapsed().as_millis() as u64);
        }
        outcome
    }

    /// Publishes claimed rows and awaits every report. Meanwhile the database writes the
    /// `previous` batch's outcome and then claims the next one. This batch's outcome is written
    /// now, or, when the next batch is claimed, handed back to be written while that one is
    /// produced: the database's work overlaps the broker's, and still no row is marked before
    /// its own report, nothing is claimed before the rows before it are marked, and the next
    /// batch goes out only after every row of this one was acknowledged.
    async fn publish_and_settle(
        &self,
        outbox: &Outbox,
        producing: Producing<'_>,
        claimed: Claimed,
        previous: Option<Settlement>,
        started: Instant,
        claiming: Claiming<'_>,
    ) -> Result<Turn, OutboxError> {
        let claimed_count = claimed.rows.len();
        debug!(rows = claimed_count, "claimed a batch");
        let in_flight = claimed.row_ids();
        let full = claimed.full;
        let prepared = self.prepare(outbox.layout(), claimed.rows);
        let records = prepared.records.len();

        let delivery_started = Instant::now();
        let sent_at = Instant::now();
        let Producing { publisher, transactions } = producing;
        let delivered = match transactions {
            Some(transactions) => {
                // Only a full batch (a backlog) claims the next one ahead. After a short one the
                // rows claimed ahead waited for the transaction in flight, and the next
                // transaction began the moment this one committed, while the coordinator still
                // wrote its markers (AddPartitionsToTxn then answers CONCURRENT_TRANSACTIONS,
                // which librdkafka retries 20 ms later). At 5k rows/s, in four alternating runs
                // of the benchmark's exactly_once section: p99 64-75 ms without, 88-127 ms with.
                let claiming = full.then_some(claiming);
                self.deliver_exactly_once(outbox, transactions, &prepared, previous, claiming, &in_flight).await
            }
            None => {
                self.deliver_overlapping(outbox, publisher, &prepared.records, previous, claiming, &in_flight).await
            }
        };
        let Some((published, overlap)) = delivered else {
            return Ok(Turn::Abandoned { rows: records });
        };

        // The crash tests stop the process here, after the broker acknowledged the batch and
        // before any row of it is marked: the window that makes delivery at-least-once.
        fail::fail_point!("relay-before-mark", |_| std::process::abort());

        let sorted = self.sort_reports(publisher, prepared, published, sent_at);
        let settlement = &sorted.settlement;
        if !settlement.acked.is_empty() {
            self.health.progress();
        }
        let span = tracing::Span::current();
        span.record("acknowledged", settlement.acked.len());
        span.record("failed", settlement.failed());
        span.record("deliver_ms", millis(delivery_started.elapsed()));
        // With the fields above: where the batch's time went (the benchmark's breakdown reads it).
        debug!("batch delivered");
        if !sorted.set_aside.is_empty() {
            warn!(
                records = sorted.set_aside.len(),
                acknowledged = settlement.acked.len(),
                "records of this batch still wait for the broker after relay.stalled_partition_after: set aside in flight, \
                 so that the rest goes on (their rows and the later rows of their keys wait)"
            );
        }
        // The batch claimed ahead assumed every row of this one would be published: a failed or
        // deferred row must be retried (or hold its key) before anything claimed after it.
        let all_acknowledged = settlement.acked.len() == claimed_count;
        let overlap = Overlap { ahead: overlap.ahead.filter(|_| all_acknowledged), ..overlap };
        Ok(self.finish_batch(outbox, sorted, overlap, full, started).await)
    }

    /// Turns claimed rows into records. A row that fails here holds back the later rows of its
    /// key in this batch, exactly as a failed row holds them back in later claims: they are not
    /// produced, and stay unpublished and untouched until the failed row is published or (with
    /// `skip`) given up.
    fn prepare(&self, layout: &Layout, claimed: Vec<Result<OutboxRow, UnreadableRow>>) -> Prepared {
        let mut prepared = Prepared {
            records: Vec::with_capacity(claimed.len()),
            rows: Vec::with_capacity(claimed.len()),
            created: Vec::with_capacity(claimed.len()),
            shards: Vec::with_capacity(claimed.len()),
            settlement: Settlement::default(),
        };
        let mut held = HeldKeys::default();
        let mut deferred = 0;
        for row in claimed {
            let built = match row {
                Ok(row) if held.holds(row.key.as_deref()) => {
                    deferred += 1;
                    continue;
                }
                Ok(row) => match Record::from_row(&row, layout) {
                    Ok(record) => Ok((row.row_ref(), row.created_at, row.shard, record)),
                    Err(problem) => Err(UnreadableRow {
                        id: row.id,
                        event_id: Some(row.event_id),
                        key: RowKey::Known(row.key),
                        problem,
                    }),
                },
                Err(unreadable) => Err(unreadable),
            };
            match built {
                Ok((id, created_at, shard, record)) => {
                    if self.config.log.payloads {
                        debug!(
                            row = %id,
                            topic = %record.topic,
                            key = ?record.key,
                            payload = %record.payload.as_deref().map(String::from_utf8_lossy).unwrap_or_default(),
                            "record"
                        );
                    }
                    prepared.rows.push(id);
                    prepared.created.push(created_at);
                    prepared.shards.push(shard);
                    prepared.records.push(record);
                }
                Err(UnreadableRow { id, event_id, key, problem }) => {
                    self.failure_reports.report(&id, "invalid_row", &problem);
                    self.metrics.publish_errors.with_label_values(&["invalid_row"]).inc();
                    let key_of_failure = match &key {
                        RowKey::Known(key) => key.clone(),
                        RowKey::Unreadable => None,
                    };
                    held.hold(key);
                    if !id.is_empty() {
                        let row = RowRef { id: RowId::from(id), event_id };
                        let failure = RowFailure { row, key: key_of_failure, error: problem };
                        prepared.settlement.row_failures.push(failure);
                    }
                }
            }
        }
        if deferred > 0 {
            debug!(rows = deferred, "rows wait behind an earlier row of their key that failed in this batch");
        }
        prepared
    }

    /// Produces `records` and awaits every report, while the database writes the `previous`
    /// batch's outcome and then claims the next batch but `in_flight`; `None` when shutdown's
    /// grace period ends first. Nothing is claimed ahead over rows that may still look
    /// unpublished: the claim waits for the previous mark, and is skipped if it failed.
    async fn deliver_overlapping(
        &self,
        outbox: &Outbox,
        publisher: &Publisher,
        records: &[Record],
        previous: Option<Settlement>,
        claiming: Claiming<'_>,
        in_flight: &[RowId],
    ) -> Option<(Published, Overlap)> {
        let mark_previous_and_claim_next =
            self.mark_previous_and_claim_next(outbox, previous, Some(claiming), in_flight);
        let stalled_after = self.config.relay.stalled_partition_after;
        let deliver = async {
            let acknowledged = self.awaiting_acknowledgements(publisher.publish(records, stalled_after), records.len());
            let sent = Instant::now();
            let published = acknowledged.await;
            tracing::Span::current().record("acks_ms", millis(sent.elapsed()));
            published
        };
        tokio::select! {
            both = async { tokio::join!(deliver, mark_previous_and_claim_next) } => Some(both),
            _ = self.shutdown.grace_expired(self.config.relay.shutdown_timeout) => None,
        }
    }

    /// Writes the `previous` batch's outcome, then, given `claiming`, claims the next batch but
    /// `in_flight`: the database's side of a batch, run while the broker has it. With
    /// at-least-once delivery the next batch is claimed even after a short one: under a steady
    /// stream rows commit while a batch is produced, and claiming them meanwhile lets this
    /// batch's mark overlap their publish (at 5k rows/s this halved the p99 latency). An idle
    /// table costs one empty claim per batch. Nothing is claimed over rows that may still look
    /// unpublished: the claim waits for the mark, and is skipped if it failed.
    async fn mark_previous_and_claim_next(
        &self,
        outbox: &Outbox,
        previous: Option<Settlement>,
        claiming: Option<Claiming<'_>>,
        in_flight: &[RowId],
    ) -> Overlap {
        let span = tracing::Span::current();
        if let Some(mut earlier) = previous {
            // The crash tests stop the process here after the given milliseconds, with the
            // previous batch unmarked while this one's transaction commits.
            if let Some(ms) = super::failpoints::millis("relay-before-previous-mark") {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                std::process::abort();
            }
            let mark_started = Instant::now();
            if let Err(e) = self.settle(outbox, &mut earlier).await {
                return Overlap { previous_unsettled: Some((earlier, e)), ahead: None };
            }
            span.record("previous_mark_ms", millis(mark_started.elapsed()));
        }
        let Some(mut claiming) = claiming else { return Overlap { previous_unsettled: None, ahead: None } };
        let claim_started = Instant::now();
        let ahead = self.claim_ahead(outbox, &mut claiming, in_flight).await;
        span.record("claim_ahead_ms", millis(claim_started.elapsed()));
        let ahead = ahead.map(|claimed| Ahead { shards: claiming.shards.to_vec(), claimed });
        Overlap { previous_unsettled: None, ahead }
    }

    /// Produces a batch in a transaction ([`crate::relay::exactly_once`]) and awaits its
    /// commit, while the database writes the `previous` batch's outcome and then, given
    /// `claiming`, claims the next batch but `in_flight`, as [`Relay::deliver_overlapping`]
    /// does: the transaction's progress records name the previous batch's rows too, since their
    /// mark may not be written yet. `None` when shutdown's grace period ends first (the transaction left open is aborted
    /// at stop).
    async fn deliver_exactly_once(
        &self,
        outbox: &Outbox,
        transactions: &mut Transactions,
        prepared: &Prepared,
        previous: Option<Settlement>,
        claiming: Option<Claiming<'_>>,
        in_flight: &[RowId],
    ) -> Option<(Published, Overlap)> {
        let sent = Instant::now();
        let delivery = async {
            let transaction = self.deliver_in_transaction(
                transactions,
                outbox.table_oid(),
                &prepared.records,
                &prepared.rows,
                &prepared.shards,
            );
            let published = self.awaiting_acknowledgements(transaction, prepared.records.len()).await;
            tracing::Span::current().record("acks_ms", millis(sent.elapsed()));
            published
        };
        let (published, overlap) = tokio::select! {
            both = async { tokio::join!(delivery, self.mark_previous_and_claim_next(outbox, previous, claiming, in_flight)) } => both,
            _ = self.shutdown.grace_expired(self.config.relay.shutdown_timeout) => return None,
        };
        if !published.outcomes.is_empty() && published.outcomes.iter().all(|o| matches!(o, Outcome::Deferred)) {
            // The transaction aborted and no row was to blame (a broker refusing a step, a
            // fenced producer): the batch goes out again after a pause, not at once.
            self.pause(self.config.relay.backoff_initial, None).await;
        }
        Some((published, overlap))
    }

    /// Sorts a batch's reports into acknowledged rows, failed rows and records still in flight:
    /// a row is among the acknowledged only on its own report.
    fn sort_reports(
        &self,
        publisher: &Publisher,
        prepared: Prepared,
        published: Published,
        sent_at: Instant,
    ) -> Sorted {
        let Prepared { records, rows, created, settlement, .. } = prepared;
        let mut sorted = Sorted { settlement, producer_unusable: false, set_aside: Vec::new() };
        let mut first_failure = None;
        // Keys of records the broker refused: a later record of such a key that it acknowledged
        // went out ahead of its predecessor. Only a rejection after sending can do that (failures
        // found before sending hold the key back); it is reported, since it cannot be undone.
        let mut refused_keys: HashSet<String> = HashSet::new();
        let mut pending: HashMap<usize, PendingReport> =
            published.unacknowledged.into_iter().map(|report| (report.index, report)).collect();
        let rows = rows.into_iter().zip(records).zip(published.outcomes).zip(created).enumerate();
        for (index, (((id, record), outcome), created_at)) in rows {
            if let (Outcome::Acked { .. }, Some(key)) = (&outcome, &record.key)
                && refused_keys.contains(key)
            {
                self.metrics.key_order_breaks.inc();
                error!(
                    row = %id,
                    key = %key,
                    "the broker acknowledged this record after refusing an earlier record of its key in the same batch: \
                     the key's order is broken on the topic (see outbox_relay_key_order_breaks_total in the README)"
                );
            }
            if let Outcome::Failed(failure) = &outcome {
                if let (false, Some(key)) = (failure.transient, &record.key) {
                    refused_keys.insert(key.clone());
                }
                sorted.producer_unusable |= failure.producer_unusable;
                first_failure.get_or_insert_with(|| format!("row {id}: {}", failure.message));
            }
            match outcome {
                Outcome::Deferred => {}
                Outcome::StillInFlight => {
                    if let Some(report) = pending.remove(&index) {
                        let partition = publisher.partition_of(&record);
                        let (key, topic) = (record.key, record.topic);
                        let set_aside = SetAside::new(id, key, topic, partition, created_at, sent_at, report);
                        sorted.set_aside.push(set_aside);
                    }
                }
                reported => {
                    let sent = SentRow { row: id, key: record.key, topic: record.topic, created_at };
                    self.count_report(&mut sorted.settlement, sent, reported);
                }
            }
        }
        if let Some(first) = first_failure {
            warn!(
                failed = sorted.settlement.failed(),
                acknowledged = sorted.settlement.acked.len(),
                first = %first,
                "some records of the batch were not delivered; their rows stay unpublished"
            );
        }
        sorted
    }

    /// Adds a record's report to `settlement`, counting it: an acknowledgement (and its
    /// delivery latency), or a failure of the row's own or of an outage.
    fn count_report(&self, settlement: &mut Settlement, sent: SentRow, outcome: Outcome) {
        match outcome {
            Outcome::Acked { at } => {
                if let (Some(created_at), Ok(acked_at)) = (sent.created_at, at.duration_since(UNIX_EPOCH)) {
                    // Clocks of the database and the relay host; a negative skew counts as 0.
                    self.metrics.delivery_latency.observe((acked_at.as_secs_f64() - created_at).max(0.0));
                }
                settlement.acked.push(AckedRow { row: sent.row, topic: sent.topic });
            }
            Outcome::Failed(failure) => {
                self.metrics.publish_errors.with_label_values(&[failure.reason]).inc();
                let failed = RowFailure { row: sent.row, key: sent.key, error: failure.message };
                if failure.transient {
                    settlement.outage_failures.push(failed);
                } else {
                    self.failure_reports.report(failed.row.id.as_str(), failure.reason, &failed.error);
                    settlement.row_failures.push(failed);
                }
            }
            // A report resolves to an acknowledgement or a failure only.
            Outcome::Deferred | Outcome::StillInFlight => {}
        }
    }

    /// Decides what the batch leaves owed: its outcome goes with the previous batch's when that
    /// could not be written; is handed on to be written while the batch claimed ahead is
    /// produced; or is written now. The records set aside are never dropped with their batch: a
    /// batch whose outcome could not be written goes back as one to write before the next
    /// claim, with them.
    async fn finish_batch(
        &self,
        outbox: &Outbox,
        sorted: Sorted,
        overlap: Overlap,
        full: bool,
        started: Instant,
    ) -> Turn {
        let Sorted { mut settlement, producer_unusable, set_aside } = sorted;
        let broker_unavailable = settlement.acked.is_empty() && !settlement.outage_failures.is_empty();
        let relayed =
            |pending, set_aside| Turn::Relayed { full, broker_unavailable, producer_unusable, pending, set_aside };
        if let Some((earlier, e)) = overlap.previous_unsettled {
            settlement.absorb(earlier);
            if set_aside.is_empty() {
                return Turn::Unsettled(settlement, e);
            }
            warn!(error = %e, "could not mark the previous batch; it is written again before the next claim");
            return relayed(Pending::Unsettled(settlement), set_aside);
        }
        if let Some(ahead) = overlap.ahead {
            self.metrics.batch_duration.observe(started.elapsed().as_secs_f64());
            return relayed(Pending::MarkWithNext { settlement, ahead }, set_aside);
        }
        let mark_started = Instant::now();
        if let Err(e) = self.settle(outbox, &mut settlement).await {
            if set_aside.is_empty() {
                return Turn::Unsettled(settlement, e);
            }
            warn!(error = %e, "could not mark the batch; it is written again before the next claim");
            return relayed(Pending::Unsettled(settlement), set_aside);
        }
        tracing::Span::current().record("mark_ms", millis(mark_started.elapsed()));
        self.metrics.batch_duration.observe(started.elapsed().as_secs_f64());
        relayed(Pending::Nothing, set_aside)
    }

    /// Awaits `delivery`, the reports of a batch of `records` records, for as long as it takes
    /// (librdkafka never abandons a record), saying every so often that the broker keeps the
    /// batch waiting. Meanwhile the wait does not count against liveness.
    async fn awaiting_acknowledgements<T>(&self, delivery: impl Future<Output = T>, records: usize) -> T {
        self.health.awaiting_broker(true);
        let started = Instant::now();
        tokio::pin!(delivery);
        let outcome = loop {
            tokio::select! {
                outcome = &mut delivery => break outcome,
                _ = tokio::time::sleep(ACKNOWLEDGEMENT_WAIT_WARNING) => warn!(
                    records,
                    waiting_s = started.elapsed().as_secs(),
                    brokers_up = self.metrics.kafka_brokers_up.get(),
                    "the broker has not acknowledged this batch yet; still waiting (records are never abandoned, since \
                     one the broker already wrote would be sent twice)"
                ),
            }
        };
        self.health.awaiting_broker(false);
        outcome
    }

    /// Claims the batch after `in_flight` while that one awaits its delivery reports, so that
    /// the database's work overlaps the broker's. The rows in flight are left out (they are not
    /// marked yet); everything else follows the claim's usual rules, as if they were published.
    async fn claim_ahead(&self, outbox: &Outbox, claiming: &mut Claiming<'_>, in_flight: &[RowId]) -> Option<Claimed> {
        match self.claim(outbox, claiming, in_flight).await {
            Ok(claimed) if !claimed.rows.is_empty() => Some(claimed),
            Ok(_) => None,
            Err(e) => {
                // The mark that follows meets the same problem and handles it.
                debug!(error = %e, "could not claim the next batch ahead");
                None
            }
        }
    }

    /// Claims the next batch of the shards held but `in_flight`, starting at the claim floor,
    /// and lets the floor learn from what the claim saw. Rows in flight, set aside or kept apart
    /// are left out, and so are the keys they hold: no row is sent twice, none overtakes another
    /// of its key.
    async fn claim(
        &self,
        outbox: &Outbox,
        claiming: &mut Claiming<'_>,
        in_flight: &[RowId],
    ) -> Result<Claimed, OutboxError> {
        let Claiming { shards, floor, set_aside, held_keys } = claiming;
        let mut left_out: Vec<String> = in_flight.iter().chain(set_aside.iter()).map(RowId::to_string).collect();
        // Read at each claim: the mark written just before it may have kept rows apart.
        let mut held: Vec<String> = held_keys.clone();
        if let Ok(quarantine) = self.quarantine.lock()
            && !quarantine.is_empty()
        {
            left_out.extend(quarantine.row_ids().map(RowId::to_string));
            held.extend(quarantine.held_keys());
        }
        let (in_flight, held_keys) = (left_out.as_slice(), held.as_slice());
        let start = floor.start(shards, Instant::now());
        let limit = self.claim_limit.load(Ordering::Relaxed);
        let batch_bytes = self.config.relay.batch_bytes;
        let mut claim = outbox.claim(limit, batch_bytes, shards, in_flight, start, held_keys).await?;
        if floor.observe(start, claim.view.as_ref(), Instant::now()) == Observation::IdsReused {
            self.metrics.table_changes.with_label_values(&["ids_reused"]).inc();
            // The floor is gone: claim again from the beginning, where the rows that took the
            // reused ids are.
            let start = floor.start(shards, Instant::now());
            claim = outbox.claim(limit, batch_bytes, shards, in_flight, start, held_keys).await?;
            floor.observe(start, claim.view.as_ref(), Instant::now());
        }
        // Rows too large for a whole window of them: ask for no more rows than fitted, so the
        // database does not read and send rows the relay would only read past; grow back as
        // the rows get smaller.
        let next = if claim.full && claim.rows.len() < limit {
            claim.rows.len().max(1)
        } else {
            limit.saturating_mul(2).min(self.config.relay.batch_size)
        };
        self.claim_limit.store(next, Ordering::Relaxed);
        Ok(Claimed { rows: claim.rows, full: claim.full })
    }

    /// The outcome of the records set aside whose reports have come, to be written as a
    /// batch's is; `None` when none has come.
    pub(super) fn take_reported(&self, stalled: &mut StalledRecords) -> Option<Settlement> {
        let reported = stalled.take_reported();
        if reported.is_empty() {
            return None;
        }
        let mut settlement = Settlement::default();
        for (record, outcome) in reported {
            let sent = SentRow { row: record.row, key: record.key, topic: record.topic, created_at: record.created_at };
            self.count_report(&mut settlement, sent, outcome);
        }
        if !settlement.acked.is_empty() {
            self.health.progress();
        }
        info!(
            acknowledged = settlement.acked.len(),
            failed = settlement.failed(),
            "reports came for records set aside while their partition stalled"
        );
        Some(settlement)
    }
}

/// A duration in milliseconds to a hundredth, for the batch span's fields (a float's full
/// digits, `0.7458290000000001`, only make the log harder to read).
fn millis(elapsed: Duration) -> f64 {
    (elapsed.as_secs_f64() * 100_000.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_timings_are_logged_to_a_hundredth_of_a_millisecond() {
        assert_eq!(millis(Duration::from_millis(12)), 12.0);
        assert_eq!(millis(Duration::from_nanos(745_829)), 0.75);
    }
}
