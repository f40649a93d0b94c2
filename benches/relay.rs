//! The relay's benchmark: throughput, latency and cost on this machine, against the two
//! ceilings it cannot beat (the database alone, the broker alone) and a naive relay.
//!
//! Run it with `scripts/bench.sh` (which builds the release binary, runs this and draws the
//! plot). It starts its own PostgreSQL (fsync on, as in production) and Apache Kafka node on free
//! loopback ports; each scenario gets a fresh database and topic. The relay runs as the release
//! binary in its own process, so its CPU time and peak RSS are its own.
//!
//! Arguments: `--quick` (smaller sizes, for a smoke run), `--out DIR` (default `docs/bench`),
//! `--only SECTION,...` (some of ceilings, drain, large, depth, latency, exactly_once, naive,
//! debezium, cluster),
//! `--depths N,...` (the backlogs of the depth series).
//!
//! The `cluster` section, run last, stops the single node and starts three (replication factor
//! 3, `min.insync.replicas=2`, as production clusters run): the broker ceiling and the headline
//! drain again, with every record acknowledged by all in-sync replicas (`acks=all`, which the
//! idempotent producer requires). The `debezium` section (benches/relay/debezium.rs) runs
//! Debezium's outbox connector beside the relay, when Java and its jars are there.
//! Writes `DIR/latest.json` and `DIR/latest.md` and prints the table.

/// The parts of the integration tests' harness (`tests/it/support/`) the benchmark stands on:
/// the servers, one fresh database and topic per scenario, the relay binary as a child process,
/// and its metrics endpoint. Only these files are compiled in (not the topic readers, the row
/// helpers or the checks). Most of them also hold what only the tests call (a test's faults on
/// its own servers, its other ways to start); each such file says so with an `expect`, which
/// fails the build once the bench uses everything in it.
#[path = "../tests/it/support"]
mod support {
    pub mod database;
    pub mod environment;
    #[expect(dead_code, reason = "the tests' `scrape`, which asserts the status")]
    pub mod http;
    #[expect(dead_code, reason = "the tests' broker faults (restart, freeze, thaw...) and Java jars")]
    pub mod kafka;
    #[expect(dead_code, reason = "the tests' `Postgres::restart`")]
    pub mod postgres;
    pub mod processes;
    #[expect(dead_code, reason = "the tests' `run_command`, `spawn_relay_process`, `wait_for_log`")]
    pub mod relay_process;
    #[expect(dead_code, reason = "the tests' own-broker starts and the servers they reach through `TestEnv`")]
    pub mod test_env;
    #[expect(dead_code, reason = "the tests' topics with configs, `alter_topic`")]
    pub mod topics;
}

// The benchmark's own modules, in benches/relay/.
#[path = "relay/appends.rs"]
mod appends;
#[path = "relay/debezium.rs"]
mod debezium;
#[path = "relay/pg_cost.rs"]
mod pg_cost;
#[path = "relay/writer.rs"]
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use outbox_relay::config::{Config, Delivery, MarkMode};
use outbox_relay::kafka::delivery::Outcome;
use outbox_relay::kafka::publisher::Publisher;
use outbox_relay::kafka::record::Record;
use outbox_relay::kafka::settings::producer_config;
use outbox_relay::postgres::layout::Mapping;
use outbox_relay::postgres::outbox::Outbox;
use outbox_relay::relay::claim_floor::ClaimFloor;
use outbox_relay::service::health::Health;
use outbox_relay::service::metrics::Metrics;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use support::environment::free_port;
use support::http::{http_get, sample};
use support::kafka::Kafka;
use support::postgres::Postgres;
use support::relay_process::{RelayProcess, spawn_relay_process_with_env};
use support::test_env::TestEnv;
use support::topics::create_topic_with;
use tokio_postgres::Client;
use writer::{FixedRate, Written};

/// Distinct keys in generated rows: enough that every partition sees traffic.
const KEYS: i64 = 1000;
/// Partitions of each benchmark topic.
const PARTITIONS: i32 = 8;
/// JSON padding giving payloads of about 200 bytes and about 1 KiB.
const SMALL_PAD: i32 = 180;
const LARGE_PAD: i32 = 1000;
/// The large-row drain: rows of about 900 KiB (under librdkafka's 1 MB record limit), enough of
/// them to fill many batches of the default `relay.batch_bytes`.
const HUGE_PAD: i32 = 900_000;
const HUGE_ROWS: i64 = 300;
/// Depths from this backlog up drain long enough to be measured once.
const SINGLE_RUN_DEPTH: i64 = 1_000_000;

/// The drains of a full-size backlog: payload label, JSON padding, mark mode, and what the
/// planner knows of the table when the relay starts.
const DRAIN_CASES: [(&str, i32, MarkMode, Statistics); 4] = [
    ("~200 B", SMALL_PAD, MarkMode::Update, Statistics::Analyzed),
    ("~200 B", SMALL_PAD, MarkMode::Update, Statistics::NeverAnalyzed),
    ("~1 KiB", LARGE_PAD, MarkMode::Update, Statistics::Analyzed),
    ("~200 B", SMALL_PAD, MarkMode::Delete, Statistics::Analyzed),
];

/// What PostgreSQL's planner knows of a backlog when the relay starts draining it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Statistics {
    /// Vacuumed and analyzed after the load, as autovacuum leaves a table in time.
    Analyzed,
    /// Loaded and drained before autovacuum looks at it (after an outage, a restore): no
    /// statistics at all, and autovacuum kept off the table for the whole drain.
    NeverAnalyzed,
}

/// Sizes of one run.
struct Plan {
    /// Backlog drained for the headline rate, the ceilings and the CPU figure.
    backlog: i64,
    /// Backlogs of the depth series.
    depths: Vec<i64>,
    /// Insert rates of the latency series, rows per second.
    rates: Vec<u64>,
    /// How long each latency run inserts.
    latency_run: Duration,
    /// How long the naive relay runs.
    naive_run: Duration,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            backlog: 200_000,
            depths: vec![20_000, 200_000, 2_000_000],
            rates: vec![1_000, 5_000, 10_000],
            latency_run: Duration::from_secs(15),
            naive_run: Duration::from_secs(10),
        }
    }

    fn quick() -> Plan {
        Plan {
            backlog: 20_000,
            depths: vec![2_000, 20_000],
            rates: vec![1_000, 5_000],
            latency_run: Duration::from_secs(3),
            naive_run: Duration::from_secs(2),
        }
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench. Test runners (`cargo test --all-targets`, nextest's
    // `--list`) also start this binary; it has no tests for them and must not run for minutes.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let out_dir = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| format!("{}/docs/bench", env!("CARGO_MANIFEST_DIR")));
    let mut plan = if quick { Plan::quick() } else { Plan::full() };
    if let Some(list) = args.iter().position(|a| a == "--depths").and_then(|i| args.get(i + 1)) {
        plan.depths = list.split(',').filter_map(|n| n.parse().ok()).collect();
    }
    // `--only depth,latency` runs some sections (for working on one figure); the default is all.
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(str::to_owned).collect());
    let runs = |section: &str| only.as_ref().is_none_or(|list| list.iter().any(|s| s == section));
    // The published figures (docs/bench, quoted by the README) are one whole run: a partial run
    // would replace every section it skipped with nothing, and mixing sections of two runs
    // would compare figures taken under different loads.
    if let Some(sections) = &only
        && Path::new(&out_dir).ends_with("docs/bench")
    {
        eprintln!(
            "--only {}: a partial run does not replace the published figures in {out_dir}; \
             give --out DIR (scripts/bench.sh writes partial runs to target/bench-partial)",
            sections.join(",")
        );
        std::process::exit(2);
    }

    // Durable settings, as a production database runs; the buffers hold the largest backlog.
    // Logical WAL for every section, since Debezium's connector reads it: the sections' figures
    // are then all taken with the WAL a server that feeds a CDC reader writes.
    let postgres = Postgres::start_with(&[
        "fsync=on",
        "full_page_writes=on",
        "synchronous_commit=on",
        "shared_buffers=1GB",
        "max_wal_size=4GB",
        "wal_level=logical",
        "max_replication_slots=10",
        "max_wal_senders=10",
    ]);
    let mut broker = Some(Kafka::start());
    // SAFETY: set before any other thread reads the environment.
    unsafe {
        std::env::set_var("OUTBOX_TEST_DATABASE_URL", postgres.url("postgres"));
        std::env::set_var("OUTBOX_TEST_KAFKA_BROKERS", broker.as_ref().map(Kafka::address).unwrap_or_default());
    }

    let mut report = serde_json::Map::new();
    report.insert("machine".into(), machine());
    report.insert("quick".into(), json!(quick));
    report.insert("only".into(), json!(only));

    // Without the ceilings section, fractions come out as NaN.
    let (mut db_ceiling, mut db_delete_ceiling, mut broker_ceiling) = (f64::NAN, f64::NAN, f64::NAN);
    if runs("ceilings") {
        eprintln!("ceiling: the database alone, {} rows", plan.backlog);
        db_ceiling = database_ceiling(plan.backlog, MarkMode::Update).await;
        eprintln!("ceiling: the database alone with mark = \"delete\", {} rows", plan.backlog);
        db_delete_ceiling = database_ceiling(plan.backlog, MarkMode::Delete).await;
        eprintln!("ceiling: the broker alone, {} rows", plan.backlog);
        broker_ceiling = broker_ceiling_rate(plan.backlog, None).await;
    }
    let lower_ceiling = db_ceiling.min(broker_ceiling);
    report.insert(
        "ceilings".into(),
        json!({ "database_rows_per_s": db_ceiling, "database_mark_delete_rows_per_s": db_delete_ceiling,
            "broker_rows_per_s": broker_ceiling }),
    );

    let mut drains = Vec::new();
    let drain_cases = if runs("drain") { DRAIN_CASES.as_slice() } else { &[] };
    for &(label, pad, mark, statistics) in drain_cases {
        eprintln!("drain: {} rows at {label}, mark = {mark:?}, {statistics:?}", plan.backlog);
        let drain = drain_with(plan.backlog, pad, mark, None, statistics, Delivery::AtLeastOnce).await;
        let ceiling = if mark == MarkMode::Delete { db_delete_ceiling.min(broker_ceiling) } else { lower_ceiling };
        drains.push(json!({ "payload": label, "mark": format!("{mark:?}").to_lowercase(), "rows": plan.backlog,
            "never_analyzed": statistics == Statistics::NeverAnalyzed,
            "rows_per_s": drain.rate, "fraction_of_lower_ceiling": drain.rate / ceiling,
            "cpu_ms_per_1k_rows": drain.cpu_ms_per_1k, "peak_rss_mb": drain.peak_rss_mb }));
    }
    report.insert("drain".into(), Value::Array(drains));

    let mut large = Vec::new();
    if runs("large") {
        eprintln!("large rows: {HUGE_ROWS} rows at ~900 KiB");
        let drain = drain(HUGE_ROWS, HUGE_PAD, MarkMode::Update, None).await;
        large.push(json!({ "payload": "~900 KiB", "rows": HUGE_ROWS, "rows_per_s": drain.rate,
            "mib_per_s": drain.rate * f64::from(HUGE_PAD) / (1024.0 * 1024.0),
            "cpu_ms_per_1k_rows": drain.cpu_ms_per_1k, "peak_rss_mb": drain.peak_rss_mb }));
    }
    report.insert("large".into(), Value::Array(large));

    let mut depths = Vec::new();
    for &rows in plan.depths.iter().filter(|_| runs("depth")) {
        // A small backlog drains in a second or less, where this machine's noise swings a single
        // run by a third; such depths run three times and report the median run.
        let runs = if rows < SINGLE_RUN_DEPTH { 3 } else { 1 };
        let mut drains = Vec::new();
        let mut databases = Vec::new();
        for run in 1..=runs {
            eprintln!("depth: {rows} rows at ~200 B (run {run} of {runs})");
            drains.push(drain(rows, SMALL_PAD, MarkMode::Update, None).await);
            // The database's own rate at this depth separates what the relay loses from what
            // the table's size costs PostgreSQL (caches, checkpoints).
            eprintln!("depth: the database alone, {rows} rows (run {run} of {runs})");
            databases.push(database_ceiling(rows, MarkMode::Update).await);
        }
        let all_rates: Vec<f64> = drains.iter().map(|d| d.rate).collect();
        drains.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        databases.sort_by(f64::total_cmp);
        let (drain, database) = (&drains[drains.len() / 2], databases[databases.len() / 2]);
        depths.push(json!({ "rows": rows, "rows_per_s": drain.rate, "cpu_ms_per_1k_rows": drain.cpu_ms_per_1k,
            "peak_rss_mb": drain.peak_rss_mb, "database_rows_per_s": database, "runs_rows_per_s": all_rates }));
    }
    report.insert("depth".into(), Value::Array(depths));

    let mut latencies = Vec::new();
    for &rate in plan.rates.iter().filter(|_| runs("latency")) {
        eprintln!("latency: {rate} rows/s for {:?}", plan.latency_run);
        latencies.push(latency(rate, plan.latency_run, Delivery::AtLeastOnce).await);
    }
    report.insert("latency".into(), Value::Array(latencies));

    // Exactly-once delivery beside the idempotent mode, drain and latency, measured in turn.
    let mut exactly_once = Vec::new();
    if runs("exactly_once") {
        for delivery in [Delivery::AtLeastOnce, Delivery::ExactlyOnce] {
            eprintln!("exactly_once: drain {} rows at ~200 B, {delivery:?}", plan.backlog);
            let drain =
                drain_with(plan.backlog, SMALL_PAD, MarkMode::Update, None, Statistics::Analyzed, delivery).await;
            eprintln!("exactly_once: latency at {EXACTLY_ONCE_RATE} rows/s, {delivery:?}");
            let latency = latency(EXACTLY_ONCE_RATE, plan.latency_run, delivery).await;
            exactly_once.push(json!({ "delivery": format!("{delivery:?}"), "rows": plan.backlog,
                "rows_per_s": drain.rate, "cpu_ms_per_1k_rows": drain.cpu_ms_per_1k,
                "peak_rss_mb": drain.peak_rss_mb, "latency": latency }));
        }
    }
    report.insert("exactly_once".into(), Value::Array(exactly_once));

    let mut naive_rate = f64::NAN;
    if runs("naive") {
        eprintln!("naive relay: one row per statement and send, for {:?}", plan.naive_run);
        naive_rate = naive(plan.naive_run).await;
    }
    report.insert("naive_rows_per_s".into(), json!(naive_rate));

    let mut side_by_side = Value::Null;
    if runs("debezium") {
        side_by_side = debezium::section(&plan, postgres.port).await;
    }
    report.insert("debezium".into(), side_by_side);

    let mut cluster = Value::Null;
    if runs("cluster") {
        // The single node would only take CPU from the three.
        drop(broker.take());
        eprintln!("cluster: three Apache Kafka nodes, replication factor 3, min.insync.replicas 2");
        let nodes = Kafka::start_cluster(3, &[]);
        let brokers = nodes.address();
        eprintln!("cluster: the broker alone, {} rows", plan.backlog);
        let ceiling = broker_ceiling_rate(plan.backlog, Some(&brokers)).await;
        eprintln!("cluster: drain {} rows at ~200 B", plan.backlog);
        let drain = drain(plan.backlog, SMALL_PAD, MarkMode::Update, Some(&brokers)).await;
        cluster = json!({ "nodes": 3, "replication_factor": 3, "min_insync_replicas": 2, "rows": plan.backlog,
            "broker_rows_per_s": ceiling, "rows_per_s": drain.rate,
            "fraction_of_lower_ceiling": drain.rate / db_ceiling.min(ceiling),
            "cpu_ms_per_1k_rows": drain.cpu_ms_per_1k, "peak_rss_mb": drain.peak_rss_mb });
    }
    report.insert("cluster".into(), cluster);

    let report = Value::Object(report);
    let table = markdown(&report);
    println!("{table}");
    if let Err(e) = std::fs::create_dir_all(&out_dir)
        .and_then(|_| std::fs::write(format!("{out_dir}/latest.json"), format!("{report:#}\n")))
        .and_then(|_| std::fs::write(format!("{out_dir}/latest.md"), &table))
    {
        eprintln!("cannot write the results to {out_dir}: {e}");
        std::process::exit(1);
    }
    eprintln!("wrote {out_dir}/latest.json and {out_dir}/latest.md");
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// A fresh database with the outbox table, a topic, and a relay configuration for them.
struct Scenario {
    env: TestEnv,
    db: Client,
    topic: String,
}

impl Scenario {
    async fn new() -> Scenario {
        Scenario::on(None).await
    }

    /// A scenario whose topic and relay are on `brokers` (the benchmark's node by default).
    async fn on(brokers: Option<&str>) -> Scenario {
        let mut env = TestEnv::start().await;
        if let Some(brokers) = brokers {
            env.brokers = brokers.to_owned();
        }
        env.migrate().await;
        let topic = env.create_topic(PARTITIONS).await;
        let db = env.client().await;
        Scenario { env, db, topic }
    }

    /// The relay's production defaults, pointed at this scenario, with metrics on a free port.
    fn config(&self, mark: MarkMode) -> Config {
        let mut config = self.env.config();
        let defaults = Config::default();
        config.relay = defaults.relay;
        config.metrics.listen = format!("127.0.0.1:{}", free_port());
        config.outbox.mark = mark;
        // The relay runs as its restricted role (sql/relay_role.sql), which deletes only when granted.
        if mark == MarkMode::Delete {
            self.env.allow_relay_to_delete();
        }
        config
    }

    /// As [`Scenario::config`], with `delivery`: exactly-once gets a compacted progress topic of
    /// its own.
    async fn config_for(&self, mark: MarkMode, delivery: Delivery) -> Config {
        let mut config = self.config(mark);
        config.kafka.delivery = delivery;
        if delivery == Delivery::ExactlyOnce {
            config.kafka.exactly_once.progress_topic =
                create_topic_with(&self.env.brokers, 1, &[("cleanup.policy", "compact")]).await;
            config.kafka.exactly_once.transactional_id_prefix = self.topic.clone();
        }
        config
    }

    /// Inserts `rows` rows (keys `key-0` to `key-999`, JSON payloads padded by `pad`) in
    /// transactions of 100,000, then lets the planner see the table as autovacuum would.
    async fn insert_backlog(&self, rows: i64, pad: i32) {
        self.insert_backlog_with(rows, pad, Statistics::Analyzed).await;
    }

    /// As [`Scenario::insert_backlog`], leaving the planner with the given `statistics`.
    async fn insert_backlog_with(&self, rows: i64, pad: i32, statistics: Statistics) {
        if statistics == Statistics::NeverAnalyzed {
            self.db.batch_execute("ALTER TABLE outbox SET (autovacuum_enabled = false)").await.expect("autovacuum off");
        }
        let mut start = 1;
        while start <= rows {
            let end = (start + 99_999).min(rows);
            self.db
                .execute(
                    "INSERT INTO outbox (topic, key, payload) \
                     SELECT $1, 'key-' || (g % $4), jsonb_build_object('n', g, 'pad', repeat('x', $5)) \
                     FROM generate_series($2::int8, $3::int8) AS g",
                    &[&self.topic, &start, &end, &KEYS, &pad],
                )
                .await
                .expect("insert backlog");
            start = end + 1;
        }
        if statistics == Statistics::Analyzed {
            self.db.batch_execute("VACUUM ANALYZE outbox").await.expect("vacuum");
        }
        // Start the measurement with no dirty pages from this or an earlier scenario to write.
        self.db.batch_execute("CHECKPOINT").await.expect("checkpoint");
    }

    /// Waits until the relay's metrics say `rows` records of the topic were published. Returns
    /// the rate from the first sample that saw any published to the one that saw all.
    async fn wait_published(&self, relay: &mut RelayProcess, metrics: &str, rows: i64) -> f64 {
        let series = format!("outbox_relay_published_total{{topic=\"{}\"}}", self.topic);
        let mut first: Option<(Instant, f64)> = None;
        loop {
            assert!(relay.is_running(), "the relay exited; log:\n{}", relay.log());
            let text = http_get(metrics, "/metrics").await;
            let published = if text.0 == 200 { sample(&text.1, &series).unwrap_or(0.0) } else { 0.0 };
            if published > 0.0 && first.is_none() {
                first = Some((Instant::now(), published));
            }
            if published as i64 >= rows {
                let (at, seen) = first.unwrap_or((Instant::now(), published));
                return (published - seen) / at.elapsed().as_secs_f64().max(1e-3);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The relay's own claim and mark statements in a loop, no Kafka: the rate the database allows.
async fn database_ceiling(rows: i64, mark: MarkMode) -> f64 {
    let scenario = Scenario::new().await;
    scenario.insert_backlog(rows, SMALL_PAD).await;
    let config = scenario.config(mark);
    let mapping = Mapping::from_config(&config).expect("mapping");
    let outbox = Outbox::connect(&config, &mapping).await.expect("connect");
    let shards: Vec<i32> = (0..config.relay.shards as i32).collect();
    // Claims start where the relay's would, at its claim floor.
    let mut floor = ClaimFloor::new(config.relay.full_scan_interval, outbox.ids_grow_with_time());
    let started = Instant::now();
    let mut done = 0;
    loop {
        let start = floor.start(&shards, Instant::now());
        let claim = outbox
            .claim(config.relay.batch_size, config.relay.batch_bytes, &shards, &[], start, &[])
            .await
            .expect("claim");
        floor.observe(start, claim.view.as_ref(), Instant::now());
        let claimed = claim.rows;
        if claimed.is_empty() {
            break;
        }
        let rows: Vec<_> =
            claimed.iter().map(|row| row.as_ref().map(|r| r.row_ref()).expect("decodable row")).collect();
        done += outbox.mark_published(&rows).await.expect("mark");
    }
    assert_eq!(done as i64, rows, "every row claimed and marked once");
    rows as f64 / started.elapsed().as_secs_f64()
}

/// The relay's producer (its settings and its send path) streaming the same records, no
/// database: the rate the broker allows.
async fn broker_ceiling_rate(rows: i64, brokers: Option<&str>) -> f64 {
    let scenario = Scenario::on(brokers).await;
    let config = scenario.config(MarkMode::Update);
    let publisher = Publisher::new(&config, Metrics::new(), Arc::new(Health::new())).expect("producer");
    let records: Vec<Record> = (1..=rows)
        .map(|n| Record {
            topic: scenario.topic.clone(),
            key: Some(format!("key-{}", n % KEYS)),
            payload: Some(format!(r#"{{"n": {n}, "pad": "{}"}}"#, "x".repeat(SMALL_PAD as usize)).into_bytes()),
            headers: vec![("event_id".to_owned(), Some(uuid::Uuid::new_v4().to_string()))],
            partition: None,
            timestamp_ms: None,
        })
        .collect();
    // Warm up: metadata, connections, the producer id.
    // The broker ceiling waits for every report, however long.
    let never = Duration::from_secs(3600);
    publisher.publish(&records[..1], never).await;
    let started = Instant::now();
    let outcomes = publisher.publish(&records, never).await.outcomes;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(outcomes.iter().all(|o| matches!(o, Outcome::Acked { .. })), "every record acknowledged");
    rows as f64 / elapsed
}

/// What one drain of a backlog by the relay binary measured.
struct Drain {
    rate: f64,
    cpu_ms_per_1k: f64,
    peak_rss_mb: f64,
}

/// The relay binary drains a backlog of `rows`. The rate runs from the first batch's mark to
/// the last one's (database timestamps; with `mark = "delete"` the rows are gone, and the
/// relay's metrics sampled every 20 ms stand in), so process start-up does not count; CPU and
/// RSS are the whole process's.
async fn drain(rows: i64, pad: i32, mark: MarkMode, brokers: Option<&str>) -> Drain {
    drain_with(rows, pad, mark, brokers, Statistics::Analyzed, Delivery::AtLeastOnce).await
}

/// As [`drain`], with the planner knowing what `statistics` says of the backlog, and with
/// `delivery`.
async fn drain_with(
    rows: i64,
    pad: i32,
    mark: MarkMode,
    brokers: Option<&str>,
    statistics: Statistics,
    delivery: Delivery,
) -> Drain {
    let scenario = Scenario::on(brokers).await;
    scenario.insert_backlog_with(rows, pad, statistics).await;
    let config = scenario.config_for(mark, delivery).await;
    let metrics = config.metrics.listen.clone();
    let mut relay = spawn_relay(&scenario.env, &config);
    let sampled_rate = scenario.wait_published(&mut relay, &metrics, rows).await;
    let usage = ProcessUsage::of(relay.pid());
    relay.signal(libc::SIGTERM);
    relay.wait().await;
    keep_log(&relay, &format!("drain-{rows}-{pad}-{mark:?}-{statistics:?}-{delivery:?}"));
    let usage = Drain {
        rate: sampled_rate,
        cpu_ms_per_1k: usage.cpu_ms / (rows as f64 / 1000.0),
        peak_rss_mb: usage.peak_rss_kb / 1024.0,
    };
    if mark == MarkMode::Delete {
        let left: i64 = scenario.db.query_one("SELECT count(*) FROM outbox", &[]).await.expect("count").get(0);
        assert_eq!(left, 0, "every row deleted");
        return usage;
    }

    let row = scenario
        .db
        .query_one(
            "SELECT extract(epoch FROM max(published_at) - min(published_at))::float8, \
                    count(*) FILTER (WHERE published_at = (SELECT min(published_at) FROM outbox)), \
                    count(*) FILTER (WHERE published_at IS NULL) \
             FROM outbox",
            &[],
        )
        .await
        .expect("drain timing");
    let (span, first_batch, unpublished): (f64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(unpublished, 0, "every row marked");
    Drain { rate: (rows - first_batch) as f64 / span.max(1e-3), ..usage }
}

/// The insert rate at which the exactly-once section measures latency (issue 24's target is
/// set there).
const EXACTLY_ONCE_RATE: u64 = 5_000;

/// Rows published before a latency run's measurement, with keys covering the partitions.
const LATENCY_WARM_UP_ROWS: i64 = 64;

/// A writer inserts `rate` rows a second for `run` while the relay binary publishes them.
/// Each row's `created_at` is the writer's intended send time, so a writer or relay that falls
/// behind shows up as latency rather than as a lower rate. Latency runs to the row's mark,
/// which follows its acknowledgement: an upper bound of commit-to-ack.
///
/// On a loaded machine the writer itself runs late (its tick fires late, its commit waits for
/// the CPU and the WAL flush), and that lateness is in the intended-to-mark figure although no
/// relay could have seen the row earlier. So the writer also notes when each commit returned
/// (the row carries its tick), and the figures are given both ways: from the intended time, and
/// from the commit (as the writer saw it return, a little after it happened: this errs towards
/// the relay by at most the writer's own wake-up delay).
async fn latency(rate: u64, run: Duration, delivery: Delivery) -> Value {
    let scenario = Scenario::new().await;
    scenario.db.batch_execute("CHECKPOINT").await.expect("checkpoint");
    let config = scenario.config_for(MarkMode::Update, delivery).await;
    let metrics = config.metrics.listen.clone();
    let mut relay = spawn_relay(&scenario.env, &config);
    // Warm up (connections, producer id, the topic check, and every partition's first appends,
    // which on a topic just created took up to 400 ms in the first second) with rows of 64 keys,
    // which cover the topic's partitions, left out of the figures.
    scenario
        .db
        .execute(
            "INSERT INTO outbox (topic, key, payload) SELECT $1, 'warm-up-' || g, '{}' FROM generate_series(1, $2::int8) AS g",
            &[&scenario.topic, &LATENCY_WARM_UP_ROWS],
        )
        .await
        .expect("warm-up rows");
    scenario.wait_published(&mut relay, &metrics, LATENCY_WARM_UP_ROWS).await;

    let writer = FixedRate::new(rate, run);
    let keys = writer.keys();
    let pad = "x".repeat(SMALL_PAD as usize);
    let insert = scenario
        .db
        .prepare(
            "INSERT INTO outbox (topic, key, payload, created_at) \
             SELECT $1, k, p::jsonb, to_timestamp($4) FROM unnest($2::text[], $3::text[]) AS r(k, p)",
        )
        .await
        .expect("prepare insert");
    let Written { late_ticks, committed } = writer
        .run(async |tick, intended| {
            let payload = format!(r#"{{"tick": {tick}, "pad": "{pad}"}}"#);
            let payloads = vec![payload.as_str(); writer.per_tick];
            scenario.db.execute(&insert, &[&scenario.topic, &keys, &payloads, &intended]).await.expect("insert");
        })
        .await;
    let total = writer.rows();
    scenario.wait_published(&mut relay, &metrics, total + LATENCY_WARM_UP_ROWS).await;
    relay.signal(libc::SIGTERM);
    relay.wait().await;
    keep_log(&relay, &format!("latency-{rate}-{delivery:?}"));

    let row = scenario
        .db
        .query_one(
            "WITH s AS (\
               SELECT extract(epoch FROM o.published_at - o.created_at)::float8 * 1000 AS l, \
                      (extract(epoch FROM o.published_at)::float8 - c.at) * 1000 AS from_commit, \
                      (c.at - extract(epoch FROM o.created_at)::float8) * 1000 AS writer_late \
               FROM outbox AS o JOIN unnest($1::float8[]) WITH ORDINALITY AS c(at, n) \
                 ON c.n - 1 = (o.payload ->> 'tick')::int8 \
               WHERE o.key NOT LIKE 'warm-up-%') \
             SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY l), percentile_cont(0.99) WITHIN GROUP (ORDER BY l), \
                    max(l), percentile_cont(0.5) WITHIN GROUP (ORDER BY from_commit), \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY from_commit), max(from_commit), \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY writer_late), \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY writer_late), count(*) \
             FROM s",
            &[&committed],
        )
        .await
        .expect("latency percentiles");
    assert_eq!(row.get::<_, i64>(8), total, "every row's tick found");
    let ms = |i: usize| row.get::<_, f64>(i);
    json!({ "rows_per_s": rate, "rows": total, "p50_ms": ms(0), "p99_ms": ms(1), "max_ms": ms(2),
        "from_commit_p50_ms": ms(3), "from_commit_p99_ms": ms(4), "from_commit_max_ms": ms(5),
        "writer_late_p50_ms": ms(6), "writer_late_p99_ms": ms(7), "writer_late_ticks": late_ticks })
}

/// A naive relay, as many home-grown pollers are written: claim one row, send it, await its
/// report, mark it, repeat. Same database, broker and producer settings.
async fn naive(run: Duration) -> f64 {
    let scenario = Scenario::new().await;
    scenario.insert_backlog(100_000, SMALL_PAD).await;
    let config = scenario.config(MarkMode::Update);
    let producer: FutureProducer = producer_config(&config).create().expect("producer");
    let started = Instant::now();
    let mut done = 0u64;
    while started.elapsed() < run {
        let row = scenario
            .db
            .query_one(
                "SELECT id, event_id::text, key, payload::text FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1",
                &[],
            )
            .await
            .expect("claim one");
        let (id, event_id, key, payload): (i64, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let headers = rdkafka::message::OwnedHeaders::new()
            .insert(rdkafka::message::Header { key: "event_id", value: Some(event_id.as_str()) });
        let record = FutureRecord::to(&scenario.topic).key(&key).payload(&payload).headers(headers);
        producer.send(record, Duration::from_secs(30)).await.expect("delivered");
        scenario.db.execute("UPDATE outbox SET published_at = now() WHERE id = $1", &[&id]).await.expect("mark one");
        done += 1;
    }
    done as f64 / started.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Measurement helpers

/// The release relay binary at its production log level (the tests' debug logging costs CPU).
fn spawn_relay(env: &TestEnv, config: &Config) -> RelayProcess {
    let level = std::env::var("OUTBOX_BENCH_RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    spawn_relay_process_with_env(env, config, &[("RUST_LOG", &level)])
}

/// Copies the relay's log to `$OUTBOX_BENCH_LOGS/<name>.log` when that variable names a
/// directory, for looking at the batch timings of a run.
fn keep_log(relay: &RelayProcess, name: &str) {
    if let Some(dir) = std::env::var_os("OUTBOX_BENCH_LOGS") {
        let dir = std::path::PathBuf::from(dir);
        if let Err(e) =
            std::fs::create_dir_all(&dir).and_then(|_| std::fs::copy(&relay.log_path, dir.join(format!("{name}.log"))))
        {
            eprintln!("cannot keep the relay's log in {}: {e}", dir.display());
        }
    }
}

/// CPU time and peak memory of a process, from /proc.
struct ProcessUsage {
    cpu_ms: f64,
    peak_rss_kb: f64,
}

impl ProcessUsage {
    fn of(pid: u32) -> ProcessUsage {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        // SAFETY: sysconf has no preconditions.
        let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let ticks: f64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<f64>().ok()).sum();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let peak_rss_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        ProcessUsage { cpu_ms: ticks / ticks_per_s * 1000.0, peak_rss_kb }
    }
}

/// Where the figures came from.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "memory_gib": (mem_kb / 1024.0 / 1024.0).round(),
        "commit": commit,
        "date": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        "note": "PostgreSQL, Apache Kafka and the relay share the same CPUs",
    })
}

/// The report as a Markdown table.
fn markdown(report: &Value) -> String {
    let number = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let machine = &report["machine"];
    let mut out = format!(
        "Machine: {} CPUs ({}), {} GiB; commit {}; {}. PostgreSQL, Apache Kafka and the relay share the CPUs.\n\n",
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or("unknown"),
        machine["memory_gib"],
        machine["commit"].as_str().unwrap_or("?"),
        machine["date"].as_str().unwrap_or("?"),
    );
    let ceilings = &report["ceilings"];
    let db = number(&ceilings["database_rows_per_s"]);
    let broker = number(&ceilings["broker_rows_per_s"]);
    out += "| measurement | rows/s | of lower ceiling | CPU ms / 1k rows | peak RSS MB |\n|---|---:|---:|---:|---:|\n";
    out += &format!("| ceiling: database alone (claim + mark) | {db:.0} | | | |\n");
    out += &format!(
        "| ceiling: database alone, `mark = \"delete\"` | {:.0} | | | |\n",
        number(&ceilings["database_mark_delete_rows_per_s"])
    );
    out += &format!("| ceiling: broker alone (relay's producer) | {broker:.0} | | | |\n");
    for d in report["drain"].as_array().into_iter().flatten() {
        let mark = if d["mark"] == "delete" { ", `mark = \"delete\"`" } else { "" };
        let fresh = if d["never_analyzed"] == true { ", never analyzed" } else { "" };
        out += &format!(
            "| relay drains {} rows at {}{mark}{fresh} | {:.0} | {:.2} | {:.1} | {:.0} |\n",
            d["rows"],
            d["payload"].as_str().unwrap_or("?"),
            number(&d["rows_per_s"]),
            number(&d["fraction_of_lower_ceiling"]),
            number(&d["cpu_ms_per_1k_rows"]),
            number(&d["peak_rss_mb"]),
        );
    }
    for d in report["large"].as_array().into_iter().flatten() {
        out += &format!(
            "| relay drains {} rows at {} ({:.0} MiB/s; `relay.batch_bytes` bounds memory) | {:.0} | | {:.1} | {:.0} |\n",
            d["rows"],
            d["payload"].as_str().unwrap_or("?"),
            number(&d["mib_per_s"]),
            number(&d["rows_per_s"]),
            number(&d["cpu_ms_per_1k_rows"]),
            number(&d["peak_rss_mb"]),
        );
    }
    for d in report["depth"].as_array().into_iter().flatten() {
        out += &format!(
            "| relay drains a backlog of {} rows (~200 B) | {:.0} | {:.2} | {:.1} | {:.0} |\n",
            d["rows"],
            number(&d["rows_per_s"]),
            number(&d["rows_per_s"]) / db.min(broker),
            number(&d["cpu_ms_per_1k_rows"]),
            number(&d["peak_rss_mb"]),
        );
    }
    let cluster = &report["cluster"];
    if !cluster.is_null() {
        out += &format!(
            "| ceiling: broker alone, 3 nodes, RF 3, `acks=all` | {:.0} | | | |\n",
            number(&cluster["broker_rows_per_s"])
        );
        out += &format!(
            "| relay drains {} rows at ~200 B on 3 nodes, RF 3, `acks=all` | {:.0} | {:.2} | {:.1} | {:.0} |\n",
            cluster["rows"],
            number(&cluster["rows_per_s"]),
            number(&cluster["fraction_of_lower_ceiling"]),
            number(&cluster["cpu_ms_per_1k_rows"]),
            number(&cluster["peak_rss_mb"]),
        );
    }
    out += &format!(
        "| naive relay (one row per statement, awaits each send) | {:.0} | {:.3} | | |\n\n",
        number(&report["naive_rows_per_s"]),
        number(&report["naive_rows_per_s"]) / db.min(broker),
    );
    // Flat with depth: each backlog's rate against the smallest one's, for the relay and for
    // the database alone at the same depth.
    let depths: Vec<&Value> = report["depth"].as_array().into_iter().flatten().collect();
    if let Some(first) = depths.first() {
        let (relay_base, db_base) = (number(&first["rows_per_s"]), number(&first["database_rows_per_s"]));
        out += "| backlog rows | relay rows/s | relay vs smallest backlog | database alone rows/s | database vs smallest backlog | relay / database |\n";
        out += "|---:|---:|---:|---:|---:|---:|\n";
        for d in &depths {
            let (relay, database) = (number(&d["rows_per_s"]), number(&d["database_rows_per_s"]));
            out += &format!(
                "| {} | {relay:.0} | {:.2} | {database:.0} | {:.2} | {:.2} |\n",
                d["rows"],
                relay / relay_base,
                database / db_base,
                relay / database
            );
        }
        out += "\n";
    }
    out += "Latency from the writer's intended time to the mark, and from its commit to the mark (the writer \
            itself runs late on a loaded machine: its commit's lateness is the last column).\n\n";
    out += "| insert rate, rows/s | p50 ms | p99 ms | max ms | from commit p50 ms | p99 ms | max ms | writer late p99 ms |\n\
            |---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for l in report["latency"].as_array().into_iter().flatten() {
        out += &format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            l["rows_per_s"],
            number(&l["p50_ms"]),
            number(&l["p99_ms"]),
            number(&l["max_ms"]),
            number(&l["from_commit_p50_ms"]),
            number(&l["from_commit_p99_ms"]),
            number(&l["from_commit_max_ms"]),
            number(&l["writer_late_p99_ms"])
        );
    }
    out += &exactly_once_markdown(&report["exactly_once"]);
    out += &debezium::markdown(&report["debezium"]);
    out
}

/// The exactly-once section: each delivery mode's drain and latency, and their ratio.
fn exactly_once_markdown(section: &Value) -> String {
    let number = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let modes: Vec<&Value> = section.as_array().into_iter().flatten().collect();
    if modes.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\nExactly-once delivery beside the idempotent mode (drain of {} rows at ~200 B; latency at \
         {EXACTLY_ONCE_RATE} rows/s from the intended insert time to the mark).\n\n",
        modes[0]["rows"]
    );
    out += "| delivery | drain rows/s | of idempotent | CPU ms / 1k rows | peak RSS MB | p50 ms | p99 ms | max ms |\n\
            |---|---:|---:|---:|---:|---:|---:|---:|\n";
    let idempotent = number(&modes[0]["rows_per_s"]);
    for mode in &modes {
        let latency = &mode["latency"];
        out += &format!(
            "| {} | {:.0} | {:.2} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} |\n",
            mode["delivery"].as_str().unwrap_or("?"),
            number(&mode["rows_per_s"]),
            number(&mode["rows_per_s"]) / idempotent,
            number(&mode["cpu_ms_per_1k_rows"]),
            number(&mode["peak_rss_mb"]),
            number(&latency["p50_ms"]),
            number(&latency["p99_ms"]),
            number(&latency["max_ms"]),
        );
    }
    out
}
