//! The standard outbox table as the application and an observer see it: inserting events, and
//! reading back which rows the relay has marked and which shards of the table it holds.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

/// One event to insert into the standard outbox table.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Topic.
    pub topic: String,
    /// Key.
    pub key: Option<String>,
    /// JSON payload text, or None for a tombstone.
    pub payload: Option<String>,
    /// JSON headers object text.
    pub headers: Option<String>,
}

impl NewEvent {
    /// A keyed event with a small JSON payload.
    pub fn keyed(topic: &str, key: &str, n: usize) -> NewEvent {
        NewEvent {
            topic: topic.to_owned(),
            key: Some(key.to_owned()),
            payload: Some(format!(r#"{{"key":"{key}","n":{n}}}"#)),
            headers: None,
        }
    }
}

/// Inserts events in one transaction (one statement) and returns their ids in order.
pub async fn insert_events(client: &Client, events: &[NewEvent]) -> Vec<i64> {
    let topics: Vec<&str> = events.iter().map(|e| e.topic.as_str()).collect();
    let keys: Vec<Option<&str>> = events.iter().map(|e| e.key.as_deref()).collect();
    let payloads: Vec<Option<&str>> = events.iter().map(|e| e.payload.as_deref()).collect();
    let headers: Vec<Option<&str>> = events.iter().map(|e| e.headers.as_deref()).collect();
    let rows = client
        .query(
            "INSERT INTO outbox (topic, key, payload, headers) \
             SELECT t, k, p::jsonb, h::jsonb FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) \
             WITH ORDINALITY AS e(t, k, p, h, n) ORDER BY n RETURNING id",
            &[&topics, &keys, &payloads, &headers],
        )
        .await
        .expect("insert events");
    let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort_unstable();
    ids
}

/// Inserts events `range` of `topic`, keyed `key-{n % keys}`, in transactions of up to 5,000.
pub async fn insert_backlog(db: &Client, topic: &str, range: std::ops::Range<usize>, keys: usize) {
    let mut start = range.start;
    while start < range.end {
        let end = (start + 5_000).min(range.end);
        let events: Vec<NewEvent> =
            (start..end).map(|n| NewEvent::keyed(topic, &format!("key-{}", n % keys), n)).collect();
        insert_events(db, &events).await;
        start = end;
    }
}

/// Event ids of the standard outbox table's rows that match `filter` (a SQL condition).
async fn event_ids_where(db: &Client, filter: &str) -> HashSet<String> {
    let sql = format!("SELECT event_id::text FROM outbox WHERE {filter}");
    db.query(&sql, &[]).await.expect("event ids").iter().map(|r| r.get(0)).collect()
}

/// Event ids of every row.
pub async fn all_event_ids(db: &Client) -> HashSet<String> {
    event_ids_where(db, "true").await
}

/// Event ids of the rows marked published.
pub async fn marked_event_ids(db: &Client) -> HashSet<String> {
    event_ids_where(db, "published_at IS NOT NULL").await
}

/// Event ids of the rows not yet published.
pub async fn unmarked_event_ids(db: &Client) -> HashSet<String> {
    event_ids_where(db, "published_at IS NULL").await
}

/// Rows of the standard outbox table not yet published.
pub async fn unpublished_count(client: &Client) -> i64 {
    client.query_one("SELECT count(*) FROM outbox WHERE published_at IS NULL", &[]).await.expect("count").get(0)
}

/// The shards of the standard outbox table each running relay holds, by the backend pid of
/// its session, from PostgreSQL's lock table (this database's locks, keyed by the table's OID).
pub async fn shard_holders(db: &Client) -> HashMap<i32, usize> {
    let rows = db
        .query(
            "SELECT pid, count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND classid = (hashtext('outbox-relay-shard:' || 'outbox'::regclass::oid::text) & 2147483647)::oid \
             GROUP BY pid",
            &[],
        )
        .await
        .expect("shard holders");
    rows.iter().map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1) as usize)).collect()
}
