//! The PostgreSQL side: connecting (with TLS), the outbox table's layout, and each statement
//! run against it beside the code that runs it and decodes its rows; and the migrations that
//! create the table.
//!
//! - `connect` opens connections (`tls` for the transport); [`error`] says what went wrong,
//!   once for every statement.
//! - [`layout`] says which column plays which role; `catalog` reads what the catalog says of
//!   the table, and `index_predicate` which rows a partial index holds.
//! - [`outbox`] is the relay's session; its statements, by what they do: `claim`, `mark`,
//!   `shard_locks`, `table_stats`, `retention`, and for the operator's commands
//!   `failed_rows` and `audit_rows`.
//! - [`schema`] holds the migrations; `notify` the channel relays are woken on.
//!
//! Nothing here knows about Kafka or the relay loop: rows come out as [`row::OutboxRow`]s and
//! outcomes come back in as [`row::RowRef`]s and [`row::RowFailure`]s.

pub mod audit_rows;
pub(crate) mod catalog;
pub(crate) mod claim;
pub mod connect;
pub mod error;
pub(crate) mod failed_rows;
pub(crate) mod index_predicate;
pub mod layout;
pub(crate) mod mark;
pub(crate) mod notify;
mod open;
pub mod outbox;
mod params;
pub(crate) mod retention;
pub mod row;
pub mod schema;
pub(crate) mod shard_locks;
pub(crate) mod table_stats;
pub(crate) mod tls;
