//! The Kafka side: the record a row becomes, the producer that sends it, and what a topic's
//! configuration lets the broker refuse.

pub(crate) mod client_context;
pub mod delivery;
pub(crate) mod partitioner;
pub mod publisher;
pub mod record;
pub mod settings;
pub(crate) mod topic_limits;
