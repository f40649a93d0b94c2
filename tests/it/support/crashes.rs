//! Crashing the relay binary at random moments of its drain, with a seed a failing run prints
//! so that it can be repeated.

use std::collections::HashSet;
use std::time::Duration;

use outbox_relay::config::Config;
use tokio_postgres::Client;

use super::environment::{PATIENCE, wait_until};
use super::outbox_rows::{NewEvent, insert_events, unmarked_event_ids, unpublished_count};
use super::relay_process::{RelayProcess, spawn_relay_process};
use super::test_env::TestEnv;

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
) -> HashSet<String> {
    let mut random = Random::from_env();
    let mut in_flight_at_a_crash = HashSet::new();
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

/// Runs the relay binary with `config` until every row of the table is marked, then stops it
/// with SIGTERM, expects a clean exit, and returns it (for its log).
pub async fn drain_then_stop(env: &TestEnv, config: &Config) -> RelayProcess {
    let db = env.client().await;
    let mut relay = spawn_relay_process(env, config);
    // Up and leading, so that SIGTERM below meets the relay's handler, not the default action.
    relay.wait_for_log("shards now published by this relay").await;
    wait_until(PATIENCE, "every row marked", || async { unpublished_count(&db).await == 0 }).await;
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "log:\n{}", relay.log());
    relay
}

/// Inserts the events `range` (keys `key-0` to `key-{keys - 1}`, one after another) in
/// transactions of 250 events, 60 ms apart, as an application writing while the relay works.
pub fn write_meanwhile(
    db: Client,
    topic: &str,
    range: std::ops::Range<usize>,
    keys: usize,
) -> tokio::task::JoinHandle<()> {
    let topic = topic.to_owned();
    tokio::spawn(async move {
        for start in range.clone().step_by(250) {
            let end = (start + 250).min(range.end);
            let events: Vec<NewEvent> =
                (start..end).map(|n| NewEvent::keyed(&topic, &format!("key-{}", n % keys), n)).collect();
            insert_events(&db, &events).await;
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    })
}
