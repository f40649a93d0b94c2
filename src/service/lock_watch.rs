//! Watches the relay's claim session from a connection of its own: a statement of the loop
//! waiting on a lock that another session holds (a `SELECT ... FOR UPDATE` left open on outbox
//! rows, a `LOCK TABLE`) is reported, and does not count against liveness.
//!
//! The loop cannot see such a wait: it is inside the statement. Only another session can ask
//! PostgreSQL what the claim session waits for (`pg_stat_activity`, `pg_blocking_pids`), so
//! this task does, every second, on a plain connection that never reads the table (no lock on
//! the table can hold it up, as it would the stats connection's counts). While it sees the
//! wait, [`Health`] does not take the loop for stuck, as while it waits for the broker: a
//! restart would only wait on the same lock again. Instead `/readyz` and a warning name the
//! blocking backend, the lock, and what that session is doing, so that an operator can end it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::postgres::connect::connect_client;
use crate::postgres::error::OutboxError;
use crate::service::health::{Health, LOCK_WAIT_REPORTED_AFTER, LockWait};
use crate::service::reconnect::Reconnecting;
use crate::service::shutdown::Shutdown;

/// How often the claim session is looked at.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// A lock-wait warning is repeated this often while the wait lasts.
const WARNING_REPEAT: Duration = Duration::from_secs(30);

/// Looks at the claim session every [`WATCH_INTERVAL`] until the shutdown grace period is over
/// (a wait that outlasts it is named in the relay's last line), telling `health` what it waits
/// for and warning about a wait of [`LOCK_WAIT_REPORTED_AFTER`] or more (again every 30 s).
/// Without a connection it reports nothing: a wait it cannot see is timed by liveness as any
/// step is.
pub async fn watch(config: Config, health: Arc<Health>, shutdown: Shutdown) {
    let mut connection: Reconnecting<Client> = Reconnecting::new();
    let mut warned: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.grace_expired(config.relay.shutdown_timeout) => return,
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
        }
        let Some(pid) = health.claim_session() else {
            health.lock_wait_seen(None);
            continue;
        };
        let session = match connection.get(|| connect_client(&config)).await {
            Ok(session) => session,
            Err(e) => {
                debug!(error = %e, "cannot watch the claim session for lock waits");
                health.lock_wait_seen(None);
                continue;
            }
        };
        // A failed look keeps the connection, unless it has closed.
        let wait = match lock_wait(session, pid).await {
            Ok(wait) => wait,
            Err(e) => {
                debug!(error = %e, "cannot watch the claim session for lock waits");
                None
            }
        };
        match &wait {
            Some(wait) if wait.seconds >= LOCK_WAIT_REPORTED_AFTER.as_secs_f64() => {
                if warned.is_none_or(|at| at.elapsed() >= WARNING_REPEAT) {
                    warned = Some(Instant::now());
                    warn!(
                        pid = wait.pid,
                        blocking_pids = ?wait.blocking_pids,
                        waiting_s = wait.seconds.round(),
                        "{wait}: the relay publishes nothing meanwhile and goes on once the lock is released (the \
                         holder commits or rolls back; pg_terminate_backend(pid) ends a session that will not); a \
                         restart would wait on the same lock"
                    );
                }
            }
            Some(_) => {}
            None => {
                if warned.take().is_some() {
                    info!(pid, "the relay's statement no longer waits on a lock");
                }
            }
        }
        health.lock_wait_seen(wait);
    }
}

/// Whether session `pid` waits on a lock other sessions hold, and who holds it.
pub async fn lock_wait(client: &Client, pid: i32) -> Result<Option<LockWait>, OutboxError> {
    let what = "look for lock waits";
    let row = client.query_opt(LOCK_WAIT_SQL, &[&pid]).await.map_err(|source| OutboxError::Query { what, source })?;
    // Statements are the users' text: in a SQL_ASCII database they may not be UTF-8.
    let text = |r: &tokio_postgres::Row, column: &str| {
        r.try_get::<_, Option<String>>(column).unwrap_or_else(|_| Some("(not valid UTF-8)".to_owned()))
    };
    Ok(row.map(|r| LockWait {
        pid,
        seconds: r.try_get::<_, Option<f64>>("seconds").ok().flatten().unwrap_or(0.0),
        query: text(&r, "query").unwrap_or_default(),
        waiting_for: text(&r, "waiting_for").unwrap_or_default(),
        blocking_pids: r.try_get("blocking_pids").unwrap_or_default(),
        blocker_state: text(&r, "blocker_state"),
        blocker_seconds: r.try_get("blocker_seconds").ok().flatten(),
        blocker_query: text(&r, "blocker_query"),
    }))
}

/// Whether session `$1` waits on a lock, and for whom: its statement's age and start
/// (`seconds`, `query`), the lock it `waiting_for`, `pg_blocking_pids` (`blocking_pids`), and
/// the first blocker's state, transaction age and statement (`blocker_state`,
/// `blocker_seconds`, `blocker_query`). No row when it is not waiting on a lock. `pg_blocking_pids` takes the lock
/// manager's locks briefly, so it runs only for a session seen waiting.
const LOCK_WAIT_SQL: &str = "WITH waiting AS MATERIALIZED ( \
       SELECT pid, query_start, query FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'), \
     blocked AS MATERIALIZED (SELECT w.*, pg_blocking_pids(w.pid) AS blockers FROM waiting AS w) \
     SELECT extract(epoch FROM now() - b.query_start)::float8 AS seconds, left(coalesce(b.query, ''), 200) AS query, \
            coalesce((SELECT CASE WHEN l.locktype IN ('transactionid', 'tuple') \
                                  THEN 'a row lock (' || l.locktype || ' ' || l.mode || ')' \
                                  WHEN l.relation IS NOT NULL \
                                  THEN 'a lock on ' || l.relation::regclass::text || ' (' || l.mode || ')' \
                                  ELSE 'a ' || l.locktype || ' lock (' || l.mode || ')' END \
                      FROM pg_locks AS l WHERE l.pid = b.pid AND NOT l.granted LIMIT 1), 'a lock') AS waiting_for, \
            b.blockers AS blocking_pids, a.state AS blocker_state, \
            extract(epoch FROM now() - a.xact_start)::float8 AS blocker_seconds, left(a.query, 200) AS blocker_query \
     FROM blocked AS b LEFT JOIN pg_stat_activity AS a ON a.pid = b.blockers[1] \
     WHERE cardinality(b.blockers) > 0";
