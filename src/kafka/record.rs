//! Turns an outbox row into the Kafka record it becomes.
//!
//! This is the only place that decides what a record looks like: key, value, headers, and the
//! `event_id` header that lets consumers deduplicate. A row that cannot become a valid record
//! (a NULL topic, headers that are not an object of strings) is refused here with an error that
//! says what is wrong with it; it is never published half-encoded.

use crate::config::{KeyFormat, PlacementTarget, ValueFormat};
use crate::kafka::connect_json::{self, column_header, column_json};
use crate::kafka::trace_context::trace_headers;
use crate::postgres::layout::{Layout, PayloadKind};
use crate::postgres::row::OutboxRow;

/// The default name of the header carrying the row's stable event id
/// (`outbox.record.event_id_header`).
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
    /// Headers in order: the row's own, its trace context, the event id, then the placed
    /// columns.
    pub headers: Vec<(String, Option<String>)>,
    /// The partition a placed column names; `None`: the key's partition.
    pub partition: Option<i32>,
    /// The timestamp column, in milliseconds since the epoch; `None`: when it is sent.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    /// Builds the record for `row` in the shape `layout` gives it, or says why the row cannot
    /// be published.
    pub fn from_row(row: &OutboxRow, layout: &Layout) -> Result<Record, String> {
        let mapping = &layout.mapping;
        let shape = &mapping.record;
        let topic = mapping.topic.topic(&row.topic_values)?;
        check_topic_name(&topic)?;
        let mut headers = match &row.headers {
            Some(json) => parse_headers(json)?,
            None => Vec::new(),
        };
        // A traceparent column joins the trace unless the headers already carry one; a tracing
        // context column adds what neither carries.
        let mut trace = Vec::new();
        if let Some(traceparent) = &row.traceparent {
            trace.push((TRACEPARENT_HEADER.to_owned(), traceparent.clone()));
        }
        if let Some(context) = &row.tracing_context {
            trace.extend(trace_headers(context));
        }
        for (name, value) in trace {
            if !headers.iter().any(|(seen, _)| *seen == name) {
                headers.push((name, Some(value)));
            }
        }
        // The relay's event id is the one consumers deduplicate on; a row cannot override it.
        let event_id_header = shape.event_id_header.as_str();
        headers.retain(|(name, _)| name != event_id_header);
        headers.push((event_id_header.to_owned(), Some(row.event_id.clone())));

        let mut partition = None;
        let mut envelope = Vec::new();
        for ((placement, kind), value) in mapping.placements.iter().zip(&layout.placement_kinds).zip(&row.placed) {
            match placement.target {
                PlacementTarget::Header => {
                    headers.push((placement.alias.clone(), value.as_deref().map(|v| column_header(v, *kind))))
                }
                PlacementTarget::Envelope => envelope.push((&placement.alias, column_json(value.as_deref(), *kind))),
                PlacementTarget::Partition => {
                    partition = value.as_deref().map(|v| partition_of(placement.column.as_str(), v)).transpose()?
                }
            }
        }
        let key = match shape.key_format {
            KeyFormat::AsStored => row.key.clone(),
            // A NULL key is JSON's null, as Connect writes a missing value of an optional field.
            KeyFormat::Json if mapping.key.is_some() => Some(column_json(row.key.as_deref(), layout.key_kind)),
            KeyFormat::Json => None,
        };
        let payload = value(row.payload.as_deref(), layout, &envelope)?;
        if let Some(ms) = row.timestamp_ms
            && ms < 0
        {
            return Err(format!(
                "timestamp column \"{}\" is before 1970; Kafka takes no earlier timestamp",
                mapping.timestamp.as_ref().map_or("", |c| c.as_str())
            ));
        }
        Ok(Record { topic, key, payload, headers, partition, timestamp_ms: row.timestamp_ms })
    }
}

/// The value bytes of a payload in the configured format, wrapped in the envelope when columns
/// are placed there.
fn value(payload: Option<&[u8]>, layout: &Layout, envelope: &[(&String, String)]) -> Result<Option<Vec<u8>>, String> {
    let shape = &layout.mapping.record;
    // Debezium's test of an empty payload, Java's trim: nothing but characters up to the space.
    let blank = payload.is_some_and(|p| p.iter().all(|b| *b <= b' '));
    if shape.tombstone_on_empty_payload && (payload.is_none() || blank) {
        return Ok(None);
    }
    let Some(payload) = payload else {
        // A NULL payload: a tombstone as stored; JSON's null when written as JSON, as Connect
        // writes a missing value.
        return Ok(shape.value_format.is_json().then(|| wrap(envelope, "null".to_owned()).into_bytes()));
    };
    let json = match shape.value_format {
        ValueFormat::AsStored => return Ok(Some(payload.to_vec())),
        _ if layout.payload == PayloadKind::Bytes => {
            return Err("a bytea payload has no text to write as JSON (outbox.record.value_format)".to_owned());
        }
        ValueFormat::JsonString => connect_json::json_string(payload_text(payload)?),
        ValueFormat::JsonExpanded => {
            let text = payload_text(payload)?;
            connect_json::expand(text).unwrap_or_else(|| connect_json::json_string(text))
        }
    };
    Ok(Some(wrap(envelope, json).into_bytes()))
}

fn payload_text(payload: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(payload).map_err(|e| format!("payload is not UTF-8 text: {e}"))
}

/// `{"payload": ..., alias: value, ...}` when columns are placed into the envelope; the
/// payload alone otherwise.
fn wrap(envelope: &[(&String, String)], payload: String) -> String {
    if envelope.is_empty() {
        return payload;
    }
    let mut out = String::with_capacity(payload.len() + 32 * envelope.len());
    out.push_str("{\"payload\":");
    out.push_str(&payload);
    for (alias, value) in envelope {
        out.push(',');
        connect_json::push_json_string(&mut out, alias);
        out.push(':');
        out.push_str(value);
    }
    out.push('}');
    out
}

/// The partition a placed column names: from 0 up; whether the topic has it is checked when
/// the record is sent.
fn partition_of(column: &str, value: &str) -> Result<i32, String> {
    match value.parse::<i64>().map(i32::try_from) {
        Ok(Ok(partition)) if partition >= 0 => Ok(partition),
        _ => Err(format!("partition column \"{column}\" holds {value}; a partition is a number from 0 up")),
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
    use crate::config::Config;
    use crate::postgres::layout::Mapping;
    use crate::postgres::layout::tests::{standard_layout, standard_layout_columns};

    /// The standard table's layout under `config`, with `extra` columns added to the table.
    fn layout_of(config: Config, extra: &[(&str, &str)]) -> Layout {
        let mut columns = standard_layout_columns();
        columns.extend(extra.iter().map(|(n, t)| (n.to_string(), t.to_string())));
        Mapping::from_config(&config).unwrap().resolve(&columns).unwrap()
    }

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
            timestamp_ms: None,
            tracing_context: None,
            shard: 0,
            placed: Vec::new(),
        }
    }

    fn topic_column() -> Layout {
        standard_layout()
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
        let mut config = Config::default();
        config.outbox.topic_template = Some("outbox.event.{aggregatetype}".into());
        let layout = layout_of(config, &[("aggregatetype", "text")]);
        assert_eq!(Record::from_row(&row, &layout).unwrap().topic, "outbox.event.order");
    }

    mod hostile {
        //! Arbitrary rows: whatever the application wrote, building the record returns a record or
        //! a reason, never panics, and a record always carries the row's own event id once.

        use proptest::prelude::*;
        use serde_json::Value;

        use super::*;

        /// Any JSON document, nested a few levels, its keys sometimes the relay's own headers'.
        fn json() -> impl Strategy<Value = Value> {
            crate::kafka::connect_json::tests::hostile::any_json(header_name())
        }

        fn header_name() -> impl Strategy<Value = String> + Clone {
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
                    timestamp_ms: None,
                    tracing_context: None,
                    shard: 0,
                    topic_values,
                    placed: Vec::new(),
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
                match Record::from_row(&row, &standard_layout()) {
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
mod debezium_shape_tests {
    //! The shapes of Debezium's outbox router: its table, its header and placements, and the
    //! converters' encodings. `tests/it/debezium_compare.rs` checks them against Debezium's own.

    use super::*;
    use crate::config::{Config, TopicRouteConfig};

    /// Debezium's documented table with `examples/debezium.toml`'s record options.
    fn debezium(change: impl FnOnce(&mut Config)) -> Layout {
        let mut config = Config::default();
        let outbox = &mut config.outbox;
        outbox.table = "outboxevent".into();
        outbox.mark = crate::config::MarkMode::Delete;
        outbox.topic_route = Some(TopicRouteConfig {
            column: "aggregatetype".into(),
            regex: crate::config::DEFAULT_ROUTE_REGEX.into(),
            replacement: crate::config::DEFAULT_ROUTE_REPLACEMENT.into(),
        });
        outbox.columns.id = "id".into();
        outbox.columns.event_id = "id".into();
        outbox.columns.key = Some("aggregateid".into());
        let columns = &mut outbox.columns;
        (columns.topic, columns.headers, columns.created_at, columns.published_at) = (None, None, None, None);
        (columns.attempts, columns.last_error, columns.last_attempt_at) = (None, None, None);
        (columns.failed_at, columns.xact_id) = (None, None);
        outbox.record.event_id_header = "id".into();
        outbox.record.placements = vec!["type:header:eventType".into()];
        change(&mut config);
        let table = [
            ("id", "uuid"),
            ("aggregatetype", "character varying(255)"),
            ("aggregateid", "character varying(255)"),
            ("type", "character varying(255)"),
            ("payload", "jsonb"),
            ("partition_no", "integer"),
            ("weight", "double precision"),
            ("occurred_at", "timestamp without time zone"),
            ("tracingspancontext", "text"),
        ];
        let columns: Vec<(String, String)> = table.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect();
        crate::postgres::layout::Mapping::from_config(&config).unwrap().resolve(&columns).unwrap()
    }

    fn row(payload: Option<&str>) -> OutboxRow {
        OutboxRow {
            id: "4c1b3a3e-6a43-4b0e-9b7c-0f5d1e2a3b4c".into(),
            event_id: "4c1b3a3e-6a43-4b0e-9b7c-0f5d1e2a3b4c".into(),
            key: Some("order-1".into()),
            payload: payload.map(|p| p.as_bytes().to_vec()),
            headers: None,
            created_at: None,
            traceparent: None,
            timestamp_ms: None,
            tracing_context: None,
            shard: 0,
            topic_values: vec![Some("order".into())],
            placed: vec![Some("OrderCreated".into())],
        }
    }

    fn value(record: &Record) -> &str {
        std::str::from_utf8(record.payload.as_deref().unwrap()).unwrap()
    }

    #[test]
    fn debeziums_documented_example_routes_keys_and_heads_as_its_router_does() {
        let record = Record::from_row(&row(Some(r#"{"total": 3}"#)), &debezium(|_| {})).unwrap();
        assert_eq!(record.topic, "outbox.event.order");
        assert_eq!(record.key.as_deref(), Some("order-1"));
        assert_eq!(value(&record), r#"{"total": 3}"#, "the payload as stored");
        let id = row(None).event_id;
        assert_eq!(
            record.headers,
            [("id".to_owned(), Some(id)), ("eventType".to_owned(), Some("OrderCreated".to_owned()))]
        );
        assert_eq!((record.partition, record.timestamp_ms), (None, None));
    }

    #[test]
    fn the_json_formats_quote_the_key_and_the_payload_or_expand_it() {
        let json_string = debezium(|c| {
            c.outbox.record.key_format = KeyFormat::Json;
            c.outbox.record.value_format = ValueFormat::JsonString;
        });
        let record = Record::from_row(&row(Some(r#"{"total": 3}"#)), &json_string).unwrap();
        assert_eq!(record.key.as_deref(), Some(r#""order-1""#));
        assert_eq!(value(&record), r#""{\"total\": 3}""#);
        let expanded = debezium(|c| c.outbox.record.value_format = ValueFormat::JsonExpanded);
        let record = Record::from_row(&row(Some(r#"{"total": 3, "note": null}"#)), &expanded).unwrap();
        assert_eq!(value(&record), r#"{"total":3}"#);
    }

    #[test]
    fn a_null_payload_is_a_tombstone_as_stored_and_json_null_as_json_unless_tombstones_are_asked_for() {
        assert_eq!(Record::from_row(&row(None), &debezium(|_| {})).unwrap().payload, None);
        let json = |tombstone: bool| {
            debezium(move |c| {
                c.outbox.record.value_format = ValueFormat::JsonString;
                c.outbox.record.tombstone_on_empty_payload = tombstone;
            })
        };
        assert_eq!(value(&Record::from_row(&row(None), &json(false)).unwrap()), "null");
        assert_eq!(Record::from_row(&row(None), &json(true)).unwrap().payload, None);
    }

    #[test]
    fn a_blank_payload_is_a_tombstone_only_when_asked_for() {
        let text = |tombstone: bool| debezium(move |c| c.outbox.record.tombstone_on_empty_payload = tombstone);
        assert_eq!(value(&Record::from_row(&row(Some(" \n")), &text(false)).unwrap()), " \n");
        assert_eq!(Record::from_row(&row(Some(" \n")), &text(true)).unwrap().payload, None);
        assert!(Record::from_row(&row(Some("x")), &text(true)).unwrap().payload.is_some());
    }

    #[test]
    fn envelope_fields_follow_the_payload_typed_as_their_columns() {
        let layout = debezium(|c| {
            c.outbox.record.value_format = ValueFormat::JsonExpanded;
            c.outbox.record.placements =
                vec!["type:envelope:eventType".into(), "weight:envelope".into(), "partition_no:envelope:p".into()];
        });
        let mut row = row(Some(r#"{"a": 1}"#));
        row.placed = vec![Some("OrderCreated".into()), Some("2".into()), None];
        let record = Record::from_row(&row, &layout).unwrap();
        assert_eq!(value(&record), r#"{"payload":{"a":1},"eventType":"OrderCreated","weight":2.0,"p":null}"#);
        row.payload = None;
        let record = Record::from_row(&row, &layout).unwrap();
        assert_eq!(value(&record), r#"{"payload":null,"eventType":"OrderCreated","weight":2.0,"p":null}"#);
    }

    #[test]
    fn a_partition_column_sets_the_partition_and_a_negative_one_refuses_the_row() {
        let layout = debezium(|c| c.outbox.record.placements = vec!["partition_no:partition".into()]);
        let mut row = row(Some("{}"));
        row.placed = vec![Some("2".into())];
        assert_eq!(Record::from_row(&row, &layout).unwrap().partition, Some(2));
        row.placed = vec![None];
        assert_eq!(Record::from_row(&row, &layout).unwrap().partition, None, "NULL: the key's partition");
        row.placed = vec![Some("-1".into())];
        let err = Record::from_row(&row, &layout).unwrap_err();
        assert!(err.contains("\"partition_no\"") && err.contains("-1"), "{err}");
    }

    #[test]
    fn the_timestamp_and_the_tracing_context_reach_the_record() {
        let layout = debezium(|c| {
            c.outbox.columns.timestamp = Some("occurred_at".into());
            c.outbox.columns.tracing_context = Some("tracingspancontext".into());
        });
        let mut row = row(Some("{}"));
        row.timestamp_ms = Some(1_764_900_000_123);
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        row.tracing_context = Some(format!("#Thu Dec 03 10:00:00 UTC 2026\ntraceparent={traceparent}\n"));
        let record = Record::from_row(&row, &layout).unwrap();
        assert_eq!(record.timestamp_ms, Some(1_764_900_000_123));
        assert_eq!(record.headers[0], ("traceparent".to_owned(), Some(traceparent.to_owned())));
        assert_eq!(record.headers[1].0, "id");
        row.timestamp_ms = Some(-1);
        assert!(Record::from_row(&row, &layout).unwrap_err().contains("before 1970"));
    }

    #[test]
    fn a_routed_topic_that_is_not_a_valid_name_refuses_the_row() {
        let mut row = row(Some("{}"));
        row.topic_values = vec![Some("no spaces".into())];
        assert!(Record::from_row(&row, &debezium(|_| {})).unwrap_err().contains("not a valid Kafka topic"));
        row.topic_values = vec![None];
        assert!(Record::from_row(&row, &debezium(|_| {})).unwrap_err().contains("\"aggregatetype\" is NULL"));
    }
}

#[cfg(test)]
mod traceparent_tests {
    use super::*;
    use crate::postgres::layout::tests::standard_layout;

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
            timestamp_ms: None,
            tracing_context: None,
            shard: 0,
            placed: Vec::new(),
        }
    }

    #[test]
    fn a_traceparent_column_becomes_a_header_unless_the_headers_carry_one() {
        let topic = standard_layout();
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let record = Record::from_row(&row(None, Some(tp)), &topic).unwrap();
        assert!(record.headers.contains(&("traceparent".to_owned(), Some(tp.to_owned()))));
        let record = Record::from_row(&row(Some(r#"{"traceparent": "00-x-y-01"}"#), Some(tp)), &topic).unwrap();
        let traceparents: Vec<_> = record.headers.iter().filter(|(n, _)| n == "traceparent").collect();
        assert_eq!(traceparents.len(), 1, "the row's own header wins");
        assert_eq!(traceparents[0].1.as_deref(), Some("00-x-y-01"));
    }
}
