//! `[outbox]`: the table, how a row's topic is found and what "published" means for a row.
//! Its column names are `[outbox.columns]`, declared with their roles in [`super::columns`].

use serde::{Deserialize, Serialize};

use super::serde_text::{deserialize_optional, serialize_optional};
use super::{Columns, RecordConfig, TopicRouteConfig};

/// `[outbox]`: the table and how its columns become a Kafka record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// The outbox table, optionally schema-qualified (`app.outbox`). Taken literally, so
    /// case matters.
    pub table: String,
    /// Builds the topic from columns, for example `outbox.event.{aggregatetype}`.
    /// When set, `columns.topic` is not used.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub topic_template: Option<String>,
    /// Routes by one column through a regular expression, as Debezium's outbox router does.
    /// When set, neither `columns.topic` nor `topic_template` is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_route: Option<TopicRouteConfig>,
    /// What "published" means for a row: `update` sets the published-at column, `delete`
    /// removes the row once the broker has it.
    pub mark: MarkMode,
    /// Whether consumers need a key's rows in insertion order (the default). The relay then
    /// refuses an order column that cannot give that order (see `OrderColumn` in `postgres::layout`);
    /// `false` accepts any order column and publishes a key's rows in its order, whatever it is.
    pub per_key_order: bool,
    /// Column names.
    pub columns: Columns,
    /// The record's shape beyond its columns: headers, encodings, placements.
    pub record: RecordConfig,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            table: "outbox".to_owned(),
            topic_template: None,
            topic_route: None,
            mark: MarkMode::Update,
            per_key_order: true,
            columns: Columns::default(),
            record: RecordConfig::default(),
        }
    }
}

/// How a row is recorded as published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarkMode {
    /// Set the published-at column to `now()`; the row stays for `audit` and history.
    Update,
    /// Delete the row; the table holds only what is still to be published.
    Delete,
}
