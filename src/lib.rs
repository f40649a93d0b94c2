//! outbox-relay: publishes the rows of a transactional outbox table to Kafka.
//!
//! Applications insert an event row into the outbox table in the same transaction as their
//! business change. The relay claims unpublished rows in order, produces them with an
//! idempotent producer, waits for every delivery report, and only then marks the acknowledged
//! rows published. Delivery is at-least-once: a crash between the broker's acknowledgement and
//! the mark publishes those rows again, and every record carries the row's stable `event_id`
//! header so consumers can drop the repeat.
//!
//! The modules follow the data flow, one folder per side; where to look first:
//!
//! | what | where |
//! |---|---|
//! | which rows are claimed, and how | `src/postgres/claim.rs` |
//! | the record a row becomes (key, value, headers, `event_id`) | `src/kafka/record.rs` |
//! | sending records and collecting their delivery reports | `src/kafka/publisher.rs` |
//! | how a broker error is classified (the row's fault, an outage, a fenced producer) | `src/kafka/delivery.rs` |
//! | marking a row published, recording a failure | `src/postgres/mark.rs` |
//! | the loop that joins them | `src/relay/mod.rs` |
//!
//! - [`config`]: the configuration surface: its types, defaults, loading, validation and
//!   redaction, and the one declaration of the outbox's column roles. It imports nothing else
//!   of the crate; every other part reads a [`Config`] that passed validation.
//! - [`postgres`]: the database side: connecting (with TLS), the table's layout
//!   ([`postgres::layout`]), each statement beside the code that runs it and decodes its rows,
//!   the relay's session ([`postgres::outbox`]) and the migrations ([`postgres::schema`]).
//! - [`kafka`]: the broker side: the record a row becomes ([`kafka::record`]), the producer that
//!   sends it ([`kafka::publisher`]), how a delivery report is classified ([`kafka::delivery`]),
//!   its settings ([`kafka::settings`]), and what a topic's configuration lets the broker refuse
//!   for a whole batch.
//! - [`relay`]: the loop (claim, produce, await every report, mark), with its claim floor,
//!   shards, wakeup, and the rows it keeps apart (stalled partitions, quarantined rows).
//! - [`service`]: what runs around the loop: `/metrics`, `/healthz` and `/readyz`, the table's
//!   gauges, retention, telemetry, lock-wait reporting, graceful shutdown, and how background
//!   tasks keep their own connections.
//! - [`commands`]: the operator's commands (`run`, `migrate`, `audit`, `status`, `check`,
//!   `retry`, `config`), each returning a report that the binary prints.
//! - [`inbox`]: for consumers: apply each event once, by recording its `event_id` in the same
//!   transaction as the effect.
//!
//! Dependencies point one way: `config` imports nothing; `postgres` imports only `config`;
//! `kafka` and `service` build on those; `relay` and `commands` on everything below them
//! (`tests/it/architecture.rs` fails on any import cycle).

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
