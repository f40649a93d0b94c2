//! The Kafka side: the record a row becomes, the producer that sends it, what a topic's
//! configuration lets the broker refuse, and the transactions and progress records of
//! exactly-once delivery.

pub(crate) mod client_context;
pub mod connect_json;
pub mod delivery;
pub(crate) mod partitioner;
pub mod progress;
pub mod publisher;
pub mod record;
pub mod settings;
pub(crate) mod topic_limits;
pub(crate) mod trace_context;
pub mod transactions;
