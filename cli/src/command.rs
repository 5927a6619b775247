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

/// How every duration option reads its value; shown under every `--help`.
pub(crate) const DURATIONS_HELP: &str =
    "Durations are a number with a unit: 250ms, 5s, 1.5s, 1m30s, 2h, 0s (units ns, us, ms, \
s, m, h, d, w). A bare number such as 5 is refused: the Node original's acquireInterval is in \
milliseconds, so its unit would be a guess. The same rule holds in pgiplock-sim.";

/// One active LISTEN-er per PostgreSQL channel across a fleet.
#[derive(Debug, Parser)]
#[command(
    name = "pgiplock",
    version,
    about,
    propagate_version = true,
    after_help = DURATIONS_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Hold (or stand by for) the lock of one channel and print its events as JSON lines.
    #[command(after_help = DURATIONS_HELP)]
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
    /// PostgreSQL connection URL, e.g. postgres://user@host:5432/db (required).
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

/// Parses a duration option by the project's one rule ([`pgiplock_core::parse_duration`]):
/// a unit is required (`250ms`, `5s`, `1m30s`), a bare number is refused.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, pgiplock_core::DurationError> {
    pgiplock_core::parse_duration(text)
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

    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every option of `cmd` and of its subcommands, each with the (sub)command it belongs to.
    fn options(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Command, clap::Arg)>) {
        for arg in cmd.get_arguments() {
            out.push((path.clone(), cmd.clone(), arg.clone()));
        }
        for sub in cmd.get_subcommands() {
            options(sub, format!("{path} {}", sub.get_name()), out);
        }
    }

    /// Whether `--long=value` alone is accepted by `cmd` (with every other option optional).
    fn accepts(cmd: &clap::Command, long: &str, value: &str) -> bool {
        let probe = cmd.clone().mut_args(|a| a.required(false));
        probe
            .try_get_matches_from([cmd.get_name().to_owned(), format!("--{long}={value}")])
            .is_ok()
    }

    /// An option reads a duration if it takes `250ms` and refuses `250`, as only the shared
    /// parser does (a count refuses the first, a name takes both).
    fn reads_a_duration(cmd: &clap::Command, long: &str) -> bool {
        accepts(cmd, long, "250ms") && !accepts(cmd, long, "250")
    }

    #[test]
    fn every_option_has_help_with_its_unit_and_default() {
        let mut all = Vec::new();
        options(&Cli::command(), "pgiplock".to_owned(), &mut all);
        let mut durations = 0;
        for (path, cmd, arg) in &all {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(!help.trim().is_empty(), "{path} --{id} has no help");
            let Some(long) = arg.get_long() else { continue };
            if !arg.get_action().takes_values() {
                continue;
            }
            let defaults: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            assert!(
                arg.is_required_set() || !defaults.is_empty() || help.contains("[default: "),
                "{path} --{long} shows no default: {help:?}"
            );
            let named_duration = arg.get_value_names().is_some_and(|v| v == ["DURATION"]);
            assert_eq!(
                reads_a_duration(cmd, long),
                named_duration,
                "{path} --{long}: a duration flag is named DURATION, and only a duration flag"
            );
            if named_duration {
                durations += 1;
                let shown = format!("{help} {}", defaults.join(" "));
                let unit = shown
                    .split(|c: char| c.is_whitespace() || ",;:()[]".contains(c))
                    .any(|word| parse_duration(word).is_ok());
                assert!(unit, "{path} --{long}: no duration with a unit in {shown:?}");
            }
        }
        assert!(durations > 0, "the worker's duration options are found");
    }

    /// The table every CLI of the project is held to, through this binary's parser.
    const CASES: &[(&str, Result<u64, &str>)] = include!("../../core/src/duration_cases.rs");

    #[test]
    fn durations_parse_by_the_shared_table() {
        for &(input, expected) in CASES {
            let flag = format!("--acquire-interval={input}");
            let parsed = Cli::try_parse_from([
                "pgiplock",
                "worker",
                "--database-url",
                "postgres://localhost/db",
                "--channel",
                "jobs",
                &flag,
            ]);
            match (parsed, expected) {
                (Ok(cli), Ok(micros)) => {
                    let Command::Worker(args) = cli.command else {
                        panic!("{input:?}: not the worker")
                    };
                    assert_eq!(
                        args.acquire_interval(),
                        Some(Duration::from_micros(micros)),
                        "{input:?}"
                    );
                }
                (Err(e), Err(message)) => {
                    assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{input:?}");
                    let text = e.to_string();
                    let first = text.lines().next().unwrap_or_default();
                    assert_eq!(
                        first,
                        format!("error: invalid value '{input}' for '--acquire-interval <DURATION>': {message}"),
                        "{input:?}"
                    );
                }
                (Ok(_), Err(message)) => panic!("{input:?} accepted; expected {message:?}"),
                (Err(e), Ok(_)) => panic!("{input:?} refused: {e}"),
            }
        }
    }

    #[test]
    fn the_help_states_the_duration_rule() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("A bare number such as 5 is refused"), "{help}");
        let mut cli = Cli::command();
        let worker = cli.find_subcommand_mut("worker").expect("worker");
        let help = worker.render_long_help().to_string();
        assert!(help.contains("A bare number such as 5 is refused"), "{help}");
    }
}
