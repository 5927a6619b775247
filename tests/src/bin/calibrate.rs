//! Calibration of the simulator against reality: one scenario (10 processes on one channel,
//! acquire interval 1 s, lease ttl 3 s) measured in `pgiplock-sim` and with real
//! `pgiplock worker` processes on a throwaway PostgreSQL cluster, under both protocols:
//!
//! - graceful handover latency: SIGTERM to the holder → the next `acquired`;
//! - crash failover latency: SIGKILL to the holder → the next `acquired`;
//! - idle load: statements per second at the server for the 10 processes over 20 s.
//!
//! The simulator's latency model is set from the cluster's measured loopback round trip and
//! lock-statement time. Prints a markdown table on stdout, progress on stderr.
//!
//! ```text
//! cargo build --release -p pgiplock-cli
//! cargo run --release -p pgiplock-tests --bin calibrate
//! ```
//!
//! Env `CALIBRATE_REPEAT` (default 5): handovers and crashes per protocol in the real fleet.

use std::time::Duration;

use pgiplock::LockOptions;
use pgiplock_core::{ChannelName, DbOp, FenceToken, Protocol, SchemaName};
use pgiplock_sim::{FaultKind, FaultRates, FaultSpec, Scenario};
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
    idle: Vec<f64>,
}

// ----- simulator -----

fn sim_scenario(protocol: Protocol, latency: &Latency) -> Result<Scenario, BoxError> {
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
    s.query_max = s.query_max.max(latency.query_mean);
    s.warmup = Duration::from_secs(10);
    s.duration = s.warmup + IDLE_WINDOW;
    s.validate()?;
    Ok(s)
}

fn simulate(protocol: Protocol, latency: &Latency) -> Result<Measured, BoxError> {
    let base = sim_scenario(protocol, latency)?;
    let mut out = Measured {
        handover: Vec::new(),
        crash: Vec::new(),
        idle: Vec::new(),
    };
    for seed in 1..=SIM_SEEDS {
        let report = pgiplock_sim::run(&base, seed)?;
        out.idle.push(report.statements_per_s);
        for (kind, samples) in [(FaultKind::Stop, &mut out.handover), (FaultKind::Crash, &mut out.crash)] {
            let mut s = base.clone();
            // One fault on the holder, well after the start, with time to fail over.
            s.faults = vec![FaultSpec {
                at: Duration::from_secs(12),
                kind,
                process: None,
            }];
            s.duration = Duration::from_secs(20);
            let report = pgiplock_sim::run(&s, seed)?;
            match report.failover.get(kind.as_str()) {
                Some(stats) if stats.count > 0 => samples.push(Duration::from_secs_f64(stats.p50_s)),
                _ => progress(&format!("sim {protocol} seed {seed}: no failover after {kind}")),
            }
        }
    }
    Ok(out)
}

// ----- real workers -----

/// Sends SIGTERM (or SIGKILL) to the current holder and waits for another worker's `acquired`;
/// returns the latency, then starts a replacement so that the fleet stays at [`PROCESSES`].
///
/// `round` spreads the fault's phase against the standbys' retry timers: a fault right after
/// a replacement started would meet that newcomer's immediate first attempt, not the fleet's
/// steady state.
async fn fault_once(fleet: &mut Fleet, crash: bool, round: usize) -> Duration {
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
    Duration::from_micros(u64::try_from(t_acquired - t0).unwrap_or(0))
}

async fn measure_real(
    cluster: &TempCluster,
    counter: &Counter,
    protocol: Protocol,
    repeat: usize,
) -> Result<Measured, BoxError> {
    let mut opts =
        WorkerOpts::new(&cluster.url(), &unique_channel(), None, protocol).acquire_interval(ACQUIRE_INTERVAL);
    if protocol == Protocol::Lease {
        opts = opts.lease_ttl(LEASE_TTL);
    }
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
    let before = counter.read(&client).await?;
    let start = Instant::now();
    tokio::time::sleep(IDLE_WINDOW).await;
    let after = counter.read(&client).await?;
    let elapsed = start.elapsed().as_secs_f64();
    // Our own reads: the first one's transaction (statements are filtered out by their text).
    let own = match counter {
        Counter::Statements => 0,
        Counter::Transactions => 1,
    };
    let idle = (after - before - own) as f64 / elapsed;

    // Crashes first: a graceful release wakes every standby at once, which leaves their retry
    // timers in step for a while, and a crash soon after would meet that, not the steady state.
    let mut crash = Vec::new();
    for i in 0..repeat {
        let d = fault_once(&mut fleet, true, i).await;
        progress(&format!(
            "{protocol}: crash {}: {:.1} ms",
            i + 1,
            d.as_secs_f64() * 1000.0
        ));
        crash.push(d);
    }
    let mut handover = Vec::new();
    for i in 0..repeat {
        let d = fault_once(&mut fleet, false, i).await;
        progress(&format!(
            "{protocol}: handover {}: {:.1} ms",
            i + 1,
            d.as_secs_f64() * 1000.0
        ));
        handover.push(d);
    }
    fleet.assert_well_formed();
    fleet.shutdown(WAIT).await;
    Ok(Measured {
        handover,
        crash,
        idle: vec![idle],
    })
}

async fn calibrate(cluster: &TempCluster) -> Result<String, BoxError> {
    let repeat = std::env::var("CALIBRATE_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5usize);
    let counter = enable_statement_counting(cluster).await;
    let latency = measure_latency(cluster).await?;
    progress(&format!(
        "loopback: SELECT 1 round trip {:?}; lock statement server time p10 {:?}, median {:?}",
        latency.rtt, latency.query_min, latency.query_mean
    ));
    let mut rows = Vec::new();
    for protocol in PROTOCOLS {
        progress(&format!("{protocol}: simulating {SIM_SEEDS} seeds"));
        let sim = simulate(protocol, &latency)?;
        progress(&format!("{protocol}: real fleet of {PROCESSES} workers"));
        let real = measure_real(cluster, &counter, protocol, repeat).await?;
        rows.push((protocol, sim, real));
    }
    let mut out = String::new();
    out.push_str(&format!(
        "{PROCESSES} processes, acquire interval {}s, lease ttl {}s (Lease); loopback round trip {:.3} ms, \
         lock statement {:.3} ms at the server; latency in ms as median [min–max] (n = simulated seeds / \
         real repetitions; the simulator reports whole milliseconds); idle load over {}s, real statements counted as {}.\n\n",
        ACQUIRE_INTERVAL.as_secs(),
        LEASE_TTL.as_secs(),
        latency.rtt.as_secs_f64() * 1000.0,
        latency.query_mean.as_secs_f64() * 1000.0,
        IDLE_WINDOW.as_secs(),
        counter.source()
    ));
    out.push_str("| metric | protocol | sim | real |\n|---|---|---|---|\n");
    for (protocol, sim, real) in &rows {
        out.push_str(&format!(
            "| graceful handover latency, ms (SIGTERM → next acquired) | {protocol} | {} | {} |\n",
            describe(&sim.handover),
            describe(&real.handover)
        ));
        out.push_str(&format!(
            "| crash failover latency, ms (SIGKILL → next acquired) | {protocol} | {} | {} |\n",
            describe(&sim.crash),
            describe(&real.crash)
        ));
        out.push_str(&format!(
            "| idle load, statements/s ({PROCESSES} processes) | {protocol} | {} | {} |\n",
            describe_rate(&sim.idle),
            describe_rate(&real.idle)
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
