//! Commit-order safety: ids are assigned at insert, not at commit, so a lower id of a key can
//! become visible after higher ones. The relay never publishes a key's rows out of id order and
//! never skips the late row; rows written before the open transaction began keep flowing.

use crate::support::*;

fn event(topic: &str, key: &str, n: usize) -> NewEvent {
    NewEvent::keyed(topic, key, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_committing_lower_id_is_published_first_and_earlier_rows_flow_meanwhile() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let db = env.client().await;

    // Written and committed before the slow transaction begins: nothing should hold it back.
    insert_events(&db, &[event(&topic, "other", 0)]).await;

    // The slow transaction takes key K's lowest id and stays open...
    let mut slow = env.client().await;
    let slow_tx = slow.transaction().await.unwrap();
    slow_tx
        .execute("INSERT INTO outbox (topic, key, payload) VALUES ($1, 'K', '{\"key\": \"K\", \"n\": 1}')", &[&topic])
        .await
        .unwrap();
    // ...while later rows of K, and of another key, commit.
    insert_events(&db, &(2..=6).map(|n| event(&topic, "K", n)).collect::<Vec<_>>()).await;
    insert_events(&db, &[event(&topic, "other", 7)]).await;

    let relay = env.spawn_relay(env.config());
    wait_until(PATIENCE, "the row written before the open transaction to be published", || async {
        relay.metrics.published.with_label_values(&[&topic]).get() >= 1
    })
    .await;
    wait_until(PATIENCE, "the held-back rows to show in the metrics", || async {
        relay.metrics.held_rows.get() >= 6 && relay.metrics.watermark_holdback.get() > 0.0
    })
    .await;
    let published_while_open: i64 = db
        .query_one("SELECT count(*) FROM outbox WHERE key = 'K' AND published_at IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(published_while_open, 0, "no row of K overtakes the open transaction's lower id");

    slow_tx.commit().await.unwrap();
    wait_until(PATIENCE, "everything published after the commit", || async { unpublished_count(&db).await == 0 }).await;
    relay.stop().await.expect("clean stop");

    let records = read_topic(&env.brokers, &topic).await;
    let mut k: Vec<(i32, i64, i64)> = records
        .iter()
        .filter(|r| r.key.as_deref() == Some("K"))
        .map(|r| {
            let payload: serde_json::Value = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
            (r.partition, r.offset, payload["n"].as_i64().unwrap())
        })
        .collect();
    k.sort();
    let order: Vec<i64> = k.iter().map(|(_, _, n)| *n).collect();
    assert_eq!(order, vec![1, 2, 3, 4, 5, 6], "K arrives in id order, the late row first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_that_holds_rows_back_is_named_in_the_log() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let mut slow = env.client().await;
    let slow_tx = slow.transaction().await.unwrap();
    slow_tx.execute("INSERT INTO outbox (topic, key, payload) VALUES ($1, 'K', '{}')", &[&topic]).await.unwrap();
    let slow_pid: i32 = slow_tx.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    insert_events(&env.client().await, &[event(&topic, "J", 1)]).await;

    let mut config = env.config();
    config.relay.holdback_warning = std::time::Duration::from_millis(1);
    let relay = spawn_relay_process(&env, &config);
    relay.wait_for_log("an open transaction is holding rows back").await;
    let log = relay.log();
    assert!(log.contains(&format!("blocking_pid={slow_pid}")), "the warning names the backend:\n{log}");
    slow_tx.rollback().await.unwrap();
}
