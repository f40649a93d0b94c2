//! Operating the relay: probes that notice a stalled pipeline, retention that never touches a
//! pending row, logs without payloads unless asked, JSON logs with a span per batch, trace
//! context carried to the record, and metrics that move when their cause happens.

use std::time::Duration;

use crate::support::*;

fn with_endpoint(env: &TestEnv) -> (outbox_relay::Config, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut config = env.config();
    config.metrics.listen = addr.clone();
    (config, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_broker_is_down_with_rows_pending_and_recovers_without_a_restart() {
    let mut env = TestEnv::start_with_own_broker().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    let (mut config, addr) = with_endpoint(&env);
    config.health.readiness_window = Duration::from_secs(2);
    let relay = env.spawn_relay(config);
    insert_events(&db, &[NewEvent::keyed(&topic, "a", 1)]).await;
    wait_until(PATIENCE, "ready, with the first row published", || async {
        http_get(&addr, "/readyz").await.0 == 200 && unpublished_count(&db).await == 0
    })
    .await;
    assert_eq!(http_get(&addr, "/healthz").await.0, 200);

    env.broker.as_mut().expect("own broker").stop(1);
    insert_events(&db, &[NewEvent::keyed(&topic, "a", 2)]).await;
    wait_until(PATIENCE, "/readyz to fail", || async { http_get(&addr, "/readyz").await.0 == 503 }).await;
    let (_, reasons) = http_get(&addr, "/readyz").await;
    assert!(reasons.contains("broker") || reasons.contains("none acknowledged"), "{reasons}");
    assert_eq!(http_get(&addr, "/healthz").await.0, 200, "an outage waited out is not a dead relay");

    env.broker.as_mut().expect("own broker").restart(1);
    wait_until(PATIENCE, "/readyz to pass again once the row is out", || async {
        http_get(&addr, "/readyz").await.0 == 200 && unpublished_count(&db).await == 0
    })
    .await;
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_when_a_step_is_stuck_past_the_liveness_timeout() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let (mut config, addr) = with_endpoint(&env);
    config.health.liveness_timeout = Duration::from_secs(1);
    // The loop blocks for 5 s in its first batch, after the claim and before the produce.
    let relay = spawn_relay_process_with_env(&env, &config, &[("FAILPOINTS", "relay-before-produce=1*sleep(5000)")]);
    wait_until(PATIENCE, "alive", || async { http_get(&addr, "/healthz").await.0 == 200 }).await;
    insert_events(&env.client().await, &[NewEvent::keyed(&topic, "a", 1)]).await;
    wait_until(PATIENCE, "/healthz to fail", || async { http_get(&addr, "/healthz").await.0 == 503 }).await;
    let (_, reasons) = http_get(&addr, "/healthz").await;
    assert!(reasons.contains("in one step"), "{reasons}");
    wait_until(PATIENCE, "/healthz to pass once the batch completes", || async {
        http_get(&addr, "/healthz").await.0 == 200
    })
    .await;
    consume(&env.brokers, &topic, 1).await;
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_broker_fails_readiness_and_never_liveness() {
    let env = TestEnv::start_with_own_broker().await;
    let broker = env.broker.as_ref().expect("own broker");
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let (mut config, addr) = with_endpoint(&env);
    config.health.liveness_timeout = Duration::from_secs(1);
    config.health.readiness_window = Duration::from_secs(1);
    let relay = env.spawn_relay(config);
    wait_until(PATIENCE, "ready", || async { http_get(&addr, "/readyz").await.0 == 200 }).await;
    // A hung broker: the batch waits for delivery reports that do not come.
    broker.freeze(1);
    insert_events(&env.client().await, &[NewEvent::keyed(&topic, "a", 1)]).await;
    wait_until(PATIENCE, "the stuck record in librdkafka's queue metric", || async {
        relay.metrics.kafka_queue_messages.get() >= 1
    })
    .await;
    wait_until(PATIENCE, "/readyz to fail", || async { http_get(&addr, "/readyz").await.0 == 503 }).await;
    let (_, reasons) = http_get(&addr, "/readyz").await;
    assert!(reasons.contains("none acknowledged") || reasons.contains("broker"), "{reasons}");
    assert_eq!(http_get(&addr, "/healthz").await.0, 200, "restarting the relay would not end a broker outage");
    broker.thaw(1);
    wait_until(PATIENCE, "/readyz to pass once the batch completes", || async {
        http_get(&addr, "/readyz").await.0 == 200 && unpublished_count(&env.client().await).await == 0
    })
    .await;
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_published_rows_in_batches_and_never_a_pending_or_failed_one() {
    let env = TestEnv::start().await;
    env.migrate().await;
    env.allow_relay_to_delete();
    let db = env.client().await;
    db.batch_execute(
        "INSERT INTO outbox (topic, key, payload, created_at, published_at) \
           SELECT 't', 'old', '{}', now() - interval '3 days', now() - interval '2 days' FROM generate_series(1, 7); \
         INSERT INTO outbox (topic, key, payload, published_at) SELECT 't', 'recent', '{}', now() FROM generate_series(1, 3); \
         INSERT INTO outbox (topic, key, payload, created_at, attempts, last_error, failed_at) \
           VALUES ('t', 'failed', '{}', now() - interval '9 days', 3, 'boom', now() - interval '8 days'); \
         INSERT INTO outbox (topic, key, payload, created_at) VALUES ('missing-topic', 'pending', '{}', now() - interval '9 days')",
    )
    .await
    .unwrap();
    let mut config = env.config();
    config.relay.shards = 1;
    config.retention.delete_published_after = Some(Duration::from_secs(86_400));
    config.retention.batch_size = 2;
    config.retention.interval = Duration::from_millis(100);
    config.relay.max_attempts = 1000;
    let relay = env.spawn_relay(config);
    wait_until(PATIENCE, "old published rows to be deleted", || async {
        let old: i64 = db.query_one("SELECT count(*) FROM outbox WHERE key = 'old'", &[]).await.unwrap().get(0);
        old == 0
    })
    .await;
    let left: Vec<String> =
        db.query("SELECT key FROM outbox ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(left, ["recent", "recent", "recent", "failed", "pending"]);
    assert_eq!(relay.metrics.retention_deleted.get(), 7, "deleted in batches of 2");
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_are_logged_only_when_asked_and_json_logs_carry_the_batch_span() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    let mut event = NewEvent::keyed(&topic, "a", 1);
    event.payload = Some(r#"{"card": "4111-1111-1111-1111"}"#.into());
    insert_events(&db, &[event.clone()]).await;

    let mut config = env.config();
    config.log.format = outbox_relay::config::LogFormat::Json;
    let mut relay = spawn_relay_process_with_env(&env, &config, &[("RUST_LOG", "debug")]);
    wait_until(PATIENCE, "the row published", || async { unpublished_count(&db).await == 0 }).await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0));
    let log = relay.log();
    assert!(!log.contains("4111-1111"), "no payload in the log, even at debug level:\n{log}");
    let settled = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["fields"]["message"] == "batch settled")
        .unwrap_or_else(|| panic!("a JSON 'batch settled' line:\n{log}"));
    assert_eq!(settled["span"]["name"], "batch", "{settled}");
    assert_eq!(settled["span"]["rows"], 1, "{settled}");

    insert_events(&db, &[event]).await;
    config.log.payloads = true;
    let mut relay = spawn_relay_process_with_env(&env, &config, &[("RUST_LOG", "outbox_relay=debug")]);
    wait_until(PATIENCE, "the second row published", || async { unpublished_count(&db).await == 0 }).await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0));
    assert!(relay.log().contains("4111-1111"), "log.payloads = true logs them:\n{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_column_reaches_the_record_as_a_header() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    // A column added to the table is the relay role's to read only once the owner says so.
    db.batch_execute(&format!(
        "ALTER TABLE outbox ADD COLUMN trace text; GRANT SELECT (trace) ON outbox TO {}",
        env.relay_role
    ))
    .await
    .unwrap();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    db.execute("INSERT INTO outbox (topic, key, payload, trace) VALUES ($1, 'k', '{}', $2)", &[&topic, &traceparent])
        .await
        .unwrap();
    let mut config = env.config();
    config.outbox.columns.traceparent = Some("trace".into());
    let relay = env.spawn_relay(config);
    let records = consume(&env.brokers, &topic, 1).await;
    assert_eq!(records[0].header("traceparent").as_deref(), Some(traceparent));
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_metrics_move_with_the_work() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    let (mut config, addr) = with_endpoint(&env);
    config.relay.batch_size = 10;
    let relay = env.spawn_relay(config);
    insert_events(&db, &(0..25).map(|n| NewEvent::keyed(&topic, "k", n)).collect::<Vec<_>>()).await;
    wait_until(PATIENCE, "rows published and librdkafka statistics in", || async {
        let text = scrape(&addr).await;
        unpublished_count(&db).await == 0
            && sample(&text, "outbox_relay_kafka_brokers_up") == Some(1.0)
            && text.contains("outbox_relay_kafka_broker_rtt_seconds{broker=")
    })
    .await;
    let text = scrape(&addr).await;
    assert_eq!(sample(&text, "outbox_relay_batch_size_count"), Some(3.0), "batches of 10, 10 and 5:\n{text}");
    assert_eq!(sample(&text, "outbox_relay_batch_size_sum"), Some(25.0));
    assert_eq!(sample(&text, "outbox_relay_delivery_latency_seconds_count"), Some(25.0), "one per acknowledged row");
    assert_eq!(sample(&text, "outbox_relay_shards_owned"), Some(16.0));
    assert_eq!(
        sample(&text, &format!("outbox_relay_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))),
        Some(1.0)
    );
    for name in [
        "outbox_relay_producer_restarts_total",
        "outbox_relay_retention_deleted_total",
        "outbox_relay_kafka_queue_messages",
        "outbox_relay_retries_total",
        "outbox_relay_failed_rows",
        "outbox_relay_held_rows",
        "outbox_relay_watermark_holdback_seconds",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} is exported:\n{text}");
    }
    relay.stop().await.expect("clean stop");
}

/// A stand-in OTLP/HTTP collector: answers every request 200 and keeps the bodies.
async fn fake_collector() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = bodies.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                loop {
                    let mut chunk = [0u8; 8192];
                    let n = match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buffer.extend_from_slice(&chunk[..n]);
                    // One request at a time: headers, then Content-Length bytes of body.
                    while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if buffer.len() < end + 4 + length {
                            break;
                        }
                        kept.lock().unwrap().push(buffer[end + 4..end + 4 + length].to_vec());
                        buffer.drain(..end + 4 + length);
                        let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
                    }
                }
            });
        }
    });
    (addr, bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_batch_spans_are_exported_over_otlp() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    let (collector, bodies) = fake_collector().await;
    let mut config = env.config();
    config.telemetry.otlp_endpoint = Some(format!("http://{collector}"));
    let mut relay = spawn_relay_process(&env, &config);
    insert_events(&db, &[NewEvent::keyed(&topic, "k", 1)]).await;
    wait_until(PATIENCE, "the row published", || async { unpublished_count(&db).await == 0 }).await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "{}", relay.log());
    let contains =
        |bodies: &[Vec<u8>], needle: &[u8]| bodies.iter().any(|b| b.windows(needle.len()).any(|w| w == needle));
    wait_until(PATIENCE, "a batch span at the collector", || {
        let bodies = bodies.lock().unwrap().clone();
        async move { contains(&bodies, b"batch") && contains(&bodies, b"outbox-relay") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_relay_logs_a_periodic_summary_at_info_level() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let db = env.client().await;
    let mut config = env.config();
    config.log.summary_interval = std::time::Duration::from_millis(300);
    let mut relay = spawn_relay_process_with_env(&env, &config, &[("RUST_LOG", "info")]);
    insert_backlog(&db, &topic, 0..2_000, 10).await;
    wait_until(PATIENCE, "the backlog to drain", || async { unpublished_count(&db).await == 0 }).await;
    relay.wait_for_log("summary").await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0));
    let log = relay.log();
    let line =
        log.lines().find(|l| l.contains("summary") && l.contains("published=")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("pending=") && line.contains("failed="), "{line}");
}

/// The container healthcheck is what platforms restart on, so it asks `/healthz`: `/readyz`
/// fails for a poison row or a broker outage, which a restart does not cure (it would only
/// publish the batch in flight again).
#[test]
fn the_compose_files_container_healthcheck_asks_liveness_not_readiness() {
    let compose = include_str!("../../docker-compose.yml");
    let relay = &compose[compose.find("\n  relay:\n").expect("the relay service")..];
    let relay = &relay[..relay[1..].find("\n  writer:").expect("the service after it")];
    let healthcheck = &relay[relay.find("healthcheck:").expect("a healthcheck")..];
    let test = healthcheck.lines().find(|line| line.trim_start().starts_with("test:")).expect("its test");
    assert!(test.contains("GET /healthz"), "{test}");
    assert!(!test.contains("/readyz"), "{test}");
}
