//! The broker validates and refuses whole record batches: one record over the topic's
//! `max.message.bytes`, a batch librdkafka filled past that limit, a keyless record on a
//! compacted topic. Such a refusal must be charged only to the row that causes it, never to
//! the other rows librdkafka happened to put in the same batch.

use crate::support::*;
use tokio_postgres::Client;

/// Inserts `rows` rows of `topic`, row `n` keyed `k-{n % keys}` (or keyless where `keyless(n)`),
/// with a payload of about `size` bytes carrying `n`.
async fn insert_rows(db: &Client, topic: &str, rows: i32, keys: i32, size: i32, keyless_every: Option<i32>) {
    let keyless_every = keyless_every.unwrap_or(0);
    db.execute(
        "INSERT INTO outbox (topic, key, payload) \
         SELECT $1, CASE WHEN $5 > 0 AND n % $5 = $5 - 1 THEN NULL ELSE 'k-' || (n % $3) END, \
                json_build_object('key', 'k-' || (n % $3), 'n', n, 'pad', repeat('x', $4)) \
         FROM generate_series(0, $2 - 1) AS n ORDER BY n",
        &[&topic, &rows, &keys, &size, &keyless_every],
    )
    .await
    .expect("insert rows");
}

/// Rows charged with an attempt of their own, by id.
async fn charged_rows(db: &Client) -> Vec<(i64, Option<String>, String)> {
    db.query("SELECT id, key, coalesce(last_error, '') FROM outbox WHERE attempts > 0 ORDER BY id", &[])
        .await
        .expect("charged rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_limit_below_the_producers_batches_charges_only_the_row_over_it() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = create_topic_with(&env.brokers, 1, &[("max.message.bytes", "200000")]).await;
    let db = env.client().await;
    // 3,000 rows of ~560 bytes on 3,000 keys: far more than 200,000 bytes per batch if
    // librdkafka were left to fill its default 1,000,000-byte batches.
    insert_rows(&db, &topic, 3000, 3000, 500, None).await;
    // One row over the topic's limit, in the middle of the next rows.
    db.execute(
        "INSERT INTO outbox (topic, key, payload) VALUES ($1, 'big', json_build_object('n', 0, 'pad', repeat('y', 500000)))",
        &[&topic],
    )
    .await
    .unwrap();
    insert_rows(&db, &topic, 50, 50, 500, None).await;

    let relay = env.spawn_relay(env.poison_config(100));
    wait_until(PATIENCE, "every row but the large one published", || async {
        unpublished_count(&db).await == 1 && !charged_rows(&db).await.is_empty()
    })
    .await;
    let charged = charged_rows(&db).await;
    assert_eq!(charged.len(), 1, "only the row over the limit is charged: {:?}", &charged[..charged.len().min(5)]);
    let (_, key, error) = &charged[0];
    assert_eq!(key.as_deref(), Some("big"));
    assert!(error.contains("max.message.bytes = 200000"), "the error names the topic's limit: {error}");
    assert_eq!(read_topic(&env.brokers, &topic).await.len(), 3050, "every other row once");
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_row_for_a_compacted_topic_is_refused_before_sending_and_no_other_row_is_charged() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = create_topic_with(&env.brokers, 2, &[("cleanup.policy", "compact")]).await;
    let db = env.client().await;
    // 20 keys, one keyless row in every 40.
    insert_rows(&db, &topic, 800, 20, 100, Some(40)).await;

    let mut config = env.poison_config(100);
    config.relay.on_poison = outbox_relay::config::OnPoison::Skip;
    let relay = env.spawn_relay(config);
    wait_until(PATIENCE, "every keyed row published", || async {
        unpublished_count(&db).await == 20 && charged_rows(&db).await.len() == 20
    })
    .await;
    let charged = charged_rows(&db).await;
    assert!(charged.iter().all(|(_, key, _)| key.is_none()), "only keyless rows are charged: {charged:?}");
    assert!(charged[0].2.contains("compacted"), "the error says why: {}", charged[0].2);
    // (read_topic's end marker is a keyless record, which a compacted topic refuses.)
    let records = consume(&env.brokers, &topic, 780).await;
    assert_first_copies_in_key_order(&records);
    assert_eq!(relay.metrics.key_order_breaks.get(), 0);
    relay.stop().await.expect("clean stop");
}
