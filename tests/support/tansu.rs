//! A throwaway Kafka-protocol broker (tansu) on a free loopback port, kept only for the security
//! tests until they run on Kafka's own TLS and SASL listeners.
//!
//! Memory storage. An outage that must keep the broker's data is a freeze (SIGSTOP) and a thaw
//! (SIGCONT): tansu 0.6's durable sqlite storage loses producer state across restarts and then
//! fails every produce, so a stop and restart cannot stand in for one.

use std::fs::File;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{free_port, reap_if_exited, set_parent_death_signal, stop_child};

/// A running tansu broker; killed on drop.
pub struct Broker {
    child: Option<Child>,
    dir: TempDir,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    storage: String,
    /// The address given to clients in metadata, when it is not the broker's own (a TLS proxy
    /// in front of it).
    advertised: Option<String>,
    /// Whether clients must authenticate (SASL SCRAM).
    authentication: bool,
}

impl Broker {
    /// Starts a broker that keeps everything in memory.
    pub fn start() -> Broker {
        Self::start_with_storage("memory://tansu/".to_owned())
    }

    /// Starts a broker on `port`, which the caller reserved (a relay may already be trying it).
    pub fn start_on(port: u16) -> Broker {
        let mut broker = Self::unstarted("memory://tansu/".to_owned());
        broker.port = port;
        assert!(broker.launch(), "tansu did not start on port {port}; see {}", broker.log_path().display());
        broker
    }

    fn unstarted(storage: String) -> Broker {
        let dir = tempfile::Builder::new().prefix("outbox-relay-tansu-").tempdir().expect("temp dir");
        Broker { child: None, dir, port: 0, storage, advertised: None, authentication: false }
    }

    /// Starts a broker that tells clients to connect to `advertised` (`host:port`), where the
    /// test runs a proxy to it; with `users` (name, password, mechanism "scram256" or
    /// "scram512") it requires SASL authentication. tansu creates users only through a running
    /// broker and cannot require authentication from a memory store it must restart, so such a
    /// broker keeps its state in SQLite: it starts open, the users are created, and it restarts
    /// requiring them.
    pub fn start_secured(advertised: Option<String>, users: &[(&str, &str, &str)]) -> Broker {
        let dir = tempfile::Builder::new().prefix("outbox-relay-tansu-").tempdir().expect("temp dir");
        // Relative to the broker's working directory, its temp dir.
        let storage = "sqlite://tansu.db".to_owned();
        let mut broker = Broker { child: None, dir, port: 0, storage, advertised, authentication: false };
        broker.port = free_port();
        assert!(broker.launch(), "tansu did not start; see {}", broker.log_path().display());
        if users.is_empty() {
            return broker;
        }
        for (name, password, mechanism) in users {
            let out = Command::new(tansu_binary())
                .args(["user", "create", "--broker", &format!("tcp://127.0.0.1:{}", broker.port)])
                .args(["--mechanism", mechanism, name, password])
                .output()
                .expect("run tansu user create");
            assert!(out.status.success(), "tansu user create failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        broker.stop();
        broker.authentication = true;
        let port = broker.port;
        super::relaunch("tansu", port, || broker.launch());
        broker
    }

    fn start_with_storage(storage: String) -> Broker {
        let mut broker = Self::unstarted(storage);
        for _ in 0..5 {
            broker.port = free_port();
            if broker.launch() {
                return broker;
            }
        }
        panic!("tansu did not start; see {}", broker.log_path().display());
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    fn launch(&mut self) -> bool {
        let log = File::options().create(true).append(true).open(self.log_path()).expect("log file");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = self.advertised.as_ref().map(|a| format!("tcp://{a}")).unwrap_or_else(|| url.clone());
        let mut command = Command::new(tansu_binary());
        command
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised])
            .args(["--storage-engine", &self.storage])
            .args(self.authentication.then_some("--authentication"))
            .current_dir(self.dir.path())
            .env("RUST_LOG", std::env::var("OUTBOX_TEST_TANSU_LOG").unwrap_or_else(|_| "warn".to_owned()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        set_parent_death_signal(&mut command, libc::SIGKILL);
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start tansu ({e}); install it with: cargo install tansu --locked --version 0.6.0 --features dynostore,libsql")
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if reap_if_exited(&mut self.child) {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        false
    }

    /// Stops the broker: SIGTERM, then SIGKILL if it lingers.
    pub fn stop(&mut self) {
        stop_child(self.child.take(), libc::SIGTERM, Duration::from_secs(10));
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing is answered, as with a
    /// hung broker or a network partition. Its data is kept for [`Broker::thaw`].
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Resumes a frozen broker (SIGCONT).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            super::print_log_tail("tansu", &self.log_path());
        }
    }
}

/// `TANSU_BIN`, else `~/.cargo/bin/tansu`, else `tansu` on the PATH.
fn tansu_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("TANSU_BIN") {
        return PathBuf::from(bin);
    }
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    {
        let bin = home.join("bin").join("tansu");
        if bin.exists() {
            return bin;
        }
    }
    PathBuf::from("tansu")
}
