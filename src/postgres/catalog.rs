//! What the relay reads of the catalog about its table: the columns' types (to resolve the
//! layout), the claim order column, the privileges of the relay's role, and what `outbox-relay
//! check` reports (columns, indexes, notifying triggers). Judging what was read is the
//! layout's business ([`crate::postgres::layout`]); this module runs the statements and
//! decodes their rows.

use tokio_postgres::Client;

use crate::postgres::error::OutboxError;
use crate::postgres::index_predicate::predicate_within;
use crate::postgres::layout::{
    CatalogColumn, Layout, Mapping, OrderColumn, OrderSequence, Privilege, TableCatalog, TableIndex,
};
use crate::postgres::outbox::Outbox;

impl Outbox {
    /// Fails with [`OutboxError::MissingPrivileges`] unless this connection's role holds every
    /// privilege in `needed` on the table.
    pub async fn check_privileges(&self, needed: &[Privilege]) -> Result<(), OutboxError> {
        let privileges: Vec<&str> = needed.iter().map(|p| p.privilege).collect();
        let columns: Vec<&str> = needed.iter().map(|p| p.column.as_ref().map_or("", |c| c.as_str())).collect();
        let row = self
            .client
            .query_one(MISSING_PRIVILEGES_SQL, &[&self.layout.mapping.table_sql(), &privileges, &columns])
            .await
            .map_err(OutboxError::query("check privileges"))?;
        let missing: Vec<i64> = row.try_get("missing").map_err(OutboxError::query("check privileges"))?;
        if missing.is_empty() {
            return Ok(());
        }
        Err(OutboxError::MissingPrivileges {
            role: row.try_get("role").map_err(OutboxError::query("check privileges"))?,
            table: self.layout.mapping.table_name(),
            missing: missing
                .iter()
                .filter_map(|n| usize::try_from(*n).ok().and_then(|n| n.checked_sub(1)).and_then(|i| needed.get(i)))
                .cloned()
                .collect(),
        })
    }

    /// What the catalog says of the table's columns, indexes and triggers, for `outbox-relay
    /// check`.
    pub async fn catalog(&self) -> Result<TableCatalog, OutboxError> {
        let table = self.layout.mapping.table_sql();
        let what = "read the table's catalog";
        let columns = self.client.query(CATALOG_COLUMNS_SQL, &[&table]).await.map_err(OutboxError::query(what))?;
        let indexes = self.client.query(CATALOG_INDEXES_SQL, &[&table]).await.map_err(OutboxError::query(what))?;
        let triggers =
            self.client.query(CATALOG_NOTIFY_TRIGGERS_SQL, &[&table]).await.map_err(OutboxError::query(what))?;
        let role =
            self.client.query_one("SELECT current_user::text AS role", &[]).await.map_err(OutboxError::query(what))?;
        let decode = || -> Result<TableCatalog, tokio_postgres::Error> {
            Ok(TableCatalog {
                columns: columns
                    .iter()
                    .map(|r| {
                        Ok(CatalogColumn {
                            name: r.try_get("name")?,
                            quoted: r.try_get("quoted")?,
                            data_type: r.try_get("data_type")?,
                            default: r.try_get("default_expr")?,
                        })
                    })
                    .collect::<Result<_, tokio_postgres::Error>>()?,
                indexes: indexes
                    .iter()
                    .map(|r| {
                        Ok(TableIndex {
                            name: r.try_get("name")?,
                            unique: r.try_get("is_unique")?,
                            valid: r.try_get("is_valid")?,
                            columns: r.try_get("columns")?,
                            predicate: r.try_get("predicate")?,
                        })
                    })
                    .collect::<Result<_, tokio_postgres::Error>>()?,
                notify_triggers: triggers.iter().map(|r| r.try_get("name")).collect::<Result<_, _>>()?,
                role: role.try_get("role")?,
            })
        };
        decode().map_err(OutboxError::query(what))
    }
}

pub(in crate::postgres) async fn resolve_layout(client: &Client, mapping: &Mapping) -> Result<Layout, OutboxError> {
    let table = mapping.table_sql();
    let rows = client.query(TABLE_COLUMNS_SQL, &[&table]).await.map_err(OutboxError::query("read table columns"))?;
    if rows.is_empty() {
        return Err(OutboxError::TableMissing(mapping.table_name()));
    }
    let columns = rows
        .iter()
        .map(|r| Ok((r.try_get("name")?, r.try_get("data_type")?)))
        .collect::<Result<Vec<(String, String)>, tokio_postgres::Error>>()
        .map_err(OutboxError::query("read table columns"))?;
    let mut layout = mapping.resolve(&columns)?;
    layout.failing_rows_by_key_index = has_failing_rows_by_key_index(client, mapping).await?;
    Ok(layout)
}

/// Whether the table has a valid partial index leading with the key column whose predicate
/// holds every row the claim's lookup of failing rows wants (those with failed attempts, and
/// unpublished where the mapping has the column). A probe of such an index by key reads the few
/// failing rows of that key, so the claim may run the lookup for each row it reads.
async fn has_failing_rows_by_key_index(client: &Client, mapping: &Mapping) -> Result<bool, OutboxError> {
    let (Some(key), Some(attempts)) = (&mapping.key, &mapping.attempts) else { return Ok(false) };
    let what = "read the table's indexes";
    let published_at = mapping.published_at.as_ref().map(|c| c.as_str());
    let rows = client
        .query(KEY_LOOKUP_INDEXES_SQL, &[&mapping.table_sql(), &key.as_str(), &attempts.as_str(), &published_at])
        .await
        .map_err(OutboxError::query(what))?;
    for row in rows {
        let predicate: String = row.try_get("predicate").map_err(OutboxError::query(what))?;
        let failing = format!("{} > 0", row.try_get::<_, String>("attempts").map_err(OutboxError::query(what))?);
        let unpublished = row
            .try_get::<_, Option<String>>("published_at")
            .map_err(OutboxError::query(what))?
            .map(|column| format!("{column} IS NULL"));
        let mut wanted = vec![failing.as_str()];
        wanted.extend(unpublished.as_deref());
        if predicate_within(Some(&predicate), &wanted) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// What the catalog says of the claim order column: `NOT NULL`, unique, and its sequence.
pub(in crate::postgres) async fn read_order_column(
    client: &Client,
    layout: &Layout,
) -> Result<OrderColumn, OutboxError> {
    let mapping = &layout.mapping;
    let row = client
        .query_opt(ORDER_COLUMN_SQL, &[&mapping.table_sql(), &mapping.order_by.as_str()])
        .await
        .map_err(OutboxError::query("read the order column"))?;
    let Some(row) = row else {
        // The layout was just resolved against the same catalog; a concurrent DROP COLUMN.
        return Err(OutboxError::TableMissing(mapping.table_name()));
    };
    let decode = || -> Result<OrderColumn, tokio_postgres::Error> {
        let sequence = match row.try_get::<_, Option<String>>("sequence")? {
            Some(name) => Some(OrderSequence {
                name,
                increment: row.try_get("increment")?,
                cache: row.try_get("cache")?,
                cycles: row.try_get("cycles")?,
            }),
            None => None,
        };
        Ok(OrderColumn { not_null: row.try_get("not_null")?, unique: row.try_get("is_unique")?, sequence })
    };
    decode().map_err(OutboxError::query("read the order column"))
}

/// Columns of a table: `name` and `data_type` (`format_type`); `$1` is the quoted table name.
const TABLE_COLUMNS_SQL: &str = "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS data_type \
     FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped";

/// What `outbox-relay check` reads of table `$1` (quoted name), one row per column: `name`,
/// the name as PostgreSQL quotes it in expressions (`quoted`, to read index predicates), its
/// `data_type`, and its default expression (`default_expr`, NULL without one).
const CATALOG_COLUMNS_SQL: &str = "SELECT a.attname::text AS name, quote_ident(a.attname) AS quoted, \
     format_type(a.atttypid, a.atttypmod) AS data_type, pg_get_expr(d.adbin, d.adrelid) AS default_expr \
     FROM pg_attribute AS a LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";

/// The indexes of table `$1` (quoted name): `name`, `is_unique`, `is_valid` (a failed `CREATE
/// INDEX CONCURRENTLY` leaves an invalid one), key `columns` in order (NULL for an expression),
/// and the `predicate` of a partial index as PostgreSQL prints it (NULL for none).
const CATALOG_INDEXES_SQL: &str = "SELECT c.relname::text AS name, i.indisunique AS is_unique, i.indisvalid AS is_valid, \
     array(SELECT a.attname::text FROM generate_series(0, i.indnkeyatts - 1) AS k(n) \
           LEFT JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[k.n] ORDER BY k.n) AS columns, \
     pg_get_expr(i.indpred, i.indrelid) AS predicate \
     FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass($1) ORDER BY 1";

/// The enabled triggers on table `$1` (quoted name) whose function sends a notification:
/// PostgreSQL refuses to `PREPARE` a transaction that has sent one. One `name` a row.
const CATALOG_NOTIFY_TRIGGERS_SQL: &str = "SELECT t.tgname::text AS name FROM pg_trigger AS t \
     JOIN pg_proc AS p ON p.oid = t.tgfoid \
     WHERE t.tgrelid = to_regclass($1) AND NOT t.tgisinternal AND t.tgenabled <> 'D' \
       AND p.prosrc ~* '(pg_notify|\\mnotify\\M)' ORDER BY 1";

/// The valid partial indexes of table `$1` (quoted name) whose first column is `$2` (the key, its
/// name as stored): each one's `predicate` as PostgreSQL prints it, with the attempts column `$3`
/// and the published-at column `$4` (NULL for none) named as it prints them (`attempts`,
/// `published_at`).
const KEY_LOOKUP_INDEXES_SQL: &str = "SELECT pg_get_expr(i.indpred, i.indrelid) AS predicate, \
     quote_ident($3) AS attempts, quote_ident($4) AS published_at FROM pg_index AS i \
       JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
     WHERE i.indrelid = to_regclass($1) AND i.indisvalid AND i.indpred IS NOT NULL AND a.attname = $2";

/// What [`OrderColumn`] needs to know of column `$2` (its name as stored) of table `$1` (quoted
/// name): `not_null`, a unique index of its own (`is_unique`), and the `sequence` feeding it
/// (identity or serial: its name, `increment`, `cache`, `cycles`; NULLs without one). Needs no
/// privilege on the sequence.
const ORDER_COLUMN_SQL: &str = "SELECT a.attnotnull AS not_null, EXISTS (SELECT 1 FROM pg_index AS i \
       WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indpred IS NULL AND i.indnkeyatts = 1 \
         AND i.indkey[0] = a.attnum) AS is_unique, \
     s.seqrelid::regclass::text AS sequence, s.seqincrement AS increment, s.seqcache AS cache, s.seqcycle AS cycles \
     FROM pg_attribute AS a LEFT JOIN pg_sequence AS s ON s.seqrelid = pg_get_serial_sequence($1, $2)::regclass \
     WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped";

/// Which of the privileges `$2` (names) on columns `$3` (names, `''` for the table) the current
/// role lacks on table `$1` (quoted name): their positions in the lists, from 1 (`missing`); and
/// the `role`.
const MISSING_PRIVILEGES_SQL: &str = "SELECT current_user::text AS role, coalesce(array_agg(p.n ORDER BY p.n) FILTER (WHERE NOT \
     CASE WHEN p.col = '' THEN has_table_privilege($1, p.privilege) ELSE has_column_privilege($1, p.col, p.privilege) END), \
     '{}') AS missing FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS p(privilege, col, n)";
