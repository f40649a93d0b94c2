//! How the relay's PostgreSQL connections are authenticated and encrypted: the connection
//! string with its password, and TLS as libpq's `sslmode` describes it.
//!
//! tokio-postgres understands `sslmode` disable, prefer and require, and leaves verifying the
//! server to the TLS connector. Users write libpq's connection strings, with `verify-ca`,
//! `verify-full` and `sslrootcert`, so those are taken out of the string here and turned into
//! an OpenSSL connector that verifies what libpq would.

use std::path::{Path, PathBuf};

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::SslMode;

use crate::config::{ConfigError, DatabaseConfig, SSL_MODES};

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

    fn verifies_certificate(self) -> bool {
        matches!(self, TlsMode::VerifyCa | TlsMode::VerifyFull)
    }
}

/// Everything needed to open a connection: the parsed connection string (password included)
/// and the TLS connector for its `sslmode`.
pub struct ConnectOptions {
    /// The connection string, TLS parameters taken out, password put in.
    pub pg: tokio_postgres::Config,
    /// The `sslmode` in force.
    pub mode: TlsMode,
    root_cert: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
}

impl ConnectOptions {
    /// Reads `[database]`: the URL's own TLS parameters, overridden by the `database.ssl*`
    /// keys, and the password from `database.password` when the URL has none.
    pub fn from_config(database: &DatabaseConfig) -> Result<ConnectOptions, ConfigError> {
        let (conn, from_url) = take_tls_parameters(&database.url);
        let mut pg: tokio_postgres::Config =
            conn.parse().map_err(|e| ConfigError::new("database.url", crate::config::describe_url_error(&conn, &e)))?;
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
        Ok(ConnectOptions { pg, mode, root_cert, client_cert })
    }

    /// The OpenSSL connector that checks what `mode` asks for. Errors name the file at fault.
    pub fn connector(&self) -> Result<MakeTlsConnector, String> {
        let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(|e| format!("OpenSSL: {e}"))?;
        if self.mode.verifies_certificate() {
            builder.set_verify(SslVerifyMode::PEER);
            match &self.root_cert {
                Some(file) => builder.set_ca_file(file).map_err(|e| file_error("sslrootcert", file, e))?,
                None => builder.set_default_verify_paths().map_err(|e| format!("the system's CA certificates: {e}"))?,
            }
        } else {
            // prefer and require encrypt without checking who answers, as libpq does.
            builder.set_verify(SslVerifyMode::NONE);
        }
        if let Some((cert, key)) = &self.client_cert {
            builder.set_certificate_chain_file(cert).map_err(|e| file_error("sslcert", cert, e))?;
            builder.set_private_key_file(key, SslFiletype::PEM).map_err(|e| file_error("sslkey", key, e))?;
        }
        let mut connector = MakeTlsConnector::new(builder.build());
        if self.mode != TlsMode::VerifyFull {
            connector.set_callback(|config, _| {
                config.set_verify_hostname(false);
                Ok(())
            });
        }
        Ok(connector)
    }
}

fn file_error(key: &str, file: &Path, error: openssl::error::ErrorStack) -> String {
    format!("database.{key} {}: {error}", file.display())
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
    use crate::config::Secret;

    fn database(url: &str) -> DatabaseConfig {
        DatabaseConfig { url: url.to_owned(), ..DatabaseConfig::default() }
    }

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

    #[test]
    fn the_modes_map_onto_tokio_postgres_and_config_keys_win() {
        let options = ConnectOptions::from_config(&database("postgres://db/app?sslmode=verify-full")).unwrap();
        assert_eq!(options.mode, TlsMode::VerifyFull);
        assert_eq!(options.pg.get_ssl_mode(), SslMode::Require);

        let mut config = database("postgres://db/app?sslmode=verify-full");
        config.sslmode = Some("disable".into());
        let options = ConnectOptions::from_config(&config).unwrap();
        assert_eq!(options.mode, TlsMode::Disable);
        assert_eq!(options.pg.get_ssl_mode(), SslMode::Disable);

        assert_eq!(ConnectOptions::from_config(&database("postgres://db/app")).unwrap().mode, TlsMode::Prefer);
        let with_root = database("postgres://db/app?sslmode=require&sslrootcert=/ca.pem");
        assert_eq!(ConnectOptions::from_config(&with_root).unwrap().mode, TlsMode::VerifyCa, "as libpq does");

        let error = ConnectOptions::from_config(&database("postgres://db/app?sslmode=verify")).err().unwrap();
        assert_eq!(error.key, "database.url");
        assert!(error.problem.contains("verify-full"), "{}", error.problem);
    }

    #[test]
    fn the_password_is_given_once() {
        let mut config = database("postgres://relay@db/app");
        config.password = Some(Secret::new("s3cret"));
        let options = ConnectOptions::from_config(&config).unwrap();
        assert_eq!(options.pg.get_password(), Some("s3cret".as_bytes()));

        config.url = "postgres://relay:other@db/app".into();
        let error = ConnectOptions::from_config(&config).err().unwrap();
        assert_eq!(error.key, "database.password");
        assert!(!error.problem.contains("other") && !error.problem.contains("s3cret"));
    }
}
