//! librdkafka's own voice: its log lines and client errors routed into `tracing` (each kind
//! at most once per quiet window), its statistics into the metrics and readiness, and a
//! broker's refusal of the relay's credentials or certificates turned into a hint that names
//! the configuration keys to check.

use crate::service::health::Health;
use crate::service::metrics::Metrics;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an identical client error stays quiet after it was logged. librdkafka reports a
/// down broker on every reconnect attempt; once per window is enough for an operator.
const REPEATED_ERROR_QUIET: Duration = Duration::from_secs(30);

/// Routes librdkafka's own log lines and errors into `tracing`, and its statistics into the
/// metrics and the readiness state.
pub struct RelayContext {
    /// When each kind of client error was last logged.
    last_logged: Mutex<HashMap<String, Instant>>,
    /// The last time a broker refused the relay's credentials or certificates: what to check,
    /// and librdkafka's reason. Read while the relay waits for the cluster at startup, where a
    /// refusal is a configuration mistake rather than an outage.
    last_refusal: Arc<Mutex<Option<BrokerRefusal>>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl RelayContext {
    /// A context reporting into `metrics` and `health`, and recording a broker's refusal of
    /// the relay's credentials in `last_refusal`.
    pub(crate) fn new(
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        last_refusal: Arc<Mutex<Option<BrokerRefusal>>>,
    ) -> Self {
        RelayContext { last_logged: Mutex::default(), last_refusal, metrics, health }
    }
}

impl ClientContext for RelayContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        // Connection failures ("FAIL") also arrive through `error` below, which rate-limits them.
        if facility == "FAIL" {
            tracing::debug!(target: "librdkafka", facility, "{message}");
            return;
        }
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn stats(&self, statistics: Statistics) {
        self.metrics.kafka_queue_messages.set(statistics.msg_cnt as i64);
        let mut up = 0;
        // Bootstrap entries (node id -1) stand for the configured addresses, not brokers.
        for (name, broker) in statistics.brokers.iter().filter(|(_, b)| b.nodeid >= 0) {
            if broker.state == "UP" {
                up += 1;
            }
            if let Some(rtt) = &broker.rtt {
                self.metrics.kafka_broker_rtt.with_label_values(&[name]).set(rtt.avg as f64 / 1_000_000.0);
            }
        }
        self.metrics.kafka_brokers_up.set(up);
        self.health.set_brokers_up(up > 0);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.metrics.kafka_brokers_up.set(0);
            self.health.set_brokers_up(false);
        }
        let kind = error.rdkafka_error_code().map(|c| format!("{c:?}")).unwrap_or_else(|| error.to_string());
        let now = Instant::now();
        let quiet = match self.last_logged.lock() {
            Ok(mut last) => {
                let recent = last.get(&kind).is_some_and(|at| now.duration_since(*at) < REPEATED_ERROR_QUIET);
                if !recent {
                    last.insert(kind, now);
                }
                recent
            }
            Err(_) => false,
        };
        let hint = security_hint(&error, reason);
        if let (Some(hint), Ok(mut last)) = (hint, self.last_refusal.lock()) {
            *last = Some(BrokerRefusal { hint, reason: reason.to_owned() });
        }
        match (quiet, hint) {
            (true, _) => tracing::debug!(target: "librdkafka", error = %error, "Kafka client error: {reason}"),
            // A refused credential or certificate does not fix itself: say what to change.
            (false, Some(hint)) => {
                tracing::error!(target: "librdkafka", error = %error, hint, "Kafka client error: {reason}")
            }
            (false, None) => tracing::warn!(target: "librdkafka", error = %error, "Kafka client error: {reason}"),
        }
    }
}

/// Why no broker could be used at startup.
#[derive(Debug, thiserror::Error)]
pub enum ClusterUnavailable {
    /// No broker answered; librdkafka's last answer.
    #[error("{0}")]
    Unreachable(KafkaError),
    /// A broker answered but refused the relay's credentials or certificates.
    #[error("{0}")]
    Refused(BrokerRefusal),
}

/// A broker refusing the relay's credentials or certificates.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{hint} ({reason})")]
pub struct BrokerRefusal {
    /// What the operator should check, naming the configuration keys.
    pub hint: &'static str,
    /// librdkafka's reason.
    pub reason: String,
}

/// What the operator should check when librdkafka reports an authentication or TLS failure.
fn security_hint(error: &KafkaError, reason: &str) -> Option<&'static str> {
    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Authentication) {
        return Some(
            "the brokers refused the relay's credentials: check kafka.sasl.mechanism, kafka.sasl.username and the password",
        );
    }
    let reason = reason.to_ascii_lowercase();
    if reason.contains("certificate verify failed") {
        Some(
            "the broker's certificate is not trusted: check kafka.tls.ca_file, and that the certificate names the host in kafka.brokers",
        )
    } else if reason.contains("certificate required") || reason.contains("alert bad certificate") {
        // OpenSSL brokers send "certificate required"; Apache Kafka (Java) sends "bad
        // certificate", for a missing certificate as for one it does not trust.
        Some(
            "the broker asks for a client certificate it trusts: set kafka.tls.cert_file and kafka.tls.key_file to one signed by a CA the broker trusts",
        )
    } else if reason.contains("ssl handshake failed") || reason.contains("wrong version number") {
        Some("the TLS handshake failed: check that kafka.security_protocol matches the broker's listener")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_client_certificate_is_hinted_from_openssl_and_from_kafkas_own_brokers() {
        let error = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        // As librdkafka reports them: an OpenSSL server's alert, then Apache Kafka's (Java's).
        for reason in [
            "ssl://localhost:9093/bootstrap: SSL handshake failed: error:0A00045C:SSL routines::tlsv13 alert certificate required: SSL alert number 116",
            "ssl://localhost:9093/bootstrap: Receive failed: error:0A000412:SSL routines::sslv3 alert bad certificate: SSL alert number 42 (after 7ms in state APIVERSION_QUERY)",
        ] {
            let hint = security_hint(&error, reason).unwrap_or_default();
            assert!(hint.contains("client certificate"), "{reason}: {hint}");
        }
    }
}
