//! Turns an outbox row into the Kafka record it becomes.
//!
//! This is the only place that decides what a record looks like: key, value, headers, and the
//! `event_id` header that lets consumers deduplicate. A row that cannot become a valid record
//! (a NULL topic, headers that are not an object of strings) is refused here with an error that
//! says what is wrong with it; it is never published half-encoded.

use crate::postgres::layout::TopicSource;
use crate::postgres::row::OutboxRow;

/// The name of the header carrying the row's stable event id.
pub const EVENT_ID_HEADER: &str = "event_id";

/// The W3C trace context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Longest topic name Kafka accepts.
const MAX_TOPIC_LEN: usize = 249;

/// A record ready to hand to the producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Destination topic.
    pub topic: String,
    /// Partitioning key.
    pub key: Option<String>,
    /// Value bytes; `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Headers in order; the last one is always `event_id`.
    pub headers: Vec<(String, Option<String>)>,
}

impl Record {
    /// Builds the record for `row`, or says why the row cannot be published.
    pub fn from_row(row: &OutboxRow, topic: &TopicSource) -> Result<Record, String> {
        let topic = topic.topic(&row.topic_values)?;
        check_topic_name(&topic)?;
        let mut headers = match &row.headers {
            Some(json) => parse_headers(json)?,
            None => Vec::new(),
        };
        // A traceparent column joins the trace unless the headers already carry one.
        if let Some(traceparent) = &row.traceparent
            && !headers.iter().any(|(name, _)| name == TRACEPARENT_HEADER)
        {
            headers.push((TRACEPARENT_HEADER.to_owned(), Some(traceparent.clone())));
        }
        // The relay's event_id is the one consumers deduplicate on; a row cannot override it.
        headers.retain(|(name, _)| name != EVENT_ID_HEADER);
        headers.push((EVENT_ID_HEADER.to_owned(), Some(row.event_id.clone())));
        Ok(Record { topic, key: row.key.clone(), payload: row.payload.clone(), headers })
    }
}

/// Kafka accepts topic names of ASCII letters, digits, `.`, `_` and `-`, up to 249 characters.
fn check_topic_name(topic: &str) -> Result<(), String> {
    let valid_chars = topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if topic.is_empty() || topic == "." || topic == ".." || topic.len() > MAX_TOPIC_LEN || !valid_chars {
        return Err(format!(
            "topic \"{}\" is not a valid Kafka topic name (1-249 characters of a-z A-Z 0-9 . _ -)",
            topic.escape_debug()
        ));
    }
    Ok(())
}

/// Headers are a JSON object whose values are strings (or null for a header without value), sent
/// in the object's order (for `jsonb`, the order PostgreSQL keeps: shorter names first).
fn parse_headers(json: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("headers are not valid JSON: {e}"))?;
    match value {
        serde_json::Value::Object(_) => {}
        serde_json::Value::Null => return Ok(Vec::new()),
        other => {
            return Err(format!("headers must be a JSON object of strings, found {}", json_kind(&other)));
        }
    };
    // serde_json's own map sorts the names; this keeps them as written.
    let OrderedObject(entries) = serde_json::from_str(json).map_err(|e| format!("headers are not valid JSON: {e}"))?;
    entries
        .into_iter()
        .map(|(name, value)| match value {
            serde_json::Value::String(s) => Ok((name, Some(s))),
            serde_json::Value::Null => Ok((name, None)),
            other => Err(format!("header \"{name}\" is {}; header values must be strings", json_kind(&other))),
        })
        .collect()
}

/// A JSON object's entries in the order written; a repeated name keeps its first place and its
/// last value, as `jsonb` keeps the last.
struct OrderedObject(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for OrderedObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<OrderedObject, A::Error> {
                let mut entries: Vec<(String, serde_json::Value)> = Vec::new();
                while let Some((name, value)) = map.next_entry::<String, serde_json::Value>()? {
                    match entries.iter_mut().find(|(seen, _)| *seen == name) {
                        Some(entry) => entry.1 = value,
                        None => entries.push((name, value)),
                    }
                }
                Ok(OrderedObject(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Identifier, TopicTemplate};

    fn row() -> OutboxRow {
        OutboxRow {
            id: "7".into(),
            event_id: "0b5e3a1c-8a3f-4c59-9f0e-2d7b1c7c9a11".into(),
            key: Some("order-1".into()),
            payload: Some(br#"{"total":3}"#.to_vec()),
            headers: Some(r#"{"type":"OrderPlaced","event_id":"forged"}"#.into()),
            topic_values: vec![Some("orders".into())],
            created_at: None,
            traceparent: None,
            shard: 0,
        }
    }

    fn topic_column() -> TopicSource {
        TopicSource::Column(Identifier::parse("topic").unwrap())
    }

    #[test]
    fn a_record_carries_the_rows_headers_and_its_own_event_id_last() {
        let record = Record::from_row(&row(), &topic_column()).unwrap();
        assert_eq!(record.topic, "orders");
        assert_eq!(record.key.as_deref(), Some("order-1"));
        assert_eq!(
            record.headers,
            vec![
                ("type".to_owned(), Some("OrderPlaced".to_owned())),
                ("event_id".to_owned(), Some("0b5e3a1c-8a3f-4c59-9f0e-2d7b1c7c9a11".to_owned())),
            ]
        );
    }

    #[test]
    fn headers_keep_the_objects_order_and_a_repeated_name_its_last_value() {
        let mut row = row();
        row.headers = Some(r#"{"type": "A", "trace": null, "correlation_id": "c", "type": "B"}"#.into());
        let record = Record::from_row(&row, &topic_column()).unwrap();
        let names: Vec<(&str, Option<&str>)> = record.headers.iter().map(|(n, v)| (n.as_str(), v.as_deref())).collect();
        assert_eq!(
            names,
            [
                ("type", Some("B")),
                ("trace", None),
                ("correlation_id", Some("c")),
                ("event_id", Some(row.event_id.as_str()))
            ]
        );
    }

    #[test]
    fn a_header_that_is_not_a_string_refuses_the_row_and_names_the_header() {
        let mut row = row();
        row.headers = Some(r#"{"retries": 3}"#.into());
        let err = Record::from_row(&row, &topic_column()).unwrap_err();
        assert!(err.contains("\"retries\"") && err.contains("number"), "{err}");
    }

    #[test]
    fn headers_that_are_not_an_object_refuse_the_row() {
        let mut row = row();
        row.headers = Some("[1,2]".into());
        assert!(Record::from_row(&row, &topic_column()).unwrap_err().contains("an array"));
    }

    #[test]
    fn a_null_topic_refuses_the_row() {
        let mut row = row();
        row.topic_values = vec![None];
        assert!(Record::from_row(&row, &topic_column()).unwrap_err().contains("NULL"));
    }

    #[test]
    fn an_invalid_topic_name_refuses_the_row() {
        let mut row = row();
        row.topic_values = vec![Some("no spaces allowed".into())];
        assert!(Record::from_row(&row, &topic_column()).unwrap_err().contains("not a valid Kafka topic"));
    }

    #[test]
    fn a_template_topic_is_built_from_the_rows_columns() {
        let mut row = row();
        row.topic_values = vec![Some("order".into())];
        let source = TopicSource::Template(TopicTemplate::parse("outbox.event.{aggregatetype}").unwrap());
        assert_eq!(Record::from_row(&row, &source).unwrap().topic, "outbox.event.order");
    }

    mod hostile {
        //! Arbitrary rows: whatever the application wrote, building the record returns a record or
        //! a reason, never panics, and a record always carries the row's own event id once.

        use proptest::prelude::*;
        use serde_json::Value;

        use super::*;

        /// Any JSON document, nested a few levels.
        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                any::<String>().prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(header_name(), inner, 0..6)
                        .prop_map(|map| Value::Object(map.into_iter().collect())),
                ]
            })
        }

        fn header_name() -> impl Strategy<Value = String> {
            prop_oneof![Just(EVENT_ID_HEADER.to_owned()), Just(TRACEPARENT_HEADER.to_owned()), any::<String>()]
        }

        /// The headers column: absent, any text, any JSON, or an object of mostly strings.
        fn headers() -> impl Strategy<Value = Option<String>> {
            let strings = prop::collection::btree_map(
                header_name(),
                prop_oneof![8 => any::<String>().prop_map(Value::String), 1 => json()],
                0..6,
            )
            .prop_map(|map| Value::Object(map.into_iter().collect()).to_string());
            prop_oneof![
                2 => Just(None),
                1 => any::<String>().prop_map(Some),
                1 => json().prop_map(|v| Some(v.to_string())),
                3 => strings.prop_map(Some),
            ]
        }

        fn topic_value() -> impl Strategy<Value = Option<String>> {
            prop_oneof![
                1 => Just(None),
                4 => "[a-zA-Z0-9._-]{1,249}".prop_map(Some),
                1 => prop_oneof![Just(""), Just("."), Just(".."), Just("no spaces"), Just("ünïcode")]
                    .prop_map(|t| Some(t.to_owned())),
                1 => Just(Some("t".repeat(250))),
                1 => any::<String>().prop_map(Some),
            ]
        }

        fn payload() -> impl Strategy<Value = Option<Vec<u8>>> {
            prop_oneof![
                Just(None),
                Just(Some(Vec::new())),
                prop::collection::vec(any::<u8>(), 0..512).prop_map(Some),
                Just(Some(vec![0xff; 2 * 1024 * 1024])),
            ]
        }

        fn rows() -> impl Strategy<Value = OutboxRow> {
            (
                any::<String>(),
                prop::option::of(any::<String>()),
                payload(),
                headers(),
                prop::option::of(any::<String>()),
                prop::collection::vec(topic_value(), 1..3),
            )
                .prop_map(|(event_id, key, payload, headers, traceparent, topic_values)| OutboxRow {
                    id: "1".into(),
                    event_id,
                    key,
                    payload,
                    headers,
                    created_at: None,
                    traceparent,
                    shard: 0,
                    topic_values,
                })
        }

        /// What the contract says: headers are absent, JSON null, or an object of strings and nulls.
        fn headers_are_acceptable(headers: &Option<String>) -> bool {
            match headers.as_deref().map(serde_json::from_str::<Value>) {
                None | Some(Ok(Value::Null)) => true,
                Some(Ok(Value::Object(map))) => map.values().all(|v| matches!(v, Value::String(_) | Value::Null)),
                Some(_) => false,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_row_becomes_a_whole_record_or_a_reason(row in rows()) {
                let topic = TopicSource::Column(Identifier::parse("topic").unwrap());
                match Record::from_row(&row, &topic) {
                    Ok(record) => {
                        let event_ids: Vec<_> = record.headers.iter().filter(|(n, _)| n == EVENT_ID_HEADER).collect();
                        prop_assert_eq!(event_ids.len(), 1);
                        prop_assert_eq!(event_ids[0].1.as_deref(), Some(row.event_id.as_str()));
                        prop_assert_eq!(record.headers.last().map(|(n, _)| n.as_str()), Some(EVENT_ID_HEADER));
                        prop_assert!(check_topic_name(&record.topic).is_ok());
                        prop_assert_eq!(Some(&record.topic), row.topic_values.first().and_then(Option::as_ref));
                        prop_assert_eq!(&record.key, &row.key);
                        prop_assert_eq!(&record.payload, &row.payload, "the value is the row's, whole");
                        prop_assert!(headers_are_acceptable(&row.headers));
                    }
                    Err(reason) => {
                        prop_assert!(!reason.is_empty());
                        let topic_ok = matches!(row.topic_values.first(), Some(Some(t)) if check_topic_name(t).is_ok());
                        let valid = topic_ok && headers_are_acceptable(&row.headers);
                        prop_assert!(!valid, "refused a valid row: {}", reason);
                    }
                }
            }
        }

        #[test]
        fn headers_nested_deeper_than_the_json_parser_allows_are_refused() {
            let mut row = row();
            row.headers = Some(format!("{}{}", "{\"a\":".repeat(100_000), "}".repeat(100_000)));
            let err = Record::from_row(&row, &topic_column()).unwrap_err();
            assert!(err.contains("headers are not valid JSON") && err.contains("recursion limit"), "{err}");
        }
    }
}

#[cfg(test)]
mod traceparent_tests {
    use super::*;
    use crate::config::Identifier;

    fn row(headers: Option<&str>, traceparent: Option<&str>) -> OutboxRow {
        OutboxRow {
            id: "1".into(),
            event_id: "e".into(),
            key: None,
            payload: None,
            headers: headers.map(|h| h.to_owned()),
            topic_values: vec![Some("t".into())],
            created_at: None,
            traceparent: traceparent.map(|t| t.to_owned()),
            shard: 0,
        }
    }

    #[test]
    fn a_traceparent_column_becomes_a_header_unless_the_headers_carry_one() {
        let topic = TopicSource::Column(Identifier::parse("topic").unwrap());
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let record = Record::from_row(&row(None, Some(tp)), &topic).unwrap();
        assert!(record.headers.contains(&("traceparent".to_owned(), Some(tp.to_owned()))));
        let record = Record::from_row(&row(Some(r#"{"traceparent": "00-x-y-01"}"#), Some(tp)), &topic).unwrap();
        let traceparents: Vec<_> = record.headers.iter().filter(|(n, _)| n == "traceparent").collect();
        assert_eq!(traceparents.len(), 1, "the row's own header wins");
        assert_eq!(traceparents[0].1.as_deref(), Some("00-x-y-01"));
    }
}
