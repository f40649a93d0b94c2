//! What a relay costs the database: PostgreSQL's CPU time and the WAL it writes between two
//! moments, whatever the relay does there (claims and marks, or a walsender decoding the WAL).
//!
//! CPU is the sum of user and system time of every process of the server, read from /proc: the
//! postmaster, its background workers, the backends and the walsenders. A child that exited in
//! between (a relay's connection closed) is not lost: the postmaster reaps it, and the kernel
//! adds its times to the postmaster's `cutime`/`cstime`, which are counted too.
//! WAL is the difference of `pg_current_wal_lsn()`, for the whole server.

use tokio_postgres::Client;

/// The server's CPU time and WAL position at one moment.
pub struct PgSnapshot {
    cpu_ms: f64,
    wal_lsn: i64,
}

/// What the server spent between two snapshots.
pub struct PgCost {
    pub cpu_ms: f64,
    pub wal_bytes: f64,
}

impl PgCost {
    /// CPU milliseconds per 1,000 events.
    pub fn cpu_ms_per_1k(&self, events: i64) -> f64 {
        self.cpu_ms / (events as f64 / 1000.0)
    }

    /// WAL bytes per event.
    pub fn wal_bytes_per_event(&self, events: i64) -> f64 {
        self.wal_bytes / events as f64
    }
}

impl PgSnapshot {
    /// The server listening on `port` (found by its command line), through `db`, any
    /// connection to it.
    pub async fn take(port: u16, db: &Client) -> PgSnapshot {
        let wal_lsn: i64 =
            db.query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[]).await.expect("the WAL position").get(0);
        PgSnapshot { cpu_ms: server_cpu_ms(port), wal_lsn }
    }

    /// What the server spent from `self` to `later`.
    pub fn until(&self, later: &PgSnapshot) -> PgCost {
        PgCost { cpu_ms: later.cpu_ms - self.cpu_ms, wal_bytes: (later.wal_lsn - self.wal_lsn) as f64 }
    }
}

/// A process's fields from /proc/PID/stat, after the parenthesised command name (which may
/// hold spaces): the state is field 0, the parent 1, utime 11, stime 12, cutime 13, cstime 14.
fn stat_fields(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().map(str::to_owned).collect()).unwrap_or_default()
}

fn ticks(fields: &[String], indices: &[usize]) -> f64 {
    indices.iter().filter_map(|&i| fields.get(i)?.parse::<f64>().ok()).sum()
}

/// CPU time of the PostgreSQL server on `port`: the postmaster with its reaped children's
/// times, plus every live child.
fn server_cpu_ms(port: u16) -> f64 {
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|entries| entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    let postmaster = pids
        .iter()
        .copied()
        .find(|&pid| is_postmaster_on(pid, port))
        .unwrap_or_else(|| panic!("no PostgreSQL postmaster listens on port {port}"));
    let mut ticks_total = ticks(&stat_fields(postmaster), &[11, 12, 13, 14]);
    for pid in pids {
        let fields = stat_fields(pid);
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(postmaster) {
            ticks_total += ticks(&fields, &[11, 12]);
        }
    }
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks_total / ticks_per_s * 1000.0
}

/// Whether `pid` is a `postgres ... -p PORT ...` process (the harness starts the postmaster so).
fn is_postmaster_on(pid: u32, port: u16) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let port = port.to_string();
    args.first().is_some_and(|program| program.ends_with(b"/postgres"))
        && args.windows(2).any(|pair| pair[0] == b"-p" && pair[1] == port.as_bytes())
}
