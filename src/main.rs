//! The `outbox-relay` command: parse arguments, load the configuration, call into the library,
//! and turn the result into an exit code (0 done, 1 failed, 2 configuration problem, 3 `audit`
//! could not finish, 4 `run` stopped with its batch in flight unfinished).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outbox_relay::config::{CONFIG_FILE_ENV, Config};
use outbox_relay::postgres::schema;
use outbox_relay::relay::RelayError;
use outbox_relay::service::telemetry::Telemetry;
use outbox_relay::{Relay, Shutdown};

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
}

const EXIT_FAILED: u8 = 1;
const EXIT_CONFIG: u8 = 2;
/// `audit` could not finish (database, topic or range problem), as distinct from a finding.
const EXIT_AUDIT_ERROR: u8 = 3;
/// `run` stopped on request, but the grace period ended before the batch in flight was
/// finished: its rows will be published again.
const EXIT_ABANDONED: u8 = 4;

fn main() -> ExitCode {
    // Only test builds read FAILPOINTS; a release build must not panic on a stray variable.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("outbox-relay: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Config = cli.command {
        print!("{}", config.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    // The OTLP exporter's client needs the runtime's context when it starts.
    let _runtime = runtime.enter();
    let telemetry = match Telemetry::init(&config) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("outbox-relay: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Run => run(config).await,
            Command::Migrate => migrate(config).await,
            Command::Audit(args) => audit(config, args).await,
            Command::Status { json } => status(config, json).await,
            Command::Retry(args) => retry(config, args).await,
            Command::Check { json } => check(config, json).await,
            Command::Config => ExitCode::SUCCESS,
        }
    });
    telemetry.shutdown();
    code
}

async fn run(config: Config) -> ExitCode {
    // Logs and this command's own error line both go to stderr: a fatal error is said once,
    // as a JSON log line where logs are JSON (so log pipelines get it whole), as one plain line
    // otherwise.
    let json_logs = config.log.format == outbox_relay::config::LogFormat::Json;
    let shutdown = Shutdown::new();
    if let Err(e) = shutdown.on_signals() {
        eprintln!("outbox-relay: cannot install signal handlers: {e}");
        return ExitCode::from(EXIT_FAILED);
    }
    let result = match Relay::new(config, shutdown) {
        Ok(relay) => relay.run().await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json_logs {
                tracing::error!(error = %e, "relay stopped");
            } else {
                eprintln!("outbox-relay: {e}");
            }
            ExitCode::from(match e {
                RelayError::Abandoned { .. } => EXIT_ABANDONED,
                e if e.is_config_problem() => EXIT_CONFIG,
                _ => EXIT_FAILED,
            })
        }
    }
}

async fn migrate(config: Config) -> ExitCode {
    match schema::migrate(&config).await {
        Ok(report) if report.applied.is_empty() => {
            println!("schema is up to date (version {})", report.version);
            ExitCode::SUCCESS
        }
        Ok(report) => {
            for name in &report.applied {
                println!("applied {name}");
            }
            println!("schema is at version {}", report.version);
            ExitCode::SUCCESS
        }
        Err(e @ (schema::MigrateError::CustomLayout | schema::MigrateError::Partitioned)) => {
            eprintln!("outbox-relay: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("outbox-relay: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

async fn audit(config: Config, args: AuditArgs) -> ExitCode {
    let range = outbox_relay::postgres::outbox::RowRange {
        from_id: args.from_id,
        to_id: args.to_id,
        since: args.since,
        until: args.until,
    };
    match outbox_relay::commands::audit::audit(&config, &args.topic, &range, args.show).await {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(json) => println!("{json}"),
                    Err(e) => eprintln!("outbox-relay: cannot render the report: {e}"),
                }
            } else {
                print!("{}", report.render_text());
            }
            if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_FAILED) }
        }
        Err(e) => {
            eprintln!("outbox-relay: audit: {e}");
            ExitCode::from(EXIT_AUDIT_ERROR)
        }
    }
}

async fn status(config: Config, json: bool) -> ExitCode {
    match outbox_relay::commands::status::status(&config).await {
        Ok(report) if json => match serde_json::to_string_pretty(&report) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("outbox-relay: cannot render the status: {e}");
                ExitCode::from(EXIT_FAILED)
            }
        },
        Ok(report) => {
            print!("{}", report.render_text());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outbox-relay: status: {e}");
            ExitCode::from(if e.is_transient() { EXIT_FAILED } else { EXIT_CONFIG })
        }
    }
}

async fn check(config: Config, json: bool) -> ExitCode {
    let report = match outbox_relay::commands::check::check(&config).await {
        Ok(report) => report,
        Err(e) => {
            eprintln!("outbox-relay: check: {e}");
            return ExitCode::from(if e.is_transient() { EXIT_FAILED } else { EXIT_CONFIG });
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("outbox-relay: cannot render the check: {e}");
                return ExitCode::from(EXIT_FAILED);
            }
        }
    } else {
        print!("{}", report.render_text());
    }
    if report.is_complete() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_FAILED) }
}

async fn retry(config: Config, args: RetryArgs) -> ExitCode {
    let mapping = match outbox_relay::postgres::layout::Mapping::from_config(&config) {
        Ok(mapping) => mapping,
        Err(e) => {
            eprintln!("outbox-relay: retry: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let outbox = match outbox_relay::postgres::outbox::Outbox::connect(&config, &mapping).await {
        Ok(outbox) => outbox,
        Err(e) => {
            eprintln!("outbox-relay: retry: {e}");
            return ExitCode::from(if e.is_transient() { EXIT_FAILED } else { EXIT_CONFIG });
        }
    };
    if outbox.layout().retry_sql().is_none() {
        eprintln!("outbox-relay: retry: outbox.columns.failed_at is not set, so no row is ever marked failed");
        return ExitCode::from(EXIT_CONFIG);
    }
    let ids = (!args.id.is_empty()).then_some(args.id.as_slice());
    let key = if args.all { None } else { args.key.as_deref() };
    // What the ids asked for were before the retry, to say what became of each.
    let before = if args.id.is_empty() {
        Vec::new()
    } else {
        match outbox.row_states(&args.id).await {
            Ok(states) => states,
            Err(e) if e.is_invalid_value() => Vec::new(), // reported by the retry below
            Err(e) => {
                eprintln!("outbox-relay: retry: {e}");
                return ExitCode::from(EXIT_FAILED);
            }
        }
    };
    let requeued = match outbox.retry(ids, key).await {
        Ok(requeued) => requeued,
        Err(e) if e.is_invalid_value() => {
            eprintln!(
                "outbox-relay: retry: --id {}: not ids of table {} (its id column is {}); see `outbox-relay status` for failed rows",
                args.id.join(","),
                mapping.table_name(),
                outbox.layout().id_type
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("outbox-relay: retry: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    // Rows given up on and rows still being retried (waiting out a backoff) are both
    // re-queued; "failed rows" would misname the second kind.
    let rows = if requeued.len() == 1 { "row" } else { "rows" };
    println!("re-queued {} {rows} with failed attempts", requeued.len());
    let attempts = |n: i64| if n == 1 { "1 failed attempt".to_owned() } else { format!("{n} failed attempts") };
    for id in args.id.iter().filter(|id| requeued.contains(id)) {
        match before.iter().find(|s| &s.id == id) {
            Some(s) if s.failed => println!("row {id}: given up on after {}; re-queued", attempts(s.attempts)),
            Some(s) => println!("row {id}: failing ({}, waiting out a backoff); re-queued", attempts(s.attempts)),
            None => println!("row {id}: re-queued"),
        }
    }
    // Say what became of each id asked for that was not re-queued, as it is now.
    let not_requeued: Vec<String> = args.id.iter().filter(|id| !requeued.contains(id)).cloned().collect();
    if not_requeued.is_empty() {
        return ExitCode::SUCCESS;
    }
    let states = match outbox.row_states(&not_requeued).await {
        Ok(states) => states,
        Err(e) => {
            eprintln!("outbox-relay: retry: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let mut exit = ExitCode::SUCCESS;
    for id in &not_requeued {
        match states.iter().find(|s| &s.id == id) {
            // The goal of a retry is the row published: already met, whoever met it (the
            // relay's own retry often comes first).
            Some(s) if s.published => println!("row {id}: already published; nothing to do"),
            Some(_) => {
                eprintln!("outbox-relay: retry: row {id}: pending, never failed: nothing to re-queue");
                exit = ExitCode::from(EXIT_FAILED);
            }
            None => {
                eprintln!("outbox-relay: retry: row {id}: no such row");
                exit = ExitCode::from(EXIT_FAILED);
            }
        }
    }
    exit
}
