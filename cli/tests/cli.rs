//! The `pgiplock` binary end to end: `worker` JSON lines and exit codes, `status`, `demo`.
//!
//! Needs the server of `PGIPLOCK_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); every test uses its own schema and channel and
//! drops what it created.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_pgiplock");
/// Upper bound of every wait for one event.
const WAIT: Duration = Duration::from_secs(30);
/// Upper bound of a whole demo run.
const DEMO_WAIT: Duration = Duration::from_secs(120);

/// A monotonic reading that only bounds waits (these tests are synchronous, without tokio time).
#[allow(clippy::disallowed_methods)]
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

fn database_url() -> String {
    std::env::var("PGIPLOCK_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..12])
}

/// Runs SQL on the test database (a small runtime of its own: these tests are synchronous).
fn execute(sql: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        let task = tokio::spawn(connection);
        client.batch_execute(sql).await.expect(sql);
        drop(client);
        let _ = task.await;
    });
}

fn schema_exists(schema: &str) -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        let task = tokio::spawn(connection);
        let row = client
            .query_one("SELECT count(*) FROM pg_namespace WHERE nspname = $1", &[&schema])
            .await
            .expect("query pg_namespace");
        let count: i64 = row.get(0);
        drop(client);
        let _ = task.await;
        count > 0
    })
}

/// Drops a schema when the test ends, whether it passed or not.
struct SchemaGuard(String);

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.0));
    }
}

/// Runs a command to completion within `bound`, killing it if it overruns.
fn run_bounded(command: &mut Command, bound: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgiplock");
    let pid = child.id();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(bound).is_err() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    });
    let output = child_output(&mut child);
    let _ = done_tx.send(());
    let _ = watchdog.join();
    output
}

fn child_output(child: &mut Child) -> Output {
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let err_thread = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let out = std::io::read_to_string(stdout).unwrap_or_default();
    let err = err_thread.join().unwrap_or_default();
    let status = child.wait().expect("wait");
    Output {
        status,
        stdout: out.into_bytes(),
        stderr: err.into_bytes(),
    }
}

/// A `pgiplock worker` whose JSON lines arrive on a channel.
struct Worker {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Worker {
    fn start(channel: &str, schema: &str) -> Worker {
        let mut child = Command::new(BIN)
            .args(["worker", "--database-url", &database_url(), "--channel", channel])
            .args(["--schema", schema, "--acquire-interval", "1s", "--lease-ttl", "3s"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env("RUST_LOG", "pgiplock=warn")
            .spawn()
            .expect("spawn worker");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Worker { child, lines }
    }

    /// The next line with this `event`, skipping others; panics after [`WAIT`].
    fn wait_for(&self, event: &str) -> Value {
        let deadline = now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line["event"] == event => return line,
                Ok(_) => {}
                Err(e) => panic!("no {event:?} line within {WAIT:?}: {e}"),
            }
        }
    }

    /// SIGTERM, then the exit status within [`WAIT`].
    fn terminate(mut self) -> (std::process::ExitStatus, mpsc::Receiver<Value>) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status, std::mem::replace(&mut self.lines, mpsc::channel().1));
            }
            assert!(now() < deadline, "worker did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn worker_prints_json_lines_and_status_shows_its_lease() {
    let schema = unique("cli_status");
    let _guard = SchemaGuard(schema.clone());
    let channel = unique("cli");

    // A schema nobody has used yet: status says so and succeeds.
    let fresh = run_bounded(
        Command::new(BIN).args(["status", "--database-url", &database_url(), "--schema", &schema]),
        WAIT,
    );
    let text = String::from_utf8_lossy(&fresh.stdout);
    assert!(
        fresh.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&fresh.stderr)
    );
    assert!(text.contains("no lease table"), "{text}");
    assert!(text.contains("no lock table"), "{text}");

    let worker = Worker::start(&channel, &schema);
    let ready = worker.wait_for("ready");
    assert!(ready["app"].as_str().is_some_and(|a| !a.is_empty()), "{ready}");
    assert_eq!(ready["pid"].as_u64(), Some(u64::from(worker.child.id())));
    let acquired = worker.wait_for("acquired");
    assert_eq!(acquired["channel"], channel.as_str());
    assert_eq!(acquired["token"], 1);
    assert!(acquired["t_us"]
        .as_u64()
        .is_some_and(|t| t > ready["t_us"].as_u64().unwrap_or(u64::MAX) - 1));

    let status = run_bounded(
        Command::new(BIN).args([
            "status",
            "--database-url",
            &database_url(),
            "--schema",
            &schema,
            "--protocol",
            "lease",
        ]),
        WAIT,
    );
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let row = text
        .lines()
        .find(|line| line.contains(channel.as_str()))
        .unwrap_or_else(|| panic!("no row for {channel}:\n{text}"));
    let app = ready["app"].as_str().unwrap_or_default();
    assert!(row.contains(app), "holder missing: {row}");
    assert!(row.contains(" yes "), "holder not alive: {row}");
    assert!(row.contains("s left"), "no remaining lease: {row}");
    assert!(
        !text.contains("classic"),
        "--protocol lease shows only the lease table:\n{text}"
    );

    // A notification reaches the holder as a `message` line, quotes and all.
    execute(&format!("SELECT pg_notify('{channel}', 'say \"hi\"')"));
    let message = worker.wait_for("message");
    assert_eq!(message["payload"], "say \"hi\"");

    let (exit, lines) = worker.terminate();
    assert!(exit.success(), "worker exit status {exit}");
    let rest: Vec<Value> = lines.try_iter().collect();
    assert!(
        rest.iter()
            .any(|l| l["event"] == "released" && l["channel"] == channel.as_str()),
        "no released line after SIGTERM: {rest:?}"
    );
}

#[test]
fn worker_refuses_bad_input_with_exit_code_2() {
    let url = database_url();
    let long_channel = "c".repeat(60);
    let long_schema = "s".repeat(64);
    let cases: Vec<Vec<&str>> = vec![
        vec!["--database-url", &url, "--channel", ""],
        vec!["--database-url", &url, "--channel", &long_channel],
        vec!["--database-url", "postgres://host:notaport/db", "--channel", "jobs"],
        vec!["--database-url", &url, "--channel", "jobs", "--acquire-interval", "5"],
        vec!["--database-url", &url, "--channel", "jobs", "--protocol", "paxos"],
        vec!["--database-url", &url, "--channel", "jobs", "--schema", &long_schema],
        vec![
            "--database-url",
            &url,
            "--channel",
            "jobs",
            "--protocol",
            "classic",
            "--lease-ttl",
            "3s",
        ],
        vec!["--channel", "jobs"],
    ];
    for args in cases {
        let output = run_bounded(Command::new(BIN).arg("worker").args(&args), WAIT);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "args {args:?}: stderr {stderr}");
        assert!(!stderr.trim().is_empty(), "args {args:?}: no message on stderr");
        assert!(output.stdout.is_empty(), "args {args:?}: stdout {:?}", output.stdout);
    }
}

/// A duration without a unit is refused, by the rule of every CLI of the project, with a
/// message that says what to write.
#[test]
fn worker_refuses_a_duration_without_a_unit() {
    let url = database_url();
    for (flag, value) in [
        ("--acquire-interval", "5"),
        ("--lease-ttl", "10"),
        ("--wake-jitter", "0"),
    ] {
        let output = run_bounded(
            Command::new(BIN)
                .arg("worker")
                .args(["--database-url", &url, "--channel", "jobs", flag, value]),
            WAIT,
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {stderr}");
        let expected = format!(
            "error: invalid value '{value}' for '{flag} <DURATION>': `{value}` has no unit: write {value}s or {value}ms"
        );
        assert_eq!(stderr.lines().next(), Some(expected.as_str()), "{stderr}");
    }
}

/// Runs the demo and returns its stdout; checks the exit code and the summary line.
fn run_demo(args: &[&str], env_url: Option<&str>) -> Option<String> {
    let mut command = Command::new(BIN);
    command.arg("demo").args(args).env_remove("DATABASE_URL");
    if let Some(url) = env_url {
        command.env("DATABASE_URL", url);
    }
    let output = run_bounded(&mut command, DEMO_WAIT);
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    if env_url.is_none() && args.is_empty() && stderr.contains("not found") {
        eprintln!("skipped: {stderr}");
        return None;
    }
    assert!(
        output.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let summary = stdout
        .lines()
        .find(|line| line.starts_with("summary: "))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}"));
    for key in [
        "handover_ms=",
        "failover_ms=",
        "published=",
        "delivered=",
        "lost=",
        "duplicated=",
    ] {
        assert!(summary.contains(key), "{key} missing: {summary}");
    }
    assert!(stdout.contains("SIGTERM to w"), "{stdout}");
    assert!(stdout.contains("SIGKILL to"), "{stdout}");
    if env_url.is_some() || args.contains(&"--database-url") {
        // The demo's schema is gone.
        let schema = stderr
            .split_whitespace()
            .find(|word| word.starts_with("pgiplock_demo_"))
            .unwrap_or_else(|| panic!("no schema named in the progress output:\n{stderr}"))
            .trim_end_matches(',');
        assert!(!schema_exists(schema), "{schema} left behind");
    }
    Some(stdout)
}

#[test]
fn demo_runs_against_a_given_database() {
    let url = database_url();
    let lease = run_demo(&["--database-url", &url, "--messages", "60"], None).unwrap_or_default();
    assert!(lease.contains("protocol=lease"), "{lease}");
    // The URL may also come from DATABASE_URL.
    let classic = run_demo(&["--protocol", "classic", "--messages", "60"], Some(&url)).unwrap_or_default();
    assert!(classic.contains("protocol=classic"), "{classic}");
}

#[test]
fn demo_starts_its_own_cluster_without_a_database_url() {
    if let Some(stdout) = run_demo(&[], None) {
        assert!(stdout.contains("protocol=lease"), "{stdout}");
    }
}

/// The one `pgiplock: ...` line a failed command prints on stderr.
fn failure_line(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    stderr
        .lines()
        .find(|l| l.starts_with("pgiplock: "))
        .unwrap_or_else(|| panic!("no error line on stderr: {stderr}"))
        .to_owned()
}

#[test]
fn connection_failures_print_each_fact_once() {
    let mut url: tokio_postgres::Config = database_url().parse().expect("test database url");
    url.dbname("no_such_db_xyz");
    let tokio_postgres::config::Host::Tcp(host) = &url.get_hosts()[0] else {
        panic!("the test server is reached over TCP");
    };
    let port = url.get_ports().first().copied().unwrap_or(5432);
    let missing_db = format!("postgres://postgres@{host}:{port}/no_such_db_xyz");
    let output = run_bounded(
        Command::new(BIN).args(["worker", "--database-url", &missing_db, "--channel", "jobs"]),
        WAIT,
    );
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        failure_line(&output),
        r#"pgiplock: cannot connect to PostgreSQL: database "no_such_db_xyz" does not exist (SQLSTATE 3D000)"#
    );
    let output = run_bounded(Command::new(BIN).args(["status", "--database-url", &missing_db]), WAIT);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        failure_line(&output),
        r#"pgiplock: connecting to the database: database "no_such_db_xyz" does not exist (SQLSTATE 3D000)"#
    );

    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a loopback port")
        .port();
    let refused = format!("postgres://postgres@127.0.0.1:{unused}/test");
    let output = run_bounded(
        Command::new(BIN).args(["worker", "--database-url", &refused, "--channel", "jobs"]),
        WAIT,
    );
    assert_eq!(output.status.code(), Some(1));
    let line = failure_line(&output);
    assert!(
        line.starts_with("pgiplock: cannot connect to PostgreSQL: error connecting to server: "),
        "{line}"
    );
    assert_eq!(line.matches("error connecting to server").count(), 1, "{line}");
    #[cfg(target_os = "linux")]
    assert_eq!(
        line,
        "pgiplock: cannot connect to PostgreSQL: error connecting to server: Connection refused (os error 111)"
    );
}
