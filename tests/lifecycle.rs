//! Stopping and surviving: SIGTERM finishes the batch in flight and exits 0; PostgreSQL or the
//! broker being down at start or mid-run is waited out without losing or falsely marking a row.

mod support;

use std::collections::HashSet;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_drain_finishes_the_batch_in_flight_marks_it_and_exits_zero() {
    const ROWS: usize = 40_000;
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    let db = env.client().await;
    insert_backlog(&db, &topic, 0..ROWS, 20).await;

    let mut relay = spawn_relay_process(&env, &env.config());
    wait_until(PATIENCE, "the first batches to be marked", || async { unpublished_count(&db).await < ROWS as i64 })
        .await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "SIGTERM exits 0; log:\n{}", relay.log());
    assert!(relay.log().contains("shutdown requested"), "log:\n{}", relay.log());

    let remaining = unpublished_count(&db).await;
    assert!(remaining > 0, "the relay stopped claiming before the backlog was drained");
    let on_topic: HashSet<String> = read_topic(&env.brokers, &topic).await.iter().map(|r| r.event_id()).collect();
    assert_eq!(
        on_topic,
        marked_event_ids(&db).await,
        "the batch in flight was finished: every published record's row is marked, and no marked row is missing"
    );

    let mut rerun = spawn_relay_process(&env, &env.config());
    wait_until(PATIENCE, "the rest of the backlog", || async { unpublished_count(&db).await == 0 }).await;
    rerun.signal(libc::SIGTERM);
    assert_eq!(rerun.wait().await, Some(0));
    let all = read_topic(&env.brokers, &topic).await;
    let distinct: HashSet<String> = all.iter().map(|r| r.event_id()).collect();
    assert_eq!(distinct.len(), ROWS, "nothing lost across the stop");
    assert_eq!(all.len(), ROWS, "and nothing sent twice, since the stop was clean");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_while_postgresql_is_down_waits_and_then_relays() {
    let mut env = TestEnv::start().await;
    let Some(_) = env.postgres.as_ref() else {
        eprintln!("skipped: PostgreSQL is external (OUTBOX_TEST_DATABASE_URL), the test cannot stop it");
        return;
    };
    env.migrate().await;
    let topic = env.create_topic(1).await;
    insert_events(&env.client().await, &[NewEvent::keyed(&topic, "a", 1), NewEvent::keyed(&topic, "b", 2)]).await;
    env.postgres.as_mut().unwrap().stop();

    let mut relay = spawn_relay_process(&env, &env.config());
    wait_until(PATIENCE, "the relay to report the database unavailable", || async {
        relay.log().contains("database unavailable; retrying")
    })
    .await;
    assert!(relay.is_running(), "an unreachable database does not end the relay");

    env.postgres.as_mut().unwrap().restart();
    let db = env.client().await;
    wait_until(PATIENCE, "rows marked after PostgreSQL came up", || async { unpublished_count(&db).await == 0 }).await;
    assert_eq!(consume(&env.brokers, &topic, 2).await.len(), 2);
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_before_the_broker_waits_and_then_relays() {
    let Some(mut env) = TestEnv::start_with_broker_later().await else {
        return;
    };
    env.migrate().await;
    let topic = unique_name("topic");
    let db = env.client().await;
    insert_events(&db, &[NewEvent::keyed(&topic, "a", 1), NewEvent::keyed(&topic, "b", 2)]).await;

    let mut config = env.config();
    config.kafka.properties.insert("message.timeout.ms".into(), "1000".into());
    let relay = env.spawn_relay(config);
    wait_until(PATIENCE, "a delivery to time out", || async {
        relay.metrics.publish_errors.with_label_values(&["message_timeout"]).get() > 0
    })
    .await;
    assert_eq!(unpublished_count(&db).await, 2, "nothing is marked while there is no broker");
    let row = db.query_one("SELECT max(attempts), count(last_error) FROM outbox", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(1), 2, "the failures are recorded");
    assert_eq!(row.get::<_, i32>(0), 0, "an outage does not count toward giving up on a row");
    assert!(relay.metrics.retries.with_label_values(&["outage"]).get() >= 2, "the rows stay queued for another try");
    assert!(!relay.is_finished(), "a missing broker does not end the relay");

    env.start_broker();
    create_topic(&env.brokers, &topic, 1).await;
    wait_until(PATIENCE, "rows marked once the broker is up", || async { unpublished_count(&db).await == 0 }).await;
    let records = read_topic(&env.brokers, &topic).await;
    let distinct: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    assert_eq!(distinct.len(), 2);
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_hangs_mid_run_is_ridden_out_without_loss_or_false_marks() {
    let env = TestEnv::start().await;
    let Some(broker) = env.broker.as_ref() else {
        eprintln!("skipped: the broker is external (OUTBOX_TEST_KAFKA_BROKERS), the test cannot freeze it");
        return;
    };
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let db = env.client().await;
    insert_backlog(&db, &topic, 0..20_000, 20).await;
    let mut config = env.config();
    config.relay.batch_size = 500;
    config.kafka.properties.insert("message.timeout.ms".into(), "2000".into());
    let relay = env.spawn_relay(config);
    let timeouts = || relay.metrics.publish_errors.with_label_values(&["message_timeout"]).get();
    wait_until(PATIENCE, "draining to start", || async {
        relay.metrics.published.with_label_values(&[&topic]).get() > 0
    })
    .await;

    broker.freeze();
    wait_until(PATIENCE, "a batch to time out", || async { timeouts() > 0 }).await;
    let marked_at_first_timeout = marked_event_ids(&db).await;
    let seen = timeouts();
    wait_until(PATIENCE, "another batch to time out", || async { timeouts() > seen }).await;
    assert_eq!(marked_event_ids(&db).await, marked_at_first_timeout, "nothing is marked while the broker hangs");

    broker.thaw();
    // tansu fences the producer's bumped epoch after the timeouts; the relay starts a new one.
    wait_until(PATIENCE, "a new producer session", || async { relay.metrics.producer_restarts.get() >= 1 }).await;
    wait_until(PATIENCE, "everything marked after the broker recovered", || async {
        unpublished_count(&db).await == 0
    })
    .await;
    assert!(!relay.is_finished());
    let on_topic: HashSet<String> = read_topic(&env.brokers, &topic).await.iter().map(|r| r.event_id()).collect();
    assert!(marked_at_first_timeout.is_subset(&on_topic), "no row was marked without reaching the broker");
    assert_eq!(on_topic, marked_event_ids(&db).await, "nothing lost");
    assert_eq!(on_topic.len(), 20_000);
    relay.stop().await.expect("clean stop");
}

/// A relay whose first batch can never be acknowledged (no broker at all), with `grace`.
async fn relay_with_a_stuck_batch(grace: std::time::Duration) -> Option<(TestEnv, RelayProcess)> {
    let env = TestEnv::start_with_broker_later().await?;
    env.migrate().await;
    insert_events(&env.client().await, &[NewEvent::keyed(&unique_name("topic"), "k", 1)]).await;
    let mut config = env.config();
    config.relay.shutdown_timeout = grace;
    let relay = spawn_relay_process(&env, &config);
    relay.wait_for_log("claimed a batch").await;
    Some((env, relay))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_grace_period_ends_the_relay_exits_and_leaves_the_batch_unpublished() {
    let Some((env, mut relay)) = relay_with_a_stuck_batch(std::time::Duration::from_secs(1)).await else {
        return;
    };
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "log:\n{}", relay.log());
    assert!(relay.log().contains("shutdown grace period over"), "log:\n{}", relay.log());
    assert_eq!(unpublished_count(&env.client().await).await, 1, "an unacknowledged row is never marked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_without_waiting_for_the_grace_period() {
    let Some((env, mut relay)) = relay_with_a_stuck_batch(std::time::Duration::from_secs(600)).await else {
        return;
    };
    relay.signal(libc::SIGTERM);
    wait_until(PATIENCE, "the first signal to be noticed", || async { relay.log().contains("shutdown requested") })
        .await;
    relay.signal(libc::SIGINT);
    assert_eq!(relay.wait().await, Some(130), "log:\n{}", relay.log());
    assert_eq!(unpublished_count(&env.client().await).await, 1);
}
