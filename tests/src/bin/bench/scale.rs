//! Many channels in one process: for each channel count, one `hold-many` process taking every
//! channel, then a second one waiting on the same channels, on the throwaway cluster of the idle
//! load (`pg_stat_statements`). Measured: statements per second at the server of the holder
//! alone and of the standby process (the second window less the first), the time from the
//! holder's start until it held every channel, and the resident set of both processes.

use std::time::Duration;

use pgiplock_tests::{unique_hex, Fleet, Protocol, WorkerOpts};
use tokio::process::Command;

use crate::idle::{window, Server, Window};
use crate::memory::{rss_of, Rss};
use crate::{progress, BoxError};

/// Bound on waits for the processes (ten thousand locks take a while before batching).
const WAIT: Duration = Duration::from_secs(300);

/// One channel count's figures.
#[derive(Debug)]
pub struct Scale {
    /// Channels per process.
    pub channels: usize,
    /// From the holder process's start to every channel held, milliseconds; what it printed
    /// instead when it did not hold them all in time.
    pub held: Result<f64, String>,
    /// The holder alone.
    pub holder: Window,
    /// The holder and the standby process.
    pub both: Window,
    /// Resident set of the holder process, after its window.
    pub holder_rss: Rss,
    /// Resident set of the standby process, after the second window.
    pub standby_rss: Rss,
}

impl Scale {
    /// The holder's statements per second.
    pub fn holder_rate(&self) -> f64 {
        self.holder.statements_per_s()
    }

    /// The standby process's statements per second.
    pub fn standby_rate(&self) -> f64 {
        self.both.statements_per_s() - self.holder_rate()
    }
}

/// `held <k> of <n> in <ms> ms` from a `hold-many` process's report; the line itself when it
/// says something else (not all held).
fn held_ms(report: &str) -> Result<f64, String> {
    let line = report
        .lines()
        .rev()
        .find(|l| l.starts_with("held "))
        .ok_or_else(|| format!("no `held` line: {report}"))?;
    line.split(" in ")
        .nth(1)
        .and_then(|ms| ms.trim_end_matches(" ms").trim().parse().ok())
        .ok_or_else(|| line.to_owned())
}

/// Measures `channels` channels on `server`: the holder alone, then with the standby, each
/// window of `length` opened `warmup` after set-up (start-up statements stay out of it).
pub async fn measure(server: &Server, channels: usize, length: Duration, warmup: Duration) -> Result<Scale, BoxError> {
    let url = server.worker_url();
    let schema = format!("bench_scale_{}", unique_hex());
    let prefix = format!("s{}_", unique_hex());
    let command = |expect_all: bool| -> Result<Command, BoxError> {
        let mut c = Command::new(std::env::current_exe()?);
        c.args(["hold-many", "--database-url", &url, "--schema", &schema])
            .args(["--channel-prefix", &prefix, "--channels", &channels.to_string()]);
        if expect_all {
            c.arg("--expect-all");
        }
        Ok(c)
    };
    let mut fleet = Fleet::new(WorkerOpts::new(&url, &prefix, Some(&schema), Protocol::Lease));
    let holder = fleet.spawn_command(command(true)?);
    fleet.wait_ready(holder, WAIT).await;
    let report = crate::helpers::report(&fleet, holder);
    progress(&format!("  {channels} channels, holder: {}", report.trim()));
    let held = held_ms(&report);
    tokio::time::sleep(warmup).await;
    progress(&format!("  {channels} channels: the holder alone for {length:?}"));
    let holder_window = window(&server.monitor, length).await?;
    let holder_rss = rss_of(fleet.worker(holder).pid)?;
    let standby = fleet.spawn_command(command(false)?);
    fleet.wait_ready(standby, WAIT).await;
    progress(&format!(
        "  {channels} channels, standby: {}",
        crate::helpers::report(&fleet, standby).trim()
    ));
    tokio::time::sleep(warmup).await;
    progress(&format!(
        "  {channels} channels: the holder and the standby for {length:?}"
    ));
    let both = window(&server.monitor, length).await?;
    let standby_rss = rss_of(fleet.worker(standby).pid)?;
    fleet.shutdown(WAIT).await;
    Ok(Scale {
        channels,
        held,
        holder: holder_window,
        both,
        holder_rss,
        standby_rss,
    })
}
