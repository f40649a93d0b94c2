//! Rows reach the topic as written, once each, in order per key, on the partition the Java
//! client would choose, and are marked published.

use std::collections::{HashMap, HashSet};

use crate::support::*;

#[test]
fn the_reference_murmur2_matches_kafkas_own_test_vectors() {
    // From Kafka's UtilsTest.testMurmur2: the partition checks below rest on this.
    assert_eq!(murmur2(b"21"), -973932308);
    assert_eq!(murmur2(b"foobar"), -790332482);
    assert_eq!(murmur2(b"a-little-bit-long-string"), -985981536);
    assert_eq!(murmur2(b"a-little-bit-longer-string"), -1486304829);
    assert_eq!(murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"), -58897971);
    assert_eq!(murmur2(b"abc"), 479470107);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_arrives_as_written_with_its_event_id_and_is_marked() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    let db = env.client().await;
    let events = vec![
        NewEvent {
            topic: topic.clone(),
            key: Some("order-1".into()),
            payload: Some(r#"{"total": 42, "items": ["a", "b"]}"#.into()),
            headers: Some(r#"{"type": "OrderPlaced", "traceparent": "00-abc-def-01"}"#.into()),
        },
        NewEvent { topic: topic.clone(), key: Some("order-1".into()), payload: None, headers: None },
        NewEvent { topic: topic.clone(), key: None, payload: Some(r#""unkeyed""#.into()), headers: None },
    ];
    let ids = insert_events(&db, &events).await;

    let relay = env.spawn_relay(env.config());
    let received = consume(&env.brokers, &topic, 3).await;
    wait_until(PATIENCE, "all rows marked", || async { unpublished_count(&db).await == 0 }).await;
    relay.stop().await.expect("clean stop");

    let rows = db
        .query("SELECT event_id::text, published_at IS NOT NULL, attempts FROM outbox ORDER BY id", &[])
        .await
        .unwrap();
    let event_ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert!(rows.iter().all(|r| r.get::<_, bool>(1) && r.get::<_, i32>(2) == 0));
    assert_eq!(ids.len(), 3);

    let by_event: HashMap<String, &Received> = received.iter().map(|r| (r.event_id(), r)).collect();
    let first = by_event[&event_ids[0]];
    assert_eq!(first.key.as_deref(), Some("order-1"));
    let payload: serde_json::Value = serde_json::from_slice(first.payload.as_ref().unwrap()).unwrap();
    assert_eq!(payload, serde_json::json!({"total": 42, "items": ["a", "b"]}));
    assert_eq!(first.header("type").as_deref(), Some("OrderPlaced"));
    assert_eq!(first.header("traceparent").as_deref(), Some("00-abc-def-01"));
    assert_eq!(first.headers.last().map(|h| h.0.as_str()), Some("event_id"), "event_id is the last header");

    let tombstone = by_event[&event_ids[1]];
    assert_eq!(tombstone.payload, None, "a NULL payload is published as a tombstone");
    assert_eq!(tombstone.partition, first.partition, "one key, one partition");
    assert!(tombstone.offset > first.offset, "one key, in id order");

    let unkeyed = by_event[&event_ids[2]];
    assert_eq!(unkeyed.key, None);
    assert_eq!(unkeyed.payload_text().as_deref(), Some(r#""unkeyed""#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_rows_over_fifty_keys_written_while_relaying_arrive_once_in_key_order() {
    const ROWS: usize = 20_000;
    const KEYS: usize = 50;
    const PER_TRANSACTION: usize = 200;
    let env = TestEnv::start().await;
    env.migrate().await;
    let partitions = 3;
    let topic = env.create_topic(partitions).await;
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut config = env.config();
    config.metrics.listen = metrics_addr.clone();
    let mut relay = spawn_relay_process(&env, &config);

    // The writer commits while the relay is already draining: the relay sees the table grow.
    let writer_db = env.client().await;
    let writer_topic = topic.clone();
    let writer = tokio::spawn(async move {
        for start in (0..ROWS).step_by(PER_TRANSACTION) {
            let events: Vec<NewEvent> = (start..start + PER_TRANSACTION)
                .map(|n| NewEvent::keyed(&writer_topic, &format!("key-{}", n % KEYS), n))
                .collect();
            insert_events(&writer_db, &events).await;
        }
    });
    writer.await.expect("writer");

    let received = consume(&env.brokers, &topic, ROWS).await;
    let db = env.client().await;
    wait_until(PATIENCE, "all rows marked", || async { unpublished_count(&db).await == 0 }).await;
    assert_eq!(read_topic(&env.brokers, &topic).await.len(), ROWS, "no record was published twice");

    let distinct: HashSet<String> = received.iter().map(|r| r.event_id()).collect();
    assert_eq!(distinct.len(), ROWS, "every event_id arrives exactly once");
    let table_ids: HashSet<String> =
        db.query("SELECT event_id::text FROM outbox", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(distinct, table_ids, "the topic holds exactly the table's events");

    let mut last_n: HashMap<String, i64> = HashMap::new();
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    let mut sorted = received.clone();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for record in &sorted {
        let key = record.key.clone().expect("keyed");
        let payload: serde_json::Value = serde_json::from_slice(record.payload.as_ref().unwrap()).unwrap();
        let n = payload["n"].as_i64().unwrap();
        if let Some(previous) = last_n.insert(key.clone(), n) {
            assert!(n > previous, "key {key}: event {n} arrived after {previous}");
        }
        let partition = *partition_of.entry(key.clone()).or_insert(record.partition);
        assert_eq!(partition, record.partition, "key {key} changed partition");
        assert_eq!(
            record.partition,
            java_partition(key.as_bytes(), partitions),
            "key {key} is not where the Java client's murmur2 partitioner puts it"
        );
    }
    assert_eq!(last_n.len(), KEYS);

    let metrics = scrape(&metrics_addr).await;
    let published = sample(&metrics, &format!("outbox_relay_published_total{{topic=\"{topic}\"}}"));
    assert_eq!(published, Some(ROWS as f64), "{metrics}");
    for name in [
        "outbox_relay_publish_errors_total",
        "outbox_relay_batch_duration_seconds",
        "outbox_relay_pending_rows",
        "outbox_relay_oldest_pending_age_seconds",
    ] {
        assert!(metrics.contains(&format!("# TYPE {name} ")), "{name} is served:\n{metrics}");
    }
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "SIGTERM exits 0; log:\n{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_commit_without_waiting_for_the_wal_flush_unless_configured() {
    use outbox_relay::postgres::layout::Mapping;
    use outbox_relay::postgres::outbox::Outbox;
    let env = TestEnv::start().await;
    env.migrate().await;
    let mut config = env.config();
    let mapping = Mapping::from_config(&config).unwrap();
    let outbox = Outbox::connect(&config, &mapping).await.unwrap();
    assert_eq!(outbox.setting("synchronous_commit").await.unwrap(), "off", "the default: a lost mark only re-sends");
    config.database.synchronous_commit = true;
    let outbox = Outbox::connect(&config, &mapping).await.unwrap();
    assert_eq!(outbox.setting("synchronous_commit").await.unwrap(), "on", "the server's setting when asked for");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_is_planned_for_its_own_parameters_every_time() {
    use outbox_relay::postgres::layout::Mapping;
    use outbox_relay::postgres::outbox::Outbox;
    // After five executions PostgreSQL may switch a prepared statement to a generic plan; the
    // claim's generic plan was 18x slower on a 20k-row backlog (the benchmark's depth series).
    let env = TestEnv::start().await;
    env.migrate().await;
    let config = env.config();
    let mapping = Mapping::from_config(&config).unwrap();
    let outbox = Outbox::connect(&config, &mapping).await.unwrap();
    assert_eq!(outbox.setting("plan_cache_mode").await.unwrap(), "force_custom_plan");
}
