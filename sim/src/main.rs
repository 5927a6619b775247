//! `pgiplock-sim`: run, sweep and tune simulated fleets of pgiplock processes.
//!
//! Without arguments it runs the default sweep and prints the trade-off table. The first line of
//! every run names the seed and the scenario; the same seed and scenario give byte-identical
//! output. Environment: `SIM_SEED` (default seed), `SIM_RUNS` (swarm runs),
//! `SIM_CHECK_DETERMINISM=1` (run everything twice and compare).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use pgiplock_core::Protocol;
use pgiplock_core::{parse_duration, DurationError};
use pgiplock_sim::explore::{self, ExploreError, SweepPoint, TuneTarget};
use pgiplock_sim::scenario::{
    format_duration, parse_action, parse_fault, ActionSpec, FaultKind, FaultSpec, FaultTarget,
};
use pgiplock_sim::{ReplicationMode, Report, Scenario, SimError};

/// How every duration flag reads its value; shown under every `--help`.
const DURATIONS_HELP: &str = "Durations are a number with a unit: 250ms, 5s, 1.5s, 1m30s, 2h, 0s (units ns, us, ms, \
s, m, h, d, w). A bare number such as 5 is refused: the Node original's acquireInterval is in \
milliseconds, so its unit would be a guess. The same rule holds in the pgiplock command.";

#[derive(Parser, Debug)]
#[command(
    name = "pgiplock-sim",
    version,
    about = "Deterministic fleet simulator for pgiplock",
    long_about = "Deterministic fleet simulator for pgiplock. Without a subcommand it runs the \
default sweep and prints the trade-off table. The first line of every run names the seed and the \
scenario; the same seed and scenario give byte-identical output. Environment: SIM_SEED (the \
default seed), SIM_RUNS (swarm runs), SIM_CHECK_DETERMINISM=1 (run everything twice and compare).",
    after_help = DURATIONS_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
#[command(after_help = DURATIONS_HELP)]
enum Command {
    /// Run one scenario (from flags and/or a TOML file) and print its metrics.
    #[command(after_help = DURATIONS_HELP)]
    Run {
        #[command(flatten)]
        scenario: ScenarioArgs,
        /// Also print the report as JSON, one line [default: off].
        #[arg(long)]
        json: bool,
        /// Print every event, one line each (long!) [default: off].
        #[arg(long)]
        trace: bool,
        /// Run the scenario twice, with async and with sync replication (the other replication
        /// settings as given; without --failover-at one failover at half the duration), and
        /// print the two runs' figures side by side, in seconds and counts [default: off].
        #[arg(long)]
        compare_replication: bool,
    },
    /// Vary timings, print the trade-off table, write CSV and an SVG chart.
    ///
    /// With none of --intervals, --ttls, --process-counts and --channel-counts it runs the default sweep's
    /// settings on the scenario (classic at 1s, 5s, 30s, 120s; lease at 5s/10s, 30s/3s,
    /// 30s/10s, 30s/30s interval/ttl); with any of them, every combination of the values given
    /// (the scenario's own for the others). Every setting runs with the same seed.
    #[command(after_help = DURATIONS_HELP)]
    Sweep {
        #[command(flatten)]
        scenario: ScenarioArgs,
        /// Protocols to sweep, comma-separated.
        #[arg(
            long,
            value_name = "PROTOCOLS",
            value_delimiter = ',',
            default_value = "classic,lease"
        )]
        protocols: Vec<String>,
        /// Acquire intervals to sweep, comma-separated durations (e.g. 1s,5s,30s) [default: the
        /// scenario's, or the default sweep's settings].
        #[arg(long, value_name = "DURATION", value_delimiter = ',', value_parser = dur)]
        intervals: Vec<Duration>,
        /// Lease ttls to sweep, comma-separated durations, lease points only (e.g. 3s,10s)
        /// [default: the scenario's, or the default sweep's settings].
        #[arg(long, value_name = "DURATION", value_delimiter = ',', value_parser = dur)]
        ttls: Vec<Duration>,
        /// Fleet sizes to sweep, comma-separated counts [default: the scenario's, or the
        /// default sweep's settings].
        #[arg(long = "process-counts", value_name = "N", value_delimiter = ',')]
        process_counts: Vec<usize>,
        /// Channel counts to sweep (locks per process), comma-separated counts: load against
        /// channels and processes [default: the scenario's, or the default sweep's settings].
        #[arg(long = "channel-counts", value_name = "N", value_delimiter = ',')]
        channel_counts: Vec<usize>,
        /// CSV output file, one row per setting.
        #[arg(long, value_name = "FILE", default_value = "sweep.csv")]
        csv: PathBuf,
        /// SVG chart output file: loss window against load.
        #[arg(long, value_name = "FILE", default_value = "sweep.svg")]
        svg: PathBuf,
    },
    /// Recommend timings for a fleet and a target, and say why.
    ///
    /// Runs every candidate setting (classic at acquire intervals of 1s to 2m; lease at ttls of
    /// 2s to 1m with a 30s interval) on the scenario with the same seed, prints their table,
    /// the recommendation and a paragraph explaining it: which fault kind dominates the loss,
    /// what the load is, and what the next cheaper candidate would cost.
    #[command(after_help = DURATIONS_HELP)]
    Tune {
        #[command(flatten)]
        scenario: ScenarioArgs,
        /// Target: at most this loss window per day (a duration); least load wins [default: 5m
        /// unless --max-load is given].
        #[arg(long, value_name = "DURATION", value_parser = dur, conflicts_with = "max_load")]
        max_loss_per_day: Option<Duration>,
        /// Target: at most this many lock statements per second at the server, in total; least
        /// loss window wins [default: none, the loss target applies].
        #[arg(long, value_name = "PER_SECOND")]
        max_load: Option<f64>,
        /// Consider only this protocol's candidates: lease or classic [default: both].
        #[arg(long = "only", value_name = "PROTOCOL")]
        only: Option<String>,
    },
    /// Seed-chosen scenarios with every checker (swarm testing).
    #[command(after_help = DURATIONS_HELP)]
    Swarm {
        /// First seed; run i uses seed + i (an integer) [default: SIM_SEED, else 1].
        #[arg(long, value_name = "SEED")]
        seed: Option<u64>,
        /// Number of seeds (a count) [default: SIM_RUNS, else 20].
        #[arg(long, value_name = "N")]
        runs: Option<u64>,
        /// Print every event of every run (long!) [default: off].
        #[arg(long)]
        trace: bool,
    },
    /// Measure the simulator: events per second, and a large fleet over a long virtual time.
    #[command(after_help = DURATIONS_HELP)]
    Bench {
        /// Fleet size of the large run (a count).
        #[arg(long, value_name = "N", default_value_t = 1000)]
        processes: usize,
        /// Virtual time of the large run (a duration).
        #[arg(long, value_name = "DURATION", value_parser = dur, default_value = "24h")]
        duration: Duration,
        /// Acquire interval of the large run (a duration).
        #[arg(long, value_name = "DURATION", value_parser = dur, default_value = "1s")]
        acquire_interval: Duration,
        /// Protocol of the large run: lease or classic.
        #[arg(long, value_name = "PROTOCOL", default_value = "classic")]
        protocol: String,
    },
}

/// The subcommands that take the scenario flags.
const SCENARIO_SUBCOMMANDS: [&str; 3] = ["run", "sweep", "tune"];

/// The default of each scenario flag, by argument id, as `Scenario::default()` has it (what
/// the flag falls back to without a `--config` file).
fn scenario_defaults() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(Scenario::default()) else {
        return out;
    };
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => Some("none".to_owned()),
        serde_json::Value::Bool(_) | serde_json::Value::Number(_) => Some(v.to_string()),
        _ => None,
    };
    // Replication is left out of a lone server's scenario: its flags' defaults are stated here.
    let r = pgiplock_sim::Replication::default();
    out.insert("replication".to_owned(), r.mode.to_string());
    out.insert("replication_lag".to_owned(), format_duration(r.lag));
    out.insert("sync_commit_wait".to_owned(), format_duration(r.sync_commit_wait));
    out.insert("promote_after".to_owned(), format_duration(r.promote_after));
    out.insert("failover_at".to_owned(), "none".to_owned());
    out.insert("clock_skew".to_owned(), format_duration(r.clock_skew));
    out.insert("old_primary_up".to_owned(), "none".to_owned());
    // Left out of the scenario's JSON when unset.
    out.insert("max_connections".to_owned(), "none".to_owned());
    for (key, value) in &fields {
        match value {
            serde_json::Value::Object(rates) if key == "fault_rates" => {
                for (kind, rate) in rates {
                    if let Some(t) = text(rate) {
                        out.insert(format!("{kind}_rate"), t);
                    }
                }
            }
            _ => {
                if let Some(t) = text(value) {
                    out.insert(key.clone(), t);
                }
            }
        }
    }
    out
}

/// The command line with the scenario flags' defaults appended to their help.
fn with_defaults(cli: clap::Command) -> clap::Command {
    let defaults = scenario_defaults();
    cli.mut_subcommands(|sub| {
        if !SCENARIO_SUBCOMMANDS.contains(&sub.get_name()) {
            return sub;
        }
        let tune = sub.get_name() == "tune";
        let ids: Vec<String> = sub
            .get_arguments()
            .map(|a| a.get_id().as_str().to_owned())
            .filter(|id| defaults.contains_key(id))
            .collect();
        ids.into_iter().fold(sub, |sub, id| {
            let default = match (tune, id.as_str()) {
                (true, "duration") => format!(
                    "{} per candidate (run and sweep: {})",
                    format_duration(TUNE_DURATION),
                    defaults[&id]
                ),
                _ => defaults[&id].clone(),
            };
            sub.mut_arg(&id, |arg| {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                arg.help(format!("{help} [default: {default}]"))
            })
        })
    })
}

/// Tune's own default for `--duration` (without `--duration` and `--config`).
const TUNE_DURATION: Duration = Duration::from_secs(24 * 3600);

/// `println!` that ends the process quietly when stdout is closed (piped into `head`, say)
/// instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }};
}

/// Every duration flag, by the project's one rule ([`pgiplock_core::parse_duration`]).
fn dur(s: &str) -> Result<Duration, DurationError> {
    parse_duration(s)
}

/// A duration flag that also accepts `none` (use the scenario's derived default).
///
/// A newtype, because clap reads `Option<Option<T>>` as "a flag with an optional value" and
/// would then expect the parser to produce `T`.
#[derive(Clone, Copy, Debug)]
struct MaybeDuration(Option<Duration>);

fn opt_dur(s: &str) -> Result<MaybeDuration, DurationError> {
    if s == "none" {
        Ok(MaybeDuration(None))
    } else {
        dur(s).map(|d| MaybeDuration(Some(d)))
    }
}

/// A count flag that also accepts `none` (use the core's default).
#[derive(Debug, Clone, Copy)]
struct MaybeCount(Option<usize>);

fn opt_count(s: &str) -> Result<MaybeCount, String> {
    if s == "none" {
        return Ok(MaybeCount(None));
    }
    s.parse().map(|n| MaybeCount(Some(n))).map_err(|e| format!("{e}"))
}

fn fault(s: &str) -> Result<FaultSpec, String> {
    parse_fault(s).map_err(|e| e.to_string())
}

fn action(s: &str) -> Result<ActionSpec, String> {
    parse_action(s).map_err(|e| e.to_string())
}

/// Scenario flags; each overrides the TOML file (or the default). The `[default: ...]` of each
/// is appended from `Scenario::default()` when the command is built (see `with_defaults`).
#[derive(Args, Debug, Default)]
struct ScenarioArgs {
    /// A TOML scenario file: the fields of the scenario, durations written like "5s"; the flags
    /// below override its fields [default: none, the built-in scenario].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The seed that drives every random choice of the run (an integer) [default: SIM_SEED,
    /// else 1].
    #[arg(long, value_name = "SEED")]
    seed: Option<u64>,
    /// Lock protocol of every process: lease or classic.
    #[arg(long, value_name = "PROTOCOL")]
    protocol: Option<String>,
    /// Processes competing for the lock (a count).
    #[arg(long, value_name = "N")]
    processes: Option<usize>,
    /// Channels (locks) per process; the publisher and the metrics use the first (a count).
    #[arg(long, value_name = "N")]
    channels: Option<usize>,
    /// Fair share, lease only: every process's locks compete in one balance group, so that the
    /// fleet converges to about channels / processes each (true or false).
    #[arg(long, value_name = "BOOL")]
    balance: Option<bool>,
    /// The crash watch, lease only: a process whose standbys another process's holder refused
    /// waits on that holder's session on a second connection, so a crashed holder is replaced
    /// once the server ends its session, not at a standby's next retry (true or false; default:
    /// the library's, true).
    #[arg(long, value_name = "BOOL")]
    crash_watch: Option<bool>,
    /// Lease only: a stopping holder's release is its drain point, proven by a `drained`
    /// marker its successor waits for; false commits a drain marker before the release, one
    /// statement more per handover (true or false; default: the library's, true).
    #[arg(long, value_name = "BOOL")]
    drain_in_release: Option<bool>,
    /// Virtual time simulated (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    duration: Option<Duration>,
    /// Metrics count from this virtual time on, so the first acquisition is no failover (a
    /// duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    warmup: Option<Duration>,
    /// Longest wait of a standby between two attempts to acquire (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    acquire_interval: Option<Duration>,
    /// Fraction of the acquire interval drawn as jitter below it, 0 to 0.9 (a fraction).
    #[arg(long, value_name = "FRACTION")]
    retry_jitter: Option<f64>,
    /// Lease length on the database clock, lease protocol only (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    lease_ttl: Option<Duration>,
    /// How often the holder renews its lease (lease) or checks its row (classic) (a duration,
    /// or none: the lease ttl / 5 under lease, 30s under classic).
    #[arg(long, value_name = "DURATION", value_parser = opt_dur)]
    renew_interval: Option<MaybeDuration>,
    /// Self-fencing margin: the holder steps down this long before its lease could expire (a
    /// duration such as 500ms, or none: the lease ttl / 10).
    #[arg(long, value_name = "DURATION", value_parser = opt_dur)]
    fence_margin: Option<MaybeDuration>,
    /// A database request unanswered this long resets the session (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    request_timeout: Option<Duration>,
    /// Notifications published on the data channel, per second; 0 publishes none.
    #[arg(long, value_name = "PER_SECOND")]
    publish_rate: Option<f64>,
    /// Most messages a lease standby keeps for replay; 0 turns replay off (a count, or none:
    /// the core's 65536).
    #[arg(long, value_name = "N", value_parser = opt_count)]
    replay_limit: Option<MaybeCount>,
    /// One-way network delay between every process and the server (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    net_delay: Option<Duration>,
    /// Shortest statement execution time at the server (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    query_min: Option<Duration>,
    /// Mean statement execution time, a shifted exponential cut at --query-max (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    query_mean: Option<Duration>,
    /// Longest statement execution time (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    query_max: Option<Duration>,
    /// Time the server takes to drop an idle client that vanished: TCP keepalive, 7200s + 9 x
    /// 75s on Linux (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    server_keepalive_detect: Option<Duration>,
    /// Time the server takes to drop a client that vanished while it was sending to it:
    /// tcp_retries2 = 15, about 15m on Linux (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    server_retransmit_detect: Option<Duration>,
    /// Client tcp_user_timeout: a request unacknowledged this long fails the connection (a
    /// duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    client_user_timeout: Option<Duration>,
    /// Bounds one whole connection attempt: the session's connect timeout (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    connect_timeout: Option<Duration>,
    /// Bounds each setup statement of a connection: the session's setup timeout (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    setup_timeout: Option<Duration>,
    /// After a crash, time until the server sees the connection end (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    crash_close_delay: Option<Duration>,
    /// Client CPU time per notification heard, from its arrival to the statement it causes
    /// leaving, on one of --host-cores (a duration, 0s: instant).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    client_notify_cost: Option<Duration>,
    /// Client CPU time per reply, from its arrival to the next statement leaving, on one of
    /// --host-cores (a duration, 0s: instant).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    client_reply_cost: Option<Duration>,
    /// Time from SIGTERM to a process's first statement of its release, the process's own (a
    /// duration, 0s: instant).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    client_signal_cost: Option<Duration>,
    /// Server backend CPU time per statement, on one of --host-cores when the server shares the
    /// fleet's host, before the statement's latency (a duration, 0s: none).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    server_statement_cost: Option<Duration>,
    /// Cores the processes share for the client costs: k woken at once take ceil(k / cores)
    /// rounds (a count, 0: a core per process).
    #[arg(long, value_name = "N")]
    host_cores: Option<usize>,
    /// Clock rate drift bound: each process's clock runs at a rate drawn in 1 +/- drift (a
    /// fraction).
    #[arg(long, value_name = "FRACTION")]
    drift: Option<f64>,
    /// Whether lock sessions may pg_terminate_backend each other (true or false).
    #[arg(long, value_name = "BOOL")]
    terminate_permitted: Option<bool>,
    /// The server's connection limit for the fleet's sessions: a connection beyond it is
    /// refused as too many clients, SQLSTATE 53300 (a count; none: no limit).
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Graceful stops (SIGTERM, then a restart) per hour.
    #[arg(long, value_name = "PER_HOUR")]
    stop_rate: Option<f64>,
    /// Crashes (then a restart) per hour.
    #[arg(long, value_name = "PER_HOUR")]
    crash_rate: Option<f64>,
    /// Silent disconnects (the network drops everything for --cut-duration) per hour.
    #[arg(long, value_name = "PER_HOUR")]
    cut_rate: Option<f64>,
    /// Server-side terminations (pg_terminate_backend) per hour.
    #[arg(long, value_name = "PER_HOUR")]
    terminate_rate: Option<f64>,
    /// Server restarts (down for --server-down) per hour.
    #[arg(long, value_name = "PER_HOUR")]
    server_restart_rate: Option<f64>,
    /// Connection handshakes that hang (the server never answers) per hour.
    #[arg(long, value_name = "PER_HOUR")]
    connect_hang_rate: Option<f64>,
    /// Blips of the link during a reconnect (for --blip-duration) per hour.
    #[arg(long, value_name = "PER_HOUR")]
    connect_blip_rate: Option<f64>,
    /// Lost replies to a setup statement (bootstrap or LISTEN) per hour.
    #[arg(long, value_name = "PER_HOUR")]
    setup_reply_loss_rate: Option<f64>,
    /// Lock schema drops under the running fleet per hour.
    #[arg(long, value_name = "PER_HOUR")]
    schema_drop_rate: Option<f64>,
    /// Read-only server windows (for --read-only-duration) per hour.
    #[arg(long, value_name = "PER_HOUR")]
    read_only_rate: Option<f64>,
    /// Bursts of forged lock-channel markers from a foreign session per hour.
    #[arg(long, value_name = "PER_HOUR")]
    forge_rate: Option<f64>,
    /// Whom the faults drawn from the rates hit: holder or any.
    #[arg(long, value_name = "TARGET")]
    fault_target: Option<String>,
    /// A scheduled fault, kind@time@target: a kind of the rates above, a duration from the
    /// start, holder or a process index (e.g. crash@90s@holder); repeatable [default: none].
    #[arg(long = "fault", value_name = "KIND@TIME@TARGET", value_parser = fault)]
    faults: Vec<FaultSpec>,
    /// A scheduled action, action@time@target: release, acquire, cut, heal, start, stand_down or
    /// compete, a
    /// duration from the start, holder or a process index (e.g. release@10m@holder);
    /// repeatable [default: none].
    #[arg(long = "action", value_name = "ACTION@TIME@TARGET", value_parser = action)]
    actions: Vec<ActionSpec>,
    /// A stopped or crashed process starts again after this long (a duration, or none: never).
    #[arg(long, value_name = "DURATION", value_parser = opt_dur)]
    restart_delay: Option<MaybeDuration>,
    /// How long a silent disconnect lasts (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    cut_duration: Option<Duration>,
    /// How long a restarting server refuses connections (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    server_down: Option<Duration>,
    /// How long the link of a connect blip drops everything (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    blip_duration: Option<Duration>,
    /// How long a read-only window lasts (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    read_only_duration: Option<Duration>,
    /// Extra time the liveness checker allows over the design's bound (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    liveness_slack: Option<Duration>,
    /// Most events one run may process; more fails the run (a count).
    #[arg(long, value_name = "N")]
    max_steps: Option<u64>,
    /// Fail S2 also when the extra believer's session had already ended unknown to it (true or
    /// false).
    #[arg(long, value_name = "BOOL")]
    strict_s2: Option<bool>,
    /// Fail D1 also for an unflagged re-delivery across a schema drop (true or false).
    #[arg(long, value_name = "BOOL")]
    strict_d1: Option<bool>,
    /// Also run the property-testing API's checks (see `pgiplock_sim::check`; true or false).
    #[arg(long, value_name = "BOOL")]
    property_checks: Option<bool>,
    #[arg(long, hide = true)]
    mutant: Option<pgiplock_sim::Mutant>,
    /// Replication of the server: none (a lone server), async (the replica applies each commit
    /// --replication-lag after it; a failover loses the rest) or sync (every commit waits for
    /// the replica).
    #[arg(long, value_name = "MODE")]
    replication: Option<ReplicationMode>,
    /// Async replication: how long after a commit the replica has applied it (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    replication_lag: Option<Duration>,
    /// Sync replication: what each statement waits more for the replica (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    sync_commit_wait: Option<Duration>,
    /// Replication: from a failover's crash to the replica's promotion; meanwhile the server
    /// refuses connections for --server-down, then answers read-only (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    promote_after: Option<Duration>,
    /// Replication: when the primary crashes and its replica takes over, durations from the
    /// start, comma-separated, e.g. 10m,2h (needs --replication async or sync).
    #[arg(long = "failover-at", value_name = "DURATION", value_delimiter = ',', value_parser = dur)]
    failover_at: Vec<Duration>,
    /// Replication: how far the old primary's clock ran ahead of the replica's, so that the
    /// replicated leases end that much later on the promoted server (a duration).
    #[arg(long, value_name = "DURATION", value_parser = dur)]
    clock_skew: Option<Duration>,
    /// Replication: a partition instead of a crash: the old primary stays up this long after
    /// each failover with its holder still connected (a duration such as 60s, or none: it
    /// crashes).
    #[arg(long, value_name = "DURATION", value_parser = opt_dur)]
    old_primary_up: Option<MaybeDuration>,
}

/// A CLI failure with its message.
#[derive(Debug)]
struct CliError(String);

impl<E: std::fmt::Display> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError(e.to_string())
    }
}

impl ScenarioArgs {
    fn scenario(&self) -> Result<Scenario, CliError> {
        let s = self.unchecked_scenario()?;
        s.validate()?;
        Ok(s)
    }

    /// The scenario the flags describe, not yet validated (`--compare-replication` sets the
    /// replication mode itself).
    fn unchecked_scenario(&self) -> Result<Scenario, CliError> {
        let mut s = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| CliError(format!("cannot read {}: {e}", path.display())))?;
                Scenario::from_toml(&text)?
            }
            None => Scenario::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field.clone() { s.$field = v; } )* };
        }
        set!(
            processes,
            channels,
            balance,
            crash_watch,
            drain_in_release,
            duration,
            warmup,
            acquire_interval,
            retry_jitter,
            lease_ttl,
            request_timeout,
            publish_rate,
            net_delay,
            query_min,
            query_mean,
            query_max,
            server_keepalive_detect,
            server_retransmit_detect,
            client_user_timeout,
            connect_timeout,
            setup_timeout,
            crash_close_delay,
            client_notify_cost,
            client_reply_cost,
            client_signal_cost,
            server_statement_cost,
            host_cores,
            drift,
            terminate_permitted,
            cut_duration,
            server_down,
            blip_duration,
            read_only_duration,
            liveness_slack,
            max_steps,
            strict_s2,
            strict_d1,
            property_checks
        );
        if let Some(max) = self.max_connections {
            s.max_connections = Some(max);
        }
        s.mutant = self.mutant.or(s.mutant);
        if let Some(mode) = self.replication {
            s.replication.mode = mode;
        }
        for (flag, field) in [
            (self.replication_lag, &mut s.replication.lag),
            (self.sync_commit_wait, &mut s.replication.sync_commit_wait),
            (self.promote_after, &mut s.replication.promote_after),
            (self.clock_skew, &mut s.replication.clock_skew),
        ] {
            if let Some(value) = flag {
                *field = value;
            }
        }
        s.replication.failovers.extend(self.failover_at.iter().copied());
        if let Some(MaybeDuration(up)) = self.old_primary_up {
            s.replication.old_primary_up = up;
        }
        for (flag, field) in [
            (self.renew_interval, &mut s.renew_interval),
            (self.fence_margin, &mut s.fence_margin),
            (self.restart_delay, &mut s.restart_delay),
        ] {
            if let Some(MaybeDuration(value)) = flag {
                *field = value;
            }
        }
        if let Some(MaybeCount(limit)) = self.replay_limit {
            s.replay_limit = limit;
        }
        if let Some(p) = &self.protocol {
            s.protocol = p.parse()?;
        }
        let rates = [
            (self.stop_rate, FaultKind::Stop),
            (self.crash_rate, FaultKind::Crash),
            (self.cut_rate, FaultKind::Cut),
            (self.terminate_rate, FaultKind::Terminate),
            (self.server_restart_rate, FaultKind::ServerRestart),
            (self.connect_hang_rate, FaultKind::ConnectHang),
            (self.connect_blip_rate, FaultKind::ConnectBlip),
            (self.setup_reply_loss_rate, FaultKind::SetupReplyLoss),
            (self.schema_drop_rate, FaultKind::SchemaDrop),
            (self.read_only_rate, FaultKind::ReadOnly),
            (self.forge_rate, FaultKind::Forge),
        ];
        for (flag, kind) in rates {
            if let Some(v) = flag {
                *s.fault_rates.of_mut(kind) = v;
            }
        }
        if let Some(t) = &self.fault_target {
            s.fault_target = match t.as_str() {
                "holder" => FaultTarget::Holder,
                "any" => FaultTarget::Any,
                other => return Err(CliError(format!("unknown fault target {other:?} (holder or any)"))),
            };
        }
        s.faults.extend(self.faults.iter().cloned());
        s.actions.extend(self.actions.iter().cloned());
        Ok(s)
    }

    fn seed(&self) -> Result<u64, CliError> {
        match self.seed {
            Some(s) => Ok(s),
            None => env_seed(),
        }
    }
}

fn env_seed() -> Result<u64, CliError> {
    match std::env::var("SIM_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| CliError(format!("SIM_SEED={v:?} is not a u64"))),
        Err(_) => Ok(1),
    }
}

fn twice() -> bool {
    std::env::var("SIM_CHECK_DETERMINISM").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn explain(e: &ExploreError, subcommand: &str) -> String {
    match e {
        ExploreError::Run { seed, scenario, error } => {
            let repro = match (subcommand, error) {
                ("swarm", _) => format!("pgiplock-sim swarm --seed {seed} --runs 1"),
                _ => format!("pgiplock-sim run --seed {seed} {}", scenario.to_cli_args()),
            };
            let kind = match error {
                SimError::Check(_) => "checker failure",
                _ => "error",
            };
            format!("{kind}: seed {seed}: {error}\nreproduce with: {repro}")
        }
        other => other.to_string(),
    }
}

fn main() -> ExitCode {
    let matches = with_defaults(Cli::command()).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError(message)) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        None => default_sweep(),
        Some(Command::Run {
            scenario,
            compare_replication: true,
            ..
        }) => cmd_compare_replication(&scenario),
        Some(Command::Run {
            scenario, json, trace, ..
        }) => cmd_run(&scenario, json, trace),
        Some(Command::Sweep {
            scenario,
            protocols,
            intervals,
            ttls,
            process_counts,
            channel_counts,
            csv,
            svg,
        }) => cmd_sweep(
            &scenario,
            &protocols,
            &intervals,
            &ttls,
            (&process_counts, &channel_counts),
            &csv,
            &svg,
        ),
        Some(Command::Tune {
            scenario,
            max_loss_per_day,
            max_load,
            only,
        }) => cmd_tune(&scenario, max_loss_per_day, max_load, only.as_deref()),
        Some(Command::Swarm { seed, runs, trace }) => cmd_swarm(seed, runs, trace),
        Some(Command::Bench {
            processes,
            duration,
            acquire_interval,
            protocol,
        }) => cmd_bench(processes, duration, acquire_interval, &protocol),
    }
}

fn default_sweep() -> Result<(), CliError> {
    let seed = env_seed()?;
    let base = Scenario::default();
    out!("seed={seed} scenario=default-sweep base: {}", base.summary());
    out!(
        "each point: {} processes for {} with faults on the holder; silent disconnects last {}; server dead-peer detection {} idle / {} while sending",
        base.processes,
        format_duration(base.duration),
        format_duration(base.cut_duration),
        format_duration(base.server_keepalive_detect),
        format_duration(base.server_retransmit_detect)
    );
    let points =
        explore::sweep(&explore::default_sweep(&base), seed, twice()).map_err(|e| CliError(explain(&e, "sweep")))?;
    print!("{}", explore::sweep_table(&points));
    out!("failover columns: p50/max seconds from the fault to a live holder that can receive.");
    out!("messages per fault kind: lost/duplicated/replayed of the terms each kind of fault on the holder ended (none: terms no fault ended); unflagged: duplicates without the replay flag.");
    print!("{}", explore::messages_table(&points));
    summarize_cut(&points, &base);
    // On an idle channel the server sends the vanished holder nothing, so only the keepalive
    // (about 2 h 11 min) ends its session: Classic stays locked long after the network healed.
    let idle: Vec<Scenario> = [(Protocol::Classic, 10), (Protocol::Lease, 10)]
        .into_iter()
        .map(|(protocol, ttl)| Scenario {
            protocol,
            publish_rate: 0.0,
            lease_ttl: Duration::from_secs(ttl),
            ..base.clone()
        })
        .collect();
    let idle = explore::sweep(&idle, seed, twice()).map_err(|e| CliError(explain(&e, "sweep")))?;
    for p in &idle {
        if let Some(s) = p.report.failover.get("cut") {
            out!(
                "idle channel (no notifications), {}: silent-disconnect failover p50 {:.0} s, max {:.0} s ({} cuts; the cut heals after {})",
                p.scenario.protocol,
                s.p50_s,
                s.max_s,
                s.count,
                format_duration(base.cut_duration)
            );
        }
    }
    Ok(())
}

fn summarize_cut(points: &[SweepPoint], base: &Scenario) {
    let worst = |protocol: Protocol| {
        points
            .iter()
            .filter(|p| p.scenario.protocol == protocol)
            .filter_map(|p| p.report.failover.get("cut").map(|s| (s.max_s, p)))
            .fold(None::<(f64, &SweepPoint)>, |acc, x| match acc {
                Some(a) if a.0 >= x.0 => Some(a),
                _ => Some(x),
            })
    };
    if let Some((max, _)) = worst(Protocol::Classic) {
        out!(
            "classic: a silently disconnected holder blocks takeover for up to {:.0} s whatever the interval: the server's dead-peer detection ({} while sending, {} idle) bounds it.",
            max,
            format_duration(base.server_retransmit_detect),
            format_duration(base.server_keepalive_detect)
        );
    }
    if let Some((max, p)) = worst(Protocol::Lease) {
        out!(
            "lease: the same fault costs at most {:.1} s (ttl {} + standby retry): bounded by the lease ttl.",
            max,
            format_duration(p.scenario.lock_config().lease_ttl)
        );
    }
}

fn cmd_run(args: &ScenarioArgs, json: bool, trace: bool) -> Result<(), CliError> {
    let scenario = args.scenario()?;
    let seed = args.seed()?;
    // The whole scenario, as the flags that rebuild it, so the first line identifies the run.
    out!(
        "seed={seed} scenario: {} (as flags: {})",
        scenario.summary(),
        scenario.to_cli_args()
    );
    if trace {
        let (result, lines) = pgiplock_sim::World::new(scenario.clone(), seed)?.run_traced();
        for line in lines {
            out!("{line}");
        }
        // A checker failure is reported below, with the command that reproduces it.
        let _ = result;
    }
    let report = explore::run_checked(&scenario, seed, twice()).map_err(|e| CliError(explain(&e, "run")))?;
    print_report(&report, json);
    Ok(())
}

/// `run --compare-replication`: the scenario with async and with sync replication, one column
/// each.
fn cmd_compare_replication(args: &ScenarioArgs) -> Result<(), CliError> {
    let mut base = args.unchecked_scenario()?;
    let seed = args.seed()?;
    if base.replication.failovers.is_empty() {
        base.replication.failovers.push(base.duration / 2);
    }
    let mut reports = Vec::new();
    for mode in [ReplicationMode::Async, ReplicationMode::Sync] {
        let mut scenario = base.clone();
        scenario.replication.mode = mode;
        scenario.validate()?;
        out!(
            "seed={seed} scenario: {} (as flags: {})",
            scenario.summary(),
            scenario.to_cli_args()
        );
        reports.push(explore::run_checked(&scenario, seed, twice()).map_err(|e| CliError(explain(&e, "run")))?);
    }
    print!("{}", replication_table(&reports[0], &reports[1]));
    Ok(())
}

/// The figures of an async and a sync run, side by side.
fn replication_table(a: &Report, s: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "{:<44} {:>14} {:>14}", "", "async", "sync");
    let mut row = |name: &str, f: &dyn Fn(&Report) -> String| {
        let _ = writeln!(out, "{name:<44} {:>14} {:>14}", f(a), f(s));
    };
    let sum = |r: &Report, f: fn(&pgiplock_sim::FailoverReport) -> u64| r.replication.iter().map(f).sum::<u64>();
    let worst = |r: &Report, f: fn(&pgiplock_sim::FailoverReport) -> Option<f64>| {
        let v: Vec<f64> = r.replication.iter().filter_map(f).collect();
        if v.len() < r.replication.len() {
            "none (some)".to_owned()
        } else {
            format!("{:.3}", v.iter().copied().fold(0.0, f64::max))
        }
    };
    row("failovers", &|r| r.replication.len().to_string());
    row("acquisitions lost with the primary", &|r| {
        sum(r, |f| f.lost_acquisitions).to_string()
    });
    row("tokens after each promotion > before", &|r| {
        let ok = r
            .replication
            .iter()
            .all(|f| f.first_token_after.map_or(true, |t| t > f.max_token_before));
        if ok { "yes" } else { "NO" }.to_owned()
    });
    row("new holder after the promotion, max s", &|r| {
        worst(r, |f| f.new_holder_after_promote_s)
    });
    row("split brain per failover, max s", &|r| {
        format!(
            "{:.3}",
            r.replication.iter().map(|f| f.split_brain_s).fold(0.0, f64::max)
        )
    });
    row("split brain, whole run, s", &|r| format!("{:.3}", r.split_brain_s));
    row("loss window, s", &|r| format!("{:.3}", r.loss_window_s));
    row("statements/s", &|r| format!("{:.3}", r.statements_per_s));
    out
}

fn print_report(report: &Report, json: bool) {
    print!("{}", report.table());
    if json {
        out!("{}", serde_json::to_string(report).unwrap_or_default());
    }
}

fn protocols(names: &[String]) -> Result<Vec<Protocol>, CliError> {
    names
        .iter()
        .map(|n| n.parse::<Protocol>().map_err(CliError::from))
        .collect()
}

fn cmd_sweep(
    args: &ScenarioArgs,
    names: &[String],
    intervals: &[Duration],
    ttls: &[Duration],
    (counts, channel_counts): (&[usize], &[usize]),
    csv: &std::path::Path,
    svg: &std::path::Path,
) -> Result<(), CliError> {
    let base = args.scenario()?;
    let seed = args.seed()?;
    let protocols = protocols(names)?;
    let scenarios = if intervals.is_empty() && ttls.is_empty() && counts.is_empty() && channel_counts.is_empty() {
        explore::default_sweep(&base)
            .into_iter()
            .filter(|s| protocols.contains(&s.protocol))
            .collect()
    } else {
        let intervals = if intervals.is_empty() {
            vec![base.acquire_interval]
        } else {
            intervals.to_vec()
        };
        let counts = if counts.is_empty() {
            vec![base.processes]
        } else {
            counts.to_vec()
        };
        explore::grid(&base, &protocols, &intervals, ttls, &counts, channel_counts)
    };
    out!(
        "seed={seed} scenario=sweep of {} settings, base: {}",
        scenarios.len(),
        base.summary()
    );
    let points = explore::sweep(&scenarios, seed, twice()).map_err(|e| CliError(explain(&e, "sweep")))?;
    print!("{}", explore::sweep_table(&points));
    std::fs::write(csv, explore::sweep_csv(&points))
        .map_err(|e| CliError(format!("cannot write {}: {e}", csv.display())))?;
    explore::sweep_svg(&points, svg)?;
    out!("wrote {} and {}", csv.display(), svg.display());
    Ok(())
}

fn cmd_tune(
    args: &ScenarioArgs,
    max_loss: Option<Duration>,
    max_load: Option<f64>,
    only: Option<&str>,
) -> Result<(), CliError> {
    let mut base = args.scenario()?;
    if args.duration.is_none() && args.config.is_none() {
        // A day per candidate: enough faults at the default rates for stable figures.
        base.duration = TUNE_DURATION;
    }
    let seed = args.seed()?;
    let target = match (max_loss, max_load) {
        (Some(d), _) => TuneTarget::MaxLossPerDay(d),
        (None, Some(l)) => TuneTarget::MaxLoad(l),
        (None, None) => TuneTarget::MaxLossPerDay(Duration::from_secs(300)),
    };
    let only = only.map(str::parse::<Protocol>).transpose()?;
    let candidates = explore::tune_candidates(&base, only);
    let target_text = match target {
        TuneTarget::MaxLossPerDay(d) => format!("loss window <= {} per day, least load", format_duration(d)),
        TuneTarget::MaxLoad(l) => format!("<= {l} statements/s, least loss window"),
    };
    out!(
        "seed={seed} scenario=tune ({target_text}) over {} candidates, base: {}",
        candidates.len(),
        base.summary()
    );
    let result = explore::tune(&candidates, seed, target).map_err(|e| CliError(explain(&e, "tune")))?;
    print!("{}", explore::sweep_table(&result.candidates));
    match result.best {
        Some(i) => {
            let p = &result.candidates[i];
            let c = p.scenario.lock_config();
            let per_day = explore::loss_per_day(&p.report);
            out!(
                "recommended: protocol {} acquire_interval {}{}",
                p.scenario.protocol,
                format_duration(c.acquire_interval),
                match p.scenario.protocol {
                    Protocol::Lease => format!(
                        " lease_ttl {} renew_interval {} fence_margin {}",
                        format_duration(c.lease_ttl),
                        format_duration(c.renew_interval),
                        format_duration(c.fence_margin)
                    ),
                    Protocol::Classic => String::new(),
                }
            );
            out!(
                "predicted: {:.3} statements/s ({:.3} per process), loss window {:.1} s per day, {} lost / {} published, split-brain {:.1} s",
                p.report.statements_per_s,
                p.report.statements_per_s_per_process_mean,
                per_day,
                p.report.lost_messages,
                p.report.published,
                p.report.split_brain_s
            );
            if let Some(why) = explore::explain_tune(&result, target) {
                out!("why: {why}");
            }
        }
        None => out!("no candidate meets the target; relax it or reduce the fault rates"),
    }
    Ok(())
}

fn cmd_swarm(seed: Option<u64>, runs: Option<u64>, trace: bool) -> Result<(), CliError> {
    let seed = match seed {
        Some(s) => s,
        None => env_seed()?,
    };
    let runs = match runs {
        Some(r) => r,
        None => std::env::var("SIM_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    };
    out!("seed={seed} scenario=swarm of {runs} seed-chosen scenarios");
    for i in 0..runs {
        let s = seed.wrapping_add(i);
        let scenario = explore::swarm_scenario(s);
        if trace {
            out!("seed {s}: {}", scenario.summary());
            let (_, lines) = pgiplock_sim::World::new(scenario.clone(), s)?.run_traced();
            for line in lines {
                out!("{line}");
            }
        }
        let report = explore::run_checked(&scenario, s, twice()).map_err(|e| CliError(explain(&e, "swarm")))?;
        out!(
            "seed {s}: ok  {}  events {} loss {:.1} s split {:.1} s trace {}",
            scenario.summary(),
            report.events,
            report.loss_window_s,
            report.split_brain_s,
            report.trace_hash
        );
    }
    Ok(())
}

/// Wall-clock measurement of the simulator itself; never affects any simulated value.
#[allow(clippy::disallowed_methods)]
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = std::time::Instant::now();
    let value = f();
    (value, start.elapsed())
}

fn cmd_bench(processes: usize, duration: Duration, interval: Duration, protocol: &str) -> Result<(), CliError> {
    let seed = env_seed()?;
    let base = Scenario::default();
    out!("seed={seed} scenario=bench: default scenario, then {processes} processes for {} at acquire_interval {} ({protocol})", format_duration(duration), format_duration(interval));
    let (report, wall) = timed(|| pgiplock_sim::run(&base, seed));
    let report = report?;
    out!(
        "default scenario: {} events in {:.3} s wall = {:.0} events/s ({} virtual)",
        report.events,
        wall.as_secs_f64(),
        report.events as f64 / wall.as_secs_f64().max(1e-9),
        format_duration(base.duration)
    );
    let big = Scenario {
        protocol: protocol.parse()?,
        processes,
        duration,
        acquire_interval: interval,
        publish_rate: 0.1,
        fault_rates: pgiplock_sim::FaultRates {
            stop: 1.0,
            crash: 1.0,
            cut: 0.5,
            terminate: 0.5,
            ..pgiplock_sim::FaultRates::default()
        },
        ..Scenario::default()
    };
    let (report, wall) = timed(|| pgiplock_sim::run(&big, seed));
    let report = report?;
    out!(
        "{processes} processes x {}: {} events in {:.1} s wall = {:.0} events/s; {:.1} lock statements/s simulated",
        format_duration(duration),
        report.events,
        wall.as_secs_f64(),
        report.events as f64 / wall.as_secs_f64().max(1e-9),
        report.statements_per_s
    );
    let day = Duration::from_secs(86_400);
    if duration < day {
        let factor = day.as_secs_f64() / duration.as_secs_f64();
        out!(
            "extrapolated to 24h (linear in virtual time): about {:.0} events, {:.0} s wall",
            report.events as f64 * factor,
            wall.as_secs_f64() * factor
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> clap::Command {
        with_defaults(Cli::command())
    }

    #[test]
    fn cli_definition_is_consistent() {
        command().debug_assert();
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

    /// Whether `--long=value` alone is accepted by `cmd`.
    fn accepts(cmd: &clap::Command, long: &str, value: &str) -> bool {
        cmd.clone()
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
        options(&command(), "pgiplock-sim".to_owned(), &mut all);
        let mut durations = BTreeMap::<String, usize>::new();
        for (path, cmd, arg) in &all {
            let id = arg.get_id().as_str();
            // Hidden flags (the mutants, for testing the checkers) are not for users.
            if matches!(id, "help" | "version") || arg.is_hide_set() {
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
                *durations.entry(path.clone()).or_default() += 1;
                let shown = format!("{help} {}", defaults.join(" "));
                let unit = shown
                    .split(|c: char| c.is_whitespace() || ",;:()[]".contains(c))
                    .any(|word| parse_duration(word).is_ok());
                assert!(unit, "{path} --{long}: no duration with a unit in {shown:?}");
            }
        }
        // Each subcommand with timings has its duration flags found.
        let paths: Vec<&str> = durations.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "pgiplock-sim bench",
                "pgiplock-sim run",
                "pgiplock-sim sweep",
                "pgiplock-sim tune"
            ]
        );
    }

    #[test]
    fn stated_scenario_defaults_are_the_scenarios() {
        let defaults = scenario_defaults();
        let d = Scenario::default();
        assert_eq!(defaults["acquire_interval"], format_duration(d.acquire_interval));
        assert_eq!(defaults["lease_ttl"], format_duration(d.lease_ttl));
        assert_eq!(defaults["crash_rate"].parse::<f64>().ok(), Some(d.fault_rates.crash));
        assert_eq!(defaults["renew_interval"], "none");
        let cmd = command();
        let run = cmd.find_subcommand("run").expect("run");
        let help = |sub: &clap::Command, id: &str| {
            sub.get_arguments()
                .find(|a| a.get_id().as_str() == id)
                .and_then(|a| a.get_help().map(ToString::to_string))
                .unwrap_or_default()
        };
        assert!(help(run, "acquire_interval").ends_with(&format!("[default: {}]", defaults["acquire_interval"])));
        let tune = cmd.find_subcommand("tune").expect("tune");
        assert!(help(tune, "duration").contains(&format!("[default: {}", format_duration(TUNE_DURATION))));
        // Every scenario flag with a value, except the repeatable schedules, has its default.
        for sub in SCENARIO_SUBCOMMANDS {
            let sub = cmd.find_subcommand(sub).expect("subcommand");
            for arg in ScenarioArgs::augment_args(clap::Command::new("x")).get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "config" | "seed" | "faults" | "actions") || arg.is_hide_set() {
                    continue;
                }
                assert!(defaults.contains_key(id), "no default for --{id}");
                assert!(help(sub, id).contains("[default: "), "{id}");
            }
        }
    }

    /// The table every CLI of the project is held to, through this binary's parser.
    const CASES: &[(&str, Result<u64, &str>)] = include!("../../core/src/duration_cases.rs");

    #[test]
    fn durations_parse_by_the_shared_table() {
        for &(input, expected) in CASES {
            let flag = format!("--acquire-interval={input}");
            let parsed = command()
                .try_get_matches_from(["pgiplock-sim", "run", &flag])
                .and_then(|m| Cli::from_arg_matches(&m));
            match (parsed, expected) {
                (Ok(cli), Ok(micros)) => {
                    let Some(Command::Run { scenario, .. }) = cli.command else {
                        panic!("{input:?}: not run")
                    };
                    assert_eq!(
                        scenario.acquire_interval,
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
        let mut cmd = command();
        let help = cmd.render_long_help().to_string();
        assert!(help.contains("A bare number such as 5 is refused"), "{help}");
        for sub in ["run", "sweep", "tune", "swarm", "bench"] {
            let sub = cmd.find_subcommand_mut(sub).expect("subcommand");
            let help = sub.render_long_help().to_string();
            assert!(help.contains("A bare number such as 5 is refused"), "{help}");
        }
    }
}
