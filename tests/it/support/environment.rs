//! What every helper takes from the machine and the clock: free loopback ports, names no other
//! test uses, and how long to wait for something that should happen.
//!
//! It depends on nothing else of the harness, so that the servers, the relay and the tests can
//! all stand on it.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long a test waits for something that should happen in well under a second on an idle
/// machine. Generous, because CI machines are loaded; a passing test never waits this long.
pub const PATIENCE: Duration = Duration::from_secs(60);

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

/// A free TCP port on 127.0.0.1 (free when asked; the caller retries if it is taken later).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// `count` distinct free TCP ports on 127.0.0.1: each stays bound until all are chosen, so the
/// system cannot hand out one port twice (separate [`free_port`] calls can).
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> =
        (0..count).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("free port")).collect();
    listeners.iter().map(|l| l.local_addr().map(|a| a.port()).expect("free port")).collect()
}

/// A name no other test uses: lower case, so it is the same quoted or not.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}
