//! The README's migration from Debezium's outbox router to the relay, step by step, while an
//! application keeps writing: Debezium publishes every row committed before the switch
//! (`examples/debezium-switch.sql`), the relay every row after it; no event is lost or published
//! twice, and each aggregate's events stay in order across the switch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::debezium_examples::{DEBEZIUM_TABLE, connection_vars, example, run_debezium_sql};
use crate::support::*;

/// Aggregates the application writes events of, each numbered from 0 in the order written.
const AGGREGATES: usize = 6;

/// The rows the application committed: event id, aggregate id and the event's number.
type Committed = Arc<Mutex<Vec<(String, String, i64)>>>;

/// Writes transactions of one to three events, each of an aggregate picked in turn, until
/// `stop`; records what committed.
async fn application(database_url: String, aggregatetype: String, stop: Arc<AtomicBool>, committed: Committed) {
    let mut db = connect(&database_url).await;
    let mut next = [0i64; AGGREGATES];
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let tx = db.transaction().await.expect("begin");
        let mut written = Vec::new();
        for _ in 0..1 + turn % 3 {
            let aggregate = turn % AGGREGATES;
            turn += 1;
            let aggregateid = format!("a-{aggregate}");
            let n = next[aggregate];
            next[aggregate] += 1;
            let row = tx
                .query_one(
                    "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload) \
                     VALUES (gen_random_uuid(), $1, $2, 'Changed', jsonb_build_object('n', $3::int8)) RETURNING id::text",
                    &[&aggregatetype, &aggregateid, &n],
                )
                .await
                .expect("the application's INSERT");
            written.push((row.get::<_, String>(0), aggregateid, n));
        }
        tx.commit().await.expect("commit");
        committed.lock().unwrap().extend(written);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// Waits until the application has committed `more` rows beyond what it had.
async fn written_more(committed: &Committed, more: usize) {
    let from = committed.lock().unwrap().len();
    wait_until(PATIENCE, "the application writing", || async { committed.lock().unwrap().len() >= from + more }).await;
}

/// Runs `examples/debezium-switch.sql` for Debezium's `publication`, with `marker` as the
/// marker's aggregate type when given.
fn run_switch(env: &TestEnv, publication: &str, marker: Option<&str>) -> std::process::Output {
    let script = example("debezium-switch.sql");
    let publication = format!("publication={publication}");
    let mut args = vec!["-v", publication.as_str()];
    let marker = marker.map(|m| format!("marker={m}"));
    if let Some(marker) = &marker {
        args.extend(["-v", marker.as_str()]);
    }
    args.extend(["-f", script.to_str().unwrap()]);
    run_psql(&env.database_url, &args).expect("run psql")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_guide_hands_the_table_from_debezium_to_the_relay_without_losing_or_repeating_an_event() {
    migrate("filtered").await;
}

/// Debezium's default publication publishes every table (`FOR ALL TABLES`), from which no table
/// can be dropped; the switch stops its inserts all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_guide_works_with_debeziums_default_publication_of_all_tables() {
    migrate("all_tables").await;
}

/// The guide, with Debezium's publication made in `publication_mode`
/// (`publication.autocreate.mode`).
async fn migrate(publication_mode: &str) {
    let env = TestEnv::start_with_logical_wal().await;
    let db = env.client().await;
    db.batch_execute(DEBEZIUM_TABLE).await.unwrap();
    let (aggregatetype, marker) = (unique_name("order"), unique_name("switch"));
    let (topic, marker_topic) = (format!("outbox.event.{aggregatetype}"), format!("outbox.event.{marker}"));
    create_topic(&env.brokers, &topic, 3).await;
    create_topic(&env.brokers, &marker_topic, 1).await;
    // Debezium's documented example, as the user runs it today.
    let debezium = Debezium::start(
        &env.database_url,
        &env.brokers,
        "public.outboxevent",
        &[
            ("transforms.outbox.route.topic.replacement", "outbox.event.${routedByValue}"),
            ("transforms.outbox.table.fields.additional.placement", "type:header:eventType"),
            ("publication.autocreate.mode", publication_mode),
        ],
    )
    .await;
    let all_tables: bool = db
        .query_one("SELECT puballtables FROM pg_publication WHERE pubname = $1", &[&debezium.slot])
        .await
        .expect("Debezium's publication")
        .get(0);
    assert_eq!(all_tables, publication_mode == "all_tables", "the publication Debezium made");
    let (stop, committed): (Arc<AtomicBool>, Committed) = Default::default();
    let writer =
        tokio::spawn(application(env.database_url.clone(), aggregatetype.clone(), stop.clone(), committed.clone()));
    written_more(&committed, 50).await;

    // 1. Prepare the table while Debezium runs and the application writes.
    run_debezium_sql(&env);
    written_more(&committed, 50).await;
    // 2. The application never deletes its rows. 3. The switch.
    let switched = run_switch(&env, &debezium.slot, Some(&marker));
    assert!(switched.status.success(), "the switch: {}", String::from_utf8_lossy(&switched.stderr));
    let switch = db.query_one("SELECT last_debezium_seq, marker_id::text FROM outbox_relay_switch", &[]).await.unwrap();
    let (last_debezium_seq, marker_id): (i64, String) = (switch.get(0), switch.get(1));
    written_more(&committed, 50).await;
    // 4. Debezium finishes what was committed before the switch: its marker arrives last.
    let markers = consume_records(&env.brokers, &[&marker_topic], 1, PATIENCE).await;
    assert_eq!(markers[0].header("id"), Some(marker_id.as_bytes()), "the switch's marker");
    drop(debezium); // a graceful stop; then its slot and publication go (step 6)
    // 5. Remove what Debezium published, start the relay.
    db.execute("DELETE FROM outboxevent WHERE seq <= $1", &[&last_debezium_seq]).await.unwrap();
    let connection = connection_vars(&env);
    let vars: Vec<(&str, &str)> = connection.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut relay = spawn_relay_process_from(&example("debezium.toml"), &vars, &env.path(""));
    written_more(&committed, 50).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("the application");
    wait_until(PATIENCE, "the relay publishing every row since the switch", || async {
        db.query_one("SELECT count(*) FROM outboxevent", &[]).await.unwrap().get::<_, i64>(0) == 0
    })
    .await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "{}", relay.log());

    let committed = committed.lock().unwrap().clone();
    let records = consume_records(&env.brokers, &[&topic], committed.len(), PATIENCE).await;
    let by_debezium: HashSet<&[u8]> = records
        .iter()
        .filter(|r| r.header("__debezium.context.runId").is_some())
        .filter_map(|r| r.header("id"))
        .collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for record in &records {
        *seen.entry(String::from_utf8_lossy(record.header("id").expect("an id header")).into_owned()).or_default() += 1;
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, copies)| **copies > 1).map(|(id, _)| id).collect();
    assert!(
        repeated.is_empty(),
        "{} events published twice across the switch, e.g. {:?}",
        repeated.len(),
        &repeated[..repeated.len().min(3)]
    );
    let lost: Vec<_> = committed.iter().filter(|(id, ..)| !seen.contains_key(id)).collect();
    assert!(lost.is_empty(), "{} events lost across the switch, e.g. {:?}", lost.len(), &lost[..lost.len().min(3)]);
    assert_eq!(seen.len(), committed.len(), "only the application's events");
    assert!(by_debezium.len() >= 100, "Debezium published the rows before the switch: {}", by_debezium.len());
    assert!(records.len() - by_debezium.len() >= 50, "the relay the rows after it");

    // Each aggregate's events in the order written, on one partition, Debezium's before the relay's.
    let number: HashMap<&str, (&str, i64)> =
        committed.iter().map(|(id, a, n)| (id.as_str(), (a.as_str(), *n))).collect();
    let mut by_partition: BTreeMap<i32, Vec<&RawRecord>> = BTreeMap::new();
    for record in &records {
        by_partition.entry(record.partition).or_default().push(record);
    }
    let mut last: HashMap<&str, i64> = HashMap::new();
    for (_, mut in_partition) in by_partition {
        in_partition.sort_by_key(|r| r.offset);
        for record in in_partition {
            let id = std::str::from_utf8(record.header("id").unwrap()).unwrap();
            let (aggregate, n) = number[id];
            let previous = last.insert(aggregate, n);
            assert_eq!(previous.map_or(0, |p| p + 1), n, "{aggregate}: event {n} after {previous:?}");
        }
    }
}

/// The switch behind a transaction that keeps writing the table: it gives up after its lock
/// timeout and changes nothing (the publication still publishes inserts, no marker, no record of
/// a switch), so that running it again later is safe; run twice, the second run changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_that_cannot_get_its_lock_or_runs_twice_changes_nothing() {
    let env = TestEnv::start().await;
    let db = env.client().await;
    db.batch_execute(DEBEZIUM_TABLE).await.unwrap();
    run_debezium_sql(&env);
    db.batch_execute("CREATE PUBLICATION dbz_publication FOR TABLE outboxevent").await.unwrap();
    let inserts_published = async |db: &tokio_postgres::Client| -> bool {
        db.query_one("SELECT pubinsert FROM pg_publication WHERE pubname = 'dbz_publication'", &[])
            .await
            .unwrap()
            .get(0)
    };
    let switch = |env: &TestEnv| run_switch(env, "dbz_publication", None);

    let mut writer = env.client().await;
    let open = writer.transaction().await.unwrap();
    open.execute(
        "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload) VALUES (gen_random_uuid(), 'a', 'b', 'T', '{}')",
        &[],
    )
    .await
    .unwrap();
    let out = switch(&env);
    assert!(!out.status.success(), "the switch cannot get its lock behind the open transaction");
    assert!(String::from_utf8_lossy(&out.stderr).contains("lock timeout"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(inserts_published(&db).await, "the publication is as it was");
    let switches: i64 = db
        .query_one("SELECT count(*) FROM pg_tables WHERE tablename = 'outbox_relay_switch'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(switches, 0, "no record of a switch");
    open.commit().await.unwrap();
    let markers: i64 =
        db.query_one("SELECT count(*) FROM outboxevent WHERE type = 'OutboxRelaySwitch'", &[]).await.unwrap().get(0);
    assert_eq!(markers, 0, "no marker");

    assert!(switch(&env).status.success(), "once the transaction has ended");
    assert!(!inserts_published(&db).await);
    let out = switch(&env);
    assert!(!out.status.success(), "a second run finds the first one's record");
    let markers: i64 =
        db.query_one("SELECT count(*) FROM outboxevent WHERE type = 'OutboxRelaySwitch'", &[]).await.unwrap().get(0);
    assert_eq!(markers, 1, "the second run added no marker");
}
