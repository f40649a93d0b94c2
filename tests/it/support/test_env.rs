//! [`TestEnv`], the world one test runs in: a PostgreSQL server, a broker (shared or its own), a
//! fresh database with the relay's restricted role, a scratch directory, and relay
//! configurations pointed at all of them.
//!
//! `OUTBOX_TEST_DATABASE_URL` (a superuser URL) and `OUTBOX_TEST_KAFKA_BROKERS` point the tests
//! at servers that are already running instead of starting their own; the database and topics
//! are still the test's own.

use std::path::PathBuf;
use std::time::Duration;

use outbox_relay::config::Config;
use tokio_postgres::Client;

use super::database::{RELAY_PASSWORD, connect, login_as, replace_dbname, run_relay_role_script};
use super::environment::unique_name;
use super::kafka::Kafka;
use super::postgres::Postgres;
use super::topics::create_topic;

/// A PostgreSQL database and a broker for one test.
pub struct TestEnv {
    /// The server this test started, if it started one.
    pub postgres: Option<Postgres>,
    /// The Kafka this test started, if it started one.
    pub broker: Option<Kafka>,
    /// Superuser URL of this test's own database: the table owner's login, which `migrate`
    /// and the tests' own writes (the application's) use.
    pub database_url: String,
    /// The restricted role the relay logs in as, created by [`TestEnv::migrate`] with
    /// `sql/relay_role.sql`: unique to this database, since roles are cluster-wide.
    pub relay_role: String,
    /// Its login URL, once [`TestEnv::migrate`] has created it.
    relay_url: std::sync::OnceLock<String>,
    /// Bootstrap servers.
    pub brokers: String,
    _work: tempfile::TempDir,
}

impl TestEnv {
    /// Starts (or connects to) PostgreSQL and a broker, and creates a fresh database. The broker
    /// may be shared with other tests: a test that stops or freezes it uses
    /// [`TestEnv::start_with_own_broker`].
    pub async fn start() -> TestEnv {
        Self::start_with(Postgres::start, shared_or_own_broker).await
    }

    /// As [`TestEnv::start`], on a server that writes logical WAL (`wal_level=logical`), which
    /// Debezium's connector reads ([`super::debezium`]). With `OUTBOX_TEST_DATABASE_URL` the
    /// server is that one, as it is: [`super::debezium::Debezium::start`] checks it.
    pub async fn start_with_logical_wal() -> TestEnv {
        Self::start_with(|| Postgres::start_with(&["wal_level=logical"]), shared_or_own_broker).await
    }

    /// As [`TestEnv::start`], with a single-node Kafka of this test's own, whatever
    /// `OUTBOX_TEST_KAFKA_BROKERS` says.
    pub async fn start_with_own_broker() -> TestEnv {
        Self::start_with(Postgres::start, || (Some(Kafka::start()), None)).await
    }

    /// As [`TestEnv::start`], but the broker (this test's own) is only prepared, its ports
    /// reserved: it starts when the test calls [`TestEnv::start_broker`].
    pub async fn start_with_broker_later() -> TestEnv {
        Self::start_with(Postgres::start, || (Some(Kafka::prepare(1, &[])), None)).await
    }

    /// As [`TestEnv::start`], with an Apache Kafka cluster of this test's own: `nodes` nodes, each
    /// a broker and a KRaft controller, with extra broker `properties` (`key=value`).
    pub async fn start_with_cluster(nodes: usize, properties: &[&str]) -> TestEnv {
        Self::start_with(Postgres::start, || (Some(Kafka::start_cluster(nodes, properties)), None)).await
    }

    /// Starts the broker prepared by [`TestEnv::start_with_broker_later`].
    pub fn start_broker(&mut self) {
        let kafka = self.broker.as_mut().expect("a prepared broker");
        assert!(kafka.start_all(), "Apache Kafka did not start");
    }

    async fn start_with(pg: fn() -> Postgres, broker: impl FnOnce() -> (Option<Kafka>, Option<String>)) -> TestEnv {
        // OUTBOX_TEST_LOG=debug shows the in-process relay's log in a failing test's output.
        if let Ok(filter) = std::env::var("OUTBOX_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let (postgres, admin_url) = match std::env::var("OUTBOX_TEST_DATABASE_URL") {
            Ok(url) => (None, url),
            Err(_) => {
                let server = pg();
                let url = server.url("postgres");
                (Some(server), url)
            }
        };
        let (broker, shared) = broker();
        let brokers = match (&broker, shared) {
            (Some(kafka), _) => kafka.address(),
            (None, Some(shared)) => shared,
            (None, None) => unreachable!("a test has its own broker or a shared one"),
        };
        let database = unique_name("db");
        let admin = connect(&admin_url).await;
        admin.batch_execute(&format!("CREATE DATABASE {database}")).await.expect("create test database");
        let database_url = replace_dbname(&admin_url, &database);
        let relay_role = database.replacen("db_", "relay_", 1);
        TestEnv {
            postgres,
            broker,
            database_url,
            relay_role,
            relay_url: std::sync::OnceLock::new(),
            brokers,
            _work: tempfile::tempdir().expect("work dir"),
        }
    }

    /// A relay configuration for this environment: fast polling, no metrics endpoint. After
    /// [`TestEnv::migrate`] it logs in as the restricted relay role; before (a test that
    /// creates a table of its own), as the owner.
    pub fn config(&self) -> Config {
        let mut config = self.owner_config();
        if let Some(url) = self.relay_url.get() {
            config.database.url = url.clone();
        }
        config
    }

    /// As [`TestEnv::config`], but logged in as the owner of the tables (a superuser).
    pub fn owner_config(&self) -> Config {
        let mut config = Config::default();
        config.database.url = self.database_url.clone();
        config.kafka.brokers = self.brokers.clone();
        config.metrics.listen = String::new();
        config.relay.poll_interval = Duration::from_millis(20);
        config.relay.stats_interval = Duration::from_millis(100);
        config.relay.backoff_initial = Duration::from_millis(50);
        config.relay.backoff_max = Duration::from_secs(1);
        config
    }

    /// [`TestEnv::config`] that gives up on a row after `max_attempts`, retrying it within
    /// tens of milliseconds, so that a poison row is failed within a second.
    pub fn poison_config(&self, max_attempts: u32) -> Config {
        let mut config = self.config();
        config.relay.max_attempts = max_attempts;
        config.relay.retry_backoff_initial = Duration::from_millis(50);
        config.relay.retry_backoff_max = Duration::from_millis(200);
        config
    }

    /// A new connection to this test's database.
    pub async fn client(&self) -> Client {
        connect(&self.database_url).await
    }

    /// Creates the standard outbox table with the relay's own migrate, run as the owner, and
    /// the relay's restricted role with `sql/relay_role.sql` (no DELETE); from then on
    /// [`TestEnv::config`] logs in as that role.
    pub async fn migrate(&self) {
        outbox_relay::postgres::schema::migrate(&self.owner_config()).await.expect("migrate");
        self.apply_relay_role(false);
        let _ = self.relay_url.set(login_as(&self.database_url, &self.relay_role, RELAY_PASSWORD));
    }

    /// Runs `sql/relay_role.sql` again with `allow_delete=on`: the relay role may delete rows
    /// (retention, `outbox.mark = "delete"`).
    pub fn allow_relay_to_delete(&self) {
        self.apply_relay_role(true);
    }

    /// Runs `sql/relay_role.sql` with psql as the owner, as an operator would; it sets the
    /// relay role's privileges on the table from scratch.
    pub fn apply_relay_role(&self, allow_delete: bool) {
        run_relay_role_script(&self.database_url, &self.relay_role, allow_delete).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Creates a topic with a unique name and returns the name.
    pub async fn create_topic(&self, partitions: i32) -> String {
        let name = unique_name("topic");
        create_topic(&self.brokers, &name, partitions).await;
        name
    }

    /// A file under this test's scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self._work.path().join(name)
    }

    /// Creates another database on this test's server as a copy of this test's database
    /// (`CREATE DATABASE ... TEMPLATE`), as tenants cloned from one template are: the same
    /// tables, with the same OIDs, and the same grants. Call it before connecting to this
    /// test's database (a template must have no sessions). Returns a relay configuration for
    /// the copy, and the owner's URL of it.
    pub async fn copy_database(&self) -> (Config, String) {
        let source = url::Url::parse(&self.database_url).expect("database URL");
        let source = source.path().trim_start_matches('/').to_owned();
        let copy = unique_name("db");
        let admin = connect(&replace_dbname(&self.database_url, "postgres")).await;
        admin.batch_execute(&format!("CREATE DATABASE {copy} TEMPLATE {source}")).await.expect("copy the database");
        let owner_url = replace_dbname(&self.database_url, &copy);
        let mut config = self.config();
        config.database.url = login_as(&owner_url, &self.relay_role, RELAY_PASSWORD);
        (config, owner_url)
    }
}

/// The broker of `OUTBOX_TEST_KAFKA_BROKERS`, else a single node of the test's own.
fn shared_or_own_broker() -> (Option<Kafka>, Option<String>) {
    match std::env::var("OUTBOX_TEST_KAFKA_BROKERS") {
        Ok(shared) => (None, Some(shared)),
        Err(_) => (Some(Kafka::start()), None),
    }
}

/// For a test without a [`TestEnv`]: the shared broker, or one of its own (keep the first
/// element alive as long as the broker is used), and its bootstrap servers.
pub fn test_broker() -> (Option<Kafka>, String) {
    match shared_or_own_broker() {
        (Some(own), _) => {
            let address = own.address();
            (Some(own), address)
        }
        (None, shared) => (None, shared.unwrap_or_default()),
    }
}
