//! Retention: rows published longer ago than `retention.delete_published_after` are deleted,
//! so that a table marked in place does not grow without end.
//!
//! Deletes run in batches of `retention.batch_size` rows, each its own short statement that
//! skips rows other sessions hold, so no delete holds locks for long or waits on the relay's
//! marks. Only published rows are ever deleted; pending and failed rows stay whatever their age.
//! It runs on a connection of its own and never delays the relay loop.

use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::config::Config;
use crate::postgres::layout::Mapping;
use crate::postgres::outbox::Outbox;
use crate::service::metrics::Metrics;
use crate::service::reconnect::Reconnecting;
use crate::service::shutdown::Shutdown;

/// Deletes old published rows every `retention.interval` until shutdown.
pub async fn run(config: Config, mapping: Mapping, metrics: Arc<Metrics>, shutdown: Shutdown) {
    let Some(age) = config.retention.delete_published_after else { return };
    let batch = i64::from(config.retention.batch_size);
    let mut connection: Reconnecting<Outbox> = Reconnecting::new();
    loop {
        // A connection that cannot be opened is tried again at the next turn; a failed delete
        // keeps it, unless it has closed.
        if let Ok(outbox) = connection.get(|| Outbox::connect(&config, &mapping)).await {
            let mut deleted = 0;
            loop {
                if shutdown.is_requested() {
                    return;
                }
                match outbox.delete_published(age, batch).await {
                    Ok(n) => {
                        deleted += n;
                        metrics.retention_deleted.inc_by(n);
                        if n < batch as u64 {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "retention: deleting published rows failed; trying again later");
                        break;
                    }
                }
            }
            if deleted > 0 {
                info!(deleted, older_than = ?age, "retention: deleted published rows");
            } else {
                debug!("retention: nothing to delete");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.retention.interval) => {}
            _ = shutdown.requested() => return,
        }
    }
}
