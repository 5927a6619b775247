//! The benchmark suite: each figure of `BENCHMARKS.md`, measured in one process, every timing
//! next to a floor probe run in the same process (interleaved trial by trial where it can be)
//! and reported as a ratio to it.
//!
//! ```text
//! cargo build --release -p pgiplock-cli --bins
//! cargo run --release -p pgiplock-tests --bin bench -- all
//! cargo run --release -p pgiplock-tests --bin bench -- handover --standbys 1 --trials 2
//! ```
//!
//! Markdown on stdout (one section per measurement, printed as each ends), progress on stderr.
//! The timings run against env `PGIPLOCK_TEST_DATABASE_URL` (or `--database-url`) in schemas
//! of their own, dropped at the end; the idle load starts a throwaway cluster with
//! `pg_stat_statements`. Every worker and helper process is killed when the bench ends, even
//! on Ctrl-C. Not part of the test run: it takes minutes and measures the machine.

use std::fmt::Write as _;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use pgiplock_tests::{database_url, Protocol};

mod failover;
mod helpers;
mod idle;
mod memory;
mod probe;
mod scale;
mod sim;
mod stats;
mod throughput;

use stats::{cells, fmt, ratio, timing_cells, timing_header, Summary};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn progress(text: &str) {
    eprintln!("[bench] {text}");
}

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Measurement {
    /// Everything below, in this order.
    All,
    /// Graceful handover: SIGTERM to the holder → the next `acquired`.
    Handover,
    /// Crash failover: SIGKILL of the holder → the next `acquired`.
    Crash,
    /// Idle statements per second of the holder and of each standby (throwaway cluster).
    Idle,
    /// Resident set of workers, of 1000-channel processes, and bytes of a core lock.
    Memory,
    /// Statements per second, memory and time to hold every channel against the channel count
    /// of one holder process and one standby process (throwaway cluster).
    Scale,
    /// Delivery rate and lag through a holder's subscription next to a raw `LISTEN`.
    Throughput,
    /// The simulator's events per second.
    Sim,
    /// The floor probe alone (A: DELETE + NOTIFY; B: LISTEN, INSERT).
    Probe,
    /// Helper process: a plain LISTEN session printing the worker's `message` lines.
    #[value(hide = true)]
    RawListen,
    /// Helper process: one session with a lock on each of many channels.
    #[value(hide = true)]
    HoldMany,
}

/// An acquire interval on the command line: `default` or a duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Interval(Option<Duration>);

fn parse_interval(text: &str) -> Result<Interval, String> {
    if text.trim() == "default" {
        return Ok(Interval(None));
    }
    parse_duration(text).map(|d| Interval(Some(d)))
}

/// A publish rate: messages per second, or `max` (as fast as one connection goes).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rate(Option<f64>);

fn parse_rate(text: &str) -> Result<Rate, String> {
    match text.trim() {
        "max" => Ok(Rate(None)),
        t => match t.parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate(Some(r))),
            _ => Err(format!(
                "invalid rate {text:?}: write messages per second (e.g. 1000) or max"
            )),
        },
    }
}

/// Durations as every CLI of the project reads them (`pgiplock_core::parse_duration`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    pgiplock_core::parse_duration(text).map_err(|e| e.to_string())
}

fn parse_protocol(text: &str) -> Result<Protocol, String> {
    text.parse::<Protocol>()
        .map_err(|e| format!("invalid protocol {text:?}: {e}"))
}

/// The benchmark suite of pgiplock.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// What to measure.
    #[arg(value_enum)]
    measurement: Measurement,
    /// Server of the timings (default: env PGIPLOCK_TEST_DATABASE_URL, else
    /// postgres://postgres@127.0.0.1:5432/test).
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// Protocols to measure.
    #[arg(long, value_delimiter = ',', default_value = "lease,classic", value_parser = parse_protocol)]
    protocols: Vec<Protocol>,
    /// Standbys of the graceful handover's fleets (one fleet each).
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    standbys: Vec<usize>,
    /// Handovers per fleet; also crashes per fleet at an explicit interval.
    #[arg(long, default_value_t = 50)]
    trials: usize,
    /// Floor-probe trials just before each handover or crash.
    #[arg(long, default_value_t = 3)]
    probes: usize,
    /// Acquire intervals of the crash failover, durations or `default` (the worker's: 30 s).
    #[arg(long, value_name = "DURATION", value_delimiter = ',', default_value = "default,1s", value_parser = parse_interval)]
    crash_intervals: Vec<Interval>,
    /// Crashes per fleet at the default interval (each may wait up to 30 s under Classic).
    #[arg(long, default_value_t = 5)]
    crash_trials: usize,
    /// Standbys of the crash failover's fleets.
    #[arg(long, default_value_t = 10)]
    crash_standbys: usize,
    /// Length of each idle-load window (the holder alone, then with the standbys), a duration.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    window: Duration,
    /// Wait after set-up before each idle-load and many-channel window opens, a duration
    /// (shorter lets start-up statements into the window: for smoke runs only).
    #[arg(long, value_name = "DURATION", default_value = "12s", value_parser = parse_duration)]
    warmup: Duration,
    /// Standbys of the idle load.
    #[arg(long, default_value_t = 10)]
    idle_standbys: usize,
    /// An extra argument for every worker of the handover and crash fleets, e.g.
    /// `--worker-arg=--wake-jitter=0s` (repeatable): measures a setting against the defaults.
    #[arg(long = "worker-arg", value_name = "ARG", allow_hyphen_values = true)]
    worker_args: Vec<String>,
    /// Publish rates of the throughput (messages per second, or max).
    #[arg(long, value_delimiter = ',', default_value = "1000,max", value_parser = parse_rate)]
    rates: Vec<Rate>,
    /// Messages per throughput run.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Channels of the many-channel memory processes (and locks of the core count).
    #[arg(long, default_value_t = 1000)]
    channels: usize,
    /// Channel counts of the many-channel load (one holder process, one standby process).
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000,10000")]
    scale_channels: Vec<usize>,
    /// Length of each window of the many-channel load, a duration.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    scale_window: Duration,
    /// Trials of the one-lock memory processes.
    #[arg(long, default_value_t = 3)]
    memory_trials: usize,
    /// Trials of each simulator run.
    #[arg(long, default_value_t = 5)]
    sim_trials: usize,
    /// Processes of the simulator's large run.
    #[arg(long, default_value_t = 1000)]
    sim_processes: usize,
    /// Virtual time of the simulator's large run, a duration.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    sim_duration: Duration,
    /// Virtual time of the simulator's default-scenario run, a duration (default: the
    /// scenario's own, 12h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    sim_default_duration: Option<Duration>,
    /// Millions of SplitMix64 draws of the CPU probe before each simulator trial.
    #[arg(long, value_name = "MILLIONS", default_value_t = sim::PROBE_ITERATIONS / 1_000_000)]
    probe_draws: u64,
    /// Helper: the channel to listen on.
    #[arg(long, hide = true)]
    channel: Option<String>,
    /// Helper: the lock schema.
    #[arg(long, hide = true)]
    schema: Option<String>,
    /// Helper: the prefix of the many channels.
    #[arg(long, hide = true)]
    channel_prefix: Option<String>,
    /// Helper: report ready only once every lock is held.
    #[arg(long, hide = true)]
    expect_all: bool,
}

impl Args {
    fn url(&self) -> String {
        self.database_url.clone().unwrap_or_else(database_url)
    }

    fn wants(&self, m: Measurement) -> bool {
        self.measurement == m || self.measurement == Measurement::All
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn load_average() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The machine, as BENCHMARKS.md records it.
async fn machine(url: &str) -> String {
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let mem_kb: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let server = match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            match client.query_one("SELECT version()", &[]).await {
                Ok(row) => row.get::<_, String>(0),
                Err(e) => format!("unknown ({e})"),
            }
        }
        Err(e) => format!("unreachable ({e})"),
    };
    format!(
        "## Machine\n\n- cores (nproc): {cores}\n- CPU: {cpu}\n- RAM: {:.1} GiB\n- kernel: {}\n- server: {server}\n- load average at start: {}\n\n",
        mem_kb as f64 / 1024.0 / 1024.0,
        read("/proc/sys/kernel/osrelease").trim(),
        load_average()
    )
}

async fn handover(args: &Args, url: &str) -> Result<String, BoxError> {
    let mut out = format!(
        "## Graceful handover\n\nSIGTERM to the holder → the next `acquired` line of another worker (the workers' \
         `t_us`), default settings, one fleet of 1 + k workers per row, {} handovers each (the stopped \
         holder is replaced by a fresh standby after each); {} floor-probe trials just before each handover. \
         Milliseconds. Load average before: {}.\n\n{}\n",
        args.trials,
        args.probes,
        load_average(),
        timing_header(&["protocol", "standbys"], &["two holders, ms"])
    );
    for &protocol in &args.protocols {
        for &standbys in &args.standbys {
            progress(&format!("handover: {protocol}, {standbys} standbys"));
            let outcome = failover::run(&failover::Setup {
                url: url.to_owned(),
                protocol,
                standbys,
                acquire_interval: None,
                fault: failover::Fault::Stop,
                trials: args.trials,
                probes_per_trial: args.probes,
                worker_args: args.worker_args.clone(),
            })
            .await?;
            let _ = writeln!(
                out,
                "| {protocol} | {standbys} | {} | {} |",
                timing_cells(&outcome.latency_ms, &outcome.probe_ms),
                fmt(outcome.split_brain_us as f64 / 1000.0)
            );
        }
    }
    out.push('\n');
    Ok(out)
}

async fn crash(args: &Args, url: &str) -> Result<String, BoxError> {
    let mut out = format!(
        "## Crash failover\n\nSIGKILL of the holder → the next `acquired` of another worker, {} standbys; the \
         fault's phase is spread over the standbys' retry period (golden-ratio steps); {} crashes per fleet at \
         the default interval (30 s), {} at an explicit one; {} floor-probe trials before each crash. \
         Milliseconds. Load average before: {}.\n\n{}\n",
        args.crash_standbys,
        args.crash_trials,
        args.trials,
        args.probes,
        load_average(),
        timing_header(&["protocol", "acquire interval"], &["two holders, ms"])
    );
    for &protocol in &args.protocols {
        for &Interval(interval) in &args.crash_intervals {
            let label = interval.map_or("default (30 s)".to_owned(), |d| {
                humantime::format_duration(d).to_string()
            });
            progress(&format!("crash: {protocol}, acquire interval {label}"));
            let outcome = failover::run(&failover::Setup {
                url: url.to_owned(),
                protocol,
                standbys: args.crash_standbys,
                acquire_interval: interval,
                fault: failover::Fault::Crash,
                trials: if interval.is_some() {
                    args.trials
                } else {
                    args.crash_trials
                },
                probes_per_trial: args.probes,
                worker_args: args.worker_args.clone(),
            })
            .await?;
            let _ = writeln!(
                out,
                "| {protocol} | {label} | {} | {} |",
                timing_cells(&outcome.latency_ms, &outcome.probe_ms),
                fmt(outcome.split_brain_us as f64 / 1000.0)
            );
        }
    }
    out.push('\n');
    Ok(out)
}

/// Statements per second the timings imply at the defaults (README, L4).
fn implied(protocol: Protocol, holder: bool) -> f64 {
    let config = pgiplock_core::LockConfig::new(protocol);
    if holder {
        return 1.0 / config.renew_interval.as_secs_f64();
    }
    if protocol == Protocol::Lease && config.crash_watch {
        // A watched standby process sends one wait per refresh and no attempt.
        return 1.0 / config.crash_watch_refresh.as_secs_f64();
    }
    let bound = match protocol {
        Protocol::Lease => config.acquire_interval.min(config.lease_ttl),
        _ => config.acquire_interval,
    };
    // Retries fall uniformly in [bound × (1 − jitter), bound].
    1.0 / (bound.as_secs_f64() * (1.0 - config.retry_jitter / 2.0))
}

async fn idle(args: &Args) -> Result<String, BoxError> {
    progress("idle: starting a throwaway cluster with pg_stat_statements");
    let server = idle::Server::start().await?;
    let version = server.version().await?;
    let mut out = format!(
        "## Idle load\n\nA throwaway cluster ({version}) with `pg_stat_statements`; default settings; the holder \
         alone for {w}, then the holder and {k} standbys for {w}. Statements = `pg_stat_statements` calls of the \
         workers' database + `pg_stat_database.xact_rollback` (a refused Classic attempt fails and is not in \
         `pg_stat_statements`); a standby's rate is (second window − first window) ÷ {k}. The floor here is what \
         the timings imply (holder: 1 / renew_interval; standby: 1 / mean retry period, with the crash watch \
         1 / crash_watch_refresh). Load average before: {}.\n\n\
         | protocol | role | statements/s | implied by the timings | ratio | statements in window (calls + rollbacks) | commits | rollbacks | window s |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        load_average(),
        w = humantime::format_duration(args.window),
        k = args.idle_standbys,
    );
    let mut queries = String::new();
    for &protocol in &args.protocols {
        progress(&format!("idle: {protocol}"));
        let load = server
            .measure(protocol, args.idle_standbys, args.window, args.warmup)
            .await?;
        let rows = [
            (
                "holder (alone)",
                load.holder_rate(),
                implied(protocol, true),
                &load.holder,
            ),
            (
                "each standby",
                load.standby_rate(),
                implied(protocol, false),
                &load.fleet,
            ),
        ];
        for (role, rate, expected, window) in rows {
            let _ = writeln!(
                out,
                "| {protocol} | {role} | {} | {} | {} | {} + {} | {} | {} | {:.1} |",
                fmt(rate),
                fmt(expected),
                ratio(rate, expected),
                window.statements,
                window.rollbacks,
                window.commits,
                window.rollbacks,
                window.seconds
            );
        }
        let _ = writeln!(
            out,
            "| {protocol} | whole fleet (1 + {}) | {} | {} | {} | | | | |",
            load.standbys,
            fmt(load.fleet.statements_per_s()),
            fmt(implied(protocol, true) + load.standbys as f64 * implied(protocol, false)),
            ratio(
                load.fleet.statements_per_s(),
                implied(protocol, true) + load.standbys as f64 * implied(protocol, false)
            )
        );
        // The forger's own statements are excluded by their text; its transactions are
        // commits, not rollbacks, so the statement count is the lock's own.
        let _ = writeln!(
            out,
            "| {protocol} | whole fleet, forger at work ({} markers) | {} | {} | {} | {} + {} | | | {:.1} |",
            load.forged_sent,
            fmt(load.forged.statements_per_s()),
            fmt(load.fleet.statements_per_s()),
            ratio(load.forged.statements_per_s(), load.fleet.statements_per_s()),
            load.forged.statements,
            load.forged.rollbacks,
            load.forged.seconds
        );
        for (label, window) in [
            ("holder alone", &load.holder),
            ("holder and standbys", &load.fleet),
            ("with a forger", &load.forged),
        ] {
            for (query, per_s) in &window.calls_per_s {
                let short: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
                let short: String = short.chars().take(110).collect();
                let _ = writeln!(
                    queries,
                    "| {protocol} | {label} | {} | `{}` |",
                    fmt(*per_s),
                    short.replace('|', "\\|").replace('`', "'")
                );
            }
        }
    }
    let _ = write!(
        out,
        "\nBy statement (calls/s, `pg_stat_statements` text, first 110 characters):\n\n| protocol | window | calls/s | statement |\n|---|---|---|---|\n{queries}\n"
    );
    drop(server);
    Ok(out)
}

async fn memory(args: &Args, url: &str, core: &memory::CoreBytes) -> Result<String, BoxError> {
    let mut out = format!(
        "## Memory\n\nResident set from `/proc/<pid>/status` (`VmRSS` now, `VmHWM` its peak), 2 s after set-up, in \
         kB. One-lock processes: a Lease holder worker, a standby worker on the same channel, and the floor: \
         `bench raw-listen`, a plain tokio-postgres `LISTEN` session printing the same JSON lines (a bigger \
         binary than the worker: it links the simulator); {} trials. Load average before: {}.\n\n\
         | process | n | VmRSS median | VmRSS max | VmHWM median | VmHWM max | VmRSS median ÷ floor |\n|---|---|---|---|---|---|---|\n",
        args.memory_trials,
        load_average()
    );
    let mut trials = Vec::new();
    for i in 0..args.memory_trials {
        progress(&format!(
            "memory: one-lock processes, trial {}/{}",
            i + 1,
            args.memory_trials
        ));
        trials.push(memory::one_lock(url).await?);
    }
    let kb = |f: &dyn Fn(&memory::OneLock) -> u64| trials.iter().map(|t| f(t) as f64).collect::<Vec<f64>>();
    let floor = Summary::of(&kb(&|t| t.raw.rss_kb)).map_or(0.0, |s| s.median);
    let rows: [(&str, Vec<f64>, Vec<f64>); 3] = [
        (
            "worker holding 1 lock",
            kb(&|t| t.holder.rss_kb),
            kb(&|t| t.holder.hwm_kb),
        ),
        (
            "worker waiting on 1 lock",
            kb(&|t| t.standby.rss_kb),
            kb(&|t| t.standby.hwm_kb),
        ),
        (
            "floor: raw LISTEN process",
            kb(&|t| t.raw.rss_kb),
            kb(&|t| t.raw.hwm_kb),
        ),
    ];
    for (label, rss, hwm) in rows {
        let (r, h) = (Summary::of(&rss), Summary::of(&hwm));
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} | {} | {} | {} |",
            rss.len(),
            r.map_or("–".into(), |s| fmt(s.median)),
            r.map_or("–".into(), |s| fmt(s.max)),
            h.map_or("–".into(), |s| fmt(s.median)),
            h.map_or("–".into(), |s| fmt(s.max)),
            ratio(r.map_or(0.0, |s| s.median), floor)
        );
    }
    progress(&format!("memory: {} channels in one process", args.channels));
    let many = memory::many_locks(url, args.channels).await?;
    for (label, rss) in [("holding", many.holder), ("waiting on", many.waiter)] {
        let _ = writeln!(
            out,
            "| `bench hold-many`: one session {label} {} Lease locks | 1 | {} | {} | {} | {} | {} |",
            many.channels,
            rss.rss_kb,
            rss.rss_kb,
            rss.hwm_kb,
            rss.hwm_kb,
            ratio(rss.rss_kb as f64, floor)
        );
    }
    let _ = write!(
        out,
        "\nCore state, counted by the bench's global allocator over {n} locks (Lease defaults, channel names of 14 \
         bytes):\n\n| what | bytes |\n|---|---|\n| `size_of::<pgiplock_core::Lock>()` | {} |\n\
         | heap of one started `Lock` (after `SessionUp` and `Start`, outputs drained) | {} |\n\
         | one started `Lock` in all | {} |\n| a core `Session` per lock added (entry, lock, channel routes; not connected) | {} |\n\
         | the same session per lock, connected and holding every lock | {} |\n\n",
        core.inline,
        fmt(core.lock_heap),
        fmt(core.inline as f64 + core.lock_heap),
        fmt(core.session_per_lock),
        fmt(core.holding_per_lock),
        n = core.count
    );
    Ok(out)
}

async fn scale(args: &Args) -> Result<String, BoxError> {
    progress("scale: starting a throwaway cluster with pg_stat_statements");
    let server = idle::Server::start().await?;
    let version = server.version().await?;
    let mut out = format!(
        "## Many channels in one process\n\nA throwaway cluster ({version}) with `pg_stat_statements`; default \
         settings (Lease); per row one `bench hold-many` process (one `Session`, one lock per channel) takes every \
         channel, then a second one waits on the same channels. Statements = `pg_stat_statements` calls + rollbacks \
         of the workers' database over a window of {w}: the holder alone, then both (the standby's rate is the \
         difference). Held in: from the holder process's start (before it connects) until it held every channel. \
         RSS: `VmRSS` after each window, kB. Load average before: {}.\n\n\
         | channels | holder statements/s | standby statements/s | holder held all in, ms | holder RSS kB | standby RSS kB | holder statements in window | both in window |\n\
         |---|---|---|---|---|---|---|---|\n",
        load_average(),
        w = humantime::format_duration(args.scale_window),
    );
    for &channels in &args.scale_channels {
        progress(&format!("scale: {channels} channels"));
        let row = scale::measure(&server, channels.max(1), args.scale_window, args.warmup).await?;
        progress(&format!(
            "  {channels} channels: holder {} statements/s, standby {} statements/s",
            fmt(row.holder_rate()),
            fmt(row.standby_rate())
        ));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} + {} | {} + {} |",
            row.channels,
            fmt(row.holder_rate()),
            fmt(row.standby_rate()),
            match &row.held {
                Ok(ms) => format!("{ms:.0}"),
                Err(line) => format!("`{line}`"),
            },
            row.holder_rss.rss_kb,
            row.standby_rss.rss_kb,
            row.holder.statements,
            row.holder.rollbacks,
            row.both.statements,
            row.both.rollbacks,
        );
    }
    out.push('\n');
    Ok(out)
}

async fn throughput(args: &Args, url: &str) -> Result<String, BoxError> {
    let mut out = format!(
        "## Throughput and delivery lag\n\nOne publisher connection sends {} numbered messages (`pg_notify`, one \
         statement at a time at a fixed rate, {} in flight at `max`) carrying their send time; a holder `pgiplock worker` (default settings, its \
         exclusive subscription printed as `message` lines) and the floor, `bench raw-listen` (a plain \
         tokio-postgres `LISTEN` printing the same lines), receive them side by side. Lag = receipt `t_us` − send \
         time, milliseconds; delivery rate = delivered ÷ (last receipt − first send). Load average before: {}.\n\n\
         | protocol | target rate | achieved publish rate | receiver | delivered | duplicates | delivery rate /s | rate ÷ floor | lag n | median | p90 | p99 | max | lag median ÷ floor | lag p99 ÷ floor |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        args.messages,
        throughput::PIPELINE,
        load_average()
    );
    for &protocol in &args.protocols {
        for &Rate(rate) in &args.rates {
            progress(&format!("throughput: {protocol} at {rate:?}/s"));
            let run = throughput::run(url, protocol, rate, args.messages).await?;
            let floor = Summary::of(&run.raw.lag_ms);
            for (label, r) in [("worker (holder)", &run.worker), ("floor: raw LISTEN", &run.raw)] {
                let s = Summary::of(&r.lag_ms);
                let (r50, r99) = match (s, floor) {
                    (Some(s), Some(f)) => (ratio(s.median, f.median), ratio(s.p99, f.p99)),
                    _ => ("–".into(), "–".into()),
                };
                let _ = writeln!(
                    out,
                    "| {protocol} | {} | {:.0}/s | {label} | {} of {} | {} | {:.0} | {} | {} | {r50} | {r99} |",
                    rate.map_or("max".to_owned(), |r| format!("{r:.0}/s")),
                    run.publish_rate,
                    r.delivered,
                    run.published,
                    r.duplicates,
                    r.rate,
                    ratio(r.rate, run.raw.rate),
                    cells(s)
                );
            }
        }
    }
    out.push('\n');
    Ok(out)
}

async fn simulator(args: &Args) -> Result<String, BoxError> {
    let options = sim::SimOptions {
        trials: args.sim_trials,
        processes: args.sim_processes,
        duration: args.sim_duration,
        default_duration: args.sim_default_duration,
        probe_iterations: args.probe_draws.saturating_mul(1_000_000),
    };
    progress("sim: events per second");
    let runs = tokio::task::spawn_blocking(move || sim::measure(&options))
        .await
        .map_err(|e| format!("the simulator's thread failed: {e}"))??;
    let mut out = format!(
        "## Simulator\n\n`pgiplock_sim::run` (seed 1) on one thread, the scenarios of `pgiplock-sim bench`; before each \
         trial, the floor: a CPU probe of {} M SplitMix64 draws on the same thread (its rate shows how much of a \
         core the trial had). Load average before: {}.\n\n\
         | run | events | n | events/s median | min | max | probe M draws/s median | min | max | events per probe draw (median) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        args.probe_draws,
        load_average()
    );
    for run in &runs {
        let (e, p) = (Summary::of(&run.events_per_s), Summary::of(&run.probe_per_s));
        let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run.label,
            run.events,
            run.events_per_s.len(),
            e.map_or("–".into(), |s| fmt(s.median)),
            fmt(min(&run.events_per_s)),
            e.map_or("–".into(), |s| fmt(s.max)),
            p.map_or("–".into(), |s| fmt(s.median / 1e6)),
            fmt(min(&run.probe_per_s) / 1e6),
            p.map_or("–".into(), |s| fmt(s.max / 1e6)),
            match (e, p) {
                (Some(e), Some(p)) => format!("{:.4}", e.median / p.median),
                _ => "–".to_owned(),
            }
        );
    }
    out.push('\n');
    Ok(out)
}

async fn probe_only(args: &Args, url: &str) -> Result<String, BoxError> {
    let mut probe = probe::Probe::setup(url).await?;
    let samples = probe.trials(args.trials.max(1) * args.probes.max(1)).await?;
    Ok(format!(
        "## Floor probe\n\nA commits DELETE + NOTIFY; B, listening, commits an INSERT; from A's COMMIT to B's INSERT \
         done, milliseconds.\n\n| n | median | p90 | p99 | max |\n|---|---|---|---|---|\n| {} |\n\n",
        cells(Summary::of(&samples))
    ))
}

async fn bench(args: &Args, core: Option<memory::CoreBytes>) -> Result<(), BoxError> {
    let url = args.url();
    let emit = |section: String| {
        print!("{section}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    };
    emit(machine(&url).await);
    if args.measurement == Measurement::Probe {
        emit(probe_only(args, &url).await?);
    }
    if args.wants(Measurement::Handover) {
        emit(handover(args, &url).await?);
    }
    if args.wants(Measurement::Crash) {
        emit(crash(args, &url).await?);
    }
    if args.wants(Measurement::Idle) {
        emit(idle(args).await?);
    }
    if let Some(core) = core {
        emit(memory(args, &url, &core).await?);
    }
    if args.wants(Measurement::Scale) {
        emit(scale(args).await?);
    }
    if args.wants(Measurement::Throughput) {
        emit(throughput(args, &url).await?);
    }
    if args.wants(Measurement::Sim) {
        emit(simulator(args).await?);
    }
    emit(format!("Load average at the end: {}.\n", load_average()));
    Ok(())
}

async fn helper(args: &Args) -> Result<(), BoxError> {
    let url = args.url();
    let missing = |flag: &str| format!("--{flag} is required");
    match args.measurement {
        Measurement::RawListen => helpers::raw_listen(&url, args.channel.as_deref().ok_or(missing("channel"))?).await,
        _ => {
            helpers::hold_many(
                &url,
                args.schema.as_deref().ok_or(missing("schema"))?,
                args.channel_prefix.as_deref().ok_or(missing("channel-prefix"))?,
                args.channels,
                args.protocols.first().copied().unwrap_or(Protocol::Lease),
                args.expect_all,
            )
            .await
        }
    }
}

fn main() {
    let args = Args::parse();
    // Counted before the runtime exists, so that no other thread allocates meanwhile.
    let core = if args.wants(Measurement::Memory) {
        match memory::core_bytes(args.channels.max(1)) {
            Ok(core) => {
                progress(&format!("memory: core bytes per lock {core:?}"));
                Some(core)
            }
            Err(e) => {
                eprintln!("bench: counting the core's bytes: {e}");
                std::process::exit(1);
            }
        }
    } else {
        None
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start a runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        if matches!(args.measurement, Measurement::RawListen | Measurement::HoldMany) {
            return helper(&args).await;
        }
        // Everything that owns processes, schemas and clusters lives inside this future: when it
        // ends or is dropped on Ctrl-C, they are killed, dropped and stopped.
        tokio::select! {
            result = bench(&args, core) => result,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        }
    });
    drop(runtime);
    if let Err(e) = result {
        // tokio-postgres says only "db error" at the top: print the causes too.
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        eprintln!("bench: {text}");
        std::process::exit(1);
    }
}
