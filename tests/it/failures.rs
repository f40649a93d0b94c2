//! A row that cannot be delivered is never marked published: it records the attempt and the
//! error, stays pending, and does not stop the rows around it.

use crate::support::*;

/// A missing topic should surface in seconds, not after librdkafka's 30 s metadata wait.
fn fail_fast(env: &TestEnv) -> outbox_relay::Config {
    let mut config = env.config();
    config.kafka.properties.insert("topic.metadata.propagation.max.ms".into(), "500".into());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_leaves_the_row_unmarked_with_its_error_and_others_flow() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let missing_topic = unique_name("missing");
    let db = env.client().await;
    insert_events(
        &db,
        &[NewEvent::keyed(&topic, "a", 1), NewEvent::keyed(&missing_topic, "b", 2), NewEvent::keyed(&topic, "c", 3)],
    )
    .await;

    let relay = env.spawn_relay(fail_fast(&env));
    let received = consume(&env.brokers, &topic, 2).await;
    assert_eq!(received.len(), 2);
    wait_until(PATIENCE, "the failed attempt to be recorded", || async {
        let row = db.query_one("SELECT attempts FROM outbox WHERE topic = $1", &[&missing_topic]).await.unwrap();
        row.get::<_, i32>(0) >= 1
    })
    .await;

    let row = db
        .query_one("SELECT published_at IS NULL, attempts, last_error FROM outbox WHERE topic = $1", &[&missing_topic])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "a failed row is never marked published");
    let last_error: String = row.get(2);
    assert!(!last_error.is_empty());
    let others_marked: i64 = db
        .query_one("SELECT count(*) FROM outbox WHERE topic = $1 AND published_at IS NOT NULL", &[&topic])
        .await
        .unwrap()
        .get(0);
    assert_eq!(others_marked, 2);
    assert!(relay.metrics.publish_errors.with_label_values(&["unknown_topic"]).get() >= 1, "counted by reason");
    assert!(!relay.is_finished(), "a failing row does not stop the relay");
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_headers_that_are_not_strings_is_refused_with_a_clear_error() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    let mut bad = NewEvent::keyed(&topic, "k", 1);
    bad.headers = Some(r#"{"retries": 3}"#.into());
    insert_events(&db, &[bad, NewEvent::keyed(&topic, "k2", 2)]).await;

    let relay = env.spawn_relay(env.config());
    consume(&env.brokers, &topic, 1).await;
    wait_until(PATIENCE, "the refusal to be recorded", || async {
        let row = db.query_one("SELECT attempts FROM outbox WHERE key = 'k'", &[]).await.unwrap();
        row.get::<_, i32>(0) >= 1
    })
    .await;
    let row = db.query_one("SELECT published_at IS NULL, last_error FROM outbox WHERE key = 'k'", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0));
    let error: String = row.get(1);
    assert!(error.contains("\"retries\"") && error.contains("must be strings"), "{error}");
    relay.stop().await.expect("clean stop");
    assert_eq!(read_topic(&env.brokers, &topic).await.len(), 1, "the refused row was never half-published");
}
