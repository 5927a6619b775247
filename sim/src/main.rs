//! `pgiplock-sim`: run, sweep and tune simulated fleets of pgiplock processes.
//!
//! Without arguments it runs the default sweep and prints the trade-off table. The first line of
//! every run names the seed and the scenario; the same seed and scenario give byte-identical
//! output. Environment: `SIM_SEED` (default seed), `SIM_RUNS` (swarm runs),
//! `SIM_CHECK_DETERMINISM=1` (run everything twice and compare).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pgiplock_core::Protocol;
use pgiplock_sim::explore::{self, ExploreError, SweepPoint, TuneTarget};
use pgiplock_sim::scenario::{
    format_duration, parse_action, parse_duration, parse_fault, ActionSpec, FaultKind, FaultSpec, FaultTarget,
};
use pgiplock_sim::{Report, Scenario, SimError};

#[derive(Parser, Debug)]
#[command(name = "pgiplock-sim", version, about = "Deterministic fleet simulator for pgiplock")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one scenario (from flags and/or a TOML file) and print its metrics.
    Run {
        #[command(flatten)]
        scenario: ScenarioArgs,
        /// Also print the report as JSON (one line).
        #[arg(long)]
        json: bool,
        /// Print every event (long!).
        #[arg(long)]
        trace: bool,
    },
    /// Vary timings, print the trade-off table, write CSV and an SVG chart.
    Sweep {
        #[command(flatten)]
        scenario: ScenarioArgs,
        /// Protocols to sweep.
        #[arg(long, value_delimiter = ',', default_value = "classic,lease")]
        protocols: Vec<String>,
        /// Acquire intervals (default: the default sweep's settings).
        #[arg(long, value_delimiter = ',', value_parser = dur)]
        intervals: Vec<Duration>,
        /// Lease ttls (Lease points only).
        #[arg(long, value_delimiter = ',', value_parser = dur)]
        ttls: Vec<Duration>,
        /// Fleet sizes.
        #[arg(long = "process-counts", value_delimiter = ',')]
        process_counts: Vec<usize>,
        /// CSV output file.
        #[arg(long, default_value = "sweep.csv")]
        csv: PathBuf,
        /// SVG chart output file.
        #[arg(long, default_value = "sweep.svg")]
        svg: PathBuf,
    },
    /// Recommend timings for a fleet and a target.
    Tune {
        #[command(flatten)]
        scenario: ScenarioArgs,
        /// Target: at most this much loss window per day (e.g. 5m); minimise load.
        #[arg(long, value_parser = dur, conflicts_with = "max_load")]
        max_loss_per_day: Option<Duration>,
        /// Target: at most this many lock statements per second; minimise the loss window.
        #[arg(long)]
        max_load: Option<f64>,
        /// Consider only this protocol.
        #[arg(long = "only")]
        only: Option<String>,
    },
    /// Seed-chosen scenarios with every checker (swarm testing).
    Swarm {
        /// First seed (default SIM_SEED or 1).
        #[arg(long)]
        seed: Option<u64>,
        /// Number of seeds (default SIM_RUNS or 20).
        #[arg(long)]
        runs: Option<u64>,
        /// Print every event of every run (long!).
        #[arg(long)]
        trace: bool,
    },
    /// Measure the simulator: events per second, and a large fleet over a long virtual time.
    Bench {
        /// Fleet size of the large run.
        #[arg(long, default_value_t = 1000)]
        processes: usize,
        /// Virtual time of the large run.
        #[arg(long, value_parser = dur, default_value = "24h")]
        duration: Duration,
        /// Acquire interval of the large run.
        #[arg(long, value_parser = dur, default_value = "1s")]
        acquire_interval: Duration,
        /// Protocol of the large run.
        #[arg(long, default_value = "classic")]
        protocol: String,
    },
}

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

fn dur(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// A duration flag that also accepts `none` (use the scenario's derived default).
///
/// A newtype, because clap reads `Option<Option<T>>` as "a flag with an optional value" and
/// would then expect the parser to produce `T`.
#[derive(Clone, Copy, Debug)]
struct MaybeDuration(Option<Duration>);

fn opt_dur(s: &str) -> Result<MaybeDuration, String> {
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

/// Scenario flags; each overrides the TOML file (or the default).
#[derive(Args, Debug, Default)]
struct ScenarioArgs {
    /// A TOML scenario file (fields as in `Scenario`, durations like "5s").
    #[arg(long)]
    config: Option<PathBuf>,
    /// The seed (default: SIM_SEED, else 1).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    protocol: Option<String>,
    #[arg(long)]
    processes: Option<usize>,
    #[arg(long)]
    channels: Option<usize>,
    #[arg(long, value_parser = dur)]
    duration: Option<Duration>,
    #[arg(long, value_parser = dur)]
    warmup: Option<Duration>,
    #[arg(long, value_parser = dur)]
    acquire_interval: Option<Duration>,
    #[arg(long)]
    retry_jitter: Option<f64>,
    #[arg(long, value_parser = dur)]
    lease_ttl: Option<Duration>,
    #[arg(long, value_parser = opt_dur)]
    renew_interval: Option<MaybeDuration>,
    #[arg(long, value_parser = opt_dur)]
    fence_margin: Option<MaybeDuration>,
    #[arg(long, value_parser = dur)]
    request_timeout: Option<Duration>,
    #[arg(long)]
    publish_rate: Option<f64>,
    /// Most messages a Lease standby keeps for replay (`none`: the core's default).
    #[arg(long, value_parser = opt_count)]
    replay_limit: Option<MaybeCount>,
    #[arg(long, value_parser = dur)]
    net_delay: Option<Duration>,
    #[arg(long, value_parser = dur)]
    query_min: Option<Duration>,
    #[arg(long, value_parser = dur)]
    query_mean: Option<Duration>,
    #[arg(long, value_parser = dur)]
    query_max: Option<Duration>,
    #[arg(long, value_parser = dur)]
    server_keepalive_detect: Option<Duration>,
    #[arg(long, value_parser = dur)]
    server_retransmit_detect: Option<Duration>,
    #[arg(long, value_parser = dur)]
    client_user_timeout: Option<Duration>,
    /// Bounds one connection attempt (the session's connect timeout).
    #[arg(long, value_parser = dur)]
    connect_timeout: Option<Duration>,
    /// Bounds each setup statement of a connection (the session's setup timeout).
    #[arg(long, value_parser = dur)]
    setup_timeout: Option<Duration>,
    #[arg(long, value_parser = dur)]
    crash_close_delay: Option<Duration>,
    #[arg(long)]
    drift: Option<f64>,
    #[arg(long)]
    terminate_permitted: Option<bool>,
    /// Graceful stops per hour.
    #[arg(long)]
    stop_rate: Option<f64>,
    /// Crashes per hour.
    #[arg(long)]
    crash_rate: Option<f64>,
    /// Silent disconnects per hour.
    #[arg(long)]
    cut_rate: Option<f64>,
    /// Server-side terminations per hour.
    #[arg(long)]
    terminate_rate: Option<f64>,
    /// Server restarts per hour.
    #[arg(long)]
    server_restart_rate: Option<f64>,
    /// Connection handshakes that hang (the server never answers) per hour.
    #[arg(long)]
    connect_hang_rate: Option<f64>,
    /// Blips of the link during a reconnect per hour.
    #[arg(long)]
    connect_blip_rate: Option<f64>,
    /// Lost replies to a setup statement (bootstrap or LISTEN) per hour.
    #[arg(long)]
    setup_reply_loss_rate: Option<f64>,
    /// Lock schema drops under the running fleet per hour.
    #[arg(long)]
    schema_drop_rate: Option<f64>,
    /// Read-only server windows per hour.
    #[arg(long)]
    read_only_rate: Option<f64>,
    /// Bursts of forged lock-channel markers from a foreign session per hour.
    #[arg(long)]
    forge_rate: Option<f64>,
    /// Whom drawn faults hit: holder or any.
    #[arg(long)]
    fault_target: Option<String>,
    /// A scheduled fault, `kind@time@target` (target: holder or a process index), repeatable.
    #[arg(long = "fault", value_parser = fault)]
    faults: Vec<FaultSpec>,
    /// A scheduled action, `action@time@target` (release, acquire, cut, heal, start; target:
    /// holder or a process index), repeatable.
    #[arg(long = "action", value_parser = action)]
    actions: Vec<ActionSpec>,
    #[arg(long, value_parser = opt_dur)]
    restart_delay: Option<MaybeDuration>,
    #[arg(long, value_parser = dur)]
    cut_duration: Option<Duration>,
    #[arg(long, value_parser = dur)]
    server_down: Option<Duration>,
    /// How long the link of a connect blip drops everything.
    #[arg(long, value_parser = dur)]
    blip_duration: Option<Duration>,
    /// How long a read-only window lasts.
    #[arg(long, value_parser = dur)]
    read_only_duration: Option<Duration>,
    #[arg(long, value_parser = dur)]
    liveness_slack: Option<Duration>,
    #[arg(long)]
    max_steps: Option<u64>,
    /// Fail S2 also when the extra believer's session had already ended unknown to it.
    #[arg(long)]
    strict_s2: Option<bool>,
    /// Fail D1 also for an unflagged re-delivery across a schema drop.
    #[arg(long)]
    strict_d1: Option<bool>,
    /// Also run the property-testing API's checks (see `pgiplock_sim::check`).
    #[arg(long)]
    property_checks: Option<bool>,
    #[arg(long, hide = true)]
    mutant: Option<pgiplock_sim::Mutant>,
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
        s.mutant = self.mutant.or(s.mutant);
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
        s.validate()?;
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
    let cli = Cli::parse();
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
        Some(Command::Run { scenario, json, trace }) => cmd_run(&scenario, json, trace),
        Some(Command::Sweep {
            scenario,
            protocols,
            intervals,
            ttls,
            process_counts,
            csv,
            svg,
        }) => cmd_sweep(&scenario, &protocols, &intervals, &ttls, &process_counts, &csv, &svg),
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
    counts: &[usize],
    csv: &std::path::Path,
    svg: &std::path::Path,
) -> Result<(), CliError> {
    let base = args.scenario()?;
    let seed = args.seed()?;
    let protocols = protocols(names)?;
    let scenarios = if intervals.is_empty() && ttls.is_empty() && counts.is_empty() {
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
        explore::grid(&base, &protocols, &intervals, ttls, &counts)
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
        base.duration = Duration::from_secs(24 * 3600);
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
            let per_day = p.report.loss_window_s * 86_400.0 / p.report.virtual_time_s.max(1.0);
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
