//! Latency: an idle relay notices a commit within `relay.commit_watch_interval` (no trigger,
//! no NOTIFY in the writer's transaction), tables that keep the NOTIFY trigger wake it too, and
//! a full batch is followed by the next claim at once; the poll interval is only the fallback.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_wakes_an_idle_relay_and_full_batches_claim_again_at_once() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    let mut config = env.config();
    // With an hour between polls, only a wake-up or a full batch can make the relay claim.
    config.relay.poll_interval = Duration::from_secs(3600);
    config.relay.batch_size = 100;
    let events = |range: std::ops::Range<usize>| -> Vec<NewEvent> {
        range.map(|n| NewEvent::keyed(&topic, &format!("k{}", n % 5), n)).collect()
    };
    insert_events(&db, &events(0..250)).await;

    let relay = env.spawn_relay(config);
    wait_until(PATIENCE, "the backlog to drain through full batches", || async { unpublished_count(&db).await == 0 })
        .await;
    wait_until(PATIENCE, "the relay to watch for commits", || async { watching(&db).await == 1 }).await;

    // The relay is idle now, for an hour unless the commit wakes it.
    insert_events(&db, &events(250..251)).await;
    wait_until(PATIENCE, "the new row to be published when its commit is seen", || async {
        unpublished_count(&db).await == 0
    })
    .await;
    assert_eq!(relay.metrics.published.with_label_values(&[&topic]).get(), 251);
    relay.stop().await.expect("a SIGTERM-equivalent stop interrupts the idle wait");
}

/// Sessions of this database whose last statement was the commit watch's.
async fn watching(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'SELECT pg_%snapshot%'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Relays an idle table's next row with polls an hour apart and returns once it is out: only a
/// wake-up can make that happen within the test's patience.
async fn an_idle_relay_wakes_for_one_row(env: &TestEnv, config: outbox_relay::Config) {
    a_relay_woken_for_one_row(env, config).await.stop().await.unwrap();
}

/// As [`an_idle_relay_wakes_for_one_row`], returning the relay still running.
async fn a_relay_woken_for_one_row(env: &TestEnv, config: outbox_relay::Config) -> RunningRelay {
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    let relay = env.spawn_relay(config);
    wait_until(PATIENCE, "the relay's first claim", || async { relay.metrics.shards_owned.get() > 0 }).await;
    insert_events(&db, &[NewEvent::keyed(&topic, "k", 0)]).await;
    wait_until(PATIENCE, "the row to be published on a wake-up", || async { unpublished_count(&db).await == 0 }).await;
    relay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_xact_id_column_any_commit_wakes_the_relay() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let mut config = env.config();
    config.relay.poll_interval = Duration::from_secs(3600);
    config.relay.listen = false;
    config.outbox.columns.xact_id = None;
    an_idle_relay_wakes_for_one_row(&env, config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_keeps_the_notify_trigger_wakes_the_relay_by_notify() {
    let env = TestEnv::start().await;
    env.migrate().await;
    env.client()
        .await
        .batch_execute(
            "CREATE TRIGGER outbox_relay_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION outbox_relay_notify()",
        )
        .await
        .unwrap();
    let mut config = env.config();
    config.relay.poll_interval = Duration::from_secs(3600);
    config.relay.commit_watch_interval = Duration::ZERO;
    an_idle_relay_wakes_for_one_row(&env, config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_commits_stop_the_commit_watch_costs_an_idle_table_one_look_per_interval_again() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let mut config = env.config();
    config.relay.poll_interval = Duration::from_secs(3600);
    config.relay.commit_watch_interval = Duration::from_millis(20);
    let relay = a_relay_woken_for_one_row(&env, config).await;

    // A second after the last commit the watch is back at its interval: about 50 looks in a
    // second at 20 ms, where the pace it keeps while commits come (5 ms) would be 200.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let looks = watch_looks_within(&env.client().await, Duration::from_secs(1)).await;
    assert!(looks < 100, "{looks} looks in 1 s at an idle table: the commit watch did not slow down");
    relay.stop().await.unwrap();
}

/// How many statements the commit watch started within `window`, told apart by their start
/// times in `pg_stat_activity` (sampled more often than the watch looks).
async fn watch_looks_within(db: &tokio_postgres::Client, window: Duration) -> usize {
    let mut starts = std::collections::HashSet::new();
    let end = std::time::Instant::now() + window;
    while std::time::Instant::now() < end {
        let rows = db
            .query(
                "SELECT query_start::text FROM pg_stat_activity WHERE datname = current_database() \
                 AND query LIKE 'SELECT pg_%snapshot%'",
                &[],
            )
            .await
            .unwrap();
        starts.extend(rows.iter().map(|row| row.get::<_, Option<String>>(0)));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    starts.len()
}
