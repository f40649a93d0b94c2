//! `outbox-relay migrate`: create or upgrade the standard outbox table.
//!
//! The migrations and the statements that apply them are [`crate::postgres::schema`]'s; this
//! command runs them and says what it did. Running it again is a no-op that says so.

use crate::commands::Report;
use crate::config::Config;
use crate::postgres::schema::{self, MigrateError, MigrateReport};

/// Applies the migrations the database does not have yet.
pub async fn migrate(config: &Config) -> Result<MigrateReport, MigrateError> {
    schema::migrate(config).await
}

impl Report for MigrateReport {
    fn render_text(&self) -> String {
        if self.applied.is_empty() {
            return format!("schema is up to date (version {})\n", self.version);
        }
        let mut out: String = self.applied.iter().map(|name| format!("applied {name}\n")).collect();
        out.push_str(&format!("schema is at version {}\n", self.version));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migrate_with_nothing_to_apply_names_the_version_it_found() {
        let report = MigrateReport { applied: Vec::new(), version: 3 };
        assert_eq!(report.render_text(), "schema is up to date (version 3)\n");
    }

    #[test]
    fn a_migrate_lists_what_it_applied_then_the_version_reached() {
        let report = MigrateReport { applied: vec!["0002_a", "0003_b"], version: 3 };
        assert_eq!(report.render_text(), "applied 0002_a\napplied 0003_b\nschema is at version 3\n");
    }
}
