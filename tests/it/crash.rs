//! Crashing the relay loses nothing. A kill between the broker's acknowledgement and the mark
//! publishes the batch again on restart, and nothing else: the duplicates are whole, identical
//! copies of rows that were in flight at a crash.

use std::collections::HashSet;

use crate::support::*;

/// Runs `outbox-relay audit` on `topic` and returns its exit code and JSON report.
fn audit(env: &TestEnv, topic: &str) -> (i32, serde_json::Value) {
    let path = write_config(env, &env.config());
    let (code, stdout, stderr) =
        run_command(&["--config", path.to_str().unwrap(), "audit", "--topic", topic, "--json"], &[("RUST_LOG", "off")]);
    (code, serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}")))
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_publish_and_mark_republishes_exactly_that_batch() {
    const ROWS: usize = 5_000;
    const BATCH: usize = 500;
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    let db = env.client().await;
    let events: Vec<NewEvent> = (0..ROWS).map(|n| NewEvent::keyed(&topic, &format!("k{}", n % 7), n)).collect();
    insert_events(&db, &events).await;
    let mut config = env.config();
    config.relay.batch_size = BATCH;

    // Three batches go through; the fourth is acknowledged by the broker, then the process dies.
    let mut relay = spawn_relay_process_with_env(&env, &config, &[("FAILPOINTS", "relay-before-mark=3*off->return")]);
    assert_eq!(relay.wait().await, None, "the relay was killed by the fault; log:\n{}", relay.log());
    let in_flight = unmarked_event_ids(&db).await;
    assert_eq!(in_flight.len(), ROWS - 3 * BATCH, "only the three settled batches are marked");
    let before_restart = read_topic(&env.brokers, &topic).await;
    assert_eq!(before_restart.len(), 4 * BATCH, "the fourth batch reached the broker before the crash");

    drain_then_stop(&env, &config).await;
    let records = read_topic(&env.brokers, &topic).await;
    let distinct: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    assert_eq!(distinct, all_event_ids(&db).await, "nothing lost");
    let duplicated = identical_duplicates(&records);
    assert_eq!(duplicated.len(), BATCH, "exactly the crashed batch was published twice");
    assert!(duplicated.is_subset(&in_flight), "only rows in flight at the crash are duplicated");
    assert_eq!(records.len(), ROWS + BATCH);
    assert_first_copies_in_key_order(&records);

    let (code, report) = audit(&env, &topic);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["lost"]["count"], 0);
    assert_eq!(report["duplicated"]["count"], BATCH);
    assert_eq!(report["conflicting"]["count"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_kill_nines_during_a_fifty_thousand_row_drain_lose_nothing() {
    const ROWS: usize = 50_000;
    const KEYS: usize = 100;
    const CRASHES: usize = 12;
    const BATCH: usize = 1_000;
    const BACKLOG: usize = 40_000;
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    let db = env.client().await;
    let mut config = env.config();
    config.relay.batch_size = BATCH;

    // Most rows are a backlog, so that the kills find the relay busy; the application writes
    // the rest while the relay is being killed.
    insert_backlog(&db, &topic, 0..BACKLOG, KEYS).await;
    let writer = write_meanwhile(env.client().await, &topic, BACKLOG..ROWS, KEYS);

    let in_flight_at_a_crash = kill_the_relay_at_random_moments(&env, &config, &db, CRASHES).await;
    writer.await.expect("writer");
    drain_then_stop(&env, &config).await;

    let records = read_topic(&env.brokers, &topic).await;
    let distinct: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    let table = all_event_ids(&db).await;
    assert_eq!(table.len(), ROWS);
    assert_eq!(distinct, table, "every row reached the topic: nothing lost");
    assert_eq!(unpublished_count(&db).await, 0, "every row is marked");
    let duplicated = identical_duplicates(&records);
    assert!(duplicated.is_subset(&in_flight_at_a_crash), "duplicates are only rows unmarked at a crash");
    assert!(
        records.len() - ROWS <= CRASHES * 2 * BATCH,
        "at most two batches per crash, the one being marked and the one in flight: {} extra copies",
        records.len() - ROWS
    );
    assert_first_copies_in_key_order(&records);
    eprintln!(
        "{} crashes: {} records for {ROWS} rows, {} event ids duplicated",
        CRASHES,
        records.len(),
        duplicated.len()
    );

    let (code, report) = audit(&env, &topic);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["lost"]["count"], 0);
    assert_eq!(report["conflicting"]["count"], 0);
    assert_eq!(report["published"], ROWS);
}
