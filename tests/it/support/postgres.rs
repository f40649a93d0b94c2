//! A throwaway PostgreSQL server on a free loopback port.
//!
//! `initdb` runs once per machine into a template directory (guarded by a file lock, since
//! nextest runs every test in its own process); each server copies the template, which takes
//! a fraction of a second instead of seconds. PostgreSQL refuses to run as root, so as root the
//! server runs as the `postgres` OS user.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::environment::free_port;
use super::processes::{print_log_tail, reap_if_exited, relaunch, set_parent_death_signal, stop_child};

/// Bump when the template's initdb options change.
const TEMPLATE_VERSION: &str = "v1";

/// A running PostgreSQL server; stopped and deleted on drop.
pub struct Postgres {
    child: Option<Child>,
    dir: TempDir,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// Extra `-c name=value` settings it was started with, kept for restarts.
    settings: Vec<String>,
}

impl Postgres {
    /// Starts a fresh server.
    pub fn start() -> Postgres {
        Self::start_with(&[])
    }

    /// Starts a fresh server with extra `name=value` settings.
    pub fn start_with(settings: &[&str]) -> Postgres {
        let bindir = bindir();
        let template = template(&bindir);
        let dir = tempfile::Builder::new().prefix("outbox-relay-pg-").tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let status = Command::new("cp").arg("-a").arg(&template).arg(&data).status().expect("cp");
        assert!(status.success(), "copying the PostgreSQL template failed");
        give_to_postgres_user(dir.path());
        let mut pg = Postgres { child: None, dir, port: 0, settings: settings.iter().map(|s| s.to_string()).collect() };
        pg.launch_on_free_port();
        pg
    }

    /// A superuser connection URL for `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn launch_on_free_port(&mut self) {
        for _ in 0..5 {
            self.port = free_port();
            if self.launch() {
                return;
            }
        }
        panic!("PostgreSQL did not start; see {}", self.log_path().display());
    }

    /// The server's log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Starts the server on `self.port`; false if it exited (port taken, say).
    fn launch(&mut self) -> bool {
        let log = File::options().create(true).append(true).open(self.log_path()).expect("log file");
        let mut command = Command::new(bindir().join("postgres"));
        command
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "fsync=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "max_prepared_transactions=20"])
            .args(self.settings.iter().flat_map(|s| ["-c".to_owned(), s.clone()]))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        run_as_postgres_user(&mut command);
        // SIGQUIT is PostgreSQL's immediate shutdown: if the test process dies, so does its server.
        set_parent_death_signal(&mut command, libc::SIGQUIT);
        let child = command.spawn().expect("spawn postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if reap_if_exited(&mut self.child) {
                return false;
            }
            let ready = Command::new(bindir().join("pg_isready"))
                .args(["-q", "-U", "postgres", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Stops the server with a fast shutdown (clients are disconnected, data kept).
    pub fn stop(&mut self) {
        stop_child(self.child.take(), libc::SIGINT, Duration::from_secs(20));
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        relaunch("PostgreSQL", port, || self.launch());
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            print_log_tail("postgres", &self.log_path());
        }
    }
}

/// The PostgreSQL server binaries: `pg_config --bindir`, else the newest Debian install.
pub fn bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("OUTBOX_TEST_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("postgres").exists() {
            return dir;
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .find(|d| d.join("postgres").exists())
        .expect("PostgreSQL server binaries not found: install postgresql or set OUTBOX_TEST_PG_BINDIR")
}

/// The initdb'd template, created once per machine.
fn template(bindir: &Path) -> PathBuf {
    let base = std::env::temp_dir();
    let template = base.join(format!("outbox-relay-pg-template-{TEMPLATE_VERSION}"));
    let lock = File::create(base.join("outbox-relay-pg-template.lock")).expect("lock file");
    lock.lock().expect("lock the template");
    if !template.join("PG_VERSION").exists() {
        let staging = base.join(format!("outbox-relay-pg-template-{TEMPLATE_VERSION}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).expect("template dir");
        give_to_postgres_user(&staging);
        let mut initdb = Command::new(bindir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&staging)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "-N"])
            .stdout(Stdio::null());
        run_as_postgres_user(&mut initdb);
        let out = initdb.output().expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::rename(&staging, &template).expect("install template");
    }
    template
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, "postgres"]).output().expect("id postgres");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("the postgres OS user exists")
    };
    (id("-u"), id("-g"))
}

fn run_as_postgres_user(command: &mut Command) {
    if is_root() {
        let (uid, gid) = postgres_ids();
        command.uid(uid).gid(gid).env("HOME", "/tmp");
    }
}

fn give_to_postgres_user(path: &Path) {
    if is_root() {
        let status = Command::new("chown").arg("-R").arg("postgres:postgres").arg(path).status().expect("chown");
        assert!(status.success());
    }
}
