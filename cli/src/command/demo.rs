//! `pgiplock demo`: three worker processes, a graceful handover, a crash, and what they cost.
//!
//! The demo publishes numbered messages on a fresh channel every 20 ms, stops the holder with
//! SIGTERM (graceful handover), then kills the next holder with SIGKILL (crash failover), and
//! prints a timeline and a summary: handover and failover times, messages published, delivered,
//! lost and duplicated. Everything it starts (workers, a throwaway cluster, a schema) is removed
//! on every exit path, and every wait is bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use nix::sys::signal::Signal as UnixSignal;
use nix::unistd::Pid;
use pgiplock_core::quote_ident;
use pgiplock_testkit::cluster::TempCluster;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{now_us, parse_database_url, CliError, ProtocolArg};

/// How many worker processes compete.
const WORKERS: usize = 3;
/// One message every this often.
const PUBLISH_EVERY: Duration = Duration::from_millis(20);
/// Upper bound of every wait for an event.
const WAIT_BOUND: Duration = Duration::from_secs(30);
/// How long we wait for the last message to reach the last holder before counting.
const DELIVERY_GRACE: Duration = Duration::from_secs(5);
/// The workers' standby retry interval, and the lease ttl under the lease protocol.
const ACQUIRE_INTERVAL: &str = "1s";
const LEASE_TTL: &str = "3s";

/// Options of `pgiplock demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// PostgreSQL connection URL [default: $DATABASE_URL; when neither is set, a throwaway
    /// cluster is started with the local PostgreSQL binaries].
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// Lock protocol the workers use.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Lease)]
    protocol: ProtocolArg,
    /// Publish at least this many messages, one every 20 ms (a count, 30 to 100000): a third
    /// before the handover, a third between the handover and the crash, a third after it.
    #[arg(long, value_name = "N", default_value_t = 300, value_parser = clap::value_parser!(u64).range(30..=100_000))]
    messages: u64,
}

/// Runs the demo; the timeline and summary go to stdout, progress to stderr.
pub(crate) async fn run(args: DemoArgs) -> Result<(), CliError> {
    let url = args
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.trim().is_empty()));
    let exe = std::env::current_exe().map_err(|e| CliError::io("finding the pgiplock executable", e))?;
    let (url, cluster) = match url {
        Some(url) => {
            parse_database_url(&url)?;
            (url, None)
        }
        None => {
            progress("no --database-url or DATABASE_URL: starting a throwaway PostgreSQL cluster");
            let cluster = tokio::task::spawn_blocking(TempCluster::start)
                .await
                .map_err(|e| CliError::Failed(format!("starting the cluster: {e}")))??;
            progress(&format!("cluster running at {}", cluster.url()));
            (cluster.url(), Some(cluster))
        }
    };
    let outcome = run_with_database(args, exe, url).await;
    if let Some(cluster) = cluster {
        progress("removing the throwaway cluster");
        // Stopping the server blocks; keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
    }
    let report = outcome?;
    // A closed stdout (piped into `head`) is not an error of the demo.
    let mut stdout = std::io::stdout().lock();
    let _ = std::io::Write::write_all(&mut stdout, report.as_bytes()).and_then(|()| std::io::Write::flush(&mut stdout));
    Ok(())
}

async fn run_with_database(args: DemoArgs, exe: PathBuf, url: String) -> Result<String, CliError> {
    let mut config = parse_database_url(&url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| CliError::database("connecting to the database", e))?;
    let connection = tokio::spawn(connection);
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let run_id = run_id.get(..12).unwrap_or("run").to_string();
    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    let mut demo = Demo {
        exe,
        url,
        protocol: args.protocol,
        channel: format!("demo_{run_id}"),
        schema: format!("pgiplock_demo_{run_id}"),
        client: Arc::new(client),
        workers: Vec::new(),
        reports_tx,
        reports_rx,
        record: Record::default(),
        published: Arc::new(AtomicU64::new(0)),
        publisher: None,
        interrupt: signal(SignalKind::interrupt()).map_err(|e| CliError::io("installing a SIGINT handler", e))?,
        terminate: signal(SignalKind::terminate()).map_err(|e| CliError::io("installing a SIGTERM handler", e))?,
        t0_us: now_us(),
    };
    progress(&format!(
        "protocol {}, channel {}, schema {}",
        demo.protocol.as_str(),
        demo.channel,
        demo.schema
    ));
    let outcome = demo.scenario(args.messages).await;
    demo.shutdown().await;
    drop(demo);
    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
    outcome
}

fn progress(text: &str) {
    eprintln!("demo: {text}");
}

/// One line of a worker's stdout.
#[derive(Debug, Deserialize)]
struct WorkerLine {
    event: String,
    #[serde(default)]
    t_us: u64,
    token: Option<u64>,
    reason: Option<String>,
    payload: Option<String>,
    #[serde(default)]
    replay: bool,
    missing: Option<u64>,
    app: Option<String>,
    pid: Option<u32>,
}

/// What a worker's reader task saw.
#[derive(Debug)]
enum Report {
    Line { worker: usize, line: WorkerLine },
    Unparsable { worker: usize, text: String },
    Exited { worker: usize, t_us: u64 },
}

/// A line of the timeline.
#[derive(Debug)]
struct Entry {
    t_us: u64,
    /// `None` for the demo's own actions.
    worker: Option<usize>,
    what: What,
}

#[derive(Debug)]
enum What {
    Text(String),
    /// Consecutive deliveries by one worker, merged into one line.
    Delivered {
        first: u64,
        last: u64,
        count: u64,
        /// When the last of them was delivered.
        last_t_us: u64,
    },
}

/// Everything observed, in arrival order.
#[derive(Debug, Default)]
struct Record {
    timeline: Vec<Entry>,
    /// Message number → the workers that delivered it.
    delivered: BTreeMap<u64, BTreeSet<usize>>,
    /// Deliveries flagged as replays (at a takeover: possibly delivered before).
    replayed: usize,
    /// Deliveries of a message already delivered, and how many of those were flagged replays.
    repeats: usize,
    flagged_repeats: usize,
    /// The worker that last reported `acquired` and has not since lost, released or exited.
    holder: Option<usize>,
    /// Every `acquired`: (worker, t_us).
    acquisitions: Vec<(usize, u64)>,
    ready: BTreeSet<usize>,
    exited: BTreeSet<usize>,
}

impl Record {
    fn note(&mut self, worker: Option<usize>, text: String) {
        self.timeline.push(Entry {
            t_us: now_us(),
            worker,
            what: What::Text(text),
        });
    }

    fn apply(&mut self, report: Report) {
        let (worker, t_us, text) = match report {
            Report::Unparsable { worker, text } => (worker, now_us(), format!("printed a non-JSON line: {text}")),
            Report::Exited { worker, t_us } => {
                self.exited.insert(worker);
                if self.holder == Some(worker) {
                    self.holder = None;
                }
                (worker, t_us, "exited".to_string())
            }
            Report::Line { worker, line } => {
                let t_us = if line.t_us == 0 { now_us() } else { line.t_us };
                let text = match line.event.as_str() {
                    "ready" => {
                        self.ready.insert(worker);
                        format!(
                            "ready (pid {}, application_name {})",
                            line.pid.map_or_else(|| "?".into(), |p| p.to_string()),
                            line.app.as_deref().unwrap_or("?")
                        )
                    }
                    "acquired" => {
                        self.holder = Some(worker);
                        self.acquisitions.push((worker, t_us));
                        match line.token {
                            Some(token) => format!("acquired the lock (fence token {token})"),
                            None => "acquired the lock".to_string(),
                        }
                    }
                    "lost" | "drained" => {
                        if self.holder == Some(worker) {
                            self.holder = None;
                        }
                        match line.reason {
                            Some(reason) => format!("lost the lock ({reason})"),
                            None => "drained: delivered its last message, releasing".to_string(),
                        }
                    }
                    "released" => "released the lock (confirmed)".to_string(),
                    "release_failed" => format!("release not confirmed ({})", line.reason.as_deref().unwrap_or("?")),
                    "warning" => "warning".to_string(),
                    "gap" => format!(
                        "replay incomplete: up to {} messages dropped by the replay buffer",
                        line.missing.unwrap_or(0)
                    ),
                    "message" => {
                        let payload = line.payload.unwrap_or_default();
                        match payload.parse::<u64>() {
                            Ok(number) => {
                                if self.delivered.contains_key(&number) {
                                    self.repeats += 1;
                                    self.flagged_repeats += usize::from(line.replay);
                                }
                                self.replayed += usize::from(line.replay);
                                self.delivered_message(worker, number, t_us);
                                return;
                            }
                            Err(_) => format!("delivered an unexpected message {payload:?}"),
                        }
                    }
                    other => format!("reported an unknown event {other:?}"),
                };
                (worker, t_us, text)
            }
        };
        self.timeline.push(Entry {
            t_us,
            worker: Some(worker),
            what: What::Text(text),
        });
    }

    fn delivered_message(&mut self, worker: usize, number: u64, t_us: u64) {
        self.delivered.entry(number).or_default().insert(worker);
        if let Some(Entry {
            worker: Some(w),
            what: What::Delivered {
                last, count, last_t_us, ..
            },
            ..
        }) = self.timeline.last_mut()
        {
            if *w == worker {
                *last = number;
                *count += 1;
                *last_t_us = t_us;
                return;
            }
        }
        self.timeline.push(Entry {
            t_us,
            worker: Some(worker),
            what: What::Delivered {
                first: number,
                last: number,
                count: 1,
                last_t_us: t_us,
            },
        });
    }

    /// The first `acquired` after index `since` by a worker other than `previous`.
    fn takeover_since(&self, since: usize, previous: usize) -> Option<(usize, u64)> {
        self.acquisitions
            .get(since..)?
            .iter()
            .copied()
            .find(|(w, _)| *w != previous)
    }
}

/// A running worker process.
struct WorkerProcess {
    child: Child,
    pid: Option<u32>,
}

/// The publisher task: its stop switch and its log of (message number, published at t_us).
struct Publisher {
    stop: CancellationToken,
    task: JoinHandle<Result<Vec<(u64, u64)>, CliError>>,
}

struct Demo {
    exe: PathBuf,
    url: String,
    protocol: ProtocolArg,
    channel: String,
    schema: String,
    client: Arc<Client>,
    workers: Vec<WorkerProcess>,
    reports_tx: mpsc::UnboundedSender<Report>,
    reports_rx: mpsc::UnboundedReceiver<Report>,
    record: Record,
    published: Arc<AtomicU64>,
    publisher: Option<Publisher>,
    interrupt: Signal,
    terminate: Signal,
    t0_us: u64,
}

/// The measured outcome.
struct Measurements {
    handover_us: u64,
    failover_us: u64,
    /// Between the handover and the crash: losses before it are blamed on the handover.
    split_us: u64,
    published: Vec<(u64, u64)>,
}

impl Demo {
    /// The scripted run: start, handover, crash, stop. Returns the report to print.
    async fn scenario(&mut self, messages: u64) -> Result<String, CliError> {
        // All at once: they race for the lock (and for the schema's setup), and exactly one wins.
        for _ in 0..WORKERS {
            self.spawn_worker()?;
        }
        self.wait_until(
            "all workers to be ready and one to acquire the lock",
            WAIT_BOUND,
            |r, _| r.ready.len() == WORKERS && r.holder.is_some(),
        )
        .await?;
        if self.record.acquisitions.len() != 1 {
            return Err(CliError::Failed(format!(
                "expected exactly one holder, saw acquisitions (worker, t_us) {:?}",
                self.record.acquisitions
            )));
        }

        self.start_publisher();
        let publish_bound = |count: u64| WAIT_BOUND + PUBLISH_EVERY * u32::try_from(count).unwrap_or(u32::MAX);
        // Each phase lasts a third of the messages, counted from the end of the previous one, so
        // that every holder gets its share however long a takeover took.
        let third = messages / 3;
        self.wait_until("messages to be published", publish_bound(third), |_, p| p >= third)
            .await?;

        // Graceful handover.
        let (old, since) = self.current_holder()?;
        let t_term = self.send_signal(old, UnixSignal::SIGTERM, "graceful stop")?;
        self.wait_until("another worker to take over after SIGTERM", WAIT_BOUND, |r, _| {
            r.takeover_since(since, old).is_some()
        })
        .await?;
        let (_, t_handover) = self.record.takeover_since(since, old).unwrap_or((old, t_term));

        // Crash failover.
        let target = self.published.load(Ordering::SeqCst) + third;
        self.wait_until("messages to be published", publish_bound(third), |_, p| p >= target)
            .await?;
        let (victim, since) = self.current_holder()?;
        let t_kill = self.send_signal(victim, UnixSignal::SIGKILL, "crash")?;
        self.wait_until("another worker to take over after SIGKILL", WAIT_BOUND, |r, _| {
            r.takeover_since(since, victim).is_some()
        })
        .await?;
        let (last_holder, t_failover) = self.record.takeover_since(since, victim).unwrap_or((victim, t_kill));

        // Finish publishing, let the last holder catch up, stop the last worker.
        let target = (self.published.load(Ordering::SeqCst) + third).max(messages);
        self.wait_until("messages to be published", publish_bound(messages), |_, p| p >= target)
            .await?;
        let published = self.stop_publisher().await?;
        let last = published.last().map_or(0, |(n, _)| *n);
        let caught_up = self
            .wait_until("the last message to be delivered", DELIVERY_GRACE, |r, _| {
                r.delivered.contains_key(&last)
            })
            .await;
        if caught_up.is_err() {
            progress("the last message was not delivered within 5 s; counting anyway");
        }
        let _ = self.send_signal(last_holder, UnixSignal::SIGTERM, "end of the demo");
        self.wait_until("the last worker to exit", WAIT_BOUND, |r, _| {
            r.exited.contains(&last_holder)
        })
        .await?;

        let measured = Measurements {
            handover_us: t_handover.saturating_sub(t_term),
            failover_us: t_failover.saturating_sub(t_kill),
            // Losses before the midpoint between the handover and the crash belong to the handover.
            split_us: t_handover + t_kill.saturating_sub(t_handover) / 2,
            published,
        };
        Ok(self.report(&measured))
    }

    fn current_holder(&self) -> Result<(usize, usize), CliError> {
        let holder = self
            .record
            .holder
            .ok_or_else(|| CliError::Failed("no worker holds the lock".into()))?;
        Ok((holder, self.record.acquisitions.len()))
    }

    fn spawn_worker(&mut self) -> Result<(), CliError> {
        let id = self.workers.len();
        let mut command = Command::new(&self.exe);
        command
            .arg("worker")
            .args(["--database-url", &self.url])
            .args(["--channel", &self.channel])
            .args(["--schema", &self.schema])
            .args(["--protocol", self.protocol.as_str()])
            .args(["--acquire-interval", ACQUIRE_INTERVAL])
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Children die with us on every path, even a panic.
            .kill_on_drop(true);
        if self.protocol == ProtocolArg::Lease {
            command.args(["--lease-ttl", LEASE_TTL]);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            // Keep the demo's stderr readable; RUST_LOG=pgiplock=info shows the workers' logs.
            command.env("RUST_LOG", "pgiplock=warn");
        }
        let mut child = command
            .spawn()
            .map_err(|e| CliError::io(format!("starting worker {}", self.exe.display()), e))?;
        let pid = child.id();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| CliError::Failed("worker stdout was not captured".into()))?;
        let reports = self.reports_tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(text)) = lines.next_line().await {
                let report = match serde_json::from_str::<WorkerLine>(&text) {
                    Ok(line) => Report::Line { worker: id, line },
                    Err(_) => Report::Unparsable { worker: id, text },
                };
                if reports.send(report).is_err() {
                    return;
                }
            }
            let _ = reports.send(Report::Exited {
                worker: id,
                t_us: now_us(),
            });
        });
        let name = worker_name(id);
        progress(&format!("started {name} (pid {})", pid.unwrap_or(0)));
        self.record.note(
            None,
            format!(
                "started {name} (pid {})",
                pid.map_or_else(|| "?".into(), |p| p.to_string())
            ),
        );
        self.workers.push(WorkerProcess { child, pid });
        Ok(())
    }

    /// Signals a worker; returns the wall-clock time of the signal in µs.
    fn send_signal(&mut self, worker: usize, signal: UnixSignal, why: &str) -> Result<u64, CliError> {
        let name = worker_name(worker);
        let pid = self
            .workers
            .get(worker)
            .and_then(|w| w.pid)
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| CliError::Failed(format!("{name} has no process id")))?;
        let t_us = now_us();
        nix::sys::signal::kill(Pid::from_raw(pid), signal)
            .map_err(|e| CliError::Failed(format!("sending {signal} to {name}: {e}")))?;
        progress(&format!("{signal} to {name} ({why})"));
        self.record.timeline.push(Entry {
            t_us,
            worker: None,
            what: What::Text(format!("{signal} to {name} ({why})")),
        });
        Ok(t_us)
    }

    fn start_publisher(&mut self) {
        let stop = CancellationToken::new();
        let task = tokio::spawn(publish(
            Arc::clone(&self.client),
            self.channel.clone(),
            Arc::clone(&self.published),
            stop.clone(),
        ));
        self.record.note(
            None,
            format!("publishing numbered messages every {} ms", PUBLISH_EVERY.as_millis()),
        );
        self.publisher = Some(Publisher { stop, task });
    }

    async fn stop_publisher(&mut self) -> Result<Vec<(u64, u64)>, CliError> {
        let Some(publisher) = self.publisher.take() else {
            return Ok(Vec::new());
        };
        publisher.stop.cancel();
        let log = match tokio::time::timeout(WAIT_BOUND, publisher.task).await {
            Ok(Ok(log)) => log?,
            Ok(Err(e)) => return Err(CliError::Failed(format!("publisher task failed: {e}"))),
            Err(_) => return Err(CliError::Failed("the publisher did not stop within 30 s".into())),
        };
        self.record
            .note(None, format!("stopped publishing after {} messages", log.len()));
        Ok(log)
    }

    /// Feeds worker reports into the record until `done` holds; bounded, and interruptible.
    async fn wait_until(
        &mut self,
        what: &str,
        bound: Duration,
        mut done: impl FnMut(&Record, u64) -> bool,
    ) -> Result<(), CliError> {
        let deadline = Instant::now() + bound;
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        loop {
            if done(&self.record, self.published.load(Ordering::SeqCst)) {
                return Ok(());
            }
            if self.publisher.as_ref().is_some_and(|p| p.task.is_finished()) {
                // It only ends by itself on an error; surface it.
                self.stop_publisher().await?;
                return Err(CliError::Failed("the publisher stopped unexpectedly".into()));
            }
            tokio::select! {
                report = self.reports_rx.recv() => {
                    if let Some(report) = report {
                        self.record.apply(report);
                    }
                }
                _ = tick.tick() => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(CliError::Failed(format!("timed out after {} s waiting for {what}", bound.as_secs())));
                }
                _ = self.interrupt.recv() => return Err(CliError::Failed("interrupted".into())),
                _ = self.terminate.recv() => return Err(CliError::Failed("terminated".into())),
            }
        }
    }

    /// Stops everything this run started; runs on every path, never fails.
    async fn shutdown(&mut self) {
        if let Some(publisher) = self.publisher.take() {
            publisher.stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), publisher.task).await;
        }
        let running: Vec<usize> = (0..self.workers.len())
            .filter(|w| !self.record.exited.contains(w))
            .collect();
        for &worker in &running {
            let _ = self.send_signal(worker, UnixSignal::SIGTERM, "cleanup");
        }
        if !running.is_empty() {
            let all_exited = self
                .wait_until("the workers to exit", Duration::from_secs(10), |r, _| {
                    running.iter().all(|w| r.exited.contains(w))
                })
                .await;
            if all_exited.is_err() {
                progress("workers did not exit in time; killing them");
            }
        }
        for worker in &mut self.workers {
            let _ = worker.child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), worker.child.wait()).await;
        }
        while let Ok(report) = self.reports_rx.try_recv() {
            self.record.apply(report);
        }
        let drop_schema = format!(
            "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(&self.schema)
        );
        match tokio::time::timeout(Duration::from_secs(10), self.client.batch_execute(&drop_schema)).await {
            Ok(Ok(())) => progress(&format!("dropped schema {}", self.schema)),
            Ok(Err(e)) => progress(&format!("could not drop schema {}: {e}", self.schema)),
            Err(_) => progress(&format!("dropping schema {} timed out", self.schema)),
        }
    }

    /// The timeline and the summary.
    fn report(&self, measured: &Measurements) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "timeline (ms since the demo started; w1..w{WORKERS} are the worker processes)"
        );
        let mut entries: Vec<&Entry> = self.record.timeline.iter().collect();
        entries.sort_by_key(|e| e.t_us);
        for entry in entries {
            let ms = entry.t_us.saturating_sub(self.t0_us) as f64 / 1000.0;
            let who = entry.worker.map_or_else(|| "demo".to_string(), worker_name);
            let what = match &entry.what {
                What::Text(text) => text.clone(),
                What::Delivered { first, last, .. } if first == last => format!("delivered message #{first}"),
                What::Delivered {
                    first,
                    last,
                    count,
                    last_t_us,
                } => {
                    let until = last_t_us.saturating_sub(self.t0_us) as f64 / 1000.0;
                    format!("delivered messages #{first}..#{last} ({count}), the last at {until:.1} ms")
                }
            };
            let _ = writeln!(out, "{ms:>9.1}  {who:<4}  {what}");
        }

        let published: BTreeSet<u64> = measured.published.iter().map(|(n, _)| *n).collect();
        let lost: Vec<(u64, u64)> = measured
            .published
            .iter()
            .copied()
            .filter(|(n, _)| !self.record.delivered.contains_key(n))
            .collect();
        let lost_in_handover = lost.iter().filter(|(_, t)| *t < measured.split_us).count();
        let lost_in_crash = lost.len() - lost_in_handover;
        let delivered = self.record.delivered.keys().filter(|n| published.contains(n)).count();
        let duplicated = self.record.repeats;
        let (replayed, flagged) = (self.record.replayed, self.record.flagged_repeats);
        let handover_ms = measured.handover_us as f64 / 1000.0;
        let failover_ms = measured.failover_us as f64 / 1000.0;

        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "summary: protocol={} handover_ms={handover_ms:.1} failover_ms={failover_ms:.1} published={} delivered={delivered} lost={} duplicated={duplicated}",
            self.protocol.as_str(),
            published.len(),
            lost.len(),
        );
        let _ = writeln!(
            out,
            "  graceful handover (SIGTERM to the holder -> a standby acquired): {handover_ms:.1} ms"
        );
        let _ = writeln!(
            out,
            "  crash failover    (SIGKILL to the holder -> a standby acquired): {failover_ms:.1} ms \
             (standbys retry every {ACQUIRE_INTERVAL}{})",
            if self.protocol == ProtocolArg::Lease {
                format!(", lease ttl {LEASE_TTL}")
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            out,
            "  messages: {} published, {delivered} delivered, {} lost ({lost_in_handover} around the graceful handover, \
             {lost_in_crash} around the crash), {duplicated} delivered twice ({flagged} of them flagged as replays; \
             {replayed} replayed in all)",
            published.len(),
            lost.len(),
        );
        if replayed > 0 {
            let _ = writeln!(
                out,
                "  replays: the winner of the crash takeover delivered first what followed the dead holder's last \
                 acknowledged progress marker, flagged as replays (at least once: it may have delivered some)."
            );
        }
        if lost_in_crash > 0 {
            let _ = writeln!(
                out,
                "  losses around the crash: under classic, what is published before a standby takes over reaches no \
                 holder; under lease a standby replays it."
            );
        }
        out
    }
}

fn worker_name(worker: usize) -> String {
    format!("w{}", worker + 1)
}

/// Publishes `1`, `2`, ... on `channel` every 20 ms until stopped; returns what it published.
async fn publish(
    client: Arc<Client>,
    channel: String,
    published: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<Vec<(u64, u64)>, CliError> {
    let statement = client
        .prepare("SELECT pg_notify($1, $2)")
        .await
        .map_err(|e| CliError::database("preparing the publisher's statement", e))?;
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut log = Vec::new();
    for number in 1u64.. {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Not raced against `stop`: a message counts as published once its commit returned.
        client
            .execute(&statement, &[&channel, &number.to_string()])
            .await
            .map_err(|e| CliError::database("publishing a message", e))?;
        log.push((number, now_us()));
        published.store(number, Ordering::SeqCst);
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(event: &str, t_us: u64) -> WorkerLine {
        WorkerLine {
            event: event.into(),
            t_us,
            token: None,
            reason: None,
            payload: None,
            replay: false,
            missing: None,
            app: None,
            pid: None,
        }
    }

    #[test]
    fn record_tracks_the_holder_and_merges_deliveries() {
        let mut record = Record::default();
        record.apply(Report::Line {
            worker: 0,
            line: line("acquired", 10),
        });
        assert_eq!(record.holder, Some(0));
        for n in 1..=3 {
            let mut message = line("message", 10 + n);
            message.payload = Some(n.to_string());
            record.apply(Report::Line {
                worker: 0,
                line: message,
            });
        }
        assert!(matches!(
            record.timeline.last().map(|e| &e.what),
            Some(What::Delivered {
                first: 1,
                last: 3,
                count: 3,
                ..
            })
        ));
        record.apply(Report::Line {
            worker: 1,
            line: line("acquired", 20),
        });
        // A late `drained` of the old holder does not clear the new one.
        record.apply(Report::Line {
            worker: 0,
            line: line("drained", 19),
        });
        assert_eq!(record.holder, Some(1));
        assert_eq!(record.takeover_since(1, 0), Some((1, 20)));
        record.apply(Report::Exited { worker: 1, t_us: 30 });
        assert_eq!(record.holder, None);
    }
}
