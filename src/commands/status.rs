//! `outbox-relay status`: what an operator asks of a running relay. Is it keeping up (pending
//! rows, oldest pending age)? What is stuck (failed rows by error, keys parked behind them,
//! rows held back by an open transaction, and which one)? Who publishes what (the relays of
//! the table and the shards each holds)? It only reads.

use std::collections::BTreeSet;

use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::commands::Report;
use crate::config::Config;
use crate::postgres::error::OutboxError;
use crate::postgres::failed_rows::Stuck;
use crate::postgres::failed_rows::{FailedGroup, ParkedKey};
use crate::postgres::outbox::Outbox;
use crate::postgres::shard_locks::{Ownership, RelaySession};
use crate::postgres::table_stats::OldestTransaction;
use crate::service::health::Verdict;

/// A snapshot of the table and its relays.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusReport {
    /// The table.
    pub table: String,
    /// Unpublished rows, failed ones excepted.
    pub pending_rows: i64,
    /// Age of the oldest of them, in seconds.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Pending rows failing with errors of their own (retried after a backoff): a missing
    /// topic, a record too large, a row that cannot become a record.
    pub failing_rows: i64,
    /// Failing rows grouped by their last error.
    pub failing_by_error: Vec<FailedGroup>,
    /// Rows given up on.
    pub failed_rows: i64,
    /// Failed rows grouped by their last error.
    pub failed_by_error: Vec<FailedGroup>,
    /// Keys held back behind a failed row.
    pub parked_keys: Vec<ParkedKey>,
    /// Pending rows waiting for an open transaction.
    pub held_rows: i64,
    /// The open transaction holding them, if any.
    pub holding_transaction: Option<OldestTransaction>,
    /// Shards in all: the `relay.shards` the running relays use (this configuration's when
    /// none runs, or when they disagree).
    pub shards: u32,
    /// The `relay.takeover_after` by which a relay looks frozen.
    pub takeover_after_seconds: f64,
    /// The running relays (with their shards) and each held shard's owner.
    pub ownership: Ownership,
    /// Shards no relay holds: their rows wait until a relay takes them.
    pub unheld_shards: Vec<i32>,
    /// What the relay at this configuration's `metrics.listen` says it waits on, when one
    /// answers there: what the table cannot show (partitions whose records wait for the broker,
    /// a lock another session holds).
    pub local_relay: Option<LocalRelay>,
}

/// A relay's own account of itself, from its `/readyz`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalRelay {
    /// Where it was asked (`metrics.listen`).
    pub address: String,
    /// Whether it is ready.
    pub ready: bool,
    /// Why not: which partitions keep records waiting and since when, a lock it waits on, an
    /// outage.
    pub reasons: Vec<String>,
}

/// How long `status` waits for the local relay's answer.
const LOCAL_RELAY_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the relay serving `config`'s `metrics.listen` for its readiness and reasons; `None`
/// when nothing answers there (no relay on this host, or metrics off).
async fn ask_local_relay(config: &Config) -> Option<LocalRelay> {
    let addr = config.metrics.address().ok()??;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(b"GET /readyz HTTP/1.0\r\nHost: outbox-relay\r\n\r\n").await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let body = response.windows(4).position(|w| w == b"\r\n\r\n").map(|at| &response[at + 4..])?;
        serde_json::from_slice::<Verdict>(body).ok()
    };
    let verdict = tokio::time::timeout(LOCAL_RELAY_TIMEOUT, exchange).await.ok()??;
    Some(LocalRelay { address: addr.to_string(), ready: verdict.ok, reasons: verdict.reasons })
}

/// Reads the status of the configured table.
pub async fn status(config: &Config) -> Result<StatusReport, OutboxError> {
    let mapping = crate::postgres::outbox::mapping_of(config)?;
    let outbox = Outbox::connect(config, &mapping).await?;
    let stats = outbox.pending_stats().await?;
    let holding_transaction = if stats.held_rows > 0 { outbox.oldest_transaction(&stats).await? } else { None };
    let ownership = outbox.ownership(config.relay.takeover_after).await?;
    let shards = agreed_shard_count(&ownership).unwrap_or(config.relay.shards);
    let held: BTreeSet<i32> = ownership.shards.iter().map(|owner| owner.shard).collect();
    Ok(StatusReport {
        table: mapping.table_name(),
        pending_rows: stats.rows,
        oldest_pending_age_seconds: stats.oldest_age_seconds,
        failing_rows: stats.failing_rows,
        failing_by_error: outbox.rows_by_error(Stuck::Failing).await?,
        failed_rows: stats.failed_rows,
        failed_by_error: outbox.rows_by_error(Stuck::Failed).await?,
        parked_keys: outbox.parked_keys().await?,
        held_rows: stats.held_rows,
        holding_transaction,
        shards,
        takeover_after_seconds: config.relay.takeover_after.as_secs_f64(),
        unheld_shards: (0..shards as i32).filter(|s| !held.contains(s)).collect(),
        ownership,
        local_relay: ask_local_relay(config).await,
    })
}

/// The shard count every running relay declares, if they declare one and agree.
fn agreed_shard_count(ownership: &Ownership) -> Option<u32> {
    let counts: BTreeSet<i64> = ownership.relays.iter().filter_map(|r| r.shard_count).collect();
    match counts.into_iter().collect::<Vec<_>>()[..] {
        [count] => u32::try_from(count).ok(),
        _ => None,
    }
}

impl StatusReport {
    /// One relay's line: who it is, what it runs with, when it was last active, its shards.
    fn describe_relay(&self, relay: &RelaySession) -> String {
        let shards: Vec<String> = relay.shards.iter().map(|s| s.to_string()).collect();
        let count = relay.shard_count.map(|c| format!(", relay.shards = {c}")).unwrap_or_default();
        let activity = match (relay.state.as_deref(), relay.idle_seconds) {
            (Some("active"), _) => "active now".to_owned(),
            (Some(_), Some(seconds)) => format!("last active {seconds:.1}s ago"),
            _ => "activity hidden from this role (pg_read_all_stats shows it)".to_owned(),
        };
        let mut line = format!(
            "backend pid {} from {} ({}{count}), {activity}: {} shards [{}]",
            relay.pid,
            relay.client,
            relay.application_name,
            shards.len(),
            shards.join(" ")
        );
        if relay.looks_frozen {
            line.push_str(&format!(
                "; LOOKS FROZEN: idle longer than relay.takeover_after ({}s), another relay takes its shards over at its next rebalance",
                self.takeover_after_seconds
            ));
        }
        line
    }
}

impl Report for StatusReport {
    fn render_text(&self) -> String {
        let mut out = format!("outbox {}\n", self.table);
        let age = self.oldest_pending_age_seconds.map(|s| format!(", oldest {s:.1}s old")).unwrap_or_default();
        out.push_str(&format!("  pending    {} rows{age}\n", self.pending_rows));
        out.push_str(&format!(
            "  failing    {} of them, with errors of their own (retried after a backoff; \
             `outbox-relay retry` tries them at once)\n",
            self.failing_rows
        ));
        for group in &self.failing_by_error {
            out.push_str(&format!("    {:>6} x {} (ids {})\n", group.count, group.error, group.first_ids.join(", ")));
        }
        out.push_str(&format!(
            "  failed     {} rows, given up on (fix the cause, then `outbox-relay retry`)\n",
            self.failed_rows
        ));
        for group in &self.failed_by_error {
            out.push_str(&format!("    {:>6} x {} (ids {})\n", group.count, group.error, group.first_ids.join(", ")));
        }
        out.push_str(&format!("  parked     {} keys\n", self.parked_keys.len()));
        for parked in &self.parked_keys {
            out.push_str(&format!(
                "    key {} behind failed row {}: {} rows waiting\n",
                parked.key, parked.failed_id, parked.waiting
            ));
        }
        match &self.holding_transaction {
            Some(OldestTransaction { prepared: Some(gid), seconds, .. }) => out.push_str(&format!(
                "  held back  {} rows, by prepared transaction '{gid}' (prepared {seconds:.0}s ago; \
                 COMMIT PREPARED or ROLLBACK PREPARED ends it)\n",
                self.held_rows
            )),
            Some(t) => out.push_str(&format!(
                "  held back  {} rows, by backend pid {} ({}, open {:.0}s): {}\n",
                self.held_rows,
                t.pid.unwrap_or_default(),
                t.state,
                t.seconds,
                t.query
            )),
            None => out.push_str(&format!("  held back  {} rows\n", self.held_rows)),
        }
        let relays = &self.ownership.relays;
        out.push_str(&format!("  relays     {} running, {} shards\n", relays.len(), self.shards));
        for relay in relays {
            out.push_str(&format!("    {}\n", self.describe_relay(relay)));
        }
        let counts: BTreeSet<i64> = relays.iter().filter_map(|r| r.shard_count).collect();
        if counts.len() > 1 {
            let counts: Vec<String> = counts.iter().map(|c| c.to_string()).collect();
            out.push_str(&format!(
                "    RELAYS DISAGREE on relay.shards ({}): stop every relay of the table, then start them with one value\n",
                counts.join(", ")
            ));
        }
        if let Some(local) = &self.local_relay {
            let verdict = if local.ready { "ready" } else { "NOT READY" };
            out.push_str(&format!("  this host  the relay at {} (metrics.listen) is {verdict}\n", local.address));
            for reason in &local.reasons {
                out.push_str(&format!("    {reason}\n"));
            }
        }
        if !self.unheld_shards.is_empty() {
            let unheld: Vec<String> = self.unheld_shards.iter().map(|s| s.to_string()).collect();
            out.push_str(&format!(
                "    {} SHARDS NOT HELD by any relay [{}]: their rows wait until a relay takes them\n",
                unheld.len(),
                unheld.join(" ")
            ));
        }
        out
    }
}
