//! The shape of the outbox table: which columns play which role and what types they have.
//!
//! The layout is resolved once against the database catalog when the relay connects, so a
//! column that is missing or of the wrong type is reported by name before any row is touched,
//! rather than as a decoding error halfway through a batch. Each statement is built from the
//! layout by the module that runs it (`claim.rs`, `mark.rs`, ...), beside the code that
//! decodes its rows; the few fragments several statements share are here.

use std::fmt;

use crate::config::{Config, MarkMode, OnPoison};

/// A PostgreSQL identifier, quoted when written into SQL so that any configured name is taken
/// literally and can never alter a statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identifier(String);

impl Identifier {
    /// Accepts a single identifier such as a column name.
    pub fn parse(name: &str) -> Result<Identifier, String> {
        if name.is_empty() {
            return Err("is empty".to_owned());
        }
        if name.len() > 63 {
            return Err(format!("\"{name}\" is longer than PostgreSQL's 63-byte identifier limit"));
        }
        if name.contains('\0') {
            return Err("contains a NUL character".to_owned());
        }
        Ok(Identifier(name.to_owned()))
    }

    /// Accepts `table` or `schema.table`.
    pub fn parse_qualified(name: &str) -> Result<Vec<Identifier>, String> {
        let parts: Vec<&str> = name.split('.').collect();
        if parts.len() > 2 {
            return Err(format!("\"{name}\" has more than one dot; use table or schema.table"));
        }
        parts.into_iter().map(Identifier::parse).collect()
    }

    /// The name as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Identifier {
    /// Writes the identifier double-quoted, doubling embedded quotes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.replace('"', "\"\""))
    }
}

/// `schema.table` or `table`, quoted.
fn qualified_sql(parts: &[Identifier]) -> String {
    parts.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(".")
}

/// A topic built from literal text and column values, such as `outbox.event.{aggregatetype}`.
/// `{{` and `}}` stand for literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Column(Identifier),
}

impl TopicTemplate {
    /// Parses a template; every `{name}` must name a column.
    pub fn parse(template: &str) -> Result<TopicTemplate, String> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(format!("\"{template}\": '{{' without a closing '}}'"));
                            }
                        }
                    }
                    let column = Identifier::parse(name.trim())
                        .map_err(|p| format!("\"{template}\": placeholder {{{name}}} {p}"))?;
                    if !literal.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut literal)));
                    }
                    segments.push(Segment::Column(column));
                }
                '}' => {
                    return Err(format!(
                        "\"{template}\": '}}' without an opening '{{'; write '}}}}' for a literal brace"
                    ));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        if segments.is_empty() {
            return Err("is empty".to_owned());
        }
        Ok(TopicTemplate { segments })
    }

    /// The columns the template reads, in order of appearance.
    pub fn columns(&self) -> Vec<&Identifier> {
        self.segments
            .iter()
            .filter_map(|s| match s {
                Segment::Column(c) => Some(c),
                Segment::Literal(_) => None,
            })
            .collect()
    }

    /// Fills the template with one row's values, given in the order of [`TopicTemplate::columns`].
    pub fn render(&self, values: &[Option<String>]) -> Result<String, String> {
        let mut topic = String::new();
        let mut values = values.iter();
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => topic.push_str(text),
                Segment::Column(column) => match values.next() {
                    Some(Some(value)) => topic.push_str(value),
                    _ => {
                        return Err(format!("topic template column \"{}\" is NULL", column.as_str()));
                    }
                },
            }
        }
        Ok(topic)
    }
}

/// The `[outbox.columns]` roles a table may lack (`""` in the configuration).
const OPTIONAL_COLUMNS: &[&str] = &[
    "key",
    "headers",
    "created_at",
    "published_at",
    "attempts",
    "last_error",
    "xact_id",
    "last_attempt_at",
    "failed_at",
    "traceparent",
];

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
        let outbox = &config.outbox;
        let c = &outbox.columns;
        let ident = |name: &str| Identifier::parse(name);
        let optional = |name: &Option<String>| name.as_deref().map(Identifier::parse).transpose();
        let topic = match (&outbox.topic_template, &c.topic) {
            (Some(template), _) => TopicSource::Template(TopicTemplate::parse(template)?),
            (None, Some(column)) => TopicSource::Column(ident(column)?),
            (None, None) => return Err("no topic column or template".to_owned()),
        };
        let id = ident(&c.id)?;
        Ok(Mapping {
            table: Identifier::parse_qualified(&outbox.table)?,
            order_by: optional(&c.order_by)?.unwrap_or_else(|| id.clone()),
            id,
            event_id: ident(&c.event_id)?,
            topic,
            key: optional(&c.key)?,
            payload: ident(&c.payload)?,
            headers: optional(&c.headers)?,
            created_at: optional(&c.created_at)?,
            published_at: if outbox.mark == MarkMode::Update { optional(&c.published_at)? } else { None },
            attempts: optional(&c.attempts)?,
            last_error: optional(&c.last_error)?,
            xact_id: optional(&c.xact_id)?,
            last_attempt_at: optional(&c.last_attempt_at)?,
            failed_at: optional(&c.failed_at)?,
            traceparent: optional(&c.traceparent)?,
            mark: outbox.mark,
            on_poison: config.relay.on_poison,
            shards: config.relay.shards,
            per_key_order: config.outbox.per_key_order,
        })
    }

    /// The table name as written in SQL.
    pub fn table_sql(&self) -> String {
        qualified_sql(&self.table)
    }

    /// The table name for messages (unquoted, as configured).
    pub fn table_name(&self) -> String {
        self.table.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(".")
    }

    /// Every column the relay touches, with its config key, for the catalog check.
    fn roles(&self) -> Vec<(String, &Identifier)> {
        let mut roles = vec![
            ("outbox.columns.id".to_owned(), &self.id),
            ("outbox.columns.order_by".to_owned(), &self.order_by),
            ("outbox.columns.event_id".to_owned(), &self.event_id),
            ("outbox.columns.payload".to_owned(), &self.payload),
        ];
        let topic_key = match self.topic {
            TopicSource::Column(_) => "outbox.columns.topic",
            TopicSource::Template(_) => "outbox.topic_template",
        };
        for column in self.topic.columns() {
            roles.push((topic_key.to_owned(), column));
        }
        for (key, column) in [
            ("key", &self.key),
            ("headers", &self.headers),
            ("created_at", &self.created_at),
            ("published_at", &self.published_at),
            ("attempts", &self.attempts),
            ("last_error", &self.last_error),
            ("xact_id", &self.xact_id),
            ("last_attempt_at", &self.last_attempt_at),
            ("failed_at", &self.failed_at),
            ("traceparent", &self.traceparent),
        ] {
            if let Some(column) = column {
                roles.push((format!("outbox.columns.{key}"), column));
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
            .map(|(key, column)| Privilege { privilege: "SELECT", column: Some(column.clone()), reason: key })
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
        let type_of = |key: &str, column: &Identifier| -> Result<String, LayoutError> {
            table_columns.iter().find(|(name, _)| name == column.as_str()).map(|(_, ty)| ty.clone()).ok_or_else(|| {
                LayoutError {
                    key: key.to_owned(),
                    problem: if key.starts_with("outbox.columns.") && OPTIONAL_COLUMNS.contains(&&key["outbox.columns.".len()..]) {
                        format!(
                            "table {} has no column \"{}\"; name the column that plays this role, or set {key} = \"\" if the table has none",
                            self.table_name(),
                            column.as_str()
                        )
                    } else {
                        format!("table {} has no column \"{}\"", self.table_name(), column.as_str())
                    },
                }
            })
        };
        for (key, column) in self.roles() {
            type_of(&key, column)?;
        }
        let expect = |key: &str, column: &Identifier, allowed: &[&str], what: &str| -> Result<String, LayoutError> {
            let ty = type_of(key, column)?;
            let base = ty.split('(').next().unwrap_or(&ty).trim().to_owned();
            if allowed.iter().any(|a| *a == base) {
                Ok(ty)
            } else {
                Err(LayoutError {
                    key: key.to_owned(),
                    problem: format!("column \"{}\" has type {ty}; expected {what}", column.as_str()),
                })
            }
        };
        const TIMESTAMPS: &[&str] = &["timestamp with time zone", "timestamp without time zone"];
        let payload_type = expect(
            "outbox.columns.payload",
            &self.payload,
            &["jsonb", "json", "text", "character varying", "character", "bytea"],
            "jsonb, json, text or bytea",
        )?;
        let payload = match payload_type.as_str() {
            "jsonb" | "json" => PayloadKind::Json,
            "bytea" => PayloadKind::Bytes,
            _ => PayloadKind::Text,
        };
        if let Some(headers) = &self.headers {
            expect("outbox.columns.headers", headers, &["jsonb", "json", "text"], "jsonb or json")?;
        }
        if let Some(published_at) = &self.published_at {
            expect("outbox.columns.published_at", published_at, TIMESTAMPS, "timestamptz")?;
        }
        if let Some(created_at) = &self.created_at {
            expect("outbox.columns.created_at", created_at, TIMESTAMPS, "timestamptz")?;
        }
        if let Some(attempts) = &self.attempts {
            expect("outbox.columns.attempts", attempts, &["integer", "bigint", "smallint"], "an integer")?;
        }
        if let Some(last_error) = &self.last_error {
            expect("outbox.columns.last_error", last_error, &["text", "character varying"], "text")?;
        }
        if let Some(horizon) = &self.xact_id {
            expect("outbox.columns.xact_id", horizon, &["xid8"], "xid8 (see sql/migrations/0002)")?;
        }
        if let Some(last_attempt_at) = &self.last_attempt_at {
            expect("outbox.columns.last_attempt_at", last_attempt_at, TIMESTAMPS, "timestamptz")?;
        }
        if let Some(failed_at) = &self.failed_at {
            expect("outbox.columns.failed_at", failed_at, TIMESTAMPS, "timestamptz")?;
        }
        let id_type = type_of("outbox.columns.id", &self.id)?;
        let order_type = type_of("outbox.columns.order_by", &self.order_by)?;
        let last_error_type = match &self.last_error {
            Some(last_error) => Some(type_of("outbox.columns.last_error", last_error)?),
            None => None,
        };
        Ok(Layout { mapping: self.clone(), payload, id_type, order_type, last_error_type })
    }
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
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_so_names_cannot_alter_sql() {
        let id = Identifier::parse("we\"ird").unwrap();
        assert_eq!(id.to_string(), "\"we\"\"ird\"");
    }

    #[test]
    fn a_qualified_table_name_has_at_most_one_dot() {
        assert_eq!(Identifier::parse_qualified("app.outbox").unwrap().len(), 2);
        assert!(Identifier::parse_qualified("a.b.c").is_err());
        assert!(Identifier::parse_qualified("").is_err());
    }

    #[test]
    fn a_template_renders_column_values_and_literal_braces() {
        let t = TopicTemplate::parse("outbox.{aggregatetype}.{{v}}.{type}").unwrap();
        let columns: Vec<&str> = t.columns().iter().map(|c| c.as_str()).collect();
        assert_eq!(columns, ["aggregatetype", "type"]);
        let topic = t.render(&[Some("order".into()), Some("created".into())]).unwrap();
        assert_eq!(topic, "outbox.order.{v}.created");
    }

    #[test]
    fn a_template_with_a_null_column_is_a_row_error_naming_the_column() {
        let t = TopicTemplate::parse("x.{aggregatetype}").unwrap();
        let err = t.render(&[None]).unwrap_err();
        assert!(err.contains("aggregatetype"), "{err}");
    }

    #[test]
    fn malformed_templates_are_rejected() {
        assert!(TopicTemplate::parse("a.{b").is_err());
        assert!(TopicTemplate::parse("a}b").is_err());
        assert!(TopicTemplate::parse("a.{}").is_err());
        assert!(TopicTemplate::parse("").is_err());
    }

    mod hostile {
        //! Configured names and templates are text from the operator and topic values are text from
        //! the application: whatever they hold, parsing and rendering answer, never panic.

        use proptest::prelude::*;

        use super::*;

        /// Any text, and text made mostly of the characters the template syntax gives meaning to.
        fn template_text() -> impl Strategy<Value = String> {
            prop_oneof![any::<String>(), "[{}a. _\"\\x00é]{0,24}"]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_template_is_refused_or_renders_exactly_when_its_columns_have_values(
                template in template_text(),
                values in prop::collection::vec(prop::option::of(any::<String>()), 0..4),
            ) {
                match TopicTemplate::parse(&template) {
                    Ok(parsed) => {
                        let wanted = parsed.columns().len();
                        let all_present = values.len() >= wanted && values[..wanted].iter().all(Option::is_some);
                        prop_assert_eq!(parsed.render(&values).is_ok(), all_present);
                    }
                    Err(reason) => prop_assert!(!reason.is_empty()),
                }
            }

            #[test]
            fn any_name_is_refused_or_quoted_so_that_it_reads_back_literally(name in template_text()) {
                if let Ok(id) = Identifier::parse(&name) {
                    let quoted = id.to_string();
                    let inner = &quoted[1..quoted.len() - 1];
                    prop_assert!(!inner.replace("\"\"", "").contains('"'), "a lone quote would end the identifier");
                    prop_assert_eq!(inner.replace("\"\"", "\""), name.as_str());
                }
                if let Ok(parts) = Identifier::parse_qualified(&name) {
                    prop_assert!(matches!(parts.len(), 1 | 2));
                }
            }
        }
    }

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
