//! `/metrics` serves the relay's metrics in Prometheus text format, and they move with what
//! the relay does.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_serves_every_relay_metric_and_they_follow_the_work() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let missing = unique_name("missing");
    let db = env.client().await;
    // Backdated rows make the oldest-pending age visible before the relay starts.
    db.execute(
        "INSERT INTO outbox (topic, key, payload, created_at) \
         SELECT $1, 'k' || n, '{}', now() - interval '90 seconds' FROM generate_series(1, 5) n",
        &[&topic],
    )
    .await
    .unwrap();
    insert_events(&db, &[NewEvent::keyed(&missing, "x", 1)]).await;

    let addr = format!("127.0.0.1:{}", free_port());
    let mut config = env.config();
    config.metrics.listen = addr.clone();
    config.kafka.properties.insert("topic.metadata.propagation.max.ms".into(), "200".into());
    let relay = env.spawn_relay(config);

    consume(&env.brokers, &topic, 5).await;
    let series = format!("outbox_relay_published_total{{topic=\"{topic}\"}}");
    wait_until(PATIENCE, "published and error counters to move", || {
        let (addr, series) = (addr.clone(), series.clone());
        async move {
            let text = scrape(&addr).await;
            sample(&text, &series) == Some(5.0)
                && sample(&text, "outbox_relay_publish_errors_total{reason=\"unknown_topic\"}").unwrap_or(0.0) >= 1.0
                && sample(&text, "outbox_relay_pending_rows") == Some(1.0)
        }
    })
    .await;
    let text = scrape(&addr).await;

    for name in [
        "# TYPE outbox_relay_published_total counter",
        "# TYPE outbox_relay_publish_errors_total counter",
        "# TYPE outbox_relay_batch_duration_seconds histogram",
        "# TYPE outbox_relay_pending_rows gauge",
        "# TYPE outbox_relay_oldest_pending_age_seconds gauge",
    ] {
        assert!(text.contains(name), "missing {name}:\n{text}");
    }
    assert!(sample(&text, "outbox_relay_batch_duration_seconds_count").unwrap_or(0.0) >= 1.0, "{text}");
    let age = sample(&text, "outbox_relay_oldest_pending_age_seconds").unwrap();
    assert!(age > 0.0 && age < 90.0, "the only pending row is the fresh failing one: {age}");

    db.execute("UPDATE outbox SET published_at = now() WHERE topic = $1", &[&missing]).await.unwrap();
    wait_until(PATIENCE, "pending gauges to drop to zero", || {
        let addr = addr.clone();
        async move {
            let text = scrape(&addr).await;
            sample(&text, "outbox_relay_pending_rows") == Some(0.0)
                && sample(&text, "outbox_relay_oldest_pending_age_seconds") == Some(0.0)
        }
    })
    .await;
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_pending_age_reports_a_backlog_the_relay_cannot_drain() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let db = env.client().await;
    db.execute(
        "INSERT INTO outbox (topic, payload, created_at) VALUES ($1, '{}', now() - interval '1 hour')",
        &[&unique_name("missing")],
    )
    .await
    .unwrap();
    let relay = env.spawn_relay(env.config());
    wait_until(PATIENCE, "the age gauge", || async { relay.metrics.oldest_pending_age.get() >= 3600.0 }).await;
    assert_eq!(relay.metrics.pending_rows.get(), 1);
    relay.stop().await.expect("clean stop");
}
