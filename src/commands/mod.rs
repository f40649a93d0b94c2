//! The operator's commands: `run`, `migrate`, `audit`, `status`, `check`, `retry` and `config`.
//!
//! Each command is one function that does its work and returns a report (or its own error);
//! none of them prints, and none decides an exit code. The binary prints the report (as text,
//! or as JSON where the command offers `--json`) and turns an error into an exit code in one
//! place, so that what a command says and how it ends can be read side by side there.

pub mod audit;
pub mod check;
pub mod config;
pub mod migrate;
pub mod retry;
pub mod run;
pub mod status;

/// Whether a report is all there is to it, or names something the operator must act on.
///
/// A report that names something to act on is still a complete answer (unlike an error, the
/// command finished); the binary prints it and exits 1, so that scripts can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to act on.
    Done,
    /// Lost rows, a guarantee lacking, an id that could not be re-queued: see the report.
    NeedsAction,
}

/// What every command's report offers the binary that prints it.
pub trait Report {
    /// The report for a person, printed to stdout as it is.
    fn render_text(&self) -> String;

    /// Whether the report names something to act on.
    fn outcome(&self) -> Outcome {
        Outcome::Done
    }

    /// Findings about single things asked for that went wrong (an id `retry` could not
    /// re-queue), each a line for stderr, printed after the report.
    fn problems(&self) -> Vec<String> {
        Vec::new()
    }
}
