//! Validation across sections: every value the loops rely on is checked once, at startup, with
//! an error that names its key. Checks that belong to one section live with it; the order here
//! decides which problem is reported first.

use std::path::Path;

use super::{
    Config, ConfigError, Identifier, MIN_TAKEOVER_AFTER, MarkMode, PlacementTarget, REDACTED, TopicRoute, TopicTemplate,
};

impl Config {
    /// Checks every value the loops rely on. Called by [`Config::load`]; call it again after
    /// changing a loaded config in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.connect_settings()?;
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

        self.kafka.validate_brokers_and_properties()?;
        self.kafka.exactly_once.validate()?;

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
        if let Some(route) = &outbox.topic_route {
            if outbox.topic_template.is_some() {
                return Err(ConfigError::new(
                    "outbox.topic_route",
                    "and outbox.topic_template are both set; a row's topic comes from one of them",
                ));
            }
            TopicRoute::parse(route).map_err(|(key, p)| ConfigError::new(format!("outbox.topic_route.{key}"), p))?;
        }
        match (&outbox.topic_template, &columns.topic) {
            _ if outbox.topic_route.is_some() => {}
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
        self.validate_record_shape()?;
        if outbox.mark == MarkMode::Update && columns.published_at.is_none() {
            return Err(ConfigError::new(
                "outbox.columns.published_at",
                "is empty, but outbox.mark = \"update\" needs it; name the column or set outbox.mark = \"delete\"",
            ));
        }
        Ok(())
    }
}

impl Config {
    fn validate_record_shape(&self) -> Result<(), ConfigError> {
        let record = &self.outbox.record;
        let header = &record.event_id_header;
        if header.is_empty() {
            return Err(ConfigError::new(
                "outbox.record.event_id_header",
                "is empty; consumers find the event id by this header's name (Debezium's is \"id\")",
            ));
        }
        let placements = record.parsed_placements().map_err(|p| ConfigError::new("outbox.record.placements", p))?;
        if !record.value_format.is_json()
            && let Some(envelope) = placements.iter().find(|p| p.target == PlacementTarget::Envelope)
        {
            return Err(ConfigError::new(
                "outbox.record.placements",
                format!(
                    "puts column \"{}\" into an envelope, which is a JSON object; set outbox.record.value_format = \"json_string\" or \"json_expanded\"",
                    envelope.column.as_str()
                ),
            ));
        }
        Ok(())
    }
}

/// A file named by a config key must be there and readable when the relay starts, not when it
/// first reconnects.
pub(super) fn check_readable(key: &str, file: Option<&Path>) -> Result<(), ConfigError> {
    match file {
        Some(path) => std::fs::File::open(path)
            .map(|_| ())
            .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display()))),
        None => Ok(()),
    }
}
