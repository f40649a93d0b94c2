//! TLS to PostgreSQL: every libpq `sslmode` against a server started with `ssl=on` and a
//! certificate the test issues, and the relay's whole path (migrate, claim, mark, LISTEN) over
//! a verify-full connection.

use std::path::Path;
use std::time::Duration;

use crate::support::tls::TestCa;
use crate::support::{
    NewEvent, PATIENCE, Postgres, RunningRelay, connect, insert_events, test_broker, unique_name, wait_until,
};
use outbox_relay::config::Config;

/// A PostgreSQL server with TLS on, its certificate naming only `localhost`, and its CA.
struct TlsServer {
    postgres: Postgres,
    ca: TestCa,
    /// A CA that did not sign the server's certificate.
    stranger: TestCa,
    _dir: tempfile::TempDir,
}

impl TlsServer {
    fn start() -> TlsServer {
        // The server runs as the postgres OS user, which must reach the files and own the key.
        let dir = tempfile::tempdir().expect("temp dir");
        set_mode(dir.path(), 0o755);
        let ca = TestCa::new(dir.path(), "pg");
        let stranger = TestCa::new(dir.path(), "stranger");
        let (cert, key) = ca.issue("server", &["localhost"]);
        give_to_postgres(&key);
        let postgres = Postgres::start_with(&[
            "ssl=on",
            &format!("ssl_cert_file={}", cert.display()),
            &format!("ssl_key_file={}", key.display()),
        ]);
        TlsServer { postgres, ca, stranger, _dir: dir }
    }

    /// A URL for `database` on `host` (the certificate names `localhost` only) with `params`.
    fn url(&self, host: &str, database: &str, params: &str) -> String {
        format!("postgres://postgres@{host}:{}/{database}?{params}", self.postgres.port)
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn give_to_postgres(path: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let status = std::process::Command::new("chown").arg("postgres:postgres").arg(path).status().expect("chown");
        assert!(status.success());
    }
}

/// Connects as the relay does and says whether the session is encrypted.
async fn connect_as_relay(url: &str) -> Result<bool, String> {
    let mut config = Config::default();
    config.database.url = url.to_owned();
    let client = outbox_relay::postgres::connect::connect_client(&config).await.map_err(|e| e.to_string())?;
    let row = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_connects_or_refuses_as_libpq_would() {
    let server = TlsServer::start();
    let ca = server.ca.ca_file().display().to_string();
    let stranger = server.stranger.ca_file().display().to_string();

    let verified = server.url("localhost", "postgres", &format!("sslmode=verify-full&sslrootcert={ca}"));
    assert_eq!(connect_as_relay(&verified).await, Ok(true), "verify-full by the certificate's name");

    let wrong_name = server.url("127.0.0.1", "postgres", &format!("sslmode=verify-full&sslrootcert={ca}"));
    let error = connect_as_relay(&wrong_name).await.expect_err("the certificate does not name 127.0.0.1");
    assert!(error.contains("certificate verify failed") && error.contains("address mismatch"), "{error}");
    assert!(error.contains("cannot connect to PostgreSQL at 127.0.0.1"), "{error}");

    let chain_only = server.url("127.0.0.1", "postgres", &format!("sslmode=verify-ca&sslrootcert={ca}"));
    assert_eq!(connect_as_relay(&chain_only).await, Ok(true), "verify-ca checks the chain, not the name");

    let untrusted = server.url("localhost", "postgres", &format!("sslmode=verify-ca&sslrootcert={stranger}"));
    let error = connect_as_relay(&untrusted).await.expect_err("signed by another CA");
    assert!(error.contains("certificate verify failed"), "{error}");

    assert_eq!(connect_as_relay(&server.url("127.0.0.1", "postgres", "sslmode=require")).await, Ok(true));
    assert_eq!(connect_as_relay(&server.url("127.0.0.1", "postgres", "sslmode=prefer")).await, Ok(true));
    assert_eq!(connect_as_relay(&server.url("127.0.0.1", "postgres", "sslmode=disable")).await, Ok(false));

    // The database.ssl* keys say the same without touching the URL, and win over it.
    let mut config = Config::default();
    config.database.url = server.url("localhost", "postgres", "sslmode=disable");
    config.database.sslmode = Some("verify-full".into());
    config.database.sslrootcert = Some(server.ca.ca_file());
    config.validate().expect("valid");
    let client = outbox_relay::postgres::connect::connect_client(&config).await.expect("connect");
    let ssl: bool =
        client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(ssl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_migrates_and_publishes_over_a_verify_full_connection() {
    let server = TlsServer::start();
    let (_own_broker, brokers) = test_broker();
    let database = unique_name("db");
    let admin = connect(&server.postgres.url("postgres")).await;
    admin.batch_execute(&format!("CREATE DATABASE {database}")).await.unwrap();

    let mut config = Config::default();
    let ca = server.ca.ca_file().display().to_string();
    config.database.url = server.url("localhost", &database, &format!("sslmode=verify-full&sslrootcert={ca}"));
    config.kafka.brokers = brokers.clone();
    config.metrics.listen = String::new();
    config.relay.poll_interval = Duration::from_millis(20);
    config.validate().expect("valid");
    outbox_relay::postgres::schema::migrate(&config).await.expect("migrate over TLS");

    let topic = unique_name("topic");
    crate::support::create_topic(&brokers, &topic, 1).await;
    let db = connect(&server.postgres.url(&database)).await;
    insert_events(&db, &(0..3).map(|i| NewEvent::keyed(&topic, "k", i)).collect::<Vec<_>>()).await;
    let relay = RunningRelay::spawn(config);
    wait_until(PATIENCE, "rows published over TLS", || {
        let db = &db;
        async move { crate::support::unpublished_count(db).await == 0 }
    })
    .await;
    let encrypted: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'outbox-relay' AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "the relay's sessions are encrypted");
    relay.stop().await.expect("clean stop");
}
