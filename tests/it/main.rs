//! The integration tests, one binary with a module per behaviour family, all against a real
//! PostgreSQL and Apache Kafka ([`support`] starts them). One binary links the crate and its
//! dependencies once instead of once per file; nextest still runs each test in its own process.

mod support;

mod architecture;
mod audit;
mod batch_rejections;
mod claim_cost;
mod claim_floor;
mod cluster;
mod config;
mod crash;
mod debezium_compare;
mod debezium_examples;
mod debezium_migration;
mod delivery;
mod exactly_once;
mod failures;
mod hostile_input;
mod inbox;
mod java_consumer;
mod kafka_security;
mod layout;
mod lifecycle;
mod memory;
mod metrics;
mod migrate;
mod operations;
mod order;
mod outage;
mod ownership;
mod poison;
mod postgres_tls;
mod privileges;
mod scale_out;
mod secrets;
mod stalled_partition;
mod table_changes;
mod two_phase;
mod wakeup;
