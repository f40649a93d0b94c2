//! Secrets: the [`Secret`] type that never prints itself, secrets read from files, and the
//! redaction of connection strings and librdkafka properties in `config` output and logs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize, Serializer};

use super::{Config, ConfigError};

/// Words that mark a librdkafka property as secret in `config` output and logs.
const SECRET_PROPERTY_WORDS: &[&str] = &["password", "secret", "pem", "token", "oauthbearer.config"];

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

impl Config {
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
