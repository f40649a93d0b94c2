//! Checks over the records read back from a topic: per-key order, duplicates that must be exact
//! copies, and the partition the Java client would choose (Kafka's murmur2, ported as the
//! reference the relay is checked against).

use std::collections::{HashMap, HashSet};

use super::records::Received;

/// The `n` of the payloads (`{"n": ...}`) of `key`'s records, in topic order, first copies only.
pub fn key_sequence(records: &[Received], key: &str) -> Vec<i64> {
    let mut seen = HashSet::new();
    records
        .iter()
        .filter(|r| r.key.as_deref() == Some(key) && seen.insert(r.event_id()))
        .filter_map(|r| r.payload_text())
        .filter_map(|p| serde_json::from_str::<serde_json::Value>(&p).ok()?["n"].as_i64())
        .collect()
}

/// Whether `copy` is the same record as `original` (event id, key, value, headers and
/// partition), whatever its offset.
pub fn is_same_record(original: &Received, copy: &Received) -> bool {
    original.partition == copy.partition
        && original.key == copy.key
        && original.payload == copy.payload
        && original.headers == copy.headers
}

/// Duplicated event ids of `records`, each checked byte-identical to its first copy.
pub fn identical_duplicates(records: &[Received]) -> HashSet<String> {
    let mut first: HashMap<String, &Received> = HashMap::new();
    let mut duplicated = HashSet::new();
    for record in records {
        match first.get(&record.event_id()) {
            None => {
                first.insert(record.event_id(), record);
            }
            Some(original) => {
                assert!(
                    is_same_record(original, record),
                    "a duplicate differs from its first copy: {original:?} / {record:?}"
                );
                duplicated.insert(record.event_id());
            }
        }
    }
    duplicated
}

/// Checks that, per key, the first copies of the events arrive in the order of the payload's
/// `n` (as written by [`NewEvent::keyed`]). Repeats after a crash come later and are ignored.
pub fn assert_first_copies_in_key_order(records: &[Received]) {
    let mut sorted: Vec<&Received> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut seen = HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    for record in sorted {
        if !seen.insert(record.event_id()) {
            continue;
        }
        let key = record.key.clone().unwrap_or_default();
        let payload: serde_json::Value =
            serde_json::from_slice(record.payload.as_deref().unwrap_or(b"null")).expect("JSON payload");
        let n = payload["n"].as_i64().expect("payload n");
        if let Some(previous) = last.insert(key.clone(), n) {
            assert!(n > previous, "key {key}: event {n} arrived after {previous}");
        }
    }
}

/// The partition the Java client's default partitioner picks for a keyed record.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// Kafka's `Utils.murmur2`, ported bit for bit, as the reference the relay is checked against.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    let mut h: u32 = SEED ^ (length as u32);
    for chunk in data.chunks_exact(4) {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = &data[length & !3..];
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}
