//! The table's gauges, refreshed on a connection of their own: pending, failing, failed and
//! held-back rows (failing and failed ones also feed readiness), the oldest pending age, and how long an open transaction has held the commit horizon
//! back (with a warning naming the backend past `relay.holdback_warning`).
//!
//! A slow count over a large backlog must never delay the relay loop, so this runs apart from
//! it; a failure here only leaves the gauges stale.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::config::Config;
use crate::postgres::error::OutboxError;
use crate::postgres::layout::Mapping;
use crate::postgres::outbox::Outbox;
use crate::service::health::Health;
use crate::service::metrics::Metrics;
use crate::service::reconnect::Reconnecting;
use crate::service::shutdown::Shutdown;

/// A hold-back warning is repeated at most this often while it lasts.
const HOLDBACK_WARNING_REPEAT: Duration = Duration::from_secs(60);

/// Refreshes the gauges every `relay.stats_interval` until shutdown.
pub async fn report(config: Config, mapping: Mapping, metrics: Arc<Metrics>, health: Arc<Health>, shutdown: Shutdown) {
    let mut connection: Reconnecting<Outbox> = Reconnecting::new();
    let mut last_warning: Option<Instant> = None;
    let mut summary = Summary { at: Instant::now(), published: metrics.published_total() };
    loop {
        // A connection that cannot be opened leaves the gauges as they were until the next turn.
        let failed = match connection.get(|| Outbox::connect(&config, &mapping)).await {
            Ok(outbox) => refresh(outbox, &config, &metrics, &health, &mut last_warning).await.err(),
            Err(_) => None,
        };
        if let Some(e) = failed {
            debug!(error = %e, "table stats unavailable");
            connection.give_up();
        }
        summary.log_if_due(config.log.summary_interval, &metrics);
        tokio::select! {
            _ = tokio::time::sleep(config.relay.stats_interval) => {}
            _ = shutdown.requested() => return,
        }
    }
}

/// The periodic summary line: at info level a busy relay would otherwise say nothing after
/// its start, and an operator tailing the log could not tell a drain from a stall.
struct Summary {
    /// When the last summary was logged (or the relay started).
    at: Instant,
    /// Records published by then.
    published: u64,
}

impl Summary {
    /// Logs what happened since the last summary, if `interval` has passed and there is
    /// anything to say (rows published, pending or failed).
    fn log_if_due(&mut self, interval: Duration, metrics: &Metrics) {
        if interval.is_zero() || self.at.elapsed() < interval {
            return;
        }
        let published = metrics.published_total();
        let (pending, failed) = (metrics.pending_rows.get(), metrics.failed_rows.get());
        let since = published.saturating_sub(self.published);
        if since > 0 || pending > 0 || failed > 0 {
            info!(
                published = since,
                seconds = self.at.elapsed().as_secs(),
                pending,
                oldest_pending_s = metrics.oldest_pending_age.get().round(),
                failing = metrics.failing_rows.get(),
                failed,
                held = metrics.held_rows.get(),
                shards = metrics.shards_owned.get(),
                "summary"
            );
        }
        *self = Summary { at: Instant::now(), published };
    }
}

async fn refresh(
    outbox: &Outbox,
    config: &Config,
    metrics: &Metrics,
    health: &Health,
    last_warning: &mut Option<Instant>,
) -> Result<(), OutboxError> {
    let stats = outbox.pending_stats().await?;
    metrics.failing_rows.set(stats.failing_rows);
    health.set_stuck_rows(stats.failing_rows, stats.failed_rows);
    metrics.pending_rows.set(stats.rows);
    metrics.oldest_pending_age.set(stats.oldest_age_seconds.unwrap_or(0.0));
    metrics.failed_rows.set(stats.failed_rows);
    metrics.held_rows.set(stats.held_rows);

    let holdback = if stats.held_rows > 0 { outbox.oldest_transaction(&stats).await? } else { None };
    let seconds = holdback.as_ref().map(|t| t.seconds).unwrap_or(0.0);
    metrics.watermark_holdback.set(seconds);
    if let Some(blocking) = holdback
        && seconds >= config.relay.holdback_warning.as_secs_f64()
        && last_warning.is_none_or(|at| at.elapsed() >= HOLDBACK_WARNING_REPEAT)
    {
        *last_warning = Some(Instant::now());
        match (&blocking.prepared, blocking.pid) {
            (Some(gid), _) => warn!(
                prepared_transaction = %gid,
                prepared_for_seconds = blocking.seconds.round(),
                held_rows = stats.held_rows,
                "a prepared transaction (two-phase commit) is holding rows back: they wait until its transaction \
                 manager commits or rolls it back (COMMIT PREPARED / ROLLBACK PREPARED with its gid if it is stuck)"
            ),
            (None, pid) => warn!(
                blocking_pid = pid.unwrap_or_default(),
                open_for_seconds = blocking.seconds.round(),
                state = %blocking.state,
                query = %blocking.query,
                held_rows = stats.held_rows,
                "an open transaction is holding rows back: they wait until it ends \
                 (commit or roll it back; pg_terminate_backend(pid) if it is stuck)"
            ),
        }
    }
    Ok(())
}
