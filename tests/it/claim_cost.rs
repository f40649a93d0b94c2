//! A claim costs about its batch, whatever PostgreSQL's statistics say. The planner chooses the
//! claim's plan from statistics that are often wrong just when the relay has to catch up: a
//! backlog loaded in bulk and never analyzed (after an outage, a restore, a migration), a table
//! analyzed while it was empty, statistics taken when every row was still unpublished, and a
//! partial index of unpublished rows swollen by rows since published. In each of these states,
//! one claim of a 1,000-row batch from the claim floor must read about a block per row, not the
//! backlog.

use outbox_relay::config::MarkMode;
use outbox_relay::postgres::layout::Mapping;
use outbox_relay::postgres::outbox::Outbox;
use tokio_postgres::Client;

use crate::support::*;

const BACKLOG: i64 = 100_000;
const BATCH: usize = 1_000;
/// What one claim of `BATCH` rows may read: reading the window in claim order touches about a
/// block per row claimed (1,047 when this was written); the plans that scan the backlog read
/// from 16,000 to over 100,000.
const BLOCKS_PER_CLAIM: i64 = 10 * BATCH as i64;

/// Blocks of the outbox table and its indexes that sessions have read, from the cache or from
/// disk, as the statistics collector has them now.
async fn outbox_blocks_read(db: &Client) -> i64 {
    db.batch_execute("SELECT pg_stat_clear_snapshot()").await.expect("clear the statistics snapshot");
    db.query_one(
        "SELECT (coalesce(heap_blks_read, 0) + coalesce(heap_blks_hit, 0) + coalesce(idx_blks_read, 0) \
                 + coalesce(idx_blks_hit, 0))::int8 FROM pg_statio_user_tables WHERE relname = 'outbox'",
        &[],
    )
    .await
    .expect("read the table's block statistics")
    .get(0)
}

async fn session_ended(db: &Client, pid: i32) {
    wait_until(PATIENCE, "a session to end", || async {
        db.query_one("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1", &[&pid]).await.unwrap().get(0)
    })
    .await;
}

/// A migrated outbox that autovacuum leaves alone: the point is statistics it did not refresh.
async fn outbox_without_autovacuum(env: &TestEnv) -> Client {
    env.migrate().await;
    let db = env.client().await;
    db.batch_execute("ALTER TABLE outbox SET (autovacuum_enabled = false)").await.unwrap();
    db
}

/// Runs `statements`, each in a transaction of its own (`VACUUM` must), in a session of its own,
/// and waits until that session has reported the blocks it read (a session reports them when it
/// ends at the latest), so they count before the claim's.
async fn in_own_session(env: &TestEnv, db: &Client, statements: &[&str]) {
    let session = env.client().await;
    let pid: i32 = session.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    for statement in statements {
        session.batch_execute(statement).await.unwrap();
    }
    drop(session);
    session_ended(db, pid).await;
}

/// Inserts `rows` unpublished rows in one transaction, as a bulk load or a restore does.
fn load(rows: i64) -> String {
    format!(
        "INSERT INTO outbox (topic, key, payload) SELECT 't', 'key-' || (g % 100), \
         jsonb_build_object('n', g, 'pad', repeat('x', 150)) FROM generate_series(1, {rows}) AS g"
    )
}

/// The blocks of the outbox one claim of `BATCH` rows reads, starting at claim-order value
/// `start` as the claim floor has it (`None`: the table's beginning).
async fn blocks_of_one_claim(env: &TestEnv, db: &Client, start: Option<i64>) -> i64 {
    blocks_of_one_claim_with(env, db, start, MarkMode::Update).await
}

/// As [`blocks_of_one_claim`], for a relay configured with `mark`.
async fn blocks_of_one_claim_with(env: &TestEnv, db: &Client, start: Option<i64>, mark: MarkMode) -> i64 {
    let before = outbox_blocks_read(db).await;
    let mut config = env.config();
    config.outbox.mark = mark;
    let mapping = Mapping::from_config(&config).unwrap();
    let outbox = Outbox::connect(&config, &mapping).await.unwrap();
    let pid = outbox.backend_pid();
    let shards: Vec<i32> = (0..config.relay.shards as i32).collect();
    let claim = outbox.claim(BATCH, usize::MAX, &shards, &[], start, &[]).await.expect("claim");
    assert_eq!(claim.rows.len(), BATCH, "a full batch of the backlog");
    drop(outbox);
    session_ended(db, pid).await;
    outbox_blocks_read(db).await - before
}

fn assert_bounded(read: i64, state: &str) {
    eprintln!("one claim of {BATCH} rows read {read} blocks {state}");
    assert!(
        read < BLOCKS_PER_CLAIM,
        "one claim of {BATCH} rows read {read} blocks of a {BACKLOG}-row backlog {state}: it scanned the backlog"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_on_a_backlog_never_analyzed_reads_about_its_batch_not_the_backlog() {
    let env = TestEnv::start().await;
    let db = outbox_without_autovacuum(&env).await;
    in_own_session(&env, &db, &[&load(BACKLOG)]).await;
    let never_analyzed: bool =
        db.query_one("SELECT reltuples < 0 FROM pg_class WHERE oid = 'outbox'::regclass", &[]).await.unwrap().get(0);
    assert!(never_analyzed, "the test needs a table without statistics");

    // Without statistics a planner scanned every unpublished row with a bitmap and checked its
    // key for each: 103,854 blocks for this claim.
    assert_bounded(blocks_of_one_claim(&env, &db, None).await, "never analyzed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_on_a_backlog_analyzed_while_the_table_was_empty_reads_about_its_batch() {
    let env = TestEnv::start().await;
    let db = outbox_without_autovacuum(&env).await;
    in_own_session(&env, &db, &["ANALYZE outbox"]).await;
    in_own_session(&env, &db, &[&load(BACKLOG)]).await;

    assert_bounded(blocks_of_one_claim(&env, &db, None).await, "analyzed while empty");
}

/// Statistics say every row is unpublished and none has failed; then most of the backlog is
/// published, leaving the partial index of unpublished rows full of entries for rows that no
/// longer belong in it until a vacuum, and one row failing, so the claim looks for failing
/// rows. The claim starts where the floor is, as every claim after the relay's first does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_with_statistics_from_before_the_backlog_was_published_reads_about_its_batch() {
    let env = TestEnv::start().await;
    let db = outbox_without_autovacuum(&env).await;
    in_own_session(&env, &db, &[&load(2 * BACKLOG), "ANALYZE outbox"]).await;
    let publish = format!("UPDATE outbox SET published_at = now() WHERE id <= {BACKLOG}");
    let fail = format!(
        "UPDATE outbox SET attempts = 1, last_error = 'refused', last_attempt_at = now() WHERE id = {}",
        BACKLOG + 2
    );
    in_own_session(&env, &db, &[&publish, &fail]).await;

    let read = blocks_of_one_claim(&env, &db, Some(BACKLOG + 1)).await;
    assert_bounded(read, "analyzed before most of it was published");
}

/// The partial index of unpublished rows holds many pages though few entries (every row once
/// in it was published, then removed and vacuumed), and the statistics are fresh: a planner
/// weighing that index by its pages may prefer the primary key, which also holds every
/// published row still kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_with_a_bloated_index_of_unpublished_rows_reads_about_its_batch() {
    let env = TestEnv::start().await;
    let db = outbox_without_autovacuum(&env).await;
    in_own_session(&env, &db, &[&load(3 * BACKLOG), "UPDATE outbox SET published_at = now()", "VACUUM outbox"]).await;
    in_own_session(&env, &db, &[&load(BACKLOG), "ANALYZE outbox"]).await;

    // The floor: the first row of the second load, the ids of one load being consecutive.
    let read = blocks_of_one_claim(&env, &db, Some(3 * BACKLOG + 1)).await;
    assert_bounded(read, "with a bloated index of unpublished rows");
}

/// With `mark = "delete"` the claim knows no published-at column, so the index of failing rows
/// (partial on unpublished rows) does not answer its lookup, and a probe per row would read the
/// table for each row claimed (some 3,000,000 blocks here): the lookup must stay what the
/// planner makes of it, which reads the table at most once (3,618 blocks when this was written;
/// the README says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_marks_by_deleting_never_reads_the_table_for_each_row() {
    let env = TestEnv::start().await;
    let db = outbox_without_autovacuum(&env).await;
    in_own_session(&env, &db, &[&load(BACKLOG), "ANALYZE outbox"]).await;

    let read = blocks_of_one_claim_with(&env, &db, None, MarkMode::Delete).await;
    assert_bounded(read, "with mark = \"delete\"");
}

/// The plan PostgreSQL logged for the claim (auto_explain), from its first plan line to the
/// next log entry; empty if none was logged.
fn logged_claim_plan(log: &str) -> String {
    let Some(at) = log.find("Query Text: WITH window_rows") else { return String::new() };
    let after = &log[at..];
    let plan = after.split_once('\n').map_or("", |(_, rest)| rest);
    plan.lines().take_while(|line| !line.starts_with("20")).collect::<Vec<_>>().join("\n")
}

/// Makes every new session log each statement's plan as it ran (auto_explain, with buffers and
/// JIT), and waits until new sessions do.
async fn log_every_plan(env: &TestEnv, db: &Client) {
    for setting in [
        "LOAD 'auto_explain'",
        "ALTER SYSTEM SET session_preload_libraries = 'auto_explain'",
        "ALTER SYSTEM SET auto_explain.log_min_duration = 0",
        "ALTER SYSTEM SET auto_explain.log_analyze = on",
        "ALTER SYSTEM SET auto_explain.log_buffers = on",
        "SELECT pg_reload_conf()",
    ] {
        db.batch_execute(setting).await.unwrap();
    }
    wait_until(PATIENCE, "new sessions to load auto_explain", || async {
        let session = env.client().await;
        let loaded: String = session.query_one("SHOW session_preload_libraries", &[]).await.unwrap().get(0);
        loaded == "auto_explain"
    })
    .await;
}

/// The first claim plan in the log of the test's PostgreSQL, once there is one.
async fn first_logged_claim_plan(env: &TestEnv) -> String {
    let log_path = env.postgres.as_ref().expect("the test's own PostgreSQL").log_path();
    let read_plan = || logged_claim_plan(&std::fs::read_to_string(&log_path).unwrap_or_default());
    wait_until(PATIENCE, "the claim's plan in PostgreSQL's log", || async { !read_plan().is_empty() }).await;
    read_plan()
}

/// PostgreSQL compiles a statement with LLVM when its estimated cost passes `jit_above_cost`,
/// and the claim's estimate on an analyzed backlog does (its index scan is costed as if it
/// read the backlog, though its LIMIT stops it after the batch): 25 ms of compiling for a
/// 10 ms claim, every batch. The relay's session turns JIT off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_of_an_analyzed_backlog_is_not_compiled_by_jit() {
    let env = TestEnv::start().await;
    let db = outbox_without_autovacuum(&env).await;
    in_own_session(&env, &db, &[&load(2 * BACKLOG), "VACUUM ANALYZE outbox"]).await;
    log_every_plan(&env, &db).await;
    let jit_above_cost: f64 =
        db.query_one("SELECT current_setting('jit_above_cost')::float8", &[]).await.unwrap().get(0);

    let config = env.config();
    let mapping = Mapping::from_config(&config).unwrap();
    let outbox = Outbox::connect(&config, &mapping).await.unwrap();
    let shards: Vec<i32> = (0..config.relay.shards as i32).collect();
    let claim = outbox.claim(BATCH, usize::MAX, &shards, &[], Some(1), &[]).await.expect("claim");
    assert_eq!(claim.rows.len(), BATCH);
    drop(outbox);

    let plan = first_logged_claim_plan(&env).await;
    // The test means something only while the claim's estimate passes the threshold.
    let estimate: f64 = plan
        .split_once("..")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|total| total.parse().ok())
        .expect("the plan's estimated total cost");
    assert!(estimate > jit_above_cost, "the claim's estimate {estimate} no longer passes jit_above_cost:\n{plan}");
    assert!(!plan.contains("JIT:"), "the claim was compiled by JIT:\n{plan}");
}

/// The claim ahead (claimed while a batch is in flight) reads past the rows in flight, which it
/// is given as a list: each row it reads must be looked up in a hash of that list, not compared
/// with every element of it (half of a 22 ms claim ahead of a 1,000-row batch). And what the
/// claim reports about the table (its OID, storage file, sequence) is computed once per claim:
/// as select-list expressions PostgreSQL looked them up in the catalog for every row returned,
/// three blocks a row (4,168 blocks for this claim, 1,113 without).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_ahead_looks_up_the_rows_in_flight_in_a_hash_and_the_table_once() {
    let env = TestEnv::start().await;
    let db = outbox_without_autovacuum(&env).await;
    in_own_session(&env, &db, &[&load(BACKLOG), "VACUUM ANALYZE outbox"]).await;
    log_every_plan(&env, &db).await;

    let config = env.config();
    let mapping = Mapping::from_config(&config).unwrap();
    let outbox = Outbox::connect(&config, &mapping).await.unwrap();
    let shards: Vec<i32> = (0..config.relay.shards as i32).collect();
    let in_flight: Vec<String> = (1..=BATCH as i64).map(|id| id.to_string()).collect();
    let claim = outbox.claim(BATCH, usize::MAX, &shards, &in_flight, Some(1), &[]).await.expect("claim ahead");
    assert_eq!(claim.rows.len(), BATCH);
    let first = claim.rows[0].as_ref().map(|row| row.id.clone()).expect("a decodable row");
    assert_eq!(first, (BATCH + 1).to_string(), "the claim ahead starts after the rows in flight");
    drop(outbox);

    let plan = first_logged_claim_plan(&env).await;
    assert!(plan.contains("hashed SubPlan"), "the rows in flight are not looked up in a hash:\n{plan}");
    // The whole statement's blocks: the first `Buffers:` line is the plan's top node's.
    let top_buffers = plan
        .lines()
        .find_map(|line| line.trim().strip_prefix("Buffers: shared "))
        .expect("the claim's buffers in its plan");
    // Found in the cache or read: `hit=1113 read=4 dirtied=3`.
    let blocks: i64 = top_buffers
        .split_whitespace()
        .filter_map(|field| field.strip_prefix("hit=").or_else(|| field.strip_prefix("read=")))
        .filter_map(|count| count.parse::<i64>().ok())
        .sum();
    eprintln!("one claim ahead of {BATCH} rows touched {blocks} blocks");
    assert!(blocks < 5 * BATCH as i64 / 2, "one claim ahead of {BATCH} rows touched {blocks} blocks:\n{plan}");
}
