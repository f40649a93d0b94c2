//! `outbox-relay status`: what an operator asks of a running relay. Is it keeping up (pending
//! rows, oldest pending age)? What is stuck (failed rows by error, keys parked behind them,
//! rows held back by an open transaction, and which one)? Who publishes what (the relays of
//! the table and the shards each holds)? It only reads.

use serde::Serialize;

use crate::config::Config;
use crate::outbox::{FailedGroup, OldestTransaction, Outbox, OutboxError, Ownership, ParkedKey};
use crate::table::Mapping;

/// A snapshot of the table and its relays.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusReport {
    /// The table.
    pub table: String,
    /// Unpublished rows, failed ones excepted.
    pub pending_rows: i64,
    /// Age of the oldest of them, in seconds.
    pub oldest_pending_age_seconds: Option<f64>,
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
    /// Shards in all (`relay.shards`).
    pub shards: u32,
    /// The running relays and their shards.
    pub ownership: Ownership,
}

/// Reads the status of the configured table.
pub async fn status(config: &Config) -> Result<StatusReport, OutboxError> {
    let mapping = Mapping::from_config(config)
        .map_err(|problem| OutboxError::Layout(crate::table::LayoutError { key: "outbox".into(), problem }))?;
    let outbox = Outbox::connect(config, &mapping).await?;
    let stats = outbox.pending_stats().await?;
    let holding_transaction = if stats.held_rows > 0 { outbox.oldest_transaction(&stats).await? } else { None };
    Ok(StatusReport {
        table: mapping.table_name(),
        pending_rows: stats.rows,
        oldest_pending_age_seconds: stats.oldest_age_seconds,
        failed_rows: stats.failed_rows,
        failed_by_error: outbox.failed_by_error().await?,
        parked_keys: outbox.parked_keys().await?,
        held_rows: stats.held_rows,
        holding_transaction,
        shards: config.relay.shards,
        ownership: outbox.ownership().await?,
    })
}

impl StatusReport {
    /// The report for a person.
    pub fn render_text(&self) -> String {
        let mut out = format!("outbox {}\n", self.table);
        let age = self.oldest_pending_age_seconds.map(|s| format!(", oldest {s:.1}s old")).unwrap_or_default();
        out.push_str(&format!("  pending    {} rows{age}\n", self.pending_rows));
        out.push_str(&format!("  failed     {} rows\n", self.failed_rows));
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
        out.push_str(&format!("  relays     {} running, {} shards\n", self.ownership.members.len(), self.shards));
        for member in &self.ownership.members {
            let shards: Vec<String> = self
                .ownership
                .shards
                .iter()
                .filter(|(_, holder)| holder.pid == member.pid)
                .map(|(shard, _)| shard.to_string())
                .collect();
            out.push_str(&format!(
                "    backend pid {} from {}: {} shards [{}]\n",
                member.pid,
                member.client,
                shards.len(),
                shards.join(" ")
            ));
        }
        let held: std::collections::HashSet<i32> = self.ownership.shards.iter().map(|(s, _)| *s).collect();
        let free = (0..self.shards as i32).filter(|s| !held.contains(s)).count();
        if free > 0 {
            out.push_str(&format!("    {free} shards not held by any relay\n"));
        }
        out
    }
}
