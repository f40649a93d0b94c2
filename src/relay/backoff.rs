//! The backoff moved to `crate::service::backoff`, where the background tasks' reconnecting
//! helper uses it without the service importing the relay; re-exported here for the loop.

pub use crate::service::backoff::Backoff;
