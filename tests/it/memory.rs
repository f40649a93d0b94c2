//! Bounded memory: a batch holds at most `relay.batch_bytes` of row data, so a relay draining
//! rows of a megabyte each stays within a small, fixed footprint instead of holding a thousand
//! of them (and their copies) at once, which under a container's memory limit would crash-loop.

use crate::support::*;

/// The relay process's peak resident memory (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    kib / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_draining_rows_of_nearly_a_megabyte_stays_within_its_memory_bound() {
    const ROWS: i64 = 300;
    let env = TestEnv::start().await;
    env.migrate().await;
    let topic = env.create_topic(2).await;
    let db = env.client().await;
    // About 900 kB of JSON each: 270 MB in all, under librdkafka's 1 MB record limit.
    db.execute(
        "INSERT INTO outbox (topic, key, payload) SELECT $1, 'k' || (n % 10), \
           jsonb_build_object('n', n, 'blob', repeat(md5(n::text), 28000)) FROM generate_series(1, $2::int8) n",
        &[&topic, &ROWS],
    )
    .await
    .unwrap();

    let mut relay = spawn_relay_process(&env, &env.config());
    wait_until(PATIENCE * 3, "every row to be published", || async { unpublished_count(&db).await == 0 }).await;
    let peak = peak_rss_mib(relay.pid());
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait().await, Some(0), "{}", relay.log());
    // Default relay.batch_bytes is 16 MiB: a batch, its copy in librdkafka and the batch
    // claimed ahead, plus the process itself (a debug build). Without the limit a batch was
    // all 300 rows, and the peak several hundred MiB.
    assert!(peak < 160, "peak RSS {peak} MiB");
    eprintln!("peak RSS {peak} MiB for {ROWS} rows of ~900 kB");
}
