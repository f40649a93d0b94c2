//! The service around the loop: health and metrics endpoints, the table's gauges, retention,
//! telemetry, lock-wait reporting, graceful shutdown, and how the background tasks keep their
//! own database connections ([`reconnect`], with [`backoff`]).

pub mod backoff;
pub mod health;
pub mod lock_watch;
pub mod metrics;
pub mod reconnect;
pub mod retention;
pub mod shutdown;
pub mod stats;
pub mod telemetry;
