//! The service around the loop: health and metrics endpoints, the table's gauges, retention,
//! telemetry, lock-wait reporting, graceful shutdown, and how the background tasks keep their
//! own database connections (`reconnect`, with `backoff`).

pub(crate) mod backoff;
pub mod health;
pub(crate) mod lock_watch;
pub mod metrics;
pub(crate) mod reconnect;
pub(crate) mod retention;
pub mod shutdown;
pub(crate) mod stats;
pub mod telemetry;
