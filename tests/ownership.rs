//! Who owns which shard, when relays do not see the table or each other the same way: relays
//! of two databases on one server, two spellings of one table, relays with different shard
//! counts.

mod support;

use std::collections::{HashMap, HashSet};

use outbox_relay::Config;
use support::*;

/// A test's database with the standard outbox table, a topic of two partitions, and a
/// connection as the application.
async fn table_and_topic() -> (TestEnv, String, tokio_postgres::Client) {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let db = env.client().await;
    (env, topic, db)
}

/// Starts a relay process with `config` and `vars` on a table no relay holds yet, waits until
/// it holds all `shards` shards, and returns it with the backend pid of its session.
async fn first_relay(
    env: &TestEnv,
    db: &tokio_postgres::Client,
    config: &Config,
    vars: &[(&str, &str)],
) -> (RelayProcess, i32) {
    let relay = spawn_relay_process_with_env(env, config, vars);
    let shards = config.relay.shards as usize;
    let holders = wait_for_split(db, "the first relay to take every shard", &[shards]).await;
    (relay, sole_holder(&holders))
}

/// Waits until the relays' sessions hold the table's shards as `expected` describes (the
/// number of shards of each holder, in any order), and returns the holders by backend pid.
async fn wait_for_split(db: &tokio_postgres::Client, what: &str, expected: &[usize]) -> HashMap<i32, usize> {
    let mut expected = expected.to_vec();
    expected.sort_unstable();
    let split = |holders: &HashMap<i32, usize>| {
        let mut counts: Vec<usize> = holders.values().copied().collect();
        counts.sort_unstable();
        counts
    };
    wait_until(PATIENCE, what, || async { split(&shard_holders(db).await) == expected }).await;
    let holders = shard_holders(db).await;
    assert_eq!(split(&holders), expected, "{what}: the split changed again");
    holders
}

/// The backend pid of the one session holding shards.
fn sole_holder(holders: &HashMap<i32, usize>) -> i32 {
    assert_eq!(holders.len(), 1, "{holders:?}");
    *holders.keys().next().unwrap()
}

/// Asserts that every row of the table reached `topic` exactly once.
async fn assert_published_exactly_once(env: &TestEnv, db: &tokio_postgres::Client, topic: &str) {
    let records = read_topic(&env.brokers, topic).await;
    let on_topic: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    let rows = all_event_ids(db).await;
    assert_eq!(on_topic, rows, "every row reached the topic");
    assert_eq!(records.len(), rows.len(), "and none twice: {} duplicates", records.len() - on_topic.len());
    assert_first_copies_in_key_order(&records);
}

/// Stops a relay process with SIGTERM and expects a clean exit.
async fn stop(relay: &mut RelayProcess) {
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "log:\n{}", relay.log());
}

/// Runs `outbox-relay status --json` with `config` and returns the report.
fn status_json(env: &TestEnv, config: &Config) -> serde_json::Value {
    let path = write_config(env, config);
    let (code, stdout, stderr) =
        run_command(&["--config", path.to_str().unwrap(), "status", "--json"], &[("RUST_LOG", "off")]);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_of_two_databases_on_one_server_each_hold_every_shard_of_their_own_table() {
    const ROWS: usize = 5_000;
    let env = TestEnv::start().await;
    env.migrate().await;
    // Both tables have the same OID: the copy's relay must not count the original's.
    let (sibling_config, sibling_owner_url) = env.copy_database().await;
    let (db, sibling_db) = (env.client().await, connect(&sibling_owner_url).await);
    let (topic, sibling_topic) = (env.create_topic(2).await, env.create_topic(2).await);
    insert_backlog(&db, &topic, 0..ROWS, 50).await;
    insert_backlog(&sibling_db, &sibling_topic, 0..ROWS, 50).await;

    let relay = env.spawn_relay(env.config());
    let sibling_relay = env.spawn_relay(sibling_config);
    wait_until(PATIENCE, "both tables to drain", || async {
        unpublished_count(&db).await == 0 && unpublished_count(&sibling_db).await == 0
    })
    .await;
    wait_for_split(&db, "one relay to hold all 16 shards of the first table", &[16]).await;
    wait_for_split(&sibling_db, "one relay to hold all 16 shards of the second table", &[16]).await;
    relay.stop().await.expect("clean stop");
    sibling_relay.stop().await.expect("clean stop");

    assert_published_exactly_once(&env, &db, &topic).await;
    assert_published_exactly_once(&env, &sibling_db, &sibling_topic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_naming_the_table_outbox_and_public_outbox_share_its_shards() {
    const ROWS: usize = 2_000;
    let (env, topic, db) = table_and_topic().await;
    let bare = env.config();
    let mut qualified = env.config();
    qualified.outbox.table = "public.outbox".to_owned();

    let first = env.spawn_relay(bare.clone());
    wait_for_split(&db, "the first relay to take every shard", &[16]).await;
    let second = env.spawn_relay(qualified.clone());
    wait_for_split(&db, "the shards to be split between the two spellings", &[8, 8]).await;
    for config in [&bare, &qualified] {
        let status = status_json(&env, config);
        assert_eq!(status["ownership"]["relays"].as_array().unwrap().len(), 2, "{status:#}");
        assert_eq!(status["unheld_shards"].as_array().unwrap().len(), 0, "{status:#}");
    }

    let events: Vec<NewEvent> = (0..ROWS).map(|n| NewEvent::keyed(&topic, &format!("k{}", n % 40), n)).collect();
    insert_events(&db, &events).await;
    wait_until(PATIENCE, "both relays to publish", || async { unpublished_count(&db).await == 0 }).await;
    let by_first = first.metrics.published.with_label_values(&[&topic]).get();
    let by_second = second.metrics.published.with_label_values(&[&topic]).get();
    first.stop().await.expect("clean stop");
    second.stop().await.expect("clean stop");
    assert!(by_first > 0 && by_second > 0, "each relay publishes its own shards: {by_first} / {by_second}");
    assert_published_exactly_once(&env, &db, &topic).await;
}

/// Starts a relay with `running` shards, then one with `refused`, which must exit 2 naming
/// both counts and the running relay's session, while the first publishes everything.
async fn a_second_shard_count_is_refused(running: u32, refused: u32) {
    let (env, topic, db) = table_and_topic().await;
    let mut config = env.config();
    config.relay.shards = running;
    let (mut first, holder) = first_relay(&env, &db, &config, &[]).await;

    let mut other = config.clone();
    other.relay.shards = refused;
    let mut second = spawn_relay_process(&env, &other);
    assert_eq!(second.wait().await, Some(2), "a shard count mismatch exits 2; log:\n{}", second.log());
    let log = second.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("outbox-relay: ")).collect();
    assert_eq!(errors.len(), 1, "one line: {log}");
    let expected = format!(
        "relay.shards = {refused}, but 1 other relay of table public.outbox (pid {holder}) runs with relay.shards = {running}"
    );
    assert!(errors[0].contains(&expected), "{}", errors[0]);
    assert!(errors[0].contains("stop every relay of the table"), "{}", errors[0]);

    insert_backlog(&db, &topic, 0..1_000, 40).await;
    wait_until(PATIENCE, "the first relay to publish everything", || async { unpublished_count(&db).await == 0 }).await;
    assert_eq!(shard_holders(&db).await, HashMap::from([(holder, running as usize)]), "it kept every shard");
    stop(&mut first).await;
    assert_published_exactly_once(&env, &db, &topic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_fewer_shards_than_the_running_relays_refuses_to_start() {
    a_second_shard_count_is_refused(16, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_more_shards_than_the_running_relays_refuses_to_start() {
    a_second_shard_count_is_refused(8, 16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refuses_to_start_beside_relays_of_the_earlier_version() {
    let (env, _, db) = table_and_topic().await;
    // The membership lock a relay of the earlier version takes, keyed by the table's name.
    db.execute("SELECT pg_advisory_lock(hashtext('outbox-relay-member:outbox') & 2147483647, 7)", &[]).await.unwrap();
    let earlier: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);

    let mut relay = spawn_relay_process(&env, &env.config());
    assert_eq!(relay.wait().await, Some(2), "log:\n{}", relay.log());
    let log = relay.log();
    let error = log.lines().find(|l| l.starts_with("outbox-relay: ")).unwrap_or_else(|| panic!("{log}"));
    assert!(error.contains("earlier outbox-relay version") && error.contains(&earlier.to_string()), "{error}");
    assert!(shard_holders(&db).await.is_empty(), "it took no shard");
}
