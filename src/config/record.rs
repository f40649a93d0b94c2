//! `[outbox.record]`: the shape of the Kafka record a row becomes, beyond which column is which:
//! the event-id header's name, how key and value are encoded, when a record is a tombstone,
//! and columns placed into headers, into a JSON envelope or as the partition.
//!
//! Each key answers an option of Debezium's outbox router (`io.debezium.transforms.outbox.
//! EventRouter`) and of the converters Kafka Connect writes its records with, so that
//! consumers written for Debezium read our records unchanged; the README pairs them.

use serde::{Deserialize, Serialize};

use super::Identifier;

/// `[outbox.record]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordConfig {
    /// The header carrying the row's event id. Debezium names it `id`.
    pub event_id_header: String,
    /// How the key column becomes the key bytes.
    pub key_format: KeyFormat,
    /// How the payload column becomes the value bytes.
    pub value_format: ValueFormat,
    /// Whether a payload that is empty or only whitespace is a tombstone too, not only a NULL
    /// one (Debezium's `route.tombstone.on.empty.payload`).
    pub tombstone_on_empty_payload: bool,
    /// Columns placed into the record, as Debezium's `table.fields.additional.placement`
    /// writes them: `column:header[:alias]`, `column:envelope[:alias]`, `column:partition`.
    pub placements: Vec<String>,
}

impl Default for RecordConfig {
    fn default() -> Self {
        RecordConfig {
            event_id_header: "event_id".to_owned(),
            key_format: KeyFormat::AsStored,
            value_format: ValueFormat::AsStored,
            tombstone_on_empty_payload: false,
            placements: Vec::new(),
        }
    }
}

/// How the key column becomes the key bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyFormat {
    /// The column's text (Kafka Connect's `StringConverter`).
    AsStored,
    /// The column's value as JSON: text quoted, numbers and booleans bare (Kafka Connect's
    /// `JsonConverter` with `schemas.enable=false`).
    Json,
}

/// How the payload column becomes the value bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueFormat {
    /// The payload as stored: JSON text, text or bytes (`StringConverter`).
    AsStored,
    /// The payload's text as a JSON string (`JsonConverter` without schemas, Debezium's
    /// `table.expand.json.payload=false`).
    JsonString,
    /// The payload's JSON as JSON, rebuilt as Kafka Connect rebuilds it (`JsonConverter`
    /// without schemas, `table.expand.json.payload=true`).
    JsonExpanded,
}

impl ValueFormat {
    /// Whether the value is written as JSON (so that an envelope can hold it).
    pub fn is_json(self) -> bool {
        matches!(self, ValueFormat::JsonString | ValueFormat::JsonExpanded)
    }
}

/// Where a placed column goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementTarget {
    /// A record header named by the alias.
    Header,
    /// A field of the JSON envelope `{"payload": ..., alias: value}`.
    Envelope,
    /// The record's partition (an integer column).
    Partition,
}

/// One checked entry of `outbox.record.placements`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The column placed.
    pub column: Identifier,
    /// Where it goes.
    pub target: PlacementTarget,
    /// The header or envelope field name: the alias, or the column's name.
    pub alias: String,
}

impl Placement {
    /// Reads `column:placement[:alias]`.
    pub fn parse(entry: &str) -> Result<Placement, String> {
        let parts: Vec<&str> = entry.split(':').map(str::trim).collect();
        let (column, target, alias) = match parts.as_slice() {
            [column, target] => (*column, *target, None),
            [column, target, alias] => (*column, *target, Some(*alias)),
            _ => return Err(format!("\"{entry}\" is not column:header|envelope|partition[:alias]")),
        };
        let column = Identifier::parse(column).map_err(|p| format!("\"{entry}\": column {p}"))?;
        let target = match target.to_ascii_lowercase().as_str() {
            "header" => PlacementTarget::Header,
            "envelope" => PlacementTarget::Envelope,
            "partition" => PlacementTarget::Partition,
            other => {
                return Err(format!("\"{entry}\": \"{other}\" is not a placement; use header, envelope or partition"));
            }
        };
        let alias = match alias {
            Some("") => return Err(format!("\"{entry}\": the alias is empty")),
            Some(alias) if target == PlacementTarget::Partition => {
                return Err(format!("\"{entry}\": a partition has no name, so \"{alias}\" names nothing"));
            }
            Some(alias) => alias.to_owned(),
            None => column.as_str().to_owned(),
        };
        Ok(Placement { column, target, alias })
    }
}

impl RecordConfig {
    /// The placements, checked; the error is for `outbox.record.placements`.
    pub fn parsed_placements(&self) -> Result<Vec<Placement>, String> {
        let placements: Vec<Placement> =
            self.placements.iter().map(|entry| Placement::parse(entry)).collect::<Result<_, _>>()?;
        if placements.iter().filter(|p| p.target == PlacementTarget::Partition).count() > 1 {
            return Err("names more than one partition column; a record has one partition".to_owned());
        }
        let envelope = placements.iter().filter(|p| p.target == PlacementTarget::Envelope);
        let mut fields = vec!["payload"];
        for placement in envelope {
            if fields.contains(&placement.alias.as_str()) {
                return Err(format!(
                    "puts two envelope fields named \"{}\" (the payload's field is \"payload\")",
                    placement.alias
                ));
            }
            fields.push(&placement.alias);
        }
        if let Some(header) =
            placements.iter().find(|p| p.target == PlacementTarget::Header && p.alias == self.event_id_header)
        {
            return Err(format!(
                "places column \"{}\" into header \"{}\", the event id's header (outbox.record.event_id_header); give it another alias",
                header.column.as_str(),
                header.alias
            ));
        }
        Ok(placements)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debeziums_placement_syntax_is_read() {
        let header = Placement::parse("type:header:eventType").unwrap();
        assert_eq!(
            (header.column.as_str(), header.target, header.alias.as_str()),
            ("type", PlacementTarget::Header, "eventType")
        );
        let envelope = Placement::parse("aggregatetype:envelope").unwrap();
        assert_eq!((envelope.target, envelope.alias.as_str()), (PlacementTarget::Envelope, "aggregatetype"));
        assert_eq!(Placement::parse("shard:partition").unwrap().target, PlacementTarget::Partition);
    }

    #[test]
    fn malformed_placements_say_what_is_wrong() {
        assert!(Placement::parse("type").unwrap_err().contains("column:header"));
        assert!(Placement::parse("type:body").unwrap_err().contains("\"body\" is not a placement"));
        assert!(Placement::parse("shard:partition:p").unwrap_err().contains("partition has no name"));
        assert!(Placement::parse("type:header:").unwrap_err().contains("alias is empty"));
    }

    #[test]
    fn placements_that_collide_are_refused() {
        let config = |placements: &[&str]| RecordConfig {
            event_id_header: "id".into(),
            placements: placements.iter().map(|p| p.to_string()).collect(),
            ..RecordConfig::default()
        };
        assert!(config(&["a:partition", "b:partition"]).parsed_placements().unwrap_err().contains("one partition"));
        assert!(config(&["a:envelope:payload"]).parsed_placements().unwrap_err().contains("\"payload\""));
        assert!(config(&["a:header:id"]).parsed_placements().unwrap_err().contains("event id's header"));
        assert_eq!(config(&["type:header:eventType", "type:envelope:eventType"]).parsed_placements().unwrap().len(), 2);
    }
}
