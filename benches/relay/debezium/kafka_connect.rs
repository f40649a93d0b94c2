//! Debezium's PostgreSQL connector on Kafka Connect standalone, as the benchmark runs it: a
//! child process (`scripts/debezium.sh run`, which execs the JVM) that dies with the benchmark,
//! stopped and started again on the same offsets and replication slot, and torn down (slot
//! and publication dropped) when dropped. What the connector is configured with is the
//! script's business; this module only runs it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::support::processes::{print_log_tail, reap_if_exited, set_parent_death_signal, stop_child};

/// How long Connect may take to stream after its JVM starts (25-45 s on a loaded 2-core machine).
const STARTUP: Duration = Duration::from_secs(180);
/// How long a graceful stop (the connector commits its offsets) may take before a kill.
const STOP: Duration = Duration::from_secs(60);

/// `scripts/debezium.sh` of this checkout.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join("debezium.sh")
}

/// Why the benchmark runs without Debezium, or `None` when it can run it: the jars are fetched
/// from Maven Central (once, then cached) unless `OUTBOX_BENCH_DEBEZIUM=off`.
pub fn unavailable() -> Option<String> {
    if std::env::var("OUTBOX_BENCH_DEBEZIUM").is_ok_and(|v| v == "off") {
        return Some("OUTBOX_BENCH_DEBEZIUM=off".to_owned());
    }
    match Command::new(script()).arg("fetch").stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(
            String::from_utf8_lossy(&out.stderr).lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_owned(),
        ),
        Err(e) => Some(format!("cannot run {}: {e}", script().display())),
    }
}

/// A Kafka Connect worker running Debezium's connector for one outbox table.
pub struct Connect {
    child: Option<Child>,
    /// Its configuration, offsets file and log (`scripts/debezium.sh run DIR`).
    dir: TempDir,
    /// The `run` options, kept for a start on the same offsets and slot.
    options: Vec<String>,
    /// Keeps Connect's last log under this name in `$OUTBOX_BENCH_LOGS`, when set.
    name: String,
}

impl Connect {
    /// Starts a worker streaming `table` (`schema.table`) of the database at `database_url`
    /// into `brokers` through replication slot `slot`, handing changes to Connect every
    /// `poll_interval_ms`. It is not streaming yet: see [`Connect::wait_streaming`].
    pub fn start(database_url: &str, brokers: &str, table: &str, slot: &str, poll_interval_ms: u64) -> Connect {
        let dir = tempfile::Builder::new().prefix("outbox-relay-connect-").tempdir().expect("temp dir");
        let options = [
            ("--brokers", brokers),
            ("--database", database_url),
            ("--table", table),
            ("--slot", slot),
            ("--poll-interval-ms", &poll_interval_ms.to_string()),
        ]
        .iter()
        .flat_map(|(option, value)| [option.to_string(), value.to_string()])
        .collect();
        let mut connect = Connect { child: None, dir, options, name: format!("connect-{slot}") };
        connect.spawn();
        connect
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("connect.log")
    }

    fn spawn(&mut self) {
        // A fresh log per start, so waiting for streaming sees this start's line.
        let log = File::create(self.log_path()).expect("Connect's log file");
        let mut command = Command::new(script());
        command
            .arg("run")
            .arg(self.dir.path())
            .args(&self.options)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        // The script execs the JVM, which keeps this: no worker outlives the benchmark.
        set_parent_death_signal(&mut command, libc::SIGKILL);
        self.child = Some(command.spawn().unwrap_or_else(|e| panic!("cannot run scripts/debezium.sh ({e})")));
    }

    /// The JVM's process id (the script execs it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("Connect runs").id()
    }

    /// Waits until the connector streams from its slot (Debezium logs "Processing messages").
    pub async fn wait_streaming(&mut self) {
        let deadline = Instant::now() + STARTUP;
        loop {
            if std::fs::read_to_string(self.log_path()).is_ok_and(|log| log.contains("Processing messages")) {
                return;
            }
            if reap_if_exited(&mut self.child) || Instant::now() > deadline {
                print_log_tail("kafka connect", &self.log_path());
                panic!("Debezium's connector did not start streaming within {STARTUP:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the worker gracefully (it commits its offsets; the slot stays).
    pub fn stop(&mut self) {
        stop_child(self.child.take(), libc::SIGTERM, STOP);
        self.keep_log();
    }

    /// Starts the stopped worker again, on its offsets and slot.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "Connect runs");
        self.spawn();
    }

    /// Copies Connect's log to `$OUTBOX_BENCH_LOGS/<name>.log` when that variable names a
    /// directory.
    fn keep_log(&self) {
        if let Some(dir) = std::env::var_os("OUTBOX_BENCH_LOGS") {
            let dir = PathBuf::from(dir);
            if let Err(e) = std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::copy(self.log_path(), dir.join(format!("{}.log", self.name))))
            {
                eprintln!("cannot keep Connect's log in {}: {e}", dir.display());
            }
        }
    }
}

impl Drop for Connect {
    /// Stops the worker and drops its replication slot and publication: a slot left behind
    /// holds every WAL segment from its position on.
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        match Command::new(script()).arg("teardown").arg(self.dir.path()).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("scripts/debezium.sh teardown failed: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => eprintln!("cannot run scripts/debezium.sh teardown: {e}"),
        }
    }
}
