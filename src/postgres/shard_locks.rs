//! The shard locks: how the relays of one table share it. Each relay is a member (an advisory
//! lock on its instance number), declares its shard count (a shared lock), and holds the shards
//! it publishes (an exclusive lock each), all session locks of its claim connection, so a relay
//! whose session ends loses them at once. Here too: reading who holds what, and ending the
//! session of a relay that looks frozen.
//!
//! The lock keys derive from the table's OID, so every spelling of the table's name names the
//! same locks. What to lock and when is [`crate::relay::shards`]'s business; this module only
//! runs the statements and decodes their rows.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::postgres::error::{OtherShardCount, OutboxError, describe_pg_error};
use crate::postgres::layout::Mapping;
use crate::postgres::outbox::{LockKeys, Outbox};

/// What became of a relay that looked frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Termination {
    /// Its session was ended; PostgreSQL releases its locks as the backend exits.
    Ended,
    /// It ran a statement since it was seen idle (or its session is already gone).
    NoLongerFrozen,
    /// This relay's role may not end that session; the server's message.
    NotAllowed(String),
}

/// The relays of a table and the shards they hold, as PostgreSQL's lock table shows them (in
/// the current database only).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Ownership {
    /// Every session holding one of the table's relay locks: one per running relay, by pid.
    pub relays: Vec<RelaySession>,
    /// Held shards and their holders, by shard.
    pub shards: Vec<ShardOwner>,
}

/// A running relay, as its database session shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RelaySession {
    /// Backend pid of the relay's claim session.
    pub pid: i32,
    /// The relay's address as the database sees it (`-` when hidden or a local socket).
    pub client: String,
    /// The session's `application_name`.
    pub application_name: String,
    /// The `relay.shards` it runs with; `None` before it has said (it is joining).
    pub shard_count: Option<i64>,
    /// `active`, `idle`, ...; `None` when PostgreSQL hides another role's session from this
    /// one (without `pg_read_all_stats`).
    pub state: Option<String>,
    /// Seconds since its session last began or ended a statement; `None` when hidden.
    pub idle_seconds: Option<f64>,
    /// Whether it has been idle longer than `relay.takeover_after`: a live relay runs a
    /// statement about every second, so this one is frozen or cut off.
    pub looks_frozen: bool,
    /// The shards it holds.
    pub shards: Vec<i32>,
    /// Whether it counts itself among the table's relays (holds its membership lock).
    #[serde(skip)]
    pub member: bool,
    /// Whether this is the session that asked.
    #[serde(skip)]
    pub mine: bool,
}

/// A held shard and the relay holding it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShardOwner {
    /// The shard.
    pub shard: i32,
    /// Backend pid of the holder's session.
    pub pid: i32,
    /// The holder's address as the database sees it.
    pub client: String,
}

impl Outbox {
    /// Fails with [`OutboxError::EarlierVersionRunning`] if relays of an earlier version,
    /// whose lock keys derive from the table's name rather than its OID, hold locks of this
    /// table under any of its usual spellings (as configured, qualified, bare).
    pub async fn check_no_earlier_version(&self) -> Result<(), OutboxError> {
        let configured = self.layout.mapping.table_name();
        let bare = self.locks.table.rsplit('.').next().unwrap_or(&self.locks.table).to_owned();
        let spellings = vec![configured, self.locks.table.clone(), bare];
        let rows = self
            .client
            .query(OLD_VERSION_HOLDERS_SQL, &[&spellings])
            .await
            .map_err(OutboxError::query("look for relays of an earlier version"))?;
        if rows.is_empty() {
            return Ok(());
        }
        let pids =
            rows.iter().map(|r| r.try_get("pid")).collect::<Result<_, _>>().map_err(OutboxError::query("read pids"))?;
        Err(OutboxError::EarlierVersionRunning { table: self.locks.table.clone(), pids })
    }

    /// Declares that this relay runs with `shard_count` shards (a shared lock every relay with
    /// that count holds), then fails with [`OutboxError::ShardCountMismatch`], having taken
    /// the declaration back, if another relay of the table runs with a different count. Two
    /// relays racing with different counts both declare before they look, so at least one of
    /// them sees the other.
    pub async fn declare_shard_count(&self, shard_count: u32) -> Result<(), OutboxError> {
        let count = i32::try_from(shard_count).unwrap_or(i32::MAX);
        let key = self.locks.shard_count;
        self.client
            .query_one(LOCK_SHARD_COUNT_SQL, &[&key, &count])
            .await
            .map_err(OutboxError::query("declare the shard count"))?;
        let rows = self
            .client
            .query(OTHER_SHARD_COUNTS_SQL, &[&key, &count])
            .await
            .map_err(OutboxError::query("read other relays' shard counts"))?;
        if rows.is_empty() {
            return Ok(());
        }
        let others = rows
            .iter()
            .map(|r| Ok(OtherShardCount { shard_count: r.try_get("shard_count")?, pids: r.try_get("pids")? }))
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(OutboxError::query("read other relays' shard counts"))?;
        // The session ends as the relay stops anyway; releasing now keeps a retry clean.
        if let Err(e) = self.client.query_one(UNLOCK_SHARD_COUNT_SQL, &[&key, &count]).await {
            tracing::debug!(error = %describe_pg_error(&e), "could not take the shard count back");
        }
        Err(OutboxError::ShardCountMismatch { table: self.locks.table.clone(), ours: shard_count, others })
    }

    /// Registers this relay as a member of the table's relays, under `instance`; false if
    /// another relay already uses that number.
    pub async fn join(&self, instance: i32) -> Result<bool, OutboxError> {
        self.try_lock(self.locks.member, instance, "join").await
    }

    /// Takes `shard` for this relay (a session lock, released if the connection ends); false if
    /// another relay holds it.
    pub async fn lock_shard(&self, shard: i32) -> Result<bool, OutboxError> {
        self.try_lock(self.locks.shard, shard, "lock shard").await
    }

    async fn try_lock(&self, classid: i32, number: i32, what: &'static str) -> Result<bool, OutboxError> {
        let row = self.client.query_one(TRY_LOCK_SQL, &[&classid, &number]).await.map_err(OutboxError::query(what))?;
        row.try_get(0).map_err(OutboxError::query(what))
    }

    /// Hands `shard` back.
    pub async fn unlock_shard(&self, shard: i32) -> Result<(), OutboxError> {
        self.client
            .query_one(UNLOCK_SQL, &[&self.locks.shard, &shard])
            .await
            .map_err(OutboxError::query("unlock shard"))?;
        Ok(())
    }

    /// The table's relays and the shards they hold; a relay idle longer than
    /// `takeover_after` looks frozen.
    pub async fn ownership(&self, takeover_after: Duration) -> Result<Ownership, OutboxError> {
        let keys = &self.locks;
        let sent = Instant::now();
        let rows = self
            .client
            .query(OWNERSHIP_SQL, &[&keys.member, &keys.shard, &keys.shard_count, &takeover_after.as_secs_f64()])
            .await
            .map_err(OutboxError::query("shard ownership"))?;
        self.proof.proved(sent);
        decode_ownership(&rows).map_err(OutboxError::query("shard ownership"))
    }

    /// Ends the session `pid` if it still looks frozen (idle longer than `takeover_after`),
    /// which releases its locks.
    pub async fn terminate_if_frozen(&self, pid: i32, takeover_after: Duration) -> Result<Termination, OutboxError> {
        match self.client.query_opt(TERMINATE_FROZEN_SQL, &[&pid, &takeover_after.as_secs_f64()]).await {
            Ok(Some(row)) if row.try_get("ended").unwrap_or(false) => Ok(Termination::Ended),
            Ok(_) => Ok(Termination::NoLongerFrozen),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
                Ok(Termination::NotAllowed(describe_pg_error(&e)))
            }
            Err(e) => Err(OutboxError::Query { what: "end a frozen relay's session", source: e }),
        }
    }
}

/// The rows of [`OWNERSHIP_SQL`] as relays and shard owners.
fn decode_ownership(rows: &[tokio_postgres::Row]) -> Result<Ownership, tokio_postgres::Error> {
    let mut ownership = Ownership::default();
    for row in rows {
        let pid: i32 = row.try_get("pid")?;
        let number: i64 = row.try_get("number")?;
        let index = match ownership.relays.iter().position(|r| r.pid == pid) {
            Some(index) => index,
            None => {
                ownership.relays.push(RelaySession {
                    pid,
                    client: row.try_get("client")?,
                    application_name: row.try_get("application_name")?,
                    shard_count: None,
                    state: row.try_get("state")?,
                    idle_seconds: row.try_get("idle_seconds")?,
                    looks_frozen: row.try_get("looks_frozen")?,
                    shards: Vec::new(),
                    member: false,
                    mine: row.try_get("mine")?,
                });
                ownership.relays.len() - 1
            }
        };
        let relay = &mut ownership.relays[index];
        match row.try_get::<_, String>("kind")?.as_str() {
            "member" => relay.member = true,
            "count" => relay.shard_count = Some(number),
            _ => {
                let shard = i32::try_from(number).unwrap_or(i32::MAX);
                relay.shards.push(shard);
                ownership.shards.push(ShardOwner { shard, pid, client: relay.client.clone() });
            }
        }
    }
    ownership.relays.sort_by_key(|r| r.pid);
    Ok(ownership)
}

/// The lock keys of the mapped table; [`OutboxError::TableMissing`] if it is gone.
pub(in crate::postgres) async fn resolve_lock_keys(
    client: &Client,
    mapping: &Mapping,
) -> Result<LockKeys, OutboxError> {
    let what = "read the table's lock keys";
    let row = client.query_opt(LOCK_KEYS_SQL, &[&mapping.table_sql()]).await.map_err(OutboxError::query(what))?;
    let Some(row) = row else { return Err(OutboxError::TableMissing(mapping.table_name())) };
    let keys = || -> Result<LockKeys, tokio_postgres::Error> {
        Ok(LockKeys {
            member: row.try_get("member")?,
            shard: row.try_get("shard")?,
            shard_count: row.try_get("shard_count")?,
            table: row.try_get("qualified_name")?,
            table_oid: row.try_get("table_oid")?,
        })
    };
    keys().map_err(OutboxError::query(what))
}

/// The keys of the advisory locks through which the relays of table `$1` (quoted name) share
/// it, derived from the table's OID so that every spelling of the table (`outbox`,
/// `public.outbox`, a search_path) names the same locks: the classids of the membership locks,
/// the shard locks and the shard-count locks, and the table's schema-qualified name. No row
/// when the table does not exist.
const LOCK_KEYS_SQL: &str = "SELECT (hashtext('outbox-relay-member:' || c.oid::text) & 2147483647)::int4 AS member, \
     (hashtext('outbox-relay-shard:' || c.oid::text) & 2147483647)::int4 AS shard, \
     (hashtext('outbox-relay-shard-count:' || c.oid::text) & 2147483647)::int4 AS shard_count, \
     n.nspname || '.' || c.relname AS qualified_name, c.oid AS table_oid \
     FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)";

/// Takes the exclusive advisory lock (`$1` classid, `$2` number) of a membership or a shard;
/// false if another session holds it.
const TRY_LOCK_SQL: &str = "SELECT pg_try_advisory_lock($1::int4, $2::int4)";

/// Releases an exclusive advisory lock taken with [`TRY_LOCK_SQL`].
const UNLOCK_SQL: &str = "SELECT pg_advisory_unlock($1::int4, $2::int4)";

/// Takes the shared advisory lock that says which shard count (`$2`) this relay runs with, on
/// the table's shard-count classid `$1`; relays running with the same count share it.
const LOCK_SHARD_COUNT_SQL: &str = "SELECT pg_try_advisory_lock_shared($1::int4, $2::int4)";

/// Releases the lock of [`LOCK_SHARD_COUNT_SQL`].
const UNLOCK_SHARD_COUNT_SQL: &str = "SELECT pg_advisory_unlock_shared($1::int4, $2::int4)";

/// The condition on `pg_locks AS l` that selects the relays' advisory locks (the two-number
/// form) of the current database only: `pg_locks` shows every database's locks, and another
/// database's relays are not this table's, whatever their keys.
macro_rules! advisory_locks_of_this_database {
    () => {
        "l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    };
}

/// The shard counts other sessions run this table with (shard-count classid `$1`) other than
/// `$2`: each count and the pids of the relays running with it.
const OTHER_SHARD_COUNTS_SQL: &str = concat!(
    "SELECT l.objid::int8 AS shard_count, array_agg(l.pid ORDER BY l.pid) AS pids FROM pg_locks AS l WHERE ",
    advisory_locks_of_this_database!(),
    "AND l.classid = $1::int4::oid AND l.objid <> $2::int4::oid AND l.pid <> pg_backend_pid() ",
    "GROUP BY l.objid ORDER BY l.objid"
);

/// Backends holding locks of this table under the keys the previous version of the relay
/// derived from the table's *name*: `'outbox-relay-member:'` or `'outbox-relay-shard:'`
/// followed by any of the spellings `$1`. Relays of that version cannot see the OID-keyed locks.
const OLD_VERSION_HOLDERS_SQL: &str = concat!(
    "SELECT DISTINCT l.pid AS pid FROM pg_locks AS l WHERE ",
    advisory_locks_of_this_database!(),
    "AND l.classid IN (SELECT (hashtext(prefix || spelling) & 2147483647)::oid ",
    "FROM unnest(ARRAY['outbox-relay-member:', 'outbox-relay-shard:']) AS prefix, unnest($1::text[]) AS spelling) ",
    "ORDER BY 1"
);

/// Every lock of this table's relays in the current database, with the session holding it:
/// `kind` ('member', 'shard' or 'count', for classids `$1`, `$2`, `$3`), the number (the
/// relay's instance, the shard, the shard count), and the holder's pid, client address,
/// application name, state (NULL when PostgreSQL hides another role's session), seconds since
/// its state last changed (it began or ended a statement), whether it looks frozen (idle
/// longer than `$4` seconds), and whether it is the asking session.
const OWNERSHIP_SQL: &str = concat!(
    "SELECT CASE l.classid WHEN $1::int4::oid THEN 'member' WHEN $2::int4::oid THEN 'shard' ELSE 'count' END AS kind, ",
    "l.objid::int8 AS number, l.pid AS pid, coalesce(host(a.client_addr), '-') AS client, ",
    "coalesce(a.application_name, '') AS application_name, a.state AS state, ",
    "extract(epoch FROM clock_timestamp() - a.state_change)::float8 AS idle_seconds, ",
    "coalesce(a.state LIKE 'idle%' AND clock_timestamp() - a.state_change > $4::float8 * interval '1 second', false) ",
    "AS looks_frozen, l.pid = pg_backend_pid() AS mine ",
    "FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid WHERE ",
    advisory_locks_of_this_database!(),
    "AND l.classid IN ($1::int4::oid, $2::int4::oid, $3::int4::oid) ",
    "ORDER BY kind, number"
);

/// Ends backend `$1` if it still looks frozen: idle (between statements, or in a transaction)
/// for longer than `$2` seconds. Checked again here, in the same statement as the termination,
/// so that a relay that woke since the last look keeps its session. One row (whether it was
/// ended) or none (it no longer looks frozen).
const TERMINATE_FROZEN_SQL: &str = "SELECT pg_terminate_backend(pid) AS ended FROM pg_stat_activity \
     WHERE pid = $1 AND state LIKE 'idle%' AND clock_timestamp() - state_change > $2::float8 * interval '1 second'";
