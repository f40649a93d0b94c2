//! The whole configuration surface: defaults, loading, validation and redaction.
//!
//! Configuration is layered: built-in defaults, then an optional TOML file (`--config PATH`),
//! then environment variables `OUTBOX_RELAY_<SECTION>__<KEY>`. Everything the rest of the crate
//! reads comes from a [`Config`] that has passed [`Config::validate`], so the loops never meet a
//! value they have to second-guess. Every error names the key it is about, in one line, because
//! the operator reading it has only that line to go on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::postgres::layout::{Identifier, TopicTemplate};

/// Prefix of every environment variable the relay reads.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";

/// Environment variable naming the config file, the same as `--config`.
pub const CONFIG_FILE_ENV: &str = "OUTBOX_RELAY_CONFIG";

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

/// Words that mark a librdkafka property as secret in `config` output and logs.
const SECRET_PROPERTY_WORDS: &[&str] = &["password", "secret", "pem", "token", "oauthbearer.config"];

/// The effective configuration of one relay process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The PostgreSQL database that holds the outbox table.
    pub database: DatabaseConfig,
    /// The Kafka cluster the rows are published to.
    pub kafka: KafkaConfig,
    /// Where the outbox rows live and how their columns map onto a Kafka record.
    pub outbox: OutboxConfig,
    /// How the relay loop batches, polls, backs off and stops.
    pub relay: RelayConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Log output.
    pub log: LogConfig,
    /// What `/healthz` and `/readyz` answer.
    pub health: HealthConfig,
    /// Deleting published rows after a while.
    pub retention: RetentionConfig,
    /// Exporting the relay's own spans.
    pub telemetry: TelemetryConfig,
}

/// `[health]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// `/healthz` fails when one step of the loop (a claim, a mark, a database statement) has
    /// taken longer than this. Waiting for the broker's acknowledgements does not count: a
    /// broker outage fails readiness instead, since restarting the relay would not end it.
    #[serde(with = "humantime_serde")]
    pub liveness_timeout: Duration,
    /// `/readyz` fails when the relay has had rows to publish for this long without any being
    /// acknowledged (and at once when PostgreSQL or every broker is unreachable).
    #[serde(with = "humantime_serde")]
    pub readiness_window: Duration,
    /// `/readyz` also fails while rows fail with errors of their own (retried after a backoff)
    /// or were given up on (waiting for `outbox-relay retry`): work only an operator can
    /// unstick. Off, only the metrics and `status` show them (for deployments whose rollouts
    /// wait for readiness).
    pub stuck_rows_fail_readiness: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            liveness_timeout: Duration::from_secs(300),
            readiness_window: Duration::from_secs(60),
            stuck_rows_fail_readiness: true,
        }
    }
}

/// `[retention]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Delete rows published longer ago than this; empty keeps them (the default). Pending and
    /// failed rows are never deleted.
    #[serde(serialize_with = "serialize_optional_duration", deserialize_with = "deserialize_optional_duration")]
    pub delete_published_after: Option<Duration>,
    /// Rows deleted per statement, so that each delete holds its locks briefly.
    pub batch_size: u32,
    /// How often the relay looks for rows to delete.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig { delete_published_after: None, batch_size: 1000, interval: Duration::from_secs(60) }
    }
}

/// `[telemetry]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP endpoint (e.g. `http://collector:4318`) that receives the relay's spans; empty
    /// disables export.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub otlp_endpoint: Option<String>,
}

/// `[database]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// A libpq-style connection string: a `postgres://` URL or `key=value` pairs. A URL may
    /// carry `sslmode`, `sslrootcert`, `sslcert` and `sslkey` as query parameters, as with libpq.
    pub url: String,
    /// The password, when it is not in the URL; best given by the environment variable
    /// `OUTBOX_RELAY_DATABASE__PASSWORD` or by `password_file`.
    pub password: Option<Secret>,
    /// A file holding the password (a mounted secret); one trailing newline is ignored.
    #[serde(serialize_with = "serialize_optional_path", deserialize_with = "deserialize_optional_path")]
    pub password_file: Option<PathBuf>,
    /// TLS to PostgreSQL, as libpq's `sslmode`: disable, prefer (the default: TLS when the
    /// server offers it, unverified), require (TLS, unverified), verify-ca (the server's
    /// certificate must chain to `sslrootcert`), verify-full (and name the host connected to).
    /// Overrides the URL's `sslmode`.
    #[serde(serialize_with = "serialize_optional", deserialize_with = "deserialize_optional")]
    pub sslmode: Option<String>,
    /// CA certificates (PEM) that verify the server; without it, the system's trust store.
    #[serde(serialize_with = "serialize_optional_path", deserialize_with = "deserialize_optional_path")]
    pub sslrootcert: Option<PathBuf>,
    /// A client certificate (PEM) for servers that authenticate clients by certificate.
    #[serde(serialize_with = "serialize_optional_path", deserialize_with = "deserialize_optional_path")]
    pub sslcert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(serialize_with = "serialize_optional_path", deserialize_with = "deserialize_optional_path")]
    pub sslkey: Option<PathBuf>,
    /// Whether the relay's own writes (marks, failure records) wait for the WAL flush. Off by
    /// default: a mark lost to a PostgreSQL crash only means its row is published again, which
    /// at-least-once delivery allows, and not waiting for the flush makes marking cheaper.
    pub synchronous_commit: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@localhost:5432/postgres".to_owned(),
            password: None,
            password_file: None,
            sslmode: None,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            synchronous_commit: false,
        }
    }
}

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

/// libpq's `sslmode` values.
pub const SSL_MODES: &[&str] = &["disable", "prefer", "require", "verify-ca", "verify-full"];

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

    fn validate_security(&self) -> Result<(), ConfigError> {
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

impl DatabaseConfig {
    fn validate_tls(&self) -> Result<(), ConfigError> {
        if let Some(mode) = &self.sslmode
            && !SSL_MODES.contains(&mode.as_str())
        {
            return Err(ConfigError::new(
                "database.sslmode",
                format!("\"{mode}\" is not one of {}", SSL_MODES.join(", ")),
            ));
        }
        if self.sslcert.is_some() != self.sslkey.is_some() {
            return Err(ConfigError::new("database.sslcert", "and database.sslkey go together; give both"));
        }
        for (key, file) in [
            ("database.sslrootcert", &self.sslrootcert),
            ("database.sslcert", &self.sslcert),
            ("database.sslkey", &self.sslkey),
        ] {
            check_readable(key, file.as_deref())?;
        }
        Ok(())
    }
}

/// A file named by a config key must be there and readable when the relay starts, not when it
/// first reconnects.
fn check_readable(key: &str, file: Option<&Path>) -> Result<(), ConfigError> {
    match file {
        Some(path) => std::fs::File::open(path)
            .map(|_| ())
            .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display()))),
        None => Ok(()),
    }
}

/// A password or key: shown as `********` by `Debug` and when serialized (so in `config`
/// output too), and given to a connection only through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that hands it to a connection.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

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
    /// What "published" means for a row: `update` sets the published-at column, `delete`
    /// removes the row once the broker has it.
    pub mark: MarkMode,
    /// Whether consumers need a key's rows in insertion order (the default). The relay then
    /// refuses an order column that cannot give that order (see [`crate::postgres::layout::OrderColumn`]);
    /// `false` accepts any order column and publishes a key's rows in its order, whatever it is.
    pub per_key_order: bool,
    /// Column names.
    pub columns: Columns,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            table: "outbox".to_owned(),
            topic_template: None,
            mark: MarkMode::Update,
            per_key_order: true,
            columns: Columns::default(),
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
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            id: "id".to_owned(),
            order_by: None,
            event_id: "event_id".to_owned(),
            topic: Some("topic".to_owned()),
            key: Some("key".to_owned()),
            payload: "payload".to_owned(),
            headers: Some("headers".to_owned()),
            created_at: Some("created_at".to_owned()),
            published_at: Some("published_at".to_owned()),
            attempts: Some("attempts".to_owned()),
            last_error: Some("last_error".to_owned()),
            xact_id: Some("xact_id".to_owned()),
            last_attempt_at: Some("last_attempt_at".to_owned()),
            failed_at: Some("failed_at".to_owned()),
            traceparent: None,
        }
    }
}

/// The shortest `relay.takeover_after`. A relay keeps its claim session visibly active at
/// least every second ([`crate::relay`]'s heartbeat), and hands a batch to the producer only
/// if that session proved itself within the last 1.5 s: both hold for any mix of relays whose
/// `takeover_after` is at least this, so relays need not agree on it.
pub const MIN_TAKEOVER_AFTER: Duration = Duration::from_secs(3);

/// `[relay]`: the loop's pacing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Most rows claimed and produced in one batch.
    pub batch_size: usize,
    /// Most bytes of row data (payloads, keys, headers) in one batch; a single row larger than
    /// this goes out alone. Bounds the relay's memory whatever the rows' sizes: a batch in
    /// flight, its copy in librdkafka's queue and the batch claimed ahead.
    pub batch_bytes: usize,
    /// How long an idle relay waits before looking for new rows again.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// First wait after a database or broker failure; doubles up to `backoff_max`.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest wait between retries.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// After SIGTERM, how long the relay may spend finishing its in-flight batch. Rows
    /// still unacknowledged then stay unpublished and are sent again by the next run.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How often the pending-row metrics are refreshed.
    #[serde(with = "humantime_serde")]
    pub stats_interval: Duration,
    /// Failed attempts caused by a row itself (not by an outage) before the relay gives up on it
    /// and marks it failed.
    pub max_attempts: u32,
    /// Wait before retrying a row after its first failed attempt; doubles per attempt.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_initial: Duration,
    /// Longest wait between attempts of one row.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// What a failed row does to later rows of its key: `park_key` holds them back (per-key
    /// order wins) until `outbox-relay retry`; `skip` lets them flow.
    pub on_poison: OnPoison,
    /// Shards the table's keys are split into, each published by exactly one relay. Every
    /// relay of a table must use the same number.
    pub shards: u32,
    /// How often a relay checks shard ownership: takes free shards, hands back extra ones,
    /// and takes over the shards of relays that look frozen.
    #[serde(with = "humantime_serde")]
    pub rebalance_interval: Duration,
    /// How long another relay's database session may stay idle before this relay ends it
    /// (`pg_terminate_backend`) and so takes its shards over: a relay runs a statement about
    /// every second whatever it is doing, so a session idle this long belongs to a relay that
    /// is frozen (stopped, hung, paused with its host). At least [`MIN_TAKEOVER_AFTER`].
    #[serde(with = "humantime_serde")]
    pub takeover_after: Duration,
    /// LISTEN for NOTIFY on the `outbox_relay` channel: from `outbox-relay retry`, and from
    /// the `outbox_relay_notify` trigger on tables that keep it.
    pub listen: bool,
    /// How often an idle relay asks PostgreSQL whether the commit horizon moved (one trivial
    /// query), so that new rows go out without waiting for the next poll and without a NOTIFY
    /// in the writers' transactions. Zero turns it off.
    #[serde(with = "humantime_serde")]
    pub commit_watch_interval: Duration,
    /// How often a claim starts at the beginning of the table instead of at the claim floor,
    /// to pick up rows made claimable again out of band (an operator setting `published_at`
    /// back to NULL). Zero: every claim starts at the beginning.
    #[serde(with = "humantime_serde")]
    pub full_scan_interval: Duration,
    /// Log a warning naming the blocking backend when an open transaction has held rows back
    /// for longer than this.
    #[serde(with = "humantime_serde")]
    pub holdback_warning: Duration,
    /// How long a batch waits for its last acknowledgements while the brokers are up before
    /// its unacknowledged records are set aside: they stay in flight (never abandoned), their
    /// rows and the later rows of their keys wait, and every other row flows. One partition
    /// the broker cannot write (too few in-sync replicas, an offline log directory, a deleted
    /// topic) so holds back only the rows routed to it.
    #[serde(with = "humantime_serde")]
    pub stalled_partition_after: Duration,
}

/// What a row that has failed for good does to the later rows of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPoison {
    /// Later rows of the key wait until the failed row is retried or removed.
    ParkKey,
    /// Later rows of the key are published; the failed row is left behind.
    Skip,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 1000,
            batch_bytes: 16 * 1024 * 1024,
            poll_interval: Duration::from_millis(200),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            stats_interval: Duration::from_secs(5),
            max_attempts: 10,
            retry_backoff_initial: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(300),
            on_poison: OnPoison::ParkKey,
            shards: 16,
            rebalance_interval: Duration::from_secs(1),
            takeover_after: Duration::from_secs(30),
            listen: true,
            commit_watch_interval: Duration::from_millis(20),
            full_scan_interval: Duration::from_secs(10),
            holdback_warning: Duration::from_secs(30),
            stalled_partition_after: Duration::from_secs(5),
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint serving `/metrics`; empty disables it.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: "127.0.0.1:9187".to_owned() }
    }
}

impl MetricsConfig {
    /// The address to serve on, `None` when `listen` is empty. `listen` is `IP:PORT`
    /// (`[::1]:9187` for IPv6) or `HOST:PORT`: a host name such as `localhost` is resolved, and
    /// its first IPv4 address is taken if it has one (a container may have no IPv6 at all).
    pub fn address(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let listen = self.listen.trim();
        if listen.is_empty() {
            return Ok(None);
        }
        if let Ok(addr) = listen.parse::<SocketAddr>() {
            return Ok(Some(addr));
        }
        let refuse = |problem: String| {
            ConfigError::new(
                "metrics.listen",
                format!(
                    "{problem}; use IP:PORT or HOST:PORT such as 0.0.0.0:9187 or localhost:9187, or \"\" to disable"
                ),
            )
        };
        let Some((host, port)) = listen.rsplit_once(':') else {
            return Err(refuse(format!("\"{listen}\" has no port")));
        };
        let Ok(port) = port.parse::<u16>() else {
            return Err(refuse(format!("\"{listen}\": invalid port \"{port}\"")));
        };
        if host.is_empty() {
            return Err(refuse(format!("\"{listen}\" has no host")));
        }
        let resolved: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .map_err(|e| refuse(format!("cannot resolve host \"{host}\": {e}")))?
            .collect();
        resolved
            .iter()
            .find(|addr| addr.is_ipv4())
            .or(resolved.first())
            .copied()
            .map(Some)
            .ok_or_else(|| refuse(format!("host \"{host}\" resolves to no address")))
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `outbox_relay=debug,rdkafka=warn`.
    pub level: String,
    /// Log each record's key and payload at debug level. Off by default: payloads are the
    /// application's data and may be personal.
    pub payloads: bool,
    /// How often the relay logs a one-line summary (rows published since the last one, pending,
    /// failed) at info level while there is anything to say. Zero turns it off.
    #[serde(with = "humantime_serde")]
    pub summary_interval: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_owned(),
            payloads: false,
            summary_interval: Duration::from_secs(60),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A configuration problem, always tied to the key it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// Dotted key, for example `relay.batch_size`.
    pub key: String,
    /// What is wrong and, where it helps, what to do.
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError { key: key.into(), problem: problem.into() }
    }
}

impl Config {
    /// Loads defaults, then the TOML file at `path` if given, then `OUTBOX_RELAY_*`
    /// environment variables, and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(path)
    }

    fn load_from(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            if !path.is_file() {
                return Err(ConfigError::new("--config", format!("{}: no such file", path.display())));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // `OUTBOX_RELAY_CONFIG` names the file, it is not a key of the file.
        let env = Env::prefixed(ENV_PREFIX).ignore(&["config"]).split("__");
        // figment 0.10.19 unescapes a quoted environment value by slicing it at a character
        // index as if it were a byte index: a non-ASCII character before a backslash escape makes
        // it panic or drop characters. Refuse such a value rather than crash or misread it.
        if let Some((key, _)) = env.iter().find(|(_, v)| v.contains('"') && v.contains('\\') && !v.is_ascii()) {
            let var = format!("{ENV_PREFIX}{}", key.as_str().to_ascii_uppercase().replace('.', "__"));
            return Err(ConfigError::new(
                key.as_str(),
                format!(
                    "a quoted value with both a backslash escape and non-ASCII characters cannot be read; \
                     write it without the quotes (from environment variable {var})"
                ),
            ));
        }
        let mut config: Config = figment.merge(env).extract().map_err(|error| describe_figment_error(&error))?;
        config.read_secret_files()?;
        config.validate()?;
        // The endpoint binds the address, not the name: resolved once, here, so that what is
        // served is what `config` shows.
        if let Some(addr) = config.metrics.address()? {
            config.metrics.listen = addr.to_string();
        }
        Ok(config)
    }

    /// Reads the secrets that were given as files (`*_file` keys) into their keys. A secret
    /// given both ways is an error: the operator would not know which one is used.
    pub fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        let database = &mut self.database;
        read_secret_file("database", "password", &mut database.password, &database.password_file)?;
        let sasl = &mut self.kafka.sasl;
        read_secret_file("kafka.sasl", "password", &mut sasl.password, &sasl.password_file)?;
        let tls = &mut self.kafka.tls;
        read_secret_file("kafka.tls", "key_password", &mut tls.key_password, &tls.key_password_file)?;
        Ok(())
    }

    /// Checks every value the loops rely on. Called by [`Config::load`]; call it again after
    /// changing a loaded config in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::postgres::tls::ConnectOptions::from_config(&self.database)?;
        self.database.validate_tls()?;
        self.kafka.validate_security()?;
        for (key, secret) in [
            ("database.password", &self.database.password),
            ("kafka.sasl.password", &self.kafka.sasl.password),
            ("kafka.tls.key_password", &self.kafka.tls.key_password),
        ] {
            if secret.as_ref().is_some_and(|s| s.expose() == REDACTED) {
                return Err(ConfigError::new(
                    key,
                    "is the placeholder that `config` prints in place of a secret; give the secret itself",
                ));
            }
        }

        if self.kafka.brokers.split(',').all(|b| b.trim().is_empty()) {
            return Err(ConfigError::new("kafka.brokers", "is empty; give host:port[,host:port...]"));
        }
        for (name, value) in &self.kafka.properties {
            check_property(name, value)?;
        }
        // librdkafka checks every property name and value when a native config is built;
        // doing it here turns a typo into an exit-2 error instead of a failing daemon.
        if let Err(e) = crate::kafka::publisher::producer_config(self).create_native_config() {
            let key = match &e {
                rdkafka::error::KafkaError::ClientConfig(_, _, key, _) => {
                    format!("kafka.properties.{key}")
                }
                _ => "kafka.properties".to_owned(),
            };
            return Err(ConfigError::new(key, format!("rejected by librdkafka: {}", config_error_text(&e))));
        }

        self.validate_outbox()?;

        let relay = &self.relay;
        if !(1..=100_000).contains(&relay.batch_size) {
            return Err(ConfigError::new("relay.batch_size", "must be between 1 and 100000"));
        }
        if relay.batch_bytes < 1024 {
            return Err(ConfigError::new(
                "relay.batch_bytes",
                "must be at least 1024 (bytes; e.g. 16777216 for 16 MiB)",
            ));
        }
        for (key, value) in [
            ("relay.poll_interval", relay.poll_interval),
            ("relay.backoff_initial", relay.backoff_initial),
            ("relay.backoff_max", relay.backoff_max),
            ("relay.stats_interval", relay.stats_interval),
            ("relay.stalled_partition_after", relay.stalled_partition_after),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(key, "must be greater than zero"));
            }
        }
        for (key, value) in [
            ("relay.retry_backoff_initial", relay.retry_backoff_initial),
            ("relay.retry_backoff_max", relay.retry_backoff_max),
            ("relay.rebalance_interval", relay.rebalance_interval),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(key, "must be greater than zero"));
            }
        }
        if relay.max_attempts == 0 {
            return Err(ConfigError::new("relay.max_attempts", "must be at least 1"));
        }
        if !(1..=1024).contains(&relay.shards) {
            return Err(ConfigError::new("relay.shards", "must be between 1 and 1024"));
        }
        if relay.takeover_after < MIN_TAKEOVER_AFTER {
            return Err(ConfigError::new(
                "relay.takeover_after",
                format!(
                    "must be at least {}: a live relay's session may be idle for about a second, \
                     and a shorter value would take shards from relays that are not frozen",
                    humantime::format_duration(MIN_TAKEOVER_AFTER)
                ),
            ));
        }
        if relay.backoff_max < relay.backoff_initial {
            return Err(ConfigError::new("relay.backoff_max", "must not be less than relay.backoff_initial"));
        }

        self.metrics.address()?;
        for (key, value) in [
            ("kafka.startup_timeout", self.kafka.startup_timeout),
            ("health.liveness_timeout", self.health.liveness_timeout),
            ("health.readiness_window", self.health.readiness_window),
            ("retention.interval", self.retention.interval),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(key, "must be greater than zero"));
            }
        }
        if self.retention.batch_size == 0 {
            return Err(ConfigError::new("retention.batch_size", "must be at least 1"));
        }
        if self.retention.delete_published_after.is_some() && self.outbox.mark == MarkMode::Delete {
            return Err(ConfigError::new(
                "retention.delete_published_after",
                "has nothing to do with outbox.mark = \"delete\" (published rows are deleted at once); remove one of them",
            ));
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint
            && url::Url::parse(endpoint).map(|u| !u.scheme().starts_with("http")).unwrap_or(true)
        {
            return Err(ConfigError::new(
                "telemetry.otlp_endpoint",
                format!("\"{endpoint}\" is not an http(s) URL such as http://collector:4318"),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::new("log.level", format!("\"{}\": {e}", self.log.level)))?;
        Ok(())
    }

    fn validate_outbox(&self) -> Result<(), ConfigError> {
        let outbox = &self.outbox;
        Identifier::parse_qualified(&outbox.table).map_err(|p| ConfigError::new("outbox.table", p))?;
        let columns = &outbox.columns;
        for (key, name) in columns.named() {
            Identifier::parse(name).map_err(|p| ConfigError::new(format!("outbox.columns.{key}"), p))?;
        }
        match (&outbox.topic_template, &columns.topic) {
            (Some(template), _) => {
                TopicTemplate::parse(template).map_err(|p| ConfigError::new("outbox.topic_template", p))?;
            }
            (None, Some(_)) => {}
            (None, None) => {
                return Err(ConfigError::new(
                    "outbox.columns.topic",
                    "is empty and outbox.topic_template is not set; the relay needs one of them to know the topic",
                ));
            }
        }
        if outbox.mark == MarkMode::Update && columns.published_at.is_none() {
            return Err(ConfigError::new(
                "outbox.columns.published_at",
                "is empty, but outbox.mark = \"update\" needs it; name the column or set outbox.mark = \"delete\"",
            ));
        }
        Ok(())
    }

    /// The configuration as TOML, with passwords and other secrets replaced by `********`.
    pub fn to_redacted_toml(&self) -> String {
        let mut redacted = self.clone();
        redacted.database.url = redact_connection_string(&self.database.url);
        for (name, value) in redacted.kafka.properties.iter_mut() {
            if is_secret_property(name) {
                *value = REDACTED.to_owned();
            }
        }
        // Serializing plain structs of strings, numbers and maps cannot fail.
        toml::to_string(&redacted).unwrap_or_else(|e| format!("# could not render config: {e}\n"))
    }
}

impl Columns {
    /// Every configured column name with its key under `outbox.columns`.
    pub fn named(&self) -> Vec<(&'static str, &str)> {
        let mut named =
            vec![("id", self.id.as_str()), ("event_id", self.event_id.as_str()), ("payload", self.payload.as_str())];
        for (key, column) in [
            ("order_by", &self.order_by),
            ("topic", &self.topic),
            ("key", &self.key),
            ("headers", &self.headers),
            ("created_at", &self.created_at),
            ("published_at", &self.published_at),
            ("attempts", &self.attempts),
            ("last_error", &self.last_error),
            ("xact_id", &self.xact_id),
            ("last_attempt_at", &self.last_attempt_at),
            ("failed_at", &self.failed_at),
            ("traceparent", &self.traceparent),
        ] {
            if let Some(column) = column {
                named.push((key, column.as_str()));
            }
        }
        named
    }
}

/// Shown in place of a secret.
pub const REDACTED: &str = "********";

/// Whether a librdkafka property holds a secret that must never be printed.
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PROPERTY_WORDS.iter().any(|word| name.contains(word))
}

/// Fills `secret` from `file` (`section.name_file`), trimming one trailing newline.
fn read_secret_file(
    section: &str,
    name: &str,
    secret: &mut Option<Secret>,
    file: &Option<PathBuf>,
) -> Result<(), ConfigError> {
    let Some(path) = file else { return Ok(()) };
    let key = format!("{section}.{name}_file");
    if secret.is_some() {
        return Err(ConfigError::new(key, format!("and {section}.{name} are both set; give the secret one way")));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(&key, format!("cannot read {}: {e}", path.display())))?;
    let value = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    if value.is_empty() {
        return Err(ConfigError::new(key, format!("{} is empty", path.display())));
    }
    *secret = Some(Secret::new(value));
    Ok(())
}

/// Replaces the password in a `postgres://` URL or a `key=value` connection string.
pub fn redact_connection_string(conn: &str) -> String {
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        return match url::Url::parse(conn) {
            Ok(mut url) => {
                if url.password().is_some() {
                    let _ = url.set_password(Some(REDACTED));
                }
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k.eq_ignore_ascii_case("password") { REDACTED.to_owned() } else { v.into_owned() };
                        (k.into_owned(), v)
                    })
                    .collect();
                if !pairs.is_empty() {
                    url.query_pairs_mut().clear().extend_pairs(pairs);
                }
                url.to_string()
            }
            // A URL we cannot parse may still hold a password; show nothing of it.
            Err(_) => REDACTED.to_owned(),
        };
    }
    redact_key_value_password(conn)
}

/// Redacts `password=...` (quoted or not) in a libpq key/value string.
fn redact_key_value_password(conn: &str) -> String {
    let mut out = String::with_capacity(conn.len());
    let mut rest = conn;
    while let Some(pos) = find_password_key(rest) {
        out.push_str(&rest[..pos]);
        let after_key = &rest[pos + "password".len()..];
        let eq = after_key.find('=').map(|i| i + 1).unwrap_or(0);
        out.push_str(&rest[pos..pos + "password".len() + eq]);
        let value = after_key[eq..].trim_start();
        out.push_str(&after_key[eq..after_key.len() - value.len()]);
        let value_len = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            let mut end = quoted.len();
            for (i, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = i + 1;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            1 + end
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        out.push_str(REDACTED);
        rest = &value[value_len.min(value.len())..];
    }
    out.push_str(rest);
    out
}

/// Position of a `password` key (followed by optional spaces and `=`) in a key/value string.
fn find_password_key(s: &str) -> Option<usize> {
    let lower = s.to_ascii_lowercase();
    let mut from = 0;
    while let Some(found) = lower[from..].find("password") {
        let pos = from + found;
        let starts_word = pos == 0 || lower.as_bytes()[pos - 1].is_ascii_whitespace();
        let followed_by_eq = lower[pos + "password".len()..].trim_start().starts_with('=');
        if starts_word && followed_by_eq {
            return Some(pos);
        }
        from = pos + 1;
    }
    None
}

/// tokio-postgres says only "invalid connection string"; find the part that is wrong so the
/// operator does not have to. Never echoes the password.
pub(crate) fn describe_url_error(url: &str, error: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    let detail = error.source().map(|s| format!(": {s}")).unwrap_or_default();
    if let Some(rest) = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://")) {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let host_port = authority.rsplit('@').next().unwrap_or("");
        for host in host_port.split(',') {
            if let Some((_, port)) = host.rsplit_once(':')
                && !port.is_empty()
                && port.parse::<u16>().is_err()
                && !host.ends_with(']')
            {
                return format!("invalid port \"{port}\"");
            }
        }
        return format!("not a valid postgres:// URL{detail}");
    }
    format!("not a valid connection string (postgres://user@host:port/db or key=value pairs){detail}")
}

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
        return Err(ConfigError::new(key, "the relay does not use Kafka transactions; remove the key"));
    }
    Ok(())
}

fn config_error_text(error: &rdkafka::error::KafkaError) -> String {
    match error {
        rdkafka::error::KafkaError::ClientConfig(_, description, _, _) => description.clone(),
        other => other.to_string(),
    }
}

/// Turns a figment error into one line that names the key and where its value came from.
fn describe_figment_error(error: &figment::Error) -> ConfigError {
    use figment::error::Kind;
    let mut path = error.path.clone();
    let problem = match &error.kind {
        Kind::UnknownField(field, expected) => {
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            let expected: Vec<String> = expected.iter().map(|e| e.to_string()).collect();
            format!("unknown key; expected one of: {}", expected.join(", "))
        }
        Kind::MissingField(field) => {
            path.push(field.to_string());
            "is required".to_owned()
        }
        // humantime's durations: say what one looks like.
        other if other.to_string().ends_with("expected a duration") => {
            format!("{other}, such as \"500ms\", \"30s\", \"5m\" or \"1h 30m\"")
        }
        other => other.to_string(),
    };
    let origin = error.metadata.as_ref().map(|meta| match &meta.source {
        Some(figment::Source::File(file)) => format!(" (in {})", file.display()),
        _ if meta.name.contains("environment") => {
            let var: Vec<String> = path.iter().map(|k| k.to_ascii_uppercase()).collect();
            format!(" (from environment variable {ENV_PREFIX}{})", var.join("__"))
        }
        _ => String::new(),
    });
    let key = if path.is_empty() { "config".to_owned() } else { path.join(".") };
    ConfigError::new(key, format!("{problem}{}", origin.unwrap_or_default()))
}

/// Environment values arrive as TOML-ish scalars (figment parses `5000` as a number), and TOML
/// files may write numbers and booleans; librdkafka wants strings. Underscores in keys stand
/// for dots because environment variable names cannot hold dots.
fn deserialize_properties<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
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
fn deserialize_optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => humantime::parse_duration(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

fn serialize_optional_duration<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_str(""),
    }
}

/// Optional names are written as an empty string when absent, since neither TOML nor
/// environment variables can say "null".
fn deserialize_optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()))
}

fn serialize_optional<S: Serializer>(value: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(value.as_deref().unwrap_or(""))
}

fn deserialize_optional_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    Ok(deserialize_optional(d)?.map(PathBuf::from))
}

fn serialize_optional_path<S: Serializer>(value: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&value.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_properties_are_recognised_by_name() {
        for secret in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
        ] {
            assert!(is_secret_property(secret), "{secret}");
        }
        for plain in ["sasl.username", "linger.ms", "ssl.ca.location", "security.protocol"] {
            assert!(!is_secret_property(plain), "{plain}");
        }
    }

    #[test]
    fn passwords_are_redacted_in_urls_and_key_value_strings() {
        assert_eq!(
            redact_connection_string("postgres://u:p%40ss@h:5432/db?sslmode=require&password=x"),
            "postgres://u:********@h:5432/db?sslmode=require&password=********"
        );
        assert_eq!(
            redact_connection_string(r"host=h password='it\'s secret' user=u"),
            "host=h password=******** user=u"
        );
        assert_eq!(redact_connection_string("host=h password = plain user=u"), "host=h password = ******** user=u");
        assert_eq!(redact_connection_string("host=h user=u"), "host=h user=u");
    }
}
