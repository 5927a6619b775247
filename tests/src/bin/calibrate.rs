//! Calibration of the simulator against reality: one scenario (10 processes on one channel,
//! acquire interval 1 s, lease ttl 3 s) measured in `pgiplock-sim` and with real
//! `pgiplock worker` processes on a throwaway PostgreSQL cluster, under both protocols:
//!
//! - graceful handover latency: SIGTERM to the holder → the next `acquired`, and the part of it
//!   from the holder's release statement leaving;
//! - crash failover latency: SIGKILL to the holder → the next `acquired`, and the part of it
//!   from the first attempt that leaves a standby after the SIGKILL (the whole spreads over a
//!   retry interval, the instant the next standby happens to retry; this part is the same
//!   quantity in both with no retry phase in it);
//! - idle load: statements per second at the server for the 10 processes over 20 s.
//!
//! The real parts come from the fleet workers' trace logs (the statements each hands to its
//! connection), the simulated ones from the recorded `Request`s: both are the instant the
//! statement leaves the process.
//!
//! The simulator's model is set from what is measured on the same machine first, not fitted:
//!
//! - the loopback round trip (`SELECT 1`) and a lock statement's time at the server;
//! - the CPU costs, from the scheduler's accounting (`/proc/<pid>/task/*/schedstat`, every
//!   thread) of Classic standbys and of their backends while our own session commits `NOTIFY`
//!   on their channels: a drain marker they ignore (the host CPU of one notification,
//!   `client_notify_cost`) and a `'1'`, which each answers with an attempt (the rest of the
//!   backend's cycle is `server_statement_cost`, the rest of the process's `client_reply_cost`);
//! - per protocol, from the fleet of the table itself (the simulation of a protocol runs after
//!   its real fleet): the execution time of the protocol's attempt statement
//!   (`pg_stat_statements` min, mean and max) as the simulation's `query_min`, `query_mean` and
//!   `query_max`, and, printed only, the CPU time of its ten backends over the idle window per
//!   statement counted (a Lease statement costs the server about as much CPU as a Classic one);
//! - the latencies, from the workers' own trace log (`pgiplock::driver=trace`, wall-clock
//!   timestamps in microseconds, one clock for every process of the host): a lone worker's
//!   SIGTERM → drain statement (`client_signal_cost`), its drain → release statement against
//!   the model, and the attempts of one and of nine standbys woken at once, rank by rank,
//!   against ceil(i / cores) × the CPU of a wake-up (`host_cores` = the machine's cores);
//! - `pg_stat_statements` per lock statement during the fleet runs.
//!
//! Then it prints a markdown table of sim, real and sim / real per row on stdout, progress on
//! stderr. The simulator's latencies come from its recorded events, to the microsecond.
//!
//! ```text
//! cargo build --release -p pgiplock-cli
//! cargo run --release -p pgiplock-tests --bin calibrate
//! ```
//!
//! Env `CALIBRATE_REPEAT` (default 20): handovers and crashes per protocol in the real fleet;
//! `CALIBRATE_TRIALS` (default 30): trials of each client-cost measurement;
//! `CALIBRATE_PARAMS_ONLY=1`: measure and print the parameters only.

use std::time::Duration;

use pgiplock::LockOptions;
use pgiplock_core::LockEvent;
use pgiplock_core::{ChannelName, DbOp, FenceToken, Protocol, SchemaName, SessionOp};
use pgiplock_sim::{FaultKind, FaultRates, FaultSpec, Observed, Scenario, World};
use pgiplock_testkit::cluster::TempCluster;
use pgiplock_testkit::sql::{bootstrap, execute, Target};
use pgiplock_tests::{ms, now_us, unique_channel, EventKind, Fleet, WorkerOpts, PROTOCOLS};
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

/// Fleet size.
const PROCESSES: usize = 10;
/// Standby retry bound of every process.
const ACQUIRE_INTERVAL: Duration = Duration::from_secs(1);
/// Lease length (Lease).
const LEASE_TTL: Duration = Duration::from_secs(3);
/// Idle-load measurement window.
const IDLE_WINDOW: Duration = Duration::from_secs(20);
/// Simulated runs (seeds) per metric.
const SIM_SEEDS: u64 = 50;
/// Bound on every wait for a worker event.
const WAIT: Duration = Duration::from_secs(30);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn progress(text: &str) {
    eprintln!("[calibrate] {text}");
}

/// The latency model measured on the cluster.
#[derive(Debug, Clone, Copy)]
struct Latency {
    /// Median round trip of `SELECT 1`.
    rtt: Duration,
    /// Server time of a lock statement beyond a trivial round trip: 10th percentile.
    query_min: Duration,
    /// The same, median.
    query_mean: Duration,
    /// The longest (`None`: the simulator's default).
    query_max: Option<Duration>,
}

/// How the load is counted at the server.
enum Counter {
    /// Top-level statements that completed, of every session but ours (`pg_stat_statements`),
    /// plus the statements that failed (`pg_stat_database.xact_rollback`: every failed
    /// statement of an autocommit session rolls its transaction back, e.g. Classic's "locked"
    /// attempts, which `pg_stat_statements` does not see).
    Statements,
    /// Committed and rolled-back transactions of the database (`pg_stat_database`).
    Transactions,
}

impl Counter {
    fn source(&self) -> &'static str {
        match self {
            Counter::Statements => "pg_stat_statements calls + pg_stat_database.xact_rollback",
            Counter::Transactions => "pg_stat_database.xact_commit + xact_rollback",
        }
    }

    /// The counter now. Backends flush their `pg_stat_database` counts at most once a second
    /// while active, so those lag by about a second at each end of a window.
    async fn read(&self, client: &Client) -> Result<i64, BoxError> {
        let sql = match self {
            Counter::Statements => {
                "SELECT (SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
                         WHERE query NOT LIKE '%pg_stat_statements%') \
                      + (SELECT xact_rollback FROM pg_catalog.pg_stat_database WHERE datname = current_database())"
            }
            Counter::Transactions => {
                "SELECT xact_commit + xact_rollback FROM pg_catalog.pg_stat_database \
                 WHERE datname = current_database()"
            }
        };
        Ok(client.query_one(sql, &[]).await?.get(0))
    }
}

async fn connect(config: &tokio_postgres::Config) -> Result<Client, BoxError> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        // Ends when the client is dropped; errors are the measurement's business, not ours.
        let _ = connection.await;
    });
    Ok(client)
}

/// Loads `pg_stat_statements` (a restart) when the server has it; otherwise counts
/// transactions.
async fn enable_statement_counting(cluster: &TempCluster) -> Counter {
    let attempt = async {
        let client = connect(&cluster.config()).await?;
        client
            .batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            .await?;
        drop(client);
        tokio::task::block_in_place(|| cluster.restart())?;
        let client = connect(&cluster.config()).await?;
        client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await?;
        Ok::<_, BoxError>(())
    };
    match attempt.await {
        Ok(()) => Counter::Statements,
        Err(e) => {
            progress(&format!(
                "pg_stat_statements unavailable ({e}); counting committed transactions"
            ));
            // The failed attempt may have left the setting behind: a restart would then fail.
            if let Ok(client) = connect(&cluster.config()).await {
                let _ = client
                    .batch_execute("ALTER SYSTEM RESET shared_preload_libraries")
                    .await;
            }
            Counter::Transactions
        }
    }
}

fn percentile(samples: &[Duration], q: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    if s.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// Measures the loopback round trip and the time of a Lease renewal statement.
async fn measure_latency(cluster: &TempCluster) -> Result<Latency, BoxError> {
    let client = connect(&cluster.config()).await?;
    let mut trivial = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        client.simple_query("SELECT 1").await?;
        trivial.push(t.elapsed());
    }
    let schema = SchemaName::new("calibrate_latency")?;
    bootstrap(&client, Protocol::Lease, &schema).await?;
    let target = Target {
        protocol: Protocol::Lease,
        schema,
        channel: ChannelName::new("calibrate_latency")?,
        app: "calibrate".to_owned(),
        lease_ttl: LEASE_TTL,
    };
    let mut lock_ops = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        execute(
            &client,
            &target,
            &DbOp::Renew {
                token: Some(FenceToken(1)),
                progress: None,
            },
        )
        .await?;
        lock_ops.push(t.elapsed());
    }
    client.batch_execute("DROP SCHEMA calibrate_latency CASCADE").await?;
    let rtt = percentile(&trivial, 0.5);
    let query_min = percentile(&lock_ops, 0.1).saturating_sub(rtt);
    let query_mean = percentile(&lock_ops, 0.5).saturating_sub(rtt).max(query_min);
    Ok(Latency {
        rtt,
        query_min,
        query_mean,
        query_max: None,
    })
}

/// Latency samples as `median [min–max]` in milliseconds.
fn describe(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "—".to_owned();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let digits = |x: f64| {
        if x < 100.0 {
            format!("{x:.1}")
        } else {
            format!("{x:.0}")
        }
    };
    format!(
        "{} [{}–{}] (n={})",
        digits(ms(percentile(samples, 0.5))),
        digits(ms(percentile(samples, 0.0))),
        digits(ms(percentile(samples, 1.0))),
        samples.len()
    )
}

fn describe_rate(samples: &[f64]) -> String {
    if samples.is_empty() {
        return "—".to_owned();
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let median = s[(s.len() - 1) / 2];
    if s.len() == 1 {
        format!("{median:.2}")
    } else {
        format!("{median:.2} [{:.2}–{:.2}] (n={})", s[0], s[s.len() - 1], s.len())
    }
}

/// One protocol's measurements.
struct Measured {
    handover: Vec<Duration>,
    crash: Vec<Duration>,
    /// Graceful handover from the old holder's release statement leaving to the acquisition.
    handover_release: Vec<Duration>,
    /// Crash failover from the first attempt that leaves after the crash to the acquisition.
    crash_attempt: Vec<Duration>,
    idle: Vec<f64>,
}

// ----- client costs, measured on the real workers -----

/// The client costs of the simulator's model, as measured (medians).
#[derive(Debug, Clone)]
struct Costs {
    /// A woken standby's process: CPU time per notification (and the attempt it makes).
    notify: Duration,
    /// A woken standby's backend: CPU time per statement (and the notification it delivers).
    statement: Duration,
    /// Per protocol (Classic, Lease): the drain's reply → the release statement leaving.
    reply: [Duration; 2],
    /// Per protocol: SIGTERM → the drain statement leaving.
    signal: [Duration; 2],
    /// The machine's cores.
    cores: usize,
    /// What the table's notes print: one line per measured quantity.
    lines: Vec<String>,
}

impl Costs {
    fn slot(protocol: Protocol) -> usize {
        usize::from(protocol == Protocol::Lease)
    }
    fn reply_of(&self, protocol: Protocol) -> Duration {
        self.reply[Costs::slot(protocol)]
    }
    fn signal_of(&self, protocol: Protocol) -> Duration {
        self.signal[Costs::slot(protocol)]
    }
}

/// What the worker's trace log says, with its wall-clock time in microseconds.
#[derive(Debug, Clone, PartialEq)]
enum LogKind {
    /// The session handed a statement to the connection (`request op="..."`).
    Request(String),
    Stopping,
    Drained,
    Released,
    Acquired,
}

/// The lines of a worker's stderr that the measurements use. The log format is
/// tracing-subscriber's: `2026-12-02T06:19:08.610263Z TRACE pgiplock::driver: request op="drain"`.
fn log_events(stderr: &str) -> Vec<(i64, LogKind)> {
    let mut out = Vec::new();
    for line in stderr.lines() {
        let Some((stamp, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(t) = humantime::parse_rfc3339(stamp) else {
            continue;
        };
        let Ok(since) = t.duration_since(std::time::UNIX_EPOCH) else {
            continue;
        };
        let t_us = i64::try_from(since.as_micros()).unwrap_or(i64::MAX);
        let Some((_, message)) = rest.split_once(": ") else {
            continue;
        };
        let kind = if let Some(op) = message.strip_prefix("request op=") {
            LogKind::Request(op.trim_matches('"').to_owned())
        } else if message.starts_with("worker stopping") {
            LogKind::Stopping
        } else if message.starts_with("lock drained") {
            LogKind::Drained
        } else if message.starts_with("lock released") {
            LogKind::Released
        } else if message.starts_with("lock acquired") {
            LogKind::Acquired
        } else {
            continue;
        };
        out.push((t_us, kind));
    }
    out
}

/// The first event `want` at or after `from_us`.
fn first_after(events: &[(i64, LogKind)], from_us: i64, want: &LogKind) -> Option<i64> {
    events.iter().find(|(t, k)| *t >= from_us && k == want).map(|(t, _)| *t)
}

fn us(d_us: i64) -> Duration {
    Duration::from_micros(u64::try_from(d_us).unwrap_or(0))
}

/// `median [p10–p90] (n)` in milliseconds, to the microsecond.
fn spread(samples: &[Duration]) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{:.3} ms [p10 {:.3} – p90 {:.3}] (n={})",
        ms(percentile(samples, 0.5)),
        ms(percentile(samples, 0.1)),
        ms(percentile(samples, 0.9)),
        samples.len()
    )
}

/// The log filter of the measuring workers: the driver's statements at trace level.
const MEASURE_LOG: &str = "pgiplock=info,pgiplock::driver=trace";

/// Whether the Lease processes, real and simulated alike, wait on the holder's session (the
/// crash watch). Off: the calibrated quantities (a standby's retries, its attempts after a
/// crash) are those of the polling path, and the model answers the watch's `gone` as soon as
/// the session ends where the server answers once the backend left `pg_stat_activity`.
const CRASH_WATCH: bool = false;

/// A lone worker, `trials` times: SIGTERM → drain statement, drain statement → release
/// statement (one reply handled in between), with nobody else woken.
async fn measure_lone(cluster: &TempCluster, protocol: Protocol, trials: usize) -> (Vec<Duration>, Vec<Duration>) {
    let mut signal = Vec::new();
    let mut drain_round = Vec::new();
    let mut opts =
        WorkerOpts::new(&cluster.url(), &unique_channel(), None, protocol).acquire_interval(ACQUIRE_INTERVAL);
    if protocol == Protocol::Lease {
        opts = opts.lease_ttl(LEASE_TTL);
        opts.extra_args
            .extend(["--crash-watch".to_owned(), CRASH_WATCH.to_string()]);
    }
    for _ in 0..trials {
        let mut fleet = Fleet::new(opts.clone());
        fleet.spawn();
        fleet.wait_holder(WAIT).await;
        // Idle, as a holder is when its signal comes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = now_us();
        fleet.worker(0).terminate();
        fleet.wait_exit(0, WAIT).await;
        let log = log_events(&fleet.worker(0).stderr());
        let drain = first_after(&log, t0, &LogKind::Request("drain".to_owned()));
        let release = drain.and_then(|d| first_after(&log, d, &LogKind::Request("release".to_owned())));
        if let (Some(d), Some(r)) = (drain, release) {
            signal.push(us(d - t0));
            drain_round.push(us(r - d));
        }
    }
    (signal, drain_round)
}

/// CPU time process `pid` has run so far, all its threads (`/proc/<pid>/task/*/schedstat`, the
/// scheduler's nanoseconds on a CPU); `None` off Linux or once it is gone.
fn cpu_time(pid: i32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ns = 0u64;
    for task in tasks.flatten() {
        let text = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        ns += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(Duration::from_nanos(ns))
}

/// What one woken standby cost, per trial: its latencies and the CPU time of its process and of
/// its server backend.
struct Fanout {
    /// Per trial, the standbys' latencies from the commit to their attempt, sorted.
    latencies: Vec<Vec<Duration>>,
    /// Per standby, its process's CPU time per trial.
    client_cpu: Vec<Duration>,
    /// Per standby, its backend's CPU time per trial.
    server_cpu: Vec<Duration>,
    /// The same two per notification that causes no statement (a drain marker from our session,
    /// which every standby ignores).
    client_cpu_quiet: Vec<Duration>,
    server_cpu_quiet: Vec<Duration>,
}

/// A Classic fleet of one holder and `standbys` standbys (retrying only every minute); `trials`
/// times our own session commits `NOTIFY` `'1'` on the lock channel, which every standby takes
/// for a release and answers with an attempt. Per trial, the standbys' latencies from the
/// commit (our reply less a one-way delay) to their attempt leaving, sorted.
async fn measure_fanout(
    cluster: &TempCluster,
    standbys: usize,
    trials: usize,
    rtt: Duration,
) -> Result<Fanout, BoxError> {
    let channel = unique_channel();
    let opts =
        WorkerOpts::new(&cluster.url(), &channel, None, Protocol::Classic).acquire_interval(Duration::from_secs(60));
    let mut fleet = Fleet::new(opts);
    for _ in 0..=standbys {
        fleet.spawn();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet.wait_all_ready(WAIT).await;
    let (holder, _, _) = fleet.wait_holder(WAIT).await;
    // Every standby's first attempt is over; the next comes in a minute.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client = connect(&cluster.config()).await?;
    // Each standby's process and its backend (by the application name it reported).
    let mut pids = Vec::new();
    for w in (0..=standbys).filter(|w| *w != holder) {
        let app = fleet.wait_ready(w, WAIT).await;
        let backend: i32 = client
            .query_one("SELECT pid FROM pg_stat_activity WHERE application_name = $1", &[&app])
            .await?
            .get(0);
        pids.push((fleet.worker(w).pid, backend));
    }
    let cpu = |pids: &[(i32, i32)]| -> Vec<(Option<Duration>, Option<Duration>)> {
        pids.iter().map(|(w, b)| (cpu_time(*w), cpu_time(*b))).collect()
    };
    let cpu_before = cpu(&pids);
    let lock_channel = ChannelName::new(&channel)?.lock_channel().to_owned();
    let sql = format!("NOTIFY \"{lock_channel}\", '1'");
    let one_way = i64::try_from(rtt.as_micros() / 2).unwrap_or(0);
    let mut commits = Vec::new();
    for _ in 0..trials {
        tokio::time::sleep(Duration::from_millis(250)).await;
        // The statement reaches the server one way later; its reply may come back to us after
        // the standbys (we compete for the same cores), so the reference is the sending.
        commits.push(now_us() + one_way);
        client.batch_execute(&sql).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu_after = cpu(&pids);
    let per_trial = |before: Option<Duration>, after: Option<Duration>| {
        after
            .zip(before)
            .map(|(a, b)| a.saturating_sub(b) / u32::try_from(trials.max(1)).unwrap_or(1))
    };
    let deltas = |before: &[(Option<Duration>, Option<Duration>)], after: &[(Option<Duration>, Option<Duration>)]| {
        let client: Vec<Duration> = before
            .iter()
            .zip(after)
            .filter_map(|(b, a)| per_trial(b.0, a.0))
            .collect();
        let server: Vec<Duration> = before
            .iter()
            .zip(after)
            .filter_map(|(b, a)| per_trial(b.1, a.1))
            .collect();
        (client, server)
    };
    let (client_cpu, server_cpu) = deltas(&cpu_before, &cpu_after);
    // The same number of notifications that cause nothing: a foreign drain marker.
    let drain_channel = ChannelName::new(&channel)?.drain_channel().to_owned();
    let quiet_sql = format!("NOTIFY \"{drain_channel}\", 'draining'");
    let quiet_before = cpu(&pids);
    for _ in 0..trials {
        tokio::time::sleep(Duration::from_millis(250)).await;
        client.batch_execute(&quiet_sql).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (client_cpu_quiet, server_cpu_quiet) = deltas(&quiet_before, &cpu(&pids));
    let logs: Vec<Vec<(i64, LogKind)>> = (0..=standbys)
        .filter(|w| *w != holder)
        .map(|w| log_events(&fleet.worker(w).stderr()))
        .collect();
    let acquire = LogKind::Request("acquire".to_owned());
    let mut out = Vec::new();
    for &commit in &commits {
        let mut latencies: Vec<Duration> = logs
            .iter()
            .filter_map(|log| first_after(log, commit - one_way, &acquire).filter(|t| t - commit < 200_000))
            .map(|t| us(t - commit))
            .collect();
        if latencies.len() == standbys {
            latencies.sort();
            out.push(latencies);
        }
    }
    fleet.shutdown(WAIT).await;
    Ok(Fanout {
        latencies: out,
        client_cpu,
        server_cpu,
        client_cpu_quiet,
        server_cpu_quiet,
    })
}

/// Measures the client costs (see the module's doc).
async fn measure_costs(cluster: &TempCluster, latency: &Latency, trials: usize) -> Result<Costs, BoxError> {
    // The measuring workers log their statements; the fleets of the table do not.
    std::env::set_var("PGIPLOCK_TEST_LOG", MEASURE_LOG);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut lines = Vec::new();
    let mut signal = [Duration::ZERO; 2];
    let mut reply = [Duration::ZERO; 2];
    progress(&format!("classic: one standby woken {trials} times"));
    let one = measure_fanout(cluster, 1, trials, latency.rtt).await?;
    let single: Vec<Duration> = one.latencies.iter().map(|l| l[0]).collect();
    progress(&format!("classic: nine standbys woken {trials} times"));
    let nine = measure_fanout(cluster, 9, trials, latency.rtt).await?;
    let all = |f: fn(&Fanout) -> &Vec<Duration>| -> Vec<Duration> { f(&one).iter().chain(f(&nine)).copied().collect() };
    let client_cycle = all(|f| &f.client_cpu);
    let server_cycle = all(|f| &f.server_cpu);
    let client_quiet = all(|f| &f.client_cpu_quiet);
    let server_quiet = all(|f| &f.server_cpu_quiet);
    // A notification costs the host its delivery by the backend and its handling by the
    // process; the attempt it causes costs the backend the rest of the cycle.
    let notify_samples: Vec<Duration> = client_quiet.iter().zip(&server_quiet).map(|(c, b)| *c + *b).collect();
    let statement_samples: Vec<Duration> = server_cycle
        .iter()
        .zip(&server_quiet)
        .map(|(cycle, quiet)| cycle.saturating_sub(*quiet))
        .collect();
    let reply_cpu: Vec<Duration> = client_cycle
        .iter()
        .zip(&client_quiet)
        .map(|(cycle, quiet)| cycle.saturating_sub(*quiet))
        .collect();
    let notify = percentile(&notify_samples, 0.5);
    let statement = percentile(&statement_samples, 0.5);
    lines.push(format!(
        "classic: CPU time per standby and wake-up (schedstat of every thread; per standby, over {trials} wake-ups): \
         an ignored notification: process {}, backend {}, together (client_notify_cost) {}",
        spread(&client_quiet),
        spread(&server_quiet),
        spread(&notify_samples)
    ));
    lines.push(format!(
        "classic: a notification answered with an attempt: process {}, backend {}; the attempt's statement at the backend (server_statement_cost) {}; its reply at the process {}",
        spread(&client_cycle),
        spread(&server_cycle),
        spread(&statement_samples),
        spread(&reply_cpu)
    ));
    lines.push(format!(
        "classic: notification → the one woken standby's attempt {}",
        spread(&single)
    ));
    let per_wake = notify + statement;
    let mut ranks = Vec::new();
    for i in 0..9 {
        let at_rank: Vec<Duration> = nine.latencies.iter().map(|l| l[i]).collect();
        // All the work of the standbys woken before it, on `cores`: ceil(i / cores) wake-ups.
        let model = per_wake * ((i as u32 + 1).div_ceil(cores as u32));
        ranks.push(format!(
            "{}: {:.2} ({:.2})",
            i + 1,
            percentile(&at_rank, 0.5).as_secs_f64() * 1000.0,
            model.as_secs_f64() * 1000.0
        ));
    }
    lines.push(format!(
        "classic: nine standbys woken at once on {cores} cores, median ms of the i-th attempt over {} trials \
         (in brackets ceil(i / cores) × (client_notify_cost + server_statement_cost)): {}",
        nine.latencies.len(),
        ranks.join(", ")
    ));
    // A lone worker: its signal's latency, and its drain round trip against what the model
    // makes of it (round trip, the statement's CPU and execution, the reply's CPU).
    let reply_cost = percentile(&reply_cpu, 0.5);
    let round = latency.rtt + statement + latency.query_mean + reply_cost;
    for protocol in PROTOCOLS {
        progress(&format!("{protocol}: a lone worker stopped {trials} times"));
        let (signals, rounds) = measure_lone(cluster, protocol, trials).await;
        signal[Costs::slot(protocol)] = percentile(&signals, 0.5);
        reply[Costs::slot(protocol)] = reply_cost;
        lines.push(format!(
            "{protocol}: a lone worker, SIGTERM → drain statement (client_signal_cost) {}",
            spread(&signals)
        ));
        lines.push(format!(
            "{protocol}: a lone worker, drain statement → release statement {} (the model: round trip + statement CPU + execution + reply CPU = {:.3} ms)",
            spread(&rounds),
            round.as_secs_f64() * 1000.0
        ));
    }
    std::env::remove_var("PGIPLOCK_TEST_LOG");
    Ok(Costs {
        notify,
        statement,
        reply,
        signal,
        cores,
        lines,
    })
}

/// `pg_stat_statements` of the lock statements since the last reset: calls and server time.
async fn statement_times(cluster: &TempCluster) -> Result<Vec<String>, BoxError> {
    let client = connect(&cluster.config()).await?;
    let rows = client
        .query(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 60), calls, mean_exec_time, min_exec_time, max_exec_time \
             FROM pg_stat_statements WHERE query ~* 'pgip_?lock' AND query !~* 'pg_stat_statements' AND calls >= 5 \
             ORDER BY calls DESC LIMIT 12",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let query: String = r.get(0);
            let calls: i64 = r.get(1);
            let (mean, min, max): (f64, f64, f64) = (r.get(2), r.get(3), r.get(4));
            format!("`{query}…` calls {calls}, server time mean {mean:.3} ms [{min:.3}–{max:.3}]")
        })
        .collect())
}

/// The execution time at the server of `protocol`'s attempt statement (`DbOp::Acquire`) since
/// the last reset of `pg_stat_statements`: min, mean and max (the statements that completed:
/// a Classic attempt that finds the lock taken fails and is not counted).
async fn attempt_time(
    cluster: &TempCluster,
    protocol: Protocol,
) -> Result<Option<(Duration, Duration, Duration)>, BoxError> {
    let pattern = match protocol {
        Protocol::Classic => "^INSERT INTO \\S+\\.lock AS l ",
        _ => "^SELECT acquired, token, remaining_us",
    };
    let client = connect(&cluster.config()).await?;
    let row = client
        .query_opt(
            "SELECT min_exec_time, mean_exec_time, max_exec_time, calls \
             FROM pg_stat_statements WHERE query ~ $1 ORDER BY calls DESC LIMIT 1",
            &[&pattern],
        )
        .await?;
    let ms = |v: f64| Duration::from_secs_f64(v.max(0.0) / 1000.0);
    Ok(row.and_then(|r| {
        let calls: i64 = r.get(3);
        (calls >= 5).then(|| (ms(r.get(0)), ms(r.get(1)), ms(r.get(2))))
    }))
}

// ----- simulator -----

fn sim_scenario(protocol: Protocol, latency: &Latency, costs: &Costs) -> Result<Scenario, BoxError> {
    let mut options = LockOptions::new().protocol(protocol).acquire_interval(ACQUIRE_INTERVAL);
    if protocol == Protocol::Lease {
        options = options.lease_ttl(LEASE_TTL);
    }
    // The same timings the worker derives from its flags.
    let config = options.to_config()?;
    let mut s = Scenario::default();
    s.protocol = protocol;
    s.processes = PROCESSES;
    s.acquire_interval = config.acquire_interval;
    s.retry_jitter = config.retry_jitter;
    s.lease_ttl = config.lease_ttl;
    s.renew_interval = Some(config.renew_interval);
    s.fence_margin = Some(config.fence_margin);
    s.request_timeout = config.request_timeout;
    s.publish_rate = 0.0;
    s.fault_rates = FaultRates::default();
    s.faults = Vec::new();
    s.restart_delay = Some(Duration::from_secs(2));
    s.net_delay = latency.rtt / 2;
    s.query_min = latency.query_min;
    s.query_mean = latency.query_mean;
    s.query_max = latency.query_max.unwrap_or(s.query_max).max(latency.query_mean);
    s.client_notify_cost = costs.notify;
    s.client_reply_cost = costs.reply_of(protocol);
    s.client_signal_cost = costs.signal_of(protocol);
    s.server_statement_cost = costs.statement;
    s.host_cores = costs.cores;
    s.crash_watch = CRASH_WATCH;
    s.warmup = Duration::from_secs(10);
    s.duration = s.warmup + IDLE_WINDOW;
    s.validate()?;
    Ok(s)
}

/// From the recorded events (the report rounds to milliseconds): the time from the fault to
/// the first acquisition after it, and from the first statement that leaves a process at or
/// after the fault (an attempt after a crash, the holder's release after a stop) to the first
/// acquisition after that statement.
fn sim_failover(s: &Scenario, seed: u64, fault_at: Duration) -> Result<(Option<Duration>, Option<Duration>), BoxError> {
    let mut world = World::new(s.clone(), seed)?;
    world.record();
    world.finish()?;
    let at = pgiplock_core::Timestamp::ZERO + fault_at;
    let obs = world.observations();
    let acquired_after = |from: pgiplock_core::Timestamp| {
        obs.iter()
            .find(|o| {
                o.at >= from
                    && matches!(
                        o.event,
                        Observed::Lock {
                            lock: 0,
                            event: LockEvent::Acquired { .. }
                        }
                    )
            })
            .map(|o| o.at.saturating_duration_since(from))
    };
    let stop = s.faults.iter().any(|f| f.kind == FaultKind::Stop);
    let statement = obs
        .iter()
        .find(|o| {
            o.at >= at
                && match &o.event {
                    Observed::Request(SessionOp::Lock { op, .. }) => {
                        if stop {
                            matches!(op, DbOp::Release { .. })
                        } else {
                            matches!(op, DbOp::Acquire)
                        }
                    }
                    _ => false,
                }
        })
        .map(|o| o.at);
    Ok((acquired_after(at), statement.and_then(acquired_after)))
}

fn simulate(protocol: Protocol, latency: &Latency, costs: &Costs) -> Result<Measured, BoxError> {
    let base = sim_scenario(protocol, latency, costs)?;
    let mut out = Measured {
        handover: Vec::new(),
        crash: Vec::new(),
        handover_release: Vec::new(),
        crash_attempt: Vec::new(),
        idle: Vec::new(),
    };
    for seed in 1..=SIM_SEEDS {
        let report = pgiplock_sim::run(&base, seed)?;
        out.idle.push(report.statements_per_s);
        for (kind, samples) in [(FaultKind::Stop, &mut out.handover), (FaultKind::Crash, &mut out.crash)] {
            let mut s = base.clone();
            // One fault on the holder, well after the start, with time to fail over.
            let at = Duration::from_secs(12);
            s.faults = vec![FaultSpec {
                at,
                kind,
                process: None,
            }];
            s.duration = Duration::from_secs(20);
            let (from_fault, from_attempt) = sim_failover(&s, seed, at)?;
            match from_fault {
                Some(latency) => samples.push(latency),
                None => progress(&format!("sim {protocol} seed {seed}: no failover after {kind}")),
            }
            match kind {
                FaultKind::Crash => out.crash_attempt.extend(from_attempt),
                _ => out.handover_release.extend(from_attempt),
            }
        }
    }
    Ok(out)
}

// ----- real workers -----

/// Sends SIGTERM (or SIGKILL) to the current holder and waits for another worker's `acquired`;
/// returns the latency and, from the workers' trace logs, the time to that `acquired` from the
/// first attempt that left another worker at or after a SIGKILL, or from the holder's release
/// statement after a SIGTERM; then starts a replacement so that the fleet stays at
/// [`PROCESSES`].
///
/// `round` spreads the fault's phase against the standbys' retry timers: a fault right after
/// a replacement started would meet that newcomer's immediate first attempt, not the fleet's
/// steady state.
async fn fault_once(fleet: &mut Fleet, crash: bool, round: usize) -> (Duration, Option<Duration>) {
    let phase = (round as f64 * 0.381_966).fract();
    tokio::time::sleep(ACQUIRE_INTERVAL * 2 + ACQUIRE_INTERVAL.mul_f64(phase)).await;
    let (holder, _, _) = fleet.wait_holder(WAIT).await;
    let t0 = now_us();
    if crash {
        fleet.worker(holder).kill();
    } else {
        fleet.worker(holder).terminate();
    }
    let (_, t_acquired, _) = fleet.wait_acquired_after(t0, &[holder], WAIT).await;
    fleet.wait_exit(holder, WAIT).await;
    let first_statement = if crash {
        let acquire = LogKind::Request("acquire".to_owned());
        fleet
            .workers()
            .iter()
            .filter(|w| w.index != holder)
            .filter_map(|w| first_after(&log_events(&w.stderr()), t0, &acquire))
            .min()
    } else {
        let release = LogKind::Request("release".to_owned());
        first_after(&log_events(&fleet.worker(holder).stderr()), t0, &release)
    }
    .filter(|t| *t <= t_acquired);
    if !crash {
        // Where the time goes: the old holder's release, then the standbys' race.
        let released = fleet
            .events()
            .iter()
            .find_map(|e| (e.worker == holder && e.t_us >= t0 && e.kind == EventKind::Released).then_some(e.t_us));
        if let Some(t_released) = released {
            progress(&format!(
                "  SIGTERM → released {:.1} ms, released → next acquired {:.1} ms",
                ms(t0, t_released),
                ms(t_released, t_acquired)
            ));
        }
    }
    let replacement = fleet.spawn();
    fleet.wait_ready(replacement, WAIT).await;
    (us(t_acquired - t0), first_statement.map(|t| us(t_acquired - t)))
}

async fn measure_real(
    cluster: &TempCluster,
    counter: &Counter,
    protocol: Protocol,
    repeat: usize,
) -> Result<(Measured, Option<Duration>), BoxError> {
    let mut opts =
        WorkerOpts::new(&cluster.url(), &unique_channel(), None, protocol).acquire_interval(ACQUIRE_INTERVAL);
    if protocol == Protocol::Lease {
        opts = opts.lease_ttl(LEASE_TTL);
        opts.extra_args
            .extend(["--crash-watch".to_owned(), CRASH_WATCH.to_string()]);
    }
    // The workers log their statements (the rows from the release and from the first attempt).
    std::env::set_var("PGIPLOCK_TEST_LOG", MEASURE_LOG);
    let mut fleet = Fleet::new(opts);
    // Staggered over one interval, as the simulator starts its processes: workers started at
    // the same instant would keep their retry timers close together for many intervals.
    for _ in 0..PROCESSES {
        fleet.spawn();
        tokio::time::sleep(ACQUIRE_INTERVAL / PROCESSES as u32).await;
    }
    fleet.wait_all_ready(WAIT).await;
    fleet.wait_holder(WAIT).await;
    // Let every standby fall into its steady retry rhythm.
    tokio::time::sleep(Duration::from_secs(3)).await;

    progress(&format!("{protocol}: idle load over {IDLE_WINDOW:?}"));
    let client = connect(&cluster.config()).await?;
    // The fleet's backends (by the application name each worker reported): their CPU time over
    // the idle window, per statement counted, printed next to the woken standbys' figure.
    let mut backends = Vec::new();
    for w in 0..PROCESSES {
        let app = fleet.wait_ready(w, WAIT).await;
        let pid: i32 = client
            .query_one("SELECT pid FROM pg_stat_activity WHERE application_name = $1", &[&app])
            .await?
            .get(0);
        backends.push(pid);
    }
    let backend_cpu = |pids: &[i32]| -> Option<Duration> { pids.iter().map(|p| cpu_time(*p)).sum() };
    let before = counter.read(&client).await?;
    let cpu_before = backend_cpu(&backends);
    let start = Instant::now();
    tokio::time::sleep(IDLE_WINDOW).await;
    let cpu_after = backend_cpu(&backends);
    let after = counter.read(&client).await?;
    let elapsed = start.elapsed().as_secs_f64();
    // Our own reads: the first one's transaction (statements are filtered out by their text).
    let own = match counter {
        Counter::Statements => 0,
        Counter::Transactions => 1,
    };
    let idle = (after - before - own) as f64 / elapsed;
    let statements = u32::try_from(after - before - own).unwrap_or(0);
    let statement_cpu = cpu_after
        .zip(cpu_before)
        .filter(|_| statements > 0)
        .map(|(a, b)| a.saturating_sub(b) / statements.max(1));

    // Crashes first: a graceful release wakes every standby at once, which leaves their retry
    // timers in step for a while, and a crash soon after would meet that, not the steady state.
    let mut crash = Vec::new();
    let mut crash_attempt = Vec::new();
    for i in 0..repeat {
        let (d, from_attempt) = fault_once(&mut fleet, true, i).await;
        progress(&format!(
            "{protocol}: crash {}: {:.1} ms (first attempt after it → acquired {})",
            i + 1,
            d.as_secs_f64() * 1000.0,
            from_attempt.map_or("—".to_owned(), |a| format!("{:.1} ms", a.as_secs_f64() * 1000.0))
        ));
        crash.push(d);
        crash_attempt.extend(from_attempt);
    }
    let mut handover = Vec::new();
    let mut handover_release = Vec::new();
    for i in 0..repeat {
        let (d, from_release) = fault_once(&mut fleet, false, i).await;
        handover_release.extend(from_release);
        progress(&format!(
            "{protocol}: handover {}: {:.1} ms",
            i + 1,
            d.as_secs_f64() * 1000.0
        ));
        handover.push(d);
    }
    fleet.assert_well_formed();
    fleet.shutdown(WAIT).await;
    std::env::remove_var("PGIPLOCK_TEST_LOG");
    Ok((
        Measured {
            handover,
            handover_release,
            crash,
            crash_attempt,
            idle: vec![idle],
        },
        statement_cpu,
    ))
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The ratio of two medians, as the table prints it.
fn ratio(sim: &[Duration], real: &[Duration]) -> String {
    let (s, r) = (percentile(sim, 0.5), percentile(real, 0.5));
    if sim.is_empty() || real.is_empty() || r.is_zero() {
        return "—".to_owned();
    }
    format!("{:.2}", s.as_secs_f64() / r.as_secs_f64())
}

fn rate_ratio(sim: &[f64], real: &[f64]) -> String {
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get((v.len().max(1) - 1) / 2).copied()
    };
    match (median(sim), median(real)) {
        (Some(s), Some(r)) if r > 0.0 => format!("{:.2}", s / r),
        _ => "—".to_owned(),
    }
}

async fn calibrate(cluster: &TempCluster) -> Result<String, BoxError> {
    let repeat = env_count("CALIBRATE_REPEAT", 20);
    let trials = env_count("CALIBRATE_TRIALS", 30);
    let counter = enable_statement_counting(cluster).await;
    let latency = measure_latency(cluster).await?;
    progress(&format!(
        "loopback: SELECT 1 round trip {:?}; lock statement server time p10 {:?}, median {:?}",
        latency.rtt, latency.query_min, latency.query_mean
    ));
    let costs = measure_costs(cluster, &latency, trials).await?;
    for line in &costs.lines {
        progress(line);
    }
    let mut params = String::new();
    params.push_str(&format!(
        "Measured parameters (median [p10 – p90]): loopback round trip {:.3} ms, lock statement {:.3} ms at the server, host cores {}.\n\n",
        latency.rtt.as_secs_f64() * 1000.0,
        latency.query_mean.as_secs_f64() * 1000.0,
        costs.cores
    ));
    for line in &costs.lines {
        params.push_str(&format!("- {line}\n"));
    }
    if std::env::var_os("CALIBRATE_PARAMS_ONLY").is_some() {
        return Ok(params);
    }
    let mut rows = Vec::new();
    let mut statements = Vec::new();
    let mut statement_costs = Vec::new();
    for protocol in PROTOCOLS {
        progress(&format!("{protocol}: real fleet of {PROCESSES} workers"));
        if matches!(counter, Counter::Statements) {
            let client = connect(&cluster.config()).await?;
            client.batch_execute("SELECT pg_stat_statements_reset()").await?;
        }
        let (real, statement_cpu) = measure_real(cluster, &counter, protocol, repeat).await?;
        if matches!(counter, Counter::Statements) {
            for line in statement_times(cluster).await? {
                statements.push(format!("{protocol}: {line}"));
            }
        }
        statement_costs.push(format!(
            "{protocol}: the fleet's backends over the idle window, CPU time per statement counted {}",
            statement_cpu.map_or("— (not readable)".to_owned(), |d| format!(
                "{:.3} ms",
                d.as_secs_f64() * 1000.0
            ))
        ));
        // The protocol's own attempt at the server, from the fleet run: its execution time.
        let mut latency = latency;
        if matches!(counter, Counter::Statements) {
            if let Some((min, mean, max)) = attempt_time(cluster, protocol).await? {
                latency.query_min = min;
                latency.query_mean = mean.max(min);
                latency.query_max = Some(max.max(mean));
                statement_costs.push(format!(
                    "{protocol}: the attempt's execution time at the server during the fleet run (pg_stat_statements min, mean, max: the simulation's query_min, query_mean, query_max) {:.3}, {:.3}, {:.3} ms",
                    min.as_secs_f64() * 1000.0,
                    mean.as_secs_f64() * 1000.0,
                    max.as_secs_f64() * 1000.0
                ));
            }
        }
        for line in &statement_costs[statement_costs.len().saturating_sub(2)..] {
            progress(line);
        }
        progress(&format!("{protocol}: simulating {SIM_SEEDS} seeds"));
        let sim = simulate(protocol, &latency, &costs)?;
        rows.push((protocol, sim, real));
    }
    for line in &statement_costs {
        params.push_str(&format!("- {line}\n"));
    }
    let mut out = params;
    out.push_str("\nLock statements at the server during the fleet runs (`pg_stat_statements`):\n\n");
    for line in &statements {
        out.push_str(&format!("- {line}\n"));
    }
    out.push_str(&format!(
        "\n{PROCESSES} processes, acquire interval {}s, lease ttl {}s (Lease); latency in ms as median [min–max] \
         (n = simulated seeds / real repetitions); idle load over {}s, real statements counted as {}.\n\n",
        ACQUIRE_INTERVAL.as_secs(),
        LEASE_TTL.as_secs(),
        IDLE_WINDOW.as_secs(),
        counter.source()
    ));
    out.push_str("| metric | protocol | sim | real | sim / real |\n|---|---|---|---|---|\n");
    for (protocol, sim, real) in &rows {
        out.push_str(&format!(
            "| graceful handover latency, ms (SIGTERM → next acquired) | {protocol} | {} | {} | {} |\n",
            describe(&sim.handover),
            describe(&real.handover),
            ratio(&sim.handover, &real.handover)
        ));
        out.push_str(&format!(
            "| graceful handover latency, ms (the holder's release statement → next acquired) | {protocol} | {} | {} | {} |\n",
            describe(&sim.handover_release),
            describe(&real.handover_release),
            ratio(&sim.handover_release, &real.handover_release)
        ));
        out.push_str(&format!(
            "| crash failover latency, ms (SIGKILL → next acquired) | {protocol} | {} | {} | {} |\n",
            describe(&sim.crash),
            describe(&real.crash),
            ratio(&sim.crash, &real.crash)
        ));
        out.push_str(&format!(
            "| crash failover latency, ms (first attempt after the SIGKILL → next acquired) | {protocol} | {} | {} | {} |\n",
            describe(&sim.crash_attempt),
            describe(&real.crash_attempt),
            ratio(&sim.crash_attempt, &real.crash_attempt)
        ));
        out.push_str(&format!(
            "| idle load, statements/s ({PROCESSES} processes) | {protocol} | {} | {} | {} |\n",
            describe_rate(&sim.idle),
            describe_rate(&real.idle),
            rate_ratio(&sim.idle, &real.idle)
        ));
    }
    Ok(out)
}

fn main() {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("calibrate: cannot start a runtime: {e}");
            std::process::exit(1);
        }
    };
    progress("starting a throwaway PostgreSQL cluster");
    let cluster = match TempCluster::start() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("calibrate: {e}");
            std::process::exit(1);
        }
    };
    progress(&format!("cluster on port {}", cluster.port()));
    // Everything that owns workers lives inside this future: when it ends (or is dropped on
    // Ctrl-C) the workers are killed; the cluster is dropped after it.
    let result = runtime.block_on(async {
        tokio::select! {
            result = calibrate(&cluster) => result,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        }
    });
    drop(runtime);
    drop(cluster);
    match result {
        Ok(table) => print!("{table}"),
        Err(e) => {
            eprintln!("calibrate: {e}");
            std::process::exit(1);
        }
    }
}
