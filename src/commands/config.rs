//! `outbox-relay config`: the effective configuration (file, then environment, then defaults)
//! as TOML, with secrets redacted, so an operator can see what a relay would run with without
//! reading its passwords.

use crate::commands::Report;
use crate::config::Config;

/// The effective configuration, redacted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveConfig {
    /// The configuration as TOML, every secret replaced.
    pub redacted_toml: String,
}

/// Renders `config` for printing. It needs neither the database nor the brokers.
pub fn config(config: &Config) -> EffectiveConfig {
    EffectiveConfig { redacted_toml: config.to_redacted_toml() }
}

impl Report for EffectiveConfig {
    fn render_text(&self) -> String {
        self.redacted_toml.clone()
    }
}
