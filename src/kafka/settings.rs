//! The producer's and reader's librdkafka settings: the user's `[kafka]` section (which builds
//! its own client settings) plus the defaults the relay chooses, and which user timeouts let
//! librdkafka abandon a record.

use crate::config::Config;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};

/// Producer settings the relay chooses. Users may override the tunable ones through
/// `kafka.properties`; the guarantee-bearing ones are refused by config validation.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("client.id", "outbox-relay"),
    ("enable.idempotence", "true"),
    ("acks", "all"),
    // Java-compatible murmur2 for keyed records; NULL keys are spread at random.
    ("partitioner", "murmur2_random"),
    // Never give up on a record (0 is no limit). A record that times out may have been
    // written by a broker that was only slow, and the relay would then send it again: a
    // duplicate without any relay stop. Waiting instead, librdkafka retries with the same
    // producer id and sequence numbers, which the broker deduplicates. An outage shows in
    // readiness, the metrics and a periodic warning, never as row errors.
    (MESSAGE_TIMEOUT, "0"),
    // Queue depth and broker round-trip times for the metrics.
    ("statistics.interval.ms", "5000"),
    // The relay hands librdkafka a whole batch at once and waits for it, so the linger only
    // has to outlast the enqueueing of one batch. With 1 ms it often expired mid-batch: each
    // partition's records then left in several small requests, up to the idempotent producer's
    // five in flight per partition, and the rest waited while the broker threads polled with an
    // expired timeout. On three nodes (RF 3, acks=all) that spinning was two thirds of the
    // relay's CPU; 5 ms cut its CPU per 1,000 rows from 31.9 to 18.6 ms and raised its drain
    // from 0.27 to 0.34 of the broker's ceiling, for about 4 ms more per batch at low rates
    // (benchmark, `--only cluster` and `--only latency`).
    ("linger.ms", "5"),
];

/// librdkafka's limit on how long a record may wait for its acknowledgement;
/// `delivery.timeout.ms` is another name for it.
pub const MESSAGE_TIMEOUT: &str = "message.timeout.ms";

/// The user's `message.timeout.ms` (or `delivery.timeout.ms`) when it lets librdkafka abandon
/// a record: records abandoned after it are sent again and may reach the topic twice.
pub fn abandoning_timeout(config: &Config) -> Option<(&'static str, &str)> {
    [MESSAGE_TIMEOUT, "delivery.timeout.ms"].into_iter().find_map(|name| {
        config.kafka.properties.get(name).map(String::as_str).filter(|v| v.trim() != "0").map(|v| (name, v))
    })
}

/// The librdkafka configuration for a relay: the `[kafka]` section's settings, and beneath
/// them the relay's defaults, which a user property may override.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut client = config.kafka.producer_settings();
    for (name, value) in PRODUCER_DEFAULTS {
        if client.get(name).is_none() {
            client.set(*name, *value);
        }
    }
    client.set_log_level(log_level(config));
    client
}

/// The transactional producer's linger, unless the user sets `linger.ms`. In a transaction no
/// record leaves before its partition is registered with the coordinator (AddPartitionsToTxn),
/// which takes a round trip after the first record is enqueued: the whole batch is enqueued by
/// then, so the registration already does what the linger does for the idempotent producer, and
/// the 5 ms linger only added its remainder to every transaction. At 5k rows/s, 1 ms cut the
/// transaction's p50 from 12 to 7 ms and the rows' p99 from 52 to 43 ms, with the drain unchanged
/// (benchmark, `--only exactly_once`).
const TRANSACTIONAL_LINGER_MS: &str = "1";

/// How long a transaction may stay open before the broker aborts it, unless the user sets
/// `transaction.timeout.ms`.
pub const TRANSACTION_TIMEOUT_MS: &str = "60000";

/// The librdkafka configuration of a transactional producer (`kafka.delivery =
/// "exactly_once"`): the relay's producer with `transactional_id`, a shorter linger (1 ms;
/// see `TRANSACTIONAL_LINGER_MS`) and TCP_NODELAY. A record
/// may time out there: its transaction then aborts, and no consumer reading committed data
/// sees it, so librdkafka's limit is the transaction's (it refuses a longer one).
pub fn transactional_producer_config(config: &Config, transactional_id: &str) -> ClientConfig {
    let mut client = producer_config(config);
    client.set("transactional.id", transactional_id);
    if !config.kafka.properties.contains_key("linger.ms") {
        client.set("linger.ms", TRANSACTIONAL_LINGER_MS);
    }
    // A transaction is a chain of small requests, each waiting for the answer to the one
    // before (AddPartitionsToTxn, the records, EndTxn): TCP_NODELAY, as Kafka's Java client sets
    // on every socket, keeps Nagle's algorithm from holding one back. In two benchmark runs at
    // 5k rows/s, p99 45.7 and 46.6 ms against 45.3-50.5 ms in four without.
    if !config.kafka.properties.contains_key("socket.nagle.disable") {
        client.set("socket.nagle.disable", "true");
    }
    let transaction_timeout =
        config.kafka.properties.get("transaction.timeout.ms").map_or(TRANSACTION_TIMEOUT_MS, String::as_str).to_owned();
    client.set("transaction.timeout.ms", &transaction_timeout);
    if abandoning_timeout(config).is_none() {
        client.set(MESSAGE_TIMEOUT, &transaction_timeout);
    }
    client
}

/// Info, or Debug when `kafka.properties.debug` asks librdkafka for debug contexts (which it
/// would otherwise compute and then drop).
fn log_level(config: &Config) -> RDKafkaLogLevel {
    if config.kafka.properties.contains_key("debug") { RDKafkaLogLevel::Debug } else { RDKafkaLogLevel::Info }
}

/// Property prefixes that say how to reach and authenticate to the cluster. Tools that read
/// topics (`audit`) take these from `kafka.properties` and leave the producer tuning out.
const CONNECTION_PROPERTY_PREFIXES: &[&str] =
    &["security.", "sasl.", "ssl.", "client.", "socket.", "broker.", "api.version", "metadata.", "reconnect."];

/// The librdkafka configuration for reading topics: brokers, and the connection and security
/// properties of `kafka.properties`.
pub fn reader_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.brokers);
    for (name, value) in &config.kafka.properties {
        if CONNECTION_PROPERTY_PREFIXES.iter().any(|p| name.starts_with(p)) {
            client.set(name, value);
        }
    }
    for (name, value) in config.kafka.security_properties() {
        client.set(name, value);
    }
    client.set_log_level(if config.kafka.properties.contains_key("debug") {
        RDKafkaLogLevel::Debug
    } else {
        RDKafkaLogLevel::Warning
    });
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_producer_lingers_long_enough_for_a_whole_batch_to_be_enqueued_unless_the_user_says_otherwise() {
        let mut config = Config::default();
        assert_eq!(producer_config(&config).get("linger.ms"), Some("5"));
        config.kafka.properties.insert("linger.ms".to_owned(), "1".to_owned());
        assert_eq!(producer_config(&config).get("linger.ms"), Some("1"));
    }

    #[test]
    fn the_transactional_producer_lingers_a_millisecond_without_nagle_unless_the_user_says_otherwise() {
        let mut config = Config::default();
        assert_eq!(transactional_producer_config(&config, "t").get("linger.ms"), Some("1"));
        assert_eq!(transactional_producer_config(&config, "t").get("socket.nagle.disable"), Some("true"));
        config.kafka.properties.insert("linger.ms".to_owned(), "7".to_owned());
        config.kafka.properties.insert("socket.nagle.disable".to_owned(), "false".to_owned());
        assert_eq!(transactional_producer_config(&config, "t").get("linger.ms"), Some("7"));
        assert_eq!(transactional_producer_config(&config, "t").get("socket.nagle.disable"), Some("false"));
    }
}
