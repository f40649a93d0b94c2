//! `[database]`: the connection string, its password and TLS as libpq's `sslmode` describes it.
//!
//! The section builds its own connection settings ([`DatabaseConfig::connect_settings`]): the
//! connection string parsed by tokio-postgres, the TLS parameters taken out of it, the password
//! put in. Validation builds them to find a bad URL at startup; the connecting code starts from
//! the same settings and only adds the TLS connector.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio_postgres::config::SslMode;

use super::serde_text::{deserialize_optional, deserialize_optional_path, serialize_optional, serialize_optional_path};
use super::validate::check_readable;
use super::{ConfigError, Secret};

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

/// libpq's `sslmode` values.
pub const SSL_MODES: &[&str] = &["disable", "prefer", "require", "verify-ca", "verify-full"];

impl DatabaseConfig {
    pub(super) fn validate_tls(&self) -> Result<(), ConfigError> {
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

/// What a connection to the database needs, read from `[database]`: the parsed connection string
/// (password included) and what TLS must verify. The connecting code turns `mode` and the
/// certificate files into a TLS connector.
pub struct ConnectSettings {
    /// The connection string, TLS parameters taken out, password put in.
    pub pg: tokio_postgres::Config,
    /// The `sslmode` in force.
    pub mode: TlsMode,
    /// CA certificates that verify the server (`sslrootcert`).
    pub root_cert: Option<PathBuf>,
    /// Client certificate and key (`sslcert`, `sslkey`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl DatabaseConfig {
    /// Reads `[database]`: the URL's own TLS parameters, overridden by the `database.ssl*`
    /// keys, and the password from `database.password` when the URL has none.
    pub fn connect_settings(&self) -> Result<ConnectSettings, ConfigError> {
        let database = self;
        let (conn, from_url) = take_tls_parameters(&database.url);
        let mut pg: tokio_postgres::Config =
            conn.parse().map_err(|e| ConfigError::new("database.url", describe_url_error(&conn, &e)))?;
        let setting = |key: &'static str, configured: Option<String>| -> Option<(String, String)> {
            match configured {
                Some(value) => Some((format!("database.{key}"), value)),
                None => from_url
                    .iter()
                    .find(|(name, _)| name == key)
                    .map(|(_, value)| ("database.url".to_owned(), value.clone())),
            }
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let root_cert = setting("sslrootcert", path(&database.sslrootcert)).map(|(_, v)| PathBuf::from(v));
        let mode = match setting("sslmode", database.sslmode.clone()) {
            Some((key, value)) => TlsMode::parse(&key, &value)?,
            None => TlsMode::Prefer,
        };
        // As libpq: "require" with a root certificate given verifies the chain like verify-ca.
        let mode = if mode == TlsMode::Require && root_cert.is_some() { TlsMode::VerifyCa } else { mode };
        let client_cert = match (setting("sslcert", path(&database.sslcert)), setting("sslkey", path(&database.sslkey)))
        {
            (Some((_, cert)), Some((_, key))) => Some((PathBuf::from(cert), PathBuf::from(key))),
            (None, None) => None,
            (Some((key, _)), None) | (None, Some((key, _))) => {
                return Err(ConfigError::new(key, "sslcert and sslkey go together; give both"));
            }
        };
        if let Some(password) = &database.password {
            if pg.get_password().is_some() {
                return Err(ConfigError::new(
                    "database.password",
                    "is set but database.url has a password too; give it one way",
                ));
            }
            pg.password(password.expose());
        }
        pg.ssl_mode(match mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        });
        Ok(ConnectSettings { pg, mode, root_cert, client_cert })
    }
}

/// Connection-string parameters that are TLS settings, handled here rather than by
/// tokio-postgres.
const TLS_PARAMETERS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// What libpq's `sslmode` asks of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, without verifying the server.
    Prefer,
    /// TLS, without verifying the server.
    Require,
    /// TLS; the server's certificate must chain to a trusted CA.
    VerifyCa,
    /// As verify-ca, and the certificate must name the host connected to.
    VerifyFull,
}

impl TlsMode {
    fn parse(key: &str, value: &str) -> Result<TlsMode, ConfigError> {
        Ok(match value {
            "disable" => TlsMode::Disable,
            // libpq's "allow" tries without TLS first; the relay treats it as prefer.
            "prefer" | "allow" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            other => {
                return Err(ConfigError::new(
                    key,
                    format!("sslmode \"{other}\" is not one of {}", SSL_MODES.join(", ")),
                ));
            }
        })
    }

    /// Whether the server's certificate must chain to a trusted CA.
    pub fn verifies_certificate(self) -> bool {
        matches!(self, TlsMode::VerifyCa | TlsMode::VerifyFull)
    }
}

/// The connection string without its TLS parameters, as tokio-postgres can parse it.
pub fn without_tls_parameters(conn: &str) -> String {
    take_tls_parameters(conn).0
}

/// Splits the TLS parameters out of a connection string: the string without them, and their
/// values. Handles `postgres://` URLs (query parameters) and libpq `key=value` strings
/// (unquoted values).
fn take_tls_parameters(conn: &str) -> (String, Vec<(String, String)>) {
    let mut taken = Vec::new();
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        let Ok(mut url) = url::Url::parse(conn) else { return (conn.to_owned(), taken) };
        let mut kept = Vec::new();
        for (name, value) in url.query_pairs() {
            if TLS_PARAMETERS.contains(&name.as_ref()) {
                taken.push((name.into_owned(), value.into_owned()));
            } else {
                kept.push((name.into_owned(), value.into_owned()));
            }
        }
        if taken.is_empty() {
            return (conn.to_owned(), taken);
        }
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        return (url.to_string(), taken);
    }
    let kept: Vec<&str> = conn
        .split_whitespace()
        .filter(|token| {
            let Some((name, value)) = token.split_once('=') else { return true };
            let name = name.trim();
            if TLS_PARAMETERS.contains(&name) && !value.is_empty() && !value.starts_with('\'') {
                taken.push((name.to_owned(), value.to_owned()));
                return false;
            }
            true
        })
        .collect();
    if taken.is_empty() { (conn.to_owned(), taken) } else { (kept.join(" "), taken) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_come_out_of_urls_and_key_value_strings() {
        let (url, taken) = take_tls_parameters(
            "postgres://relay@db:5432/app?sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=5",
        );
        assert_eq!(url, "postgres://relay@db:5432/app?connect_timeout=5");
        assert_eq!(taken, vec![("sslmode".into(), "verify-full".into()), ("sslrootcert".into(), "/ca.pem".into())]);
        let (kv, taken) = take_tls_parameters("host=db user=relay sslmode=verify-ca sslrootcert=/ca.pem");
        assert_eq!(kv, "host=db user=relay");
        assert_eq!(taken.len(), 2);
        assert_eq!(take_tls_parameters("postgres://db/app").0, "postgres://db/app");
    }
}
