//! The guarantees on a three-node Apache Kafka cluster (replication factor 3,
//! `min.insync.replicas` 2, the relay's `acks=all`), one fault per test, each on a fresh
//! cluster: a partition leader killed, a rolling restart, two brokers stopped or killed, the active KRaft
//! controller killed, the relay itself killed twelve times, and one partition below its
//! `min.insync.replicas` while the others are healthy. After each: every row is on the
//! topic, no row was marked before the broker acknowledged it, each key's first copies are in
//! order, and no row was charged with the cluster's fault (no attempt counted, none failed).
//!
//! The in-process relays run librdkafka with `debug=msg`, and the tests print the produce
//! errors the brokers returned during the fault (`broker errors seen: ...`), which librdkafka
//! retried without the relay seeing them.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;
use outbox_relay::config::Delivery;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::task::JoinHandle;

const NODES: usize = 3;

/// Failover within seconds: the controller fences a broker that missed its heartbeats for 4 s
/// (default 9 s) and elects new leaders then. Long enough that a loaded 2-core machine running
/// three JVMs does not fence a live broker.
const FAST_FAILOVER: &[&str] = &["broker.heartbeat.interval.ms=500", "broker.session.timeout.ms=4000"];

const KEYS: usize = 100;
const BATCH: usize = 1_000;

/// How long the two-brokers-down outage lasts.
const OUTAGE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The faults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_of_a_busy_partition_killed_mid_drain_loses_nothing_and_charges_no_row() {
    let figures = the_leader_of_partition_0_killed(Delivery::AtLeastOnce, Victim::Topic).await;
    eprintln!("at least once: {figures}");
}

/// With exactly-once delivery the same kill shows read-committed consumers each row once:
/// transactions the failover broke are aborted and go out again, uncharged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_of_a_busy_partition_killed_mid_transaction_shows_read_committed_consumers_each_row_once() {
    let figures = the_leader_of_partition_0_killed(Delivery::ExactlyOnce, Victim::Topic).await;
    assert_eq!(figures.duplicated, 0, "read_committed consumers see each row once: {figures}");
}

/// The leader of the progress topic's partition killed mid-drain: every transaction writes a
/// progress record there, so each one in flight breaks; they abort and go out again, and
/// read_committed consumers see each row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_of_the_progress_topic_killed_mid_transaction_shows_read_committed_consumers_each_row_once() {
    let figures = the_leader_of_partition_0_killed(Delivery::ExactlyOnce, Victim::ProgressTopic).await;
    assert_eq!(figures.duplicated, 0, "read_committed consumers see each row once: {figures}");
}

/// Whose partition 0 loses its leader.
#[derive(PartialEq)]
enum Victim {
    /// The topic the rows go to.
    Topic,
    /// With exactly-once delivery, the progress topic.
    ProgressTopic,
}

/// Kills the leader of partition 0 of `victim` mid-drain, restarts it, and checks the
/// guarantees.
async fn the_leader_of_partition_0_killed(delivery: Delivery, victim: Victim) -> Figures {
    let Drain { log, mut env, topic, db, relay, writer, progress_topic } = drain_under_way_with(50_000, delivery).await;
    let killed_topic = match victim {
        Victim::Topic => topic.clone(),
        Victim::ProgressTopic => progress_topic.expect("exactly-once delivery has a progress topic"),
    };

    let leader = partition_leader(&env.brokers, &killed_topic, 0);
    let marked_at_kill = marked_count(&db).await;
    cluster(&mut env).kill(leader);
    let killed = Instant::now();
    wait_until(PATIENCE, "a new leader of partition 0 and the drain going on", || async {
        partition_leader(&env.brokers, &killed_topic, 0) != leader
            && marked_count(&db).await > marked_at_kill + 2 * BATCH as i64
    })
    .await;
    let failover = killed.elapsed();
    cluster(&mut env).restart(leader);
    wait_in_sync(&env.brokers, &topic).await;
    let back_in_sync = killed.elapsed();

    let rows = writer.stop().await;
    wait_until(PATIENCE, "every row marked", || async { unpublished_count(&db).await == 0 }).await;
    let figures = assert_guarantees(&env, &topic, &relay).await;
    eprintln!(
        "leader {leader} of partition 0 killed with {marked_at_kill} rows marked; drain resumed {failover:.1?} after \
         the kill, node back in sync after {back_in_sync:.1?}; {rows} rows, {figures}; broker errors seen: {:?}",
        broker_errors(&log)
    );
    relay.stop().await.expect("clean stop");
    figures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_broker_while_a_writer_inserts_loses_nothing_and_charges_no_row() {
    let Drain { log, mut env, topic, db, relay, writer, .. } = drain_under_way(30_000).await;

    let started = Instant::now();
    for node in 1..=NODES {
        let marked_before = marked_count(&db).await;
        cluster(&mut env).stop(node);
        cluster(&mut env).restart(node);
        wait_in_sync(&env.brokers, &topic).await;
        eprintln!(
            "node {node} restarted and back in sync at {:.1?}; {} rows marked meanwhile",
            started.elapsed(),
            marked_count(&db).await - marked_before
        );
    }

    let rows = writer.stop().await;
    wait_until(PATIENCE, "every row marked", || async { unpublished_count(&db).await == 0 }).await;
    let figures = assert_guarantees(&env, &topic, &relay).await;
    eprintln!(
        "rolling restart took {:.1?}; {rows} rows, {figures}; broker errors seen: {:?}",
        started.elapsed(),
        broker_errors(&log)
    );
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_brokers_stopped_for_twenty_seconds_the_relay_waits_unready_marks_nothing_and_resumes_alone() {
    two_of_three_brokers_down(TakeDown::Stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_brokers_killed_at_once_for_twenty_seconds_the_relay_waits_unready_marks_nothing_and_resumes_alone()
 {
    two_of_three_brokers_down(TakeDown::Kill).await;
}

/// How two of the three nodes go away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TakeDown {
    /// One after the other, each in a controlled shutdown (SIGTERM): the partitions' leadership
    /// and in-sync replicas move to the node left, which refuses writes for want of a second
    /// replica (`NOT_ENOUGH_REPLICAS`).
    Stop,
    /// Both at once with SIGKILL: the controller quorum is lost before either is fenced, so no
    /// leader is elected and no in-sync replica set shrinks; the node left holds each acks=all
    /// write for replicas that never answer, until the request times out (`REQUEST_TIMED_OUT`).
    Kill,
}

async fn two_of_three_brokers_down(how: TakeDown) {
    use rdkafka::error::RDKafkaErrorCode;
    let log = capture_client_log();
    let mut env = TestEnv::start_with_cluster(NODES, FAST_FAILOVER).await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    // For the test's own writes during the outage, which must not land among the relay's.
    let probe_topic = env.create_topic(1).await;
    let db = env.client().await;
    insert_backlog(&db, &topic, 0..30_000, KEYS).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut config = relay_config(&env);
    config.metrics.listen = addr.clone();
    config.health.readiness_window = Duration::from_secs(2);
    // Requests held by the broker time out, and are sent again, several times over the outage.
    config.kafka.properties.insert("request.timeout.ms".into(), "5000".into());
    let relay = env.spawn_relay(config);
    wait_until(PATIENCE, "the drain to be under way", || async { marked_count(&db).await >= 5 * BATCH as i64 }).await;
    wait_until(PATIENCE, "/readyz to pass", || async { http_get(&addr, "/readyz").await.0 == 200 }).await;

    let left = match how {
        TakeDown::Stop => NODES,
        // The probe's partition stays led, so that it meets the held write.
        TakeDown::Kill => partition_leader(&env.brokers, &probe_topic, 0),
    };
    let (first, second) = match (1..=NODES).filter(|n| *n != left).collect::<Vec<_>>()[..] {
        [first, second] => (first, second),
        _ => unreachable!("three nodes"),
    };
    let expected = match how {
        TakeDown::Stop => {
            cluster(&mut env).stop(first);
            cluster(&mut env).stop(second);
            RDKafkaErrorCode::NotEnoughReplicas
        }
        TakeDown::Kill => {
            cluster(&mut env).kill(first);
            cluster(&mut env).kill(second);
            RDKafkaErrorCode::RequestTimedOut
        }
    };
    let outage_started = Instant::now();
    // Rows written during the outage: the backlog may be drained already (it takes the relay
    // about a second), and without rows to publish the relay has nothing to be unready about.
    insert_backlog(&db, &topic, 30_000..31_000, KEYS).await;
    assert_eq!(
        probe_produce(&env.brokers, &probe_topic).await,
        Some(expected),
        "node {left} alone answers an acks=all write with {expected:?}"
    );
    wait_until(PATIENCE, "/readyz to fail", || async { http_get(&addr, "/readyz").await.0 == 503 }).await;
    // Rows the brokers acknowledged just before the outage may be marked once the batch's other
    // records are set aside (relay.stalled_partition_after); from then on nothing is.
    wait_until(PATIENCE, "the unacknowledged records to be set aside", || async {
        set_aside_records(&relay.metrics) > 0
    })
    .await;
    let marked_in_outage = marked_event_ids(&db).await;
    // The outage itself: its length is the scenario, not a wait for a condition.
    tokio::time::sleep(OUTAGE.saturating_sub(outage_started.elapsed())).await;
    let (status, reasons) = http_get(&addr, "/readyz").await;
    assert_eq!(status, 503, "still unready at the end of the outage: {reasons}");
    assert_eq!(http_get(&addr, "/healthz").await.0, 200, "a relay waiting for the brokers is alive");
    assert_eq!(marked_event_ids(&db).await, marked_in_outage, "nothing is marked while writes lack replicas");
    let pending = unpublished_count(&db).await;
    assert!(pending > 0, "the rows wait, unpublished");
    assert!(!relay.is_finished(), "the outage does not end the relay");
    assert_no_row_charged(&db, &relay).await;

    cluster(&mut env).restart(first);
    // Two replicas in sync again: writes are accepted from here on.
    let restarted = outage_started.elapsed();
    cluster(&mut env).restart(second);
    wait_until(PATIENCE, "every row marked", || async { unpublished_count(&db).await == 0 }).await;
    let resumed = outage_started.elapsed();
    wait_until(PATIENCE, "/readyz to pass again", || async { http_get(&addr, "/readyz").await.0 == 200 }).await;
    let figures = assert_guarantees(&env, &topic, &relay).await;
    eprintln!(
        "nodes {first} and {second} down ({how:?}), {} rows marked and {pending} pending; node {first} served again \
         {restarted:.1?} after the outage began, every row marked after {resumed:.1?}; {figures}; broker errors \
         seen: {:?}",
        marked_in_outage.len(),
        broker_errors(&log)
    );
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_controller_killed_mid_drain_loses_nothing_and_charges_no_row() {
    let Drain { log, mut env, topic, db, relay, writer, .. } = drain_under_way(50_000).await;

    let controller = cluster(&mut env).active_controller().expect("an active controller");
    let led: Vec<i32> = (0..3).filter(|p| partition_leader(&env.brokers, &topic, *p) == controller).collect();
    let marked_at_kill = marked_count(&db).await;
    cluster(&mut env).kill(controller);
    let killed = Instant::now();
    wait_until(PATIENCE, "another node to become the active controller", || async {
        env.broker.as_ref().and_then(Kafka::active_controller).is_some_and(|c| c != controller)
    })
    .await;
    let elected = killed.elapsed();
    let new_controller = cluster(&mut env).active_controller();
    wait_until(PATIENCE, "the drain to go on without it", || async {
        marked_count(&db).await > marked_at_kill + 2 * BATCH as i64
    })
    .await;
    let failover = killed.elapsed();
    cluster(&mut env).restart(controller);
    wait_in_sync(&env.brokers, &topic).await;

    let rows = writer.stop().await;
    wait_until(PATIENCE, "every row marked", || async { unpublished_count(&db).await == 0 }).await;
    let figures = assert_guarantees(&env, &topic, &relay).await;
    eprintln!(
        "controller {controller} (leader of partitions {led:?}) killed with {marked_at_kill} rows marked; node \
         {new_controller:?} elected after {elected:.1?}, drain resumed after {failover:.1?}; {rows} rows, \
         {figures}; broker errors seen: {:?}",
        broker_errors(&log)
    );
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_kill_nines_of_the_relay_during_a_fifty_thousand_row_drain_on_the_cluster_lose_nothing() {
    const ROWS: usize = 50_000;
    const BACKLOG: usize = 40_000;
    const CRASHES: usize = 12;
    let env = TestEnv::start_with_cluster(NODES, FAST_FAILOVER).await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    let db = env.client().await;
    let mut config = env.config();
    config.relay.batch_size = BATCH;
    insert_backlog(&db, &topic, 0..BACKLOG, KEYS).await;
    // The application writes the rest while the relay is being killed.
    let writer_db = env.client().await;
    let writer_topic = topic.clone();
    let writer = tokio::spawn(async move {
        for start in (BACKLOG..ROWS).step_by(250) {
            insert_backlog(&writer_db, &writer_topic, start..start + 250, KEYS).await;
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    });

    let started = Instant::now();
    let in_flight_at_a_crash = kill_the_relay_at_random_moments(&env, &config, &db, CRASHES).await;
    writer.await.expect("writer");
    // Up and leading before SIGTERM (the rows may all be marked already, by the last relay
    // killed): a signal before the handler is installed kills the process instead.
    drain_then_stop(&env, &config).await;

    let records = read_topic(&env.brokers, &topic).await;
    let distinct: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    let table = all_event_ids(&db).await;
    assert_eq!(table.len(), ROWS);
    assert_eq!(distinct, table, "every row reached the topic: nothing lost, nothing marked unacknowledged");
    let duplicated = identical_duplicates(&records);
    assert!(duplicated.is_subset(&in_flight_at_a_crash), "duplicates are only rows unmarked at a crash");
    assert!(
        records.len() - ROWS <= CRASHES * 2 * BATCH,
        "at most two batches per crash: {} extra copies",
        records.len() - ROWS
    );
    assert_first_copies_in_key_order(&records);
    assert_rows_uncharged(&db).await;
    eprintln!(
        "{CRASHES} crashes in {:.1?}: {} records for {ROWS} rows, {} event ids duplicated",
        started.elapsed(),
        records.len(),
        duplicated.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The cluster of a test started with [`TestEnv::start_with_cluster`].
fn cluster(env: &mut TestEnv) -> &mut Kafka {
    env.broker.as_mut().expect("the test's own cluster")
}

/// The relay's configuration for these tests: batches of [`BATCH`], and librdkafka's message
/// debug log on (see [`capture_client_log`]).
fn relay_config(env: &TestEnv) -> outbox_relay::Config {
    let mut config = env.config();
    config.relay.batch_size = BATCH;
    config.kafka.properties.insert("debug".into(), "msg".into());
    config
}

/// Sends this process's log (the in-process relay's, and librdkafka's debug lines) to a file,
/// kept only if the test fails.
/// A three-node cluster, a topic of three partitions with a backlog of `rows` rows, a relay
/// draining it (some batches marked already) and a writer adding `rows` more meanwhile.
struct Drain {
    log: ClientLog,
    env: TestEnv,
    topic: String,
    db: tokio_postgres::Client,
    relay: RunningRelay,
    writer: Writer,
    /// With exactly-once delivery, its progress topic.
    progress_topic: Option<String>,
}

async fn drain_under_way(rows: usize) -> Drain {
    drain_under_way_with(rows, Delivery::AtLeastOnce).await
}

/// As [`drain_under_way`], with `delivery` (exactly-once with a compacted progress topic of
/// three replicas).
async fn drain_under_way_with(rows: usize, delivery: Delivery) -> Drain {
    let log = capture_client_log();
    let env = TestEnv::start_with_cluster(NODES, FAST_FAILOVER).await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    let db = env.client().await;
    insert_backlog(&db, &topic, 0..rows, KEYS).await;
    let mut config = relay_config(&env);
    config.kafka.delivery = delivery;
    let mut progress_topic = None;
    if delivery == Delivery::ExactlyOnce {
        let progress = create_topic_with(&env.brokers, 1, &[("cleanup.policy", "compact")]).await;
        config.kafka.exactly_once.progress_topic = progress.clone();
        config.kafka.exactly_once.transactional_id_prefix = unique_name("relay");
        progress_topic = Some(progress);
    }
    let relay = env.spawn_relay(config);
    let writer = Writer::start(&env, &topic, rows).await;
    wait_until(PATIENCE, "the drain to be under way", || async { marked_count(&db).await >= 5 * BATCH as i64 }).await;
    Drain { log, env, topic, db, relay, writer, progress_topic }
}

fn capture_client_log() -> ClientLog {
    let path = std::env::temp_dir().join(format!("{}.log", unique_name("outbox-cluster-test")));
    let file = std::fs::File::create(&path).expect("log file");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("outbox_relay=info,librdkafka=debug"))
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    ClientLog(path)
}

/// The file [`capture_client_log`] writes; removed when the test passes.
struct ClientLog(PathBuf);

impl Drop for ClientLog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the relay's and librdkafka's log is kept at {}", self.0.display());
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// The errors librdkafka logged, counted by kind: a produce request's (`... encountered error:
/// ERROR (actions ...)`, which it retried) and the client's own (`Kafka client error ... error=`,
/// such as a refused connection).
fn broker_errors(log: &ClientLog) -> BTreeMap<String, usize> {
    let mut errors = BTreeMap::new();
    for line in std::fs::read_to_string(&log.0).unwrap_or_default().lines() {
        let error = if let Some((_, rest)) = line.split_once("encountered error: ") {
            rest.split(" (actions").next().unwrap_or(rest)
        } else if let (true, Some((_, rest))) = (line.contains("Kafka client error"), line.split_once(" error=")) {
            rest
        } else {
            continue;
        };
        *errors.entry(error.to_owned()).or_default() += 1;
    }
    errors
}

/// Inserts events in transactions of 20, every 50 ms, until stopped.
struct Writer {
    writing: Arc<AtomicBool>,
    task: JoinHandle<usize>,
}

impl Writer {
    /// Starts writing events `from`, `from + 1`, ... of `topic`.
    async fn start(env: &TestEnv, topic: &str, from: usize) -> Writer {
        let writing = Arc::new(AtomicBool::new(true));
        let (db, topic, flag) = (env.client().await, topic.to_owned(), writing.clone());
        let task = tokio::spawn(async move {
            let mut n = from;
            while flag.load(Ordering::Relaxed) {
                insert_backlog(&db, &topic, n..n + 20, KEYS).await;
                n += 20;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            n
        });
        Writer { writing, task }
    }

    /// Stops writing; returns how many events the table then holds.
    async fn stop(self) -> usize {
        self.writing.store(false, Ordering::Relaxed);
        self.task.await.expect("writer")
    }
}

async fn marked_count(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL", &[]).await.expect("count").get(0)
}

/// Each partition of `topic` as the cluster's metadata shows it: (leader, in-sync replicas);
/// the leader is -1 while there is none.
fn partitions(brokers: &str, topic: &str) -> Vec<(i32, usize)> {
    let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().expect("client");
    let Ok(metadata) = client.fetch_metadata(Some(topic), Duration::from_secs(5)) else { return Vec::new() };
    let mut partitions: Vec<_> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| (p.id(), p.leader(), p.isr().len())))
        .collect();
    partitions.sort_unstable();
    partitions.into_iter().map(|(_, leader, isr)| (leader, isr)).collect()
}

/// The node that leads `partition` of `topic`.
fn partition_leader(brokers: &str, topic: &str, partition: i32) -> usize {
    let leader = partitions(brokers, topic).get(partition as usize).map(|(leader, _)| *leader).unwrap_or(-1);
    usize::try_from(leader).unwrap_or(0)
}

/// Waits until every partition of `topic` has a leader and all three replicas in sync.
async fn wait_in_sync(brokers: &str, topic: &str) {
    wait_until(PATIENCE, "every replica in sync", || async {
        let partitions = partitions(brokers, topic);
        !partitions.is_empty() && partitions.iter().all(|(leader, isr)| *leader >= 0 && *isr == NODES)
    })
    .await;
}

/// Produces one record to `topic` with acks=all and no retry, and returns the broker's error
/// (None when it was acknowledged): what the relay's producer is told at that moment.
async fn probe_produce(brokers: &str, topic: &str) -> Option<rdkafka::error::RDKafkaErrorCode> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "false")
        .set("retries", "0")
        // A write the broker holds for replicas is answered within 3 s.
        .set("request.timeout.ms", "3000")
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer");
    let record = FutureRecord::<str, str>::to(topic).partition(0).key("probe").payload("{}");
    match producer.send(record, Duration::from_secs(10)).await {
        Ok(_) => None,
        Err((e, _)) => e.rdkafka_error_code(),
    }
}

/// What one run left on the topic.
struct Figures {
    records: usize,
    duplicated: usize,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} records on the topic, {} event ids duplicated", self.records, self.duplicated)
    }
}

/// Every row on the topic (none lost; none marked that the broker does not have), each key's
/// first copies in order, duplicates whole copies, and no row charged with the fault.
async fn assert_guarantees(env: &TestEnv, topic: &str, relay: &RunningRelay) -> Figures {
    let db = env.client().await;
    let records = read_topic(&env.brokers, topic).await;
    let on_topic: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    assert_eq!(on_topic, all_event_ids(&db).await, "every row on the topic, and no record of another");
    assert_eq!(marked_event_ids(&db).await, on_topic, "every row marked, each on the topic");
    let duplicated = identical_duplicates(&records);
    assert_first_copies_in_key_order(&records);
    assert_no_row_charged(&db, relay).await;
    Figures { records: records.len(), duplicated: duplicated.len() }
}

/// No row was charged with the cluster's fault: no attempt counted toward `relay.max_attempts`,
/// none marked failed (so none parked), and the relay counted no row retry.
async fn assert_no_row_charged(db: &tokio_postgres::Client, relay: &RunningRelay) {
    assert_rows_uncharged(db).await;
    let errors: Vec<(&str, u64)> = outbox_relay::service::metrics::PUBLISH_ERROR_REASONS
        .iter()
        .map(|reason| (*reason, relay.metrics.publish_errors.with_label_values(&[reason]).get()))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(
        relay.metrics.retries.with_label_values(&["row"]).get(),
        0,
        "no row retried for its own sake; delivery errors: {errors:?}"
    );
    if !errors.is_empty() {
        eprintln!("delivery errors the relay saw (outages, not the rows'): {errors:?}");
    }
}

/// No row has a counted attempt or a failed-at time.
async fn assert_rows_uncharged(db: &tokio_postgres::Client) {
    let row = db
        .query_one(
            // Published rows keep no error (the mark clears it): errors shown are pending rows'.
            "SELECT count(*) FILTER (WHERE attempts > 0), count(*) FILTER (WHERE failed_at IS NOT NULL), \
             string_agg(DISTINCT last_error, ' | ') FROM outbox",
            &[],
        )
        .await
        .expect("row state");
    let (charged, failed, errors): (i64, i64, Option<String>) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((charged, failed), (0, 0), "rows charged with an attempt / failed; their errors: {errors:?}");
    if let Some(errors) = errors {
        eprintln!("outage errors recorded on rows still pending (no attempt counted): {errors}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_below_min_insync_replicas_holds_back_only_its_own_rows() {
    one_partition_below_min_insync_replicas(Delivery::AtLeastOnce).await;
}

/// With exactly-once delivery the transaction waiting on the narrow partition is aborted after
/// `relay.stalled_partition_after`, the rows of its keys are held out of the next claims, and
/// the healthy rows go out in the next transactions: one partition does not stall the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_below_min_insync_replicas_holds_back_only_its_own_rows_in_transactions() {
    one_partition_below_min_insync_replicas(Delivery::ExactlyOnce).await;
}

async fn one_partition_below_min_insync_replicas(delivery: Delivery) {
    let _log = capture_client_log();
    let mut env = TestEnv::start_with_cluster(NODES, FAST_FAILOVER).await;
    env.migrate().await;
    let healthy = env.create_topic(3).await;
    // A partition on nodes 1 and 2 only: with node 2 stopped it has one in-sync replica, below
    // its min.insync.replicas of 2, while the healthy topic (on all three nodes) keeps two.
    let narrow = unique_name("narrow");
    {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &env.brokers).create().expect("admin client");
        let topic = NewTopic::new(&narrow, 1, TopicReplication::Variable(&[&[1, 2]])).set("min.insync.replicas", "2");
        for result in admin.create_topics(&[topic], &AdminOptions::new()).await.expect("create topic") {
            result.unwrap_or_else(|(topic, e)| panic!("create {topic}: {e}"));
        }
    }
    let db = env.client().await;
    let mut config = relay_config(&env);
    config.relay.stalled_partition_after = Duration::from_secs(1);
    if delivery == Delivery::ExactlyOnce {
        config.kafka.delivery = delivery;
        config.kafka.exactly_once.progress_topic =
            create_topic_with(&env.brokers, 1, &[("cleanup.policy", "compact")]).await;
        config.kafka.exactly_once.transactional_id_prefix = unique_name("relay");
    }
    let metrics = format!("127.0.0.1:{}", free_port());
    config.metrics.listen = metrics.clone();
    let relay = env.spawn_relay(config);
    insert_events(&db, &[NewEvent::keyed(&healthy, "h-0", 0), NewEvent::keyed(&narrow, "n-0", 0)]).await;
    wait_until(PATIENCE, "both topics in use", || async { unpublished_count(&db).await == 0 }).await;

    cluster(&mut env).stop(2);
    let events: Vec<NewEvent> = (1..=300)
        .map(|n| match n % 3 {
            0 => NewEvent::keyed(&narrow, &format!("n-{}", n % 5), n),
            _ => NewEvent::keyed(&healthy, &format!("h-{}", n % 10), n),
        })
        .collect();
    insert_events(&db, &events).await;
    let published = |topic: String| {
        let db = &db;
        async move {
            db.query_one("SELECT count(*) FROM outbox WHERE topic = $1 AND published_at IS NOT NULL", &[&topic])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    wait_until(PATIENCE, "every healthy row published while the narrow partition cannot be written", || async {
        published(healthy.clone()).await == 201
    })
    .await;
    assert_eq!(published(narrow.clone()).await, 1, "nothing of the narrow partition is published meanwhile");
    let charged: i64 = db.query_one("SELECT count(*) FROM outbox WHERE attempts > 0", &[]).await.unwrap().get(0);
    assert_eq!(charged, 0, "no row is charged with the cluster's fault");
    let (_, body) = crate::support::http_get(&metrics, "/readyz").await;
    assert!(body.contains(&format!("topic {narrow} partition 0")), "/readyz names the partition: {body}");

    cluster(&mut env).restart(2);
    wait_until(PATIENCE, "the narrow partition's rows published once it has its replicas back", || async {
        unpublished_count(&db).await == 0
    })
    .await;
    // Read committed: with exactly-once, the aborted copies are not seen.
    for topic in [&healthy, &narrow] {
        let records = read_topic(&env.brokers, topic).await;
        assert!(identical_duplicates(&records).is_empty(), "{topic}: no row published twice");
        assert_first_copies_in_key_order(&records);
    }
    assert_eq!(read_topic(&env.brokers, &narrow).await.len(), 101);
    if delivery == Delivery::ExactlyOnce {
        assert_eq!(read_topic(&env.brokers, &healthy).await.len(), 201, "each healthy row once");
    }
    relay.stop().await.expect("clean stop");
}
