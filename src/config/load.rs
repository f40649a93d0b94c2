//! Loading: built-in defaults, then the TOML file, then `OUTBOX_RELAY_*` environment
//! variables (figment layers them), and turning figment's errors into one line that names the
//! key and where its value came from.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};

use super::{Config, ConfigError, ENV_PREFIX};

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
