//! The relay run as a task of the test process ([`RunningRelay`]), for tests that need its
//! metrics object or a shutdown they request themselves, without a process boundary.

use std::sync::Arc;

use outbox_relay::config::Config;
use outbox_relay::relay::RelayError;
use outbox_relay::service::metrics::Metrics;
use outbox_relay::{Relay, Shutdown};
use tokio::task::JoinHandle;

use super::environment::PATIENCE;
use super::test_env::TestEnv;

// Beside the relay it starts rather than in `test_env`, so that the benchmark, which runs the relay
// only as a process, includes `test_env` without this file.
impl TestEnv {
    /// Starts a relay in this process.
    pub fn spawn_relay(&self, config: Config) -> RunningRelay {
        RunningRelay::spawn(config)
    }
}

/// A relay running as a task of this test.
pub struct RunningRelay {
    /// Requests its shutdown.
    pub shutdown: Shutdown,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    handle: JoinHandle<Result<(), RelayError>>,
}

impl RunningRelay {
    /// Starts a relay task.
    pub fn spawn(config: Config) -> RunningRelay {
        let shutdown = Shutdown::new();
        let relay = Relay::new(config, shutdown.clone()).expect("relay");
        let metrics = relay.metrics();
        let handle = tokio::spawn(relay.run());
        RunningRelay { shutdown, metrics, handle }
    }

    /// Requests shutdown and waits for the relay to finish.
    pub async fn stop(self) -> Result<(), RelayError> {
        self.shutdown.request();
        tokio::time::timeout(PATIENCE, self.handle).await.expect("relay stops").expect("relay task")
    }

    /// Whether the task has ended (it should not, short of shutdown or a config problem).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Records the in-process relay has set aside because their partition stalled, over every
/// topic and partition (`outbox_relay_stalled_records`).
pub fn set_aside_records(metrics: &Metrics) -> i64 {
    metrics
        .render()
        .lines()
        .filter(|line| line.starts_with("outbox_relay_stalled_records{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<i64>().ok())
        .sum()
}
