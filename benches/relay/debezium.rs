//! The `debezium` section: our relay beside Debezium's PostgreSQL connector with its outbox
//! EventRouter (Kafka Connect standalone), on the same PostgreSQL server, the same Kafka node,
//! the same payloads, keys and partitions; each relay reads its own table layout (ours, and
//! Debezium's `id uuid, aggregatetype, aggregateid, type, payload`), and each run gets a fresh
//! database and topic. One measure for both, read from the topic (its timestamps are the
//! broker's append times, see `appends`) and from /proc:
//!
//! - a drain of a backlog written while the relay is stopped: ours is started on a table of
//!   unpublished rows; Debezium's slot exists before the rows are written (the connector ran
//!   once, streamed a warm-up row and stopped), so the rows wait in the slot and the
//!   connector catches up from it when started, as after an outage. `steady` runs from the
//!   first record's append to the last one's; `from start` from the process's start to the
//!   last append (Connect's JVM start included);
//! - commit-to-append latency at fixed insert rates: a writer commits one transaction every
//!   10 ms and puts its intended commit time in each payload (`intended_ms`); latency is the
//!   broker's append time minus that. A writer that falls behind shows as latency;
//! - PostgreSQL's CPU (every server process, from /proc) and WAL bytes per event, from the
//!   relay's start (drain) or the writer's first row (latency) until the last record is
//!   appended and, for ours, marked;
//! - each relay's own CPU (during the drain: from the first record seen to the last; during
//!   a latency run: the whole run) and peak RSS.
//!
//! Debezium runs with `poll.interval.ms` 10 and its default 500. It is skipped, saying so, when
//! `OUTBOX_BENCH_DEBEZIUM=off` or its jars cannot be fetched (no Java or Maven).
//!
//! The report's `debezium` key (stable; the plot and the README read it):
//!
//! ```text
//! { "skipped": null | "why",
//!   "versions": { "debezium": "3.6.1.Final", "kafka_connect": "4.1.1" },
//!   "drain":   [ { "relay": "outbox-relay" | "debezium", "mark": "update" | "delete" | null,
//!                  "poll_interval_ms": null | ms, "rows", "steady_rows_per_s",
//!                  "from_start_rows_per_s", "pg_cpu_ms_per_1k", "wal_bytes_per_event",
//!                  "relay_cpu_ms_per_1k", "relay_cpu_ms_from_start", "relay_peak_rss_mb" } ],
//!   "latency": [ { "relay", "mark", "poll_interval_ms", "rows_per_s", "rows", "p50_ms",
//!                  "p99_ms", "max_ms", "mark_p50_ms" | null, "mark_p99_ms" | null,
//!                  "pg_cpu_ms_per_1k", "wal_bytes_per_event", "relay_cpu_ms_per_1k",
//!                  "relay_peak_rss_mb", "writer_late_ticks" } ] }
//! ```
//! (`mark_*`: ours only, commit to the row's mark.)

#[path = "debezium/kafka_connect.rs"]
mod kafka_connect;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outbox_relay::config::MarkMode;
use serde_json::{Value, json};
use tokio_postgres::Client;

use super::appends::{self, Appended, WARM_UP_KEY, create_append_time_topic, quantile};
use super::pg_cost::{PgCost, PgSnapshot};
use super::support::environment::unique_name;
use super::support::test_env::TestEnv;
use super::writer::{FixedRate, Written};
use super::{KEYS, Plan, ProcessUsage, SMALL_PAD, Scenario, spawn_relay};
use kafka_connect::Connect;

const DEBEZIUM_VERSION: &str = "3.6.1.Final";
const CONNECT_VERSION: &str = "4.1.1";
/// Debezium's `poll.interval.ms`: a short one for latency, and its default.
const POLL_INTERVALS_MS: [u64; 2] = [10, 500];
/// How long the last record of a run may take to appear.
const DRAIN_WITHIN: Duration = Duration::from_secs(600);

/// Debezium's outbox table, as its documentation lays it out (the payload as JSON, as ours).
const DEBEZIUM_TABLE: &str = "CREATE TABLE outboxevent (id uuid PRIMARY KEY, aggregatetype varchar(255) NOT NULL, \
     aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb)";

/// Which table a relay reads: the same rows, in its own layout. The destination (`$1` below)
/// is the topic: ours names it in `topic`, Debezium's in `aggregatetype` (the script routes
/// a row to the topic its aggregatetype names).
#[derive(Clone, Copy)]
enum Table {
    Ours,
    Debezium,
}

impl Table {
    /// Rows `$2..=$3` of a backlog to topic `$1`: keys `key-0` to `key-999` (`$4` of them),
    /// payloads padded by `$5`, as the other sections write them.
    fn backlog_insert(self) -> &'static str {
        match self {
            Table::Ours => {
                "INSERT INTO outbox (topic, key, payload) \
                 SELECT $1, 'key-' || (g % $4), jsonb_build_object('n', g, 'pad', repeat('x', $5)) \
                 FROM generate_series($2::int8, $3::int8) AS g"
            }
            Table::Debezium => {
                "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload) \
                 SELECT gen_random_uuid(), $1, 'key-' || (g % $4), 'bench', \
                        jsonb_build_object('n', g, 'pad', repeat('x', $5)) \
                 FROM generate_series($2::int8, $3::int8) AS g"
            }
        }
    }

    /// One writer transaction: rows to topic `$1` with keys `$2` and payloads `$3`.
    fn rows_insert(self) -> &'static str {
        match self {
            Table::Ours => {
                "INSERT INTO outbox (topic, key, payload) \
                 SELECT $1, k, p::jsonb FROM unnest($2::text[], $3::text[]) AS r(k, p)"
            }
            Table::Debezium => {
                "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload) \
                 SELECT gen_random_uuid(), $1, k, 'bench', p::jsonb FROM unnest($2::text[], $3::text[]) AS r(k, p)"
            }
        }
    }

    /// Writes a backlog of `rows` in transactions of 100,000, then leaves the table as the
    /// other sections do: analyzed, with no dirty pages left to write.
    async fn insert_backlog(self, db: &Client, topic: &str, rows: i64) {
        let mut start = 1;
        while start <= rows {
            let end = (start + 99_999).min(rows);
            db.execute(self.backlog_insert(), &[&topic, &start, &end, &KEYS, &SMALL_PAD]).await.expect("backlog");
            start = end + 1;
        }
        let table = match self {
            Table::Ours => "outbox",
            Table::Debezium => "outboxevent",
        };
        db.batch_execute(&format!("VACUUM ANALYZE {table}")).await.expect("vacuum");
        db.batch_execute("CHECKPOINT").await.expect("checkpoint");
    }

    /// The warm-up row, left out of every figure.
    async fn insert_warm_up(self, db: &Client, topic: &str) {
        let keys = vec![WARM_UP_KEY];
        let payloads = vec!["{}"];
        db.execute(self.rows_insert(), &[&topic, &keys, &payloads]).await.expect("warm-up row");
    }
}

/// The relay measured: ours with its mark, or Debezium with its poll interval.
#[derive(Clone, Copy)]
enum Relay {
    Ours(MarkMode),
    Debezium { poll_interval_ms: u64 },
}

impl Relay {
    /// The report's `relay`, `mark` and `poll_interval_ms`.
    fn describe(self) -> serde_json::Map<String, Value> {
        let (name, mark, poll) = match self {
            Relay::Ours(mark) => ("outbox-relay", json!(format!("{mark:?}").to_lowercase()), Value::Null),
            Relay::Debezium { poll_interval_ms } => ("debezium", Value::Null, json!(poll_interval_ms)),
        };
        let mut fields = serde_json::Map::new();
        fields.insert("relay".into(), json!(name));
        fields.insert("mark".into(), mark);
        fields.insert("poll_interval_ms".into(), poll);
        fields
    }
}

/// Runs the section on the server listening on `pg_port` and the benchmark's broker.
pub async fn section(plan: &Plan, pg_port: u16) -> Value {
    if let Some(why) = kafka_connect::unavailable() {
        eprintln!("debezium: skipped, the benchmark runs without Debezium: {why}");
        return json!({ "skipped": why });
    }
    let mut drains = Vec::new();
    let mut latencies = Vec::new();
    for mark in [MarkMode::Update, MarkMode::Delete] {
        eprintln!("debezium: our relay drains {} rows, mark = {mark:?}", plan.backlog);
        drains.push(our_drain(plan.backlog, mark, pg_port).await);
    }
    for &rate in &plan.rates {
        eprintln!("debezium: our relay at {rate} rows/s for {:?}", plan.latency_run);
        latencies.push(our_latency(rate, plan.latency_run, pg_port).await);
    }
    for poll_interval_ms in POLL_INTERVALS_MS {
        let (drain, runs) = debezium_runs(plan, poll_interval_ms, pg_port).await;
        drains.push(drain);
        latencies.extend(runs);
    }
    json!({ "skipped": null, "versions": { "debezium": DEBEZIUM_VERSION, "kafka_connect": CONNECT_VERSION },
        "drain": drains, "latency": latencies })
}

/// A scenario of ours whose topic carries the broker's append times.
async fn our_scenario() -> Scenario {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = create_append_time_topic(&env.brokers).await;
    let db = env.client().await;
    Scenario { env, db, topic }
}

/// Our relay binary drains a backlog of `rows`.
async fn our_drain(rows: i64, mark: MarkMode, pg_port: u16) -> Value {
    let scenario = our_scenario().await;
    Table::Ours.insert_backlog(&scenario.db, &scenario.topic, rows).await;
    let config = scenario.config(mark);
    let metrics = config.metrics.listen.clone();
    let before = PgSnapshot::take(pg_port, &scenario.db).await;
    let started = SystemTime::now();
    let mut relay = spawn_relay(&scenario.env, &config);
    let at_first = first_record(&scenario.env.brokers, &scenario.topic, 0, relay.pid()).await;
    appends::wait_for(&scenario.env.brokers, &scenario.topic, rows, DRAIN_WITHIN).await;
    // Marked too: the marks are what our relay costs the database.
    scenario.wait_published(&mut relay, &metrics, rows).await;
    let usage = ProcessUsage::of(relay.pid());
    let pg = before.until(&PgSnapshot::take(pg_port, &scenario.db).await);
    relay.signal(libc::SIGTERM);
    relay.wait().await;
    let records = read_back(&scenario.env.brokers, &scenario.topic, rows).await;
    drain_figures(Relay::Ours(mark), rows, started, &records, &pg, at_first, &usage)
}

/// Our relay binary publishes what a writer inserts at `rate` rows/s for `run`.
async fn our_latency(rate: u64, run: Duration, pg_port: u16) -> Value {
    let scenario = our_scenario().await;
    scenario.db.batch_execute("CHECKPOINT").await.expect("checkpoint");
    let config = scenario.config(MarkMode::Update);
    let metrics = config.metrics.listen.clone();
    let mut relay = spawn_relay(&scenario.env, &config);
    let writer =
        LatencyRun { db: &scenario.db, table: Table::Ours, topic: &scenario.topic, brokers: &scenario.env.brokers };
    writer.warm_up().await;
    let mut figures = writer.measure(Relay::Ours(MarkMode::Update), rate, run, relay.pid(), pg_port).await;
    let rows = figures["rows"].as_i64().unwrap_or(0);
    scenario.wait_published(&mut relay, &metrics, rows + 1).await;
    relay.signal(libc::SIGTERM);
    relay.wait().await;
    // Commit to mark, as the `latency` section measures it.
    let row = scenario
        .db
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY l), percentile_cont(0.99) WITHIN GROUP (ORDER BY l) \
             FROM (SELECT extract(epoch FROM published_at)::float8 * 1000 - (payload->>'intended_ms')::float8 AS l \
                   FROM outbox WHERE key <> $1) AS s",
            &[&WARM_UP_KEY],
        )
        .await
        .expect("commit-to-mark percentiles");
    figures["mark_p50_ms"] = json!(row.get::<_, f64>(0));
    figures["mark_p99_ms"] = json!(row.get::<_, f64>(1));
    figures
}

/// Debezium with `poll_interval_ms` on a fresh database: the drain of a backlog written while
/// it is stopped, then the latency runs on the same worker (a topic each).
async fn debezium_runs(plan: &Plan, poll_interval_ms: u64, pg_port: u16) -> (Value, Vec<Value>) {
    let relay = Relay::Debezium { poll_interval_ms };
    let env = TestEnv::start().await;
    let db = env.client().await;
    db.batch_execute(DEBEZIUM_TABLE).await.expect("Debezium's outbox table");
    let topic = create_append_time_topic(&env.brokers).await;
    let slot = unique_name("debezium");
    eprintln!("debezium: poll.interval.ms = {poll_interval_ms}: starting Kafka Connect to create its slot");
    let mut connect = Connect::start(&env.database_url, &env.brokers, "public.outboxevent", &slot, poll_interval_ms);
    connect.wait_streaming().await;
    // A record out proves the slot streams to the topic, and gives the connector offsets.
    Table::Debezium.insert_warm_up(&db, &topic).await;
    appends::wait_for(&env.brokers, &topic, 1, DRAIN_WITHIN).await;
    connect.stop();

    eprintln!("debezium: poll.interval.ms = {poll_interval_ms}: drains {} rows written while stopped", plan.backlog);
    Table::Debezium.insert_backlog(&db, &topic, plan.backlog).await;
    let before = PgSnapshot::take(pg_port, &db).await;
    let started = SystemTime::now();
    connect.restart();
    let at_first = first_record(&env.brokers, &topic, 1, connect.pid()).await;
    appends::wait_for(&env.brokers, &topic, plan.backlog + 1, DRAIN_WITHIN).await;
    let usage = ProcessUsage::of(connect.pid());
    let pg = before.until(&PgSnapshot::take(pg_port, &db).await);
    let records = read_back(&env.brokers, &topic, plan.backlog + 1).await;
    let drain = drain_figures(relay, plan.backlog, started, &records, &pg, at_first, &usage);

    let mut latencies = Vec::new();
    for &rate in &plan.rates {
        eprintln!("debezium: poll.interval.ms = {poll_interval_ms}: {rate} rows/s for {:?}", plan.latency_run);
        let topic = create_append_time_topic(&env.brokers).await;
        let writer = LatencyRun { db: &db, table: Table::Debezium, topic: &topic, brokers: &env.brokers };
        writer.warm_up().await;
        let mut figures = writer.measure(relay, rate, plan.latency_run, connect.pid(), pg_port).await;
        figures["mark_p50_ms"] = Value::Null;
        figures["mark_p99_ms"] = Value::Null;
        latencies.push(figures);
    }
    drop(connect);
    (drain, latencies)
}

/// Waits for the first record of a drain (past `warm_up` records already there) and returns
/// the relay's CPU time then.
async fn first_record(brokers: &str, topic: &str, warm_up: i64, relay_pid: u32) -> f64 {
    appends::wait_for(brokers, topic, warm_up + 1, DRAIN_WITHIN).await;
    ProcessUsage::of(relay_pid).cpu_ms
}

async fn read_back(brokers: &str, topic: &str, records: i64) -> Vec<Appended> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || appends::read_back(&brokers, &topic, records)).await.expect("read back")
}

/// A drain's figures from the records read back and the costs measured.
fn drain_figures(
    relay: Relay,
    rows: i64,
    started: SystemTime,
    records: &[Appended],
    pg: &PgCost,
    relay_cpu_at_first: f64,
    usage: &ProcessUsage,
) -> Value {
    assert_eq!(records.len() as i64, rows, "every row of the backlog reached the topic once");
    let first = records.iter().map(|r| r.append_ms).min().unwrap_or(0);
    let last = records.iter().map(|r| r.append_ms).max().unwrap_or(0);
    let started_ms = started.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64;
    let mut figures = relay.describe();
    figures.extend(
        json!({ "rows": rows,
            "steady_rows_per_s": (rows - 1) as f64 / ((last - first) as f64 / 1000.0).max(1e-3),
            "from_start_rows_per_s": rows as f64 / ((last - started_ms) as f64 / 1000.0).max(1e-3),
            "pg_cpu_ms_per_1k": pg.cpu_ms_per_1k(rows),
            "wal_bytes_per_event": pg.wal_bytes_per_event(rows),
            "relay_cpu_ms_per_1k": (usage.cpu_ms - relay_cpu_at_first) / (rows as f64 / 1000.0),
            "relay_cpu_ms_from_start": usage.cpu_ms,
            "relay_peak_rss_mb": usage.peak_rss_kb / 1024.0 })
        .as_object()
        .cloned()
        .unwrap_or_default(),
    );
    Value::Object(figures)
}

/// A writer at a fixed rate into one table and topic, a relay publishing it.
#[derive(Clone, Copy)]
struct LatencyRun<'a> {
    db: &'a Client,
    table: Table,
    topic: &'a str,
    brokers: &'a str,
}

impl LatencyRun<'_> {
    /// One row through the relay first (its connections, the topic's metadata), left out.
    async fn warm_up(&self) {
        self.table.insert_warm_up(self.db, self.topic).await;
        appends::wait_for(self.brokers, self.topic, 1, DRAIN_WITHIN).await;
    }

    /// Inserts `rate` rows a second for `run`, one transaction every 10 ms, each payload
    /// carrying its intended commit time; then reads the records back.
    async fn measure(&self, relay: Relay, rate: u64, run: Duration, relay_pid: u32, pg_port: u16) -> Value {
        let writer = FixedRate::new(rate, run);
        let keys = writer.keys();
        let pad = "x".repeat(SMALL_PAD as usize);
        let insert = self.db.prepare(self.table.rows_insert()).await.expect("prepare insert");
        let before = PgSnapshot::take(pg_port, self.db).await;
        let relay_before = ProcessUsage::of(relay_pid);
        let Written { late_ticks, .. } = writer
            .run(async |_, intended| {
                let intended_ms = intended * 1000.0;
                let payload = format!(r#"{{"intended_ms": {intended_ms:.3}, "pad": "{pad}"}}"#);
                let payloads = vec![payload.as_str(); writer.per_tick];
                self.db.execute(&insert, &[&self.topic, &keys, &payloads]).await.expect("insert");
            })
            .await;
        let rows = writer.rows();
        appends::wait_for(self.brokers, self.topic, rows + 1, DRAIN_WITHIN).await;
        let relay_after = ProcessUsage::of(relay_pid);
        let pg = before.until(&PgSnapshot::take(pg_port, self.db).await);
        let records = read_back(self.brokers, self.topic, rows + 1).await;
        let mut latencies: Vec<f64> =
            records.iter().filter_map(|r| Some(r.append_ms as f64 - r.intended_ms?)).collect();
        assert_eq!(latencies.len() as i64, rows, "every row reached the topic once, with its intended time");
        latencies.sort_by(f64::total_cmp);
        let mut figures = relay.describe();
        figures.extend(
            json!({ "rows_per_s": rate, "rows": rows,
                "p50_ms": quantile(&latencies, 0.5), "p99_ms": quantile(&latencies, 0.99),
                "max_ms": latencies.last().copied().unwrap_or(f64::NAN),
                "pg_cpu_ms_per_1k": pg.cpu_ms_per_1k(rows), "wal_bytes_per_event": pg.wal_bytes_per_event(rows),
                "relay_cpu_ms_per_1k": (relay_after.cpu_ms - relay_before.cpu_ms) / (rows as f64 / 1000.0),
                "relay_peak_rss_mb": relay_after.peak_rss_kb / 1024.0, "writer_late_ticks": late_ticks })
            .as_object()
            .cloned()
            .unwrap_or_default(),
        );
        Value::Object(figures)
    }
}

/// The section as Markdown: the drains side by side, the latency runs by rate, and our
/// figures over Debezium's.
pub fn markdown(section: &Value) -> String {
    if section.is_null() {
        return String::new();
    }
    if let Some(why) = section["skipped"].as_str() {
        return format!("\nDebezium beside the relay: not run ({why}).\n");
    }
    let number = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let name = |r: &Value| match (r["relay"].as_str(), r["mark"].as_str(), r["poll_interval_ms"].as_u64()) {
        (Some("debezium"), _, Some(poll)) => format!("Debezium, `poll.interval.ms={poll}`"),
        (_, Some(mark), _) => format!("outbox-relay, `mark = \"{mark}\"`"),
        _ => "?".to_owned(),
    };
    let versions = &section["versions"];
    let mut out = format!(
        "\nBeside Debezium {} (PostgreSQL connector, outbox EventRouter, Kafka Connect {} standalone; same \
         PostgreSQL, Kafka node, payloads, keys and partitions; timed by the broker's append times).\n\n",
        versions["debezium"].as_str().unwrap_or("?"),
        versions["kafka_connect"].as_str().unwrap_or("?"),
    );
    out += "| drain of a backlog | rows | steady rows/s | from start rows/s | PostgreSQL CPU ms / 1k | WAL B / event \
            | relay CPU ms / 1k | peak RSS MB |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
    let drains: Vec<&Value> = section["drain"].as_array().into_iter().flatten().collect();
    for d in &drains {
        out += &format!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {:.0} | {:.1} | {:.0} |\n",
            name(d),
            d["rows"],
            number(&d["steady_rows_per_s"]),
            number(&d["from_start_rows_per_s"]),
            number(&d["pg_cpu_ms_per_1k"]),
            number(&d["wal_bytes_per_event"]),
            number(&d["relay_cpu_ms_per_1k"]),
            number(&d["relay_peak_rss_mb"]),
        );
    }
    let ours = drains.iter().find(|d| d["relay"] == "outbox-relay");
    for theirs in drains.iter().filter(|d| d["relay"] == "debezium") {
        if let Some(ours) = ours {
            let ratio = |field: &str| number(&ours[field]) / number(&theirs[field]);
            out += &format!(
                "\n{} over {}: steady {:.1}x, from start {:.1}x, PostgreSQL CPU per event {:.1}x.",
                name(ours),
                name(theirs),
                ratio("steady_rows_per_s"),
                ratio("from_start_rows_per_s"),
                ratio("pg_cpu_ms_per_1k"),
            );
        }
    }
    out += "\n\n| rows/s | relay | p50 ms | p99 ms | max ms | commit to mark p50 / p99 ms | PostgreSQL CPU ms / 1k \
            | WAL B / event | relay CPU ms / 1k | peak RSS MB |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    let mut runs: Vec<&Value> = section["latency"].as_array().into_iter().flatten().collect();
    runs.sort_by_key(|r| r["rows_per_s"].as_u64());
    for r in runs {
        let mark = if r["mark_p50_ms"].is_null() {
            String::new()
        } else {
            format!("{:.1} / {:.1}", number(&r["mark_p50_ms"]), number(&r["mark_p99_ms"]))
        };
        out += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {mark} | {:.1} | {:.0} | {:.1} | {:.0} |\n",
            r["rows_per_s"],
            name(r),
            number(&r["p50_ms"]),
            number(&r["p99_ms"]),
            number(&r["max_ms"]),
            number(&r["pg_cpu_ms_per_1k"]),
            number(&r["wal_bytes_per_event"]),
            number(&r["relay_cpu_ms_per_1k"]),
            number(&r["relay_peak_rss_mb"]),
        );
    }
    out
}
