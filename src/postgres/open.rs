//! Opening the relay's session: connect, check the configured mapping against the catalog,
//! derive the shard lock keys, set the session's settings and prepare the statements. It sits
//! apart from `outbox` (the session's state) because it calls into the statement files, which
//! themselves import the session.

use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::Client;

use crate::config::Config;
use crate::postgres::catalog::{read_order_column, resolve_layout};
use crate::postgres::connect::connect_session;
use crate::postgres::error::OutboxError;
use crate::postgres::layout::{Layout, Mapping};
use crate::postgres::outbox::{Outbox, Prepared, SessionProof, StatementCanceller};
use crate::postgres::shard_locks::resolve_lock_keys;

impl Outbox {
    /// Connects, checks the configured mapping against the table and prepares the statements.
    pub async fn connect(config: &Config, mapping: &Mapping) -> Result<Outbox, OutboxError> {
        let connecting = Instant::now();
        let (client, tls) = connect_session(config).await?;
        let backend_pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(OutboxError::query("read the backend pid"))?
            .try_get(0)
            .map_err(OutboxError::query("read the backend pid"))?;
        let canceller = StatementCanceller { token: client.cancel_token(), tls };
        let layout = Arc::new(resolve_layout(&client, mapping).await?);
        let locks = resolve_lock_keys(&client, mapping).await?;
        let statements = Prepared::prepare(&client, &layout).await?;
        // Server-side keepalives: if this relay's host dies without closing the connection,
        // PostgreSQL notices within about 15 s and frees its shards for another relay.
        client
            .batch_execute("SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 5")
            .await
            .map_err(OutboxError::query("set keepalives"))?;
        // PostgreSQL switches a prepared statement to a generic plan after five executions when
        // that plan looks no costlier. For the claim it is costlier: without the parameters'
        // values the planner cannot see how few rows the window and the shard list select, and
        // on a backlog of some ten thousand rows the generic plan took 180 ms where the custom one
        // takes 10. Planning each claim costs well under a millisecond.
        client
            .batch_execute("SET plan_cache_mode = force_custom_plan")
            .await
            .map_err(OutboxError::query("set plan_cache_mode"))?;
        // Without statistics (a table never analyzed, as after a bulk load or a restore) the
        // planner guesses that a handful of rows are unpublished and reads the claim's window
        // with a bitmap scan of the unpublished-rows index: every unpublished row's heap page,
        // then a sort. On a 100,000-row backlog that was about 100,000 buffers and 400 ms for
        // each 1,000-row claim, just when the relay has to catch up. An index scan in claim
        // order stops after the window, whatever the statistics; the relay's other statements
        // (marks and failure records by primary key, the table's counts) do not need bitmap
        // scans either. This is the relay's own session: the application's are untouched.
        client
            .batch_execute("SET enable_bitmapscan = off")
            .await
            .map_err(OutboxError::query("set enable_bitmapscan"))?;
        // The claim's estimated cost grows with the table's statistics (the window's index scan
        // is costed as if it read the backlog, though its LIMIT stops it after the batch), and
        // above `jit_above_cost` PostgreSQL compiles the statement with LLVM each time it runs:
        // 25 ms of a 35 ms claim of an analyzed 200,000-row backlog, for a statement that runs
        // once per batch and never long enough to repay it. The drain ran at 14.7k rows/s with
        // JIT and 26.5k without statistics (so without JIT) in the same run.
        client.batch_execute("SET jit = off").await.map_err(OutboxError::query("set jit"))?;
        // Marks need not survive a PostgreSQL crash: a lost one re-publishes its row (see
        // `database.synchronous_commit`). The rows themselves are the application's commits.
        // With exactly-once delivery they must: a shard's progress record names only its last
        // batch, so the batch before must be marked for good before the next one commits (see
        // `crate::relay::exactly_once`).
        // (`on` is set even where the server's default is not).
        let exactly_once = config.kafka.delivery == crate::config::Delivery::ExactlyOnce;
        let synchronous_commit = match (exactly_once, config.database.synchronous_commit) {
            (true, _) => Some("on"),
            (false, false) => Some("off"),
            (false, true) => None,
        };
        if let Some(value) = synchronous_commit {
            client
                .batch_execute(&format!("SET synchronous_commit = {value}"))
                .await
                .map_err(OutboxError::query("set synchronous_commit"))?;
        }
        let order_column = read_order_column(&client, &layout).await?;
        let relay = &config.relay;
        Ok(Outbox {
            client,
            layout,
            retry_backoff: (relay.retry_backoff_initial.as_secs_f64(), relay.retry_backoff_max.as_secs_f64()),
            statements,
            max_attempts: i32::try_from(relay.max_attempts).unwrap_or(i32::MAX),
            order_column,
            locks,
            proof: SessionProof::new(connecting),
            backend_pid,
            canceller,
        })
    }
}

impl Prepared {
    async fn prepare(client: &Client, layout: &Layout) -> Result<Prepared, OutboxError> {
        let prepare = |sql: String, what: &'static str| async move {
            client.prepare(&sql).await.map_err(OutboxError::query(what))
        };
        Ok(Prepared {
            claim: prepare(layout.claim_sql(), "prepare claim").await?,
            mark_published: prepare(layout.mark_published_sql(), "prepare mark").await?,
            record_row_failures: match layout.record_row_failures_sql() {
                Some(sql) => Some(prepare(sql, "prepare record failures").await?),
                None => None,
            },
            record_outage_failures: match layout.record_outage_failures_sql() {
                Some(sql) => Some(prepare(sql, "prepare record failures").await?),
                None => None,
            },
            pending_stats: prepare(layout.pending_stats_sql(), "prepare stats").await?,
        })
    }
}
