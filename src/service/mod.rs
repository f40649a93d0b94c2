//! The service around the loop: health and metrics endpoints, the table's gauges, retention,
//! telemetry, lock-wait reporting, and graceful shutdown.

pub mod health;
pub mod lock_watch;
pub mod metrics;
pub mod retention;
pub mod shutdown;
pub mod stats;
pub mod telemetry;
