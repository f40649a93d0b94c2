//! Configuration: layered defaults < file < environment, every error one line naming the key
//! (exit 2), secrets never printed, and a table that does not match the mapping refused by name.

use crate::support::*;

/// Runs `outbox-relay ARGS` and expects the one-line configuration error that names `key`.
fn assert_config_error(args: &[&str], env: &[(&str, &str)], key: &str) -> String {
    let (code, stdout, stderr) = run_command(args, env);
    assert_eq!(code, 2, "a configuration error exits 2; stderr: {stderr}");
    assert!(stdout.is_empty(), "nothing on stdout: {stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line: {stderr}");
    assert!(lines[0].contains(key), "the line names {key}: {stderr}");
    stderr
}

fn write_file(name: &str, text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path.display().to_string())
}

#[test]
fn an_invalid_environment_value_exits_2_naming_the_key_and_the_variable() {
    let err = assert_config_error(&["config"], &[("OUTBOX_RELAY_RELAY__BATCH_SIZE", "lots")], "relay.batch_size");
    assert!(err.contains("OUTBOX_RELAY_RELAY__BATCH_SIZE"), "{err}");
}

#[test]
fn an_invalid_file_value_exits_2_naming_the_key_and_the_file() {
    let (_dir, path) = write_file("relay.toml", "[relay]\npoll_interval = \"soon\"\n");
    let err = assert_config_error(&["--config", &path, "config"], &[], "relay.poll_interval");
    assert!(err.contains("relay.toml"), "{err}");
    assert!(err.contains("such as \"500ms\", \"30s\""), "a duration error shows what one looks like: {err}");
}

#[test]
fn an_unknown_key_is_an_error_that_lists_the_known_ones() {
    let err = assert_config_error(&["config"], &[("OUTBOX_RELAY_RELAY__BATCHSIZE", "5")], "relay.batchsize");
    assert!(err.contains("batch_size"), "{err}");
}

#[test]
fn a_bad_database_url_names_the_part_that_is_wrong() {
    let err = assert_config_error(
        &["config"],
        &[("OUTBOX_RELAY_DATABASE__URL", "postgres://app:secret@db:54x2/app")],
        "database.url",
    );
    assert!(err.contains("invalid port \"54x2\""), "{err}");
    assert!(!err.contains("secret"), "the password is not echoed: {err}");
}

#[test]
fn out_of_range_and_unparseable_values_are_refused() {
    assert_config_error(&["config"], &[("OUTBOX_RELAY_RELAY__BATCH_SIZE", "0")], "relay.batch_size");
    assert_config_error(&["config"], &[("OUTBOX_RELAY_METRICS__LISTEN", "everywhere")], "metrics.listen");
    assert_config_error(&["config"], &[("OUTBOX_RELAY_KAFKA__BROKERS", " ")], "kafka.brokers");
    assert_config_error(
        &["config"],
        &[("OUTBOX_RELAY_OUTBOX__TOPIC_TEMPLATE", "events.{type")],
        "outbox.topic_template",
    );
    assert_config_error(&["config"], &[("OUTBOX_RELAY_LOG__FORMAT", "xml")], "log.format");
    assert_config_error(
        &["config"],
        &[("OUTBOX_RELAY_TELEMETRY__OTLP_ENDPOINT", "collector:4318")],
        "telemetry.otlp_endpoint",
    );
    assert_config_error(
        &["config"],
        &[("OUTBOX_RELAY_RETENTION__DELETE_PUBLISHED_AFTER", "a week")],
        "retention.delete_published_after",
    );
    assert_config_error(&["config"], &[("OUTBOX_RELAY_RELAY__SHARDS", "0")], "relay.shards");
    assert_config_error(&["config"], &[("OUTBOX_RELAY_RELAY__TAKEOVER_AFTER", "1s")], "relay.takeover_after");
}

#[test]
fn a_librdkafka_property_typo_is_caught_before_the_relay_starts() {
    let (_dir, path) = write_file("relay.toml", "[kafka.properties]\n\"linger.msec\" = 5\n");
    let err = assert_config_error(&["--config", &path, "config"], &[], "kafka.properties.linger.msec");
    assert!(err.contains("No such configuration property"), "{err}");
}

#[test]
fn properties_that_would_weaken_the_delivery_guarantee_are_refused() {
    assert_config_error(&["config"], &[("OUTBOX_RELAY_KAFKA__PROPERTIES__ACKS", "1")], "kafka.properties.acks");
    assert_config_error(
        &["config"],
        &[("OUTBOX_RELAY_KAFKA__PROPERTIES__ENABLE_IDEMPOTENCE", "false")],
        "kafka.properties.enable.idempotence",
    );
}

#[test]
fn mark_update_without_a_published_at_column_is_refused() {
    assert_config_error(
        &["config"],
        &[("OUTBOX_RELAY_OUTBOX__COLUMNS__PUBLISHED_AT", "")],
        "outbox.columns.published_at",
    );
}

#[test]
fn the_environment_overrides_the_file_which_overrides_the_defaults() {
    let (_dir, path) = write_file(
        "relay.toml",
        "[kafka]\nbrokers = \"file-broker:9092\"\n[relay]\nbatch_size = 250\n[kafka.properties]\n\"linger.ms\" = 2\n",
    );
    let (code, stdout, stderr) = run_command(
        &["--config", &path, "config"],
        &[
            ("OUTBOX_RELAY_KAFKA__BROKERS", "env-broker:9092"),
            ("OUTBOX_RELAY_KAFKA__PROPERTIES__COMPRESSION_TYPE", "lz4"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let printed: toml::Value = toml::from_str(&stdout).expect("config prints TOML");
    assert_eq!(printed["kafka"]["brokers"].as_str(), Some("env-broker:9092"), "env wins over the file");
    assert_eq!(printed["relay"]["batch_size"].as_integer(), Some(250), "the file wins over defaults");
    assert_eq!(printed["relay"]["poll_interval"].as_str(), Some("200ms"), "defaults fill the rest");
    let properties = &printed["kafka"]["properties"];
    assert_eq!(properties["linger.ms"].as_str(), Some("2"));
    assert_eq!(properties["compression.type"].as_str(), Some("lz4"), "env names map _ to .");
}

#[test]
fn config_output_redacts_passwords_and_sasl_secrets() {
    let (_dir, path) = write_file(
        "relay.toml",
        "[kafka.properties]\n\"sasl.mechanism\" = \"PLAIN\"\n\"sasl.username\" = \"relay\"\n\"sasl.password\" = \"kafka-pw-123\"\n",
    );
    let (code, stdout, stderr) = run_command(
        &["--config", &path, "config"],
        &[("OUTBOX_RELAY_DATABASE__URL", "postgres://relay:db-pw-789@db.internal:5432/app?password=query-pw-000")],
    );
    assert_eq!(code, 0, "{stderr}");
    for secret in ["kafka-pw-123", "db-pw-789", "query-pw-000"] {
        assert!(!stdout.contains(secret), "{secret} leaked into:\n{stdout}");
    }
    assert!(stdout.contains("postgres://relay:********@db.internal:5432/app"), "{stdout}");
    assert!(stdout.contains("\"sasl.username\" = \"relay\""), "non-secrets stay readable: {stdout}");

    let (code, stdout, _) =
        run_command(&["config"], &[("OUTBOX_RELAY_DATABASE__URL", "host=db user=relay password='a b c' dbname=app")]);
    assert_eq!(code, 0);
    assert!(!stdout.contains("a b c") && stdout.contains("password=********"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_against_a_table_missing_a_mapped_column_exits_2_naming_the_column() {
    let env = TestEnv::start().await;
    env.client()
        .await
        .batch_execute("CREATE TABLE events (id bigint PRIMARY KEY, event_id uuid, topic text, payload jsonb)")
        .await
        .unwrap();
    let mut config = env.config();
    config.outbox.table = "events".into();
    let path = write_config(&env, &config);
    let (code, _, stderr) = run_command(&["--config", path.to_str().unwrap(), "run"], &[("RUST_LOG", "off")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("outbox.columns.key") && stderr.contains("no column \"key\""), "{stderr}");
    assert!(stderr.contains("or set outbox.columns.key = \"\" if the table has none"), "how to do without: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_against_a_missing_table_exits_2_and_suggests_migrate() {
    let env = TestEnv::start().await;
    let path = write_config(&env, &env.config());
    let (code, _, stderr) = run_command(&["--config", path.to_str().unwrap(), "run"], &[("RUST_LOG", "off")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("outbox.table") && stderr.contains("outbox-relay migrate"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_error_is_said_once_as_a_line_or_as_a_json_log_line() {
    let env = TestEnv::start().await;
    let mut config = env.config();
    let path = write_config(&env, &config);
    let (code, _, stderr) = run_command(&["--config", path.to_str().unwrap(), "run"], &[("RUST_LOG", "info")]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.matches("does not exist").count(), 1, "once: {stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("outbox-relay: outbox.table")), "{stderr}");

    config.log.format = outbox_relay::config::LogFormat::Json;
    let path = write_config(&env, &config);
    let (code, _, stderr) = run_command(&["--config", path.to_str().unwrap(), "run"], &[("RUST_LOG", "info")]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.matches("does not exist").count(), 1, "once: {stderr}");
    assert!(stderr.lines().all(|l| l.starts_with('{')), "every stderr line is a JSON log line: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_or_role_that_does_not_exist_fails_the_start_with_exit_2() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let mut config = env.config();
    for (what, url) in [
        ("database", env.database_url.replace("/db_", "/no_such_db_")),
        ("role", login_as(&env.database_url, "no_such_role", "x")),
    ] {
        config.database.url = url;
        let path = write_config(&env, &config);
        let started = std::time::Instant::now();
        let (code, _, stderr) = run_command(&["--config", path.to_str().unwrap(), "run"], &[("RUST_LOG", "off")]);
        assert_eq!(code, 2, "{what}: {stderr}");
        assert!(stderr.contains("does not exist") && stderr.contains("check database.url"), "{what}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{what}: one line: {stderr}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "{what}: no retrying");
    }
}

/// `metrics.listen` takes a host name as well as an address: `localhost:PORT` is resolved when
/// the configuration loads (it used to be refused as "not an address"), and the relay serves
/// its probes there. A name that does not resolve is a configuration error naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_takes_a_host_name_and_refuses_one_that_does_not_resolve() {
    let (code, stdout, stderr) = run_command(&["config"], &[("OUTBOX_RELAY_METRICS__LISTEN", "localhost:9187")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("listen = \"127.0.0.1:9187\""), "resolved, IPv4 first: {stdout}");

    let err = assert_config_error(
        &["config"],
        &[("OUTBOX_RELAY_METRICS__LISTEN", "no-such-host.invalid:9187")],
        "metrics.listen",
    );
    assert!(err.contains("cannot resolve host \"no-such-host.invalid\""), "{err}");
    let err = assert_config_error(&["config"], &[("OUTBOX_RELAY_METRICS__LISTEN", "localhost")], "metrics.listen");
    assert!(err.contains("no port"), "{err}");
    let err = assert_config_error(&["config"], &[("OUTBOX_RELAY_METRICS__LISTEN", "localhost:http")], "metrics.listen");
    assert!(err.contains("invalid port \"http\""), "{err}");

    let env = TestEnv::start().await;
    env.migrate().await;
    let port = free_port();
    let config = env.config();
    let path = write_config(&env, &config);
    let listen = format!("localhost:{port}");
    let relay = spawn_relay_process_from(&path, &[("OUTBOX_RELAY_METRICS__LISTEN", listen.as_str())], &env.path(""));
    let addr = format!("127.0.0.1:{port}");
    wait_until(PATIENCE, "the probes to answer on localhost", || async {
        let (status, _) = http_get(&addr, "/healthz").await;
        status == 200
    })
    .await;
    drop(relay);
}
