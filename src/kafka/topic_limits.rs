//! What a topic's own configuration lets the broker refuse, read before the relay sends to it.
//!
//! Kafka validates a whole record batch at once: one record over the topic's
//! `max.message.bytes`, a batch that librdkafka filled past that limit (its `batch.size` is its
//! own, 1,000,000 bytes by default, whatever the topic allows), or a keyless record on a
//! compacted topic fails every record of the batch, and librdkafka does not split it. Charging
//! each of those rows as if it were its own fault would fail and park innocent keys. So the
//! relay reads each topic's limits once a minute with its existence check, refuses before
//! sending the one record that the broker would refuse (a clear row error naming the limit),
//! and keeps the records of a topic in flight below its limit, so that no batch librdkafka
//! builds for it can exceed it. This module computes; it sends nothing.

use std::collections::HashMap;

use crate::config::Config;
use crate::kafka::record::Record;

/// librdkafka's `batch.size` when `kafka.properties` does not set it.
const LIBRDKAFKA_BATCH_SIZE: usize = 1_000_000;

/// A record batch's header in Kafka's format (v2), which the broker's size check includes.
const RECORD_BATCH_OVERHEAD: usize = 61;

/// The limits of one topic that the broker enforces per record batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicLimits {
    /// The topic's `max.message.bytes`: the largest record batch it accepts. `None` when the
    /// relay could not read it (no `DescribeConfigs` permission, say).
    pub max_message_bytes: Option<usize>,
    /// Whether the topic is compacted (`cleanup.policy` includes `compact`), which refuses a
    /// record without a key.
    pub compacted: bool,
    /// How far before and after the broker's clock a record's own timestamp may be
    /// (`message.timestamp.before.max.ms`, `message.timestamp.after.max.ms`; Kafka 4 refuses
    /// one more than an hour ahead by default), in milliseconds; `None` when unknown or when
    /// the topic stamps records itself (`message.timestamp.type=LogAppendTime`).
    pub timestamp_window: Option<(i64, i64)>,
}

impl TopicLimits {
    /// Reads the limits out of a topic's configuration entries.
    pub fn from_entries(entries: &HashMap<&str, Option<&str>>) -> TopicLimits {
        let value = |name: &str| entries.get(name).copied().flatten();
        TopicLimits {
            max_message_bytes: value("max.message.bytes").and_then(|v| v.trim().parse().ok()),
            compacted: value("cleanup.policy").is_some_and(|v| v.split(',').any(|p| p.trim() == "compact")),
            timestamp_window: match value("message.timestamp.type") {
                Some("LogAppendTime") => None,
                _ => value("message.timestamp.before.max.ms")
                    .zip(value("message.timestamp.after.max.ms"))
                    .and_then(|(before, after)| Some((before.trim().parse().ok()?, after.trim().parse().ok()?))),
            },
        }
    }
}

/// How the relay's producer batches records, as far as the broker's size check is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerBatching {
    /// The most bytes librdkafka puts in one record batch.
    pub batch_size: usize,
    /// Whether records go uncompressed, so that their size on the wire is known here.
    pub uncompressed: bool,
}

impl ProducerBatching {
    /// The batching the relay's producer will use with `config`'s `kafka.properties`.
    pub fn of(config: &Config) -> ProducerBatching {
        let property = |name: &str| config.kafka.properties.get(name).map(|v| v.trim().to_ascii_lowercase());
        let batch_size = property("batch.size").and_then(|v| v.parse().ok()).unwrap_or(LIBRDKAFKA_BATCH_SIZE);
        let compression = property("compression.type").or_else(|| property("compression.codec"));
        ProducerBatching { batch_size, uncompressed: compression.is_none_or(|c| c == "none") }
    }

    /// Why the broker would refuse `record` on a topic with `limits` whatever else is in its
    /// batch, or `None`.
    pub fn refusal(&self, record: &Record, limits: &TopicLimits) -> Option<Refusal> {
        if limits.compacted && record.key.is_none() {
            return Some(refused(
                "invalid_record",
                format!(
                    "topic {} is compacted (cleanup.policy=compact) and the row has no key: Kafka refuses a record \
                     without a key on a compacted topic; give the row a key, or route it to a topic that is not compacted",
                    record.topic
                ),
            ));
        }
        // The clock is read only for the records that carry a timestamp of their own.
        if record.timestamp_ms.is_some()
            && let Some(refusal) = timestamp_refusal(record, limits, now_ms())
        {
            return Some(refusal);
        }
        let limit = limits.max_message_bytes?;
        let size = batch_size_alone(record);
        (self.uncompressed && size > limit).then(|| {
            refused(
                "message_too_large",
                format!(
                    "the record is {size} bytes in a batch of its own, over topic {}'s max.message.bytes = {limit}: \
                     make the row smaller, or raise the topic's max.message.bytes (and kafka.properties.message.max.bytes \
                     past it)",
                    record.topic
                ),
            )
        })
    }

    /// The bytes of a topic's records that may be in flight at once so that no batch
    /// librdkafka builds for it exceeds its limit; `None` when any batch fits anyway (or the
    /// size on the wire is not known here: compressed records).
    pub fn in_flight_limit(&self, limits: &TopicLimits) -> Option<usize> {
        let limit = limits.max_message_bytes?;
        (self.uncompressed && limit < self.batch_size + RECORD_BATCH_OVERHEAD).then_some(limit)
    }
}

/// The refusal of a record whose own timestamp (`outbox.columns.timestamp`) lies outside the
/// topic's window around `now_ms`: the broker refuses the whole batch holding it.
fn timestamp_refusal(record: &Record, limits: &TopicLimits, now_ms: i64) -> Option<Refusal> {
    let (timestamp, (before, after)) = (record.timestamp_ms?, limits.timestamp_window?);
    let (key, limit) = if timestamp > now_ms.saturating_add(after) {
        ("message.timestamp.after.max.ms", after)
    } else if timestamp < now_ms.saturating_sub(before) {
        ("message.timestamp.before.max.ms", before)
    } else {
        return None;
    };
    Some(refused(
        "invalid_record",
        format!(
            "the row's timestamp ({timestamp} ms since the epoch, from outbox.columns.timestamp) is more than topic {}'s              {key} = {limit} from now: Kafka refuses it; correct the row's timestamp, or raise the topic's {key}",
            record.topic
        ),
    ))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A record the broker would refuse whatever it is batched with: the row's own error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The metric label (`message_too_large`, `invalid_record`).
    pub reason: &'static str,
    /// What is wrong and what fixes it, for the row's last-error column.
    pub message: String,
}

fn refused(reason: &'static str, message: String) -> Refusal {
    Refusal { reason, message }
}

/// The size of a record batch holding `record` alone, in Kafka's format (v2) without
/// compression: the batch header, and the record with its length, attributes, timestamp and
/// offset deltas, key, value and headers. The deltas are counted at their largest plausible
/// size, so that a sum over several records stays an upper bound.
pub fn batch_size_alone(record: &Record) -> usize {
    RECORD_BATCH_OVERHEAD + record_size(record)
}

/// A record's bytes inside a batch (see [`batch_size_alone`]).
pub fn record_size(record: &Record) -> usize {
    let bytes = |value: Option<usize>| match value {
        Some(len) => varint_size(len as i64) + len,
        None => varint_size(-1),
    };
    let headers: usize = record
        .headers
        .iter()
        .map(|(name, value)| bytes(Some(name.len())) + bytes(value.as_ref().map(String::len)))
        .sum();
    // attributes (1), timestamp delta and offset delta (at most 5 bytes each here, but a
    // timestamp of the row's own may lie years from its batch's first: up to 10).
    let timestamp_delta = if record.timestamp_ms.is_some() { 10 } else { 5 };
    let body = 1
        + timestamp_delta
        + 5
        + bytes(record.key.as_ref().map(String::len))
        + bytes(record.payload.as_ref().map(Vec::len))
        + varint_size(record.headers.len() as i64)
        + headers;
    varint_size(body as i64) + body
}

/// Bytes of `value` as a zigzag varint, as Kafka's record format writes lengths.
fn varint_size(value: i64) -> usize {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    let mut size = 1;
    while zigzag >= 0x80 {
        zigzag >>= 7;
        size += 1;
    }
    size
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: Option<&str>, payload_len: usize) -> Record {
        Record {
            topic: "t".into(),
            key: key.map(str::to_owned),
            payload: Some(vec![b'x'; payload_len]),
            headers: vec![("event_id".into(), Some("0190e8a4-0000-7000-8000-000000000000".into()))],
            partition: None,
            timestamp_ms: None,
        }
    }

    #[test]
    fn a_timestamp_outside_the_topics_window_is_refused_before_sending_and_only_then() {
        let limits = TopicLimits { timestamp_window: Some((1_000, 3_600_000)), ..TopicLimits::default() };
        let stamped = |ms: i64| Record { timestamp_ms: Some(ms), ..record(Some("k"), 1) };
        let now = 1_764_900_000_000;
        let ahead = timestamp_refusal(&stamped(now + 3_600_001), &limits, now).expect("refused");
        assert!(ahead.message.contains("message.timestamp.after.max.ms = 3600000"), "{}", ahead.message);
        assert!(timestamp_refusal(&stamped(now - 1_001), &limits, now).unwrap().message.contains("before.max.ms"));
        assert_eq!(timestamp_refusal(&stamped(now + 3_600_000), &limits, now), None);
        assert_eq!(timestamp_refusal(&record(Some("k"), 1), &limits, now), None, "stamped when sent");
        let log_append = HashMap::from([
            ("message.timestamp.type", Some("LogAppendTime")),
            ("message.timestamp.before.max.ms", Some("1000")),
            ("message.timestamp.after.max.ms", Some("1000")),
        ]);
        assert_eq!(TopicLimits::from_entries(&log_append).timestamp_window, None, "the broker stamps them");
    }

    const PLAIN: ProducerBatching = ProducerBatching { batch_size: LIBRDKAFKA_BATCH_SIZE, uncompressed: true };

    #[test]
    fn varints_are_sized_as_kafka_writes_them() {
        assert_eq!(varint_size(-1), 1);
        assert_eq!(varint_size(63), 1);
        assert_eq!(varint_size(64), 2);
        assert_eq!(varint_size(8191), 2);
        assert_eq!(varint_size(8192), 3);
    }

    #[test]
    fn a_record_over_the_topics_limit_is_refused_naming_both_sizes() {
        let limits = TopicLimits { max_message_bytes: Some(1000), compacted: false, timestamp_window: None };
        assert_eq!(PLAIN.refusal(&record(Some("k"), 500), &limits), None);
        let refusal = PLAIN.refusal(&record(Some("k"), 2000), &limits).expect("too large");
        assert_eq!(refusal.reason, "message_too_large");
        assert!(refusal.message.contains("max.message.bytes = 1000"), "{refusal:?}");
        let compressed = ProducerBatching { uncompressed: false, ..PLAIN };
        assert_eq!(compressed.refusal(&record(Some("k"), 2000), &limits), None, "its size on the wire is unknown");
    }

    #[test]
    fn a_keyless_record_on_a_compacted_topic_is_refused() {
        let entries =
            HashMap::from([("cleanup.policy", Some("compact,delete")), ("max.message.bytes", Some("200000"))]);
        let limits = TopicLimits::from_entries(&entries);
        assert_eq!(limits, TopicLimits { max_message_bytes: Some(200_000), compacted: true, timestamp_window: None });
        assert_eq!(PLAIN.refusal(&record(None, 10), &limits).map(|r| r.reason), Some("invalid_record"));
        assert_eq!(PLAIN.refusal(&record(Some("k"), 10), &limits), None);
    }

    #[test]
    fn only_a_topic_whose_limit_is_below_the_producers_batches_needs_its_records_in_flight_bounded() {
        let small = TopicLimits { max_message_bytes: Some(200_000), compacted: false, timestamp_window: None };
        let default = TopicLimits { max_message_bytes: Some(1_048_588), compacted: false, timestamp_window: None };
        assert_eq!(PLAIN.in_flight_limit(&small), Some(200_000));
        assert_eq!(PLAIN.in_flight_limit(&default), None);
        assert_eq!(PLAIN.in_flight_limit(&TopicLimits::default()), None);
    }

    #[test]
    fn the_estimate_is_never_below_the_record_bytes() {
        let r = record(Some("key"), 300);
        assert!(batch_size_alone(&r) >= RECORD_BATCH_OVERHEAD + 3 + 300 + 8 + 36);
    }
}
