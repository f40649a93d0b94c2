//! The outbox schema as versioned migrations, embedded from `sql/migrations/` so that the
//! files users copy into their own migrations and what `outbox-relay migrate` applies are the
//! same text.
//!
//! Applied versions are recorded in `outbox_relay_schema_migrations`; `migrate` applies the
//! missing ones in order, in one transaction, under an advisory lock so that two relays
//! starting together cannot both apply them.

use tokio_postgres::Client;

use crate::config::{Config, OutboxConfig};
use crate::postgres::error::{OutboxError, describe_pg_error, privilege_hint};

/// One schema change, identified by its version.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Applied in ascending order; never reused.
    pub version: i32,
    /// File name without extension.
    pub name: &'static str,
    /// The SQL, exactly as in `sql/migrations/`.
    pub sql: &'static str,
}

/// A migration of `sql/migrations/`, by version and file name (without `.sql`).
macro_rules! migration {
    ($version:literal, $name:literal) => {
        Migration { version: $version, name: $name, sql: include_str!(concat!("../../sql/migrations/", $name, ".sql")) }
    };
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_create_outbox"),
    migration!(2, "0002_order_retries_notify"),
    migration!(3, "0003_time_ordered_event_ids"),
    migration!(4, "0004_wakeups_without_notify"),
    migration!(5, "0005_retrying_index_by_key_hash"),
];

const LOCK_KEY: &str = "outbox-relay:migrate";

const CREATE_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS outbox_relay_schema_migrations (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// A failure to migrate.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The configuration maps a table of the user's own; its schema is the user's to manage.
    #[error(
        "outbox.table: migrate creates the standard `outbox` table, but the configuration maps a custom table \
         or columns; create and migrate that table yourself (the relay only reads and marks it)"
    )]
    CustomLayout,
    /// Table `outbox` exists as a partitioned table (the README's high-volume layout): not
    /// the table the migrations create and change.
    #[error(
        "table outbox is partitioned: migrate manages only the standard table it creates, and its migrations are \
         not written for a partitioned one; keep that table's schema in your own migrations (README: Retention)"
    )]
    Partitioned,
    /// The database refused a statement or could not be reached.
    #[error(transparent)]
    Database(#[from] OutboxError),
    /// The outbox table exists and belongs to a role the login is not a member of: it may not
    /// change the table, and is most likely the relay's own restricted role.
    #[error(
        "migrate must run as the owner of table outbox ({owner}), not as {role}: the relay's own role only reads \
         and marks rows (sql/relay_role.sql); give migrate the owner's database.url"
    )]
    NotOwner {
        /// The role of the login.
        role: String,
        /// The table's owner.
        owner: String,
    },
    /// A migration's SQL failed.
    #[error("migration {name} failed: {}{}", describe_pg_error(source), privilege_hint(source, MIGRATE_ROLE_REMEDY))]
    Statement {
        /// Which migration.
        name: &'static str,
        /// The database's error.
        source: tokio_postgres::Error,
    },
}

/// What the role `migrate` runs as can do about a statement refused for want of a privilege.
const MIGRATE_ROLE_REMEDY: &str = "migrate creates and alters the outbox table: run it as a role that may create \
     tables in the schema, or as the table's owner, not as the relay's own role";

/// The role of the login, the outbox table's owner, and whether the login may act as that
/// owner; no row when the table does not exist yet.
const OWNER_SQL: &str = "SELECT current_user::text, pg_get_userbyid(c.relowner)::text, pg_has_role(c.relowner, 'USAGE'), \
     c.relkind = 'p' FROM pg_class AS c WHERE c.oid = to_regclass('outbox')";

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// Names of the migrations applied by this call, in order.
    pub applied: Vec<&'static str>,
    /// The schema version afterwards.
    pub version: i32,
}

/// Applies the migrations the database does not have yet. Running it again is a no-op.
pub async fn migrate(config: &Config) -> Result<MigrateReport, MigrateError> {
    if !uses_standard_layout(&config.outbox) {
        return Err(MigrateError::CustomLayout);
    }
    let mut client = crate::postgres::connect::connect_client(config).await?;
    apply(&mut client).await
}

fn uses_standard_layout(outbox: &OutboxConfig) -> bool {
    let standard = OutboxConfig::default();
    outbox.table == standard.table && outbox.topic_template.is_none() && outbox.columns == standard.columns
}

async fn apply(client: &mut Client) -> Result<MigrateReport, MigrateError> {
    let wrap = |name: &'static str| move |source| MigrateError::Statement { name, source };
    let tx = client.transaction().await.map_err(wrap("begin"))?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&LOCK_KEY]).await.map_err(wrap("lock"))?;
    // Said plainly before any statement fails with a bare "permission denied", and whatever
    // the server version lets every role create in schema public.
    if let Some(row) = tx.query_opt(OWNER_SQL, &[]).await.map_err(wrap("read the table's owner"))? {
        if !row.get::<_, bool>(2) {
            return Err(MigrateError::NotOwner { role: row.get(0), owner: row.get(1) });
        }
        if row.get::<_, bool>(3) {
            return Err(MigrateError::Partitioned);
        }
    }
    // IF [NOT] EXISTS clauses send NOTICEs ("... does not exist, skipping") that would reach the
    // operator's terminal as log lines; they carry nothing to act on.
    tx.batch_execute("SET LOCAL client_min_messages = warning").await.map_err(wrap("settings"))?;
    tx.batch_execute(CREATE_VERSION_TABLE).await.map_err(wrap("version table"))?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM outbox_relay_schema_migrations", &[])
        .await
        .map_err(wrap("read versions"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut report = MigrateReport { applied: Vec::new(), version: applied.iter().copied().max().unwrap_or(0) };
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        tx.batch_execute(migration.sql).await.map_err(wrap(migration.name))?;
        tx.execute(
            "INSERT INTO outbox_relay_schema_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await
        .map_err(wrap(migration.name))?;
        report.applied.push(migration.name);
        report.version = report.version.max(migration.version);
    }
    tx.commit().await.map_err(wrap("commit"))?;
    Ok(report)
}
