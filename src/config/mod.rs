//! The configuration: its types, section by section, how it is loaded, validated and shown
//! with its secrets redacted.
//!
//! Configuration is layered: built-in defaults, then an optional TOML file (`--config PATH`),
//! then environment variables `OUTBOX_RELAY_<SECTION>__<KEY>`. Everything the rest of the crate
//! reads comes from a [`Config`] that has passed [`Config::validate`], so the loops never meet a
//! value they have to second-guess. Every error names the key it is about, in one line, because
//! the operator reading it has only that line to go on.
//!
//! This module is a leaf: it imports nothing else of the crate. A section that needs a client
//! to check its values builds that client's settings itself ([`KafkaConfig::producer_settings`],
//! [`DatabaseConfig::connect_settings`]), and the code that connects starts from those settings,
//! so validation never has to reach into the code that uses the configuration.

mod columns;
mod database;
mod kafka;
mod load;
mod names;
mod outbox;
mod record;
mod relay;
mod secrets;
mod serde_text;
mod service;
mod topic_route;
mod validate;

use serde::{Deserialize, Serialize};

pub use columns::{ColumnPresence, ColumnRole, ColumnTypes, Columns};
pub use database::{ConnectSettings, DatabaseConfig, SSL_MODES, TlsMode, without_tls_parameters};
pub use kafka::{Delivery, ExactlyOnce, KafkaConfig, KafkaSasl, KafkaTls, SecurityProtocol};
pub use names::{Identifier, TopicTemplate};
pub use outbox::{MarkMode, OutboxConfig};
pub use record::{KeyFormat, Placement, PlacementTarget, RecordConfig, ValueFormat};
pub use relay::{MIN_TAKEOVER_AFTER, OnPoison, RelayConfig};
pub use secrets::{REDACTED, Secret, is_secret_property, redact_connection_string};
pub use service::{HealthConfig, LogConfig, LogFormat, MetricsConfig, RetentionConfig, TelemetryConfig};
pub use topic_route::{DEFAULT_ROUTE_REGEX, DEFAULT_ROUTE_REPLACEMENT, TopicRoute, TopicRouteConfig};

/// Prefix of every environment variable the relay reads.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";

/// Environment variable naming the config file, the same as `--config`.
pub const CONFIG_FILE_ENV: &str = "OUTBOX_RELAY_CONFIG";

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
