//! The PostgreSQL side: connecting (with TLS), the outbox table's layout and the statements run
//! against it, and the migrations that create it.
//!
//! Nothing here knows about Kafka: rows come out as [`record`](crate::kafka::record) values and
//! outcomes come back in as row references.

pub mod layout;
pub mod outbox;
pub mod schema;
pub mod tls;
