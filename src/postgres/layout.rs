//! The shape of the outbox table: which columns play which role and what types they have.
//!
//! The layout is resolved once against the database catalog when the relay connects, so a
//! column that is missing or of the wrong type is reported by name before any row is touched,
//! rather than as a decoding error halfway through a batch. Each statement is built from the
//! layout by the module that runs it (`claim.rs`, `mark.rs`, ...), beside the code that
//! decodes its rows; the few fragments several statements share are here.

use std::fmt;

use crate::config::{ColumnPresence, ColumnRole, Config, MarkMode, OnPoison};
use crate::config::{Identifier, Placement, PlacementTarget, RecordConfig, TopicRoute, TopicTemplate};

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
    /// One column through a regular expression, as Debezium's outbox router routes.
    Route(TopicRoute),
}

impl TopicSource {
    /// The columns to select for the topic.
    pub fn columns(&self) -> Vec<&Identifier> {
        match self {
            TopicSource::Column(c) => vec![c],
            TopicSource::Template(t) => t.columns(),
            TopicSource::Route(r) => vec![r.column()],
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
            TopicSource::Route(route) => route.topic(values.first().and_then(Option::as_deref)),
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
    /// The record's timestamp.
    pub timestamp: Option<Identifier>,
    /// Java properties text holding a trace context.
    pub tracing_context: Option<Identifier>,
    /// Columns placed into headers, the envelope or the partition, in configured order.
    pub placements: Vec<Placement>,
    /// The record's shape: event-id header, formats, tombstones.
    pub record: RecordConfig,
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
        let topic = match (&outbox.topic_route, &outbox.topic_template, outbox.columns.name(Topic)) {
            (Some(route), _, _) => TopicSource::Route(
                TopicRoute::parse(route).map_err(|(key, p)| format!("outbox.topic_route.{key}: {p}"))?,
            ),
            (None, Some(template), _) => TopicSource::Template(TopicTemplate::parse(template)?),
            (None, None, Some(column)) => TopicSource::Column(Identifier::parse(column)?),
            (None, None, None) => return Err("no topic column or template".to_owned()),
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
            timestamp: named(Timestamp)?,
            tracing_context: named(TracingContext)?,
            placements: outbox.record.parsed_placements()?,
            record: outbox.record.clone(),
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
                TopicSource::Template(_) | TopicSource::Route(_) => None,
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
            ColumnRole::Timestamp => self.timestamp.as_ref(),
            ColumnRole::TracingContext => self.tracing_context.as_ref(),
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
                    TopicSource::Route(_) => "outbox.topic_route.column".to_owned(),
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
        needed.extend(self.placements.iter().map(|placement| Privilege {
            privilege: "SELECT",
            column: Some(placement.column.clone()),
            reason: "outbox.record.placements".to_owned(),
        }));
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
        for placement in &self.placements {
            let entry = || format!("{}:{}", placement.column.as_str(), placement.alias);
            let Some(ty) = type_of(&placement.column) else {
                return Err(LayoutError {
                    key: "outbox.record.placements".to_owned(),
                    problem: format!(
                        "table {} has no column \"{}\" (placement \"{}\")",
                        self.table_name(),
                        placement.column.as_str(),
                        entry()
                    ),
                });
            };
            if placement.target == PlacementTarget::Partition && ColumnKind::of(&ty) != ColumnKind::Integer {
                return Err(LayoutError {
                    key: "outbox.record.placements".to_owned(),
                    problem: format!(
                        "column \"{}\" has type {ty}; a partition is a number: smallint, integer or bigint",
                        placement.column.as_str()
                    ),
                });
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
        let placement_kinds = self.placements.iter().map(|p| ColumnKind::of(&type_of(&p.column))).collect();
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
            key_kind: self.key.as_ref().map_or(ColumnKind::Text, |key| ColumnKind::of(&type_of(key))),
            placement_kinds,
            failing_rows_by_key_index: false,
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
    /// Whether the table has a partial index leading with the key column (as migration 0005's
    /// hash index of failing rows), which answers the claim's per-row lookup of an earlier
    /// failing row of the row's key in a probe or two; read from the catalog when the session
    /// opens (see [`Layout::claim_sql`] for what it changes).
    pub failing_rows_by_key_index: bool,
    /// What the key column holds, for a JSON key (`outbox.record.key_format = "json"`).
    pub key_kind: ColumnKind,
    /// What each placed column holds, in the order of [`Mapping::placements`].
    pub placement_kinds: Vec<ColumnKind>,
}

/// What a column holds, as far as a record needs to know: Kafka Connect writes numbers and
/// booleans as such in JSON and in headers, and other values as text. The claim reads every
/// placed column as text; this says how to write that text back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// smallint, integer, bigint.
    Integer,
    /// boolean.
    Boolean,
    /// double precision.
    Double,
    /// real.
    Real,
    /// Anything else, written as its text.
    Text,
}

impl ColumnKind {
    /// The kind of a column of `format_type` `ty`.
    pub fn of(ty: &str) -> ColumnKind {
        match ty.split('(').next().unwrap_or(ty).trim() {
            "smallint" | "integer" | "bigint" => ColumnKind::Integer,
            "boolean" => ColumnKind::Boolean,
            "double precision" => ColumnKind::Double,
            "real" => ColumnKind::Real,
            _ => ColumnKind::Text,
        }
    }
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
}

/// `o.column IS NOT NULL`, or `false` for a column the table does not have.
pub(in crate::postgres) fn is_set(column: &Option<Identifier>) -> String {
    match column {
        Some(c) => format!("o.{c} IS NOT NULL"),
        None => "false".to_owned(),
    }
}

/// `text` as a SQL string literal.
pub(in crate::postgres) fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `o.column::text`, or a typed NULL for a column the table does not have.
pub(in crate::postgres) fn text_or_null(column: &Option<Identifier>) -> String {
    match column {
        Some(c) => format!("o.{c}::text"),
        None => "NULL::text".to_owned(),
    }
}

/// Row `o`'s failed attempts as `int8` (0 without an attempts column).
pub(in crate::postgres) fn attempts_sql(layout: &Layout) -> String {
    match &layout.mapping.attempts {
        Some(c) => format!("o.{c}::int8"),
        None => "0::int8".to_owned(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The columns of the table `sql/migrations/` creates, as the catalog lists them.
    pub(crate) fn standard_layout_columns() -> Vec<(String, String)> {
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

    pub(crate) fn standard_layout() -> Layout {
        let mapping = Mapping::from_config(&Config::default()).unwrap();
        // As the catalog has it after `migrate`, which creates the index of failing rows.
        Layout { failing_rows_by_key_index: true, ..mapping.resolve(&standard_layout_columns()).unwrap() }
    }

    #[test]
    fn a_key_is_looked_up_for_failing_rows_row_by_row_only_where_an_index_answers_it() {
        let sql = standard_layout().claim_sql();
        let lookup = sql.split("NOT EXISTS (").nth(1).and_then(|rest| rest.split(") AND (o.").next()).unwrap();
        assert!(
            lookup.starts_with("SELECT 1 FROM \"outbox\" AS e") && lookup.ends_with(" OFFSET 0"),
            "a subquery PostgreSQL cannot turn into a join that reads the whole table: {lookup}"
        );
        let unindexed = Layout { failing_rows_by_key_index: false, ..standard_layout() };
        assert!(!unindexed.claim_sql().contains("OFFSET 0"), "without the index, the planner chooses");
    }

    #[test]
    fn the_standard_layout_claims_unpublished_rows_in_id_order() {
        let layout = standard_layout();
        assert_eq!(layout.payload, PayloadKind::Json);
        let sql = layout.claim_sql();
        assert!(sql.contains("ORDER BY o.\"id\" LIMIT $1"), "a window of the next rows in id order: {sql}");
        assert!(sql.contains("o.\"published_at\" IS NULL") && sql.contains("o.\"failed_at\" IS NULL"), "{sql}");
        assert!(
            sql.contains("bool_or(NOT w.r_ready OR w.r_retrying) OVER (PARTITION BY w.r_key"),
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
}
