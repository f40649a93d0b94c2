//! The sections of the service around the loop: `[health]`, `[retention]`, `[telemetry]`,
//! `[metrics]` and `[log]`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::serde_text::{
    deserialize_optional, deserialize_optional_duration, serialize_optional, serialize_optional_duration,
};

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
