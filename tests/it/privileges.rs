//! The relay runs as the restricted role of `sql/relay_role.sql`: it publishes and marks rows
//! (and deletes them when given DELETE), and can do nothing else to the database. A missing
//! grant stops it before it publishes, naming the grant; a grant lost while it runs stops it
//! at the failed mark: nothing is marked that was not acknowledged, nothing is lost.

use crate::support::*;
use outbox_relay::config::MarkMode;
use tokio_postgres::error::SqlState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_and_marks_rows_as_the_restricted_role() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let db = env.client().await;
    insert_events(&db, &(0..20).map(|n| NewEvent::keyed(&topic, &format!("k{}", n % 3), n)).collect::<Vec<_>>()).await;

    let relay = env.spawn_relay(env.config());
    wait_until(PATIENCE, "all rows marked", || async { unpublished_count(&db).await == 0 }).await;
    let logins: Vec<String> = db
        .query("SELECT DISTINCT usename::text FROM pg_stat_activity WHERE application_name = 'outbox-relay'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    relay.stop().await.expect("clean stop");

    assert_eq!(logins, vec![env.relay_role.clone()], "every connection of the relay logs in as the relay role");
    let plain: bool = db
        .query_one(
            "SELECT NOT (rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication OR rolbypassrls) \
             FROM pg_roles WHERE rolname = $1",
            &[&env.relay_role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(plain, "the relay role is a plain login role");
    assert_eq!(read_topic(&env.brokers, &topic).await.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_delete_the_relay_deletes_each_row_once_the_broker_has_it() {
    let env = TestEnv::start().await;
    env.migrate().await;
    env.allow_relay_to_delete();
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    insert_events(&db, &(0..5).map(|n| NewEvent::keyed(&topic, "k", n)).collect::<Vec<_>>()).await;

    let mut config = env.config();
    config.outbox.mark = MarkMode::Delete;
    let relay = env.spawn_relay(config);
    wait_until(PATIENCE, "every row deleted", || async { all_event_ids(&db).await.is_empty() }).await;
    relay.stop().await.expect("clean stop");
    assert_eq!(read_topic(&env.brokers, &topic).await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_role_cannot_write_events_change_the_schema_or_read_other_tables() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let owner = env.client().await;
    owner
        .batch_execute("CREATE TABLE accounts (id int, secret text); INSERT INTO accounts VALUES (1, 'x')")
        .await
        .unwrap();
    insert_events(&owner, &[NewEvent::keyed("t", "k", 1)]).await;
    let relay_db = connect(&env.config().database.url).await;

    for statement in [
        "INSERT INTO outbox (topic, key, payload) VALUES ('t', 'k', '{}')",
        "UPDATE outbox SET payload = '{\"forged\": true}'",
        "UPDATE outbox SET event_id = gen_random_uuid()",
        "UPDATE outbox SET topic = 'elsewhere'",
        "DELETE FROM outbox",
        "ALTER TABLE outbox ADD COLUMN extra text",
        "DROP TABLE outbox",
        "TRUNCATE outbox",
        "SELECT * FROM accounts",
        "SELECT nextval('outbox_id_seq')",
        "CREATE TABLE mine (x int)",
        "SELECT version FROM outbox_relay_schema_migrations",
    ] {
        let error = relay_db.batch_execute(statement).await.expect_err(statement);
        let code = error.code().cloned();
        assert!(
            code == Some(SqlState::INSUFFICIENT_PRIVILEGE),
            "{statement}: expected permission denied, got {error:?}"
        );
    }
    // What it may do: read the rows and write the bookkeeping columns.
    let marked = relay_db.execute("UPDATE outbox SET attempts = attempts + 1, last_error = 'x'", &[]).await.unwrap();
    assert_eq!(marked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_delete_a_relay_that_must_delete_refuses_to_start_and_names_the_grant() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    insert_events(&db, &[NewEvent::keyed(&topic, "k", 1)]).await;

    let mut config = env.config();
    config.outbox.mark = MarkMode::Delete;
    let mut relay = spawn_relay_process(&env, &config);
    assert_eq!(relay.wait().await, Some(2), "a missing grant is a setup problem: exit 2\n{}", relay.log());
    let log = relay.log();
    assert!(
        log.contains(&format!("role {} lacks privileges", env.relay_role))
            && log.contains("DELETE (outbox.mark = \"delete\")")
            && log.contains("allow_delete=on"),
        "the error names the role, the privilege, why it is needed and how to grant it:\n{log}"
    );
    assert_eq!(all_event_ids(&db).await.len(), 1, "the row is still there");
    assert!(read_topic(&env.brokers, &topic).await.is_empty(), "nothing was published that could not be marked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_lost_while_running_stops_the_relay_without_marking_and_loses_nothing() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(1).await;
    let db = env.client().await;
    let mut relay = spawn_relay_process(&env, &env.config());
    relay.wait_for_log("shards now published by this relay").await;

    db.batch_execute(&format!("REVOKE UPDATE (published_at) ON outbox FROM {}", env.relay_role)).await.unwrap();
    insert_events(&db, &[NewEvent::keyed(&topic, "k", 1)]).await;
    assert_eq!(relay.wait().await, Some(2), "{}", relay.log());
    let log = relay.log();
    assert!(log.contains("UPDATE on column \"published_at\" (marking rows published)"), "{log}");
    assert_eq!(consume(&env.brokers, &topic, 1).await.len(), 1, "the record went out");
    assert_eq!(unpublished_count(&db).await, 1, "but its row is not marked");

    env.apply_relay_role(false);
    let mut relay = spawn_relay_process(&env, &env.config());
    wait_until(PATIENCE, "the row marked once the grant is back", || async { unpublished_count(&db).await == 0 }).await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "{}", relay.log());
    let records = read_topic(&env.brokers, &topic).await;
    assert_eq!(records.len(), 2, "published again, as after a crash between publish and mark");
    assert_eq!(identical_duplicates(&records).len(), 1, "the same event twice, byte for byte");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_as_the_relay_role_fails_and_says_it_is_the_owners_job() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let url = env.config().database.url;
    let (code, stdout, stderr) = run_command(&["migrate"], &[("OUTBOX_RELAY_DATABASE__URL", &url)]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("migrate must run as the owner of table outbox")
            && stderr.contains(&format!("not as {}", env.relay_role)),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_role_script_runs_again_and_refuses_to_make_a_superuser_the_relay_role() {
    let env = TestEnv::start().await;
    env.migrate().await;
    run_relay_role_script(&env.database_url, &env.relay_role, false).expect("a second run is fine");
    let owner = env.client().await;
    let superuser: String = owner.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    let refused = run_relay_role_script(&env.database_url, &superuser, false).expect_err("a superuser is refused");
    assert!(refused.contains("refusing to use an existing role"), "{refused}");
    let still_super: bool =
        owner.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&superuser]).await.unwrap().get(0);
    assert!(still_super, "and is left as it was");
}
