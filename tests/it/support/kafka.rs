//! Apache Kafka for one test: one node or a cluster, KRaft, on free loopback ports, from the jars
//! `scripts/kafka.sh` fetches from Maven Central. The script writes each node's configuration
//! and formats its storage; this module runs the nodes as its own children (the script execs
//! the JVM), so a test can stop, kill, freeze and restart each one, and no node outlives the
//! test process.
//!
//! A node's data is on disk: a node stopped or killed and started again keeps its topics, its
//! records and its producer state, as in production.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::environment::free_ports;
use super::processes::{print_log_tail, reap_if_exited, set_parent_death_signal, stop_child};

/// How long a node may take to serve after its JVM starts, on a loaded 2-core machine.
const NODE_START: Duration = Duration::from_secs(120);

/// A running Apache Kafka cluster (one node or more); every node is killed on drop.
pub struct Kafka {
    dir: TempDir,
    nodes: Vec<Node>,
}

struct Node {
    child: Option<Child>,
    /// Client port on 127.0.0.1.
    port: u16,
}

impl Kafka {
    /// Starts a single node.
    pub fn start() -> Kafka {
        Self::start_cluster(1, &[])
    }

    /// Starts `nodes` nodes, each a broker and a KRaft controller, with extra broker properties
    /// (`key=value`). Three nodes or more replicate: replication factor 3, min.insync.replicas 2.
    pub fn start_cluster(nodes: usize, properties: &[&str]) -> Kafka {
        for _ in 0..3 {
            let mut kafka = Self::prepare(nodes, properties);
            if kafka.start_all() {
                return kafka;
            }
            // A port taken between choosing it and binding it: try others.
            kafka.stop_all();
        }
        panic!("Apache Kafka did not start; see the logs above");
    }

    /// Writes the configuration of `nodes` nodes and formats their storage, without starting
    /// them: the ports are reserved so a relay can be pointed at a broker not yet running.
    pub fn prepare(nodes: usize, properties: &[&str]) -> Kafka {
        let ports = free_ports(nodes * 2);
        Self::prepare_on(&ports, properties)
    }

    /// As [`Kafka::prepare`], on the caller's ports: each node's client and controller port, in
    /// turn. For properties that name the ports (more `listeners`); a node that cannot bind
    /// one does not start.
    pub fn prepare_on(ports: &[u16], properties: &[&str]) -> Kafka {
        let nodes = ports.len() / 2;
        let dir = tempfile::Builder::new().prefix("outbox-relay-kafka-").tempdir().expect("temp dir");
        let mut command = Command::new(script());
        command.arg("prepare").arg(dir.path()).args(["--nodes", &nodes.to_string()]);
        command.args(["--ports", &ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")]);
        for property in properties {
            command.args(["--set", property]);
        }
        let out = command.output().expect("run scripts/kafka.sh prepare");
        assert!(
            out.status.success(),
            "scripts/kafka.sh prepare failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let nodes = ports.chunks(2).map(|p| Node { child: None, port: p[0] }).collect();
        Kafka { dir, nodes }
    }

    /// Starts every node of a prepared cluster and waits until each serves.
    pub fn start_all(&mut self) -> bool {
        for node in 1..=self.nodes.len() {
            self.spawn(node);
        }
        (1..=self.nodes.len()).all(|node| self.wait_serving(node))
    }

    /// The bootstrap servers: every node's `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    fn node_dir(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("node-{node}"))
    }

    fn log_path(&self, node: usize) -> PathBuf {
        self.node_dir(node).join("kafka.log")
    }

    fn spawn(&mut self, node: usize) {
        let log_path = self.log_path(node);
        // A fresh log per start, so waiting for "started" sees this start's line.
        if let Ok(previous) = std::fs::read(&log_path) {
            let _ = std::fs::write(self.node_dir(node).join("kafka.previous.log"), previous);
        }
        let log = File::create(&log_path).expect("log file");
        let mut command = Command::new(script());
        command
            .arg("run")
            .arg(self.dir.path())
            .arg(node.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        // The script execs the JVM, which keeps this: no node outlives the test process.
        set_parent_death_signal(&mut command, libc::SIGKILL);
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot run scripts/kafka.sh ({e})"));
        self.nodes[node - 1].child = Some(child);
    }

    fn wait_serving(&mut self, node: usize) -> bool {
        let deadline = Instant::now() + NODE_START;
        let log_path = self.log_path(node);
        while Instant::now() < deadline {
            if std::fs::read_to_string(&log_path).is_ok_and(|log| log.contains("Kafka Server started")) {
                return true;
            }
            if reap_if_exited(&mut self.nodes[node - 1].child) {
                print_log_tail(&format!("kafka node {node}"), &log_path);
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        print_log_tail(&format!("kafka node {node}"), &log_path);
        false
    }

    /// Stops node `node` cleanly (SIGTERM: a controlled shutdown that moves its leaderships
    /// away first), waiting up to 30 s before killing it.
    pub fn stop(&mut self, node: usize) {
        stop_child(self.nodes[node - 1].child.take(), libc::SIGTERM, Duration::from_secs(30));
    }

    /// Kills node `node` at once (SIGKILL): no controlled shutdown, unflushed data is lost.
    pub fn kill(&mut self, node: usize) {
        stop_child(self.nodes[node - 1].child.take(), libc::SIGKILL, Duration::from_secs(10));
    }

    /// Starts node `node` again on its ports with its data, and waits until it serves.
    pub fn restart(&mut self, node: usize) {
        assert!(self.nodes[node - 1].child.is_none(), "node {node} is running");
        self.spawn(node);
        assert!(self.wait_serving(node), "kafka node {node} did not restart");
    }

    /// Stops every node at once (stopped one by one, the last ones lose their controller
    /// quorum and wait out their controlled shutdown).
    pub fn stop_all(&mut self) {
        for node in &self.nodes {
            if let Some(child) = &node.child {
                // SAFETY: kill(2) on our own child's pid.
                unsafe {
                    libc::kill(child.id() as i32, libc::SIGTERM);
                }
            }
        }
        for node in 1..=self.nodes.len() {
            self.stop(node);
        }
    }

    /// Whether node `node` runs (it was not stopped or killed since it last started).
    pub fn is_running(&self, node: usize) -> bool {
        self.nodes[node - 1].child.is_some()
    }

    /// The active KRaft controller (the quorum's leader) among the running nodes, as the
    /// running nodes last recorded it in their `quorum-state` files (the newest epoch wins);
    /// `None` while an election is under way or the quorum is lost.
    pub fn active_controller(&self) -> Option<usize> {
        let newest = (1..=self.nodes.len())
            .filter(|node| self.is_running(*node))
            .filter_map(|node| {
                let path = self.node_dir(node).join("data/__cluster_metadata-0/quorum-state");
                let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
                Some((state["leaderEpoch"].as_i64()?, state["leaderId"].as_i64()?))
            })
            .max()?;
        let leader = usize::try_from(newest.1).ok().filter(|n| (1..=self.nodes.len()).contains(n))?;
        self.is_running(leader).then_some(leader)
    }

    /// Freezes node `node` (SIGSTOP): connections stay open but nothing is answered, as with a
    /// hung broker or a network partition.
    pub fn freeze(&self, node: usize) {
        self.signal(node, libc::SIGSTOP);
    }

    /// Resumes a frozen node (SIGCONT).
    pub fn thaw(&self, node: usize) {
        self.signal(node, libc::SIGCONT);
    }

    fn signal(&self, node: usize, signal: i32) {
        if let Some(child) = &self.nodes[node - 1].child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
        }
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for node in 1..=self.nodes.len() {
            // A frozen node ignores SIGTERM until thawed; nothing here needs a clean stop.
            self.kill(node);
            if panicking {
                print_log_tail(&format!("kafka node {node}"), &self.log_path(node));
            }
        }
    }
}

/// `scripts/kafka.sh` of this checkout.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join("kafka.sh")
}

/// The directory of Apache Kafka's jars, kafka-clients and the broker's tools among them
/// (`scripts/kafka.sh fetch`: fetched from Maven Central once, then cached).
pub fn jars() -> PathBuf {
    let out = Command::new(script()).arg("fetch").output().expect("run scripts/kafka.sh fetch");
    assert!(out.status.success(), "scripts/kafka.sh fetch failed:\n{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
