//! The outbox's column roles, declared once.
//!
//! [`ColumnRole::declaration`] is the single list of what the relay reads and writes in a row:
//! each role's key under `[outbox.columns]`, the standard table's column, whether a table may
//! lack it, the types it may have and what it is for. The defaults of [`Columns`], the checks of
//! the configured names, the mapping and its catalog checks (in `postgres::layout`) and the
//! README's rows are built from it, or checked against it by the tests below, so a new column is
//! declared here and nowhere else is left to agree by hand.

use serde::{Deserialize, Serialize};

use super::serde_text::{deserialize_optional, serialize_optional};

/// Declares [`ColumnRole`] and `ColumnRole::ALL` from one list, so that a role cannot be
/// added to one and forgotten in the other.
macro_rules! column_roles {
    ($($(#[$doc:meta])* $role:ident,)*) => {
        /// A part a column plays for the relay.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ColumnRole {
            $($(#[$doc])* $role,)*
        }

        impl ColumnRole {
            /// Every role, in the order of `[outbox.columns]`.
            pub const ALL: [ColumnRole; [$(ColumnRole::$role),*].len()] = [$(ColumnRole::$role),*];
        }
    };
}

column_roles! {
    /// Identifies a row when marking it.
    Id,
    /// The claim order, and so a key's order on the topic.
    OrderBy,
    /// The stable id sent as the `event_id` header.
    EventId,
    /// The topic (unless a template builds it).
    Topic,
    /// The record key.
    Key,
    /// The record value.
    Payload,
    /// The record headers.
    Headers,
    /// When the row was written.
    CreatedAt,
    /// When the broker acknowledged the row.
    PublishedAt,
    /// Failed attempts of the row.
    Attempts,
    /// The error of the last failed attempt.
    LastError,
    /// The inserting transaction's id.
    XactId,
    /// When the last failed attempt happened.
    LastAttemptAt,
    /// When the relay gave up on the row.
    FailedAt,
    /// A W3C `traceparent` for the record's header.
    Traceparent,
    /// The record's timestamp.
    Timestamp,
    /// Java properties text holding a trace context (`traceparent=...`), Debezium's tracing column.
    TracingContext,
}

/// Whether a table must have a role's column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnPresence {
    /// Every table has it; its name cannot be empty.
    Required,
    /// Empty means the column of another role (`order_by` is the id column unless named).
    SameAs(ColumnRole),
    /// Needed unless `outbox.topic_template` builds the topic from other columns.
    UnlessTemplate,
    /// A table may lack it: `""` turns off what the relay does with it.
    Optional,
}

/// The types a role's column may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnTypes {
    /// Base types as PostgreSQL's `format_type` prints them (without a length or precision).
    pub allowed: &'static [&'static str],
    /// How an error names them to the operator.
    pub described: &'static str,
}

/// Everything the relay knows of one role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnDeclaration {
    /// The role.
    pub role: ColumnRole,
    /// Its key under `[outbox.columns]`, and in `OUTBOX_RELAY_OUTBOX__COLUMNS__<KEY>`.
    pub key: &'static str,
    /// The standard table's column, the default name; `None`: no column unless configured.
    pub default_column: Option<&'static str>,
    /// Whether a table must have it.
    pub presence: ColumnPresence,
    /// The types it may have; `None`: any type (it is read as text).
    pub types: Option<ColumnTypes>,
    /// What it is for, as the README's configuration table says.
    pub summary: &'static str,
    /// The standard table's definition of an optional column (`sql/migrations/`), which
    /// `check` proposes to add to a table that lacks it; `None` for the columns every table has.
    pub definition: Option<&'static str>,
}

const TIMESTAMPTZ: ColumnTypes =
    ColumnTypes { allowed: &["timestamp with time zone", "timestamp without time zone"], described: "timestamptz" };

/// The declaration, in [`ColumnRole`] order (the order of `[outbox.columns]`).
const DECLARATIONS: [ColumnDeclaration; ColumnRole::ALL.len()] = {
    use ColumnPresence::{Optional, Required, SameAs, UnlessTemplate};
    use ColumnRole::*;
    let any = None;
    [
        ColumnDeclaration {
            role: Id,
            key: "id",
            default_column: Some("id"),
            presence: Required,
            types: any,
            summary: "row identity used to mark it",
            definition: None,
        },
        ColumnDeclaration {
            role: OrderBy,
            key: "order_by",
            default_column: None,
            presence: SameAs(Id),
            types: any,
            summary: "claim order, and so per-key order: an integer, `NOT NULL`, from a sequence without a cache or unique",
            definition: None,
        },
        ColumnDeclaration {
            role: EventId,
            key: "event_id",
            default_column: Some("event_id"),
            presence: Required,
            types: any,
            summary: "sent as the `event_id` header, or `outbox.record.event_id_header` (may be the id column)",
            definition: None,
        },
        ColumnDeclaration {
            role: Topic,
            key: "topic",
            default_column: Some("topic"),
            presence: UnlessTemplate,
            types: any,
            summary: "topic column, unless a template is set",
            definition: None,
        },
        ColumnDeclaration {
            role: Key,
            key: "key",
            default_column: Some("key"),
            presence: Optional,
            types: any,
            summary: "record key (`\"\"`: no keys)",
            definition: None,
        },
        ColumnDeclaration {
            role: Payload,
            key: "payload",
            default_column: Some("payload"),
            presence: Required,
            types: Some(ColumnTypes {
                allowed: &["jsonb", "json", "text", "character varying", "character", "bytea"],
                described: "jsonb, json, text or bytea",
            }),
            summary: "record value: `jsonb`, `json`, `text` or `bytea`",
            definition: None,
        },
        ColumnDeclaration {
            role: Headers,
            key: "headers",
            default_column: Some("headers"),
            presence: Optional,
            types: Some(ColumnTypes { allowed: &["jsonb", "json", "text"], described: "jsonb or json" }),
            summary: "JSON object of strings (`\"\"`: none)",
            definition: None,
        },
        ColumnDeclaration {
            role: CreatedAt,
            key: "created_at",
            default_column: Some("created_at"),
            presence: Optional,
            types: Some(TIMESTAMPTZ),
            summary: "feeds the oldest-pending-age metric (`\"\"`: none)",
            definition: None,
        },
        ColumnDeclaration {
            role: PublishedAt,
            key: "published_at",
            default_column: Some("published_at"),
            presence: Optional,
            types: Some(TIMESTAMPTZ),
            summary: "set on publish (required with `mark = \"update\"`)",
            definition: None,
        },
        ColumnDeclaration {
            role: Attempts,
            key: "attempts",
            default_column: Some("attempts"),
            presence: Optional,
            types: Some(ColumnTypes { allowed: &["integer", "bigint", "smallint"], described: "an integer" }),
            summary: "failed-attempt counter (`\"\"`: none)",
            definition: Some("int NOT NULL DEFAULT 0"),
        },
        ColumnDeclaration {
            role: LastError,
            key: "last_error",
            default_column: Some("last_error"),
            presence: Optional,
            types: Some(ColumnTypes { allowed: &["text", "character varying"], described: "text" }),
            summary: "last failure text (`\"\"`: none)",
            definition: Some("text"),
        },
        ColumnDeclaration {
            role: XactId,
            key: "xact_id",
            default_column: Some("xact_id"),
            presence: Optional,
            types: Some(ColumnTypes { allowed: &["xid8"], described: "xid8 (see sql/migrations/0002)" }),
            summary: "the inserting transaction's id, `xid8` (`\"\"`: no commit-order safety; warned at startup)",
            definition: Some("xid8"),
        },
        ColumnDeclaration {
            role: LastAttemptAt,
            key: "last_attempt_at",
            default_column: Some("last_attempt_at"),
            presence: Optional,
            types: Some(TIMESTAMPTZ),
            summary: "time of the last failed attempt, for retry backoff (`\"\"`: no backoff)",
            definition: Some("timestamptz"),
        },
        ColumnDeclaration {
            role: FailedAt,
            key: "failed_at",
            default_column: Some("failed_at"),
            presence: Optional,
            types: Some(TIMESTAMPTZ),
            summary: "set when the relay gives up on a row (`\"\"`: it never gives up)",
            definition: Some("timestamptz"),
        },
        ColumnDeclaration {
            role: Traceparent,
            key: "traceparent",
            default_column: None,
            presence: Optional,
            types: any,
            summary: "a column whose value becomes the record's `traceparent` header",
            definition: None,
        },
        ColumnDeclaration {
            role: Timestamp,
            key: "timestamp",
            default_column: None,
            presence: Optional,
            types: Some(TIMESTAMPTZ),
            summary: "the record's timestamp (`\"\"`: when the relay sends it; Debezium's `table.field.event.timestamp`)",
            definition: None,
        },
        ColumnDeclaration {
            role: TracingContext,
            key: "tracing_context",
            default_column: None,
            presence: Optional,
            types: Some(ColumnTypes { allowed: &["text", "character varying"], described: "text" }),
            summary: "Java properties text whose `traceparent` and `tracestate` become headers (Debezium's `tracing.span.context.field`)",
            definition: None,
        },
    ]
};

impl ColumnRole {
    /// What the relay knows of this role.
    pub fn declaration(self) -> &'static ColumnDeclaration {
        &DECLARATIONS[self as usize]
    }

    /// Its key under `[outbox.columns]`.
    pub fn key(self) -> &'static str {
        self.declaration().key
    }

    /// Its full configuration key, `outbox.columns.<key>`, as errors name it.
    pub fn config_key(self) -> String {
        format!("outbox.columns.{}", self.key())
    }

    /// Whether a table must have it.
    pub fn presence(self) -> ColumnPresence {
        self.declaration().presence
    }

    /// The types its column may have; `None`: any.
    pub fn types(self) -> Option<ColumnTypes> {
        self.declaration().types
    }

    /// The standard table's column name, if it has one.
    pub fn default_column(self) -> Option<&'static str> {
        self.declaration().default_column
    }
}

/// `[outbox.columns]`: the name of each column the relay reads or writes. An empty string
/// means the table has no such column (allowed for the optional ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Columns {
    /// Identifies a row when marking it; also the claim order unless `order_by` is set.
    pub id: String,
    /// Orders the claim; per-key order on the topic follows it. Defaults to `id`.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub order_by: Option<String>,
    /// The stable id sent as the `event_id` header (may be the same column as `id`).
    pub event_id: String,
    /// The topic, unless `outbox.topic_template` is set.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub topic: Option<String>,
    /// The record key; rows without one are spread over partitions.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub key: Option<String>,
    /// The record value: jsonb, json, text or bytea. NULL is a tombstone.
    pub payload: String,
    /// A JSON object of string values, sent as record headers.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub headers: Option<String>,
    /// When the row was written; feeds the oldest-pending-age metric.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub created_at: Option<String>,
    /// Set when the broker has the row (`mark = "update"`).
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub published_at: Option<String>,
    /// Counts failed delivery attempts.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub attempts: Option<String>,
    /// The error of the last failed attempt.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub last_error: Option<String>,
    /// The inserting transaction's id (`xid8`, default `pg_current_xact_id()`): a row is
    /// claimed only once its transaction and every transaction that started writing before it
    /// have finished, so a lower id that commits late is never overtaken within its key.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub xact_id: Option<String>,
    /// When the last failed attempt happened; retries back off from it.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub last_attempt_at: Option<String>,
    /// Set when the relay gives up on a row after `relay.max_attempts`.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub failed_at: Option<String>,
    /// A W3C `traceparent` sent as the `traceparent` header, so a trace joins writer, relay and
    /// consumer. Off by default; a `traceparent` in the headers column travels anyway.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub traceparent: Option<String>,
    /// The record's timestamp (Debezium's `table.field.event.timestamp`); without it a record
    /// is stamped when the relay sends it.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub timestamp: Option<String>,
    /// Java properties text (`traceparent=00-...`), as Debezium's tracing column holds it: its
    /// `traceparent` and `tracestate` become headers. Off by default.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub tracing_context: Option<String>,
}

impl Default for Columns {
    /// The standard table's columns.
    fn default() -> Self {
        let optional = |role: ColumnRole| role.declaration().default_column.map(str::to_owned);
        let required = |role: ColumnRole| optional(role).unwrap_or_default();
        use ColumnRole::*;
        Columns {
            id: required(Id),
            order_by: optional(OrderBy),
            event_id: required(EventId),
            topic: optional(Topic),
            key: optional(Key),
            payload: required(Payload),
            headers: optional(Headers),
            created_at: optional(CreatedAt),
            published_at: optional(PublishedAt),
            attempts: optional(Attempts),
            last_error: optional(LastError),
            xact_id: optional(XactId),
            last_attempt_at: optional(LastAttemptAt),
            failed_at: optional(FailedAt),
            traceparent: optional(Traceparent),
            timestamp: optional(Timestamp),
            tracing_context: optional(TracingContext),
        }
    }
}

impl Columns {
    /// The configured column of `role`: `None` when an optional role is left empty. A
    /// required role's name is returned even when empty, for validation to refuse.
    pub fn name(&self, role: ColumnRole) -> Option<&str> {
        fn optional(name: &Option<String>) -> Option<&str> {
            name.as_deref()
        }
        match role {
            ColumnRole::Id => Some(&self.id),
            ColumnRole::OrderBy => optional(&self.order_by),
            ColumnRole::EventId => Some(&self.event_id),
            ColumnRole::Topic => optional(&self.topic),
            ColumnRole::Key => optional(&self.key),
            ColumnRole::Payload => Some(&self.payload),
            ColumnRole::Headers => optional(&self.headers),
            ColumnRole::CreatedAt => optional(&self.created_at),
            ColumnRole::PublishedAt => optional(&self.published_at),
            ColumnRole::Attempts => optional(&self.attempts),
            ColumnRole::LastError => optional(&self.last_error),
            ColumnRole::XactId => optional(&self.xact_id),
            ColumnRole::LastAttemptAt => optional(&self.last_attempt_at),
            ColumnRole::FailedAt => optional(&self.failed_at),
            ColumnRole::Traceparent => optional(&self.traceparent),
            ColumnRole::Timestamp => optional(&self.timestamp),
            ColumnRole::TracingContext => optional(&self.tracing_context),
        }
    }

    /// Every configured column name with its key under `outbox.columns`: the required roles
    /// first, then the others in declaration order (the order decides which bad name is
    /// reported first).
    pub fn named(&self) -> Vec<(&'static str, &str)> {
        let required = ColumnRole::ALL.into_iter().filter(|r| r.presence() == ColumnPresence::Required);
        let others = ColumnRole::ALL.into_iter().filter(|r| r.presence() != ColumnPresence::Required);
        required.chain(others).filter_map(|role| Some((role.key(), self.name(role)?))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_declaration_is_in_role_order() {
        for (index, role) in ColumnRole::ALL.into_iter().enumerate() {
            assert_eq!(DECLARATIONS[index].role, role);
            assert_eq!(role as usize, index);
        }
    }

    #[test]
    fn the_columns_section_has_exactly_the_declared_keys_in_their_order() {
        let rendered = toml::to_string(&Columns::default()).unwrap();
        let table: toml::Table = toml::from_str(&rendered).unwrap();
        let keys: Vec<&str> = table.keys().map(String::as_str).collect();
        let mut declared: Vec<&str> = ColumnRole::ALL.iter().map(|r| r.key()).collect();
        declared.sort_unstable();
        let mut keys_sorted = keys.clone();
        keys_sorted.sort_unstable();
        assert_eq!(keys_sorted, declared);
        let in_order: Vec<&str> = rendered.lines().filter_map(|l| l.split(" = ").next()).collect();
        let declared_order: Vec<&str> = ColumnRole::ALL.iter().map(|r| r.key()).collect();
        assert_eq!(in_order, declared_order, "`config` prints the roles in declaration order");
    }

    #[test]
    fn the_defaults_are_the_declared_standard_columns() {
        let columns = Columns::default();
        for role in ColumnRole::ALL {
            assert_eq!(columns.name(role), role.declaration().default_column, "{role:?}");
        }
    }

    #[test]
    fn only_required_roles_keep_an_empty_name() {
        let empty: String = ColumnRole::ALL.iter().map(|r| format!("{} = \"\"\n", r.key())).collect();
        let columns: Columns = toml::from_str(&empty).unwrap();
        for role in ColumnRole::ALL {
            let kept = columns.name(role).is_some();
            assert_eq!(kept, role.presence() == ColumnPresence::Required, "{role:?}");
        }
    }

    #[test]
    fn a_role_that_falls_back_names_a_required_role() {
        for role in ColumnRole::ALL {
            if let ColumnPresence::SameAs(other) = role.presence() {
                assert_eq!(other.presence(), ColumnPresence::Required, "{role:?}");
                assert!(role.declaration().default_column.is_none(), "{role:?}: empty means {other:?}");
            }
        }
    }

    /// The README's configuration table has one row per role, saying what the declaration says.
    #[test]
    fn the_readme_lists_every_role_as_declared() {
        let readme = include_str!("../../README.md");
        for role in ColumnRole::ALL {
            let declaration = role.declaration();
            let default = match (declaration.default_column, declaration.presence) {
                (Some(column), _) => format!("`{column}`"),
                (None, ColumnPresence::SameAs(other)) => format!("`\"\"` (= `{}`)", other.key()),
                (None, _) => "`\"\"`".to_owned(),
            };
            let row = format!("| `{}` | {default} | {} |", role.config_key(), declaration.summary);
            assert!(readme.lines().any(|line| line == row), "README.md lacks the row\n{row}");
        }
        let rows = readme.lines().filter(|line| line.starts_with("| `outbox.columns.")).count();
        assert_eq!(rows, ColumnRole::ALL.len(), "README.md has a row for a role that is not declared");
    }

    /// The outbox contract's table lists the standard table's columns: every declared default.
    #[test]
    fn the_readme_contract_names_every_standard_column() {
        let readme = include_str!("../../README.md");
        let contract: Vec<&str> = readme
            .lines()
            .skip_while(|line| !line.starts_with("| column "))
            .skip(2)
            .take_while(|line| line.starts_with('|'))
            .filter_map(|line| line.split('|').nth(1))
            .flat_map(|cell| cell.split(','))
            .map(|name| name.trim().trim_matches('`'))
            .collect();
        let mut standard: Vec<&str> = ColumnRole::ALL.iter().filter_map(|r| r.declaration().default_column).collect();
        let mut listed = contract.clone();
        standard.sort_unstable();
        listed.sort_unstable();
        assert_eq!(listed, standard);
    }
}
