//! Outages of about twenty seconds in the middle of a drain: the relay backs off, resumes by
//! itself when the server is back, loses nothing, and marks nothing the broker did not
//! acknowledge.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::support::*;

/// How long each outage lasts: long enough for several failed attempts and backoff rounds.
const OUTAGE: Duration = Duration::from_secs(20);

fn event_ids(records: &[Received]) -> HashSet<String> {
    records.iter().map(|r| r.event_id()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_for_twenty_seconds_mid_drain_loses_nothing_and_marks_nothing_unacknowledged() {
    let mut env = TestEnv::start_with_own_broker().await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    insert_backlog(&env.client().await, &topic, 0..30_000, 30).await;
    let db = env.client().await;
    let mut config = env.config();
    config.relay.batch_size = 500;
    let mut relay = spawn_relay_process(&env, &config);
    wait_until(PATIENCE, "draining to start", || async { !marked_event_ids(&db).await.is_empty() }).await;

    // Freeze the relay to see exactly what the first broker holds when it goes away.
    relay.signal(libc::SIGSTOP);
    let on_first_broker = event_ids(&read_topic(&env.brokers, &topic).await);
    assert!(marked_event_ids(&db).await.is_subset(&on_first_broker), "every marked row was acknowledged");
    env.broker.as_mut().expect("own broker").stop(1);
    let outage_started = Instant::now();
    relay.signal(libc::SIGCONT);

    wait_until(PATIENCE, "the relay to notice", || async {
        relay.log().contains("has not acknowledged this batch yet")
    })
    .await;
    // The outage itself: librdkafka keeps retrying the batch for its whole length.
    tokio::time::sleep(OUTAGE.saturating_sub(outage_started.elapsed())).await;
    assert!(relay.is_running(), "the relay survives the outage");
    let marked_during_outage = marked_event_ids(&db).await;
    assert!(
        marked_during_outage.is_subset(&on_first_broker),
        "nothing was marked that the first broker had not acknowledged"
    );

    // The broker returns on the same port with its data and its producer state.
    env.broker.as_mut().expect("own broker").restart(1);
    wait_until(PATIENCE, "the relay to resume and drain", || async { unpublished_count(&db).await == 0 }).await;
    let records = read_topic(&env.brokers, &topic).await;
    let on_topic = event_ids(&records);
    assert!(on_first_broker.is_subset(&on_topic), "the broker kept what it had");
    assert_eq!(on_topic, all_event_ids(&db).await, "nothing lost, nothing marked that is not on the topic");
    // The records in flight when the broker went down were sent again with their sequence
    // numbers, and the broker dropped the copies it already had.
    assert_eq!(records.len(), on_topic.len(), "no row reached the topic twice");
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "log:\n{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_down_for_twenty_seconds_mid_drain_loses_nothing() {
    let mut env = TestEnv::start().await;
    if env.postgres.is_none() {
        eprintln!("skipped: PostgreSQL is external (OUTBOX_TEST_DATABASE_URL), the test cannot stop it");
        return;
    }
    env.migrate().await;
    let topic = env.create_topic(3).await;
    insert_backlog(&env.client().await, &topic, 0..30_000, 30).await;
    let db = env.client().await;
    let mut config = env.config();
    config.relay.batch_size = 500;
    let mut relay = spawn_relay_process(&env, &config);
    wait_until(PATIENCE, "draining to start", || async { !marked_event_ids(&db).await.is_empty() }).await;

    env.postgres.as_mut().expect("postgres").stop();
    let outage_started = Instant::now();
    wait_until(PATIENCE, "the relay to notice", || async {
        let log = relay.log();
        log.contains("database unavailable") || log.contains("could not mark")
    })
    .await;
    tokio::time::sleep(OUTAGE.saturating_sub(outage_started.elapsed())).await;
    assert!(relay.is_running(), "the relay survives the outage");

    env.postgres.as_mut().expect("postgres").restart();
    let db = env.client().await;
    wait_until(PATIENCE, "the relay to resume and drain", || async { unpublished_count(&db).await == 0 }).await;
    let records = read_topic(&env.brokers, &topic).await;
    let on_topic = event_ids(&records);
    assert_eq!(on_topic, all_event_ids(&db).await, "nothing lost, nothing marked that is not on the topic");
    identical_duplicates(&records);
    assert!(records.len() - on_topic.len() <= 500, "at most the batch in flight is repeated");
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "log:\n{}", relay.log());
}
