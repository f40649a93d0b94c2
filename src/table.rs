//! The shape of the outbox table: which columns play which role, what types they have, and the
//! SQL statements built from them.
//!
//! The layout is resolved once against the database catalog when the relay connects, so a
//! column that is missing or of the wrong type is reported by name before any row is touched,
//! rather than as a decoding error halfway through a batch. All SQL the relay runs against the
//! outbox table is written here; `outbox.rs` only executes it.

use std::fmt;

use crate::config::{Config, MarkMode};

/// A PostgreSQL identifier, quoted when written into SQL so that any configured name is taken
/// literally and can never alter a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Update or delete on publish.
    pub mark: MarkMode,
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
            mark: outbox.mark,
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
        ] {
            if let Some(column) = column {
                roles.push((format!("outbox.columns.{key}"), column));
            }
        }
        roles
    }

    /// Checks the mapping against the table's columns (name and `format_type` of each) and
    /// returns the layout the statements are built from.
    pub fn resolve(&self, table_columns: &[(String, String)]) -> Result<Layout, LayoutError> {
        let type_of = |key: &str, column: &Identifier| -> Result<String, LayoutError> {
            table_columns.iter().find(|(name, _)| name == column.as_str()).map(|(_, ty)| ty.clone()).ok_or_else(|| {
                LayoutError {
                    key: key.to_owned(),
                    problem: format!("table {} has no column \"{}\"", self.table_name(), column.as_str()),
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
        let id_type = type_of("outbox.columns.id", &self.id)?;
        let order_type = type_of("outbox.columns.order_by", &self.order_by)?;
        Ok(Layout { mapping: self.clone(), payload, id_type, order_type })
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
    /// First topic column; template columns follow.
    pub const TOPIC: usize = 5;
}

impl Layout {
    /// Whether the order column gives events a meaningful order.
    pub fn order_is_meaningful(&self) -> bool {
        !matches!(self.order_type.as_str(), "uuid")
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

    /// `SELECT` of the next unpublished rows in claim order; `$1` is the batch size.
    ///
    /// Every column is qualified with the alias `o`: the selected `id::text` is itself named
    /// `id`, and an unqualified `ORDER BY id` would sort by that text ("10" before "9").
    pub fn claim_sql(&self) -> String {
        let m = &self.mapping;
        let filter = match &m.published_at {
            Some(published_at) => format!("WHERE o.{published_at} IS NULL"),
            None => String::new(),
        };
        format!(
            "SELECT o.{id}::text, o.{event_id}::text, {key}, o.{payload}, {headers}, {topic} \
             FROM {table} AS o {filter} ORDER BY o.{order} LIMIT $1",
            id = m.id,
            event_id = m.event_id,
            key = text_or_null(&m.key),
            payload = m.payload,
            headers = text_or_null(&m.headers),
            topic = self.topic_select(),
            table = m.table_sql(),
            order = m.order_by,
        )
    }

    /// Marks the rows whose ids (as text, `$1`) the broker acknowledged.
    pub fn mark_published_sql(&self) -> String {
        let m = &self.mapping;
        let ids = format!("{id} = ANY($1::text[]::{ty}[])", id = m.id, ty = self.id_type);
        match &m.published_at {
            Some(published_at) => format!(
                "UPDATE {table} SET {published_at} = now() WHERE {ids} AND {published_at} IS NULL",
                table = m.table_sql()
            ),
            None => format!("DELETE FROM {table} WHERE {ids}", table = m.table_sql()),
        }
    }

    /// Records failed attempts: `$1` ids as text, `$2` the error of each. `None` when the table
    /// has neither an attempts nor a last-error column.
    pub fn mark_failed_sql(&self) -> Option<String> {
        let m = &self.mapping;
        let mut sets = Vec::new();
        if let Some(attempts) = &m.attempts {
            sets.push(format!("{attempts} = t.{attempts} + 1"));
        }
        if let Some(last_error) = &m.last_error {
            sets.push(format!("{last_error} = f.error"));
        }
        if sets.is_empty() {
            return None;
        }
        Some(format!(
            "UPDATE {table} AS t SET {sets} FROM unnest($1::text[], $2::text[]) AS f(id, error) WHERE t.{id} = f.id::{ty}",
            table = m.table_sql(),
            sets = sets.join(", "),
            id = m.id,
            ty = self.id_type,
        ))
    }

    /// Count of unpublished rows and the age in seconds of the oldest (NULL without a
    /// created-at column or without pending rows).
    pub fn pending_stats_sql(&self) -> String {
        let m = &self.mapping;
        let age = match &m.created_at {
            Some(created_at) => format!("extract(epoch FROM now() - min({created_at}))::float8"),
            None => "NULL::float8".to_owned(),
        };
        format!(
            "SELECT count(*), {age} FROM {table} {filter}",
            table = m.table_sql(),
            filter = self.unpublished_filter()
        )
    }

    /// Rows for `audit`, in claim order: id, event id, published?, attempts, last error, then
    /// the topic columns (as in [`claim_columns`]'s topic position, here from index 5).
    /// Parameters, each NULL for "no bound": `$1`/`$2` the id range (text, inclusive), `$3`/`$4`
    /// the created-at range (text timestamps, `[since, until)`), `$5` the topic when it comes
    /// from a column (a template's topic is checked row by row instead).
    pub fn audit_rows_sql(&self) -> String {
        let m = &self.mapping;
        let published = match &m.published_at {
            Some(c) => format!("o.{c} IS NOT NULL"),
            None => "false".to_owned(),
        };
        let attempts = match &m.attempts {
            Some(c) => format!("o.{c}::int8"),
            None => "0::int8".to_owned(),
        };
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
            "SELECT o.{id}::text, o.{event_id}::text, {published}, {attempts}, {last_error}, {topic} \
             FROM {table} AS o WHERE {filters} ORDER BY o.{order}",
            id = m.id,
            event_id = m.event_id,
            topic = self.topic_select(),
            table = m.table_sql(),
            filters = filters.join(" AND "),
            order = m.order_by,
        )
    }
}

/// `o.column::text`, or a typed NULL for a column the table does not have.
fn text_or_null(column: &Option<Identifier>) -> String {
    match column {
        Some(c) => format!("o.{c}::text"),
        None => "NULL::text".to_owned(),
    }
}

/// Position of the first topic column in [`Layout::audit_rows_sql`]'s result.
pub const AUDIT_TOPIC_COLUMN: usize = 5;

/// Columns of a table with their `format_type`; `$1` is the quoted table name.
pub const TABLE_COLUMNS_SQL: &str = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
     FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped";

/// Whether a table exists; `$1` is the quoted table name.
pub const TABLE_EXISTS_SQL: &str = "SELECT to_regclass($1) IS NOT NULL";

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

    fn standard_layout() -> Layout {
        let mapping = Mapping::from_config(&Config::default()).unwrap();
        mapping.resolve(&standard_layout_columns()).unwrap()
    }

    #[test]
    fn the_standard_layout_claims_unpublished_rows_in_id_order() {
        let layout = standard_layout();
        assert_eq!(layout.payload, PayloadKind::Json);
        let sql = layout.claim_sql();
        assert!(sql.contains("WHERE o.\"published_at\" IS NULL ORDER BY o.\"id\" LIMIT $1"), "{sql}");
        assert!(layout.mark_published_sql().contains("::bigint[]"));
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
        ]
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
    }
}
