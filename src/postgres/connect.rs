//! Opening connections: the connection string and `[database]` settings (TLS through
//! `postgres::tls`), the relay's `application_name`, a connect timeout, and the
//! session settings every connection of the relay needs before its first statement.
//!
//! Credentials never leave this module in a message: [`describe_target`] names a database by
//! host, port and name only.

use std::time::Duration;

use postgres_openssl::MakeTlsConnector;
use tokio_postgres::Client;

use crate::config::{Config, redact_connection_string};
use crate::postgres::error::OutboxError;
use crate::postgres::tls::ConnectOptions;

/// Default `application_name`, so operators can find the relay in `pg_stat_activity`.
const APPLICATION_NAME: &str = "outbox-relay";

/// How long a connection attempt may take when the URL does not say.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The driven half of a connection: plain TCP or TLS, as `database.sslmode` and the server
/// agree.
pub type PgConnection =
    tokio_postgres::Connection<tokio_postgres::Socket, postgres_openssl::TlsStream<tokio_postgres::Socket>>;

/// Opens a plain connection (no statements prepared), for migrations and checks.
pub async fn connect_client(config: &Config) -> Result<Client, OutboxError> {
    Ok(connect_session(config).await?.0)
}

/// [`connect_client`], with the TLS connector the connection was opened with (a cancel request
/// opens a connection of its own, as the session's did).
pub(in crate::postgres) async fn connect_session(config: &Config) -> Result<(Client, MakeTlsConnector), OutboxError> {
    let (client, connection, tls) = open(config).await?;
    let target = describe_target(&config.database.url);
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(database = %target, error = %e, "PostgreSQL connection closed");
        }
    });
    // A SQL_ASCII database stores any bytes in text columns. Asked for UTF-8, the server fails
    // the whole query at the first value that is not UTF-8, so one bad row would stop every
    // claim; asked for the bytes as stored, the relay can fail that row alone when it decodes it.
    let encoding = client.query_one("SHOW server_encoding", &[]).await.map_err(OutboxError::query("show encoding"))?;
    if encoding.try_get::<_, String>(0).is_ok_and(|e| e == "SQL_ASCII") {
        client
            .batch_execute("SET client_encoding = 'SQL_ASCII'")
            .await
            .map_err(OutboxError::query("set client_encoding"))?;
    }
    // A relay killed with -9 (or cut off) leaves its statement running until the server next
    // writes to the dead socket: a claim waiting on a lock kept its shard locks for the whole
    // wait. PostgreSQL 14 and later can check the socket while a statement runs and cancel it.
    let version = client.query_one("SHOW server_version_num", &[]).await.map_err(OutboxError::query("show version"))?;
    if version.try_get::<_, String>(0).ok().and_then(|v| v.parse::<u32>().ok()).is_some_and(|v| v >= 140_000) {
        client
            .batch_execute(&format!("SET client_connection_check_interval = {}", CLIENT_CHECK_INTERVAL_MS))
            .await
            .map_err(OutboxError::query("set client_connection_check_interval"))?;
    }
    Ok((client, tls))
}

/// How often PostgreSQL checks, during a statement, that the relay is still connected.
const CLIENT_CHECK_INTERVAL_MS: u32 = 1000;
/// A connection whose `Connection` half the caller drives (to receive notifications).
pub async fn connect_raw(config: &Config) -> Result<(Client, PgConnection), OutboxError> {
    let (client, connection, _) = open(config).await?;
    Ok((client, connection))
}

async fn open(config: &Config) -> Result<(Client, PgConnection, MakeTlsConnector), OutboxError> {
    let target = describe_target(&config.database.url);
    let settings = |problem: String| OutboxError::Settings { target: target.clone(), problem };
    let options = ConnectOptions::from_config(&config.database).map_err(|e| settings(e.to_string()))?;
    let connector = options.connector().map_err(settings)?;
    let mut pg = options.pg;
    if pg.get_application_name().is_none() {
        pg.application_name(APPLICATION_NAME);
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    let (client, connection) =
        pg.connect(connector.clone()).await.map_err(|source| OutboxError::Connect { target, source })?;
    Ok((client, connection, connector))
}

/// `host:port/dbname` of a connection string, for messages that must not carry a password.
pub fn describe_target(url: &str) -> String {
    match crate::config::without_tls_parameters(url).parse::<tokio_postgres::Config>() {
        Ok(pg) => {
            let host = pg
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(name) => name.clone(),
                    tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".to_owned());
            let port = pg.get_ports().first().copied().unwrap_or(5432);
            format!("{host}:{port}/{}", pg.get_dbname().unwrap_or("(default)"))
        }
        Err(_) => redact_connection_string(url),
    }
}
