//! The harness the integration tests stand on: a real PostgreSQL and Apache Kafka started on
//! free loopback ports, a fresh database per test, a real consumer to read topics back, and the
//! relay run either in-process or as the built binary.
//!
//! `OUTBOX_TEST_DATABASE_URL` (a superuser URL) and `OUTBOX_TEST_KAFKA_BROKERS` point the tests
//! at servers that are already running instead; every test still gets its own database and
//! its own topics, so tests never see each other's rows or records. `scripts/test.sh` starts
//! one Kafka node for the whole run and sets `OUTBOX_TEST_KAFKA_BROKERS`, since a JVM takes
//! seconds to start; a test that stops, kills or freezes a broker starts its own.
//!
//! The parts, from the machine up:
//!
//! - [`environment`]: free ports, unique names, how long to wait; [`processes`]: the child
//!   processes the harness starts, which die with the test.
//! - The servers: [`postgres`], [`kafka`], and for the security tests [`tls`] (a test CA),
//!   [`secured_kafka`] (a node with TLS and SASL listeners, enforcing ACLs if asked) and
//!   [`kafka_acls`] (what a test grants a user there).
//! - [`test_env`]: [`TestEnv`], one test's database, broker, scratch directory and relay
//!   configuration.
//! - The PostgreSQL side: [`database`] (connections, the relay's role) and [`outbox_rows`]
//!   (inserting events, reading back what the relay marked).
//! - The Kafka side: [`topics`] (creating them), [`records`] (reading them back) and
//!   [`record_checks`] (order, duplicates, partitioning).
//! - The relay: [`in_process_relay`], [`relay_process`] (the binary), [`crashes`] (killing it
//!   at random moments), and [`http`] (its metrics and health endpoints).
//! - The relay ours is compared with: [`debezium`] (Debezium's outbox EventRouter on Kafka
//!   Connect).
//!
//! What the tests call is re-exported here, so a test module needs one `use crate::support::*`;
//! the security tests import [`tls`], [`secured_kafka`] and [`kafka_acls`] by path.

pub mod crashes;
pub mod database;
pub mod debezium;
pub mod environment;
pub mod http;
pub mod in_process_relay;
pub mod kafka;
pub mod kafka_acls;
pub mod outbox_rows;
pub mod postgres;
pub mod processes;
pub mod record_checks;
pub mod records;
pub mod relay_process;
pub mod secured_kafka;
pub mod test_env;
pub mod tls;
pub mod topics;

pub use crashes::*;
pub use database::*;
pub use debezium::Debezium;
pub use environment::*;
pub use http::*;
pub use in_process_relay::*;
pub use kafka::Kafka;
pub use outbox_rows::*;
pub use postgres::Postgres;
pub use record_checks::*;
pub use records::*;
pub use relay_process::*;
pub use test_env::*;
pub use topics::*;
