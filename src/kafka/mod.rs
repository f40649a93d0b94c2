//! The Kafka side: the record a row becomes, the producer that sends it, and what a topic's
//! configuration lets the broker refuse.

pub mod publisher;
pub mod record;
pub(crate) mod topic_limits;
