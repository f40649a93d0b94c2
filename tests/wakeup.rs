//! Latency: the outbox trigger's NOTIFY wakes an idle relay at commit, and a full batch is
//! followed by the next claim at once; the poll interval is only the fallback.

mod support;

use std::time::Duration;

use support::*;

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
    wait_until(PATIENCE, "the relay to listen", || async {
        let listening: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = 'LISTEN outbox_relay'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        listening == 1
    })
    .await;

    // The relay is idle now, for an hour unless the commit wakes it.
    insert_events(&db, &events(250..251)).await;
    wait_until(PATIENCE, "the new row to be published on the commit's notification", || async {
        unpublished_count(&db).await == 0
    })
    .await;
    assert_eq!(relay.metrics.published.with_label_values(&[&topic]).get(), 251);
    relay.stop().await.expect("a SIGTERM-equivalent stop interrupts the idle wait");
}
