//! The claim floor: claims start past the rows already published instead of stepping over
//! their dead index entries, and yet no row is ever left behind: not one whose transaction
//! commits late, not one `outbox-relay retry` re-queues, not one an operator sets back to
//! unpublished.

use std::time::{Duration, Instant};

use crate::support::*;
use outbox_relay::config::Config;
use outbox_relay::postgres::layout::Mapping;
use outbox_relay::postgres::outbox::Outbox;
use outbox_relay::relay::claim_floor::ClaimFloor;

/// Longer than any test: only the horizons, or a rescan request, can move the floor down.
const NO_FULL_SCANS: Duration = Duration::from_secs(3600);

/// Every shard of the default configuration.
fn all_shards(config: &Config) -> Vec<i32> {
    (0..config.relay.shards as i32).collect()
}

/// Claims and marks batches of 100, as the relay does but without Kafka, until a claim comes
/// back empty; returns the ids marked, in order.
async fn claim_and_mark_all(outbox: &Outbox, floor: &mut ClaimFloor, shards: &[i32]) -> Vec<i64> {
    let mut marked = Vec::new();
    loop {
        let start = floor.start(shards, Instant::now());
        let claim = outbox.claim(100, usize::MAX, shards, &[], start, &[]).await.expect("claim");
        floor.observe(start, claim.view.as_ref(), Instant::now());
        if claim.rows.is_empty() {
            return marked;
        }
        let rows: Vec<_> = claim.rows.into_iter().map(|row| row.expect("decodable row").row_ref()).collect();
        outbox.mark_published(&rows).await.expect("mark");
        marked.extend(rows.iter().map(|row| row.id.as_str().parse::<i64>().expect("bigint id")));
    }
}

async fn published_at_is_set(db: &tokio_postgres::Client, id: i64) -> bool {
    db.query_one("SELECT published_at IS NOT NULL FROM outbox WHERE id = $1", &[&id]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_start_past_published_rows_but_never_past_a_transaction_still_open() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let db = env.client().await;
    let mut config = env.config();
    // Without the xact_id column, rows after an open transaction are claimed while it stays
    // open: the case in which a floor could overtake its late row.
    config.outbox.columns.xact_id = None;
    let mapping = Mapping::from_config(&config).unwrap();
    let outbox = Outbox::connect(&config, &mapping).await.unwrap();
    assert!(outbox.ids_grow_with_time(), "the standard table's identity hands out ids in order");
    let shards = all_shards(&config);
    let mut floor = ClaimFloor::new(NO_FULL_SCANS, outbox.ids_grow_with_time());

    insert_backlog(&db, "t", 0..1000, 10).await;
    assert_eq!(claim_and_mark_all(&outbox, &mut floor, &shards).await.len(), 1000);
    let risen = floor.start(&shards, Instant::now()).expect("a floor after a drain");
    assert!(risen > 500, "the floor follows the published rows, trailing by a few batches: {risen}");

    // A transaction takes the next id and stays open while later rows commit and are published.
    let mut slow = env.client().await;
    let slow_tx = slow.transaction().await.unwrap();
    let late_id: i64 = slow_tx
        .query_one("INSERT INTO outbox (topic, key, payload) VALUES ('t', 'late', '{}') RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    insert_backlog(&db, "t", 1000..2000, 10).await;
    let meanwhile = claim_and_mark_all(&outbox, &mut floor, &shards).await;
    assert_eq!(meanwhile.len(), 1000, "later rows flow while the transaction is open");
    assert!(meanwhile.iter().all(|id| *id > late_id));
    let held = floor.start(&shards, Instant::now()).expect("a floor");
    assert!(held <= late_id, "the floor waits below the open transaction's row {late_id}: {held}");

    slow_tx.commit().await.unwrap();
    assert_eq!(claim_and_mark_all(&outbox, &mut floor, &shards).await, [late_id], "the late row, without a full scan");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_from_a_sequence_with_a_cache_turn_the_floor_off() {
    let env = TestEnv::start().await;
    env.migrate().await;
    // With a cache, each session takes a block of ids, and a later insert can take a lower one.
    env.client().await.batch_execute("ALTER TABLE outbox ALTER COLUMN id SET CACHE 20").await.unwrap();
    let config = env.config();
    let outbox = Outbox::connect(&config, &Mapping::from_config(&config).unwrap()).await.unwrap();
    assert!(!outbox.ids_grow_with_time());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_row_below_the_claim_floor_is_published_at_once() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let missing = unique_name("missing");
    let db = env.client().await;
    let poison = insert_events(&db, &[NewEvent::keyed(&missing, "P", 0)]).await[0];
    let mut config = env.poison_config(1);
    config.relay.batch_size = 100;
    config.relay.full_scan_interval = NO_FULL_SCANS;
    let relay = env.spawn_relay(config.clone());
    wait_until(PATIENCE, "the poison row to be given up on", || async {
        db.query_one("SELECT failed_at IS NOT NULL FROM outbox WHERE id = $1", &[&poison]).await.unwrap().get(0)
    })
    .await;
    // Enough batches after it for the floor to pass it.
    insert_backlog(&db, &topic, 1..3001, 50).await;
    wait_until(PATIENCE, "the later rows to be published", || async { unpublished_count(&db).await == 1 }).await;

    db.execute("UPDATE outbox SET topic = $1 WHERE id = $2", &[&topic, &poison]).await.unwrap();
    let path = write_config(&env, &config);
    let id = poison.to_string();
    let (code, _, stderr) =
        run_command(&["--config", path.to_str().unwrap(), "retry", "--id", &id], &[("RUST_LOG", "off")]);
    assert_eq!(code, 0, "{stderr}");
    wait_until(PATIENCE, "the retried row to be published", || async { published_at_is_set(&db, poison).await }).await;
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_set_back_to_unpublished_is_found_by_the_next_full_scan() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let db = env.client().await;
    insert_backlog(&db, &topic, 1..3001, 50).await;
    let mut config = env.config();
    config.relay.batch_size = 100;
    config.relay.full_scan_interval = Duration::from_millis(300);
    let relay = env.spawn_relay(config);
    wait_until(PATIENCE, "the backlog to be published", || async { unpublished_count(&db).await == 0 }).await;

    // An operator asks for the first row again, far below the floor.
    let first: i64 = db.query_one("SELECT min(id) FROM outbox", &[]).await.unwrap().get(0);
    db.execute("UPDATE outbox SET published_at = NULL WHERE id = $1", &[&first]).await.unwrap();
    wait_until(PATIENCE, "the row to be published again", || async { published_at_is_set(&db, first).await }).await;
    // The counter follows the mark's return, a moment after the row shows as marked.
    let published = || relay.metrics.published.with_label_values(&[&topic]).get();
    wait_until(PATIENCE, "the second publish to be counted", || async { published() >= 3001 }).await;
    assert_eq!(published(), 3001, "published twice, no more");
    relay.stop().await.unwrap();
}

/// The standard table, an application's connection to it, and the relay's own connection with
/// every shard, to claim without a relay running.
async fn claiming_without_a_relay(env: &TestEnv) -> (tokio_postgres::Client, Outbox, Vec<i32>) {
    env.migrate().await;
    let config = env.config();
    let outbox = Outbox::connect(&config, &Mapping::from_config(&config).unwrap()).await.unwrap();
    (env.client().await, outbox, all_shards(&config))
}

/// A failed row parks key K while the other keys' rows lift the claim floor far above it; the
/// operator fixes it and runs `retry --key K` while writers go on inserting rows of K. Whether
/// or not the relay hears the retry's notification, and with no full scan to find it, the
/// retried row goes out before every later row of K.
async fn retry_of_a_parked_key_keeps_its_order(listen: bool) {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let db = env.client().await;
    let mut bad = NewEvent::keyed(&topic, "K", 0);
    bad.headers = Some(r#"{"a": 1}"#.into());
    let failed = insert_events(&db, &[bad]).await[0];
    let mut config = env.poison_config(1);
    config.relay.batch_size = 50;
    config.relay.listen = listen;
    config.relay.full_scan_interval = NO_FULL_SCANS;
    let relay = env.spawn_relay(config.clone());
    wait_until(PATIENCE, "the bad row to be given up on", || async {
        db.query_one("SELECT failed_at IS NOT NULL FROM outbox WHERE id = $1", &[&failed]).await.unwrap().get(0)
    })
    .await;

    // Rounds of other keys, and rows of K that wait behind the failed one.
    let mut n = 1;
    for _round in 0..6 {
        let mut events: Vec<NewEvent> = (0..200).map(|i| NewEvent::keyed(&topic, &format!("o{}", i % 20), i)).collect();
        events.push(NewEvent::keyed(&topic, "K", n));
        n += 1;
        insert_events(&db, &events).await;
        let waiting = n as i64; // K's rows, the failed one included
        wait_until(PATIENCE, "the other keys to be published", || async { unpublished_count(&db).await == waiting })
            .await;
    }

    db.execute("UPDATE outbox SET headers = '{\"a\": \"1\"}' WHERE id = $1", &[&failed]).await.unwrap();
    let path = write_config(&env, &config);
    let (code, stdout, stderr) =
        run_command(&["--config", path.to_str().unwrap(), "retry", "--key", "K"], &[("RUST_LOG", "off")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("re-queued 1 row with failed attempts"), "{stdout}");
    // Writers go on: rows of K right after the retry, while the relay may not have looked yet.
    for _ in 0..5 {
        insert_events(&db, &[NewEvent::keyed(&topic, "K", n), NewEvent::keyed(&topic, "o1", n)]).await;
        n += 1;
    }
    wait_until(PATIENCE, "every row of K to be published", || async { unpublished_count(&db).await == 0 }).await;
    relay.stop().await.unwrap();

    let records = read_topic(&env.brokers, &topic).await;
    assert_eq!(key_sequence(&records, "K"), (0..n as i64).collect::<Vec<_>>(), "K in the order it was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_row_goes_out_before_later_rows_of_its_key_with_notify_off() {
    retry_of_a_parked_key_keeps_its_order(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_row_goes_out_before_later_rows_of_its_key_with_notify_on() {
    retry_of_a_parked_key_keeps_its_order(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_being_retried_is_claimed_without_the_later_rows_of_its_key() {
    let env = TestEnv::start().await;
    let (db, outbox, shards) = claiming_without_a_relay(&env).await;
    let ids =
        insert_events(&db, &[NewEvent::keyed("t", "K", 1), NewEvent::keyed("t", "K", 2), NewEvent::keyed("t", "L", 1)])
            .await;
    // K's first row failed once at the broker and its backoff is over: it is due again.
    db.execute("UPDATE outbox SET attempts = 1, last_error = 'rejected by the broker' WHERE id = $1", &[&ids[0]])
        .await
        .unwrap();
    let claim = outbox.claim(100, usize::MAX, &shards, &[], None, &[]).await.unwrap();
    let claimed: Vec<i64> = claim.rows.into_iter().map(|r| r.unwrap().id.parse().unwrap()).collect();
    assert_eq!(claimed, [ids[0], ids[2]], "if K's first row fails again, its second must not have gone out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_given_a_cache_while_the_relay_runs_stops_the_floor_at_the_next_claim() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let db = env.client().await;
    let mut config = env.config();
    config.relay.batch_size = 50;
    config.relay.listen = false;
    config.relay.full_scan_interval = NO_FULL_SCANS;
    let relay = env.spawn_relay(config);
    insert_backlog(&db, &topic, 0..500, 20).await;
    wait_until(PATIENCE, "the backlog to be published", || async { unpublished_count(&db).await == 0 }).await;

    db.batch_execute("ALTER TABLE outbox ALTER COLUMN id SET CACHE 50").await.unwrap();
    // Each session now takes a block of 50 ids: `early` holds the lower block.
    let early = env.client().await;
    let late = env.client().await;
    let first_early = insert_events(&early, &[NewEvent::keyed(&topic, "K", 1)]).await[0];
    for round in 0..6 {
        let events: Vec<NewEvent> = (0..5).map(|i| NewEvent::keyed(&topic, "L", round * 5 + i)).collect();
        insert_events(&late, &events).await;
        wait_until(PATIENCE, "the later block's rows to be published", || async { unpublished_count(&db).await == 0 })
            .await;
    }
    // A row from the earlier block, below everything the later block published.
    let cached_low = insert_events(&early, &[NewEvent::keyed(&topic, "K", 2)]).await[0];
    assert_eq!(cached_low, first_early + 1);
    wait_until(PATIENCE, "the row with the cached lower id to be published", || async {
        published_at_is_set(&db, cached_low).await
    })
    .await;
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_stops_at_its_byte_limit_and_a_row_larger_than_it_comes_alone() {
    let env = TestEnv::start().await;
    let (db, outbox, shards) = claiming_without_a_relay(&env).await;
    db.execute(
        "INSERT INTO outbox (topic, key, payload) \
         SELECT 't', 'k' || n, jsonb_build_object('blob', repeat('x', 100000)) FROM generate_series(1, 5) n",
        &[],
    )
    .await
    .unwrap();

    let claim = outbox.claim(100, 250_000, &shards, &[], None, &[]).await.unwrap();
    assert_eq!(claim.rows.len(), 2, "two rows of about 100 kB fit in 250 kB, three do not");
    assert!(claim.full, "rows were left behind");
    let claim = outbox.claim(100, 1_024, &shards, &[], None, &[]).await.unwrap();
    assert_eq!(claim.rows.len(), 1, "a row larger than the limit comes alone");
    let claim = outbox.claim(100, usize::MAX, &shards, &[], None, &[]).await.unwrap();
    assert_eq!(claim.rows.len(), 5);
    assert!(!claim.full, "everything claimable was claimed");
}
