//! How the relay's PostgreSQL connections are encrypted: an OpenSSL connector that verifies
//! what libpq's `sslmode` asks for.
//!
//! tokio-postgres understands `sslmode` disable, prefer and require, and leaves verifying the
//! server to the TLS connector. Users write libpq's connection strings, with `verify-ca`,
//! `verify-full` and `sslrootcert`: `[database]` takes those out of the string
//! ([`DatabaseConfig::connect_settings`]), and this module turns them into a connector that
//! verifies what libpq would.

use std::path::{Path, PathBuf};

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;

use crate::config::TlsMode;
use crate::config::{ConfigError, ConnectSettings, DatabaseConfig};

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
    /// Reads `[database]` ([`DatabaseConfig::connect_settings`]) into what a connection needs.
    pub fn from_config(database: &DatabaseConfig) -> Result<ConnectOptions, ConfigError> {
        let ConnectSettings { pg, mode, root_cert, client_cert } = database.connect_settings()?;
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

#[cfg(test)]
mod tests {
    use tokio_postgres::config::SslMode;

    use super::*;
    use crate::config::Secret;

    fn database(url: &str) -> DatabaseConfig {
        DatabaseConfig { url: url.to_owned(), ..DatabaseConfig::default() }
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
