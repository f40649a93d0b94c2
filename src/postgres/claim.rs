//! The claim: the statement that picks the next rows to publish, the code that runs it, and the
//! decoding of what it returns (the rows, and what the claim floor learns from it).
//!
//! The claim only reads: a row is never changed by being claimed. What keeps two relays from
//! publishing the same row is the shard locks ([`crate::postgres::shard_locks`]); what keeps a
//! key's rows in order is the statement itself (see [`Layout::claim_sql`]).

use std::time::Instant;

use futures::TryStreamExt;
use tokio_postgres::types::{FromSql, Type};

use crate::postgres::error::{OutboxError, describe_pg_error};
use crate::postgres::layout::{Layout, sql_literal, text_or_null};
use crate::postgres::outbox::Outbox;
use crate::postgres::params::{Value, statement_params};
use crate::postgres::row::{OutboxRow, RowKey, UnreadableRow};

statement_params! {
    /// The claim's parameters.
    pub enum ClaimParam {
        /// The window's size, in rows (`int8`).
        Limit,
        /// The shards this relay owns (`int4[]`).
        Shards,
        /// The first retry backoff, in seconds (`float8`).
        RetryBackoffInitial,
        /// The longest retry backoff, in seconds (`float8`).
        RetryBackoffMax,
        /// Ids (as text) to leave out: the batch in flight, when the next one is claimed ahead,
        /// and records set aside while their partition stalls.
        LeftOut,
        /// Where to start in claim order (`int8`, NULL for the beginning; see
        /// [`crate::relay::claim_floor`]).
        Start,
        /// Keys (as text) none of whose rows may be claimed: those held behind a record set aside.
        HeldKeys,
    }
}

/// The names of the claim's result columns.
mod column {
    /// Row id as text; NULL on the one row of a claim that found nothing.
    pub const ID: &str = "r_id";
    /// Event id as text.
    pub const EVENT_ID: &str = "r_event_id";
    /// Key as text, or NULL.
    pub const KEY: &str = "r_key";
    /// Payload in its own type.
    pub const PAYLOAD: &str = "r_payload";
    /// Headers as JSON text, or NULL.
    pub const HEADERS: &str = "r_headers";
    /// Creation time as seconds since the epoch (`float8`), or NULL.
    pub const CREATED_AT: &str = "r_created_at";
    /// The traceparent column as text, or NULL.
    pub const TRACEPARENT: &str = "r_traceparent";
    /// The record timestamp column as milliseconds since the epoch (`int8`), or NULL.
    pub const TIMESTAMP_MS: &str = "r_timestamp_ms";
    /// The tracing-context column as text, or NULL.
    pub const TRACING_CONTEXT: &str = "r_tracing_context";
    /// The row's shard (`int4`): with exactly-once delivery, its shard's transaction carries it.
    pub const SHARD: &str = "r_shard";
    /// Where the claim found its first live row (`int8`, see [`crate::relay::claim_floor`]), or
    /// NULL; the same on every row.
    pub const FIRST_UNPUBLISHED: &str = "first_unpublished";
    /// The claim snapshot's `xmin` as text; the same on every row.
    pub const SNAPSHOT_XMIN: &str = "xmin";
    /// The claim snapshot's `xmax` as text; the same on every row.
    pub const SNAPSHOT_XMAX: &str = "xmax";
    /// Whether the order column is still fed by a sequence whose ids grow with time (`bool`,
    /// see [`crate::postgres::layout::OrderSequence::grows_with_time`]); the same on every row.
    pub const IDS_GROW_WITH_TIME: &str = "ids_grow";
    /// The OID the table's name resolves to while the claim runs (`int8`, NULL if none); the
    /// same on every row. See [`super::TableIdentity`].
    pub const TABLE_OID: &str = "table_oid";
    /// The table's storage file (`int8`; NULL for a partitioned table): a `TRUNCATE` gives it
    /// a new one. The same on every row.
    pub const TABLE_FILENODE: &str = "filenode";
    /// The OID of the order column's sequence (`int8`), or NULL.
    pub const SEQUENCE_OID: &str = "sequence_oid";
    /// The sequence's last value (`int8`), NULL when it has handed out none since it was
    /// created or restarted, or when the relay may not read it.
    pub const SEQUENCE_LAST_VALUE: &str = "sequence_last_value";
    /// The topic column, or the template's columns, as text, named this followed by their
    /// position in [`crate::postgres::layout::TopicSource::columns`] (`topic_0`, ...).
    pub const TOPIC_PREFIX: &str = "topic_";
    /// The placed columns (`outbox.record.placements`) as text, named this followed by their
    /// position in [`crate::postgres::layout::Mapping::placements`].
    pub const PLACED_PREFIX: &str = "placed_";
}

/// What one claim saw, besides its rows: where its first unpublished row was, its snapshot, and
/// whether the order column's ids still grow with time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimView {
    /// The lowest claim-order value, at or above where the claim started, of an unpublished row
    /// of the claimed shards (whatever its state); `None` when there is none.
    pub first_unpublished: Option<i64>,
    /// The claim snapshot's `xmin`: every transaction below it had ended.
    pub xmin: u64,
    /// The claim snapshot's `xmax`: every transaction from it on had not started.
    pub xmax: u64,
    /// Whether the order column is fed by a sequence whose ids grow with time, as the claim read
    /// the catalog.
    pub ids_grow_with_time: bool,
    /// The table and its sequence as the claim saw them.
    pub table: TableIdentity,
}

/// What identifies the table a claim read, and how far its order column's sequence has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableIdentity {
    /// The OID the table's name resolved to; `None` if it resolved to no table.
    pub oid: Option<u32>,
    /// The table's storage file; a `TRUNCATE` (or `VACUUM FULL`, `CLUSTER`) gives it a new one.
    /// `None` for a partitioned table, which has no storage of its own.
    pub filenode: Option<i64>,
    /// The OID of the order column's sequence, if it has one.
    pub sequence: Option<i64>,
    /// The sequence's last value; `None` when it handed out no id since it was created or
    /// restarted, or when the relay's role may not read it.
    pub sequence_last_value: Option<i64>,
}

/// The result of one claim: its rows, and what the claim floor learns from it.
#[derive(Debug, Default)]
pub struct Claim {
    /// The claimed rows in claim order, each decoded or its id and why it could not be.
    pub rows: Vec<Result<OutboxRow, UnreadableRow>>,
    /// What the claim saw besides its rows; `None` only if that could not be read.
    pub view: Option<ClaimView>,
    /// Whether it may have left claimable rows behind: it returned its row limit, or stopped
    /// at its byte limit.
    pub full: bool,
}

/// The values of one claim, one field per [`ClaimParam`].
struct Params<'a> {
    limit: i64,
    shards: &'a [i32],
    retry_backoff_initial: f64,
    retry_backoff_max: f64,
    left_out: &'a [String],
    start: Option<i64>,
    held_keys: &'a [String],
}

impl Params<'_> {
    fn value(&self, param: ClaimParam) -> Value<'_> {
        match param {
            ClaimParam::Limit => &self.limit,
            ClaimParam::Shards => &self.shards,
            ClaimParam::RetryBackoffInitial => &self.retry_backoff_initial,
            ClaimParam::RetryBackoffMax => &self.retry_backoff_max,
            ClaimParam::LeftOut => &self.left_out,
            ClaimParam::Start => &self.start,
            ClaimParam::HeldKeys => &self.held_keys,
        }
    }
}

/// The name of the table of OID `$1` now, or NULL when no table has it.
const OID_NAME_SQL: &str = "SELECT (SELECT c.oid::regclass::text FROM pg_class AS c WHERE c.oid = $1)";

impl Outbox {
    /// The next unpublished rows in claim order, at most `limit` rows and, past the first row,
    /// at most `max_bytes` of row data, leaving out the rows `in_flight` (ids as text), starting
    /// at claim-order value `start` (`None`: at the beginning; it is up to
    /// [`crate::relay::claim_floor::ClaimFloor`] to decide), and leaving out every row of the
    /// `held_keys`. A row larger than `max_bytes` comes alone.
    /// A row whose columns cannot be decoded comes back as an [`UnreadableRow`] so that the
    /// rest of the batch still flows.
    ///
    /// Rows are decoded as they arrive and the claim stops reading at the byte limit, so the
    /// relay's memory is bounded by it whatever the rows' sizes (the rest of the result is
    /// discarded as it arrives: the rows are not claimed, only read past).
    pub async fn claim(
        &self,
        limit: usize,
        max_bytes: usize,
        shards: &[i32],
        in_flight: &[String],
        start: Option<i64>,
        held_keys: &[String],
    ) -> Result<Claim, OutboxError> {
        let (retry_backoff_initial, retry_backoff_max) = self.retry_backoff;
        let params = Params {
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
            shards,
            retry_backoff_initial,
            retry_backoff_max,
            left_out: in_flight,
            start,
            held_keys,
        };
        let sent = Instant::now();
        let stream = self
            .client
            .query_raw(&self.statements.claim, ClaimParam::values(|p| params.value(p)))
            .await
            .map_err(OutboxError::query("claim"))?;
        futures::pin_mut!(stream);
        let mut claim = Claim::default();
        let mut bytes = 0usize;
        // Every claim returns at least one row, carrying what the claim floor learns; when
        // nothing was claimed, it is the only row and its row columns are NULL.
        while let Some(row) = stream.try_next().await.map_err(OutboxError::query("claim"))? {
            if claim.view.is_none() {
                claim.view = decode_view(&row);
            }
            if matches!(row.try_get::<_, Option<String>>(column::ID), Ok(None)) {
                continue;
            }
            let decoded = decode_row(&row);
            let size = decoded_size(&decoded);
            if !claim.rows.is_empty() && bytes.saturating_add(size) > max_bytes {
                claim.full = true;
                break;
            }
            bytes = bytes.saturating_add(size);
            claim.rows.push(decoded);
        }
        self.proof.proved(sent);
        claim.full |= claim.rows.len() >= limit;
        if let Some(view) = &claim.view
            && view.table.oid != Some(self.locks.table_oid)
        {
            // The rows came from the table the name resolves to now, whose shards this
            // session's locks do not cover: none of them may be published through it.
            return Err(self.table_replaced(view.table.oid).await);
        }
        Ok(claim)
    }

    /// The error for a table whose name resolves to `now` instead of this connection's table.
    async fn table_replaced(&self, now: Option<u32>) -> OutboxError {
        let was = self.locks.table_oid;
        let old_name = match self.client.query_one(OID_NAME_SQL, &[&was]).await {
            Ok(row) => row.get::<_, Option<String>>(0).unwrap_or_else(|| "dropped".to_owned()),
            Err(_) => "unknown".to_owned(),
        };
        OutboxError::TableReplaced {
            table: self.locks.table.clone(),
            was,
            now: now.map_or_else(|| "no table".to_owned(), |oid| format!("the table of OID {oid}")),
            old_name,
        }
    }
}

impl Layout {
    /// The shard of a row of alias `a`: its key's hash, or its id's for rows without a key
    /// (they need no order), modulo the shard count.
    pub fn shard_sql(&self, a: &str) -> String {
        let m = &self.mapping;
        let hashed = match &m.key {
            Some(key) => format!("coalesce({a}.{key}::text, {a}.{id}::text)", id = m.id),
            None => format!("{a}.{id}::text", id = m.id),
        };
        format!("((hashtext({hashed}) & 2147483647) % {shards})", shards = m.shards)
    }

    /// True when row `a` may be attempted now: it has not failed before, or its backoff since
    /// the last failed attempt has passed ([`ClaimParam::RetryBackoffInitial`] first backoff,
    /// [`ClaimParam::RetryBackoffMax`] longest, in seconds).
    fn due_sql(&self, a: &str) -> Option<String> {
        let m = &self.mapping;
        let last = m.last_attempt_at.as_ref()?;
        let (initial, max) = (ClaimParam::RetryBackoffInitial, ClaimParam::RetryBackoffMax);
        let backoff = match &m.attempts {
            Some(attempts) => format!("least({initial} * power(2, greatest({a}.{attempts} - 1, 0)), {max})"),
            None => initial.to_string(),
        };
        Some(format!("({a}.{last} IS NULL OR {a}.{last} <= now() - {backoff} * interval '1 second')"))
    }

    /// Whether each claim looks for an earlier row of a key that holds the key back (a failed
    /// row, or one waiting out its backoff), which wants an index on (key, order).
    pub fn looks_for_rows_holding_keys_back(&self) -> bool {
        self.earlier_row_holding_the_key("o").is_some()
    }

    /// A subquery finding an earlier row of row `a`'s key that holds the key back: one that
    /// has failed for good (with `on_poison = "park_key"`), or is waiting out a retry backoff.
    fn earlier_row_holding_the_key(&self, a: &str) -> Option<String> {
        let m = &self.mapping;
        let key = m.key.as_ref()?;
        let attempts = m.attempts.as_ref()?;
        let mut holds = Vec::new();
        if let (Some(failed_at), crate::config::OnPoison::ParkKey) = (&m.failed_at, m.on_poison) {
            holds.push(format!("e.{failed_at} IS NOT NULL"));
        }
        if let Some(due) = self.due_sql("e") {
            let not_given_up = match &m.failed_at {
                Some(failed_at) => format!("e.{failed_at} IS NULL AND "),
                None => String::new(),
            };
            holds.push(format!("({not_given_up}NOT {due})"));
        }
        if holds.is_empty() {
            return None;
        }
        let unpublished = match &m.published_at {
            Some(p) => format!(" AND e.{p} IS NULL"),
            None => String::new(),
        };
        // `OFFSET 0` keeps the lookup a subquery run for each row the window reads, which
        // probes the index of failing rows by the row's key: PostgreSQL does not turn a
        // subquery with an OFFSET into a join. As a join, a planner whose statistics say no row
        // fails (taken before any did) reads every row of the table once per claim to find
        // them: 10,847 blocks of a 200,000-row table for a 1,000-row claim. Without such an
        // index each probe would read the table, so there the planner keeps its choice.
        let per_row = if self.failing_rows_by_key_index { " OFFSET 0" } else { "" };
        Some(format!(
            "SELECT 1 FROM {table} AS e WHERE e.{key} = {a}.{key} AND e.{order} < {a}.{order}{unpublished} \
             AND e.{attempts} > 0 AND ({holds}){per_row}",
            table = m.table_sql(),
            order = m.order_by,
            holds = holds.join(" OR "),
        ))
    }

    /// The next rows to publish, in claim order; its parameters are `ClaimParam`'s, its result
    /// columns named in `column`.
    ///
    /// It looks at a window of the next `ClaimParam::Limit` unpublished rows of the shards
    /// (skipping rows that failed for good, rows waiting out a retry backoff and rows held back
    /// by such an earlier row of their key), and returns those that are ready: their
    /// transaction, and every transaction that started writing before it, has finished; and no
    /// earlier row of their key in the window is still waiting for that. So a lower id that
    /// commits late is never overtaken within its key, and the work per claim stays bounded by
    /// the batch size, whatever the backlog.
    ///
    /// Each row also carries what the claim floor learns from the claim: the first live row at
    /// or after `ClaimParam::Start` (in flight, waiting out a backoff or claimable) and the
    /// snapshot's bounds, and the table's identity, all in one single-row subquery joined to
    /// the claimed rows, so computed once per claim rather than per row (the identity's
    /// catalog lookups, three per row as select-list expressions, took 3.6 ms of a 1,000-row
    /// claim).
    ///
    /// The statement's shape keeps its cost bounded by the window, whatever the planner's
    /// statistics say (none on a table never analyzed, stale ones after a bulk load): which
    /// rows of the window an earlier row of their key holds back is a window function over the
    /// window (a sort of at most `Limit` rows), not a join of the window with itself, which a
    /// planner that expects one row turns into a nested loop of `Limit`² comparisons; whether an
    /// earlier failing row holds a row's key back is a probe of the index of failing rows for
    /// each row read, not a join a planner may turn into a read of the whole table (see
    /// `earlier_row_holding_the_key`). The window itself is read in claim order from the
    /// unpublished-rows index because the relay's session turns bitmap scans off (see `open`).
    ///
    /// Every column is qualified: the selected `id::text` is itself named `id`, and an
    /// unqualified `ORDER BY id` would sort by that text ("10" before "9").
    pub fn claim_sql(&self) -> String {
        use column::*;
        let m = &self.mapping;
        let live = self.live_row_filters("o");
        let mut filters = live.clone();
        if let Some(due) = self.due_sql("o") {
            filters.push(due);
        }
        let left_out = ClaimParam::LeftOut;
        // The rows left out are a hashed subquery: each row the window reads is looked up in a
        // hash table built once per claim. As `NOT (id = ANY(array))` PostgreSQL compared each
        // row read with every element in turn: with the 1,000 rows of a batch in flight (the
        // claim ahead reads past them, 2,000 rows) that was half of a 22 ms claim. The ids are
        // cast to the id's type once, inside the subquery, not for every row read.
        filters.push(format!(
            "o.{id} NOT IN (SELECT unnest({left_out}::text[]::{ty}[]))",
            id = m.id,
            ty = self.id_type
        ));
        // Keys held behind a record whose partition stalled (see `crate::relay::stalled`).
        let held_keys = ClaimParam::HeldKeys;
        match &m.key {
            Some(key) => filters.push(format!("(o.{key} IS NULL OR NOT (o.{key}::text = ANY({held_keys}::text[])))")),
            None => filters.push(format!("{held_keys}::text[] IS NOT NULL")),
        }
        if m.last_attempt_at.is_none() {
            // Keep the backoff parameters typed when no clause uses them.
            filters.push(format!(
                "{}::float8 IS NOT NULL AND {}::float8 IS NOT NULL",
                ClaimParam::RetryBackoffInitial,
                ClaimParam::RetryBackoffMax
            ));
        }
        let ready = match &m.xact_id {
            Some(h) => format!("(o.{h} IS NULL OR o.{h} < pg_snapshot_xmin(pg_current_snapshot()))"),
            None => "true".to_owned(),
        };
        let first_unpublished = if self.orders_by_integer() {
            format!(
                "(SELECT o.{order}::int8 FROM {table} AS o WHERE {unpublished} ORDER BY o.{order} LIMIT 1)",
                order = m.order_by,
                table = m.table_sql(),
                unpublished = self.unpublished_row_filters("o").join(" AND "),
            )
        } else {
            "NULL::int8".to_owned()
        };
        // A row being retried goes out alone for its key: if it fails again, nothing of its key
        // claimed with it may have gone out ahead of it. A row whose last attempt failed keeps
        // its error until it is published, also once `outbox-relay retry` has set its attempts
        // back to zero: re-queued, it still goes out alone, so the rows of its key re-queued
        // with it wait for it.
        let retrying = match (&m.attempts, &m.last_error) {
            (Some(attempts), Some(last_error)) => format!("(o.{attempts} > 0 OR o.{last_error} IS NOT NULL)"),
            (Some(attempts), None) => format!("o.{attempts} > 0"),
            (None, Some(last_error)) => format!("o.{last_error} IS NOT NULL"),
            (None, None) => "false".to_owned(),
        };
        let topic: Vec<String> =
            m.topic.columns().iter().enumerate().map(|(i, c)| format!("o.{c}::text AS {TOPIC_PREFIX}{i}")).collect();
        let topic_out: Vec<String> = (0..topic.len()).map(|i| format!("c.{TOPIC_PREFIX}{i}")).collect();
        // Placed columns go after the topic's, so that each set is read by its prefix alone.
        let placed: String = m
            .placements
            .iter()
            .enumerate()
            .map(|(i, p)| format!(", o.{}::text AS {PLACED_PREFIX}{i}", p.column))
            .collect();
        let placed_out: String = (0..m.placements.len()).map(|i| format!(", c.{PLACED_PREFIX}{i}")).collect();
        format!(
            "WITH window_rows AS (\
               SELECT o.{order} AS r_order, o.{id}::text AS {ID}, o.{event_id}::text AS {EVENT_ID}, {key} AS {KEY}, \
                      o.{payload} AS {PAYLOAD}, {headers} AS {HEADERS}, {created_at} AS {CREATED_AT}, \
                      {traceparent} AS {TRACEPARENT}, {timestamp_ms} AS {TIMESTAMP_MS}, \
                      {tracing_context} AS {TRACING_CONTEXT}, {shard} AS {SHARD}, {topic}{placed}, {ready} AS r_ready, \
                      {retrying} AS r_retrying \
               FROM {table} AS o WHERE {filters} ORDER BY o.{order} LIMIT {limit}), \
             claimed AS (SELECT * FROM (\
               SELECT w.*, bool_or(NOT w.r_ready OR w.r_retrying) OVER (PARTITION BY w.{KEY} ORDER BY w.r_order \
                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS r_blocked FROM window_rows AS w) AS c \
               WHERE c.r_ready AND (c.{KEY} IS NULL OR NOT coalesce(c.r_blocked, false))) \
             SELECT c.{ID}, c.{EVENT_ID}, c.{KEY}, c.{PAYLOAD}, c.{HEADERS}, c.{CREATED_AT}, c.{TRACEPARENT}, \
                    c.{TIMESTAMP_MS}, c.{TRACING_CONTEXT}, c.{SHARD}, \
                    v.{FIRST_UNPUBLISHED}, v.{SNAPSHOT_XMIN}, v.{SNAPSHOT_XMAX}, v.{IDS_GROW_WITH_TIME}, \
                    v.{TABLE_OID}, v.{TABLE_FILENODE}, v.{SEQUENCE_OID}, v.{SEQUENCE_LAST_VALUE}, {topic_out}{placed_out} \
             FROM (SELECT {first_unpublished} AS {FIRST_UNPUBLISHED}, \
                          pg_snapshot_xmin(pg_current_snapshot())::text AS {SNAPSHOT_XMIN}, \
                          pg_snapshot_xmax(pg_current_snapshot())::text AS {SNAPSHOT_XMAX}, \
                          {ids_grow} AS {IDS_GROW_WITH_TIME}, {identity}) AS v \
               LEFT JOIN claimed AS c ON true \
             ORDER BY c.r_order",
            order = m.order_by,
            id = m.id,
            event_id = m.event_id,
            key = text_or_null(&m.key),
            payload = m.payload,
            headers = text_or_null(&m.headers),
            created_at = match &m.created_at {
                Some(c) => format!("extract(epoch FROM o.{c})::float8"),
                None => "NULL::float8".to_owned(),
            },
            traceparent = text_or_null(&m.traceparent),
            // Truncated toward zero, as Debezium divides a timestamp's microseconds.
            timestamp_ms = match &m.timestamp {
                Some(c) => format!("trunc(extract(epoch FROM o.{c}) * 1000)::int8"),
                None => "NULL::int8".to_owned(),
            },
            tracing_context = text_or_null(&m.tracing_context),
            shard = self.shard_sql("o"),
            topic = topic.join(", "),
            table = m.table_sql(),
            filters = filters.join(" AND "),
            limit = ClaimParam::Limit,
            topic_out = topic_out.join(", "),
            ids_grow = self.ids_grow_with_time_sql(),
            identity = self.table_identity_sql(),
        )
    }

    /// What identifies the table and its order column's sequence as the claim sees them:
    /// the OID its name resolves to, its storage file, the sequence's OID and last value
    /// (only where the relay may read it, as the `pg_sequences` view does). The statement
    /// holds a lock on the table it reads, so the name cannot move to another table while it
    /// runs: the OID read here is the table whose rows it claimed.
    fn table_identity_sql(&self) -> String {
        use column::{SEQUENCE_LAST_VALUE, SEQUENCE_OID, TABLE_FILENODE, TABLE_OID};
        let m = &self.mapping;
        let table = sql_literal(&m.table_sql());
        let sequence = format!("pg_get_serial_sequence({table}, {})::regclass", sql_literal(m.order_by.as_str()));
        let (sequence_oid, last_value) = if self.orders_by_integer() {
            (
                format!("{sequence}::oid::int8"),
                format!(
                    "(SELECT CASE WHEN has_sequence_privilege(s.seq::oid, 'SELECT,USAGE') \
                     THEN pg_sequence_last_value(s.seq) END FROM (SELECT {sequence} AS seq) AS s)"
                ),
            )
        } else {
            ("NULL::int8".to_owned(), "NULL::int8".to_owned())
        };
        format!(
            "to_regclass({table})::oid::int8 AS {TABLE_OID}, \
             pg_relation_filenode(to_regclass({table}))::int8 AS {TABLE_FILENODE}, \
             {sequence_oid} AS {SEQUENCE_OID}, {last_value} AS {SEQUENCE_LAST_VALUE}"
        )
    }

    /// Whether the order column is fed by a sequence whose ids grow with time, read again by
    /// every claim: the sequence can be altered while the relay runs, and the claim floor must
    /// stop the moment it no longer holds ([`crate::relay::claim_floor`]).
    fn ids_grow_with_time_sql(&self) -> String {
        if !self.orders_by_integer() {
            return "false".to_owned();
        }
        let m = &self.mapping;
        format!(
            "(SELECT coalesce(bool_and(s.seqincrement > 0 AND s.seqcache = 1 AND NOT s.seqcycle), false) \
             FROM pg_sequence AS s WHERE s.seqrelid = pg_get_serial_sequence({table}, {column})::regclass)",
            table = sql_literal(&m.table_sql()),
            column = sql_literal(m.order_by.as_str()),
        )
    }

    /// The conditions of a row `a` the relay may claim now or later without anyone's help:
    /// unpublished, not failed for good, of this relay's shards, at or after the claim's
    /// start, and not held back by an earlier row of its key. A row waiting out its retry
    /// backoff is live; the rows it holds back are not, but it is earlier than all of them.
    fn live_row_filters(&self, a: &str) -> Vec<String> {
        let m = &self.mapping;
        let mut filters = self.unpublished_row_filters(a);
        if let Some(failed_at) = &m.failed_at {
            filters.push(format!("{a}.{failed_at} IS NULL"));
        }
        if let Some(holding) = self.earlier_row_holding_the_key(a) {
            filters.push(format!("NOT EXISTS ({holding})"));
        }
        filters
    }

    /// The conditions of a row `a` of this relay's shards ([`ClaimParam::Shards`]) that is not
    /// published yet, at or after the claim's start ([`ClaimParam::Start`]): claimable, in flight,
    /// waiting out a backoff, failed for good, or held back by such a row. The claim floor never
    /// rises past the first of them, so that whatever makes one claimable again (`outbox-relay
    /// retry`, a backoff ending) finds it at or above the floor, with nothing of its key ahead
    /// of it.
    fn unpublished_row_filters(&self, a: &str) -> Vec<String> {
        let m = &self.mapping;
        let (shards, start) = (ClaimParam::Shards, ClaimParam::Start);
        let mut filters = Vec::new();
        if let Some(published_at) = &m.published_at {
            filters.push(format!("{a}.{published_at} IS NULL"));
        }
        filters.push(format!("{} = ANY({shards}::int4[])", self.shard_sql(a)));
        if self.orders_by_integer() {
            // With the parameter known at planning (plan_cache_mode = force_custom_plan), this
            // folds to an index bound, or to nothing for NULL.
            filters.push(format!("({start}::int8 IS NULL OR {a}.{order} >= {start}::int8)", order = m.order_by));
        } else {
            filters.push(format!("{start}::int8 IS NULL"));
        }
        filters
    }
}

/// The claim floor's part of a claimed row; `None` if it cannot be read, which only costs the
/// floor one observation.
fn decode_view(row: &tokio_postgres::Row) -> Option<ClaimView> {
    let xid = |name: &str| row.try_get::<_, String>(name).ok().and_then(|text| text.parse::<u64>().ok());
    Some(ClaimView {
        first_unpublished: row.try_get(column::FIRST_UNPUBLISHED).ok()?,
        ids_grow_with_time: row.try_get(column::IDS_GROW_WITH_TIME).ok()?,
        xmin: xid(column::SNAPSHOT_XMIN)?,
        xmax: xid(column::SNAPSHOT_XMAX)?,
        table: TableIdentity {
            oid: row.try_get::<_, Option<i64>>(column::TABLE_OID).ok()?.and_then(|oid| u32::try_from(oid).ok()),
            filenode: row.try_get(column::TABLE_FILENODE).ok()?,
            sequence: row.try_get(column::SEQUENCE_OID).ok()?,
            sequence_last_value: row.try_get(column::SEQUENCE_LAST_VALUE).ok()?,
        },
    })
}

/// The bytes a claimed row holds in the relay's memory, near enough: its variable-length values.
fn decoded_size(row: &Result<OutboxRow, UnreadableRow>) -> usize {
    let text = |t: &Option<String>| t.as_ref().map_or(0, String::len);
    match row {
        Ok(row) => {
            row.id.len()
                + row.event_id.len()
                + text(&row.key)
                + row.payload.as_ref().map_or(0, Vec::len)
                + text(&row.headers)
                + text(&row.traceparent)
                + row.topic_values.iter().map(text).sum::<usize>()
                + row.placed.iter().map(text).sum::<usize>()
                + text(&row.tracing_context)
        }
        Err(unreadable) => unreadable.id.len() + unreadable.problem.len(),
    }
}

fn decode_row(row: &tokio_postgres::Row) -> Result<OutboxRow, UnreadableRow> {
    // The id is selected as text and is what marks the row, so it is read first; a row whose
    // id cannot be read cannot be marked either way, and the claim fails as a whole. The key
    // comes next: a row that fails holds back the later rows of its key.
    let id: String = match row.try_get(column::ID) {
        Ok(id) => id,
        Err(e) => {
            return Err(UnreadableRow {
                id: String::new(),
                event_id: None,
                key: RowKey::Unreadable,
                problem: format!("id: {e}"),
            });
        }
    };
    // The driver's own message says only "error deserializing column 2"; its cause says what is
    // wrong with the value ("invalid utf-8 sequence ..."), which is what the row's error must say.
    let problem = |name: &str, e: tokio_postgres::Error| format!("cannot read {name}: {}", describe_pg_error(&e));
    let key: Option<String> = match row.try_get(column::KEY) {
        Ok(key) => key,
        Err(e) => {
            return Err(UnreadableRow { id, event_id: None, key: RowKey::Unreadable, problem: problem("key", e) });
        }
    };
    let event_id: String = row.try_get(column::EVENT_ID).map_err(|e| UnreadableRow {
        id: id.clone(),
        event_id: None,
        key: RowKey::Known(key.clone()),
        problem: problem("event_id", e),
    })?;
    let field = |name: &str, e: tokio_postgres::Error| UnreadableRow {
        id: id.clone(),
        event_id: Some(event_id.clone()),
        key: RowKey::Known(key.clone()),
        problem: problem(name, e),
    };
    let payload: Option<RawPayload> = row.try_get(column::PAYLOAD).map_err(|e| field("payload", e))?;
    let headers: Option<String> = row.try_get(column::HEADERS).map_err(|e| field("headers", e))?;
    let created_at: Option<f64> = row.try_get(column::CREATED_AT).map_err(|e| field("created_at", e))?;
    let traceparent: Option<String> = row.try_get(column::TRACEPARENT).map_err(|e| field("traceparent", e))?;
    let timestamp_ms: Option<i64> = row.try_get(column::TIMESTAMP_MS).map_err(|e| field("timestamp", e))?;
    let tracing_context: Option<String> =
        row.try_get(column::TRACING_CONTEXT).map_err(|e| field("tracing_context", e))?;
    let shard: i32 = row.try_get(column::SHARD).map_err(|e| field("shard", e))?;
    // The topic columns are read by position, in the order their names number them.
    let mut topic_values = Vec::new();
    for (i, _) in row.columns().iter().enumerate().filter(|(_, c)| c.name().starts_with(column::TOPIC_PREFIX)) {
        topic_values.push(row.try_get::<_, Option<String>>(i).map_err(|e| field("topic", e))?);
    }
    let mut placed = Vec::new();
    for (i, c) in row.columns().iter().enumerate().filter(|(_, c)| c.name().starts_with(column::PLACED_PREFIX)) {
        let name = c.name().to_owned();
        placed.push(row.try_get::<_, Option<String>>(i).map_err(|e| field(&name, e))?);
    }
    Ok(OutboxRow {
        id,
        event_id,
        key,
        payload: payload.map(|p| p.0),
        headers,
        created_at,
        traceparent,
        timestamp_ms,
        tracing_context,
        shard,
        topic_values,
        placed,
    })
}

/// The payload column's bytes as the record value: JSON text for json and jsonb, UTF-8 for
/// text, the stored bytes for bytea. Text and JSON must be UTF-8, as every other text column
/// of the row must (a SQL_ASCII database stores any bytes): bytes that are not are refused, so
/// the row fails with its own error instead of reaching consumers as garbage.
struct RawPayload(Vec<u8>);

/// jsonb's binary wire format starts with this version byte, followed by the JSON text.
const JSONB_FORMAT_VERSION: u8 = 1;

impl<'a> FromSql<'a> for RawPayload {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            return match raw.split_first() {
                Some((&JSONB_FORMAT_VERSION, json)) => {
                    std::str::from_utf8(json)?;
                    Ok(RawPayload(json.to_vec()))
                }
                _ => Err("unsupported jsonb wire format version".into()),
            };
        }
        if matches!(*ty, Type::JSON | Type::TEXT | Type::VARCHAR | Type::BPCHAR) {
            std::str::from_utf8(raw)?;
        }
        Ok(RawPayload(raw.to_vec()))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSONB | Type::JSON | Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::BYTEA)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    use crate::postgres::layout::tests::standard_layout;

    #[test]
    fn each_parameter_is_written_as_its_number_in_the_order_the_values_are_passed() {
        let numbers: Vec<String> = ClaimParam::ALL.iter().map(ToString::to_string).collect();
        assert_eq!(numbers, ["$1", "$2", "$3", "$4", "$5", "$6", "$7"]);
        let sql = standard_layout().claim_sql();
        for param in ClaimParam::ALL {
            assert!(sql.contains(&param.to_string()), "{param:?} is used: {sql}");
        }
        assert!(!sql.contains("$8"), "no parameter beyond the declared ones: {sql}");
    }

    #[test]
    fn every_named_column_is_selected() {
        let sql = standard_layout().claim_sql();
        for name in [
            column::ID,
            column::EVENT_ID,
            column::KEY,
            column::PAYLOAD,
            column::HEADERS,
            column::CREATED_AT,
            column::TRACEPARENT,
            column::FIRST_UNPUBLISHED,
            column::SNAPSHOT_XMIN,
            column::SNAPSHOT_XMAX,
            column::IDS_GROW_WITH_TIME,
            column::TABLE_OID,
            column::TABLE_FILENODE,
            column::SEQUENCE_OID,
            column::SEQUENCE_LAST_VALUE,
        ] {
            assert!(sql.contains(&format!("AS {name}")), "{name}: {sql}");
        }
        assert!(sql.contains(&format!("c.{}0", column::TOPIC_PREFIX)), "{sql}");
    }

    /// Any bytes, valid UTF-8 text, and jsonb's wire format (a version byte before the text).
    fn column_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            any::<String>().prop_map(String::into_bytes),
            (any::<u8>(), any::<String>()).prop_map(|(version, json)| [vec![version], json.into_bytes()].concat()),
            Just(Vec::new()),
        ]
    }

    /// The payload column types the layout accepts.
    const PAYLOAD_TYPES: [Type; 6] = [Type::JSONB, Type::JSON, Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::BYTEA];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_payload_bytes_decode_whole_or_are_refused(
            ty in prop::sample::select(PAYLOAD_TYPES.to_vec()),
            raw in column_bytes(),
        ) {
            let decoded = RawPayload::from_sql(&ty, &raw).map(|p| p.0);
            if ty == Type::JSONB {
                match raw.split_first() {
                    Some((&JSONB_FORMAT_VERSION, json)) if std::str::from_utf8(json).is_ok() => {
                        prop_assert_eq!(decoded.ok(), Some(json.to_vec()))
                    }
                    Some((&JSONB_FORMAT_VERSION, _)) => prop_assert!(decoded.is_err(), "JSON that is not UTF-8 is refused"),
                    _ => prop_assert!(decoded.is_err(), "jsonb without its version byte is refused"),
                }
            } else if ty == Type::BYTEA {
                prop_assert_eq!(decoded.ok(), Some(raw), "stored bytes are sent as they are");
            } else if std::str::from_utf8(&raw).is_ok() {
                prop_assert_eq!(decoded.ok(), Some(raw));
            } else {
                prop_assert!(decoded.is_err(), "text and JSON that are not UTF-8 are refused");
            }
        }
    }
}
