//! Two-phase commit: an application on XA or 2PC (a Java EE server, Atomikos, Narayana) writes
//! its outbox rows in transactions its transaction manager prepares. The standard table lets it
//! (no NOTIFY in the writer's transaction), a prepared transaction holds later rows back like
//! any open one, and status and the metrics name it.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_inserted_in_a_prepared_transaction_is_published_in_order_after_commit_prepared() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    let config = env.config();
    let relay = env.spawn_relay(config.clone());
    insert_events(&db, &[NewEvent::keyed(&topic, "K", 1)]).await;
    wait_until(PATIENCE, "the first row to be published", || async { unpublished_count(&db).await == 0 }).await;

    // The transaction manager's first phase.
    let xa = env.client().await;
    let gid = unique_name("xa");
    xa.batch_execute(&format!(
        "BEGIN; INSERT INTO outbox (topic, key, payload) VALUES ('{topic}', 'K', '{{\"n\": 2}}'); PREPARE TRANSACTION '{gid}'"
    ))
    .await
    .expect("an outbox insert can be prepared");
    // A later row of the key commits while the prepared one waits for its second phase.
    insert_events(&db, &[NewEvent::keyed(&topic, "K", 3)]).await;
    wait_until(PATIENCE, "the held-back gauges to see the prepared transaction", || async {
        relay.metrics.held_rows.get() == 1 && relay.metrics.watermark_holdback.get() > 0.0
    })
    .await;
    let path = write_config(&env, &config);
    let (code, status, stderr) = run_command(&["--config", path.to_str().unwrap(), "status"], &[("RUST_LOG", "off")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(status.contains(&format!("by prepared transaction '{gid}'")), "status names it: {status}");
    assert_eq!(unpublished_count(&db).await, 1, "the later row waits for the prepared one");

    db.batch_execute(&format!("COMMIT PREPARED '{gid}'")).await.unwrap();
    wait_until(PATIENCE, "both rows to be published", || async { unpublished_count(&db).await == 0 }).await;
    relay.stop().await.unwrap();
    let records = read_topic(&env.brokers, &topic).await;
    assert_eq!(key_sequence(&records, "K"), [1, 2, 3], "the prepared row in its place");
}
