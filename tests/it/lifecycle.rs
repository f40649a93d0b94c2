//! Stopping and surviving: SIGTERM finishes the batch in flight and exits 0, or, when the grace
//! period ends first (whatever the broker or PostgreSQL does), exits 4 leaving it unpublished;
//! PostgreSQL or the broker being down at start or mid-run is waited out without losing or
//! falsely marking a row, and a statement waiting on another session's lock is reported, not
//! taken for a stuck relay.

use std::collections::HashSet;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_drain_finishes_the_batch_in_flight_marks_it_and_exits_zero() {
    const ROWS: usize = 40_000;
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    let db = env.client().await;
    insert_backlog(&db, &topic, 0..ROWS, 20).await;

    let mut relay = spawn_relay_process(&env, &env.config());
    wait_until(PATIENCE, "the first batches to be marked", || async { unpublished_count(&db).await < ROWS as i64 })
        .await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "SIGTERM exits 0; log:\n{}", relay.log());
    assert!(relay.log().contains("shutdown requested"), "log:\n{}", relay.log());

    let remaining = unpublished_count(&db).await;
    assert!(remaining > 0, "the relay stopped claiming before the backlog was drained");
    let on_topic: HashSet<String> = read_topic(&env.brokers, &topic).await.iter().map(|r| r.event_id()).collect();
    assert_eq!(
        on_topic,
        marked_event_ids(&db).await,
        "the batch in flight was finished: every published record's row is marked, and no marked row is missing"
    );

    let mut rerun = spawn_relay_process(&env, &env.config());
    wait_until(PATIENCE, "the rest of the backlog", || async { unpublished_count(&db).await == 0 }).await;
    rerun.signal(libc::SIGTERM);
    assert_eq!(rerun.wait().await, Some(0));
    let all = read_topic(&env.brokers, &topic).await;
    let distinct: HashSet<String> = all.iter().map(|r| r.event_id()).collect();
    assert_eq!(distinct.len(), ROWS, "nothing lost across the stop");
    assert_eq!(all.len(), ROWS, "and nothing sent twice, since the stop was clean");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_while_postgresql_is_down_waits_and_then_relays() {
    let mut env = TestEnv::start().await;
    let Some(_) = env.postgres.as_ref() else {
        eprintln!("skipped: PostgreSQL is external (OUTBOX_TEST_DATABASE_URL), the test cannot stop it");
        return;
    };
    env.migrate().await;
    let topic = env.create_topic(1).await;
    insert_events(&env.client().await, &[NewEvent::keyed(&topic, "a", 1), NewEvent::keyed(&topic, "b", 2)]).await;
    env.postgres.as_mut().unwrap().stop();

    let mut relay = spawn_relay_process(&env, &env.config());
    wait_until(PATIENCE, "the relay to report the database unavailable", || async {
        relay.log().contains("database unavailable; retrying")
    })
    .await;
    assert!(relay.is_running(), "an unreachable database does not end the relay");

    env.postgres.as_mut().unwrap().restart();
    let db = env.client().await;
    wait_until(PATIENCE, "rows marked after PostgreSQL came up", || async { unpublished_count(&db).await == 0 }).await;
    assert_eq!(consume(&env.brokers, &topic, 2).await.len(), 2);
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_before_the_broker_waits_and_then_relays() {
    let mut env = TestEnv::start_with_broker_later().await;
    env.migrate().await;
    let topic = unique_name("topic");
    let db = env.client().await;
    insert_events(&db, &[NewEvent::keyed(&topic, "a", 1), NewEvent::keyed(&topic, "b", 2)]).await;

    let addr = format!("127.0.0.1:{}", free_port());
    let mut config = env.config();
    config.metrics.listen = addr.clone();
    config.health.readiness_window = std::time::Duration::from_secs(1);
    let relay = env.spawn_relay(config);
    wait_until(PATIENCE, "/readyz to say no broker is reachable", || async {
        let (status, reasons) = http_get(&addr, "/readyz").await;
        status == 503 && reasons.contains("no Kafka broker reachable")
    })
    .await;
    assert_eq!(http_get(&addr, "/healthz").await.0, 200, "waiting for a broker is not a stuck relay");
    let row =
        db.query_one("SELECT max(attempts), count(last_error), count(published_at) FROM outbox", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(2), 0, "nothing is marked while there is no broker");
    assert_eq!(row.get::<_, i32>(0), 0, "an outage does not count toward giving up on a row");
    assert_eq!(row.get::<_, i64>(1), 0, "an outage is not a row's error");
    assert!(!relay.is_finished(), "a missing broker does not end the relay");

    env.start_broker();
    create_topic(&env.brokers, &topic, 1).await;
    wait_until(PATIENCE, "rows marked once the broker is up", || async { unpublished_count(&db).await == 0 }).await;
    let records = read_topic(&env.brokers, &topic).await;
    assert_eq!(records.len(), 2, "each row once: {records:?}");
    relay.stop().await.expect("clean stop");
}

/// Issue 15's attack: with records timed out in flight, a broker that was only slow writes them
/// when it resumes, and a relay that sent them again would duplicate them without ever
/// stopping. The relay never abandons a record; librdkafka's retries of timed-out requests
/// carry the same producer id and sequence numbers, which the broker deduplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_hung_for_fifteen_seconds_while_a_writer_inserts_duplicates_nothing_and_loses_nothing() {
    let env = TestEnv::start_with_own_broker().await;
    let broker = env.broker.as_ref().expect("own broker");
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let db = env.client().await;
    insert_backlog(&db, &topic, 0..20_000, 20).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut config = env.config();
    config.metrics.listen = addr.clone();
    config.relay.batch_size = 500;
    config.health.readiness_window = std::time::Duration::from_secs(2);
    config.health.liveness_timeout = std::time::Duration::from_secs(2);
    // Requests time out three times over during the hang and are sent again.
    config.kafka.properties.insert("request.timeout.ms".into(), "4000".into());
    let relay = env.spawn_relay(config);
    wait_until(PATIENCE, "draining to start", || async {
        relay.metrics.published.with_label_values(&[&topic]).get() > 0
    })
    .await;

    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (db, topic, writing) = (env.client().await, topic.clone(), writing.clone());
        tokio::spawn(async move {
            let mut n = 20_000;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                insert_events(&db, &[NewEvent::keyed(&topic, &format!("key-{}", n % 20), n)]).await;
                n += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };

    broker.freeze(1);
    wait_until(PATIENCE, "/readyz to fail", || async { http_get(&addr, "/readyz").await.0 == 503 }).await;
    // Rows the broker acknowledged just before it froze may be marked once the batch's other
    // records are set aside (relay.stalled_partition_after); from then on nothing is.
    wait_until(PATIENCE, "the unacknowledged records to be set aside", || async {
        scrape(&addr).await.lines().any(|l| l.starts_with("outbox_relay_stalled_records{") && !l.ends_with(" 0"))
    })
    .await;
    let marked_when_hung = marked_event_ids(&db).await;
    // The hang itself: its length is the scenario, not a wait for a condition.
    tokio::time::sleep(std::time::Duration::from_secs(15)).await;
    assert_eq!(http_get(&addr, "/healthz").await.0, 200, "a relay waiting on a hung broker is alive");
    assert_eq!(marked_event_ids(&db).await, marked_when_hung, "nothing is marked while the broker hangs");
    broker.thaw(1);

    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    writer.await.expect("writer");
    wait_until(PATIENCE, "everything marked after the broker recovered", || async {
        unpublished_count(&db).await == 0
    })
    .await;
    assert!(!relay.is_finished(), "the relay never stopped");
    let records = read_topic(&env.brokers, &topic).await;
    let mut copies: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for record in &records {
        *copies.entry(record.event_id()).or_default() += 1;
    }
    let duplicated: Vec<_> = copies.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id).collect();
    assert!(
        duplicated.is_empty(),
        "{} rows reached the topic twice, e.g. {:?}",
        duplicated.len(),
        &duplicated[..duplicated.len().min(3)]
    );
    assert_eq!(copies.keys().cloned().collect::<HashSet<_>>(), all_event_ids(&db).await, "nothing lost");
    assert_first_copies_in_key_order(&records);
    relay.stop().await.expect("clean stop");
}

/// A relay whose first batch can never be acknowledged (no broker at all), with `grace`.
async fn relay_with_a_stuck_batch(grace: std::time::Duration) -> Option<(TestEnv, RelayProcess)> {
    let env = TestEnv::start_with_own_broker().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let mut config = env.config();
    config.relay.shutdown_timeout = grace;
    let relay = spawn_relay_process(&env, &config);
    // Past the startup check of the broker, then the broker hangs.
    relay.wait_for_log("connected to PostgreSQL").await;
    env.broker.as_ref().expect("own broker").freeze(1);
    insert_events(&env.client().await, &[NewEvent::keyed(&topic, "k", 1)]).await;
    relay.wait_for_log("claimed a batch").await;
    Some((env, relay))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_address_that_never_answers_ends_the_relay_with_exit_2_before_it_takes_any_shard() {
    let env = TestEnv::start().await;
    env.migrate().await;
    insert_events(&env.client().await, &[NewEvent::keyed(&unique_name("topic"), "k", 1)]).await;
    let mut config = env.config();
    config.kafka.brokers = format!("127.0.0.1:{}", free_port());
    config.kafka.startup_timeout = std::time::Duration::from_secs(4);
    let mut relay = spawn_relay_process(&env, &config);
    let db = env.client().await;
    let locks = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = \
                 (SELECT oid FROM pg_database WHERE datname = current_database())";
    let mut held_while_waiting = 0;
    let deadline = std::time::Instant::now() + PATIENCE;
    while relay.is_running() && std::time::Instant::now() < deadline {
        held_while_waiting += db.query_one(locks, &[]).await.unwrap().get::<_, i64>(0);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!relay.is_running(), "still waiting for the broker after {PATIENCE:?}:\n{}", relay.log());
    assert_eq!(relay.wait().await, Some(2), "log:\n{}", relay.log());
    let log = relay.log();
    assert!(log.contains("kafka.brokers") && log.contains("no broker answered within 4s"), "{log}");
    assert_eq!(held_while_waiting, 0, "a relay that cannot produce takes no shards");
    assert_eq!(unpublished_count(&db).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_grace_period_ends_the_relay_exits_and_leaves_the_batch_unpublished() {
    let Some((env, mut relay)) = relay_with_a_stuck_batch(std::time::Duration::from_secs(1)).await else {
        return;
    };
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(4), "a batch abandoned is not a clean stop; log:\n{}", relay.log());
    let log = relay.log();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains("shutdown grace period over") && last.contains("delivery reports of 1 records outstanding"),
        "the last line says what was abandoned:\n{log}"
    );
    assert_eq!(unpublished_count(&env.client().await).await, 1, "an unacknowledged row is never marked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_without_waiting_for_the_grace_period() {
    let Some((env, mut relay)) = relay_with_a_stuck_batch(std::time::Duration::from_secs(600)).await else {
        return;
    };
    relay.signal(libc::SIGTERM);
    wait_until(PATIENCE, "the first signal to be noticed", || async { relay.log().contains("shutdown requested") })
        .await;
    relay.signal(libc::SIGINT);
    assert_eq!(relay.wait().await, Some(130), "log:\n{}", relay.log());
    assert_eq!(unpublished_count(&env.client().await).await, 1);
}

/// Issue 16: after `kill -9`, the killed relay's statement kept running in PostgreSQL (a claim
/// waiting on a lock held its shard locks for the whole wait). PostgreSQL now checks the
/// relay's socket during a statement and cancels it once the relay is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_while_its_statement_waits_leaves_nothing_running_in_postgresql() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let mut locker = env.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE").await.unwrap();

    let relay = spawn_relay_process(&env, &env.config());
    let db = env.client().await;
    let waiting = "SELECT pid FROM pg_stat_activity \
                   WHERE application_name LIKE 'outbox-relay%' AND wait_event_type = 'Lock'";
    wait_until(PATIENCE, "the relay's statement to wait on the lock", || async {
        !db.query(waiting, &[]).await.unwrap().is_empty()
    })
    .await;
    relay.signal(libc::SIGKILL);
    // Without the check, the statement waits as long as the lock is held: here, forever.
    wait_until(std::time::Duration::from_secs(20), "the killed relay's statements to end", || async {
        db.query(waiting, &[]).await.unwrap().is_empty()
    })
    .await;
    lock.rollback().await.unwrap();
}

/// Starts a transaction on a connection of its own that locks the outbox rows matching `filter`
/// (`SELECT ... FOR UPDATE`, as an application or an operator's session might) and keeps them
/// locked until the connection rolls back; returns the connection and its backend pid.
async fn lock_rows(env: &TestEnv, filter: &str) -> (tokio_postgres::Client, i32) {
    let locker = env.client().await;
    locker.batch_execute(&format!("BEGIN; SELECT * FROM outbox WHERE {filter} FOR UPDATE")).await.unwrap();
    let pid = locker.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    (locker, pid)
}

/// Backend pids of the relay's sessions whose statement waits on a lock.
async fn relay_sessions_waiting_on_a_lock(db: &tokio_postgres::Client) -> Vec<i32> {
    let waiting = "SELECT pid FROM pg_stat_activity \
                   WHERE application_name LIKE 'outbox-relay%' AND wait_event_type = 'Lock'";
    db.query(waiting, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// Ten rows of ten keys, two of them locked by another session before the relay starts: the
/// claim (a plain read) is not held up by row locks, so the relay publishes all ten, and then
/// its mark waits for the two locked rows.
async fn relay_whose_mark_waits_on_a_row_lock(
    env: &TestEnv,
    config: &outbox_relay::Config,
    topic: &str,
) -> (RelayProcess, tokio_postgres::Client, i32) {
    let db = env.client().await;
    let events: Vec<NewEvent> = (0..10).map(|n| NewEvent::keyed(topic, &format!("k{n}"), n)).collect();
    insert_events(&db, &events).await;
    let (locker, locker_pid) = lock_rows(env, "key IN ('k3', 'k7')").await;
    let relay = spawn_relay_process(env, config);
    consume(&env.brokers, topic, 10).await;
    wait_until(PATIENCE, "the relay's mark to wait on the locked rows", || async {
        !relay_sessions_waiting_on_a_lock(&db).await.is_empty()
    })
    .await;
    (relay, locker, locker_pid)
}

/// Issue 21: another session's `SELECT ... FOR UPDATE` on rows the relay had published kept
/// its mark waiting, and SIGTERM took as long as the lock was held (76 s against a 10 s grace
/// period), then exited 0. The grace period now bounds every wait, the relay's statement is
/// cancelled in PostgreSQL, and the exit status and last line say the batch was abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_mark_waits_on_another_sessions_row_lock_exits_within_the_grace_period_with_status_4() {
    const GRACE: std::time::Duration = std::time::Duration::from_secs(3);
    // Sending the cancel request and exiting.
    const MARGIN: std::time::Duration = std::time::Duration::from_secs(3);
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let mut config = env.config();
    config.relay.shutdown_timeout = GRACE;
    let db = env.client().await;
    let (mut relay, locker, locker_pid) = relay_whose_mark_waits_on_a_row_lock(&env, &config, &topic).await;

    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_within(GRACE + MARGIN).await, Some(4), "log:\n{}", relay.log());
    let log = relay.log();
    let last = log.lines().last().unwrap_or_default();
    assert!(last.contains("shutdown grace period over"), "the last line says the batch was abandoned:\n{log}");
    assert!(last.contains(&format!("held by backend pid {locker_pid}")), "and names the blocking session:\n{log}");
    wait_until(std::time::Duration::from_secs(2), "the relay's statement to be cancelled", || async {
        relay_sessions_waiting_on_a_lock(&db).await.is_empty()
    })
    .await;
    let locked_published: i64 = db
        .query_one("SELECT count(*) FROM outbox WHERE key IN ('k3', 'k7') AND published_at IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(locked_published, 0, "the locked rows stay unpublished");

    // At least once: once the lock is gone, the next run publishes every row (some again).
    locker.batch_execute("ROLLBACK").await.unwrap();
    let mut rerun = spawn_relay_process(&env, &config);
    wait_until(PATIENCE, "every row marked", || async { unpublished_count(&db).await == 0 }).await;
    rerun.signal(libc::SIGTERM);
    assert_eq!(rerun.wait().await, Some(0), "a clean stop exits 0; log:\n{}", rerun.log());
    let on_topic: HashSet<String> = read_topic(&env.brokers, &topic).await.iter().map(|r| r.event_id()).collect();
    assert_eq!(on_topic, all_event_ids(&db).await, "every row is on the topic");
}

/// Issue 21: with a 20 s liveness timeout, `/healthz` failed while the relay's mark waited on
/// another session's row lock, so an orchestrator restarts the relay into the same lock. The
/// wait is now reported instead: `/readyz` and a warning name the blocking session, and the
/// relay stays alive for as long as the lock is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_waiting_on_another_sessions_lock_stays_alive_and_names_the_blocking_session() {
    const LIVENESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
    let env = TestEnv::start().await;
    env.migrate().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let topic = env.create_topic(1).await;
    let mut config = env.config();
    config.metrics.listen = addr.clone();
    config.health.liveness_timeout = LIVENESS_TIMEOUT;
    let db = env.client().await;
    let (mut relay, locker, locker_pid) = relay_whose_mark_waits_on_a_row_lock(&env, &config, &topic).await;
    let waiting_since = std::time::Instant::now();

    // The wait itself, three liveness timeouts long, is the scenario: alive throughout.
    while waiting_since.elapsed() < 3 * LIVENESS_TIMEOUT {
        let (status, body) = http_get(&addr, "/healthz").await;
        assert_eq!(status, 200, "{body} after {:?} of waiting; log:\n{}", waiting_since.elapsed(), relay.log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!relay_sessions_waiting_on_a_lock(&db).await.is_empty(), "still waiting on the lock");
    let blocker = format!("held by backend pid {locker_pid}");
    let (status, reasons) = http_get(&addr, "/readyz").await;
    assert!(status == 503 && reasons.contains(&blocker), "/readyz names the blocking session: {reasons}");
    let log = relay.log();
    assert!(log.contains("WARN") && log.contains(&blocker), "so does a warning:\n{log}");

    locker.batch_execute("ROLLBACK").await.unwrap();
    wait_until(PATIENCE, "the rows marked and /readyz passing once the lock is released", || async {
        unpublished_count(&db).await == 0 && http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "log:\n{}", relay.log());
}
