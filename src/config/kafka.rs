//! `[kafka]`: the brokers, librdkafka properties, TLS and SASL.
//!
//! The section builds its own librdkafka settings ([`KafkaConfig::producer_settings`]):
//! validation hands them to librdkafka to have every property checked, and the publisher starts
//! from them and adds only what the producer itself decides.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use super::serde_text::{
    deserialize_optional, deserialize_optional_path, deserialize_properties, serialize_optional,
    serialize_optional_path,
};
use super::validate::check_readable;
use super::{ConfigError, Secret};

/// Properties the relay sets itself because its delivery guarantee depends on them.
/// A user value that contradicts one of these is a configuration error, not a silent override.
const ENFORCED_PROPERTIES: &[(&str, &[&str], &str)] = &[
    (
        "enable.idempotence",
        &["true"],
        "the relay needs the idempotent producer so that librdkafka's retries never duplicate or reorder records",
    ),
    ("acks", &["all", "-1"], "a row is marked published only after every in-sync replica has it"),
    ("request.required.acks", &["all", "-1"], "a row is marked published only after every in-sync replica has it"),
];

/// `[kafka]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap brokers, `host:port`.
    pub brokers: String,
    /// librdkafka producer properties passed through as they are (keys as in librdkafka's
    /// CONFIGURATION.md; an underscore in a key stands for a dot, so that environment
    /// variables can carry them).
    #[serde(deserialize_with = "deserialize_properties")]
    pub properties: BTreeMap<String, String>,
    /// How the relay reaches the brokers: plaintext, ssl, sasl_plaintext or sasl_ssl.
    pub security_protocol: SecurityProtocol,
    /// TLS to the brokers (with `ssl` and `sasl_ssl`).
    pub tls: KafkaTls,
    /// SASL authentication (with `sasl_plaintext` and `sasl_ssl`).
    pub sasl: KafkaSasl,
    /// How long `run` waits at startup for a broker to answer before it exits (2) saying the
    /// address is wrong or unreachable. Until then it takes no shards, so a relay that cannot
    /// produce never holds rows back from the others. Once a broker has answered, outages are
    /// waited out however long they last.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// What consumers can rely on: `at_least_once` (the idempotent producer; a relay crash can
    /// repeat up to two batches) or `exactly_once` (Kafka transactions; consumers reading with
    /// `isolation.level=read_committed` see each row once, whatever the relay's crashes).
    pub delivery: Delivery,
    /// `[kafka.exactly_once]`: what the transactions of `delivery = "exactly_once"` use.
    pub exactly_once: ExactlyOnce,
}

/// `kafka.delivery`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Idempotent producer, rows marked after their acknowledgements: a crash between the two
    /// publishes those rows again, and consumers deduplicate by `event_id`.
    #[default]
    AtLeastOnce,
    /// One Kafka transaction per batch, with a progress record for each of its shards naming
    /// its rows; rows are marked after the commit, and a crash before the mark is repaired from
    /// the progress records, so `read_committed` consumers see every row once.
    ExactlyOnce,
}

/// `[kafka.exactly_once]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExactlyOnce {
    /// The compacted topic holding each shard's owner and last committed batches (their rows'
    /// ids), written in the batches' transactions. Created by the operator, like every topic.
    pub progress_topic: String,
    /// The start of the relay's `transactional.id` (`PREFIX.DATABASE.SCHEMA.TABLE.<random>`,
    /// new for each producer) and of the progress records' keys
    /// (`PREFIX.DATABASE.SCHEMA.TABLE.SHARD`). Every relay of one table uses the same prefix (a
    /// new owner of a shard finds the producer to fence under the shard's key).
    pub transactional_id_prefix: String,
}

impl Default for ExactlyOnce {
    fn default() -> Self {
        ExactlyOnce {
            progress_topic: "outbox-relay-progress".to_owned(),
            transactional_id_prefix: "outbox-relay".to_owned(),
        }
    }
}

impl ExactlyOnce {
    /// The key of the progress records of `shard` of `table` (schema-qualified, as the server
    /// names it) in `database`.
    pub fn progress_key(&self, database: &str, table: &str, shard: i32) -> String {
        format!("{}.{database}.{table}.{shard}", self.transactional_id_prefix)
    }

    /// A new `transactional.id` for a relay's producer of `table` in `database`: unique, so that
    /// fencing it (by the next owner of one of its shards) fences that producer alone, and a
    /// producer fenced once is never confused with its successor.
    pub fn transactional_id(&self, database: &str, table: &str) -> String {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        format!("{}.{database}.{table}.{}", self.transactional_id_prefix, &unique[..12])
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let topic = &self.progress_topic;
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if topic.is_empty() || topic.len() > 249 || !topic.chars().all(legal) || topic == "." || topic == ".." {
            return Err(ConfigError::new(
                "kafka.exactly_once.progress_topic",
                format!("\"{topic}\" is not a Kafka topic name (1 to 249 of a-z, A-Z, 0-9, '.', '_', '-')"),
            ));
        }
        if self.transactional_id_prefix.trim().is_empty() {
            return Err(ConfigError::new("kafka.exactly_once.transactional_id_prefix", "is empty; give a name"));
        }
        Ok(())
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "localhost:9092".to_owned(),
            properties: BTreeMap::new(),
            security_protocol: SecurityProtocol::Plaintext,
            tls: KafkaTls::default(),
            sasl: KafkaSasl::default(),
            startup_timeout: Duration::from_secs(60),
            delivery: Delivery::AtLeastOnce,
            exactly_once: ExactlyOnce::default(),
        }
    }
}

/// `kafka.security_protocol`, librdkafka's `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// Neither encrypted nor authenticated: for a trusted network only.
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL authentication without encryption (the password crosses the network in the clear
    /// with PLAIN).
    SaslPlaintext,
    /// SASL authentication over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    fn uses_sasl(self) -> bool {
        matches!(self, SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl)
    }

    fn as_property(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
}

/// `[kafka.tls]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaTls {
    /// CA certificates (PEM) that verify the brokers; without it, the system's trust store.
    #[serde(serialize_with = "serialize_optional_path", deserialize_with = "deserialize_optional_path")]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM), for brokers that authenticate clients by certificate.
    #[serde(serialize_with = "serialize_optional_path", deserialize_with = "deserialize_optional_path")]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(serialize_with = "serialize_optional_path", deserialize_with = "deserialize_optional_path")]
    pub key_file: Option<PathBuf>,
    /// The password of an encrypted `key_file`.
    pub key_password: Option<Secret>,
    /// A file holding `key_password`.
    #[serde(serialize_with = "serialize_optional_path", deserialize_with = "deserialize_optional_path")]
    pub key_password_file: Option<PathBuf>,
    /// Whether the broker's certificate must name the host connected to. Turn off only for
    /// brokers whose certificates cannot be fixed; the certificate chain is checked either way.
    pub verify_hostname: bool,
}

impl Default for KafkaTls {
    fn default() -> Self {
        KafkaTls {
            ca_file: None,
            cert_file: None,
            key_file: None,
            key_password: None,
            key_password_file: None,
            verify_hostname: true,
        }
    }
}

/// `[kafka.sasl]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSasl {
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub mechanism: Option<String>,
    /// The SASL user name.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub username: Option<String>,
    /// Best given by `OUTBOX_RELAY_KAFKA__SASL__PASSWORD` or `password_file`.
    pub password: Option<Secret>,
    /// A file holding the password; one trailing newline is ignored.
    #[serde(serialize_with = "serialize_optional_path", deserialize_with = "deserialize_optional_path")]
    pub password_file: Option<PathBuf>,
}

/// SASL mechanisms the relay's librdkafka supports (GSSAPI and OAUTHBEARER are not built in).
const SASL_MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

/// librdkafka properties that the `kafka.security_protocol`, `kafka.tls` and `kafka.sasl` keys
/// set; giving one in `kafka.properties` as well would leave two answers to one question.
const STRUCTURED_SECURITY_PROPERTIES: &[(&str, &str)] = &[
    ("security.protocol", "kafka.security_protocol"),
    ("ssl.ca.location", "kafka.tls.ca_file"),
    ("ssl.certificate.location", "kafka.tls.cert_file"),
    ("ssl.key.location", "kafka.tls.key_file"),
    ("ssl.key.password", "kafka.tls.key_password"),
    ("ssl.endpoint.identification.algorithm", "kafka.tls.verify_hostname"),
    ("sasl.mechanisms", "kafka.sasl.mechanism"),
    ("sasl.mechanism", "kafka.sasl.mechanism"),
    ("sasl.username", "kafka.sasl.username"),
    ("sasl.password", "kafka.sasl.password"),
];

impl KafkaConfig {
    /// The librdkafka settings this section gives a producer: the brokers, `properties` and
    /// the security properties. The publisher adds its own defaults beneath them (which a
    /// property may override) and its log level.
    pub fn producer_settings(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &self.brokers);
        for (name, value) in &self.properties {
            client.set(name, value);
        }
        for (name, value) in self.security_properties() {
            client.set(name, value);
        }
        client
    }

    /// Checks the brokers and `properties`: the relay's own rules first, then librdkafka's.
    pub(super) fn validate_brokers_and_properties(&self) -> Result<(), ConfigError> {
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            return Err(ConfigError::new("kafka.brokers", "is empty; give host:port[,host:port...]"));
        }
        for (name, value) in &self.properties {
            check_property(name, value)?;
        }
        // librdkafka checks every property name and value when a native config is built;
        // doing it here turns a typo into an exit-2 error instead of a failing daemon.
        if let Err(e) = self.producer_settings().create_native_config() {
            let key = match &e {
                rdkafka::error::KafkaError::ClientConfig(_, _, key, _) => {
                    format!("kafka.properties.{key}")
                }
                _ => "kafka.properties".to_owned(),
            };
            return Err(ConfigError::new(key, format!("rejected by librdkafka: {}", config_error_text(&e))));
        }
        Ok(())
    }

    /// The librdkafka properties for `security_protocol`, `tls` and `sasl`; empty for the
    /// default plaintext connection, so `kafka.properties` alone still works as before.
    pub fn security_properties(&self) -> Vec<(&'static str, String)> {
        let mut properties = Vec::new();
        if self.security_protocol == SecurityProtocol::Plaintext {
            return properties;
        }
        properties.push(("security.protocol", self.security_protocol.as_property().to_owned()));
        if self.security_protocol.uses_tls() {
            let tls = &self.tls;
            let path = |p: &PathBuf| p.display().to_string();
            properties.extend(tls.ca_file.as_ref().map(|p| ("ssl.ca.location", path(p))));
            properties.extend(tls.cert_file.as_ref().map(|p| ("ssl.certificate.location", path(p))));
            properties.extend(tls.key_file.as_ref().map(|p| ("ssl.key.location", path(p))));
            properties.extend(tls.key_password.as_ref().map(|s| ("ssl.key.password", s.expose().to_owned())));
            if !tls.verify_hostname {
                properties.push(("ssl.endpoint.identification.algorithm", "none".to_owned()));
            }
        }
        if self.security_protocol.uses_sasl() {
            let sasl = &self.sasl;
            properties.extend(sasl.mechanism.as_ref().map(|m| ("sasl.mechanisms", m.to_ascii_uppercase())));
            properties.extend(sasl.username.as_ref().map(|u| ("sasl.username", u.clone())));
            properties.extend(sasl.password.as_ref().map(|s| ("sasl.password", s.expose().to_owned())));
        }
        properties
    }

    pub(super) fn validate_security(&self) -> Result<(), ConfigError> {
        for (property, key) in STRUCTURED_SECURITY_PROPERTIES {
            if self.properties.contains_key(*property) && self.security_protocol != SecurityProtocol::Plaintext {
                return Err(ConfigError::new(
                    format!("kafka.properties.{property}"),
                    format!("is also set by {key}; give it once, with {key}"),
                ));
            }
        }
        let protocol = self.security_protocol;
        let tls = &self.tls;
        let tls_given = tls.ca_file.is_some() || tls.cert_file.is_some() || tls.key_file.is_some();
        if tls_given && !protocol.uses_tls() {
            return Err(ConfigError::new(
                "kafka.tls",
                format!(
                    "is set but kafka.security_protocol is \"{}\"; use \"ssl\" or \"sasl_ssl\"",
                    protocol.as_property()
                ),
            ));
        }
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return Err(ConfigError::new("kafka.tls.cert_file", "and kafka.tls.key_file go together; give both"));
        }
        for (key, file) in [
            ("kafka.tls.ca_file", &tls.ca_file),
            ("kafka.tls.cert_file", &tls.cert_file),
            ("kafka.tls.key_file", &tls.key_file),
        ] {
            check_readable(key, file.as_deref())?;
        }
        let sasl = &self.sasl;
        let sasl_given = sasl.mechanism.is_some() || sasl.username.is_some() || sasl.password.is_some();
        if sasl_given && !protocol.uses_sasl() {
            return Err(ConfigError::new(
                "kafka.sasl",
                format!(
                    "is set but kafka.security_protocol is \"{}\"; use \"sasl_ssl\" (or \"sasl_plaintext\" on a trusted network)",
                    protocol.as_property()
                ),
            ));
        }
        if protocol.uses_sasl() {
            let mechanism = sasl.mechanism.as_deref().unwrap_or("");
            if !SASL_MECHANISMS.iter().any(|m| m.eq_ignore_ascii_case(mechanism)) {
                return Err(ConfigError::new(
                    "kafka.sasl.mechanism",
                    format!("\"{mechanism}\" is not one of {}", SASL_MECHANISMS.join(", ")),
                ));
            }
            if sasl.username.is_none() {
                return Err(ConfigError::new("kafka.sasl.username", "is required with SASL"));
            }
            if sasl.password.is_none() {
                return Err(ConfigError::new(
                    "kafka.sasl.password",
                    "is required with SASL; give it in OUTBOX_RELAY_KAFKA__SASL__PASSWORD or kafka.sasl.password_file",
                ));
            }
        }
        Ok(())
    }
}

/// The relay's own rules for one `kafka.properties` entry.
fn check_property(name: &str, value: &str) -> Result<(), ConfigError> {
    let key = format!("kafka.properties.{name}");
    if name == "bootstrap.servers" || name == "metadata.broker.list" {
        return Err(ConfigError::new(key, "set the brokers with kafka.brokers instead"));
    }
    for (enforced, allowed, why) in ENFORCED_PROPERTIES {
        if name == *enforced && !allowed.contains(&value.to_ascii_lowercase().as_str()) {
            return Err(ConfigError::new(
                key,
                format!("\"{value}\" is not allowed: {why}; remove the key or set it to \"{}\"", allowed[0]),
            ));
        }
    }
    if name == "transactional.id" {
        return Err(ConfigError::new(
            key,
            "the relay sets its transactional id itself with kafka.delivery = \"exactly_once\" (from \
             kafka.exactly_once.transactional_id_prefix); remove the key",
        ));
    }
    Ok(())
}

fn config_error_text(error: &rdkafka::error::KafkaError) -> String {
    match error {
        rdkafka::error::KafkaError::ClientConfig(_, description, _, _) => description.clone(),
        other => other.to_string(),
    }
}
