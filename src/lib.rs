//! outbox-relay: publishes the rows of a transactional outbox table to Kafka.
//!
//! Applications insert an event row into the outbox table in the same transaction as their
//! business change. The relay claims unpublished rows in order, produces them with an
//! idempotent producer, waits for every delivery report, and only then marks the acknowledged
//! rows published. Delivery is at-least-once: a crash between the broker's acknowledgement and
//! the mark publishes those rows again, and every record carries the row's stable `event_id`
//! header so consumers can drop the repeat.
//!
//! The modules follow the data flow, one folder per side:
//!
//! - [`config`]: the configuration surface: its types, defaults, loading, validation and
//!   redaction. It imports nothing else of the crate.
//! - [`postgres`]: the database side. [`postgres::tls`] connects, [`postgres::layout`] says
//!   which column plays which role and checks it against the catalog, [`postgres::outbox`] runs
//!   the statements (claim, mark, record failures, shard locks), and [`postgres::schema`] holds
//!   the migrations.
//! - [`kafka`]: the broker side. [`kafka::record`] is the record a row becomes,
//!   [`kafka::publisher`] sends records and classifies delivery reports, and
//!   [`kafka::topic_limits`] says what a topic's configuration lets the broker refuse.
//! - [`relay`]: the loop that joins them (claim, produce, await every report, mark), with its
//!   claim floor, shards, wakeup, backoff, and the rows it keeps apart (stalled partitions,
//!   quarantined rows).
//! - [`service`]: what runs around the loop: `/metrics`, `/healthz` and `/readyz`, the table's
//!   gauges, retention, telemetry, lock-wait reporting, and graceful shutdown.
//! - [`commands`]: the operator's commands (`run`, `migrate`, `audit`, `status`, `check`,
//!   `retry`, `config`), each returning a report that the binary prints.
//! - [`inbox`]: for consumers: apply each event once, by recording its `event_id` in the same
//!   transaction as the effect.

#![warn(missing_docs)]

pub mod commands;
pub mod config;
pub mod inbox;
pub mod kafka;
pub mod postgres;
pub mod relay;
pub mod service;

pub use config::Config;
pub use relay::Relay;
pub use service::shutdown::Shutdown;
