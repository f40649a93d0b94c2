//! One relay publishes a table at a time: a second relay stands by, and takes over when the
//! first one goes away.

mod support;

use std::collections::HashSet;

use support::*;

async fn insert_rows(env: &TestEnv, topic: &str, from: usize, count: usize) {
    let events: Vec<NewEvent> =
        (from..from + count).map(|n| NewEvent::keyed(topic, &format!("k{}", n % 10), n)).collect();
    insert_events(&env.client().await, &events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_stands_by_and_takes_over_when_the_first_stops() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let db = env.client().await;

    let first = env.spawn_relay(env.config());
    insert_rows(&env, &topic, 0, 500).await;
    wait_until(PATIENCE, "the first relay to publish", || async { unpublished_count(&db).await == 0 }).await;

    let second = env.spawn_relay(env.config());
    // Each relay holds two sessions (the loop's and the stats query's); four means the second
    // relay is connected and has asked for the lock.
    wait_until(PATIENCE, "the second relay to connect", || async {
        let sessions: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outbox-relay' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        sessions >= 4
    })
    .await;
    insert_rows(&env, &topic, 500, 500).await;
    wait_until(PATIENCE, "rows written with both relays up", || async { unpublished_count(&db).await == 0 }).await;
    assert_eq!(first.metrics.published.with_label_values(&[&topic]).get(), 1000);
    assert_eq!(second.metrics.published.with_label_values(&[&topic]).get(), 0, "the standby publishes nothing");

    first.stop().await.expect("clean stop");
    insert_rows(&env, &topic, 1000, 500).await;
    wait_until(PATIENCE, "the standby to take over", || async { unpublished_count(&db).await == 0 }).await;
    assert_eq!(second.metrics.published.with_label_values(&[&topic]).get(), 500);
    second.stop().await.expect("clean stop");

    let records = read_topic(&env.brokers, &topic).await;
    let distinct: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    assert_eq!(records.len(), 1500, "no row was published by both relays");
    assert_eq!(distinct.len(), 1500);
}
