//! How values that TOML and environment variables cannot write directly are read and written:
//! "absent" as an empty string (neither can say null), optional durations, and librdkafka
//! properties whose values may arrive as numbers or booleans.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Environment values arrive as TOML-ish scalars (figment parses `5000` as a number), and TOML
/// files may write numbers and booleans; librdkafka wants strings. Underscores in keys stand
/// for dots because environment variable names cannot hold dots.
pub(super) fn deserialize_properties<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: BTreeMap<String, Scalar> = BTreeMap::deserialize(d)?;
    Ok(raw.into_iter().map(|(k, v)| (k.replace('_', "."), v.0)).collect())
}

struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Any {
            S(String),
            I(i64),
            U(u64),
            F(f64),
            B(bool),
        }
        Ok(Scalar(
            match Any::deserialize(d).map_err(|_| serde::de::Error::custom("expected a string, number or boolean"))? {
                Any::S(s) => s,
                Any::I(i) => i.to_string(),
                Any::U(u) => u.to_string(),
                Any::F(f) => f.to_string(),
                Any::B(b) => b.to_string(),
            },
        ))
    }
}

/// An optional duration: empty means "off".
pub(super) fn deserialize_optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => humantime::parse_duration(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

pub(super) fn serialize_optional_duration<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_str(""),
    }
}

/// Optional names are written as an empty string when absent, since neither TOML nor
/// environment variables can say "null".
pub(super) fn deserialize_optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()))
}

pub(super) fn serialize_optional<S: Serializer>(value: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(value.as_deref().unwrap_or(""))
}

pub(super) fn deserialize_optional_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    Ok(deserialize_optional(d)?.map(PathBuf::from))
}

pub(super) fn serialize_optional_path<S: Serializer>(value: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&value.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
}
