//! `outbox-relay check`: what a table lacks for each guarantee the relay gives, and the SQL and
//! configuration that add it.
//!
//! `run` refuses a table it cannot relay correctly at all (a missing column, an order column
//! that cannot order); a table it can relay with a weaker guarantee, or only slowly, it accepts
//! with a warning at most. A team bringing its own table (Debezium's layout, a home-grown
//! poller's) wants the whole gap at once, before the relay runs on it: this command lists each
//! guarantee with what holds, what is lacking and the statements that close the gap. It only
//! reads; it never changes the table.

use serde::Serialize;

use crate::commands::{Outcome, Report};
use crate::config::Identifier;
use crate::config::{ColumnRole, Config};
use crate::postgres::error::OutboxError;
use crate::postgres::index_predicate::predicate_within;
use crate::postgres::layout::{CatalogColumn, Layout, Mapping, OrderColumn, Privilege, TableCatalog, TableIndex};
use crate::postgres::outbox::Outbox;

/// What the table gives and lacks, one item per guarantee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// The table, as configured.
    pub table: String,
    /// One item per guarantee, in the order the README's guarantees come.
    pub items: Vec<CheckItem>,
}

/// One guarantee: whether the table gives it, and if not, how to add it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckItem {
    /// The guarantee, as the README names it.
    pub guarantee: &'static str,
    /// Whether the table gives it.
    pub verdict: Verdict,
    /// What holds, or what is lacking and what that costs.
    pub detail: String,
    /// Statements that add what is lacking, in order; run them as the table's owner.
    pub sql: Vec<String>,
    /// Configuration keys to set once the statements have run, as `key = value`.
    pub config: Vec<String>,
}

/// Whether a guarantee holds on the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The table and configuration give it.
    Ok,
    /// The table lacks something for it; the item says what and how to add it.
    Lacking,
    /// The configuration turns it off on purpose (`outbox.per_key_order = false`, no key).
    Off,
    /// Not a gap, but something to know (a trigger that rules out two-phase commit).
    Note,
}

impl CheckReport {
    /// Whether nothing is lacking.
    pub fn is_complete(&self) -> bool {
        self.items.iter().all(|item| item.verdict != Verdict::Lacking)
    }
}

impl Report for CheckReport {
    fn outcome(&self) -> Outcome {
        if self.is_complete() { Outcome::Done } else { Outcome::NeedsAction }
    }

    /// The report as an operator reads it: one line per guarantee, then what to run and set.
    fn render_text(&self) -> String {
        let lacking = self.items.iter().filter(|item| item.verdict == Verdict::Lacking).count();
        let mut out = format!("table {}: ", self.table);
        if lacking == 0 {
            out.push_str("nothing lacking\n");
        } else {
            out.push_str(&format!("{lacking} of {} checks lacking\n", self.items.len()));
        }
        let width = self.items.iter().map(|item| item.guarantee.len()).max().unwrap_or(0);
        for item in &self.items {
            let verdict = match item.verdict {
                Verdict::Ok => "ok",
                Verdict::Lacking => "lacking",
                Verdict::Off => "off",
                Verdict::Note => "note",
            };
            out.push_str(&format!("\n{verdict:<8} {:<width$}  {}\n", item.guarantee, item.detail));
            if !item.sql.is_empty() {
                out.push_str("         run:\n");
                for statement in &item.sql {
                    out.push_str(&format!("           {statement}\n"));
                }
            }
            if !item.config.is_empty() {
                out.push_str("         then set:\n");
                for setting in &item.config {
                    out.push_str(&format!("           {setting}\n"));
                }
            }
        }
        out
    }
}

/// Checks the configured table: connects as `run` would (so a missing column or table is the
/// same error), then reads its catalog.
pub async fn check(config: &Config) -> Result<CheckReport, OutboxError> {
    let mapping = crate::postgres::outbox::mapping_of(config)?;
    let outbox = Outbox::connect(config, &mapping).await?;
    let catalog = outbox.catalog().await?;
    let storage = Storage::read(config, &mapping).await?;
    let retention = config.retention.delete_published_after.is_some();
    let missing_privileges = match outbox.check_privileges(&mapping.privileges_needed(retention)).await {
        Ok(()) => Vec::new(),
        Err(OutboxError::MissingPrivileges { missing, .. }) => missing,
        Err(e) => return Err(e),
    };
    Ok(assess(outbox.layout(), outbox.order_column(), &catalog, &storage, &missing_privileges))
}

/// How the table is stored, beyond its columns and indexes: what decides which statements
/// PostgreSQL accepts on it (`CONCURRENTLY` and `UNIQUE` are refused on a partitioned table
/// in the forms a plain table takes) and which indexes cannot overflow on a long key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Storage {
    /// The table is partitioned (`PARTITION BY`): indexes are created on the parent without
    /// `CONCURRENTLY`, and a unique index must include every partition key column.
    pub partitioned: bool,
    /// The columns of the partition key, in order (expressions left out).
    pub partition_columns: Vec<String>,
    /// The names of the table's hash indexes: they store a key's hash, so no key is too long
    /// for them.
    pub hash_indexes: Vec<String>,
}

/// `$1` the table (quoted name): partitioned?, its partition key's columns, its hash indexes.
const STORAGE_SQL: &str = "SELECT c.relkind = 'p', \
     array(SELECT a.attname::text FROM pg_partitioned_table AS p \
           CROSS JOIN LATERAL unnest(p.partattrs::int2[]) WITH ORDINALITY AS k(attnum, n) \
           JOIN pg_attribute AS a ON a.attrelid = p.partrelid AND a.attnum = k.attnum \
           WHERE p.partrelid = c.oid ORDER BY k.n), \
     array(SELECT ic.relname::text FROM pg_index AS i JOIN pg_class AS ic ON ic.oid = i.indexrelid \
           JOIN pg_am AS am ON am.oid = ic.relam WHERE i.indrelid = c.oid AND am.amname = 'hash' ORDER BY 1) \
     FROM pg_class AS c WHERE c.oid = to_regclass($1)";

impl Storage {
    /// Reads how the mapped table is stored; a table that is not there is a plain one with no
    /// hash index (connecting has already refused a missing table).
    pub async fn read(config: &Config, mapping: &Mapping) -> Result<Storage, OutboxError> {
        let what = "read how the table is stored";
        let client = crate::postgres::connect::connect_client(config).await?;
        let row = client
            .query_opt(STORAGE_SQL, &[&mapping.table_sql()])
            .await
            .map_err(|source| OutboxError::Query { what, source })?;
        let Some(row) = row else { return Ok(Storage::default()) };
        let decode = || -> Result<Storage, tokio_postgres::Error> {
            Ok(Storage {
                partitioned: row.try_get(0)?,
                partition_columns: row.try_get(1)?,
                hash_indexes: row.try_get(2)?,
            })
        };
        decode().map_err(|source| OutboxError::Query { what, source })
    }
}

/// The report for a table whose catalog has been read: every judgement is made here, from
/// the catalog alone, so it can be tested without a database.
pub fn assess(
    layout: &Layout,
    order_column: &OrderColumn,
    catalog: &TableCatalog,
    storage: &Storage,
    missing_privileges: &[Privilege],
) -> CheckReport {
    let table = Table { layout, catalog, storage };
    CheckReport {
        table: layout.mapping.table_name(),
        items: vec![
            table.per_key_order(order_column),
            table.commit_order_safety(),
            table.poison_rows(),
            table.claim_index(),
            table.retry_index(),
            table.event_ids(),
            table.two_phase_commit(),
            table.privileges(missing_privileges),
        ],
    }
}

/// The layout and catalog of one table, with the judgements as methods.
struct Table<'a> {
    layout: &'a Layout,
    catalog: &'a TableCatalog,
    storage: &'a Storage,
}

/// An optional column of the standard table that `check` may propose to add: its name,
/// definition and type come from the column declaration ([`ColumnRole`]); what it gives is said
/// here, where the report explains what a table without it lacks.
struct StandardColumn {
    role: ColumnRole,
    /// What the relay does with it (and cannot do without it).
    gives: &'static str,
}

impl StandardColumn {
    fn name(&self) -> &'static str {
        self.role.default_column().unwrap_or(self.role.key())
    }

    fn definition(&self) -> &'static str {
        self.role.declaration().definition.unwrap_or("text")
    }

    /// `format_type` of the definition, to tell whether an unmapped column of that name fits.
    fn data_type(&self) -> &'static str {
        self.role.types().and_then(|types| types.allowed.first().copied()).unwrap_or("text")
    }
}

const XACT_ID: StandardColumn = StandardColumn { role: ColumnRole::XactId, gives: "" };

const POISON_COLUMNS: [StandardColumn; 4] = [
    StandardColumn {
        role: ColumnRole::Attempts,
        gives: "counts a row's failed attempts; without it no row is given up on and `status` sees no failing row",
    },
    StandardColumn { role: ColumnRole::LastError, gives: "keeps the last failure's text for `status` and `audit`" },
    StandardColumn {
        role: ColumnRole::LastAttemptAt,
        gives: "spaces a failing row's attempts out; without it the row is tried again at every claim",
    },
    StandardColumn {
        role: ColumnRole::FailedAt,
        gives: "marks a row given up on after relay.max_attempts, for `retry`; without it the relay never gives up",
    },
];

impl Table<'_> {
    fn mapping(&self) -> &Mapping {
        &self.layout.mapping
    }

    fn column(&self, name: &str) -> Option<&CatalogColumn> {
        self.catalog.columns.iter().find(|c| c.name == name)
    }

    /// The name of a column as PostgreSQL prints it in an index predicate.
    fn quoted(&self, column: &Identifier) -> String {
        self.column(column.as_str()).map_or_else(|| column.to_string(), |c| c.quoted.clone())
    }

    /// `CREATE [UNIQUE] INDEX [CONCURRENTLY] name ON table`: concurrently (writers go on while
    /// it is built) where PostgreSQL allows it, which is not on a partitioned table.
    fn create_index(&self, unique: bool, name: &str) -> String {
        format!(
            "CREATE {}INDEX {}{} ON {}",
            if unique { "UNIQUE " } else { "" },
            if self.storage.partitioned { "" } else { "CONCURRENTLY " },
            quote(name),
            self.mapping().table_sql()
        )
    }

    /// Whether an index holds every row a query with the conditions `wanted` reads: its
    /// predicate, if any, says nothing the query does not say too.
    fn covers(&self, index: &TableIndex, wanted: &[&str]) -> bool {
        predicate_within(index.predicate.as_deref(), wanted)
    }

    /// What to say about building indexes on a partitioned table, whose statements cannot run
    /// `CONCURRENTLY`.
    fn partitioned_note(&self) -> &'static str {
        if self.storage.partitioned {
            "; the table is partitioned, so PostgreSQL builds the index on every partition and \
             refuses CONCURRENTLY: on a busy table, create it ON ONLY the table, then CONCURRENTLY on \
             each partition, and ALTER INDEX ... ATTACH PARTITION each one"
        } else {
            ""
        }
    }

    /// An index of this table by name (as stored), quoted and in the table's schema.
    fn qualified_index(&self, name: &str) -> String {
        let quoted = quote(name);
        match self.mapping().table.as_slice() {
            [schema, _] => format!("{schema}.{quoted}"),
            _ => quoted,
        }
    }

    /// An index name for this table: `<table>_<suffix>`, within PostgreSQL's 63 bytes, as
    /// stored (unquoted).
    fn index_name(&self, suffix: &str) -> String {
        let table = self.mapping().table.last().map_or("outbox", |t| t.as_str());
        let mut name = format!("{table}_{suffix}");
        while name.len() > 63 {
            name.pop();
        }
        name
    }

    /// A column to add for `standard`: its configured name is missing from the mapping, so
    /// either an unmapped column of the standard name and type exists (only the config is
    /// lacking) or one must be added.
    /// Returns the column's name.
    fn add_column(&self, standard: &StandardColumn, sql: &mut Vec<String>, config: &mut Vec<String>) -> String {
        let name = match self.column(standard.name()) {
            Some(existing) if existing.data_type == standard.data_type() => standard.name().to_owned(),
            Some(_) => format!("relay_{}", standard.name()),
            None => standard.name().to_owned(),
        };
        if self.column(&name).is_none() {
            let quoted = Identifier::parse(&name).map_or(name.clone(), |i| i.to_string());
            sql.push(format!(
                "ALTER TABLE {} ADD COLUMN {quoted} {};",
                self.mapping().table_sql(),
                standard.definition()
            ));
        }
        config.push(format!("outbox.columns.{} = \"{name}\"", standard.role.key()));
        name
    }

    fn per_key_order(&self, order_column: &OrderColumn) -> CheckItem {
        let m = self.mapping();
        let item = |verdict, detail: String, sql: Vec<String>, config: Vec<String>| CheckItem {
            guarantee: "per-key order",
            verdict,
            detail,
            sql,
            config,
        };
        if m.key.is_none() {
            return item(
                Verdict::Off,
                "no key column: records have no key, so there is no key order to keep".into(),
                vec![],
                vec![],
            );
        }
        if !m.per_key_order {
            return item(
                Verdict::Off,
                format!(
                    "outbox.per_key_order = false: a key's rows go out in the order of column \"{}\", whatever that is",
                    m.order_by.as_str()
                ),
                vec![],
                vec![],
            );
        }
        match self.layout.check_per_key_order(order_column) {
            Ok(()) => {
                let source = match &order_column.sequence {
                    Some(sequence) => format!("fed by sequence {} without a cache", sequence.name),
                    None => "unique, assigned by the application".to_owned(),
                };
                item(
                    Verdict::Ok,
                    format!(
                        "a key's rows go out in the order of column \"{}\" ({}, NOT NULL, {source})",
                        m.order_by.as_str(),
                        self.layout.order_type
                    ),
                    vec![],
                    vec![],
                )
            }
            Err(refused) if !self.layout.orders_by_integer() => {
                let seq = self.column("seq").map_or("seq", |_| "relay_seq");
                item(
                    Verdict::Lacking,
                    format!("`run` refuses the table: {}", refused.problem),
                    vec![format!(
                        "ALTER TABLE {} ADD COLUMN {seq} bigint GENERATED ALWAYS AS IDENTITY UNIQUE;",
                        m.table_sql()
                    )],
                    vec![format!("outbox.columns.order_by = \"{seq}\"")],
                )
            }
            Err(refused) => {
                item(Verdict::Lacking, format!("`run` refuses the table: {}", refused.problem), vec![], vec![])
            }
        }
    }

    fn commit_order_safety(&self) -> CheckItem {
        let m = self.mapping();
        let mut item = CheckItem {
            guarantee: "commit-order safety",
            verdict: Verdict::Ok,
            detail: String::new(),
            sql: vec![],
            config: vec![],
        };
        let table = m.table_sql();
        match &m.xact_id {
            None => {
                item.verdict = Verdict::Lacking;
                item.detail = "no transaction-id column: a row whose transaction commits after a later row's \
                               can be overtaken by it within its key (`run` warns)"
                    .into();
                let name = self.add_column(&XACT_ID, &mut item.sql, &mut item.config);
                let quoted = Identifier::parse(&name).map_or(name.clone(), |i| i.to_string());
                item.sql.push(format!("ALTER TABLE {table} ALTER COLUMN {quoted} SET DEFAULT pg_current_xact_id();"));
            }
            Some(xact_id) => {
                let default = self.column(xact_id.as_str()).and_then(|c| c.default.as_deref());
                if default.is_some_and(|d| d.contains("pg_current_xact_id()")) {
                    item.detail = format!(
                        "column \"{}\" records each row's transaction; a row goes out only once every transaction \
                         that wrote before it has finished",
                        xact_id.as_str()
                    );
                } else {
                    item.verdict = Verdict::Lacking;
                    item.detail = format!(
                        "column \"{}\" has no DEFAULT pg_current_xact_id(): rows inserted without a value count as \
                         committed long ago and can be overtaken within their key",
                        xact_id.as_str()
                    );
                    item.sql
                        .push(format!("ALTER TABLE {table} ALTER COLUMN {xact_id} SET DEFAULT pg_current_xact_id();"));
                }
            }
        }
        item
    }

    fn poison_rows(&self) -> CheckItem {
        let m = self.mapping();
        let mapped = [&m.attempts, &m.last_error, &m.last_attempt_at, &m.failed_at];
        let mut item = CheckItem {
            guarantee: "poison rows",
            verdict: Verdict::Ok,
            detail: "a failing row is retried with backoff, given up on after relay.max_attempts, its error kept; \
                     `status`, `audit` and `retry` see it"
                .into(),
            sql: vec![],
            config: vec![],
        };
        let mut lacking = Vec::new();
        for (standard, column) in POISON_COLUMNS.iter().zip(mapped) {
            if column.is_none() {
                lacking.push(format!("{} ({})", standard.role.key(), standard.gives));
                self.add_column(standard, &mut item.sql, &mut item.config);
            }
        }
        if !lacking.is_empty() {
            item.verdict = Verdict::Lacking;
            item.detail = format!("no column for {}", lacking.join("; "));
        }
        item
    }

    /// The index the claim walks: the order column first; with `mark = "update"`, partial on
    /// unpublished rows, since the claims that start at the table's beginning (every
    /// `relay.full_scan_interval`, and the first) would otherwise walk every published row.
    fn claim_index(&self) -> CheckItem {
        let m = self.mapping();
        let order = m.order_by.as_str();
        let unpublished = m.published_at.as_ref().map(|p| format!("{} IS NULL", self.quoted(p)));
        let leads_with_order =
            |index: &&TableIndex| index.valid && index.columns.first().and_then(|c| c.as_deref()) == Some(order);
        let partial = self.catalog.indexes.iter().filter(leads_with_order).find(|index| match &unpublished {
            Some(condition) => self.covers(index, &[condition.as_str()]) && index.predicate.is_some(),
            None => index.predicate.is_none(),
        });
        let full = self.catalog.indexes.iter().filter(leads_with_order).find(|index| index.predicate.is_none());
        let mut item = CheckItem {
            guarantee: "index for claims",
            verdict: Verdict::Ok,
            detail: String::new(),
            sql: vec![],
            config: vec![],
        };
        if let Some(index) = partial.or(if unpublished.is_none() { full } else { None }) {
            item.detail = format!("claims walk index {} in the order of column \"{order}\"", index.name);
            return item;
        }
        item.verdict = Verdict::Lacking;
        let create = self.create_index(false, &self.index_name("unpublished_idx"));
        let columns = m.order_by.to_string();
        match (&unpublished, full) {
            (Some(condition), Some(index)) => {
                item.detail = format!(
                    "index {} also holds published rows, which every claim that starts at the table's beginning \
                     (the first, then every relay.full_scan_interval) and `status` walk through",
                    index.name
                );
                item.sql.push(format!("{create} ({columns}) WHERE {condition};"));
            }
            (Some(condition), None) => {
                item.detail =
                    format!("no index on column \"{order}\" for unpublished rows: every claim sorts the whole table");
                item.sql.push(format!("{create} ({columns}) WHERE {condition};"));
            }
            (None, _) => {
                item.detail = format!("no index on column \"{order}\": every claim sorts the whole table");
                item.sql.push(format!("{create} ({columns});"));
            }
        }
        item.detail.push_str(self.partitioned_note());
        item
    }

    /// The index the claim looks up, for each row it takes, an earlier row of the row's key
    /// that failed and holds the key back: a hash index on the key, partial on rows with failed
    /// attempts. A btree on (key, order) answers the lookup too, but a key longer than a btree
    /// entry may be (2,704 bytes) makes recording that row's failure an error, and the relay
    /// cannot record it.
    fn retry_index(&self) -> CheckItem {
        let m = self.mapping();
        let mut item = CheckItem {
            guarantee: "index for retries",
            verdict: Verdict::Ok,
            detail: String::new(),
            sql: vec![],
            config: vec![],
        };
        let (Some(key), Some(attempts)) = (&m.key, &m.attempts) else {
            item.verdict = Verdict::Off;
            item.detail = "no key or no attempts column: no earlier failing row of a key is looked for".into();
            return item;
        };
        if !self.layout.looks_for_rows_holding_keys_back() {
            item.verdict = Verdict::Off;
            item.detail = "no failed_at or last_attempt_at column: no earlier row holds a key back in the table".into();
            return item;
        }
        let failing = format!("{} > 0", self.quoted(attempts));
        let unpublished = m.published_at.as_ref().map(|p| format!("{} IS NULL", self.quoted(p)));
        let mut allowed = vec![failing.as_str()];
        allowed.extend(unpublished.as_deref());
        let leads_with_key = |index: &&TableIndex| {
            index.valid
                && index.columns.first().and_then(|c| c.as_deref()) == Some(key.as_str())
                && self.covers(index, &allowed)
        };
        let is_hash = |index: &&TableIndex| self.storage.hash_indexes.contains(&index.name);
        let hash = self.catalog.indexes.iter().filter(leads_with_key).find(is_hash);
        if let Some(index) = hash {
            item.detail = format!(
                "claims look up a key's earlier failing rows in hash index {}, which no key is too long for",
                index.name
            );
            return item;
        }
        let btree = self.catalog.indexes.iter().filter(leads_with_key).find(|index| {
            !is_hash(index) && index.columns.get(1).and_then(|c| c.as_deref()) == Some(m.order_by.as_str())
        });
        item.verdict = Verdict::Lacking;
        let name = self.index_name("retrying_idx");
        match btree {
            Some(index) => {
                item.detail = format!(
                    "index {} is a btree on (\"{}\", \"{}\"): a failing row whose key is longer than a btree entry \
                     may be (2,704 bytes) cannot be recorded as failing, and the relay retries recording it while \
                     other keys wait; a hash index on the key has no such limit",
                    index.name,
                    key.as_str(),
                    m.order_by.as_str()
                );
            }
            None => {
                item.detail = format!(
                    "no index on column \"{}\" for failing rows: for every row it takes, a claim looks for an \
                     earlier failing row of the row's key by reading the table",
                    key.as_str()
                );
            }
        }
        let condition = match &unpublished {
            Some(unpublished) => format!("{unpublished} AND {failing}"),
            None => failing.clone(),
        };
        let new_name = if btree.is_some_and(|index| index.name == name) {
            self.index_name("retrying_hash_idx")
        } else {
            name.clone()
        };
        item.sql.push(format!("{} USING hash ({key}) WHERE {condition};", self.create_index(false, &new_name)));
        if let Some(index) = btree {
            let concurrently = if self.storage.partitioned { "" } else { "CONCURRENTLY " };
            item.sql.push(format!("DROP INDEX {concurrently}{};", self.qualified_index(&index.name)));
            if new_name != name {
                // Built beside the old index under another name, it then takes the name
                // migration 0005 gives it.
                item.sql.push(format!("ALTER INDEX {} RENAME TO {};", self.qualified_index(&new_name), quote(&name)));
            }
        }
        item.detail.push_str(self.partitioned_note());
        item
    }

    /// Consumers drop a record whose `event_id` they have seen: two rows sharing one would
    /// lose the second.
    fn event_ids(&self) -> CheckItem {
        let m = self.mapping();
        let event_id = m.event_id.as_str();
        let mut item = CheckItem {
            guarantee: "event ids",
            verdict: Verdict::Ok,
            detail: String::new(),
            sql: vec![],
            config: vec![],
        };
        let unique = |columns: &[String]| {
            self.catalog.indexes.iter().find(|index| {
                index.valid
                    && index.unique
                    && index.predicate.is_none()
                    && index.columns.iter().map(|c| c.as_deref()).eq(columns.iter().map(|c| Some(c.as_str())))
            })
        };
        if let Some(index) = unique(&[event_id.to_owned()]) {
            item.detail = format!("column \"{event_id}\" is unique (index {})", index.name);
            return item;
        }
        // On a partitioned table PostgreSQL accepts a unique index only with every partition
        // key column in it: the best it can enforce is one event id per partition key value.
        let with_partition_key: Vec<String> = std::iter::once(event_id.to_owned())
            .chain(self.storage.partition_columns.iter().filter(|c| c.as_str() != event_id).cloned())
            .collect();
        if let Some(index) = unique(&with_partition_key).filter(|_| self.storage.partitioned) {
            item.verdict = Verdict::Note;
            item.detail = format!(
                "column \"{event_id}\" is unique together with the partition key (index {}), the most \
                 PostgreSQL enforces on a partitioned table: keep event ids to the default (time-ordered \
                 UUIDs) or to ids your application makes unique",
                index.name
            );
            return item;
        }
        item.verdict = Verdict::Lacking;
        item.detail = format!(
            "column \"{event_id}\" is not unique: two rows with one event id reach consumers as one event, \
             and a consumer that skips ids it has seen drops the second"
        );
        let columns: Vec<String> = with_partition_key
            .iter()
            .map(|c| Identifier::parse(c).map_or_else(|_| c.clone(), |i| i.to_string()))
            .collect();
        if self.storage.partitioned {
            item.detail.push_str(
                "; the table is partitioned, and PostgreSQL accepts a unique index on it only with the \
                 partition key's columns",
            );
        }
        let columns = if self.storage.partitioned { columns.join(", ") } else { m.event_id.to_string() };
        item.sql.push(format!("{} ({columns});", self.create_index(true, &self.index_name("event_id_key"))));
        item
    }

    fn two_phase_commit(&self) -> CheckItem {
        let triggers = &self.catalog.notify_triggers;
        if triggers.is_empty() {
            return CheckItem {
                guarantee: "two-phase commit",
                verdict: Verdict::Ok,
                detail: "no trigger sends NOTIFY: transactions that write the table can PREPARE".into(),
                sql: vec![],
                config: vec![],
            };
        }
        let table = self.mapping().table_sql();
        CheckItem {
            guarantee: "two-phase commit",
            verdict: Verdict::Note,
            detail: format!(
                "trigger {} sends NOTIFY, so PostgreSQL refuses to PREPARE a transaction that writes the table; \
                 the relay needs no trigger (it watches commits), so drop it if any writer uses XA or 2PC",
                triggers.join(", ")
            ),
            sql: triggers
                .iter()
                .map(|t| {
                    format!("DROP TRIGGER {} ON {table};", Identifier::parse(t).map_or(t.clone(), |i| i.to_string()))
                })
                .collect(),
            config: vec![],
        }
    }

    fn privileges(&self, missing: &[Privilege]) -> CheckItem {
        let role = Identifier::parse(&self.catalog.role).map_or(self.catalog.role.clone(), |r| r.to_string());
        if missing.is_empty() {
            return CheckItem {
                guarantee: "privileges",
                verdict: Verdict::Ok,
                detail: format!("role {} may do everything `run` does on the table", self.catalog.role),
                sql: vec![],
                config: vec![],
            };
        }
        let table = self.mapping().table_sql();
        let mut sql = Vec::new();
        for privilege in ["SELECT", "UPDATE", "DELETE"] {
            let wanted: Vec<&Privilege> = missing.iter().filter(|p| p.privilege == privilege).collect();
            if wanted.is_empty() {
                continue;
            }
            if wanted.iter().any(|p| p.column.is_none()) {
                sql.push(format!("GRANT {privilege} ON {table} TO {role};"));
            } else {
                let columns: Vec<String> =
                    wanted.iter().filter_map(|p| p.column.as_ref()).map(|c| c.to_string()).collect();
                sql.push(format!("GRANT {privilege} ({}) ON {table} TO {role};", columns.join(", ")));
            }
        }
        CheckItem {
            guarantee: "privileges",
            verdict: Verdict::Lacking,
            detail: format!(
                "role {} lacks {}; `run` refuses to start without them",
                self.catalog.role,
                missing.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
            ),
            sql,
            config: vec![],
        }
    }
}

/// `name` as an SQL identifier, quoted.
fn quote(name: &str) -> String {
    Identifier::parse(name).map_or_else(|_| name.to_owned(), |i| i.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_column_check_may_add_has_the_standard_tables_definition_and_type() {
        for standard in POISON_COLUMNS.iter().chain([&XACT_ID]) {
            let declared = standard.role.declaration();
            assert!(declared.definition.is_some(), "{:?} has no definition to add", standard.role);
            assert_eq!(Some(standard.name()), declared.default_column);
            assert!(standard.definition().starts_with(match standard.data_type() {
                "integer" => "int",
                "timestamp with time zone" => "timestamptz",
                other => other,
            }));
        }
    }
}
