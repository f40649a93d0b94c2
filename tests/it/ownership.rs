//! Who owns which shard, when relays do not see the table or each other the same way: relays
//! of two databases on one server, two spellings of one table, relays with different shard
//! counts, a relay frozen with its locks held, a relay paused with a claimed batch in hand, and
//! what `status` shows of it all.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::support::*;
use outbox_relay::Config;

/// How long a relay's session may stay idle before another relay takes its shards over, in
/// these tests.
const TAKEOVER_AFTER: Duration = Duration::from_secs(3);

/// A configuration whose relays take a frozen relay's shards over after [`TAKEOVER_AFTER`].
fn quick_takeover(env: &TestEnv) -> Config {
    let mut config = env.config();
    config.relay.takeover_after = TAKEOVER_AFTER;
    config
}

/// A test's database with the standard outbox table, a topic of two partitions, and a
/// connection as the application.
async fn table_and_topic() -> (TestEnv, String, tokio_postgres::Client) {
    table_and_topic_on(TestEnv::start().await).await
}

async fn table_and_topic_on(env: TestEnv) -> (TestEnv, String, tokio_postgres::Client) {
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

/// Runs `outbox-relay status` with `config` and returns the text.
fn status_text(env: &TestEnv, config: &Config) -> String {
    let path = write_config(env, config);
    let (code, stdout, stderr) = run_command(&["--config", path.to_str().unwrap(), "status"], &[("RUST_LOG", "off")]);
    assert_eq!(code, 0, "{stderr}");
    stdout
}

/// The entry of `status --json` for the relay whose session is `pid`.
fn relay_entry(status: &serde_json::Value, pid: i32) -> serde_json::Value {
    status["ownership"]["relays"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pid"] == pid)
        .cloned()
        .unwrap_or_else(|| panic!("no relay with pid {pid}: {status:#}"))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_relay_loses_its_shards_and_rejoins_when_it_wakes() {
    let (env, topic, db) = table_and_topic().await;
    let config = quick_takeover(&env);

    let (mut frozen, frozen_session) = first_relay(&env, &db, &config, &[]).await;
    let mut survivor = spawn_relay_process(&env, &config);
    wait_for_split(&db, "the shards to be split", &[8, 8]).await;
    insert_backlog(&db, &topic, 0..500, 40).await;
    wait_until(PATIENCE, "both relays to publish", || async { unpublished_count(&db).await == 0 }).await;

    frozen.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let holders = wait_for_split(&db, "the survivor to take every shard", &[16]).await;
    let takeover = stopped.elapsed();
    assert_ne!(sole_holder(&holders), frozen_session);
    assert!(takeover < TAKEOVER_AFTER + Duration::from_secs(5), "takeover took {takeover:?}");
    eprintln!("shards taken over {takeover:?} after SIGSTOP");
    survivor.wait_for_log("ended its session").await;
    let log = survivor.log();
    let warning = log.lines().find(|l| l.contains("ended its session")).unwrap();
    assert!(warning.contains(&format!("pid={frozen_session}")) && warning.contains("shards=8"), "{warning}");
    insert_backlog(&db, &topic, 500..1_500, 40).await;
    wait_until(PATIENCE, "the survivor to publish the rows inserted meanwhile", || async {
        unpublished_count(&db).await == 0
    })
    .await;

    frozen.signal(libc::SIGCONT);
    let holders = wait_for_split(&db, "the woken relay to rejoin", &[8, 8]).await;
    assert!(!holders.contains_key(&frozen_session), "it rejoined with a new session: {holders:?}");
    insert_backlog(&db, &topic, 1_500..2_000, 40).await;
    wait_until(PATIENCE, "both relays to publish", || async { unpublished_count(&db).await == 0 }).await;
    stop(&mut frozen).await;
    stop(&mut survivor).await;
    assert_published_exactly_once(&env, &db, &topic).await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_paused_with_a_claimed_batch_publishes_nothing_it_no_longer_owns() {
    let (env, topic, db) = table_and_topic().await;
    let config = quick_takeover(&env);

    let (mut survivor, survivor_session) = first_relay(&env, &db, &config, &[]).await;
    // Its loop thread blocks for 10 s with its first batch claimed and not yet produced:
    // longer than the takeover time, as a relay stuck in a call or paused with its host.
    let mut paused =
        spawn_relay_process_with_env(&env, &config, &[("FAILPOINTS", "relay-before-produce=1*sleep(10000)")]);
    wait_for_split(&db, "the shards to be split", &[8, 8]).await;

    insert_backlog(&db, &topic, 0..400, 40).await;
    let holders = wait_for_split(&db, "the survivor to take the paused relay's shards", &[16]).await;
    assert_eq!(sole_holder(&holders), survivor_session);
    wait_until(PATIENCE, "the survivor to publish every row", || async { unpublished_count(&db).await == 0 }).await;
    wait_for_split(&db, "the paused relay to wake and rejoin", &[8, 8]).await;

    insert_backlog(&db, &topic, 400..800, 40).await;
    wait_until(PATIENCE, "both relays to publish", || async { unpublished_count(&db).await == 0 }).await;
    stop(&mut paused).await;
    stop(&mut survivor).await;
    assert_published_exactly_once(&env, &db, &topic).await;
    let log = paused.log();
    assert!(log.contains("dropping the claimed batch unpublished"), "{log}");
    assert!(log.contains("batch settled"), "the woken relay publishes again once it owns shards: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_waiting_on_a_frozen_broker_keep_their_shards() {
    let (env, topic, db) = table_and_topic_on(TestEnv::start_with_own_broker().await).await;
    let broker = env.broker.as_ref().expect("own broker");
    let config = quick_takeover(&env);
    let (mut first, _) = first_relay(&env, &db, &config, &[]).await;
    let mut second = spawn_relay_process(&env, &config);
    let holders = wait_for_split(&db, "the shards to be split", &[8, 8]).await;

    // The relay owning the key's shard claims a batch and waits for its delivery reports for
    // three times the takeover time, while the other relay, with nothing to do, rebalances
    // every second: an outage of the broker is not a frozen relay.
    broker.freeze(1);
    let events: Vec<NewEvent> = (0..200).map(|n| NewEvent::keyed(&topic, "one-key", n)).collect();
    insert_events(&db, &events).await;
    let frozen_at = Instant::now();
    while frozen_at.elapsed() < TAKEOVER_AFTER * 3 {
        assert_eq!(shard_holders(&db).await, holders, "no relay took another's shards");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.thaw(1);
    wait_until(PATIENCE, "both relays to publish", || async { unpublished_count(&db).await == 0 }).await;
    assert_eq!(shard_holders(&db).await, holders, "no relay took another's shards");
    stop(&mut first).await;
    stop(&mut second).await;
    for relay in [&first, &second] {
        assert!(!relay.log().contains("ended its session"), "{}", relay.log());
    }
    assert_published_exactly_once(&env, &db, &topic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_every_relay_and_flags_unheld_shards_and_frozen_relays() {
    let (env, _, db) = table_and_topic().await;
    let config = quick_takeover(&env);

    let (mut leader, leader_session) = first_relay(&env, &db, &config, &[]).await;
    // A second relay joins while the first is stopped, so it finds every shard held; it will
    // not look again for an hour, nor take over a relay frozen for less than a minute.
    leader.signal(libc::SIGSTOP);
    let mut standby_config = config.clone();
    standby_config.relay.rebalance_interval = Duration::from_secs(3600);
    standby_config.relay.takeover_after = Duration::from_secs(60);
    let mut standby = spawn_relay_process(&env, &standby_config);
    wait_until(PATIENCE, "the second relay to join", || async {
        status_json(&env, &config)["ownership"]["relays"].as_array().unwrap().len() == 2
    })
    .await;
    leader.signal(libc::SIGCONT);
    // The first relay hands back the second one's share, which nobody takes for an hour.
    wait_for_split(&db, "the first relay to hand back half its shards", &[8]).await;

    let status = status_json(&env, &config);
    assert_eq!(status["shards"], 16, "{status:#}");
    assert_eq!(status["unheld_shards"].as_array().unwrap().len(), 8, "{status:#}");
    let owners = status["ownership"]["shards"].as_array().unwrap();
    assert_eq!(owners.len(), 8, "{status:#}");
    assert!(owners.iter().all(|o| o["pid"] == leader_session && o["shard"].is_i64() && o["client"].is_string()));
    let leader_entry = relay_entry(&status, leader_session);
    assert_eq!(leader_entry["shards"].as_array().unwrap().len(), 8, "{status:#}");
    for relay in status["ownership"]["relays"].as_array().unwrap() {
        assert_eq!(relay["shard_count"], 16, "{status:#}");
        assert_eq!(relay["application_name"], "outbox-relay", "{status:#}");
        assert_eq!(relay["looks_frozen"], false, "{status:#}");
        assert!(relay["idle_seconds"].as_f64().unwrap() < TAKEOVER_AFTER.as_secs_f64(), "{status:#}");
    }
    let text = status_text(&env, &config);
    assert!(text.contains("relays     2 running, 16 shards"), "{text}");
    assert!(text.contains("8 SHARDS NOT HELD by any relay [8 9 10 11 12 13 14 15]"), "{text}");
    assert!(text.contains(&format!("backend pid {leader_session} from ")), "{text}");
    assert!(!text.contains("LOOKS FROZEN"), "{text}");

    leader.signal(libc::SIGSTOP);
    wait_until(PATIENCE, "status to see the stopped relay as frozen", || async {
        relay_entry(&status_json(&env, &config), leader_session)["looks_frozen"] == true
    })
    .await;
    let text = status_text(&env, &config);
    let line = text.lines().find(|l| l.contains(&format!("backend pid {leader_session} "))).unwrap();
    assert!(line.contains("LOOKS FROZEN"), "{text}");
    assert_eq!(text.matches("LOOKS FROZEN").count(), 1, "the standby relay is alive: {text}");

    leader.signal(libc::SIGCONT);
    stop(&mut leader).await;
    stop(&mut standby).await;
}
