//! `kafka.delivery = "exactly_once"`: consumers reading committed data see every row once,
//! whatever the relay's crashes and takeovers, while those reading uncommitted data see the
//! aborted copies; and a progress topic that cannot keep the shards' progress stops the relay
//! at start.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::*;
use outbox_relay::Config;
use outbox_relay::config::Delivery;

/// A configuration with exactly-once delivery, its own compacted progress topic and its own
/// transactional ids (tests share the broker).
async fn exactly_once(env: &TestEnv) -> Config {
    let mut config = env.config();
    config.kafka.delivery = Delivery::ExactlyOnce;
    config.kafka.exactly_once.progress_topic =
        create_topic_with(&env.brokers, 1, &[("cleanup.policy", "compact")]).await;
    config.kafka.exactly_once.transactional_id_prefix = unique_name("relay");
    config
}

/// Rows of the crash tests, and their batch size.
const ROWS: usize = 3_000;
const BATCH: usize = 500;

/// A table with a backlog of [`ROWS`] rows of seven keys for a topic of three partitions, and a
/// relay configuration with exactly-once delivery and batches of [`BATCH`].
async fn backlog_with_exactly_once() -> (TestEnv, String, tokio_postgres::Client, Config) {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    let db = env.client().await;
    insert_backlog(&db, &topic, 0..ROWS, 7).await;
    let mut config = exactly_once(&env).await;
    config.relay.batch_size = BATCH;
    (env, topic, db, config)
}

/// Checks that read-committed consumers see each row of the table exactly once, in key order.
async fn assert_each_row_once_to_read_committed(env: &TestEnv, db: &tokio_postgres::Client, topic: &str) {
    let records = read_topic_as(&env.brokers, topic, Isolation::ReadCommitted).await;
    let on_topic: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    assert_eq!(on_topic, all_event_ids(db).await, "every row reached read_committed consumers");
    assert_eq!(records.len(), on_topic.len(), "and none twice: {} duplicates", records.len() - on_topic.len());
    assert_first_copies_in_key_order(&records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_reaches_read_committed_consumers_once_in_transactions() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    let db = env.client().await;
    insert_backlog(&db, &topic, 0..2_000, 7).await;
    let mut config = exactly_once(&env).await;
    config.relay.batch_size = 300;
    let metrics = format!("127.0.0.1:{}", free_port());
    config.metrics.listen = metrics.clone();

    let mut relay = spawn_relay_process(&env, &config);
    wait_until(PATIENCE, "every row marked", || async { unpublished_count(&db).await == 0 }).await;
    let text = scrape(&metrics).await;
    let committed = sample(&text, "outbox_relay_transactions_total{outcome=\"committed\"}").unwrap_or(0.0);
    assert!(
        committed >= 8.0,
        "one transaction per batch, seven batches at least, and one taking the shards: {committed}"
    );
    assert_eq!(sample(&text, "outbox_relay_transactions_total{outcome=\"aborted\"}"), Some(0.0));
    assert!(sample(&text, "outbox_relay_transaction_commit_seconds_count").is_some_and(|n| n == committed));
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "log:\n{}", relay.log());

    assert_each_row_once_to_read_committed(&env, &db, &topic).await;
    assert!(relay.log().contains("started the transactional producer"), "{}", relay.log());
    // Committed transactions carried the shards' progress.
    let progress = consume(&env.brokers, &config.kafka.exactly_once.progress_topic, 1).await;
    assert!(progress[0].payload_text().is_some_and(|p| p.contains("\"rows\"")), "{progress:?}");
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_commit_and_the_mark_publishes_nothing_twice() {
    let (env, topic, db, config) = backlog_with_exactly_once().await;

    // Three batches go through; the fourth is committed to Kafka, then the process dies.
    let mut relay = spawn_relay_process_with_env(&env, &config, &[("FAILPOINTS", "relay-before-mark=3*off->return")]);
    assert_eq!(relay.wait().await, None, "the relay was killed by the fault; log:\n{}", relay.log());
    assert_eq!(unmarked_event_ids(&db).await.len(), ROWS - 3 * BATCH, "three batches were marked");
    let before_restart = read_topic(&env.brokers, &topic).await;
    assert_eq!(before_restart.len(), 4 * BATCH, "the fourth batch was committed before the crash");

    let relay = drain_then_stop(&env, &config).await;
    assert!(relay.log().contains("marked the rows of the shards' last committed batches"), "{}", relay.log());
    assert_each_row_once_to_read_committed(&env, &db, &topic).await;
    let uncommitted = read_topic_as(&env.brokers, &topic, Isolation::ReadUncommitted).await;
    assert_eq!(uncommitted.len(), ROWS, "nothing was written twice, committed or not");
}

/// The crash between the commit and the mark with the other ways of running: rows deleted
/// rather than marked (`outbox.mark = "delete"`), found by polling alone (`relay.listen =
/// false`), and poison rows skipped. The repair deletes the committed rows; nothing reaches
/// read_committed consumers twice.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rows_deleted_and_no_notifications_a_crash_between_the_commit_and_the_mark_publishes_nothing_twice() {
    let (env, topic, db, mut config) = backlog_with_exactly_once().await;
    env.allow_relay_to_delete();
    config.outbox.mark = outbox_relay::config::MarkMode::Delete;
    config.relay.listen = false;
    config.relay.poll_interval = Duration::from_millis(100);
    config.relay.on_poison = outbox_relay::config::OnPoison::Skip;
    let written = all_event_ids(&db).await;

    let mut relay = spawn_relay_process_with_env(&env, &config, &[("FAILPOINTS", "relay-before-mark=3*off->return")]);
    assert_eq!(relay.wait().await, None, "the relay was killed by the fault; log:\n{}", relay.log());
    assert_eq!(all_event_ids(&db).await.len(), ROWS - 3 * BATCH, "three batches were deleted");
    assert_eq!(read_topic(&env.brokers, &topic).await.len(), 4 * BATCH, "the fourth was committed");

    let relay = drain_then_stop(&env, &config).await;
    assert!(relay.log().contains("marked the rows of the shards' last committed batches"), "{}", relay.log());
    assert!(all_event_ids(&db).await.is_empty(), "every row deleted");
    let records = read_topic_as(&env.brokers, &topic, Isolation::ReadCommitted).await;
    let on_topic: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    assert_eq!(on_topic, written, "every row reached read_committed consumers");
    assert_eq!(records.len(), written.len(), "and none twice");
    assert_first_copies_in_key_order(&records);
}

/// A batch's mark runs while the next batch's transaction does: a crash after that transaction
/// commits and before the mark leaves two committed batches unmarked. The later one's progress
/// records name the earlier one's rows too, so the repair marks both; with only its own rows
/// named, the earlier batch was published again.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_the_previous_batch_is_marked_and_the_next_committed_publishes_nothing_twice() {
    let (env, topic, db, config) = backlog_with_exactly_once().await;

    // Two batches are marked while the next ones go out; the third such mark waits 3 s while
    // the next batch commits, then the process dies.
    let failpoint = [("FAILPOINTS", "relay-before-previous-mark=2*off->return(3000)")];
    let mut relay = spawn_relay_process_with_env(&env, &config, &failpoint);
    assert_eq!(relay.wait().await, None, "the relay was killed by the fault; log:\n{}", relay.log());
    let marked = ROWS - unmarked_event_ids(&db).await.len();
    let committed = read_topic(&env.brokers, &topic).await.len();
    assert!(
        committed > marked + BATCH,
        "two batches committed and not marked, the earlier one named only with the later: {committed} committed, \
         {marked} marked"
    );

    let relay = drain_then_stop(&env, &config).await;
    assert!(relay.log().contains("marked the rows of the shards' last committed batches"), "{}", relay.log());
    assert_each_row_once_to_read_committed(&env, &db, &topic).await;
}

/// A shutdown whose grace period ends with a transaction open aborts it rather than leaving it
/// to the broker's transaction timeout, which would hold `read_committed` consumers of its
/// partitions back for that long.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_cut_short_mid_transaction_aborts_it_at_once() {
    let (env, topic, db, mut config) = backlog_with_exactly_once().await;
    config.relay.shutdown_timeout = Duration::from_secs(1);
    // A transaction's timeout far longer than the wait below: only an abort ends it in time.
    config.kafka.properties.insert("transaction.timeout.ms".into(), "300000".into());
    // The second batch's commit waits 30 s, far past the grace period.
    let failpoint = [("FAILPOINTS", "relay-delay-commit=1*off->1*return(30000)")];
    let mut relay = spawn_relay_process_with_env(&env, &config, &failpoint);
    use rdkafka::consumer::Consumer;
    let uncommitted: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("isolation.level", "read_uncommitted")
        .create()
        .expect("consumer");
    let written = |consumer: &rdkafka::consumer::BaseConsumer| -> i64 {
        (0..3).map(|p| consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)).map_or(0, |(_, high)| high)).sum()
    };
    // The second batch's records are in the log (its commit now waits): stop the relay.
    wait_until(PATIENCE, "the second batch's records written", || async { written(&uncommitted) > 2 * BATCH as i64 })
        .await;
    relay.signal(libc::SIGTERM);
    relay.wait().await;
    assert!(!relay.log().contains("could not abort the open transaction"), "{}", relay.log());

    // A read_committed consumer reaches the end of every partition at once: nothing is open.
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    for partition in 0..3 {
        let (_, stable) = consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10)).expect("watermarks");
        let (_, high) = uncommitted.fetch_watermarks(&topic, partition, Duration::from_secs(10)).expect("watermarks");
        assert_eq!(stable, high, "partition {partition}: a transaction is still open below the end");
    }
    drain_then_stop(&env, &config).await;
    assert_each_row_once_to_read_committed(&env, &db, &topic).await;
}

/// Writes `progress` under `key` to the relay's progress topic, as something other than this
/// relay would.
fn write_progress_record(
    env: &TestEnv,
    config: &Config,
    key: &str,
    progress: &outbox_relay::kafka::progress::Progress,
) {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &env.brokers).create().expect("producer");
    let topic = &config.kafka.exactly_once.progress_topic;
    let value = progress.to_json();
    producer.send(BaseRecord::<str, [u8]>::to(topic).key(key).payload(value.as_slice())).expect("send");
    producer.flush(Duration::from_secs(10)).expect("flush");
}

/// The standard table holding ten unpublished rows, an exactly-once configuration, the
/// database's name and the key of shard 0's progress records.
async fn ten_rows_and_shard_0s_progress_key() -> (TestEnv, tokio_postgres::Client, Config, String, String) {
    let env = TestEnv::start().await;
    env.migrate().await;
    let db = env.client().await;
    insert_backlog(&db, &env.create_topic(1).await, 0..10, 2).await;
    let config = exactly_once(&env).await;
    let database: String = db.query_one("SELECT current_database()::text", &[]).await.unwrap().get(0);
    let key = config.kafka.exactly_once.progress_key(&database, "public.outbox", 0);
    (env, db, config, database, key)
}

/// Progress records of another table under this relay's keys (another relay of a table of this
/// name with the same prefix, or something else writing the topic) stop the relay at start with
/// the key and the fix, never repairing rows of the other table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_records_of_another_table_under_the_relays_keys_stop_it_at_start() {
    use outbox_relay::kafka::progress::{FORMAT, Progress};
    let (env, db, config, database, key) = ten_rows_and_shard_0s_progress_key().await;
    let other = Progress {
        format: FORMAT,
        database: database.clone(),
        table: "billing.outbox".into(),
        table_oid: 1,
        server: String::new(),
        shard: 0,
        owner: String::new(),
        rows: Vec::new(),
    };
    write_progress_record(&env, &config, &key, &other);

    let (code, _, stderr) = run_relay_command(&env, &config);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(&key) && stderr.contains("billing.outbox"), "{stderr}");
    assert!(stderr.contains("kafka.exactly_once.transactional_id_prefix"), "{stderr}");
    assert_eq!(unpublished_count(&db).await, 10, "nothing published");
}

/// A relay of another PostgreSQL server whose database and table have this one's names, with
/// the same prefix, writes under this relay's keys: its record (here written as that relay
/// would, naming another server's system identifier and rows whose ids exist here) stops this
/// relay at start with the key and the fix, and none of those rows is marked here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_records_of_another_server_under_the_relays_keys_stop_it_at_start() {
    use outbox_relay::kafka::progress::{FORMAT, Progress, ProgressRow};
    let (env, db, config, database, key) = ten_rows_and_shard_0s_progress_key().await;
    let server: String =
        db.query_one("SELECT system_identifier::text FROM pg_control_system()", &[]).await.unwrap().get(0);
    let rows: Vec<(i64, String)> = db
        .query("SELECT id, event_id::text FROM outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let other_server = format!("{}1", server);
    let other = Progress {
        format: FORMAT,
        database: database.clone(),
        table: "public.outbox".into(),
        table_oid: 1,
        server: other_server.clone(),
        shard: 0,
        owner: String::new(),
        rows: rows
            .iter()
            .map(|(id, event_id)| ProgressRow { id: id.to_string(), event_id: Some(event_id.clone()) })
            .collect(),
    };
    write_progress_record(&env, &config, &key, &other);

    let (code, _, stderr) = run_relay_command(&env, &config);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(&key) && stderr.contains("another PostgreSQL server"), "{stderr}");
    assert!(stderr.contains(&other_server) && stderr.contains(&server), "both identifiers named: {stderr}");
    assert!(stderr.contains("kafka.exactly_once.transactional_id_prefix"), "{stderr}");
    assert_eq!(unpublished_count(&db).await, 10, "no row of the other server's record marked here");
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_records_and_the_commit_shows_read_committed_consumers_nothing_twice() {
    let (env, topic, db, config) = backlog_with_exactly_once().await;

    // Three batches commit; then the relay dies with the fourth's records written and its commit
    // not sent.
    let mut relay = spawn_relay_process_with_env(&env, &config, &[("FAILPOINTS", "relay-before-commit=3*off->return")]);
    assert_eq!(relay.wait().await, None, "the relay was killed by the fault; log:\n{}", relay.log());

    drain_then_stop(&env, &config).await;
    assert_each_row_once_to_read_committed(&env, &db, &topic).await;
    // The transaction the crash left open was aborted by the next owner of its shard; its
    // records stay in the log, where only read_uncommitted consumers see them.
    let uncommitted = read_topic_as(&env.brokers, &topic, Isolation::ReadUncommitted).await;
    assert!(uncommitted.len() > ROWS, "the aborted transaction's records are in the log");
    let (_, committed) = audit(&env, &topic, "read_committed");
    assert_eq!(committed["duplicated"]["count"], 0, "{committed:#}");
    let (_, everything) = audit(&env, &topic, "read_uncommitted");
    assert!(everything["duplicated"]["count"].as_u64() > Some(0), "{everything:#}");
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_frozen_in_a_transaction_is_fenced_when_another_takes_its_shards() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let db = env.client().await;
    let mut config = exactly_once(&env).await;
    config.relay.takeover_after = Duration::from_secs(3);

    // Its loop blocks for 10 s with a transaction's records written and not committed, longer
    // than the takeover time, as a relay stuck in a call or paused with its host.
    let mut frozen =
        spawn_relay_process_with_env(&env, &config, &[("FAILPOINTS", "relay-before-commit=1*sleep(10000)")]);
    frozen.wait_for_log("shards now published by this relay").await;
    insert_backlog(&db, &topic, 0..400, 40).await;
    frozen.wait_for_log("batch{").await;
    let mut survivor = spawn_relay_process(&env, &config);
    wait_until(PATIENCE, "the survivor to publish every row", || async { unpublished_count(&db).await == 0 }).await;
    wait_until(PATIENCE, "the frozen relay to wake and be fenced", || async {
        frozen.log().contains("fenced by a newer producer")
    })
    .await;

    insert_backlog(&db, &topic, 400..800, 40).await;
    wait_until(PATIENCE, "the relays to publish the rest", || async { unpublished_count(&db).await == 0 }).await;
    for relay in [&mut frozen, &mut survivor] {
        relay.signal(libc::SIGTERM);
        assert_eq!(relay.wait().await, Some(0), "log:\n{}", relay.log());
    }
    assert_each_row_once_to_read_committed(&env, &db, &topic).await;
}

/// A relay whose database session ends while it takes its shards (here: held past the
/// takeover time just before it commits the records naming itself, and so taken over) must not
/// commit them after the relay that took the shards committed its own: the shards' latest
/// records would name a producer that never writes them, and the next owner would not fence
/// the one that does. Each shard's own transactional id, started by every relay taking it,
/// fences the first.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_taken_over_while_it_takes_its_shards_cannot_name_itself_their_owner_after() {
    use outbox_relay::kafka::progress::ProgressTopic;
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let db = env.client().await;
    insert_backlog(&db, &topic, 0..200, 20).await;
    let mut config = exactly_once(&env).await;
    config.relay.takeover_after = Duration::from_secs(3);

    let failpoint = [("FAILPOINTS", "relay-before-taking-ownership=1*return(10000)")];
    let mut slow = spawn_relay_process_with_env(&env, &config, &failpoint);
    slow.wait_for_log("started the transactional producer").await;
    let mut survivor = spawn_relay_process(&env, &config);
    wait_until(PATIENCE, "the survivor to publish every row", || async { unpublished_count(&db).await == 0 }).await;
    wait_until(PATIENCE, "the slow relay to fail to name itself the owner", || async {
        slow.log().contains("committing the shards' new owner")
    })
    .await;
    slow.signal(libc::SIGKILL);
    slow.wait().await;

    let started = |log: &str| -> String {
        let line = log.lines().find(|l| l.contains("started the transactional producer")).expect("a producer started");
        let id = line.split("transactional_id=").nth(1).expect("its id");
        id.split_whitespace().next().unwrap_or_default().to_owned()
    };
    let survivors_producer = started(&survivor.log());
    let database: String = db.query_one("SELECT current_database()::text", &[]).await.unwrap().get(0);
    let progress = ProgressTopic::check(&config).expect("the progress topic");
    for shard in 0..config.relay.shards as i32 {
        let key = config.kafka.exactly_once.progress_key(&database, "public.outbox", shard);
        let latest = progress.read_latest(&config, &key, Duration::from_secs(30)).expect("read").expect("a record");
        assert_eq!(latest.owner, survivors_producer, "shard {shard}: its latest record names its writer");
    }
    survivor.signal(libc::SIGTERM);
    assert_eq!(survivor.wait().await, Some(0), "log:\n{}", survivor.log());
    assert_each_row_once_to_read_committed(&env, &db, &topic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_kill_nines_during_a_fifty_thousand_row_drain_show_read_committed_consumers_each_row_once() {
    const ROWS: usize = 50_000;
    const KEYS: usize = 100;
    const BACKLOG: usize = 40_000;
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(3).await;
    let db = env.client().await;
    let mut config = exactly_once(&env).await;
    config.relay.batch_size = 1_000;
    insert_backlog(&db, &topic, 0..BACKLOG, KEYS).await;
    let writer = write_meanwhile(env.client().await, &topic, BACKLOG..ROWS, KEYS);

    kill_the_relay_at_random_moments(&env, &config, &db, 12).await;
    writer.await.expect("writer");
    drain_then_stop(&env, &config).await;

    assert_eq!(all_event_ids(&db).await.len(), ROWS);
    assert_eq!(unpublished_count(&db).await, 0, "every row is marked");
    assert_each_row_once_to_read_committed(&env, &db, &topic).await;
    let (code, report) = audit(&env, &topic, "read_committed");
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["lost"]["count"], 0);
    assert_eq!(report["duplicated"]["count"], 0, "{report:#}");
    assert_eq!(report["isolation"], "read_committed");
    let uncommitted = read_topic_as(&env.brokers, &topic, Isolation::ReadUncommitted).await;
    eprintln!("12 kills: {} records in the log for {ROWS} rows, read_committed sees each once", uncommitted.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_mid_drain_leaves_no_transaction_open() {
    let (env, topic, db, config) = backlog_with_exactly_once().await;
    let mut relay = spawn_relay_process(&env, &config);
    relay.wait_for_log("batch settled").await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "log:\n{}", relay.log());

    // A transaction left open would hold read_committed consumers of its partitions back until
    // the broker's transaction timeout (60 s): the topic's end must be readable at once.
    let read = tokio::time::timeout(Duration::from_secs(30), read_topic(&env.brokers, &topic)).await;
    assert!(read.is_ok(), "read_committed consumers are held back: a transaction was left open");
    drain_then_stop(&env, &config).await;
    assert_each_row_once_to_read_committed(&env, &db, &topic).await;
}

/// Runs `outbox-relay audit` on `topic` as a consumer of `isolation`, and returns its exit code
/// and JSON report.
fn audit(env: &TestEnv, topic: &str, isolation: &str) -> (i32, serde_json::Value) {
    let path = write_config(env, &env.config());
    let args =
        ["--config", path.to_str().unwrap_or_default(), "audit", "--topic", topic, "--json", "--isolation", isolation];
    let (code, stdout, stderr) = run_command(&args, &[("RUST_LOG", "off")]);
    (code, serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_deleting_progress_topic_stops_the_relay_at_start() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let mut config = exactly_once(&env).await;
    config.kafka.exactly_once.progress_topic = unique_name("absent");
    let (code, _, stderr) = run_relay_command(&env, &config);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("kafka.exactly_once.progress_topic") && stderr.contains("does not exist"), "{stderr}");

    config.kafka.exactly_once.progress_topic = env.create_topic(1).await;
    let (code, _, stderr) = run_relay_command(&env, &config);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cleanup.policy=delete") && stderr.contains("compact"), "{stderr}");
}

/// Runs `outbox-relay run` with `config` until it exits, and returns its exit code and output.
fn run_relay_command(env: &TestEnv, config: &Config) -> (i32, String, String) {
    let path = write_config(env, config);
    run_command(&["--config", path.to_str().unwrap_or_default(), "run"], &[])
}

/// The progress record a new owner reads must be the shard's last committed one, even while
/// another shard's transaction is open below the end of the progress partition (a relay killed
/// mid-batch leaves one per shard until each is fenced). A read that stopped at the last stable
/// offset returned an older record, or none, and the batch was published again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_progress_read_waits_for_transactions_open_below_the_end_rather_than_missing_a_commit() {
    use outbox_relay::kafka::progress::{FORMAT, Progress, ProgressRow, ProgressTopic};
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let env = TestEnv::start().await;
    let config = exactly_once(&env).await;
    let topic = config.kafka.exactly_once.progress_topic.clone();
    let transactional = |id: &str| -> ThreadedProducer<rdkafka::producer::DefaultProducerContext> {
        let producer: ThreadedProducer<_> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &env.brokers)
            .set("transactional.id", format!("{}-{id}", config.kafka.exactly_once.transactional_id_prefix))
            .create()
            .expect("transactional producer");
        producer.init_transactions(Duration::from_secs(30)).expect("init_transactions");
        producer.begin_transaction().expect("begin");
        producer
    };
    let progress = Progress {
        format: FORMAT,
        database: "db".into(),
        table: "public.outbox".into(),
        table_oid: 1,
        server: String::new(),
        shard: 1,
        owner: "relay.db.public.outbox.0123456789ab".into(),
        rows: vec![ProgressRow { id: "7".into(), event_id: None }],
    };
    // Another shard's transaction stays open, its record first in the partition.
    let open = transactional("open");
    open.send(BaseRecord::<str, [u8]>::to(&topic).key("open").payload(b"{}".as_slice())).expect("send");
    open.flush(Duration::from_secs(10)).expect("flush");
    // This shard's last batch commits after it, keyed by its transactional id.
    let key = format!("{}-committed", config.kafka.exactly_once.transactional_id_prefix);
    let committed = transactional("committed");
    let value = progress.to_json();
    committed.send(BaseRecord::<str, [u8]>::to(&topic).key(key.as_str()).payload(value.as_slice())).expect("send");
    committed.commit_transaction(Duration::from_secs(30)).expect("commit");

    let progress_topic = ProgressTopic::check(&config).expect("the progress topic");
    let read = progress_topic.read_latest(&config, &key, Duration::from_secs(2));
    assert!(!matches!(read, Ok(None)), "read past nothing while a transaction below the end was open: {read:?}");
    open.abort_transaction(Duration::from_secs(30)).expect("abort");
    let read = progress_topic.read_latest(&config, &key, Duration::from_secs(30));
    assert_eq!(read, Ok(Some(progress)), "the shard's last commit");
}

/// A cluster where no transactional producer can start (here: a transaction state log that
/// wants three replicas on one broker) stops the relay at start, saying what the cluster lacks,
/// rather than falling back to at-least-once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_transactions_stops_the_relay_at_start() {
    let env = TestEnv::start_with_cluster(1, &["transaction.state.log.replication.factor=3"]).await;
    env.migrate().await;
    let mut config = exactly_once(&env).await;
    config.kafka.startup_timeout = Duration::from_secs(5);
    let (code, _, stderr) = run_relay_command(&env, &config);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("kafka.delivery = \"exactly_once\"") && stderr.contains("transaction"), "{stderr}");
}

/// PostgreSQL restarted while a committed batch waits for its mark: the mark fails, the relay
/// reconnects, writes it (or, having lost its shards' locks, repairs it from the progress
/// record after fencing), and publishes nothing twice.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restarted_between_the_commit_and_the_mark_publishes_nothing_twice() {
    let (mut env, topic, _, config) = backlog_with_exactly_once().await;
    // The fourth batch is committed to Kafka, then waits 10 s before its mark.
    let failpoint = [("FAILPOINTS", "relay-before-mark=3*off->1*sleep(10000)")];
    let mut relay = spawn_relay_process_with_env(&env, &config, &failpoint);
    // Once its records are visible to read_committed consumers, the fourth batch is committed and
    // its mark waits.
    consume(&env.brokers, &topic, 4 * BATCH).await;
    env.postgres.as_mut().expect("the test's own PostgreSQL").restart();

    let db = env.client().await;
    wait_until(PATIENCE, "the relay to reconnect and drain", || async { unpublished_count(&db).await == 0 }).await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "log:\n{}", relay.log());
    // The batch's mark came after the restart: it failed, or the relay found the connection
    // closed first and reconnected before writing it.
    let log = relay.log();
    let reconnected = log.matches("connected to PostgreSQL").count() >= 2;
    assert!(log.contains("could not mark") || reconnected, "the restart came between the commit and the mark: {log}");
    assert_each_row_once_to_read_committed(&env, &db, &topic).await;
}

/// Rows the broker would refuse (too large for the topic, a topic that does not exist) fail on
/// their own in this mode too: they are charged, given up after `relay.max_attempts` and park
/// their keys, while the rows of other keys in the same shards' transactions are committed and
/// reach read-committed consumers once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_broker_would_refuse_fail_alone_and_the_healthy_rows_commit() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let missing = unique_name("missing");
    let db = env.client().await;
    let mut too_large = NewEvent::keyed(&topic, "A", 1);
    too_large.payload = Some(format!(r#"{{"n": 1, "blob": "{}"}}"#, "x".repeat(3 * 1024 * 1024)));
    let mut events = vec![too_large, NewEvent::keyed(&topic, "A", 2), NewEvent::keyed(&missing, "B", 1)];
    events.extend((0..400).map(|n| NewEvent::keyed(&topic, &format!("healthy-{}", n % 40), n)));
    insert_events(&db, &events).await;
    let mut config = exactly_once(&env).await;
    config.relay.max_attempts = 3;
    config.relay.retry_backoff_initial = Duration::from_millis(50);
    config.relay.retry_backoff_max = Duration::from_millis(200);

    let mut relay = spawn_relay_process(&env, &config);
    wait_until(PATIENCE, "the two poison rows given up and the rest published", || async {
        let failed: i64 =
            db.query_one("SELECT count(*) FROM outbox WHERE failed_at IS NOT NULL", &[]).await.unwrap().get(0);
        failed == 2 && unpublished_count(&db).await == 3
    })
    .await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "log:\n{}", relay.log());

    let records = read_topic(&env.brokers, &topic).await;
    let on_topic: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    assert_eq!(on_topic, marked_event_ids(&db).await, "the healthy rows, each marked");
    assert_eq!(on_topic.len(), 400);
    assert_eq!(records.len(), 400, "each once to read_committed consumers");
    let attempts: Vec<i32> = db
        .query("SELECT attempts FROM outbox WHERE failed_at IS NOT NULL ORDER BY key", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(attempts, [3, 3], "each poison row charged up to relay.max_attempts, no more");
}

/// A crash between the commit and the mark of a batch in which a row was refused before it was
/// sent: the repair marks the rows the transaction carried, never the refused row, which the
/// batch's first progress record named (its second, written once the refusal was known, names
/// only the rows sent).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_batch_with_a_refused_row_never_marks_that_row() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    let mut too_large = NewEvent::keyed(&topic, "A", 1);
    too_large.payload = Some(format!(r#"{{"n": 1, "blob": "{}"}}"#, "x".repeat(3 * 1024 * 1024)));
    let refused = insert_events(&db, &[too_large]).await[0];
    // Rows of the same key's shard: "A" again, after it, held back; and other rows.
    let events: Vec<NewEvent> = (0..200).map(|n| NewEvent::keyed(&topic, &format!("k{}", n % 20), n)).collect();
    insert_events(&db, &events).await;
    let config = exactly_once(&env).await;

    let mut relay = spawn_relay_process_with_env(&env, &config, &[("FAILPOINTS", "relay-before-mark=return")]);
    assert_eq!(relay.wait().await, None, "the relay was killed by the fault; log:\n{}", relay.log());
    let mut relay = spawn_relay_process(&env, &config);
    wait_until(PATIENCE, "the healthy rows marked", || async { unpublished_count(&db).await == 1 }).await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "log:\n{}", relay.log());
    assert!(relay.log().contains("marked the rows of the shards' last committed batches"), "{}", relay.log());
    let marked: bool =
        db.query_one("SELECT published_at IS NOT NULL FROM outbox WHERE id = $1", &[&refused]).await.unwrap().get(0);
    assert!(!marked, "the refused row was never sent and must stay unpublished");
    let records = read_topic(&env.brokers, &topic).await;
    assert_eq!(records.len(), 200, "each healthy row once");
}
