//! A throwaway primary with one streaming replica, for failover tests: crash the primary,
//! promote the replica, or promote it while the primary stays up (a partition).
//!
//! The replica is a `pg_basebackup -R` copy of the primary on its own free loopback port, in a
//! directory of its own; both are [`TempCluster`]s, stopped and removed on drop (also when a test
//! fails). In [`ReplicationMode::Sync`] the primary waits for the replica at every commit
//! (`synchronous_standby_names = '*'`, `synchronous_commit = on`); in
//! [`ReplicationMode::Async`] it does not (and `synchronous_commit` stays off, as on every
//! throwaway cluster), so whatever the replica had not received when the primary crashed is
//! lost at promotion.
//!
//! ```no_run
//! # fn main() -> Result<(), pgiplock_testkit::cluster::ClusterError> {
//! use pgiplock_testkit::replica::{ReplicaPair, ReplicationMode};
//! let pair = ReplicaPair::start(ReplicationMode::Async)?;
//! println!("workers connect to {}", pair.url()); // both hosts, target_session_attrs=read-write
//! pair.crash_primary()?;
//! pair.promote()?; // the replica is the writable primary now, on timeline 2
//! assert_eq!(pair.timeline(pair.standby())?, 2);
//! # Ok(())
//! # }
//! ```

use std::ffi::OsString;
use std::time::{Duration, Instant};

use crate::cluster::{ClusterError, TempCluster};
use crate::proxy::BlackholeProxy;

/// Bound of every wait of the pair for a replication state.
const STATE_WAIT: Duration = Duration::from_secs(30);
/// Pause between two checks of a replication state.
const POLL: Duration = Duration::from_millis(50);

/// Whether the primary waits for the replica at commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationMode {
    /// The primary commits without waiting: a crash loses what the replica had not received.
    Async,
    /// Every commit waits until the replica flushed it (`synchronous_standby_names = '*'`).
    Sync,
}

impl ReplicationMode {
    /// `"async"` or `"sync"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationMode::Async => "async",
            ReplicationMode::Sync => "sync",
        }
    }
}

/// Options of a [`ReplicaPair`] beyond its mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaOptions {
    /// Route the replication connection through a [`BlackholeProxy`] that holds everything it
    /// forwards for this long, each direction: an asynchronous replica then lags the primary by
    /// about this much (a synchronous primary's commits wait about twice as long).
    pub replication_delay: Option<Duration>,
}

/// A primary and its streaming replica; see the [module documentation](self).
#[derive(Debug)]
pub struct ReplicaPair {
    primary: TempCluster,
    standby: TempCluster,
    mode: ReplicationMode,
    /// The replica's `primary_conninfo`: as `pg_basebackup -R` wrote it, or through the link.
    conninfo: String,
    /// The delaying proxy on the replication connection, if any.
    link: Option<DelayedLink>,
}

/// A [`BlackholeProxy`] with a delay on a thread of its own with its own runtime, so that the
/// blocking pair can own it and drop it from anywhere (also inside a test's runtime).
#[derive(Debug)]
struct DelayedLink {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DelayedLink {
    fn start(target: std::net::SocketAddr, delay: Duration) -> Result<DelayedLink, ClusterError> {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("replication-link".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = addr_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match BlackholeProxy::start_delayed(target, delay).await {
                        Ok(proxy) => {
                            let _ = addr_tx.send(Ok(proxy.addr()));
                            // Until the pair drops the link (or drops it without a word).
                            let _ = stopped.await;
                            drop(proxy);
                        }
                        Err(e) => {
                            let _ = addr_tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(|e| ClusterError::io("starting the replication link's thread", e))?;
        let addr = addr_rx
            .recv_timeout(STATE_WAIT)
            .map_err(|e| {
                ClusterError::io(
                    "starting the replication link",
                    std::io::Error::new(std::io::ErrorKind::TimedOut, e.to_string()),
                )
            })?
            .map_err(|e| ClusterError::io("starting the replication link", e))?;
        Ok(DelayedLink {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for DelayedLink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl ReplicaPair {
    /// Starts a primary, copies it with `pg_basebackup -R` into a replica on another free port,
    /// starts the replica and waits (at most 30 s) until it streams, and in sync mode until the
    /// primary counts it as its synchronous standby.
    pub fn start(mode: ReplicationMode) -> Result<ReplicaPair, ClusterError> {
        Self::start_with(mode, ReplicaOptions::default())
    }

    /// As [`start`](Self::start), with `options`; with a replication delay the replica streams
    /// through the delaying link before this returns.
    pub fn start_with(mode: ReplicationMode, options: ReplicaOptions) -> Result<ReplicaPair, ClusterError> {
        let primary = TempCluster::start()?;
        let mut standby = TempCluster::create_empty()?;
        let data = standby.data_dir().to_path_buf();
        let port = primary.port().to_string();
        let args: Vec<OsString> = vec![
            "-D".into(),
            data.into(),
            "-R".into(),
            "-X".into(),
            "stream".into(),
            "-c".into(),
            "fast".into(),
            "--no-sync".into(),
            "-h".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.into(),
            "-U".into(),
            "postgres".into(),
        ];
        primary.run_tool("pg_basebackup", &args)?;
        standby.start_on_free_port()?;
        let conninfo = query(&standby, "SHOW primary_conninfo")?;
        let mut pair = ReplicaPair {
            primary,
            standby,
            mode,
            conninfo,
            link: None,
        };
        pair.wait_for(&pair.primary, "the replica to stream", STREAMING, "1")?;
        if let Some(delay) = options.replication_delay {
            let target = std::net::SocketAddr::from(([127, 0, 0, 1], pair.primary.port()));
            let link = DelayedLink::start(target, delay)?;
            let direct = format!("port={}", pair.primary.port());
            if !pair.conninfo.contains(&direct) {
                return Err(ClusterError::Command {
                    command: "SHOW primary_conninfo".to_owned(),
                    status: format!("no {direct} to route through the link"),
                    output: pair.conninfo.clone(),
                });
            }
            pair.conninfo = pair.conninfo.replace(&direct, &format!("port={}", link.addr.port()));
            let port = link.addr.port();
            pair.link = Some(link);
            pair.set_conninfo()?;
            // The wal receiver restarts with the new conninfo: wait until it streams from the link.
            pair.wait_for(
                &pair.standby,
                "the replica to stream through the delaying link",
                &format!(
                    "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming' AND sender_port = {port}"
                ),
                "1",
            )?;
            pair.wait_for(&pair.primary, "the replica to stream", STREAMING, "1")?;
        }
        if mode == ReplicationMode::Sync {
            query(&pair.primary, "ALTER SYSTEM SET synchronous_standby_names = '*'")?;
            query(&pair.primary, "ALTER SYSTEM SET synchronous_commit = 'on'")?;
            query(&pair.primary, "SELECT pg_reload_conf()")?;
            pair.wait_for(
                &pair.primary,
                "the replica to become the synchronous standby",
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                "1",
            )?;
        }
        Ok(pair)
    }

    /// The replication mode.
    pub fn mode(&self) -> ReplicationMode {
        self.mode
    }

    /// The primary (a replica again never: once promoted away it stays a lone primary).
    pub fn primary(&self) -> &TempCluster {
        &self.primary
    }

    /// The replica (the writable primary after [`promote`](Self::promote)).
    pub fn standby(&self) -> &TempCluster {
        &self.standby
    }

    /// Both hosts, the primary first, with `target_session_attrs=read-write`: a client finds the
    /// writable one.
    pub fn url(&self) -> String {
        format!("{}?target_session_attrs=read-write", self.url_any())
    }

    /// Both hosts, the primary first, without `target_session_attrs`.
    pub fn url_any(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
            self.primary.port(),
            self.standby.port()
        )
    }

    /// Crashes the primary (`pg_ctl stop -m immediate`).
    pub fn crash_primary(&self) -> Result<(), ClusterError> {
        self.primary.crash()
    }

    /// Promotes the replica (`pg_ctl promote`) and waits (at most 30 s) until it accepts writes.
    /// The primary is left as it is: up (a partition: two writable servers) or crashed.
    pub fn promote(&self) -> Result<(), ClusterError> {
        self.standby.control(&["promote"])?;
        self.wait_for(
            &self.standby,
            "the promoted replica to leave recovery",
            "SELECT pg_is_in_recovery()",
            "f",
        )
    }

    /// Stops replication (the replica's `primary_conninfo` is emptied): from now on the primary
    /// commits what the replica never sees, the tail a crash then loses (async mode; in sync
    /// mode commits wait). Waits until the primary has no replication connection.
    pub fn pause_replication(&self) -> Result<(), ClusterError> {
        query(&self.standby, "ALTER SYSTEM SET primary_conninfo = ''")?;
        query(&self.standby, "SELECT pg_reload_conf()")?;
        self.wait_for(&self.primary, "replication to stop", STREAMING, "0")
    }

    /// Resumes replication after [`pause_replication`](Self::pause_replication) and waits until
    /// the replica streams again.
    pub fn resume_replication(&self) -> Result<(), ClusterError> {
        self.set_conninfo()?;
        self.wait_for(&self.primary, "the replica to stream again", STREAMING, "1")
    }

    /// The port of the delaying link on the replication connection, if the pair has one.
    pub fn link_port(&self) -> Option<u16> {
        self.link.as_ref().map(|link| link.addr.port())
    }

    /// Sets the replica's `primary_conninfo` to the pair's and reloads.
    fn set_conninfo(&self) -> Result<(), ClusterError> {
        let conninfo = self.conninfo.replace('\'', "''");
        query(
            &self.standby,
            &format!("ALTER SYSTEM SET primary_conninfo = '{conninfo}'"),
        )?;
        query(&self.standby, "SELECT pg_reload_conf()").map(|_| ())
    }

    /// Waits (at most 30 s) until the replica has replayed everything the primary wrote so far.
    pub fn wait_caught_up(&self) -> Result<(), ClusterError> {
        // The insert position: with synchronous_commit off the write position lags the last commit.
        let lsn = query(&self.primary, "SELECT pg_current_wal_insert_lsn()")?;
        self.wait_for(
            &self.standby,
            "the replica to catch up",
            &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"),
            "t",
        )
    }

    /// The timeline `cluster` writes on (it must not be in recovery): the first eight hex digits
    /// of its current WAL file's name.
    pub fn timeline(&self, cluster: &TempCluster) -> Result<u32, ClusterError> {
        let name = query(cluster, "SELECT pg_walfile_name(pg_current_wal_lsn())")?;
        name.get(..8)
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .ok_or_else(|| ClusterError::Command {
                command: "SELECT pg_walfile_name(pg_current_wal_lsn())".to_owned(),
                status: "unexpected answer".to_owned(),
                output: name.clone(),
            })
    }

    /// Runs one statement on `cluster` with `psql` and returns its unaligned output.
    pub fn query(&self, cluster: &TempCluster, sql: &str) -> Result<String, ClusterError> {
        query(cluster, sql)
    }

    // The pair waits on the wall clock like any test tool; the ban is for core and sim.
    #[allow(clippy::disallowed_methods)]
    fn wait_for(&self, cluster: &TempCluster, what: &str, sql: &str, expected: &str) -> Result<(), ClusterError> {
        let deadline = Instant::now() + STATE_WAIT;
        loop {
            let last = query(cluster, sql);
            match &last {
                Ok(answer) if answer == expected => return Ok(()),
                _ if Instant::now() >= deadline => {
                    return Err(ClusterError::Command {
                        command: sql.to_owned(),
                        status: format!("waited {STATE_WAIT:?} for {what}"),
                        output: match last {
                            Ok(answer) => format!("last answer {answer:?}, expected {expected:?}"),
                            Err(e) => e.to_string(),
                        },
                    })
                }
                _ => std::thread::sleep(POLL),
            }
        }
    }
}

const STREAMING: &str = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'";

fn query(cluster: &TempCluster, sql: &str) -> Result<String, ClusterError> {
    let args: Vec<OsString> = [
        "-X",
        "-A",
        "-t",
        "-q",
        "-h",
        "127.0.0.1",
        "-p",
        &cluster.port().to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-c",
        sql,
    ]
    .iter()
    .map(OsString::from)
    .collect();
    cluster.run_tool("psql", &args).map(|out| out.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(mode: ReplicationMode) -> Option<ReplicaPair> {
        match ReplicaPair::start(mode) {
            Ok(pair) => Some(pair),
            Err(ClusterError::BinariesNotFound) => {
                eprintln!("skipped: {}", ClusterError::BinariesNotFound);
                None
            }
            Err(e) => panic!("starting a replica pair: {e}"),
        }
    }

    #[test]
    fn async_pair_replicates_loses_the_unreplicated_tail_at_a_crash_and_promotes_to_a_new_timeline() {
        let Some(pair) = start(ReplicationMode::Async) else {
            return;
        };
        assert_eq!(query(pair.standby(), "SELECT pg_is_in_recovery()").unwrap(), "t");
        query(pair.primary(), "CREATE TABLE t (n int); INSERT INTO t VALUES (1)").unwrap();
        pair.wait_caught_up().unwrap();
        assert_eq!(query(pair.standby(), "SELECT count(*) FROM t").unwrap(), "1");
        pair.pause_replication().unwrap();
        query(pair.primary(), "INSERT INTO t VALUES (2)").unwrap();
        pair.crash_primary().unwrap();
        pair.promote().unwrap();
        assert_eq!(pair.timeline(pair.standby()).unwrap(), 2);
        // The row committed while replication was paused is gone with the primary.
        assert_eq!(query(pair.standby(), "SELECT count(*) FROM t").unwrap(), "1");
        let (primary, standby) = (pair.primary().dir().to_path_buf(), pair.standby().dir().to_path_buf());
        drop(pair);
        assert!(!primary.exists() && !standby.exists(), "directories left behind");
    }

    #[test]
    fn async_pair_streams_through_a_delaying_link_and_promotes() {
        let delayed = ReplicaOptions {
            replication_delay: Some(Duration::from_millis(200)),
        };
        let pair = match ReplicaPair::start_with(ReplicationMode::Async, delayed) {
            Ok(pair) => pair,
            Err(ClusterError::BinariesNotFound) => return eprintln!("skipped: {}", ClusterError::BinariesNotFound),
            Err(e) => panic!("starting a delayed replica pair: {e}"),
        };
        let port = pair.link_port().expect("a link");
        assert_eq!(
            query(pair.standby(), "SELECT sender_port FROM pg_stat_wal_receiver").unwrap(),
            port.to_string(),
            "the replica streams from the link"
        );
        query(pair.primary(), "CREATE TABLE t (n int); INSERT INTO t VALUES (1)").unwrap();
        pair.wait_caught_up().unwrap();
        assert_eq!(query(pair.standby(), "SELECT count(*) FROM t").unwrap(), "1");
        pair.pause_replication().unwrap();
        pair.resume_replication().unwrap();
        assert_eq!(
            query(pair.standby(), "SELECT sender_port FROM pg_stat_wal_receiver").unwrap(),
            port.to_string(),
            "resumed through the link"
        );
        pair.crash_primary().unwrap();
        pair.promote().unwrap();
        assert_eq!(pair.timeline(pair.standby()).unwrap(), 2);
    }

    #[test]
    fn sync_pair_keeps_every_commit_and_promotion_leaves_the_old_primary_up() {
        let Some(pair) = start(ReplicationMode::Sync) else {
            return;
        };
        query(pair.primary(), "CREATE TABLE t (n int); INSERT INTO t VALUES (1)").unwrap();
        // Acknowledged by the replica before the commit returned.
        assert_eq!(query(pair.standby(), "SELECT count(*) FROM t").unwrap(), "1");
        pair.promote().unwrap();
        assert_eq!(pair.timeline(pair.standby()).unwrap(), 2);
        assert_eq!(pair.timeline(pair.primary()).unwrap(), 1);
        assert_eq!(query(pair.primary(), "SELECT pg_is_in_recovery()").unwrap(), "f");
        assert!(pair.url().contains("target_session_attrs=read-write"));
    }
}
