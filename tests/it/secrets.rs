//! No secret leaves the relay: a run that used a PostgreSQL password, a SASL password and an
//! encrypted TLS client key, with every log at trace and librdkafka's debug output on, and the
//! runs that failed on wrong secrets, print none of them, nor does `config`, `status` or
//! `/metrics`.

use std::path::Path;

use crate::support::secured_kafka::{Listener, SecuredKafka};
use crate::support::tls::TestCa;
use crate::support::{
    NewEvent, PATIENCE, Postgres, RELAY_PASSWORD, connect, free_port, http_get, insert_events, login_as, run_command,
    run_relay_role_script, unique_name, wait_until, write_config_to,
};
use openssl::pkey::PKey;
use openssl::symm::Cipher;
use outbox_relay::config::{Config, SecurityProtocol};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

const SASL_PASSWORD: &str = "sasl-Secret-7f3a";
const KEY_PASSWORD: &str = "key-Secret-91bc";
const WRONG_PG_PASSWORD: &str = "wrong-pg-Secret-55d0";
const WRONG_SASL_PASSWORD: &str = "wrong-sasl-Secret-0e42";

/// A server that checks passwords (SCRAM) for every login but the test's own superuser.
fn password_checking_postgres(dir: &Path) -> Postgres {
    let hba = dir.join("pg_hba.conf");
    std::fs::write(&hba, "host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n").unwrap();
    Postgres::start_with(&[&format!("hba_file={}", hba.display())])
}

/// Re-writes `key_file` encrypted with `password` (PKCS#8, AES-256-CBC).
fn encrypt_key(key_file: &Path, password: &str) {
    let key = PKey::private_key_from_pem(&std::fs::read(key_file).unwrap()).unwrap();
    let encrypted = key.private_key_to_pem_pkcs8_passphrase(Cipher::aes_256_cbc(), password.as_bytes()).unwrap();
    std::fs::write(key_file, encrypted).unwrap();
}

/// Every secret of the test, and a line of each private key's PEM.
fn secrets(keys: &[&Path]) -> Vec<String> {
    let mut secrets: Vec<String> =
        [RELAY_PASSWORD, SASL_PASSWORD, KEY_PASSWORD, WRONG_PG_PASSWORD, WRONG_SASL_PASSWORD].map(String::from).into();
    for key in keys {
        let pem = std::fs::read_to_string(key).unwrap();
        secrets.extend(pem.lines().filter(|l| !l.starts_with("-----")).take(1).map(String::from));
    }
    secrets
}

fn assert_no_secret(what: &str, text: &str, secrets: &[String]) {
    assert!(!text.is_empty(), "{what}: no output to check");
    for secret in secrets {
        assert!(!text.contains(secret.as_str()), "{what} shows the secret {secret:?}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_or_key_appears_in_logs_config_status_metrics_or_errors() {
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // PostgreSQL: the relay logs in as its restricted role with a password the server checks.
    let postgres = password_checking_postgres(dir.path());
    let database = unique_name("db");
    connect(&postgres.url("postgres")).await.batch_execute(&format!("CREATE DATABASE {database}")).await.unwrap();
    let owner_url = postgres.url(&database);
    let mut owner = Config::default();
    owner.database.url = owner_url.clone();
    outbox_relay::postgres::schema::migrate(&owner).await.expect("migrate");
    let role = unique_name("relay");
    run_relay_role_script(&owner_url, &role, false).expect("relay role");

    // Kafka: SASL SCRAM over TLS, to a broker that also wants the relay's certificate, whose key
    // is encrypted.
    let ca = TestCa::new(dir.path(), "kafka");
    let broker = SecuredKafka::start(&ca, &[("alice", SASL_PASSWORD, "SCRAM-SHA-512")]).await;
    let advertised = broker.address(Listener::SaslSslWithClientCertificate);
    let (client_cert, client_key) = ca.issue("relay", &["outbox-relay"]);
    let secrets = secrets(&[broker.key_file(), client_key.as_path()]);
    encrypt_key(&client_key, KEY_PASSWORD);
    let topic = unique_name("topic");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &advertised)
        .set("security.protocol", "sasl_ssl")
        .set("ssl.ca.location", ca.ca_file().display().to_string())
        .set("ssl.certificate.location", client_cert.display().to_string())
        .set("ssl.key.location", client_key.display().to_string())
        .set("ssl.key.password", KEY_PASSWORD)
        .set("sasl.mechanisms", "SCRAM-SHA-512")
        .set("sasl.username", "alice")
        .set("sasl.password", SASL_PASSWORD)
        .create()
        .unwrap();
    let new_topic = [NewTopic::new(&topic, 1, TopicReplication::Fixed(1))];
    let created = admin.create_topics(&new_topic, &AdminOptions::new()).await.unwrap();
    created.into_iter().for_each(|r| assert!(r.is_ok(), "{r:?}"));
    let db = connect(&owner_url).await;
    insert_events(&db, &(0..3).map(|i| NewEvent::keyed(&topic, "k", i)).collect::<Vec<_>>()).await;

    // The relay's config file holds the PostgreSQL password in the URL, as many do; the key's
    // password comes from a file, the SASL password from the environment.
    let mut config = Config::default();
    config.database.url = format!("{}?sslmode=disable", login_as(&owner_url, &role, RELAY_PASSWORD));
    config.kafka.brokers = advertised.clone();
    config.kafka.security_protocol = SecurityProtocol::SaslSsl;
    config.kafka.tls.ca_file = Some(ca.ca_file());
    config.kafka.tls.cert_file = Some(client_cert.clone());
    config.kafka.tls.key_file = Some(client_key.clone());
    let key_password_file = dir.path().join("key-password");
    std::fs::write(&key_password_file, KEY_PASSWORD).unwrap();
    config.kafka.tls.key_password_file = Some(key_password_file);
    config.kafka.sasl.mechanism = Some("SCRAM-SHA-512".into());
    config.kafka.sasl.username = Some("alice".into());
    config.kafka.properties.insert("debug".into(), "all".into());
    config.metrics.listen = format!("127.0.0.1:{}", free_port());
    config.log.level = "trace".into();
    config.log.payloads = true;
    let config_file = dir.path().join("relay.toml");
    write_config_to(&config_file, &config);
    let config_arg = config_file.display().to_string();
    let sasl_env = ("OUTBOX_RELAY_KAFKA__SASL__PASSWORD", SASL_PASSWORD);

    let mut relay =
        crate::support::spawn_relay_process_from(&config_file, &[sasl_env, ("RUST_LOG", "trace")], dir.path());
    wait_until(PATIENCE, "the rows published", || {
        let db = &db;
        async move { crate::support::unpublished_count(db).await == 0 }
    })
    .await;
    let (status, metrics) = http_get(&config.metrics.listen, "/metrics").await;
    assert_eq!(status, 200);
    assert_no_secret("/metrics", &metrics, &secrets);
    relay.signal(libc::SIGTERM);
    relay.wait().await;
    let log = relay.log();
    assert!(log.contains("SASL") && log.contains("TRACE"), "the log is the verbose one");
    assert_no_secret("the relay's log at trace with librdkafka debug=all", &log, &secrets);

    for command in [&["--config", &config_arg, "config"][..], &["--config", &config_arg, "status"]] {
        let (code, stdout, stderr) = run_command(command, &[sasl_env]);
        assert_eq!(code, 0, "{command:?}: {stderr}");
        assert_no_secret(&format!("{command:?}"), &format!("{stdout}{stderr}"), &secrets);
    }

    // Wrong secrets: the errors name what failed, never the secret tried or the right one.
    let mut wrong = config.clone();
    wrong.database.url = format!("{}?sslmode=disable", login_as(&owner_url, &role, WRONG_PG_PASSWORD));
    let wrong_file = dir.path().join("wrong-pg.toml");
    write_config_to(&wrong_file, &wrong);
    let (code, stdout, stderr) = run_command(&["--config", &wrong_file.display().to_string(), "status"], &[sasl_env]);
    assert_ne!(code, 0);
    assert!(stderr.contains("password authentication failed"), "{stderr}");
    assert_no_secret("status with a wrong database password", &format!("{stdout}{stderr}"), &secrets);

    let mut relay = crate::support::spawn_relay_process_from(
        &config_file,
        &[("OUTBOX_RELAY_KAFKA__SASL__PASSWORD", WRONG_SASL_PASSWORD), ("RUST_LOG", "trace")],
        dir.path(),
    );
    relay.wait_for_log("the brokers refused the relay's credentials").await;
    relay.signal(libc::SIGTERM);
    relay.wait().await;
    assert_no_secret("the relay's log with a wrong SASL password", &relay.log(), &secrets);
}
