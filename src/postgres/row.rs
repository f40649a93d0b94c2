//! A row of the outbox as the relay handles it, from the claim to the mark: the row read by
//! the claim ([`OutboxRow`], or [`UnreadableRow`] when a value cannot be read), its identity
//! ([`RowId`], [`RowRef`]) and the failure recorded against it ([`RowFailure`]).
//!
//! These are the table's terms; the record a row becomes is in `kafka::record`.

/// One outbox row as read by the claim statement, before it is checked.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    /// The row's id as text; identifies it when marking.
    pub id: String,
    /// The stable event id; becomes the `event_id` header.
    pub event_id: String,
    /// The record key, if the row has one.
    pub key: Option<String>,
    /// The record value; `None` (SQL NULL) is a tombstone.
    pub payload: Option<Vec<u8>>,
    /// The headers column as JSON text.
    pub headers: Option<String>,
    /// When the row was created, in seconds since the epoch (for delivery latency).
    pub created_at: Option<f64>,
    /// A W3C traceparent from its own column, sent as the `traceparent` header.
    pub traceparent: Option<String>,
    /// The record timestamp column, in milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    /// The tracing-context column: Java properties text holding `traceparent=...`.
    pub tracing_context: Option<String>,
    /// The row's shard: with exactly-once delivery, the shard whose transaction carries it.
    pub shard: i32,
    /// Values of the topic column, or of the template's columns in order.
    pub topic_values: Vec<Option<String>>,
    /// The placed columns' values as text, in the order of `outbox.record.placements`.
    pub placed: Vec<Option<String>>,
}

impl OutboxRow {
    /// How the statements that write this row's outcome find it again.
    pub fn row_ref(&self) -> RowRef {
        RowRef { id: RowId::from(self.id.clone()), event_id: Some(self.event_id.clone()) }
    }
}

/// A row's id, as text: what the relay names a row by in its logs, and what claims leave out
/// while the row is in flight. A newtype so that an id is never mistaken for a key, a topic or
/// an error, which are text too.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowId(String);

impl RowId {
    /// The id as the statements take it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for RowId {
    fn from(id: String) -> RowId {
        RowId(id)
    }
}

impl From<&str> for RowId {
    fn from(id: &str) -> RowId {
        RowId(id.to_owned())
    }
}

impl std::fmt::Display for RowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A claimed row, as the statements that write its outcome (mark, failure) find it again: by
/// its id and its event id. The id alone could name another row by then: the table may have
/// been replaced under the relay (renamed, restored from a dump) or its identity restarted
/// (`TRUNCATE ... RESTART IDENTITY`), and a mark landing on a new row of the same id would
/// lose that row. The event id is the same only for the same event.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RowRef {
    /// The row's id.
    pub id: RowId,
    /// The row's event id as text; `None` when the claim could not read it (such a row can
    /// only fail, and its failure is then recorded by id alone).
    pub event_id: Option<String>,
}

impl std::fmt::Display for RowRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id.as_str())
    }
}

/// A row whose attempt failed, and the error its last-error column keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowFailure {
    /// The row.
    pub row: RowRef,
    /// Its key, when it could be read.
    pub key: Option<String>,
    /// What went wrong, as stored in the row.
    pub error: String,
}

/// A claimed row that cannot be read whole: a column the driver could not decode.
#[derive(Debug, Clone, PartialEq)]
pub struct UnreadableRow {
    /// The row's id as text; empty when even the id could not be read.
    pub id: String,
    /// The row's event id, when it could be read.
    pub event_id: Option<String>,
    /// The row's key, when it could be read: later rows of that key must wait for this one.
    pub key: RowKey,
    /// What could not be read, and why.
    pub problem: String,
}

/// The key of a row that could not be read whole.
#[derive(Debug, Clone, PartialEq)]
pub enum RowKey {
    /// The key was read (`None`: the row has no key, so it holds nothing back).
    Known(Option<String>),
    /// The key itself could not be read: any later keyed row might share it.
    Unreadable,
}
