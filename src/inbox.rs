//! The consumer side of effectively-once processing: apply each event once, even though the
//! relay delivers at least once.
//!
//! A consumer hands each Kafka message to [`Inbox::handle`] together with a PostgreSQL client.
//! In one transaction the inbox records the message's `event_id` (table `sql/inbox.sql`) and,
//! only if the id is new, runs the consumer's handler; then it commits the transaction, and only
//! after that the message's Kafka offset. A duplicate from the relay, or a message redelivered
//! because the consumer died before its offset commit, finds its id recorded and is skipped,
//! so a non-idempotent effect (adding to a balance) is applied exactly once.
//!
//! That holds only if the consumer commits offsets itself: with librdkafka's default
//! `enable.auto.commit = true` an offset can be committed before its effect, and a crash then
//! skips the event. [`consumer_config`] gives the settings the inbox needs, and
//! [`check_consumer_config`] refuses a configuration without them. When handling fails, the
//! inbox seeks the consumer back to the message, so the next `recv` delivers it again rather
//! than the message after it (whose offset commit would otherwise skip this one).

use std::time::Duration;

use rdkafka::Offset;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use tokio_postgres::{Client, Transaction};

use crate::config::Identifier;
use crate::kafka::record::EVENT_ID_HEADER;
use crate::postgres::error::describe_pg_error;

/// The inbox table's schema, as in `sql/inbox.sql`.
pub const INBOX_SQL: &str = include_str!("../sql/inbox.sql");

/// Rows deleted per statement when pruning, so that no statement holds locks for long.
const PRUNE_BATCH: i64 = 10_000;

/// How long seeking back to a message that could not be handled may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// Consumer settings the inbox relies on, with the reason for each.
const REQUIRED_CONSUMER_SETTINGS: &[(&str, &str, &str)] = &[(
    "enable.auto.commit",
    "false",
    "the inbox commits each offset after its effect; an automatic commit can move past an event \
     whose effect was never committed, and a crash then skips it",
)];

/// A consumer configuration with what the inbox needs: offsets committed only by
/// [`Inbox::handle`], reading from the start of partitions the group has no offset for.
pub fn consumer_config(brokers: &str, group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers).set("group.id", group).set("auto.offset.reset", "earliest");
    for (name, value, _) in REQUIRED_CONSUMER_SETTINGS {
        config.set(*name, *value);
    }
    config
}

/// Refuses a consumer configuration the inbox cannot keep its promise with (librdkafka's
/// default is to commit offsets automatically, which must be turned off).
pub fn check_consumer_config(config: &ClientConfig) -> Result<(), InboxError> {
    for (name, value, why) in REQUIRED_CONSUMER_SETTINGS {
        if config.get(name) != Some(value) {
            return Err(InboxError::ConsumerConfig(format!("set {name} = {value}: {why}")));
        }
    }
    Ok(())
}

/// Why a message could not be handled. In every case its offset is not committed, so the
/// message is delivered again.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// The message carries no event-id header, so it cannot be deduplicated.
    #[error(
        "message {topic}[{partition}]@{offset} has no {header} header; it cannot be deduplicated (a relay with \
         outbox.record.event_id_header names it otherwise: Inbox::with_event_id_header)"
    )]
    MissingEventId {
        /// The header looked for.
        header: String,
        /// Its topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
    },
    /// The database refused a statement or went away; the transaction was rolled back.
    #[error("inbox: PostgreSQL {what} failed: {detail}")]
    Database {
        /// Which step.
        what: &'static str,
        /// The server's message.
        detail: String,
    },
    /// The consumer's handler failed; the transaction (effect and inbox row) was rolled back.
    #[error("inbox: the handler failed for event {event_id}: {source}")]
    Handler {
        /// The event.
        event_id: String,
        /// The handler's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The consumer is configured in a way the inbox cannot work with.
    #[error("inbox: consumer configuration: {0}")]
    ConsumerConfig(String),
    /// Handling failed and seeking back to the message failed too: the consumer would go on
    /// past it, so it must be stopped (or re-subscribed) to get the message again.
    #[error("{failure}; seeking back to {topic}[{partition}]@{offset} failed too ({source}): restart the consumer")]
    SeekBack {
        /// Why handling failed.
        failure: Box<InboxError>,
        /// Its topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// The database commit succeeded but the offset commit failed: the message will be
    /// delivered again and then skipped as a duplicate.
    #[error("inbox: committing the offset of {topic}[{partition}]@{offset} failed: {source}")]
    OffsetCommit {
        /// Its topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
        /// librdkafka's error.
        source: KafkaError,
    },
}

fn database(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> InboxError {
    move |e| InboxError::Database { what, detail: describe_pg_error(&e) }
}

/// What [`Inbox::handle`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The event was new: the handler ran and its effect is committed.
    Applied,
    /// The event had been applied before: the handler did not run.
    Duplicate,
}

/// One event as the handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    /// The stable id the relay put in the `event_id` header.
    pub event_id: String,
    /// Topic, partition and offset it was read from.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Record key.
    pub key: Option<&'a [u8]>,
    /// Record value; `None` for a tombstone.
    pub payload: Option<&'a [u8]>,
    /// All headers, `event_id` included.
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
}

impl<'a> Event<'a> {
    /// The event carried by `message`, or an error if it has no `event_id` header.
    pub fn from_message(message: &'a BorrowedMessage<'a>) -> Result<Event<'a>, InboxError> {
        Self::from_message_with_header(message, EVENT_ID_HEADER)
    }

    /// The event carried by `message`, its id in header `header` (the relay's
    /// `outbox.record.event_id_header`; Debezium's records name it `id`).
    pub fn from_message_with_header(message: &'a BorrowedMessage<'a>, header: &str) -> Result<Event<'a>, InboxError> {
        let headers: Vec<(&str, Option<&[u8]>)> =
            message.headers().map(|h| h.iter().map(|h| (h.key, h.value)).collect()).unwrap_or_default();
        let event_id = headers
            .iter()
            .find(|(name, _)| *name == header)
            .and_then(|(_, value)| *value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .ok_or_else(|| InboxError::MissingEventId {
                header: header.to_owned(),
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
            })?;
        Ok(Event {
            event_id,
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key(),
            payload: message.payload(),
            headers,
        })
    }
}

/// A consumer's record of the events it has applied.
#[derive(Debug, Clone)]
pub struct Inbox {
    record_sql: String,
    prune_sql: String,
    consumer: String,
    /// The header holding the event id.
    event_id_header: String,
}

impl Inbox {
    /// The inbox of `consumer` (usually its consumer group) in the table `outbox_inbox`.
    pub fn new(consumer: &str) -> Inbox {
        Self::with_table("outbox_inbox", consumer).unwrap_or_else(|_| unreachable!("the default table name is valid"))
    }

    /// The inbox of `consumer` in a table of another name (same columns as `sql/inbox.sql`).
    pub fn with_table(table: &str, consumer: &str) -> Result<Inbox, String> {
        let parts = Identifier::parse_qualified(table)?;
        let table: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
        let table = table.join(".");
        Ok(Inbox {
            record_sql: format!(
                "INSERT INTO {table} (consumer, event_id, topic, kafka_partition, kafka_offset) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (consumer, event_id) DO NOTHING"
            ),
            // By the primary key: a ctid is unique only within one partition, and an inbox
            // partitioned by consumer or by event id would lose other rows' entries.
            prune_sql: format!(
                "DELETE FROM {table} WHERE consumer = $1 AND event_id IN (SELECT event_id FROM {table} \
                 WHERE consumer = $1 AND processed_at < now() - $2::float8 * interval '1 second' LIMIT $3)"
            ),
            consumer: consumer.to_owned(),
            event_id_header: EVENT_ID_HEADER.to_owned(),
        })
    }

    /// This inbox reading the event id from header `header`: the relay's
    /// `outbox.record.event_id_header` when it is set (Debezium's records name it `id`).
    pub fn with_event_id_header(self, header: &str) -> Inbox {
        Inbox { event_id_header: header.to_owned(), ..self }
    }

    /// Records `event` in `tx`; true if it is new, false if this consumer applied it before.
    /// For consumers that manage their own transaction and offsets; [`Inbox::handle`] does
    /// the whole sequence.
    pub async fn record(&self, tx: &Transaction<'_>, event: &Event<'_>) -> Result<bool, InboxError> {
        let inserted = tx
            .execute(
                &self.record_sql,
                &[&self.consumer, &event.event_id, &event.topic, &event.partition, &event.offset],
            )
            .await
            .map_err(database("record the event"))?;
        Ok(inserted == 1)
    }

    /// Creates the inbox table (`sql/inbox.sql`) if it does not exist. Several consumers may
    /// start at once: PostgreSQL's `CREATE TABLE IF NOT EXISTS` is not safe against a
    /// concurrent creation of the same table, so creators take turns under an advisory lock.
    pub async fn create_table(client: &mut Client) -> Result<(), InboxError> {
        let tx = client.transaction().await.map_err(database("begin"))?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext('outbox-relay-inbox-ddl'))", &[])
            .await
            .map_err(database("lock the inbox's creation"))?;
        tx.batch_execute(INBOX_SQL).await.map_err(database("create the inbox table"))?;
        tx.commit().await.map_err(database("commit"))
    }

    /// Applies `message` once: records its event id and runs `handler` in one transaction
    /// (skipping the handler for an id recorded before), commits, then commits the message's
    /// offset. On an error of the database or the handler nothing is committed and the
    /// consumer is sought back to the message, so its next `recv` delivers it again. The
    /// consumer must not commit offsets by itself ([`check_consumer_config`]).
    pub async fn handle<C, X, H, E>(
        &self,
        client: &mut Client,
        consumer: &C,
        message: &BorrowedMessage<'_>,
        handler: H,
    ) -> Result<Handled, InboxError>
    where
        C: Consumer<X>,
        X: ConsumerContext,
        H: AsyncFnOnce(&Transaction<'_>, &Event<'_>) -> Result<(), E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let event = Event::from_message_with_header(message, &self.event_id_header)?;
        let handled = match self.apply(client, &event, handler).await {
            Ok(handled) => handled,
            Err(failure) => return Err(seek_back(consumer, message, failure)),
        };
        // Only now, with the effect durable, may the offset move past the message.
        consumer.commit_message(message, CommitMode::Async).map_err(|source| InboxError::OffsetCommit {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            source,
        })?;
        Ok(handled)
    }

    /// Records `event` and runs `handler` for a new one, in one committed transaction.
    async fn apply<H, E>(&self, client: &mut Client, event: &Event<'_>, handler: H) -> Result<Handled, InboxError>
    where
        H: AsyncFnOnce(&Transaction<'_>, &Event<'_>) -> Result<(), E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tx = client.transaction().await.map_err(database("begin"))?;
        let handled = if self.record(&tx, event).await? {
            handler(&tx, event)
                .await
                .map_err(|e| InboxError::Handler { event_id: event.event_id.clone(), source: e.into() })?;
            Handled::Applied
        } else {
            Handled::Duplicate
        };
        tx.commit().await.map_err(database("commit"))?;
        Ok(handled)
    }

    /// Deletes this consumer's inbox rows older than `older_than`, in small batches; returns
    /// how many. Keep `older_than` above the topic's retention plus the longest consumer lag
    /// or replay, or a replayed event would be applied again.
    pub async fn prune(&self, client: &Client, older_than: Duration) -> Result<u64, InboxError> {
        let seconds = older_than.as_secs_f64();
        let mut deleted = 0;
        loop {
            let batch = client
                .execute(&self.prune_sql, &[&self.consumer, &seconds, &PRUNE_BATCH])
                .await
                .map_err(database("prune"))?;
            deleted += batch;
            if batch < PRUNE_BATCH as u64 {
                return Ok(deleted);
            }
        }
    }
}

/// Points `consumer` back at `message` after `failure`, so the message is delivered again;
/// returns the error to report.
fn seek_back<C, X>(consumer: &C, message: &BorrowedMessage<'_>, failure: InboxError) -> InboxError
where
    C: Consumer<X>,
    X: ConsumerContext,
{
    let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
    match consumer.seek(topic, partition, Offset::Offset(offset), SEEK_TIMEOUT) {
        Ok(()) => failure,
        Err(source) => {
            InboxError::SeekBack { failure: Box::new(failure), topic: topic.to_owned(), partition, offset, source }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inbox_refuses_a_consumer_that_commits_offsets_by_itself() {
        assert!(check_consumer_config(&consumer_config("localhost:9092", "g")).is_ok());
        let mut defaults = ClientConfig::new();
        defaults.set("bootstrap.servers", "localhost:9092").set("group.id", "g");
        let refused = check_consumer_config(&defaults).unwrap_err().to_string();
        assert!(refused.contains("enable.auto.commit = false"), "librdkafka's default commits by itself: {refused}");
        defaults.set("enable.auto.commit", "true");
        assert!(check_consumer_config(&defaults).is_err());
    }
}
