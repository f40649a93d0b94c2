//! The shape of the outbox table: which columns play which role, what types they have, and the
//! SQL statements built from them.
//!
//! The layout is resolved once against the database catalog when the relay connects, so a
//! column that is missing or of the wrong type is reported by name before any row is touched,
//! rather than as a decoding error halfway through a batch. All SQL the relay runs against the
//! outbox table is written here; `outbox.rs` only executes it.

use std::fmt;

use crate::config::{ColumnPresence, ColumnRole, Config, MarkMode, OnPoison};
pub use crate::config::{Identifier, TopicTemplate};

/// `schema.table` or `table`, quoted.
fn qualified_sql(parts: &[Identifier]) -> String {
    parts.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(".")
}

/// Where a row's topic comes from.
#[derive(Debug, Clone)]
pub enum TopicSource {
    /// A column holding the topic name.
    Column(Identifier),
    /// A template over one or more columns.
    Template(TopicTemplate),
}

impl TopicSource {
    /// The columns to select for the topic.
    pub fn columns(&self) -> Vec<&Identifier> {
        match self {
            TopicSource::Column(c) => vec![c],
            TopicSource::Template(t) => t.columns(),
        }
    }

    /// The topic of a row, from the selected topic columns' values.
    pub fn topic(&self, values: &[Option<String>]) -> Result<String, String> {
        match self {
            TopicSource::Column(column) => match values.first() {
                Some(Some(topic)) => Ok(topic.clone()),
                _ => Err(format!("topic column \"{}\" is NULL", column.as_str())),
            },
            TopicSource::Template(template) => template.render(values),
        }
    }
}

/// How the payload column is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// json or jsonb: the record value is the JSON text.
    Json,
    /// text, varchar or char: the record value is the UTF-8 text.
    Text,
    /// bytea: the record value is the bytes as stored.
    Bytes,
}

/// The configured column roles, before the catalog has been consulted.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// The table, quoted and possibly schema-qualified.
    pub table: Vec<Identifier>,
    /// Row identity used when marking.
    pub id: Identifier,
    /// Claim order.
    pub order_by: Identifier,
    /// Stable event id sent as the `event_id` header.
    pub event_id: Identifier,
    /// Topic column or template.
    pub topic: TopicSource,
    /// Record key.
    pub key: Option<Identifier>,
    /// Record value.
    pub payload: Identifier,
    /// Record headers (a JSON object).
    pub headers: Option<Identifier>,
    /// Row creation time.
    pub created_at: Option<Identifier>,
    /// Publication time (`mark = "update"`).
    pub published_at: Option<Identifier>,
    /// Failed attempt counter.
    pub attempts: Option<Identifier>,
    /// Last failure text.
    pub last_error: Option<Identifier>,
    /// Id of the inserting transaction (commit-order safety).
    pub xact_id: Option<Identifier>,
    /// Time of the last failed attempt (per-row retry backoff).
    pub last_attempt_at: Option<Identifier>,
    /// Set when the relay gives up on a row.
    pub failed_at: Option<Identifier>,
    /// A W3C traceparent to send as a header.
    pub traceparent: Option<Identifier>,
    /// Update or delete on publish.
    pub mark: MarkMode,
    /// Whether a failed row holds back its key.
    pub on_poison: OnPoison,
    /// Number of shards keys are hashed into.
    pub shards: u32,
    /// Whether the order column must give a key's rows their insertion order.
    pub per_key_order: bool,
}

impl Mapping {
    /// Builds the mapping from a validated config.
    pub fn from_config(config: &Config) -> Result<Mapping, String> {
        use ColumnRole::*;
        let outbox = &config.outbox;
        let named = |role: ColumnRole| outbox.columns.name(role).map(Identifier::parse).transpose();
        let required = |role: ColumnRole| named(role)?.ok_or_else(|| format!("{} is empty", role.config_key()));
        let topic = match (&outbox.topic_template, outbox.columns.name(Topic)) {
            (Some(template), _) => TopicSource::Template(TopicTemplate::parse(template)?),
            (None, Some(column)) => TopicSource::Column(Identifier::parse(column)?),
            (None, None) => return Err("no topic column or template".to_owned()),
        };
        let id = required(Id)?;
        Ok(Mapping {
            table: Identifier::parse_qualified(&outbox.table)?,
            order_by: named(OrderBy)?.unwrap_or_else(|| id.clone()),
            id,
            event_id: required(EventId)?,
            topic,
            key: named(Key)?,
            payload: required(Payload)?,
            headers: named(Headers)?,
            created_at: named(CreatedAt)?,
            published_at: if outbox.mark == MarkMode::Update { named(PublishedAt)? } else { None },
            attempts: named(Attempts)?,
            last_error: named(LastError)?,
            xact_id: named(XactId)?,
            last_attempt_at: named(LastAttemptAt)?,
            failed_at: named(FailedAt)?,
            traceparent: named(Traceparent)?,
            mark: outbox.mark,
            on_poison: config.relay.on_poison,
            shards: config.relay.shards,
            per_key_order: config.outbox.per_key_order,
        })
    }

    /// The column that plays `role`, if the table has one; `None` for the topic when a
    /// template builds it (see [`Mapping::topic`]).
    pub fn column(&self, role: ColumnRole) -> Option<&Identifier> {
        match role {
            ColumnRole::Id => Some(&self.id),
            ColumnRole::OrderBy => Some(&self.order_by),
            ColumnRole::EventId => Some(&self.event_id),
            ColumnRole::Topic => match &self.topic {
                TopicSource::Column(column) => Some(column),
                TopicSource::Template(_) => None,
            },
            ColumnRole::Key => self.key.as_ref(),
            ColumnRole::Payload => Some(&self.payload),
            ColumnRole::Headers => self.headers.as_ref(),
            ColumnRole::CreatedAt => self.created_at.as_ref(),
            ColumnRole::PublishedAt => self.published_at.as_ref(),
            ColumnRole::Attempts => self.attempts.as_ref(),
            ColumnRole::LastError => self.last_error.as_ref(),
            ColumnRole::XactId => self.xact_id.as_ref(),
            ColumnRole::LastAttemptAt => self.last_attempt_at.as_ref(),
            ColumnRole::FailedAt => self.failed_at.as_ref(),
            ColumnRole::Traceparent => self.traceparent.as_ref(),
        }
    }

    /// The table name as written in SQL.
    pub fn table_sql(&self) -> String {
        qualified_sql(&self.table)
    }

    /// The table name for messages (unquoted, as configured).
    pub fn table_name(&self) -> String {
        self.table.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(".")
    }

    /// Every column the relay touches, with its role and config key, for the catalog check:
    /// first the columns every mapping has, then the others in declaration order (the order
    /// decides which missing column is reported first).
    fn roles(&self) -> Vec<MappedColumn<'_>> {
        let always =
            |role: &ColumnRole| matches!(role.presence(), ColumnPresence::Required | ColumnPresence::SameAs(_));
        let first = ColumnRole::ALL.into_iter().filter(always);
        let then = ColumnRole::ALL.into_iter().filter(|role| !always(role));
        let mut roles = Vec::new();
        for role in first.chain(then) {
            if role == ColumnRole::Topic {
                let key = match self.topic {
                    TopicSource::Column(_) => role.config_key(),
                    TopicSource::Template(_) => "outbox.topic_template".to_owned(),
                };
                roles.extend(self.topic.columns().into_iter().map(|column| MappedColumn {
                    role,
                    key: key.clone(),
                    column,
                }));
            } else if let Some(column) = self.column(role) {
                roles.push(MappedColumn { role, key: role.config_key(), column });
            }
        }
        roles
    }

    /// The privileges `outbox-relay run` needs on the table, each with the reason, so that a
    /// missing grant is reported before any row is published rather than as a failed mark
    /// after. `deletes_for_retention`: retention is on.
    pub fn privileges_needed(&self, deletes_for_retention: bool) -> Vec<Privilege> {
        let mut needed: Vec<Privilege> = self
            .roles()
            .into_iter()
            .map(|mapped| Privilege { privilege: "SELECT", column: Some(mapped.column.clone()), reason: mapped.key })
            .collect();
        if let Some(published_at) = &self.published_at {
            needed.push(Privilege {
                privilege: "UPDATE",
                column: Some(published_at.clone()),
                reason: "marking rows published".to_owned(),
            });
        }
        // Failed attempts are recorded only when there is a counter or an error column to record.
        if self.attempts.is_some() || self.last_error.is_some() {
            for column in
                [&self.attempts, &self.last_error, &self.last_attempt_at, &self.failed_at].into_iter().flatten()
            {
                needed.push(Privilege {
                    privilege: "UPDATE",
                    column: Some(column.clone()),
                    reason: "recording failed attempts".to_owned(),
                });
            }
        }
        if self.mark == MarkMode::Delete {
            needed.push(Privilege { privilege: "DELETE", column: None, reason: "outbox.mark = \"delete\"".to_owned() });
        }
        if deletes_for_retention && self.published_at.is_some() {
            needed.push(Privilege {
                privilege: "DELETE",
                column: None,
                reason: "retention.delete_published_after".to_owned(),
            });
        }
        // A column can play several roles (the id is often the order too); ask about it once.
        let mut seen = std::collections::HashSet::new();
        needed.retain(|p| seen.insert((p.privilege, p.column.clone())));
        needed
    }

    /// Checks the mapping against the table's columns (name and `format_type` of each) and
    /// returns the layout the statements are built from.
    pub fn resolve(&self, table_columns: &[(String, String)]) -> Result<Layout, LayoutError> {
        let type_of = |column: &Identifier| -> Option<String> {
            table_columns.iter().find(|(name, _)| name == column.as_str()).map(|(_, ty)| ty.clone())
        };
        for mapped in self.roles() {
            if type_of(mapped.column).is_none() {
                let (table, name, key) = (self.table_name(), mapped.column.as_str(), &mapped.key);
                let problem = if mapped.role.presence() == ColumnPresence::Optional {
                    format!(
                        "table {table} has no column \"{name}\"; name the column that plays this role, or set {key} = \"\" if the table has none"
                    )
                } else {
                    format!("table {table} has no column \"{name}\"")
                };
                return Err(LayoutError { key: mapped.key, problem });
            }
        }
        // Every mapped column exists from here on.
        let type_of = |column: &Identifier| type_of(column).unwrap_or_default();
        for role in ColumnRole::ALL {
            let (Some(types), Some(column)) = (role.types(), self.column(role)) else { continue };
            let ty = type_of(column);
            let base = ty.split('(').next().unwrap_or(&ty).trim();
            if !types.allowed.contains(&base) {
                return Err(LayoutError {
                    key: role.config_key(),
                    problem: format!("column \"{}\" has type {ty}; expected {}", column.as_str(), types.described),
                });
            }
        }
        let payload = match type_of(&self.payload).as_str() {
            "jsonb" | "json" => PayloadKind::Json,
            "bytea" => PayloadKind::Bytes,
            _ => PayloadKind::Text,
        };
        Ok(Layout {
            mapping: self.clone(),
            payload,
            id_type: type_of(&self.id),
            order_type: type_of(&self.order_by),
            last_error_type: self.last_error.as_ref().map(type_of),
        })
    }
}

/// A column of the mapping with the role it plays and the key that configures it.
struct MappedColumn<'a> {
    role: ColumnRole,
    /// `outbox.columns.<key>`, or `outbox.topic_template` for a template's columns.
    key: String,
    column: &'a Identifier,
}

/// A privilege the relay's role needs on the outbox table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Privilege {
    /// `SELECT`, `UPDATE` or `DELETE`.
    pub privilege: &'static str,
    /// The column it is needed on; `None` for the whole table.
    pub column: Option<Identifier>,
    /// What needs it: a config key or what the relay does with it.
    pub reason: String,
}

impl fmt::Display for Privilege {
    /// `UPDATE on column "failed_at" (recording failed attempts)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.column {
            Some(column) => write!(f, "{} on column \"{}\" ({})", self.privilege, column.as_str(), self.reason),
            None => write!(f, "{} ({})", self.privilege, self.reason),
        }
    }
}

/// A column that does not fit its configured role.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct LayoutError {
    /// The config key of the column.
    pub key: String,
    /// What does not fit.
    pub problem: String,
}

/// A mapping checked against the live table: it knows the column types and writes the SQL.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The configured roles.
    pub mapping: Mapping,
    /// How to read the payload column.
    pub payload: PayloadKind,
    /// `format_type` of the id column, used to cast ids back when marking.
    pub id_type: String,
    /// `format_type` of the order column, to warn when it cannot order anything.
    pub order_type: String,
    /// `format_type` of the last-error column (`text`, `character varying(255)`): errors are
    /// cast to it explicitly, which cuts a long error to the column's length instead of
    /// failing the statement that records it.
    pub last_error_type: Option<String>,
}

/// Position of each selected column in the claim statement's result.
pub mod claim_columns {
    /// Row id as text.
    pub const ID: usize = 0;
    /// Event id as text.
    pub const EVENT_ID: usize = 1;
    /// Key as text, or NULL.
    pub const KEY: usize = 2;
    /// Payload in its own type.
    pub const PAYLOAD: usize = 3;
    /// Headers as JSON text, or NULL.
    pub const HEADERS: usize = 4;
    /// Creation time as seconds since the epoch (`float8`), or NULL.
    pub const CREATED_AT: usize = 5;
    /// The traceparent column as text, or NULL.
    pub const TRACEPARENT: usize = 6;
    /// Where the claim found its first live row (`int8`, see [`crate::relay::claim_floor`]), or NULL;
    /// the same on every row.
    pub const FIRST_UNPUBLISHED: usize = 7;
    /// The claim snapshot's `xmin` as text; the same on every row.
    pub const SNAPSHOT_XMIN: usize = 8;
    /// The claim snapshot's `xmax` as text; the same on every row.
    pub const SNAPSHOT_XMAX: usize = 9;
    /// Whether the order column is still fed by a sequence whose ids grow with time (`bool`,
    /// see [`super::OrderSequence::grows_with_time`]); the same on every row.
    pub const IDS_GROW_WITH_TIME: usize = 10;
    /// The OID the table's name resolves to while the claim runs (`int8`, NULL if none); the
    /// same on every row. See [`crate::relay::claim_floor::TableIdentity`].
    pub const TABLE_OID: usize = 11;
    /// The table's storage file (`int8`; NULL for a partitioned table): a `TRUNCATE` gives it
    /// a new one. The same on every row.
    pub const TABLE_FILENODE: usize = 12;
    /// The OID of the order column's sequence (`int8`), or NULL.
    pub const SEQUENCE_OID: usize = 13;
    /// The sequence's last value (`int8`), NULL when it has handed out none since it was
    /// created or restarted, or when the relay may not read it.
    pub const SEQUENCE_LAST_VALUE: usize = 14;
    /// First topic column; template columns follow.
    pub const TOPIC: usize = 15;
}

/// What the catalog says about the claim order column: whether it can give a key's rows their
/// insertion order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderColumn {
    /// Declared `NOT NULL`.
    pub not_null: bool,
    /// Covered by a unique index of its own (not partial, no other key column).
    pub unique: bool,
    /// The sequence feeding it (identity or serial), if any.
    pub sequence: Option<OrderSequence>,
}

/// What the catalog says of the table beyond its column types, for `outbox-relay check`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableCatalog {
    /// Every column, in table order.
    pub columns: Vec<CatalogColumn>,
    /// Every index.
    pub indexes: Vec<TableIndex>,
    /// Enabled triggers whose function sends a notification.
    pub notify_triggers: Vec<String>,
    /// The role the configured login acts as.
    pub role: String,
}

/// One column of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogColumn {
    /// The name as stored.
    pub name: String,
    /// The name as PostgreSQL writes it in expressions, quoted only where needed.
    pub quoted: String,
    /// `format_type`.
    pub data_type: String,
    /// The default expression, if any.
    pub default: Option<String>,
}

/// One index of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableIndex {
    /// Its name.
    pub name: String,
    /// A unique index.
    pub unique: bool,
    /// False for what a failed `CREATE INDEX CONCURRENTLY` leaves behind: no query uses it.
    pub valid: bool,
    /// Key columns in order; `None` for an expression.
    pub columns: Vec<Option<String>>,
    /// The predicate of a partial index, as PostgreSQL prints it.
    pub predicate: Option<String>,
}

/// The sequence feeding the order column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderSequence {
    /// Its name, schema-qualified where needed.
    pub name: String,
    /// `INCREMENT BY`.
    pub increment: i64,
    /// `CACHE`: how many ids a session takes at once.
    pub cache: i64,
    /// `CYCLE`: whether it wraps around.
    pub cycles: bool,
}

impl OrderSequence {
    /// Whether it hands out ever larger ids in the order they are taken, so that a row inserted
    /// later gets a larger id. A cache breaks that: each session holds a block of ids, and a
    /// session can take a lower id from its block after another session took a higher one.
    pub fn grows_with_time(&self) -> bool {
        self.increment > 0 && self.cache == 1 && !self.cycles
    }
}

impl Layout {
    /// Checks that the order column gives a key's rows a total order that follows insertion:
    /// an integer column, never NULL, whose values are unique and, when a sequence feeds it,
    /// grow in the order they are taken. Without that, rows that tie or come out of a cache
    /// would be published in an order no one wrote, so the relay refuses the table unless
    /// `outbox.per_key_order = false`.
    pub fn check_per_key_order(&self, column: &OrderColumn) -> Result<(), LayoutError> {
        let m = &self.mapping;
        let (table, name) = (m.table_sql(), m.order_by.as_str());
        let opt_out = "or set outbox.per_key_order = false if no consumer needs a key's events in order";
        let refuse = |problem: String| LayoutError { key: "outbox.columns.order_by".to_owned(), problem };
        if !self.orders_by_integer() {
            return Err(refuse(format!(
                "column \"{name}\" is {ty}, which cannot keep a key's rows in the order they were inserted \
                 (random uuids order nothing, UUIDv7 is random within its millisecond, timestamps tie); \
                 add a column fed by a sequence and name it in outbox.columns.order_by \
                 (ALTER TABLE {table} ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE, \
                 which fills existing rows), {opt_out}",
                ty = self.order_type
            )));
        }
        if !column.not_null {
            return Err(refuse(format!(
                "column \"{name}\" may be NULL, and a row without a value has no place in its key's order; \
                 ALTER TABLE {table} ALTER COLUMN {col} SET NOT NULL, {opt_out}",
                col = m.order_by
            )));
        }
        match &column.sequence {
            Some(sequence) if !sequence.grows_with_time() => {
                let why = if sequence.increment <= 0 {
                    "counts down".to_owned()
                } else if sequence.cycles {
                    "wraps around (CYCLE)".to_owned()
                } else {
                    format!(
                        "has CACHE {}: each session takes a block of ids, so a row inserted later can get a lower id",
                        sequence.cache
                    )
                };
                Err(refuse(format!(
                    "the sequence {seq} feeding column \"{name}\" {why}; ALTER SEQUENCE {seq} CACHE 1 NO CYCLE \
                     (an identity column: ALTER TABLE {table} ALTER COLUMN {col} SET CACHE 1), {opt_out}",
                    seq = sequence.name,
                    col = m.order_by
                )))
            }
            None if !column.unique => Err(refuse(format!(
                "column \"{name}\" is neither fed by a sequence nor unique, so rows can tie and a key's rows \
                 would have no order between them; use an identity column, or CREATE UNIQUE INDEX ON {table} ({col}) \
                 if the application assigns ever larger values, {opt_out}",
                col = m.order_by
            ))),
            _ => Ok(()),
        }
    }

    /// Whether the claim order column is an integer, so that a claim can start at a floor
    /// ([`crate::relay::claim_floor`]); whether its values also grow with time is the sequence's
    /// business, checked at connect.
    pub fn orders_by_integer(&self) -> bool {
        matches!(self.order_type.as_str(), "bigint" | "integer" | "smallint")
    }

    fn unpublished_filter(&self) -> String {
        match &self.mapping.published_at {
            Some(published_at) => format!("WHERE {published_at} IS NULL"),
            None => String::new(),
        }
    }

    /// The topic column, or the template's columns, as text, for a `SELECT` list.
    fn topic_select(&self) -> String {
        let columns: Vec<String> = self.mapping.topic.columns().iter().map(|c| format!("o.{c}::text")).collect();
        columns.join(", ")
    }

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
    /// the last failed attempt has passed (`$3` first backoff, `$4` longest, in seconds).
    fn due_sql(&self, a: &str) -> Option<String> {
        let m = &self.mapping;
        let last = m.last_attempt_at.as_ref()?;
        let backoff = match &m.attempts {
            Some(attempts) => format!("least($3 * power(2, greatest({a}.{attempts} - 1, 0)), $4)"),
            None => "$3".to_owned(),
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
        if let (Some(failed_at), OnPoison::ParkKey) = (&m.failed_at, m.on_poison) {
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
        Some(format!(
            "SELECT 1 FROM {table} AS e WHERE e.{key} = {a}.{key} AND e.{order} < {a}.{order}{unpublished} \
             AND e.{attempts} > 0 AND ({holds})",
            table = m.table_sql(),
            order = m.order_by,
            holds = holds.join(" OR "),
        ))
    }

    /// The next rows to publish, in claim order. Parameters: `$1` the batch size, `$2` the
    /// shards this relay owns (`int4[]`), `$3`/`$4` the retry backoff bounds in seconds, `$5`
    /// ids (as text) to leave out: the batch in flight, when the next one is claimed ahead,
    /// and records set aside while their partition stalls; `$6` where to start in claim order
    /// (`int8`, NULL for the beginning; see [`crate::relay::claim_floor`]); `$7` keys (as text) none of
    /// whose rows may be claimed: those held behind a record set aside.
    ///
    /// It looks at a window of the next `$1` unpublished rows of the shards (skipping rows that
    /// failed for good, rows waiting out a retry backoff and rows held back by such an earlier
    /// row of their key), and returns those that are ready: their transaction, and every
    /// transaction that started writing before it, has finished; and no earlier row of their key
    /// in the window is still waiting for that. So a lower id that commits late is never overtaken within its
    /// key, and the work per claim stays bounded by the batch size, whatever the backlog.
    ///
    /// Each row also carries what the claim floor learns from the claim: the first live row at
    /// or after `$6` (in flight, waiting out a backoff or claimable) and the snapshot's bounds,
    /// each an uncorrelated subquery, so computed once per claim rather than per row.
    ///
    /// Every column is qualified: the selected `id::text` is itself named `id`, and an
    /// unqualified `ORDER BY id` would sort by that text ("10" before "9").
    pub fn claim_sql(&self) -> String {
        let m = &self.mapping;
        let live = self.live_row_filters("o");
        let mut filters = live.clone();
        if let Some(due) = self.due_sql("o") {
            filters.push(due);
        }
        filters.push(format!("NOT (o.{id} = ANY($5::text[]::{ty}[]))", id = m.id, ty = self.id_type));
        // Keys held behind a record whose partition stalled (see `crate::relay::stalled`).
        match &m.key {
            Some(key) => filters.push(format!("(o.{key} IS NULL OR NOT (o.{key}::text = ANY($7::text[])))")),
            None => filters.push("$7::text[] IS NOT NULL".to_owned()),
        }
        if m.last_attempt_at.is_none() {
            // Keep $3 and $4 typed when no clause uses them.
            filters.push("$3::float8 IS NOT NULL AND $4::float8 IS NOT NULL".to_owned());
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
            m.topic.columns().iter().enumerate().map(|(i, c)| format!("o.{c}::text AS t{i}")).collect();
        let topic_out: Vec<String> = (0..topic.len()).map(|i| format!("c.t{i}")).collect();
        format!(
            "WITH window_rows AS (\
               SELECT o.{order} AS r_order, o.{id}::text AS r_id, o.{event_id}::text AS r_event_id, {key} AS r_key, \
                      o.{payload} AS r_payload, {headers} AS r_headers, {created_at} AS r_created_at, \
                      {traceparent} AS r_traceparent, {topic}, {ready} AS r_ready, {retrying} AS r_retrying \
               FROM {table} AS o WHERE {filters} ORDER BY o.{order} LIMIT $1), \
             claimed AS (SELECT * FROM window_rows AS c WHERE c.r_ready AND NOT EXISTS (\
               SELECT 1 FROM window_rows AS b WHERE (NOT b.r_ready OR b.r_retrying) AND b.r_key = c.r_key \
                 AND b.r_order < c.r_order)) \
             SELECT c.r_id, c.r_event_id, c.r_key, c.r_payload, c.r_headers, c.r_created_at, c.r_traceparent, \
                    v.first_unpublished, v.xmin, v.xmax, v.ids_grow, {identity}, {topic_out} \
             FROM (SELECT {first_unpublished} AS first_unpublished, \
                          pg_snapshot_xmin(pg_current_snapshot())::text AS xmin, \
                          pg_snapshot_xmax(pg_current_snapshot())::text AS xmax, {ids_grow} AS ids_grow) AS v \
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
            topic = topic.join(", "),
            table = m.table_sql(),
            filters = filters.join(" AND "),
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
            "to_regclass({table})::oid::int8 AS table_oid, pg_relation_filenode(to_regclass({table}))::int8 AS filenode, \
             {sequence_oid} AS sequence_oid, {last_value} AS sequence_last_value"
        )
    }

    /// The error of failure `f`, cut to the last-error column's length if it has one.
    fn error_value(&self, f: &str) -> String {
        match &self.last_error_type {
            Some(ty) => format!("{f}.error::{ty}"),
            None => format!("{f}.error"),
        }
    }

    /// The condition that row `t` is the one claimed as `f.id`, `f.event_id` (see
    /// [`crate::kafka::record::RowRef`]); a NULL event id matches by id alone.
    fn is_the_claimed_row(&self, t: &str, f: &str) -> String {
        let m = &self.mapping;
        format!(
            "{t}.{id} = {f}.id::{ty} AND ({f}.event_id IS NULL OR {t}.{event_id}::text = {f}.event_id)",
            id = m.id,
            ty = self.id_type,
            event_id = m.event_id,
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
    /// unpublished, not failed for good, of this relay's shards (`$2`), at or after the claim's
    /// start (`$6`), and not held back by an earlier row of its key. A row waiting out its retry
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

    /// The conditions of a row `a` of this relay's shards (`$2`) that is not published yet, at
    /// or after the claim's start (`$6`): claimable, in flight, waiting out a backoff, failed
    /// for good, or held back by such a row. The claim floor never rises past the first of
    /// them, so that whatever makes one claimable again (`outbox-relay retry`, a backoff ending)
    /// finds it at or above the floor, with nothing of its key ahead of it.
    fn unpublished_row_filters(&self, a: &str) -> Vec<String> {
        let m = &self.mapping;
        let mut filters = Vec::new();
        if let Some(published_at) = &m.published_at {
            filters.push(format!("{a}.{published_at} IS NULL"));
        }
        filters.push(format!("{} = ANY($2::int4[])", self.shard_sql(a)));
        if self.orders_by_integer() {
            // With the parameter known at planning (plan_cache_mode = force_custom_plan), this
            // folds to an index bound, or to nothing for NULL.
            filters.push(format!("($6::int8 IS NULL OR {a}.{order} >= $6::int8)", order = m.order_by));
        } else {
            filters.push("$6::int8 IS NULL".to_owned());
        }
        filters
    }

    /// Marks the rows the broker acknowledged: `$1` their ids, `$2` their event ids, as text.
    pub fn mark_published_sql(&self) -> String {
        let m = &self.mapping;
        let claimed = "unnest($1::text[], $2::text[]) AS m(id, event_id)";
        let is_claimed = self.is_the_claimed_row("t", "m");
        // A published row keeps no error from an earlier attempt: the update writes a whole new
        // row version anyway, so clearing it costs nothing.
        let clear_error = match &m.last_error {
            Some(last_error) => format!(", {last_error} = NULL"),
            None => String::new(),
        };
        match &m.published_at {
            Some(published_at) => format!(
                "UPDATE {table} AS t SET {published_at} = now(){clear_error} FROM {claimed} \
                 WHERE {is_claimed} AND t.{published_at} IS NULL",
                table = m.table_sql()
            ),
            None => format!("DELETE FROM {table} AS t USING {claimed} WHERE {is_claimed}", table = m.table_sql()),
        }
    }

    /// Records attempts that failed because of the row itself: `$1` ids as text, `$2` the error
    /// of each, `$3` the attempt limit, `$4` their event ids (see [`crate::kafka::record::RowRef`]).
    /// Counts the attempt, starts the backoff, and gives up (sets the failed-at column) at the
    /// limit. Returns the ids of the rows given up on.
    /// `None` when the table has no attempts or last-error column.
    pub fn record_row_failures_sql(&self) -> Option<String> {
        let m = &self.mapping;
        let mut sets = Vec::new();
        if let Some(attempts) = &m.attempts {
            sets.push(format!("{attempts} = t.{attempts} + 1"));
        }
        if let Some(last_error) = &m.last_error {
            sets.push(format!("{last_error} = {}", self.error_value("f")));
        }
        if sets.is_empty() {
            return None;
        }
        if let Some(last_attempt_at) = &m.last_attempt_at {
            sets.push(format!("{last_attempt_at} = now()"));
        }
        let given_up = match (&m.failed_at, &m.attempts) {
            (Some(failed_at), Some(attempts)) => {
                sets.push(format!("{failed_at} = CASE WHEN t.{attempts} + 1 >= $3 THEN now() END"));
                format!("t.{failed_at} IS NOT NULL")
            }
            _ => "$3::int4 IS NULL".to_owned(),
        };
        Some(format!(
            "UPDATE {table} AS t SET {sets} FROM unnest($1::text[], $2::text[], $4::text[]) AS f(id, error, event_id) \
             WHERE {is_claimed} RETURNING t.{id}::text, {given_up}",
            table = m.table_sql(),
            sets = sets.join(", "),
            id = m.id,
            is_claimed = self.is_the_claimed_row("t", "f"),
        ))
    }

    /// Records attempts that failed for reasons outside the row (an outage): `$1` ids, `$2`
    /// errors, `$3` event ids. Only the error is kept; the attempt does not count toward giving
    /// up.
    pub fn record_outage_failures_sql(&self) -> Option<String> {
        let m = &self.mapping;
        let last_error = m.last_error.as_ref()?;
        Some(format!(
            "UPDATE {table} AS t SET {last_error} = {error} \
             FROM unnest($1::text[], $2::text[], $3::text[]) AS f(id, error, event_id) WHERE {is_claimed}",
            error = self.error_value("f"),
            table = m.table_sql(),
            is_claimed = self.is_the_claimed_row("t", "f"),
        ))
    }

    /// Pending rows (not failed), age in seconds of the oldest of them (NULL without a
    /// created-at column or pending rows), failed rows, pending rows held back by the commit
    /// horizon, the age in seconds of the oldest of those (NULL as for the pending age), and
    /// failing rows (not failed for good, with failed attempts of their own).
    pub fn pending_stats_sql(&self) -> String {
        let m = &self.mapping;
        let failed = match &m.failed_at {
            Some(f) => format!("{f} IS NOT NULL"),
            None => "false".to_owned(),
        };
        let age = match &m.created_at {
            Some(created_at) => {
                format!("extract(epoch FROM now() - min({created_at}) FILTER (WHERE NOT ({failed})))::float8")
            }
            None => "NULL::float8".to_owned(),
        };
        let is_held = match &m.xact_id {
            Some(h) => format!("{h} >= pg_snapshot_xmin(pg_current_snapshot())"),
            None => "false".to_owned(),
        };
        let held_age = match &m.created_at {
            Some(created_at) => {
                format!("extract(epoch FROM now() - min({created_at}) FILTER (WHERE {is_held}))::float8")
            }
            None => "NULL::float8".to_owned(),
        };
        let failing = match &m.attempts {
            Some(attempts) => format!("NOT ({failed}) AND {attempts} > 0"),
            None => "false".to_owned(),
        };
        format!(
            "SELECT count(*) FILTER (WHERE NOT ({failed})), {age}, count(*) FILTER (WHERE {failed}), \
             count(*) FILTER (WHERE {is_held}), {held_age}, count(*) FILTER (WHERE {failing}) FROM {table} {filter}",
            table = m.table_sql(),
            filter = self.unpublished_filter()
        )
    }

    /// Deletes up to `$2` rows published more than `$1` seconds ago, oldest ids first, skipping
    /// rows another session has locked. `None` without a published-at column.
    pub fn retention_delete_sql(&self) -> Option<String> {
        let m = &self.mapping;
        let published_at = m.published_at.as_ref()?;
        Some(format!(
            "DELETE FROM {table} WHERE {id} IN (SELECT {id} FROM {table} \
             WHERE {published_at} IS NOT NULL AND {published_at} < now() - $1::float8 * interval '1 second' \
             ORDER BY {id} LIMIT $2 FOR UPDATE SKIP LOCKED)",
            table = m.table_sql(),
            id = m.id,
        ))
    }

    /// Re-queues failed rows (given up on, or waiting out a retry backoff): clears failed-at,
    /// attempts and last attempt. `$1` ids (text[], or NULL), `$2` key (or NULL); with both
    /// NULL, every failed row. Returns the ids re-queued.
    pub fn retry_sql(&self) -> Option<String> {
        let m = &self.mapping;
        let failed_at = m.failed_at.as_ref()?;
        let mut sets = vec![format!("{failed_at} = NULL")];
        if let Some(attempts) = &m.attempts {
            sets.push(format!("{attempts} = 0"));
        }
        if let Some(last_attempt_at) = &m.last_attempt_at {
            sets.push(format!("{last_attempt_at} = NULL"));
        }
        let key_filter = match &m.key {
            Some(key) => format!("($2::text IS NULL OR {key}::text = $2::text)"),
            None => "$2::text IS NULL".to_owned(),
        };
        // A row waiting out its retry backoff is re-queued too: the operator who fixed the
        // cause need not wait for the backoff (up to `relay.retry_backoff_max`).
        let has_failed = match &m.attempts {
            Some(attempts) => format!("({failed_at} IS NOT NULL OR {attempts} > 0)"),
            None => format!("{failed_at} IS NOT NULL"),
        };
        Some(format!(
            "UPDATE {table} SET {sets} WHERE {has_failed} {unpublished} \
             AND ($1::text[] IS NULL OR {id} = ANY($1::text[]::{ty}[])) AND {key_filter} RETURNING {id}::text",
            table = m.table_sql(),
            sets = sets.join(", "),
            unpublished = match &m.published_at {
                Some(p) => format!("AND {p} IS NULL"),
                None => String::new(),
            },
            id = m.id,
            ty = self.id_type,
        ))
    }

    /// The state of the rows whose ids (text, `$1`) are given: id, published?, failed for
    /// good?, failed attempts. Ids that match no row are absent.
    pub fn row_states_sql(&self) -> String {
        let m = &self.mapping;
        format!(
            "SELECT o.{id}::text, {published}, {failed}, {attempts} FROM {table} AS o \
             WHERE o.{id} = ANY($1::text[]::{ty}[])",
            published = is_set(&m.published_at),
            failed = is_set(&m.failed_at),
            attempts = self.attempts_sql(),
            id = m.id,
            table = m.table_sql(),
            ty = self.id_type,
        )
    }

    /// Row `o`'s failed attempts as `int8` (0 without an attempts column).
    fn attempts_sql(&self) -> String {
        match &self.mapping.attempts {
            Some(c) => format!("o.{c}::int8"),
            None => "0::int8".to_owned(),
        }
    }

    /// Failed rows grouped by error: error, count, first ids (text[]).
    pub fn failed_by_error_sql(&self) -> Option<String> {
        let failed_at = self.mapping.failed_at.as_ref()?;
        Some(self.by_error_sql(&format!("{failed_at} IS NOT NULL")))
    }

    /// Failing rows (failed attempts of their own, not given up on yet) grouped by error, as
    /// [`Layout::failed_by_error_sql`].
    pub fn failing_by_error_sql(&self) -> Option<String> {
        let m = &self.mapping;
        let attempts = m.attempts.as_ref()?;
        let not_failed = m.failed_at.as_ref().map(|f| format!(" AND {f} IS NULL")).unwrap_or_default();
        Some(self.by_error_sql(&format!("{attempts} > 0{not_failed}")))
    }

    /// Unpublished rows matching `condition` grouped by their last error.
    fn by_error_sql(&self, condition: &str) -> String {
        let m = &self.mapping;
        let error = match &m.last_error {
            Some(e) => format!("coalesce({e}, '(no error recorded)')"),
            None => "'(no error column)'".to_owned(),
        };
        format!(
            "SELECT {error} AS error, count(*), (array_agg({id}::text ORDER BY {order}))[1:10] \
             FROM {table} WHERE {condition} {unpublished} GROUP BY 1 ORDER BY 2 DESC",
            id = m.id,
            order = m.order_by,
            table = m.table_sql(),
            unpublished = match &m.published_at {
                Some(p) => format!("AND {p} IS NULL"),
                None => String::new(),
            },
        )
    }

    /// Keys held back by a failed row (`on_poison = "park_key"`): key, the failed row's id,
    /// and how many later rows wait behind it.
    pub fn parked_keys_sql(&self) -> Option<String> {
        let m = &self.mapping;
        let (key, failed_at) = (m.key.as_ref()?, m.failed_at.as_ref()?);
        if m.on_poison != OnPoison::ParkKey {
            return None;
        }
        let unpublished = |a: &str| match &m.published_at {
            Some(p) => format!("AND {a}.{p} IS NULL"),
            None => String::new(),
        };
        // A key whose failed row has no later row waiting holds nothing back: it is listed with
        // the failed rows, not as parked. The failed row named is the key's first in claim order.
        Some(format!(
            "SELECT key, failed_id, waiting FROM (\
               SELECT f.{key}::text AS key, (array_agg(f.{id}::text ORDER BY f.{order}))[1] AS failed_id, \
                      (SELECT count(*) FROM {table} AS w WHERE w.{key} = f.{key} {wu} AND w.{failed_at} IS NULL \
                         AND w.{order} > min(f.{order})) AS waiting \
               FROM {table} AS f WHERE f.{failed_at} IS NOT NULL {fu} AND f.{key} IS NOT NULL \
               GROUP BY f.{key}) AS p \
             WHERE waiting > 0 ORDER BY waiting DESC LIMIT 100",
            id = m.id,
            order = m.order_by,
            table = m.table_sql(),
            wu = unpublished("w"),
            fu = unpublished("f"),
        ))
    }

    /// Rows for `audit`, in claim order: id, event id, published?, attempts, last error, then
    /// the topic columns (as in [`claim_columns`]'s topic position, here from index 5).
    /// Parameters, each NULL for "no bound": `$1`/`$2` the id range (text, inclusive), `$3`/`$4`
    /// the created-at range (text timestamps, `[since, until)`), `$5` the topic when it comes
    /// from a column (a template's topic is checked row by row instead).
    pub fn audit_rows_sql(&self) -> String {
        let m = &self.mapping;
        let (published, attempts) = (is_set(&m.published_at), self.attempts_sql());
        let last_error = text_or_null(&m.last_error);
        let mut filters = vec![
            format!("($1::text IS NULL OR o.{id} >= $1::text::{ty})", id = m.id, ty = self.id_type),
            format!("($2::text IS NULL OR o.{id} <= $2::text::{ty})", id = m.id, ty = self.id_type),
        ];
        if let Some(created_at) = &m.created_at {
            filters.push(format!("($3::text IS NULL OR o.{created_at} >= $3::text::timestamptz)"));
            filters.push(format!("($4::text IS NULL OR o.{created_at} < $4::text::timestamptz)"));
        } else {
            // Keep $3 and $4 typed; the caller refuses a time range without a created-at column.
            filters.push("($3::text IS NULL AND $4::text IS NULL)".to_owned());
        }
        match &m.topic {
            TopicSource::Column(c) => filters.push(format!("($5::text IS NULL OR o.{c} = $5::text)")),
            TopicSource::Template(_) => filters.push("($5::text IS NULL OR true)".to_owned()),
        }
        format!(
            "SELECT o.{id}::text, o.{event_id}::text, {published}, {attempts}, {last_error}, {failed}, {topic} \
             FROM {table} AS o WHERE {filters} ORDER BY o.{order}",
            id = m.id,
            event_id = m.event_id,
            failed = is_set(&m.failed_at),
            topic = self.topic_select(),
            table = m.table_sql(),
            filters = filters.join(" AND "),
            order = m.order_by,
        )
    }
}

/// `o.column IS NOT NULL`, or `false` for a column the table does not have.
fn is_set(column: &Option<Identifier>) -> String {
    match column {
        Some(c) => format!("o.{c} IS NOT NULL"),
        None => "false".to_owned(),
    }
}

/// `text` as a SQL string literal.
fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `o.column::text`, or a typed NULL for a column the table does not have.
fn text_or_null(column: &Option<Identifier>) -> String {
    match column {
        Some(c) => format!("o.{c}::text"),
        None => "NULL::text".to_owned(),
    }
}

/// Position of the first topic column in [`Layout::audit_rows_sql`]'s result.
pub const AUDIT_TOPIC_COLUMN: usize = 6;

/// Columns of a table with their `format_type`; `$1` is the quoted table name.
pub const TABLE_COLUMNS_SQL: &str = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
     FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped";

/// What `outbox-relay check` reads of table `$1` (quoted name), one row per column: name,
/// name as PostgreSQL quotes it in expressions (`quote_ident`, to read index predicates), type,
/// and default expression (NULL without one).
pub const CATALOG_COLUMNS_SQL: &str = "SELECT a.attname::text, quote_ident(a.attname), \
     format_type(a.atttypid, a.atttypmod), pg_get_expr(d.adbin, d.adrelid) \
     FROM pg_attribute AS a LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";

/// The indexes of table `$1` (quoted name): name, unique, valid (a failed `CREATE INDEX
/// CONCURRENTLY` leaves an invalid one), key columns in order (NULL for an expression), and the
/// predicate of a partial index as PostgreSQL prints it (NULL for none).
pub const CATALOG_INDEXES_SQL: &str = "SELECT c.relname::text, i.indisunique, i.indisvalid, \
     array(SELECT a.attname::text FROM generate_series(0, i.indnkeyatts - 1) AS k(n) \
           LEFT JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[k.n] ORDER BY k.n), \
     pg_get_expr(i.indpred, i.indrelid) \
     FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass($1) ORDER BY 1";

/// The enabled triggers on table `$1` (quoted name) whose function sends a notification:
/// PostgreSQL refuses to `PREPARE` a transaction that has sent one.
pub const CATALOG_NOTIFY_TRIGGERS_SQL: &str = "SELECT t.tgname::text FROM pg_trigger AS t \
     JOIN pg_proc AS p ON p.oid = t.tgfoid \
     WHERE t.tgrelid = to_regclass($1) AND NOT t.tgisinternal AND t.tgenabled <> 'D' \
       AND p.prosrc ~* '(pg_notify|\\mnotify\\M)' ORDER BY 1";

/// What [`OrderColumn`] needs to know of column `$2` (its name as stored) of table `$1` (quoted
/// name): `NOT NULL`, a unique index of its own, and the sequence feeding it (identity or
/// serial: name, increment, cache, cycle; NULLs without one). Needs no privilege on the sequence.
pub const ORDER_COLUMN_SQL: &str = "SELECT a.attnotnull, EXISTS (SELECT 1 FROM pg_index AS i \
       WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indpred IS NULL AND i.indnkeyatts = 1 \
         AND i.indkey[0] = a.attnum), \
     s.seqrelid::regclass::text, s.seqincrement, s.seqcache, s.seqcycle \
     FROM pg_attribute AS a LEFT JOIN pg_sequence AS s ON s.seqrelid = pg_get_serial_sequence($1, $2)::regclass \
     WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped";

/// Which of the privileges `$2` (names) on columns `$3` (names, `''` for the table) the current
/// role lacks on table `$1` (quoted name): their positions in the lists, from 1; and the role.
pub const MISSING_PRIVILEGES_SQL: &str = "SELECT current_user::text, coalesce(array_agg(p.n ORDER BY p.n) FILTER (WHERE NOT \
     CASE WHEN p.col = '' THEN has_table_privilege($1, p.privilege) ELSE has_column_privilege($1, p.col, p.privilege) END), \
     '{}') FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS p(privilege, col, n)";

/// The keys of the advisory locks through which the relays of table `$1` (quoted name) share
/// it, derived from the table's OID so that every spelling of the table (`outbox`,
/// `public.outbox`, a search_path) names the same locks: the classids of the membership locks,
/// the shard locks and the shard-count locks, and the table's schema-qualified name. No row
/// when the table does not exist.
pub const LOCK_KEYS_SQL: &str = "SELECT (hashtext('outbox-relay-member:' || c.oid::text) & 2147483647)::int4 AS member, \
     (hashtext('outbox-relay-shard:' || c.oid::text) & 2147483647)::int4 AS shard, \
     (hashtext('outbox-relay-shard-count:' || c.oid::text) & 2147483647)::int4 AS shard_count, \
     n.nspname || '.' || c.relname AS qualified_name, c.oid AS table_oid \
     FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)";

/// Takes the exclusive advisory lock (`$1` classid, `$2` number) of a membership or a shard;
/// false if another session holds it.
pub const TRY_LOCK_SQL: &str = "SELECT pg_try_advisory_lock($1::int4, $2::int4)";

/// Releases an exclusive advisory lock taken with [`TRY_LOCK_SQL`].
pub const UNLOCK_SQL: &str = "SELECT pg_advisory_unlock($1::int4, $2::int4)";

/// Takes the shared advisory lock that says which shard count (`$2`) this relay runs with, on
/// the table's shard-count classid `$1`; relays running with the same count share it.
pub const LOCK_SHARD_COUNT_SQL: &str = "SELECT pg_try_advisory_lock_shared($1::int4, $2::int4)";

/// Releases the lock of [`LOCK_SHARD_COUNT_SQL`].
pub const UNLOCK_SHARD_COUNT_SQL: &str = "SELECT pg_advisory_unlock_shared($1::int4, $2::int4)";

/// The condition on `pg_locks AS l` that selects the relays' advisory locks (the two-number
/// form) of the current database only: `pg_locks` shows every database's locks, and another
/// database's relays are not this table's, whatever their keys.
macro_rules! advisory_locks_of_this_database {
    () => {
        "l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    };
}

/// The shard counts other sessions run this table with (shard-count classid `$1`) other than
/// `$2`: each count and the pids of the relays running with it.
pub const OTHER_SHARD_COUNTS_SQL: &str = concat!(
    "SELECT l.objid::int8 AS shard_count, array_agg(l.pid ORDER BY l.pid) AS pids FROM pg_locks AS l WHERE ",
    advisory_locks_of_this_database!(),
    "AND l.classid = $1::int4::oid AND l.objid <> $2::int4::oid AND l.pid <> pg_backend_pid() ",
    "GROUP BY l.objid ORDER BY l.objid"
);

/// Backends holding locks of this table under the keys the previous version of the relay
/// derived from the table's *name*: `'outbox-relay-member:'` or `'outbox-relay-shard:'`
/// followed by any of the spellings `$1`. Relays of that version cannot see the OID-keyed locks.
pub const OLD_VERSION_HOLDERS_SQL: &str = concat!(
    "SELECT DISTINCT l.pid AS pid FROM pg_locks AS l WHERE ",
    advisory_locks_of_this_database!(),
    "AND l.classid IN (SELECT (hashtext(prefix || spelling) & 2147483647)::oid ",
    "FROM unnest(ARRAY['outbox-relay-member:', 'outbox-relay-shard:']) AS prefix, unnest($1::text[]) AS spelling) ",
    "ORDER BY 1"
);

/// Every lock of this table's relays in the current database, with the session holding it:
/// `kind` ('member', 'shard' or 'count', for classids `$1`, `$2`, `$3`), the number (the
/// relay's instance, the shard, the shard count), and the holder's pid, client address,
/// application name, state (NULL when PostgreSQL hides another role's session), seconds since
/// its state last changed (it began or ended a statement), whether it looks frozen (idle
/// longer than `$4` seconds), and whether it is the asking session.
pub const OWNERSHIP_SQL: &str = concat!(
    "SELECT CASE l.classid WHEN $1::int4::oid THEN 'member' WHEN $2::int4::oid THEN 'shard' ELSE 'count' END AS kind, ",
    "l.objid::int8 AS number, l.pid AS pid, coalesce(host(a.client_addr), '-') AS client, ",
    "coalesce(a.application_name, '') AS application_name, a.state AS state, ",
    "extract(epoch FROM clock_timestamp() - a.state_change)::float8 AS idle_seconds, ",
    "coalesce(a.state LIKE 'idle%' AND clock_timestamp() - a.state_change > $4::float8 * interval '1 second', false) ",
    "AS looks_frozen, l.pid = pg_backend_pid() AS mine ",
    "FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid WHERE ",
    advisory_locks_of_this_database!(),
    "AND l.classid IN ($1::int4::oid, $2::int4::oid, $3::int4::oid) ",
    "ORDER BY kind, number"
);

/// Ends backend `$1` if it still looks frozen: idle (between statements, or in a transaction)
/// for longer than `$2` seconds. Checked again here, in the same statement as the termination,
/// so that a relay that woke since the last look keeps its session. One row (whether it was
/// ended) or none (it no longer looks frozen).
pub const TERMINATE_FROZEN_SQL: &str = "SELECT pg_terminate_backend(pid) AS ended FROM pg_stat_activity \
     WHERE pid = $1 AND state LIKE 'idle%' AND clock_timestamp() - state_change > $2::float8 * interval '1 second'";

/// The oldest transaction that holds an xid, the one that holds the commit horizon back: a
/// session's, or a prepared transaction's (two-phase commit), which has no session. Returns
/// pid (NULL for a prepared transaction), seconds since it began (since it was prepared),
/// state, the start of its current query, and a prepared transaction's gid.
pub const OLDEST_TRANSACTION_SQL: &str = "SELECT pid, seconds, state, query, gid FROM ( \
       SELECT pid, extract(epoch FROM now() - xact_start)::float8 AS seconds, coalesce(state, '') AS state, \
              left(coalesce(query, ''), 200) AS query, NULL::text AS gid, age(backend_xid) AS age \
       FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
       UNION ALL \
       SELECT NULL::int4, extract(epoch FROM now() - prepared)::float8, 'prepared', '', gid, age(transaction) \
       FROM pg_prepared_xacts) AS t \
     ORDER BY age DESC LIMIT 1";

#[cfg(test)]
mod tests {
    use super::*;

    fn standard_layout() -> Layout {
        let mapping = Mapping::from_config(&Config::default()).unwrap();
        mapping.resolve(&standard_layout_columns()).unwrap()
    }

    #[test]
    fn the_standard_layout_claims_unpublished_rows_in_id_order() {
        let layout = standard_layout();
        assert_eq!(layout.payload, PayloadKind::Json);
        let sql = layout.claim_sql();
        assert!(sql.contains("ORDER BY o.\"id\" LIMIT $1"), "a window of the next rows in id order: {sql}");
        assert!(sql.contains("o.\"published_at\" IS NULL") && sql.contains("o.\"failed_at\" IS NULL"), "{sql}");
        assert!(
            sql.contains("(NOT b.r_ready OR b.r_retrying)"),
            "a row being retried goes out alone for its key: {sql}"
        );
        assert!(
            sql.contains("(o.\"attempts\" > 0 OR o.\"last_error\" IS NOT NULL) AS r_retrying"),
            "and so does a row `retry` re-queued, whose attempts start again from zero: {sql}"
        );
        assert!(sql.contains("o.\"xact_id\" < pg_snapshot_xmin(pg_current_snapshot())"), "{sql}");
        assert!(sql.contains("% 16) = ANY($2::int4[])"), "only this relay's shards: {sql}");
        let mark = layout.mark_published_sql();
        assert!(mark.contains("t.\"id\" = m.id::bigint"), "the mark finds rows by the key's own type: {mark}");
        assert!(mark.contains("t.\"event_id\"::text = m.event_id"), "and only the row it claimed: {mark}");
    }

    fn identity(cache: i64) -> OrderColumn {
        OrderColumn {
            not_null: true,
            unique: true,
            sequence: Some(OrderSequence { name: "outbox_id_seq".into(), increment: 1, cache, cycles: false }),
        }
    }

    /// The standard layout with the order column of type `ty`.
    fn ordered_by(ty: &str) -> Layout {
        let mut columns = standard_layout_columns();
        columns.iter_mut().filter(|c| c.0 == "id").for_each(|c| c.1 = ty.to_owned());
        Mapping::from_config(&Config::default()).unwrap().resolve(&columns).unwrap()
    }

    #[test]
    fn per_key_order_needs_an_integer_order_column_that_is_never_null_and_never_ties() {
        let layout = standard_layout();
        assert!(layout.check_per_key_order(&identity(1)).is_ok(), "the standard identity column");
        let refused = |layout: &Layout, column: OrderColumn| layout.check_per_key_order(&column).unwrap_err().problem;

        for ty in ["uuid", "timestamp with time zone", "text"] {
            let problem = refused(&ordered_by(ty), identity(1));
            assert!(problem.contains("GENERATED ALWAYS AS IDENTITY"), "{ty}: names the fix: {problem}");
            assert!(problem.contains("outbox.per_key_order = false"), "{ty}: names the opt-out: {problem}");
        }
        let cached = refused(&layout, identity(50));
        assert!(cached.contains("CACHE 50") && cached.contains("SET CACHE 1"), "{cached}");
        let problem = refused(&layout, OrderColumn { not_null: false, ..identity(1) });
        assert!(problem.contains("SET NOT NULL"), "{problem}");
        let app_assigned = OrderColumn { not_null: true, unique: false, sequence: None };
        assert!(refused(&layout, app_assigned.clone()).contains("CREATE UNIQUE INDEX"));
        assert!(layout.check_per_key_order(&OrderColumn { unique: true, ..app_assigned }).is_ok(), "unique values");
    }

    #[test]
    fn the_relay_asks_for_update_on_bookkeeping_columns_only_and_for_delete_only_when_it_deletes() {
        let updated = |needed: &[Privilege]| -> Vec<String> {
            needed
                .iter()
                .filter(|p| p.privilege == "UPDATE")
                .filter_map(|p| p.column.as_ref().map(|c| c.as_str().to_owned()))
                .collect()
        };
        let deletes = |needed: &[Privilege]| needed.iter().any(|p| p.privilege == "DELETE" && p.column.is_none());
        let mut config = Config::default();
        let needed = Mapping::from_config(&config).unwrap().privileges_needed(false);
        assert_eq!(updated(&needed), ["published_at", "attempts", "last_error", "last_attempt_at", "failed_at"]);
        assert!(!deletes(&needed));
        assert!(deletes(&Mapping::from_config(&config).unwrap().privileges_needed(true)), "retention deletes");
        config.outbox.mark = MarkMode::Delete;
        let needed = Mapping::from_config(&config).unwrap().privileges_needed(false);
        assert!(deletes(&needed));
        assert!(!updated(&needed).contains(&"published_at".to_owned()));
    }

    #[test]
    fn a_missing_column_is_reported_with_its_config_key() {
        let mapping = Mapping::from_config(&Config::default()).unwrap();
        let err = mapping.resolve(&[("id".into(), "bigint".into())]).unwrap_err();
        assert_eq!(err.key, "outbox.columns.event_id");
        assert!(err.problem.contains("no column \"event_id\""), "{}", err.problem);
    }

    #[test]
    fn a_payload_of_an_unsupported_type_is_reported() {
        let mapping = Mapping::from_config(&Config::default()).unwrap();
        let mut columns: Vec<(String, String)> = standard_layout_columns();
        for c in columns.iter_mut() {
            if c.0 == "payload" {
                c.1 = "integer".into();
            }
        }
        let err = mapping.resolve(&columns).unwrap_err();
        assert_eq!(err.key, "outbox.columns.payload");
    }

    fn standard_layout_columns() -> Vec<(String, String)> {
        [
            ("id", "bigint"),
            ("event_id", "uuid"),
            ("topic", "text"),
            ("key", "text"),
            ("payload", "jsonb"),
            ("headers", "jsonb"),
            ("created_at", "timestamp with time zone"),
            ("published_at", "timestamp with time zone"),
            ("attempts", "integer"),
            ("last_error", "text"),
            ("xact_id", "xid8"),
            ("last_attempt_at", "timestamp with time zone"),
            ("failed_at", "timestamp with time zone"),
        ]
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
    }
}
