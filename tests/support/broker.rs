//! A throwaway Kafka-protocol broker (tansu) on a free loopback port.
//!
//! Memory storage by default; `start_durable` keeps data in a SQLite file so that a restart on
//! the same port finds the topics and records it had.

use std::fs::File;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{free_port, reap_if_exited, set_parent_death_signal};

/// A running tansu broker; killed on drop.
pub struct Broker {
    child: Option<Child>,
    dir: TempDir,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    storage: String,
}

impl Broker {
    /// Starts a broker that keeps everything in memory.
    pub fn start() -> Broker {
        Self::start_with_storage("memory://tansu/".to_owned())
    }

    /// Starts a broker whose data survives [`Broker::restart`].
    pub fn start_durable() -> Broker {
        Self::start_with_storage("sqlite://tansu.db".to_owned())
    }

    fn start_with_storage(storage: String) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-tansu-")
            .tempdir()
            .expect("temp dir");
        let mut broker = Broker {
            child: None,
            dir,
            port: 0,
            storage,
        };
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
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let mut command = Command::new(tansu_binary());
        command
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", &self.storage])
            .current_dir(self.dir.path())
            .env(
                "RUST_LOG",
                std::env::var("OUTBOX_TEST_TANSU_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
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

    /// Stops the broker: SIGTERM, then SIGKILL if it lingers. (A SIGKILL straight away can
    /// lose tansu's last sqlite writes, such as a topic created a moment before.)
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.launch() {
            assert!(
                Instant::now() < deadline,
                "tansu did not restart on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(200));
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
