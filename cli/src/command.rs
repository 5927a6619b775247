//! Command-line interface: argument types, errors and the subcommands.

mod demo;
mod status;
mod worker;

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use pgiplock::Protocol;

/// Exit code for bad input (clap uses the same for unparsable arguments).
const EXIT_USAGE: u8 = 2;
/// Exit code for everything else that went wrong.
const EXIT_FAILURE: u8 = 1;

/// One active LISTEN-er per PostgreSQL channel across a fleet.
#[derive(Debug, Parser)]
#[command(name = "pgiplock", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Hold (or stand by for) the lock of one channel and print its events as JSON lines.
    ///
    /// One JSON object per line on stdout, flushed at once; `t_us` is microseconds since the Unix
    /// epoch. `ready` (with `app`, the application_name, and `pid`, the OS pid) once connected and
    /// competing; then `acquired` (with `token`, null under classic), `lost` (with `reason`),
    /// `released`, and `message` (with `payload`; `"replay":true` when it was replayed at a
    /// takeover and may be a duplicate) for each notification delivered while holding, and `gap`
    /// (with `missing`) when a takeover's replay was incomplete.
    /// Logs go to stderr (RUST_LOG). On SIGTERM or SIGINT the worker releases the lock, prints
    /// `released` if it held it, and exits 0. Bad input exits 2.
    Worker(worker::WorkerArgs),
    /// Show the lock tables: channel, holder, whether the holder's backend is alive, lease.
    Status(status::StatusArgs),
    /// Run three workers, stop the holder gracefully, crash the next one, and report
    /// handover and failover times and lost or duplicated messages.
    ///
    /// Uses --database-url or $DATABASE_URL, else starts a throwaway PostgreSQL cluster (needs
    /// the server binaries, e.g. `apt-get install postgresql`). Publishes a numbered message
    /// every 20 ms, sends SIGTERM to the holder, then SIGKILL to the next holder, and prints a
    /// timeline and a summary to stdout (progress to stderr). Removes everything it started.
    Demo(demo::DemoArgs),
}

/// The lock protocol, as a command-line value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProtocolArg {
    /// Leases on the database clock with fencing tokens (the default).
    Lease,
    /// The `@imqueue/pg-pubsub` protocol, for fleets shared with Node processes.
    Classic,
}

impl ProtocolArg {
    pub(crate) fn protocol(self) -> Protocol {
        match self {
            ProtocolArg::Lease => Protocol::Lease,
            ProtocolArg::Classic => Protocol::Classic,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        self.protocol().as_str()
    }
}

/// Connection options shared by the subcommands that need a database.
#[derive(Debug, Clone, Args)]
pub(crate) struct DatabaseArgs {
    /// PostgreSQL connection URL, e.g. postgres://user@host:5432/db
    #[arg(long, value_name = "URL")]
    database_url: String,
}

impl DatabaseArgs {
    pub(crate) fn config(&self) -> Result<tokio_postgres::Config, CliError> {
        parse_database_url(&self.database_url)
    }
}

/// Parses a connection URL or key=value string; failures are bad input.
pub(crate) fn parse_database_url(url: &str) -> Result<tokio_postgres::Config, CliError> {
    url.parse()
        .map_err(|e| CliError::Usage(format!("invalid --database-url: {e}")))
}

/// Why a command failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad input: exit code 2.
    #[error("{0}")]
    Usage(String),
    /// An error from the lock library.
    #[error(transparent)]
    Lock(#[from] pgiplock::Error),
    /// A database error outside the lock library (status queries, the demo's publisher).
    #[error("{context}: {source}")]
    Database {
        /// What we were doing.
        context: String,
        /// The error, shown as the server's message and SQLSTATE (or the driver's cause).
        #[source]
        source: pgiplock::PgError,
    },
    /// The throwaway cluster could not be started.
    #[error(transparent)]
    Cluster(#[from] pgiplock_testkit::cluster::ClusterError),
    /// Writing output or spawning a process failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else: a bounded wait ran out, a demo worker misbehaved, ...
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Lock(pgiplock::Error::InvalidName(_) | pgiplock::Error::InvalidOptions(_)) => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }

    pub(crate) fn database(context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        CliError::Database {
            context: context.into(),
            source: source.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CliError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Runs the chosen subcommand.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Worker(args) => worker::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Demo(args) => demo::run(args).await,
    }
}

/// Logs go to stderr (stdout carries the worker's JSON); `RUST_LOG` overrides the default.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("pgiplock=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: redirected logs stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Parses a duration the way the simulator does, with `humantime`: `500ms`, `5s`, `1.5s`, `2m`,
/// `1h 30m`; a unit is required.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration {text:?}: {e}; write e.g. 500ms, 5s, 1m"))
}

/// Microseconds since the Unix epoch: the `t_us` of the worker's JSON, comparable across the
/// processes of one host.
#[allow(clippy::disallowed_methods)] // The one place that legitimately reads the wall clock.
pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
