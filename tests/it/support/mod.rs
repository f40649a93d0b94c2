//! The harness the integration tests stand on: a real PostgreSQL and Apache Kafka started on
//! free loopback ports, a fresh database per test, a real consumer to read topics back, and the
//! relay run either in-process or as the built binary.
//!
//! `OUTBOX_TEST_DATABASE_URL` (a superuser URL) and `OUTBOX_TEST_KAFKA_BROKERS` point the tests
//! at servers that are already running instead; every test still gets its own database and
//! its own topics, so tests never see each other's rows or records. `scripts/test.sh` starts
//! one Kafka node for the whole run and sets `OUTBOX_TEST_KAFKA_BROKERS`, since a JVM takes
//! seconds to start; a test that stops, kills or freezes a broker starts its own.

pub mod kafka;
pub mod postgres;
pub mod secured_kafka;
pub mod tls;

use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::config::Config;
use outbox_relay::relay::RelayError;
use outbox_relay::service::metrics::Metrics;
use outbox_relay::{Relay, Shutdown};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

pub use kafka::Kafka;
pub use postgres::Postgres;

/// How long a test waits for something that should happen in well under a second on an idle
/// machine. Generous, because CI machines are loaded; a passing test never waits this long.
pub const PATIENCE: Duration = Duration::from_secs(60);

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

    /// Starts a relay in this process.
    pub fn spawn_relay(&self, config: Config) -> RunningRelay {
        RunningRelay::spawn(config)
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

/// The shards of the standard outbox table each running relay holds, by the backend pid of
/// its session, from PostgreSQL's lock table (this database's locks, keyed by the table's OID).
pub async fn shard_holders(db: &Client) -> std::collections::HashMap<i32, usize> {
    let rows = db
        .query(
            "SELECT pid, count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND classid = (hashtext('outbox-relay-shard:' || 'outbox'::regclass::oid::text) & 2147483647)::oid \
             GROUP BY pid",
            &[],
        )
        .await
        .expect("shard holders");
    rows.iter().map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1) as usize)).collect()
}

/// The test relay role's password. The test server trusts every local login, so it only shows
/// that the script sets one; an external server may check it.
pub const RELAY_PASSWORD: &str = "relay-secret";

/// Runs `sql/relay_role.sql` with psql against `owner_url` for `role`; the error carries psql's
/// output.
pub fn run_relay_role_script(owner_url: &str, role: &str, allow_delete: bool) -> Result<String, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/relay_role.sql");
    let out = Command::new(postgres::bindir().join("psql"))
        .arg(owner_url)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(["-v", &format!("relay_role={role}"), "-v", &format!("relay_password={RELAY_PASSWORD}")])
        .args(["-v", if allow_delete { "allow_delete=on" } else { "allow_delete=off" }])
        .args(["-f", script])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run psql: {e}"))?;
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(output) } else { Err(format!("sql/relay_role.sql failed: {output}")) }
}

/// `url` with its user and password replaced.
pub fn login_as(url: &str, user: &str, password: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.scheme().starts_with("postgres") => {
            let _ = parsed.set_username(user);
            let _ = parsed.set_password(Some(password));
            parsed.to_string()
        }
        _ => format!("{url} user={user} password={password}"),
    }
}

fn replace_dbname(url: &str, database: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.scheme().starts_with("postgres") => {
            parsed.set_path(&format!("/{database}"));
            parsed.to_string()
        }
        _ => format!("{url} dbname={database}"),
    }
}

/// Connects to PostgreSQL, panicking with the reason if it cannot.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect to test PostgreSQL");
    tokio::spawn(connection);
    client
}

/// A name no other test uses: lower case, so it is the same quoted or not.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller retries if it is taken later).
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Makes the child receive `signal` when the test process dies, so no server outlives it.
pub fn set_parent_death_signal(command: &mut Command, signal: i32) {
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Prints the end of a server's log, so a failing test shows what the server saw.
pub fn print_log_tail(name: &str, path: &std::path::Path) {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let kept = std::env::temp_dir().join(format!("outbox-test-{name}-{}.log", uuid::Uuid::new_v4().simple()));
    if std::fs::copy(path, &kept).is_ok() {
        eprintln!("the whole {name} log is kept at {}", kept.display());
    }
    let lines: Vec<&str> = log.lines().collect();
    let head = &lines[..lines.len().min(20)];
    let tail = &lines[lines.len().saturating_sub(20).max(head.len())..];
    eprintln!(
        "---- the {name} log ({}), first and last lines ----\n{}\n...\n{}",
        path.display(),
        head.join("\n"),
        tail.join("\n")
    );
}

/// Sends `signal` to a server process, waits up to `grace` for it to exit, then kills it.
pub fn stop_child(child: Option<Child>, signal: i32, grace: Duration) {
    let Some(mut child) = child else { return };
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Calls `launch` until the server is up again on its old port (which the previous process
/// may hold for a moment after it exits).
pub fn relaunch(what: &str, port: u16, mut launch: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !launch() {
        assert!(Instant::now() < deadline, "{what} did not restart on port {port}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// True (and forgets the child) if the server process has exited, e.g. because its port was
/// taken between choosing it and binding it.
pub fn reap_if_exited(child: &mut Option<Child>) -> bool {
    if let Some(running) = child.as_mut()
        && let Ok(Some(_)) = running.try_wait()
    {
        *child = None;
        return true;
    }
    false
}

/// Waits until `condition` holds, checking every 25 ms, and panics naming `what` after `within`.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Kafka

/// Creates `name` with `partitions` partitions and waits until the broker reports it.
pub async fn create_topic(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let results = admin
        // The cluster's default replication factor: 1 on one node, 3 on three.
        .create_topics(&[NewTopic::new(name, partitions, TopicReplication::Fixed(-1))], &AdminOptions::new())
        .await
        .expect("create topic");
    for result in results {
        result.unwrap_or_else(|(topic, e)| panic!("create topic {topic}: {e}"));
    }
    let name = name.to_owned();
    wait_until(PATIENCE, "the new topic's metadata", || {
        let admin = &admin;
        let name = name.clone();
        async move {
            admin
                .inner()
                .fetch_metadata(Some(&name), Duration::from_secs(5))
                .map(|m| {
                    m.topics().iter().any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
                })
                .unwrap_or(false)
        }
    })
    .await;
}

/// Creates a topic with a unique name, `partitions` partitions and the topic `configs` given
/// (`max.message.bytes`, say), waits until the broker reports it, and returns the name.
pub async fn create_topic_with(brokers: &str, partitions: i32, configs: &[(&str, &str)]) -> String {
    let name = unique_name("topic");
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let mut topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(-1));
    for (key, value) in configs {
        topic = topic.set(key, value);
    }
    for result in admin.create_topics(&[topic], &AdminOptions::new()).await.expect("create topic") {
        result.unwrap_or_else(|(topic, e)| panic!("create topic {topic}: {e}"));
    }
    wait_until(PATIENCE, "the new topic's metadata", || async {
        admin
            .inner()
            .fetch_metadata(Some(&name), Duration::from_secs(5))
            .map(|m| m.topics().iter().any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty()))
            .unwrap_or(false)
    })
    .await;
    name
}

/// Sets topic `configs` on `topic` (replacing those set before).
pub async fn alter_topic(brokers: &str, topic: &str, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AlterConfig, ResourceSpecifier};
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let mut change = AlterConfig::new(ResourceSpecifier::Topic(topic));
    for (key, value) in configs {
        change = change.set(key, value);
    }
    for result in admin.alter_configs(&[change], &AdminOptions::new()).await.expect("alter topic") {
        result.unwrap_or_else(|(resource, e)| panic!("alter {resource:?}: {e}"));
    }
}

/// One record read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Partition it was on.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// Key as text.
    pub key: Option<String>,
    /// Value bytes; `None` for a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Received {
    /// The value of header `name` as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()))
    }

    /// The `event_id` header.
    pub fn event_id(&self) -> String {
        self.header("event_id").expect("every record carries an event_id header")
    }

    /// The payload as text.
    pub fn payload_text(&self) -> Option<String> {
        self.payload.as_ref().map(|p| String::from_utf8_lossy(p).into_owned())
    }
}

fn consumer(brokers: &str) -> StreamConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("consumer")
}

/// Assigns every partition of `topic` to `consumer`, from the first offset.
fn assign_from_beginning(consumer: &StreamConsumer, topic: &str, partitions: i32) {
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment.add_partition_offset(topic, p, Offset::Beginning).expect("assignment");
    }
    consumer.assign(&assignment).expect("assign");
}

/// Number of partitions of `topic`.
pub fn partition_count(brokers: &str, topic: &str) -> i32 {
    let consumer = consumer(brokers);
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    metadata.topics().iter().find(|t| t.name() == topic).map(|t| t.partitions().len() as i32).unwrap_or(0)
}

/// Reads `topic` from the beginning until `expected` records arrived; panics if they do not
/// arrive within [`PATIENCE`]. Records are returned in arrival order (per-partition order).
pub async fn consume(brokers: &str, topic: &str, expected: usize) -> Vec<Received> {
    let consumer = consumer(brokers);
    let partitions = partition_count(brokers, topic);
    assign_from_beginning(&consumer, topic, partitions);
    let mut received = Vec::with_capacity(expected);
    let deadline = Instant::now() + PATIENCE;
    while received.len() < expected {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let message = match tokio::time::timeout(remaining, consumer.recv()).await {
            Ok(Ok(message)) => message,
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) => panic!("received {} of {expected} records from {topic} within {PATIENCE:?}", received.len()),
        };
        let record = to_received(&message);
        if record.header(SENTINEL_HEADER).is_none() {
            received.push(record);
        }
    }
    received
}

/// Header marking the harness's own end-of-topic records.
const SENTINEL_HEADER: &str = "outbox-test-sentinel";

/// Everything on `topic` right now, exactly: writes a sentinel record to every partition, then
/// reads from the beginning until each partition's sentinel arrives, and returns the records
/// before them. (Counting by high watermarks is not an option: tansu 0.6 reports them short.)
pub async fn read_topic(brokers: &str, topic: &str) -> Vec<Received> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let partitions = partition_count(brokers, topic);
    // Earlier calls left sentinels too; this call stops only at its own.
    let sentinel = unique_name("end");
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers).create().expect("producer");
    for p in 0..partitions {
        let headers = OwnedHeaders::new().insert(Header { key: SENTINEL_HEADER, value: Some(sentinel.as_str()) });
        producer
            .send(FutureRecord::<(), ()>::to(topic).partition(p).headers(headers), Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("sentinel to {topic}/{p}: {e}"));
    }
    let consumer = consumer(brokers);
    assign_from_beginning(&consumer, topic, partitions);
    let mut ended = std::collections::HashSet::new();
    let mut records = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while ended.len() < partitions as usize {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let message = match tokio::time::timeout(remaining, consumer.recv()).await {
            Ok(Ok(message)) => message,
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) => panic!("reading {topic}: sentinels of {} partitions missing", partitions as usize - ended.len()),
        };
        let received = to_received(&message);
        match received.header(SENTINEL_HEADER) {
            Some(id) if id == sentinel => {
                ended.insert(received.partition);
            }
            Some(_) => {}
            None if !ended.contains(&received.partition) => records.push(received),
            None => {}
        }
    }
    records
}

fn to_received(message: &rdkafka::message::BorrowedMessage<'_>) -> Received {
    let headers = message
        .headers()
        .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(|v| v.to_vec()))).collect())
        .unwrap_or_default();
    Received {
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        payload: message.payload().map(|p| p.to_vec()),
        headers,
    }
}

/// The partition the Java client's default partitioner picks for a keyed record.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// Kafka's `Utils.murmur2`, ported bit for bit, as the reference the relay is checked against.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    let mut h: u32 = SEED ^ (length as u32);
    for chunk in data.chunks_exact(4) {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = &data[length & !3..];
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

// ---------------------------------------------------------------------------------------------
// The relay

/// A relay running as a task of this test.
pub struct RunningRelay {
    /// Requests its shutdown.
    pub shutdown: Shutdown,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    handle: JoinHandle<Result<(), RelayError>>,
}

impl RunningRelay {
    /// Starts a relay task.
    pub fn spawn(config: Config) -> RunningRelay {
        let shutdown = Shutdown::new();
        let relay = Relay::new(config, shutdown.clone()).expect("relay");
        let metrics = relay.metrics();
        let handle = tokio::spawn(relay.run());
        RunningRelay { shutdown, metrics, handle }
    }

    /// Requests shutdown and waits for the relay to finish.
    pub async fn stop(self) -> Result<(), RelayError> {
        self.shutdown.request();
        tokio::time::timeout(PATIENCE, self.handle).await.expect("relay stops").expect("relay task")
    }

    /// Whether the task has ended (it should not, short of shutdown or a config problem).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Path of the built `outbox-relay` binary.
pub fn relay_binary() -> &'static str {
    env!("CARGO_BIN_EXE_outbox-relay")
}

/// Writes `config` to a TOML file and returns its path.
pub fn write_config(env: &TestEnv, config: &Config) -> PathBuf {
    let path = env.path(&format!("{}.toml", unique_name("config")));
    write_config_to(&path, config);
    path
}

/// Writes `config` to the TOML file `path`. Secrets are written as the placeholder (the relay
/// refuses it), so a test gives them by file or environment variable, as operators should.
pub fn write_config_to(path: &Path, config: &Config) {
    std::fs::write(path, toml::to_string(config).expect("config as TOML")).expect("write config");
}

/// Runs `outbox-relay ARGS` to completion with `env_vars`, returning exit code, stdout, stderr.
pub fn run_command(args: &[&str], env_vars: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(relay_binary());
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTBOX_RELAY_") {
            command.env_remove(key);
        }
    }
    command.envs(env_vars.iter().copied());
    let out = command.output().expect("run outbox-relay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `outbox-relay run` as a child process with `config`; its log goes to a file.
pub fn spawn_relay_process(env: &TestEnv, config: &Config) -> RelayProcess {
    spawn_relay_process_with_env(env, config, &[])
}

/// As [`spawn_relay_process`], with extra environment variables (such as `FAILPOINTS`).
pub fn spawn_relay_process_with_env(env: &TestEnv, config: &Config, vars: &[(&str, &str)]) -> RelayProcess {
    let config_path = write_config(env, config);
    spawn_relay_process_from(&config_path, vars, &env.path(""))
}

/// Starts `outbox-relay --config CONFIG_PATH run` with `vars`, logging to a file in `log_dir`.
pub fn spawn_relay_process_from(config_path: &Path, vars: &[(&str, &str)], log_dir: &Path) -> RelayProcess {
    let log_path = log_dir.join(format!("{}.log", unique_name("relay")));
    let log = std::fs::File::create(&log_path).expect("relay log");
    let mut command = Command::new(relay_binary());
    command
        .arg("--config")
        .arg(config_path)
        .arg("run")
        .env("RUST_LOG", "outbox_relay=debug,info")
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    set_parent_death_signal(&mut command, libc::SIGKILL);
    RelayProcess { child: command.spawn().expect("spawn outbox-relay"), log_path }
}

/// The relay binary running as a child process.
pub struct RelayProcess {
    child: Child,
    /// Where its stdout and stderr go.
    pub log_path: PathBuf,
}

impl RelayProcess {
    /// Sends `signal` (SIGTERM, SIGKILL...).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Waits for the process to exit and returns its exit code (None if killed by a signal).
    pub async fn wait(&mut self) -> Option<i32> {
        self.wait_within(PATIENCE).await
    }

    /// As [`RelayProcess::wait`], panicking if the process has not exited within `within`.
    pub async fn wait_within(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "relay did not exit within {within:?}; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until its log contains `text`; on timeout the panic shows the log.
    pub async fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.log().contains(text) {
            assert!(Instant::now() < deadline, "the relay never logged {text:?}; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            print_log_tail("relay", &self.log_path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Outbox rows

/// One event to insert into the standard outbox table.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Topic.
    pub topic: String,
    /// Key.
    pub key: Option<String>,
    /// JSON payload text, or None for a tombstone.
    pub payload: Option<String>,
    /// JSON headers object text.
    pub headers: Option<String>,
}

impl NewEvent {
    /// A keyed event with a small JSON payload.
    pub fn keyed(topic: &str, key: &str, n: usize) -> NewEvent {
        NewEvent {
            topic: topic.to_owned(),
            key: Some(key.to_owned()),
            payload: Some(format!(r#"{{"key":"{key}","n":{n}}}"#)),
            headers: None,
        }
    }
}

/// Inserts events in one transaction (one statement) and returns their ids in order.
pub async fn insert_events(client: &Client, events: &[NewEvent]) -> Vec<i64> {
    let topics: Vec<&str> = events.iter().map(|e| e.topic.as_str()).collect();
    let keys: Vec<Option<&str>> = events.iter().map(|e| e.key.as_deref()).collect();
    let payloads: Vec<Option<&str>> = events.iter().map(|e| e.payload.as_deref()).collect();
    let headers: Vec<Option<&str>> = events.iter().map(|e| e.headers.as_deref()).collect();
    let rows = client
        .query(
            "INSERT INTO outbox (topic, key, payload, headers) \
             SELECT t, k, p::jsonb, h::jsonb FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) \
             WITH ORDINALITY AS e(t, k, p, h, n) ORDER BY n RETURNING id",
            &[&topics, &keys, &payloads, &headers],
        )
        .await
        .expect("insert events");
    let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort_unstable();
    ids
}

/// Inserts events `range` of `topic`, keyed `key-{n % keys}`, in transactions of up to 5,000.
pub async fn insert_backlog(db: &Client, topic: &str, range: std::ops::Range<usize>, keys: usize) {
    let mut start = range.start;
    while start < range.end {
        let end = (start + 5_000).min(range.end);
        let events: Vec<NewEvent> =
            (start..end).map(|n| NewEvent::keyed(topic, &format!("key-{}", n % keys), n)).collect();
        insert_events(db, &events).await;
        start = end;
    }
}

/// Event ids of the standard outbox table's rows that match `filter` (a SQL condition).
async fn event_ids_where(db: &Client, filter: &str) -> std::collections::HashSet<String> {
    let sql = format!("SELECT event_id::text FROM outbox WHERE {filter}");
    db.query(&sql, &[]).await.expect("event ids").iter().map(|r| r.get(0)).collect()
}

/// Event ids of every row.
pub async fn all_event_ids(db: &Client) -> std::collections::HashSet<String> {
    event_ids_where(db, "true").await
}

/// Event ids of the rows marked published.
pub async fn marked_event_ids(db: &Client) -> std::collections::HashSet<String> {
    event_ids_where(db, "published_at IS NOT NULL").await
}

/// Event ids of the rows not yet published.
pub async fn unmarked_event_ids(db: &Client) -> std::collections::HashSet<String> {
    event_ids_where(db, "published_at IS NULL").await
}

/// Rows of the standard outbox table not yet published.
pub async fn unpublished_count(client: &Client) -> i64 {
    client.query_one("SELECT count(*) FROM outbox WHERE published_at IS NULL", &[]).await.expect("count").get(0)
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// GETs `path` from `addr`; returns the status code and the body (status 0 when nothing
/// listens there).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Not listening (yet, or any more) reads as status 0, so wait conditions can poll through it.
    let mut stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(stream) => stream,
        Err(e) => return (0, e.to_string()),
    };
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: relay\r\n\r\n").as_bytes()).await.expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("response");
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// GETs `/metrics` from `addr` and returns the text.
pub async fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the sample line that starts with `series` (name plus labels).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Produces `record` to `topic` again (same partition, key, value and headers), as a crash
/// between publish and mark would; `payload` replaces the value when given.
pub async fn produce_copy(brokers: &str, topic: &str, record: &Received, payload: Option<&[u8]>) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers).create().expect("producer");
    let mut headers = OwnedHeaders::new();
    for (key, value) in &record.headers {
        headers = headers.insert(Header { key, value: value.as_deref() });
    }
    let mut copy = FutureRecord::<[u8], [u8]>::to(topic).partition(record.partition).headers(headers);
    let key = record.key.as_ref().map(|k| k.as_bytes().to_vec());
    if let Some(key) = &key {
        copy = copy.key(key.as_slice());
    }
    let value = payload.map(|p| p.to_vec()).or_else(|| record.payload.clone());
    if let Some(value) = &value {
        copy = copy.payload(value.as_slice());
    }
    producer.send(copy, Duration::from_secs(30)).await.unwrap_or_else(|(e, _)| panic!("produce a copy: {e}"));
}

// ---------------------------------------------------------------------------------------------
// Checks over a topic's records

/// The `n` of the payloads (`{"n": ...}`) of `key`'s records, in topic order, first copies only.
pub fn key_sequence(records: &[Received], key: &str) -> Vec<i64> {
    let mut seen = std::collections::HashSet::new();
    records
        .iter()
        .filter(|r| r.key.as_deref() == Some(key) && seen.insert(r.event_id()))
        .filter_map(|r| r.payload_text())
        .filter_map(|p| serde_json::from_str::<serde_json::Value>(&p).ok()?["n"].as_i64())
        .collect()
}

/// Whether `copy` is the same record as `original` (event id, key, value, headers and
/// partition), whatever its offset.
pub fn is_same_record(original: &Received, copy: &Received) -> bool {
    original.partition == copy.partition
        && original.key == copy.key
        && original.payload == copy.payload
        && original.headers == copy.headers
}

/// Duplicated event ids of `records`, each checked byte-identical to its first copy.
pub fn identical_duplicates(records: &[Received]) -> std::collections::HashSet<String> {
    let mut first: std::collections::HashMap<String, &Received> = std::collections::HashMap::new();
    let mut duplicated = std::collections::HashSet::new();
    for record in records {
        match first.get(&record.event_id()) {
            None => {
                first.insert(record.event_id(), record);
            }
            Some(original) => {
                assert!(
                    is_same_record(original, record),
                    "a duplicate differs from its first copy: {original:?} / {record:?}"
                );
                duplicated.insert(record.event_id());
            }
        }
    }
    duplicated
}

/// Checks that, per key, the first copies of the events arrive in the order of the payload's
/// `n` (as written by [`NewEvent::keyed`]). Repeats after a crash come later and are ignored.
pub fn assert_first_copies_in_key_order(records: &[Received]) {
    let mut sorted: Vec<&Received> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut seen = std::collections::HashSet::new();
    let mut last: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for record in sorted {
        if !seen.insert(record.event_id()) {
            continue;
        }
        let key = record.key.clone().unwrap_or_default();
        let payload: serde_json::Value =
            serde_json::from_slice(record.payload.as_deref().unwrap_or(b"null")).expect("JSON payload");
        let n = payload["n"].as_i64().expect("payload n");
        if let Some(previous) = last.insert(key.clone(), n) {
            assert!(n > previous, "key {key}: event {n} arrived after {previous}");
        }
    }
}

/// A small deterministic generator, so that a failing run can be repeated with its seed.
pub struct Random(u64);

impl Random {
    /// Seeded from `OUTBOX_TEST_SEED`, else from the clock (the seed is printed).
    pub fn from_env() -> Random {
        let seed = std::env::var("OUTBOX_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        });
        eprintln!("random kill times from OUTBOX_TEST_SEED={seed}");
        Random(seed | 1)
    }

    /// A number below `bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// Starts the relay `crashes` times and kills each with SIGKILL at a random moment of its
/// steady drain, and returns the event ids that were unmarked at some kill: the only rows
/// that may reach the topic twice.
pub async fn kill_the_relay_at_random_moments(
    env: &TestEnv,
    config: &Config,
    db: &Client,
    crashes: usize,
) -> std::collections::HashSet<String> {
    let mut random = Random::from_env();
    let mut in_flight_at_a_crash = std::collections::HashSet::new();
    for crash in 0..crashes {
        let mut relay = spawn_relay_process(env, config);
        // A new producer's first acknowledgement takes a while (producer id, metadata); wait
        // for the first settled batch so that the kill lands in the steady drain, at a random
        // moment of a batch: claiming, producing, awaiting reports, or marking.
        wait_until(PATIENCE, "the relay to settle a batch", || async {
            relay.log().contains("batch settled") || unpublished_count(db).await == 0
        })
        .await;
        tokio::time::sleep(Duration::from_millis(random.below(400))).await;
        relay.signal(libc::SIGKILL);
        assert_eq!(relay.wait().await, None, "crash {crash}: killed");
        in_flight_at_a_crash.extend(unmarked_event_ids(db).await);
    }
    in_flight_at_a_crash
}

/// Records the in-process relay has set aside because their partition stalled, over every
/// topic and partition (`outbox_relay_stalled_records`).
pub fn set_aside_records(metrics: &outbox_relay::service::metrics::Metrics) -> i64 {
    metrics
        .render()
        .lines()
        .filter(|line| line.starts_with("outbox_relay_stalled_records{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<i64>().ok())
        .sum()
}
