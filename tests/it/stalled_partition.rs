//! One partition the broker cannot write (here a deleted topic, which librdkafka waits out for
//! `topic.metadata.propagation.max.ms` before it fails the records) holds back only the rows
//! routed to it: the batch sets its records aside in flight after
//! `relay.stalled_partition_after`, the other rows flow, and the operator is told which topic
//! and partition wait.

use std::time::Duration;

use crate::support::*;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use tokio_postgres::Client;

async fn published(db: &Client, topic: &str) -> i64 {
    db.query_one("SELECT count(*) FROM outbox WHERE topic = $1 AND published_at IS NOT NULL", &[&topic])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_topic_holds_back_only_its_own_rows_and_is_named() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let healthy = env.create_topic(2).await;
    let doomed = env.create_topic(1).await;
    let db = env.client().await;
    let mut config = env.config();
    config.relay.stalled_partition_after = Duration::from_secs(1);
    config.relay.shutdown_timeout = Duration::from_secs(2);
    let metrics = format!("127.0.0.1:{}", free_port());
    config.metrics.listen = metrics.clone();
    let relay = env.spawn_relay(config.clone());

    // Both topics known to the relay (its topic check remembers them for a minute).
    insert_events(&db, &[NewEvent::keyed(&healthy, "h-0", 0), NewEvent::keyed(&doomed, "d-0", 0)]).await;
    wait_until(PATIENCE, "both topics in use", || async { unpublished_count(&db).await == 0 }).await;

    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &env.brokers).create().expect("admin client");
    for result in admin.delete_topics(&[&doomed], &AdminOptions::new()).await.expect("delete topic") {
        result.unwrap_or_else(|(topic, e)| panic!("delete {topic}: {e}"));
    }
    // Rows of both topics interleaved, in the same batches.
    let events: Vec<NewEvent> = (1..=200)
        .map(|n| match n % 2 {
            0 => NewEvent::keyed(&healthy, &format!("h-{}", n % 10), n),
            _ => NewEvent::keyed(&doomed, &format!("d-{}", n % 5), n),
        })
        .collect();
    insert_events(&db, &events).await;

    wait_until(PATIENCE, "every row of the healthy topic published", || async {
        published(&db, &healthy).await == 101
    })
    .await;
    let charged: i64 =
        db.query_one("SELECT count(*) FROM outbox WHERE topic = $1 AND attempts > 0", &[&doomed]).await.unwrap().get(0);
    assert_eq!(charged, 0, "the healthy rows did not wait for the deleted topic's records to fail");
    assert_eq!(published(&db, &doomed).await, 1, "nothing of the deleted topic published since");

    // The relay reports what it set aside at its next turn.
    wait_until(PATIENCE, "the metric and /readyz to name the waiting topic", || async {
        let scraped = scrape(&metrics).await;
        let named = scraped
            .lines()
            .any(|l| l.starts_with("outbox_relay_stalled_records{") && l.contains(&doomed) && !l.ends_with(" 0"));
        let (status, body) = http_get(&metrics, "/readyz").await;
        named && status == 503 && body.contains(&format!("topic {doomed} partition"))
    })
    .await;
    // `status`, run with the relay's configuration, asks the relay at metrics.listen.
    let path = write_config(&env, &config);
    let (code, stdout, stderr) = run_command(&["--config", path.to_str().unwrap(), "status"], &[("RUST_LOG", "off")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("NOT READY") && stdout.contains(&format!("topic {doomed} partition")), "{stdout}");
    let _ = relay.stop().await;
}
