//! Idle load read from the server: a throwaway cluster with `pg_stat_statements`, one holder
//! alone for a window, then the holder and `k` standbys for another; statements per second from
//! the `calls` deltas of the workers' database, and `pg_stat_database` commit and rollback
//! deltas (a statement that fails, such as Classic's refused "locked" attempt, is invisible to
//! `pg_stat_statements` but rolls its transaction back).

use std::collections::BTreeMap;
use std::time::Duration;

use pgiplock_testkit::cluster::TempCluster;
use pgiplock_tests::{forged_lease_marker, unique_channel, Fleet, Protocol, WorkerOpts};
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

use crate::{progress, BoxError};

/// The workers' database: the monitor connects to `postgres`, so none of its own statements or
/// transactions are counted.
const WORKER_DB: &str = "bench_idle";
// Windows open `--warmup` (12 s by default) after the last worker is ready: start-up
// statements stay out, and so do their transaction counts, which an idle backend reports
// within about ten seconds.
/// Bound on every wait for a worker event.
const WAIT: Duration = Duration::from_secs(60);

/// Server counters at one instant.
#[derive(Debug, Clone, Default)]
struct Counters {
    /// `pg_stat_statements.calls` by normalised query text (top-level statements that completed).
    calls: BTreeMap<String, i64>,
    commits: i64,
    rollbacks: i64,
}

impl Counters {
    async fn read(monitor: &Client) -> Result<Counters, BoxError> {
        let rows = monitor
            .query(
                "SELECT /* bench-monitor */ s.query, sum(s.calls)::bigint FROM pg_stat_statements s \
                 JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1 \
                 AND s.query NOT LIKE '%bench-forger%' GROUP BY s.query",
                &[&WORKER_DB],
            )
            .await?;
        let calls = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect();
        let row = monitor
            .query_one(
                "SELECT /* bench-monitor */ xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1",
                &[&WORKER_DB],
            )
            .await?;
        Ok(Counters {
            calls,
            commits: row.get(0),
            rollbacks: row.get(1),
        })
    }
}

/// Deltas over one window, per second.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Length of the window, seconds.
    pub seconds: f64,
    /// Completed statements per second by query text.
    pub calls_per_s: BTreeMap<String, f64>,
    /// Completed statements in the window.
    pub statements: i64,
    /// Committed transactions in the window.
    pub commits: i64,
    /// Rolled-back transactions in the window.
    pub rollbacks: i64,
}

impl Window {
    /// Completed plus failed statements per second (each failed statement of an autocommit
    /// session is one rollback).
    pub fn statements_per_s(&self) -> f64 {
        (self.statements + self.rollbacks) as f64 / self.seconds
    }
}

pub(crate) async fn window(monitor: &Client, length: Duration) -> Result<Window, BoxError> {
    // `pg_stat_statements` counts each statement as it ends; `pg_stat_database` learns a
    // backend's transactions when the backend flushes its counts (at most once a second, an
    // idle one within about ten), so commits and rollbacks may be off by the few transactions
    // at either end of the window.
    let before = Counters::read(monitor).await?;
    let start = Instant::now();
    tokio::time::sleep(length).await;
    let after = Counters::read(monitor).await?;
    let seconds = start.elapsed().as_secs_f64();
    let mut calls_per_s = BTreeMap::new();
    let mut statements = 0;
    for (query, calls) in &after.calls {
        let delta = calls - before.calls.get(query).copied().unwrap_or(0);
        if delta > 0 {
            statements += delta;
            calls_per_s.insert(query.clone(), delta as f64 / seconds);
        }
    }
    Ok(Window {
        seconds,
        calls_per_s,
        statements,
        commits: after.commits - before.commits,
        rollbacks: after.rollbacks - before.rollbacks,
    })
}

/// One protocol's windows: the holder alone, then the holder with the standbys.
#[derive(Debug)]
pub struct Load {
    /// Standbys in the second window.
    pub standbys: usize,
    /// The holder alone.
    pub holder: Window,
    /// The holder and the standbys.
    pub fleet: Window,
    /// The holder and the standbys while a foreign session forges lock-channel markers.
    pub forged: Window,
    /// Markers the forger sent in that window.
    pub forged_sent: u64,
}

impl Load {
    /// The holder's statements per second.
    pub fn holder_rate(&self) -> f64 {
        self.holder.statements_per_s()
    }

    /// Each standby's statements per second: the second window less the holder's, shared out.
    pub fn standby_rate(&self) -> f64 {
        (self.fleet.statements_per_s() - self.holder_rate()) / self.standbys.max(1) as f64
    }
}

/// How often the forger sends a marker.
const FORGE_EVERY: Duration = Duration::from_millis(40);

/// Forges lock-channel markers from a session of its own (in the `postgres` database, so that
/// its statements are not counted; notifications do not cross databases, so it sends them
/// from the workers' database over a second connection whose statements are excluded by their
/// text) until stopped; returns how many it sent. The mix: `draining`, `released`, `acquired`
/// and `progress` of the current term, and `draining` and `acquired` of a far newer one (Lease);
/// under Classic the lock channel's `'1'` is the protocol itself, so it forges only the drain
/// channel's `draining`.
async fn forge(
    mut config: tokio_postgres::Config,
    protocol: Protocol,
    channel: String,
    stop: tokio_util::sync::CancellationToken,
) -> Result<u64, BoxError> {
    config.dbname(WORKER_DB);
    let client = connect(&config).await?;
    let lock_channel = format!("__PgIpLock__:{channel}");
    let drain_channel = format!("__PgIpDrain_:{channel}");
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(FORGE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(sent),
            _ = tick.tick() => {}
        }
        let (on, payload) = match protocol {
            Protocol::Lease => {
                let token: i64 = client
                    .query_opt(
                        "SELECT /* bench-forger */ token FROM pgiplock_lease.lease WHERE channel = $1",
                        &[&channel],
                    )
                    .await?
                    .map_or(0, |row| row.get(0));
                (lock_channel.as_str(), forged_lease_marker(sent, token))
            }
            _ => (drain_channel.as_str(), "draining".to_owned()),
        };
        client
            .execute("SELECT /* bench-forger */ pg_notify($1, $2)", &[&on, &payload])
            .await?;
        sent += 1;
    }
}

/// A throwaway cluster with `pg_stat_statements` loaded and the workers' database created.
pub struct Server {
    cluster: TempCluster,
    pub(crate) monitor: Client,
}

async fn connect(config: &tokio_postgres::Config) -> Result<Client, BoxError> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl Server {
    /// Starts the cluster and loads the extension (one restart).
    pub async fn start() -> Result<Server, BoxError> {
        let control = std::fs::read_dir("/usr/share/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .any(|v| v.path().join("extension/pg_stat_statements.control").is_file());
        if !control {
            progress("pg_stat_statements.control not found under /usr/share/postgresql/*/extension; trying anyway");
        }
        let cluster = tokio::task::block_in_place(TempCluster::start)?;
        let client = connect(&cluster.config()).await?;
        client
            .batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            .await?;
        drop(client);
        tokio::task::block_in_place(|| cluster.restart())?;
        let monitor = connect(&cluster.config()).await?;
        monitor
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await?;
        // Apart: CREATE DATABASE cannot run in the implicit transaction of a multi-statement batch.
        monitor.batch_execute(&format!("CREATE DATABASE {WORKER_DB}")).await?;
        Ok(Server { cluster, monitor })
    }

    pub(crate) fn worker_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{WORKER_DB}", self.cluster.port())
    }

    /// The server's `version()`.
    pub async fn version(&self) -> Result<String, BoxError> {
        Ok(self.monitor.query_one("SELECT version()", &[]).await?.get(0))
    }

    /// Measures `protocol` at its default settings over two windows of `length`, each opened
    /// `warmup` after the workers are ready.
    pub async fn measure(
        &self,
        protocol: Protocol,
        standbys: usize,
        length: Duration,
        warmup: Duration,
    ) -> Result<Load, BoxError> {
        let opts = WorkerOpts::new(&self.worker_url(), &unique_channel(), None, protocol);
        let mut fleet = Fleet::new(opts);
        let holder = fleet.spawn();
        fleet.wait_ready(holder, WAIT).await;
        fleet.wait_holder(WAIT).await;
        tokio::time::sleep(warmup).await;
        progress(&format!("  {protocol}: the holder alone for {length:?}"));
        let alone = window(&self.monitor, length).await?;
        fleet.spawn_many(standbys);
        fleet.wait_all_ready(WAIT).await;
        tokio::time::sleep(warmup).await;
        progress(&format!(
            "  {protocol}: the holder and {standbys} standbys for {length:?}"
        ));
        let with_standbys = window(&self.monitor, length).await?;
        progress(&format!(
            "  {protocol}: the holder and {standbys} standbys for {length:?}, a forger sending markers every {FORGE_EVERY:?}"
        ));
        let channel = fleet.base().channel.clone();
        let stop = tokio_util::sync::CancellationToken::new();
        let forger = tokio::spawn(forge(self.cluster.config(), protocol, channel, stop.clone()));
        tokio::time::sleep(warmup).await;
        let forged = window(&self.monitor, length).await?;
        stop.cancel();
        let forged_sent = forger.await??;
        fleet.assert_well_formed();
        fleet.shutdown(WAIT).await;
        Ok(Load {
            standbys,
            holder: alone,
            fleet: with_standbys,
            forged,
            forged_sent,
        })
    }
}
