//! The `outbox-relay` command: parse the arguments, load the configuration, dispatch to a
//! command of [`outbox_relay::commands`], print its report, and turn how it ended into an exit
//! code. [`conclude`] is the one place that says a failure and picks the exit code; its doc
//! comment lists every code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outbox_relay::commands::audit::AuditError;
use outbox_relay::commands::retry::{RetryError, Selection};
use outbox_relay::commands::run::RunError;
use outbox_relay::commands::{self, Outcome, Report};
use outbox_relay::config::{CONFIG_FILE_ENV, Config, ConfigError, LogFormat};
use outbox_relay::postgres::audit_rows::RowRange;
use outbox_relay::postgres::error::OutboxError;
use outbox_relay::postgres::schema::MigrateError;
use outbox_relay::relay::RelayError;
use outbox_relay::service::telemetry::Telemetry;

/// Publishes the rows of a transactional outbox table to Kafka, at least once, in order per key.
#[derive(Parser)]
#[command(name = "outbox-relay", version)]
struct Cli {
    /// TOML configuration file; environment variables OUTBOX_RELAY_<SECTION>__<KEY> override it.
    #[arg(long, short, global = true, env = CONFIG_FILE_ENV, value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Relay outbox rows to Kafka until SIGTERM or SIGINT.
    Run,
    /// Create or upgrade the standard outbox table (running it again is a no-op).
    Migrate,
    /// Print the effective configuration as TOML, with secrets redacted.
    Config,
    /// Reconcile the table with a topic: rows marked published but missing from the topic
    /// (lost), event ids on the topic more than once (duplicated), rows pending or failed.
    /// Exits 0 when nothing is lost, 1 otherwise.
    Audit(AuditArgs),
    /// Show pending, failed, parked and held-back rows, and which relay publishes which shard.
    Status {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Say what the table lacks for each guarantee (order, commit-order safety, poison rows,
    /// indexes, unique event ids, two-phase commit, privileges) and print the SQL and settings
    /// that add it. Exits 0 when nothing is lacking, 1 otherwise. Only reads.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-queue rows the relay gave up on (after relay.max_attempts), so it tries them again.
    Retry(RetryArgs),
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct RetryArgs {
    /// Re-queue these failed rows (repeat or comma-separate).
    #[arg(long, value_name = "ID", value_delimiter = ',')]
    id: Vec<String>,
    /// Re-queue the failed rows of this key.
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// Re-queue every failed row.
    #[arg(long)]
    all: bool,
}

#[derive(clap::Args)]
struct AuditArgs {
    /// The topic to check.
    #[arg(long)]
    topic: String,
    /// Lowest row id to check (inclusive).
    #[arg(long, value_name = "ID")]
    from_id: Option<String>,
    /// Highest row id to check (inclusive).
    #[arg(long, value_name = "ID")]
    to_id: Option<String>,
    /// Only rows created at or after this time (e.g. 2026-11-23T10:00:00Z); the topic is read
    /// from records of about that time on.
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Only rows created before this time.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// How many ids to list for each finding.
    #[arg(long, default_value_t = 10, value_name = "N")]
    show: usize,
    /// Read the topic as a consumer with this isolation level would: read_uncommitted (every
    /// record written, the Java client's default) or read_committed (with
    /// kafka.delivery = "exactly_once", the level that sees each row once).
    #[arg(long, value_enum, default_value = "read_uncommitted", value_name = "LEVEL")]
    isolation: outbox_relay::commands::audit::Isolation,
}

impl RetryArgs {
    /// The rows asked for; clap lets exactly one of `--id`, `--key` and `--all` through.
    fn selection(self) -> Selection {
        match (self.id.is_empty(), self.key) {
            (false, _) => Selection::Ids(self.id),
            (true, Some(key)) if !self.all => Selection::Key(key),
            _ => Selection::All,
        }
    }
}

impl AuditArgs {
    /// The rows to audit.
    fn range(&self) -> RowRange {
        RowRange {
            from_id: self.from_id.clone(),
            to_id: self.to_id.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
        }
    }
}

fn main() -> ExitCode {
    // Only test builds read FAILPOINTS; a release build must not panic on a stray variable.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => return conclude(Err(Failure::Config(e)), LogFormat::Text),
    };
    let logs = config.log.format;
    // Printing the configuration needs neither the runtime nor the logs (a broken OTLP
    // endpoint must not keep an operator from seeing the configuration that names it).
    if let Command::Config = cli.command {
        return conclude(Ok(print_text(&commands::config::config(&config))), logs);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return conclude(Err(Failure::Runtime(e)), logs),
    };
    // The OTLP exporter's client needs the runtime's context when it starts.
    let _runtime = runtime.enter();
    let telemetry = match Telemetry::init(&config) {
        Ok(telemetry) => telemetry,
        Err(e) => return conclude(Err(Failure::Telemetry(e)), logs),
    };
    let result = runtime.block_on(dispatch(cli.command, config));
    // Said while the logs are still up: a relay's fatal error may go out as a log line.
    let code = conclude(result, logs);
    telemetry.shutdown();
    code
}

/// Runs the command and prints its report.
async fn dispatch(command: Command, config: Config) -> Result<Outcome, Failure> {
    match command {
        Command::Run => {
            commands::run::run(config).await?;
            Ok(Outcome::Done)
        }
        Command::Migrate => Ok(print_text(&commands::migrate::migrate(&config).await?)),
        Command::Audit(args) => {
            let report = commands::audit::audit(&config, &args.topic, &args.range(), args.isolation, args.show).await?;
            print(&report, args.json.then_some("report"))
        }
        Command::Status { json } => {
            let report = commands::status::status(&config).await.map_err(Failure::Status)?;
            print(&report, json.then_some("status"))
        }
        Command::Check { json } => {
            let report = commands::check::check(&config).await.map_err(Failure::Check)?;
            print(&report, json.then_some("check"))
        }
        Command::Retry(args) => Ok(print_text(&commands::retry::retry(&config, &args.selection()).await?)),
        // main prints it before the runtime starts; this arm only keeps the match whole.
        Command::Config => Ok(print_text(&commands::config::config(&config))),
    }
}

/// Prints a report for a person: its text on stdout, its problems on stderr.
fn print_text(report: &dyn Report) -> Outcome {
    print!("{}", report.render_text());
    finish_printing(report)
}

/// Prints a report as JSON when `--json` asked for it (`json` names the report for an error
/// message then), otherwise for a person.
fn print<R: Report + serde::Serialize>(report: &R, json: Option<&'static str>) -> Result<Outcome, Failure> {
    let Some(what) = json else { return Ok(print_text(report)) };
    let text = serde_json::to_string_pretty(report).map_err(|source| Failure::Render { what, source })?;
    println!("{text}");
    Ok(finish_printing(report))
}

/// Prints the report's problems on stderr, after the report itself.
fn finish_printing(report: &dyn Report) -> Outcome {
    for problem in report.problems() {
        eprintln!("outbox-relay: {problem}");
    }
    report.outcome()
}

/// Why the command did not finish, with the stderr line that says so (after `outbox-relay: `).
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The configuration could not be loaded or is invalid.
    #[error("invalid configuration: {0}")]
    Config(ConfigError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// Logging or the span exporter could not be set up.
    #[error("{0}")]
    Telemetry(String),
    /// `run` stopped other than on request.
    #[error(transparent)]
    Run(#[from] RunError),
    /// `migrate` failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// `audit` could not finish.
    #[error("audit: {0}")]
    Audit(#[from] AuditError),
    /// `status` could not read the table.
    #[error("status: {0}")]
    Status(OutboxError),
    /// `check` could not read the table.
    #[error("check: {0}")]
    Check(OutboxError),
    /// `retry` re-queued nothing.
    #[error("retry: {0}")]
    Retry(#[from] RetryError),
    /// A report could not be rendered as JSON.
    #[error("cannot render the {what}: {source}")]
    Render {
        /// Which report.
        what: &'static str,
        /// serde_json's error.
        source: serde_json::Error,
    },
}

/// Something outside the relay failed, or a report names something to act on.
const EXIT_FAILED: u8 = 1;
/// The configuration or the table must change.
const EXIT_CONFIG: u8 = 2;
/// `audit` could not finish (database, topic or range problem), as distinct from a finding.
const EXIT_AUDIT_INCOMPLETE: u8 = 3;
/// `run` stopped on request, but the grace period ended before the batch in flight was
/// finished: its rows will be published again.
const EXIT_ABANDONED: u8 = 4;

/// Says how the command ended, once, on stderr, and returns its exit code: the one place that
/// decides both.
///
/// - `0`: done: the command did what was asked, and its report names nothing to act on.
/// - `1`: a failure outside the relay (the runtime, signal handlers, a database or broker that
///   failed or went away), or a report that names something to act on (`audit` found lost
///   rows or conflicting duplicates, `check` found something lacking, `retry` could not
///   re-queue an id asked for).
/// - `2`: a configuration problem: an invalid configuration, a table that does not match it,
///   a login or broker refused at startup, `migrate` asked to manage a table that is not its
///   own, `retry` without a `failed_at` column or given ids that are not ids of the table.
/// - `3`: `audit` could not finish (database, topic or range problem), as distinct from a
///   finding.
/// - `4`: `run` stopped on request, but `relay.shutdown_timeout` ended before the batch in
///   flight was finished; its rows are published again by the next run.
/// - `130`: a second SIGTERM or SIGINT during `run`; not decided here, as the process exits at
///   once (see `Shutdown::on_signals`).
///
/// A relay's fatal error goes to the logs where they are JSON (`log.format = "json"`), so log
/// pipelines get it whole; every other failure is one plain line.
fn conclude(result: Result<Outcome, Failure>, logs: LogFormat) -> ExitCode {
    let failure = match result {
        Ok(Outcome::Done) => return ExitCode::SUCCESS,
        Ok(Outcome::NeedsAction) => return ExitCode::from(EXIT_FAILED),
        Err(failure) => failure,
    };
    match &failure {
        Failure::Run(RunError::Relay(e)) if logs == LogFormat::Json => tracing::error!(error = %e, "relay stopped"),
        failure => eprintln!("outbox-relay: {failure}"),
    }
    ExitCode::from(match failure {
        Failure::Config(_) | Failure::Telemetry(_) => EXIT_CONFIG,
        Failure::Runtime(_) | Failure::Render { .. } => EXIT_FAILED,
        Failure::Run(RunError::Signals(_)) => EXIT_FAILED,
        Failure::Run(RunError::Relay(RelayError::Abandoned { .. })) => EXIT_ABANDONED,
        Failure::Run(RunError::Relay(e)) if e.is_config_problem() => EXIT_CONFIG,
        Failure::Run(RunError::Relay(_)) => EXIT_FAILED,
        Failure::Migrate(MigrateError::CustomLayout | MigrateError::Partitioned) => EXIT_CONFIG,
        Failure::Migrate(_) => EXIT_FAILED,
        Failure::Audit(_) => EXIT_AUDIT_INCOMPLETE,
        Failure::Status(e) | Failure::Check(e) if e.is_transient() => EXIT_FAILED,
        Failure::Status(_) | Failure::Check(_) => EXIT_CONFIG,
        Failure::Retry(RetryError::Mapping(_) | RetryError::NoFailedAt | RetryError::NotIds { .. }) => EXIT_CONFIG,
        Failure::Retry(RetryError::Connect(e)) if !e.is_transient() => EXIT_CONFIG,
        Failure::Retry(RetryError::Connect(_) | RetryError::Query(_)) => EXIT_FAILED,
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn retry_selection(args: &[&str]) -> Selection {
        let cli = Cli::try_parse_from([&["outbox-relay", "retry"], args].concat()).expect("valid arguments");
        let Command::Retry(args) = cli.command else { panic!("not retry") };
        args.selection()
    }

    #[test]
    fn the_arguments_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn retry_selects_ids_a_key_or_everything() {
        assert_eq!(
            retry_selection(&["--id", "1,2", "--id", "3"]),
            Selection::Ids(vec!["1".into(), "2".into(), "3".into()])
        );
        assert_eq!(retry_selection(&["--key", "K"]), Selection::Key("K".into()));
        assert_eq!(retry_selection(&["--all"]), Selection::All);
    }

    #[test]
    fn retry_asks_for_exactly_one_selection() {
        assert!(Cli::try_parse_from(["outbox-relay", "retry"]).is_err());
        assert!(Cli::try_parse_from(["outbox-relay", "retry", "--all", "--key", "K"]).is_err());
    }
}
