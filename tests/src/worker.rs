//! One `pgiplock worker` OS process whose stdout events feed a [`Timeline`].

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::timeline::{parse_line, Event, EventKind, Timeline};
use crate::Protocol;

/// The `pgiplock` binary: env `PGIPLOCK_BIN`, else the build artefact next to this test
/// executable (`target/<profile>/pgiplock`; tests live in `target/<profile>/deps/`).
///
/// Panics with instructions when it cannot be found: a test crate cannot depend on another
/// package's binary, so it must be built first (`cargo build -p pgiplock-cli`).
///
/// A binary older than the sources it is built from (in this workspace) is refused too: the
/// tests would otherwise silently exercise old code after `cargo test -p pgiplock-tests`.
pub fn worker_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(find_worker_binary).clone()
}

fn find_worker_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PGIPLOCK_BIN") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "PGIPLOCK_BIN={} is not a file", path.display());
        return path;
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("cannot locate the test executable: {e}"));
    let mut tried = Vec::new();
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(format!("pgiplock{}", std::env::consts::EXE_SUFFIX));
        if candidate.is_file() {
            if let Some(newer) = newer_source(&candidate) {
                panic!(
                    "{} is older than {}; rebuild it with `cargo build -p pgiplock-cli` \
                     (or run `cargo test --workspace`, which builds it)",
                    candidate.display(),
                    newer.display()
                );
            }
            return candidate;
        }
        tried.push(candidate);
    }
    panic!(
        "the pgiplock binary was not found (tried {tried:?}); build it first with \
         `cargo build -p pgiplock-cli` (same profile as the tests) or set PGIPLOCK_BIN"
    );
}

/// A source file of the binary (its cli, io and core packages in this workspace) modified after
/// `binary`.
fn newer_source(binary: &Path) -> Option<PathBuf> {
    let built = std::fs::metadata(binary).and_then(|m| m.modified()).ok()?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let mut pending: Vec<PathBuf> = [
        "cli/src",
        "io/src",
        "core/src",
        "cli/Cargo.toml",
        "io/Cargo.toml",
        "core/Cargo.toml",
    ]
    .iter()
    .map(|p| workspace.join(p))
    .collect();
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                pending.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        } else if meta.modified().is_ok_and(|m| m > built) {
            return Some(path);
        }
    }
    None
}

/// Command-line settings of one worker.
#[derive(Debug, Clone)]
pub struct WorkerOpts {
    /// `--database-url`.
    pub database_url: String,
    /// `--channel`.
    pub channel: String,
    /// `--schema`, when set.
    pub schema: Option<String>,
    /// `--protocol`.
    pub protocol: Protocol,
    /// `--acquire-interval`, when set.
    pub acquire_interval: Option<Duration>,
    /// `--lease-ttl`, when set.
    pub lease_ttl: Option<Duration>,
    /// `--shutdown-timeout`, when set.
    pub shutdown_timeout: Option<Duration>,
    /// More arguments, appended as given.
    pub extra_args: Vec<String>,
}

impl WorkerOpts {
    /// Settings for `channel` on `database_url` under `protocol`, everything else default.
    pub fn new(database_url: &str, channel: &str, schema: Option<&str>, protocol: Protocol) -> Self {
        WorkerOpts {
            database_url: database_url.to_owned(),
            channel: channel.to_owned(),
            schema: schema.map(str::to_owned),
            protocol,
            acquire_interval: None,
            lease_ttl: None,
            shutdown_timeout: None,
            extra_args: Vec::new(),
        }
    }

    /// Sets `--acquire-interval`.
    pub fn acquire_interval(mut self, d: Duration) -> Self {
        self.acquire_interval = Some(d);
        self
    }

    /// Sets `--lease-ttl`.
    pub fn lease_ttl(mut self, d: Duration) -> Self {
        self.lease_ttl = Some(d);
        self
    }

    /// Sets `--shutdown-timeout`.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = Some(d);
        self
    }

    /// The argument list after the binary.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "worker".to_owned(),
            "--database-url".to_owned(),
            self.database_url.clone(),
            "--channel".to_owned(),
            self.channel.clone(),
            "--protocol".to_owned(),
            self.protocol.as_str().to_owned(),
        ];
        if let Some(schema) = &self.schema {
            args.extend(["--schema".to_owned(), schema.clone()]);
        }
        let durations = [
            ("--acquire-interval", self.acquire_interval),
            ("--lease-ttl", self.lease_ttl),
            ("--shutdown-timeout", self.shutdown_timeout),
        ];
        for (flag, value) in durations {
            if let Some(d) = value {
                args.extend([flag.to_owned(), format!("{}ms", d.as_millis())]);
            }
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// A running worker process. Killed (SIGKILL) on drop if still running.
pub struct Worker {
    /// Index in its fleet (the `worker` of its events).
    pub index: usize,
    /// OS pid.
    pub pid: i32,
    /// Its settings.
    pub opts: WorkerOpts,
    exited: Arc<AtomicBool>,
    /// `t_us` at which we sent SIGKILL (0: never).
    killed: Arc<AtomicI64>,
    stderr: Arc<Mutex<String>>,
    /// Held open for the worker's lifetime (see `--exit-on-stdin-eof`).
    _stdin: Option<tokio::process::ChildStdin>,
}

impl Worker {
    /// Spawns a worker whose events go to `timeline` as worker `index`. Its stdout is read by
    /// a task that also observes the exit (the last event of the worker, `Exited`); its stderr
    /// is kept (see [`Worker::stderr`]) and echoed when env `PGIPLOCK_TEST_ECHO` is set.
    pub fn spawn(index: usize, opts: WorkerOpts, timeline: Arc<Timeline>) -> Worker {
        let mut command = Command::new(worker_binary());
        command
            .args(opts.args())
            // The worker exits when its stdin closes: should this test process die without
            // running its destructors, no worker outlives it.
            .arg("--exit-on-stdin-eof");
        if let Ok(filter) = std::env::var("PGIPLOCK_TEST_LOG") {
            command.env("RUST_LOG", filter);
        }
        Worker::spawn_command(index, command, opts, timeline)
    }

    /// Spawns `command`, another program that prints the worker's events on stdout and exits
    /// when its stdin closes (a Node process, for instance), as worker `index`; `opts` only
    /// describe it.
    pub fn spawn_command(index: usize, mut command: Command, opts: WorkerOpts, timeline: Arc<Timeline>) -> Worker {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Second line of defence after our own Drop: the reaping task owns the child, and
            // dropping it (runtime shut down by a failing test) kills the process.
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {:?}: {e}", command.as_std().get_program()));
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .unwrap_or_else(|| panic!("spawned worker has no pid"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("worker stdout not piped"));
        let stderr_pipe = child.stderr.take().unwrap_or_else(|| panic!("worker stderr not piped"));
        let exited = Arc::new(AtomicBool::new(false));
        let stderr = Arc::new(Mutex::new(String::new()));

        let echo = std::env::var_os("PGIPLOCK_TEST_ECHO").is_some();
        let stderr_sink = stderr.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr_pipe);
            let mut buf = Vec::new();
            // Read raw bytes: a log line need not be UTF-8 and must never stop the collection.
            while let Ok(n) = lines.read_until(b'\n', &mut buf).await {
                if n == 0 {
                    break;
                }
                let line = String::from_utf8_lossy(&buf);
                if echo {
                    eprint!("[w{index} stderr] {line}");
                }
                stderr_sink.lock().unwrap_or_else(|e| e.into_inner()).push_str(&line);
                buf.clear();
            }
        });

        let exited_flag = exited.clone();
        let killed = Arc::new(AtomicI64::new(0));
        let killed_flag = killed.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            while let Ok(n) = reader.read_until(b'\n', &mut buf).await {
                if n == 0 {
                    break;
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']);
                if echo {
                    eprintln!("[w{index} stdout] {line}");
                }
                if !line.trim().is_empty() {
                    timeline.push(parse_line(index, line));
                }
                buf.clear();
            }
            let status = child.wait().await;
            exited_flag.store(true, Ordering::SeqCst);
            let (code, signal) = match status {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    (status.code(), status.signal())
                }
                Err(_) => (None, None),
            };
            // A process killed by our SIGKILL ran no code after it was sent: its tenure ends
            // then, not when this task got round to reaping it (which a busy machine delays).
            let killed_at = killed_flag.load(Ordering::SeqCst);
            let t_us = if signal == Some(libc::SIGKILL) && killed_at > 0 {
                killed_at
            } else {
                crate::now_us()
            };
            timeline.push(Event {
                worker: index,
                t_us,
                kind: EventKind::Exited { code, signal },
            });
        });

        Worker {
            index,
            pid,
            opts,
            exited,
            killed,
            stderr,
            _stdin: stdin,
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process, unless it has exited.
    pub fn signal(&self, signal: i32) {
        if self.has_exited() {
            return;
        }
        if signal == libc::SIGKILL {
            let _ = self
                .killed
                .compare_exchange(0, crate::now_us(), Ordering::SeqCst, Ordering::SeqCst);
        }
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet; no memory involved.
        let rc = unsafe { libc::kill(self.pid, signal) };
        assert!(
            rc == 0 || self.has_exited(),
            "kill({}, {signal}) failed: {}",
            self.pid,
            std::io::Error::last_os_error()
        );
    }

    /// SIGTERM: graceful stop.
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// SIGKILL: crash.
    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// Whether the process has exited (and been reaped).
    pub fn has_exited(&self) -> bool {
        self.exited.load(Ordering::SeqCst)
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.has_exited() {
            // SAFETY: as in `signal`.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
        }
    }
}
