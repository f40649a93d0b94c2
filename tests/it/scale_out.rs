//! Several relays on one table: keys are split into shards, each shard published by exactly
//! one live relay; when a relay dies its shards are taken over within seconds, and per-key
//! order holds across the takeover.

use std::collections::HashSet;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_split_the_shards_and_the_survivor_takes_them_all() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let db = env.client().await;
    let config = env.config();
    let shards = config.relay.shards as usize;

    let first = env.spawn_relay(config.clone());
    wait_until(PATIENCE, "the first relay to take every shard", || async {
        shard_holders(&db).await.values().sum::<usize>() == shards
    })
    .await;
    let second = env.spawn_relay(config.clone());
    wait_until(PATIENCE, "the shards to be split between two relays", || async {
        let holders = shard_holders(&db).await;
        holders.len() == 2 && holders.values().all(|&n| n == shards / 2)
    })
    .await;

    let events: Vec<NewEvent> = (0..1_000).map(|n| NewEvent::keyed(&topic, &format!("k{}", n % 40), n)).collect();
    insert_events(&db, &events).await;
    wait_until(PATIENCE, "both relays to publish", || async { unpublished_count(&db).await == 0 }).await;
    let by_first = first.metrics.published.with_label_values(&[&topic]).get();
    let by_second = second.metrics.published.with_label_values(&[&topic]).get();
    assert_eq!(by_first + by_second, 1_000);
    assert!(by_first > 0 && by_second > 0, "each relay publishes its own shards: {by_first} / {by_second}");

    first.stop().await.expect("clean stop");
    wait_until(PATIENCE, "the survivor to take every shard", || async {
        let holders = shard_holders(&db).await;
        holders.len() == 1 && holders.values().sum::<usize>() == shards
    })
    .await;
    insert_events(
        &db,
        &(1_000..1_200).map(|n| NewEvent::keyed(&topic, &format!("k{}", n % 40), n)).collect::<Vec<_>>(),
    )
    .await;
    wait_until(PATIENCE, "the survivor to publish every key", || async { unpublished_count(&db).await == 0 }).await;
    second.stop().await.expect("clean stop");

    let records = read_topic(&env.brokers, &topic).await;
    assert_eq!(records.len(), 1_200, "no row was published by two relays");
    assert_first_copies_in_key_order(&records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_one_killed_mid_drain_lose_nothing_and_keep_key_order() {
    const ROWS: usize = 30_000;
    const KEYS: usize = 60;
    let env = TestEnv::start().await;
    env.migrate().await;
    let partitions = 3;
    let topic = env.create_topic(partitions).await;
    let db = env.client().await;
    insert_backlog(&db, &topic, 0..ROWS, KEYS).await;
    let mut config = env.config();
    config.relay.batch_size = 500;
    let mut relays: Vec<RelayProcess> = (0..3).map(|_| spawn_relay_process(&env, &config)).collect();
    wait_until(PATIENCE, "three relays to share the shards", || async {
        let holders = shard_holders(&db).await;
        holders.len() == 3 && holders.values().sum::<usize>() == config.relay.shards as usize
    })
    .await;
    wait_until(PATIENCE, "draining to be under way", || async { unpublished_count(&db).await < ROWS as i64 }).await;

    let victim = relays.remove(0);
    victim.signal(libc::SIGKILL);
    let killed_at = std::time::Instant::now();
    wait_until(PATIENCE, "the survivors to take over the dead relay's shards", || async {
        let holders = shard_holders(&db).await;
        holders.len() == 2 && holders.values().sum::<usize>() == config.relay.shards as usize
    })
    .await;
    let takeover = killed_at.elapsed();
    assert!(takeover < std::time::Duration::from_secs(20), "takeover took {takeover:?}");
    eprintln!("shards taken over {takeover:?} after the kill");

    wait_until(PATIENCE, "every row marked", || async { unpublished_count(&db).await == 0 }).await;
    for relay in &mut relays {
        relay.signal(libc::SIGTERM);
        assert_eq!(relay.wait().await, Some(0), "log:\n{}", relay.log());
    }

    let records = read_topic(&env.brokers, &topic).await;
    let distinct: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    assert_eq!(distinct, all_event_ids(&db).await, "nothing lost");
    identical_duplicates(&records);
    assert_first_copies_in_key_order(&records);
    for record in &records {
        let key = record.key.as_deref().expect("keyed");
        assert_eq!(record.partition, java_partition(key.as_bytes(), partitions), "key {key} changed partition");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_a_kill_a_late_commit_and_two_poison_rows_together() {
    const ROWS: usize = 20_000;
    const KEYS: usize = 40;
    let env = TestEnv::start().await;
    env.migrate().await;
    let partitions = 3;
    let topic = env.create_topic(partitions).await;
    let db = env.client().await;

    // The lowest id of key "late" stays uncommitted while everything else is written.
    let mut slow = env.client().await;
    let slow_tx = slow.transaction().await.unwrap();
    slow_tx
        .execute("INSERT INTO outbox (topic, key, payload) VALUES ($1, 'late', '{\"n\": 0}')", &[&topic])
        .await
        .unwrap();
    let mut big = NewEvent::keyed(&topic, "big", 0);
    big.payload = Some(format!(r#"{{"n": 0, "blob": "{}"}}"#, "x".repeat(3 * 1024 * 1024)));
    let missing_topic = unique_name("missing");
    insert_events(
        &db,
        &[
            big,
            NewEvent::keyed(&topic, "big", 1),
            NewEvent::keyed(&missing_topic, "lost", 0),
            NewEvent::keyed(&topic, "lost", 1),
            NewEvent::keyed(&topic, "late", 1),
        ],
    )
    .await;
    insert_backlog(&db, &topic, 0..ROWS, KEYS).await;

    let mut config = env.config();
    config.relay.batch_size = 500;
    config.relay.max_attempts = 3;
    config.relay.retry_backoff_initial = std::time::Duration::from_millis(50);
    config.relay.retry_backoff_max = std::time::Duration::from_millis(200);
    let mut relays: Vec<RelayProcess> = (0..3).map(|_| spawn_relay_process(&env, &config)).collect();
    wait_until(PATIENCE, "three relays to share the shards", || async { shard_holders(&db).await.len() == 3 }).await;
    relays.remove(0).signal(libc::SIGKILL);
    slow_tx.commit().await.unwrap();

    // Everything healthy goes out; the two poison rows fail and hold their keys.
    wait_until(PATIENCE, "the poison rows to fail and the rest to be published", || async {
        let failed: i64 =
            db.query_one("SELECT count(*) FROM outbox WHERE failed_at IS NOT NULL", &[]).await.unwrap().get(0);
        failed == 2 && unpublished_count(&db).await == 4
    })
    .await;
    for relay in &mut relays {
        assert!(relay.is_running(), "the surviving relays keep running");
    }

    let path = write_config(&env, &config);
    let (code, stdout, stderr) =
        run_command(&["--config", path.to_str().unwrap(), "status", "--json"], &[("RUST_LOG", "off")]);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["failed_rows"], 2, "{status:#}");
    let parked: Vec<&str> =
        status["parked_keys"].as_array().unwrap().iter().map(|p| p["key"].as_str().unwrap()).collect();
    assert!(parked.contains(&"big") && parked.contains(&"lost"), "{status:#}");
    let errors: Vec<&str> =
        status["failed_by_error"].as_array().unwrap().iter().map(|g| g["error"].as_str().unwrap()).collect();
    assert!(errors.iter().any(|e| e.contains("max.message.bytes")), "the topic's limit, named: {errors:?}");
    assert!(errors.iter().any(|e| e.contains("does not exist")), "{errors:?}");
    assert_eq!(status["ownership"]["relays"].as_array().unwrap().len(), 2, "{status:#}");

    let records = read_topic(&env.brokers, &topic).await;
    let healthy: HashSet<String> = db
        .query("SELECT event_id::text FROM outbox WHERE key NOT IN ('big', 'lost')", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let on_topic: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    assert_eq!(on_topic, healthy, "every healthy row arrived; no poison or parked row did");
    assert_first_copies_in_key_order(&records);
    let late: Vec<String> =
        records.iter().filter(|r| r.key.as_deref() == Some("late")).map(|r| r.payload_text().unwrap()).collect();
    assert!(late[0].contains("\"n\": 0"), "the late-committing lower id came first: {late:?}");
    for record in &records {
        let key = record.key.as_deref().expect("keyed");
        assert_eq!(record.partition, java_partition(key.as_bytes(), partitions), "key {key} changed partition");
    }
    for relay in &mut relays {
        relay.signal(libc::SIGTERM);
        assert_eq!(relay.wait().await, Some(0), "log:\n{}", relay.log());
    }
}
