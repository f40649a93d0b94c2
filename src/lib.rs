//! outbox-relay: publishes the rows of a transactional outbox table to Kafka.
//!
//! Applications insert an event row into the outbox table in the same transaction as their
//! business change. The relay claims unpublished rows in order, produces them with an
//! idempotent producer, waits for every delivery report, and only then marks the acknowledged
//! rows published. Delivery is at-least-once: a crash between the broker's acknowledgement and
//! the mark publishes those rows again, and every record carries the row's stable `event_id`
//! header so consumers can drop the repeat.
//!
//! The modules follow the data flow:
//!
//! - [`config`]: the configuration surface, its defaults, validation and redaction.
//! - [`schema`]: the outbox table's migrations, embedded from `sql/migrations/`.
//! - [`table`]: which column plays which role, checked against the catalog; all outbox SQL.
//! - [`outbox`]: the database side: claim, mark published, record failures, stats.
//! - [`record`]: what Kafka record a row becomes (key, value, headers, `event_id`).
//! - [`publisher`]: the Kafka side: producer settings, sending, delivery outcomes.
//! - [`topic_limits`]: what a topic's configuration lets the broker refuse for a whole batch,
//!   checked before sending.
//! - [`relay`]: the loop that joins them, with backoff and graceful shutdown.
//! - [`claim_floor`]: where each claim starts, so it skips the rows already published.
//! - [`stalled`]: records set aside while their partition stalls, so that it holds back only
//!   the rows routed to it.
//! - [`shards`]: which shards of the table this relay publishes, when several relays run; the
//!   heartbeat that shows it alive, and the takeover of relays that look frozen.
//! - [`wakeup`]: LISTEN for the outbox trigger's NOTIFY, so idle relays react at commit.
//! - [`health`]: what `/healthz` and `/readyz` answer; [`lock_watch`] tells it when a statement
//!   of the loop waits on a lock another session holds (reported, not taken for a stuck loop).
//! - [`quarantine`]: rows whose outcome the database refuses to record, kept apart so that the
//!   rest flows.
//! - [`row_failures`]: says once per row and failure, not per attempt, that a row failed.
//! - [`retention`]: deletes published rows after a configured age, in small batches.
//! - [`metrics`]: Prometheus metrics and their HTTP endpoint; [`stats`] refreshes the table's
//!   gauges and warns about transactions that hold rows back.
//! - [`status`]: what a running relay is doing: pending, failed, parked and held-back rows,
//!   and which relay holds which shard.
//! - [`check`]: what a table lacks for each guarantee, and the SQL that adds it.
//! - [`audit`]: reconciles the table with a topic (lost, expired, duplicated, pending, failed rows).
//! - [`inbox`]: for consumers: apply each event once, by recording its `event_id` in the same
//!   transaction as the effect.
//! - [`telemetry`]: logs (text or JSON) and optional OTLP export of the relay's spans.
//! - [`shutdown`], [`backoff`]: the small pieces the loop is built from.

#![warn(missing_docs)]

pub mod audit;
pub mod backoff;
pub mod check;
pub mod claim_floor;
pub mod config;
pub mod health;
pub mod inbox;
pub mod lock_watch;
pub mod metrics;
pub mod outbox;
pub mod pg_tls;
pub mod publisher;
pub mod quarantine;
pub mod record;
pub mod relay;
pub mod retention;
pub mod row_failures;
pub mod schema;
pub mod shards;
pub mod shutdown;
pub mod stalled;
pub mod stats;
pub mod status;
pub mod table;
pub mod telemetry;
pub mod topic_limits;
pub mod wakeup;

pub use config::Config;
pub use relay::Relay;
pub use shutdown::Shutdown;
