//! Debezium's PostgreSQL connector with its outbox EventRouter, the relay ours is compared with
//! byte for byte (issue 25): Kafka Connect standalone, run by `scripts/debezium.sh` for one
//! outbox table of a test's database, with the connector properties the test gives on top of
//! the script's defaults.
//!
//! It needs a Java runtime, Kafka Connect's and Debezium's jars (`scripts/debezium.sh fetch`,
//! which `scripts/install-deps.sh test` runs) and a server with `wal_level=logical`
//! ([`TestEnv::start_with_logical_wal`](super::TestEnv::start_with_logical_wal)); a test without
//! them fails saying which is missing. It never fetches anything itself.
//!
//! The replication slot and publication it creates are dropped when the [`Debezium`] is
//! dropped, a panicking test's included: a slot left behind holds every WAL segment from its
//! position on.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::database::connect;
use super::environment::unique_name;
use super::processes::{print_log_tail, reap_if_exited, set_parent_death_signal, stop_child};

/// How long Connect may take to stream after its JVM starts (15 s on an idle 2-core machine,
/// 25-45 s beside a benchmark).
const STARTUP: Duration = Duration::from_secs(180);
/// How long a graceful stop may take before a kill.
const STOP: Duration = Duration::from_secs(60);
/// What Debezium logs once it streams from its slot: rows committed from then on are read.
const STREAMING: &str = "Processing messages";
/// What Connect logs when a record kills the task (it is not restarted).
const TASK_KILLED: &str = "Task threw an uncaught and unrecoverable exception";

/// `scripts/debezium.sh` of this checkout.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join("debezium.sh")
}

/// A Kafka Connect worker running Debezium's connector with its outbox EventRouter for one
/// table; stopped, and its slot and publication dropped, on drop.
pub struct Debezium {
    child: Option<Child>,
    /// Its configuration, offsets and log (`scripts/debezium.sh run DIR`).
    dir: TempDir,
    /// The replication slot, publication and `topic.prefix` (so the value of the
    /// `__debezium.context.connectorLogicalName` header).
    pub slot: String,
}

impl Debezium {
    /// Starts Debezium for `table` (`schema.table`, in Debezium's outbox layout) of the database
    /// at `database_url` (a superuser's URL; the server must run with `wal_level=logical`),
    /// writing to `brokers`, with connector `properties` (`key`, `value`) added to or
    /// overriding the script's defaults; returns once the connector streams, so that rows
    /// committed from then on are read.
    pub async fn start(database_url: &str, brokers: &str, table: &str, properties: &[(&str, &str)]) -> Debezium {
        require_installed();
        require_logical_wal(database_url).await;
        let slot = unique_name("debezium");
        let dir = tempfile::Builder::new().prefix("outbox-relay-debezium-").tempdir().expect("temp dir");
        let log = File::create(dir.path().join("connect.log")).expect("Connect's log file");
        let mut command = Command::new(script());
        command
            .arg("run")
            .arg(dir.path())
            .args(["--brokers", brokers, "--database", database_url, "--table", table, "--slot", &slot])
            // A record that kills the task is then named in the log, which task_failure quotes.
            .args(["--connector-property", "errors.log.enable=true"])
            .args(["--connector-property", "errors.log.include.messages=true"])
            .args(
                properties
                    .iter()
                    .flat_map(|(key, value)| ["--connector-property".to_owned(), format!("{key}={value}")]),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        // The script execs the JVM, which keeps this: no worker outlives the test.
        set_parent_death_signal(&mut command, libc::SIGKILL);
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", script().display()));
        let mut debezium = Debezium { child: Some(child), dir, slot };
        debezium.wait_streaming().await;
        debezium
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("connect.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn wait_streaming(&mut self) {
        let deadline = Instant::now() + STARTUP;
        while !self.log().contains(STREAMING) {
            if reap_if_exited(&mut self.child) {
                panic!("Kafka Connect exited before Debezium streamed; its log is printed below");
            }
            assert!(Instant::now() < deadline, "Debezium did not start streaming within {STARTUP:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until a record kills Debezium's task, and returns why ([`Debezium::task_failure`]):
    /// to race against reading records that will then never come.
    pub async fn task_death(&self) -> String {
        loop {
            if let Some(failure) = self.task_failure() {
                return failure;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Why Debezium's task died, if a record killed it: Connect's errors from its log (a
    /// killed task is not restarted, so nothing after that record is written).
    pub fn task_failure(&self) -> Option<String> {
        let log = self.log();
        if !log.contains(TASK_KILLED) {
            return None;
        }
        // Each error with its exceptions and their causes, without the stack frames. Connect
        // reports a converter of another plugin it cannot load at every start: not these.
        let mut errors = Vec::new();
        let mut in_error = false;
        for line in log.lines() {
            if line.starts_with('[') {
                in_error = line.contains(" ERROR ") && !line.contains("Failed to discover");
                if in_error {
                    // The record a stage failed on comes first; the rest is its source offset.
                    errors.push(line.chars().take(700).collect::<String>());
                }
            } else if in_error && !line.trim_start().starts_with("at ") && !line.trim_start().starts_with("...") {
                errors.push(format!("    {line}"));
            }
        }
        Some(errors.join("\n"))
    }
}

impl Drop for Debezium {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(failure) = self.task_failure() {
                eprintln!("---- Debezium's task died: a record killed it ----\n{failure}");
            }
            print_log_tail("kafka connect", &self.log_path());
        }
        stop_child(self.child.take(), libc::SIGTERM, STOP);
        match Command::new(script()).arg("teardown").arg(self.dir.path()).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "scripts/debezium.sh teardown left replication slot {} behind: {}",
                self.slot,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("cannot run scripts/debezium.sh teardown: {e}"),
        }
    }
}

/// Panics saying what to install when Java or Debezium's jars are missing.
fn require_installed() {
    let java = std::env::var("JAVA").unwrap_or_else(|_| "java".to_owned());
    let runs = Command::new(&java).arg("-version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(
        runs.is_ok_and(|status| status.success()),
        "Debezium needs a Java runtime, and `{java} -version` does not run: install one \
         (scripts/install-deps.sh test does) or point JAVA at it"
    );
    let cached = Command::new(script()).arg("cached").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(
        cached.is_ok_and(|status| status.success()),
        "Kafka Connect's and Debezium's jars are not cached: run scripts/debezium.sh fetch \
         (scripts/install-deps.sh test does; it needs Maven and Maven Central)"
    );
}

/// Panics unless the server at `database_url` writes logical WAL, which Debezium reads.
async fn require_logical_wal(database_url: &str) {
    let db = connect(database_url).await;
    let wal_level: String = db.query_one("SHOW wal_level", &[]).await.expect("SHOW wal_level").get(0);
    assert_eq!(
        wal_level, "logical",
        "Debezium needs a PostgreSQL server with wal_level=logical: start the test with \
         TestEnv::start_with_logical_wal, or run OUTBOX_TEST_DATABASE_URL's server with it"
    );
}
