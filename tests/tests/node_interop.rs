//! `Classic` interoperates with Node processes of `@imqueue/pg-pubsub` 1.10.0 sharing one lock
//! (same schema, table, functions, trigger and `__PgIpLock__:<channel>`).
//!
//! The package is installed with npm into a temporary folder at test time; the Node side is
//! `tests/node/holder.js`, which prints the worker's JSON events. Without `node` or `npm` (or
//! with env `PGIPLOCK_SKIP_NODE` set) the test prints why and passes without running, except
//! under `CI`, where `scripts/test` installs them and their absence fails the test.
//!
//! Ten handovers each way: the holder (Rust or Node) gets SIGTERM while one standby of the other
//! kind waits; after each, a published message reaches exactly the new holder, and no message
//! is delivered twice. Before the fix, a Rust holder's drain marker on the lock channel woke Node
//! standbys while it still held, and the fleet was left without a working holder.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pgiplock_tests::*;

const PACKAGE: &str = "@imqueue/pg-pubsub@1.10.0";
const HANDOVERS_EACH_WAY: usize = 10;
const STARTUP: Duration = Duration::from_secs(20);
const HANDOVER: Duration = Duration::from_secs(5);

/// The temporary npm folder, removed on drop.
struct NodeModules {
    dir: PathBuf,
}

impl Drop for NodeModules {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("warning: removing {} failed: {e}", self.dir.display());
        }
    }
}

/// Why the test cannot run here, if it cannot.
async fn node_missing() -> Option<String> {
    if std::env::var_os("PGIPLOCK_SKIP_NODE").is_some() {
        return Some("PGIPLOCK_SKIP_NODE is set".to_owned());
    }
    for tool in ["node", "npm"] {
        let probe = tokio::process::Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status();
        let missing = match tokio::time::timeout(Duration::from_secs(20), probe).await {
            Ok(Ok(status)) if status.success() => continue,
            Ok(Ok(status)) => format!("`{tool} --version` failed ({status})"),
            Ok(Err(e)) => format!("`{tool}` cannot be run: {e}"),
            Err(_) => format!("`{tool} --version` did not answer in 20 s"),
        };
        // CI installs Node (scripts/test): there a missing tool is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "{missing} (CI is set, and scripts/test installs Node.js and npm)"
        );
        return Some(missing);
    }
    None
}

/// `npm install` of the package into a fresh temporary folder (bounded; panics on failure).
async fn install_package() -> NodeModules {
    let dir = std::env::temp_dir().join(format!("pgiplock-node-{}", unique_hex()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let modules = NodeModules { dir };
    let install = tokio::process::Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--no-save",
            "--loglevel=error",
            "--prefix",
        ])
        .arg(&modules.dir)
        .arg(PACKAGE)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(180), install).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("npm install {PACKAGE}: {e}"),
        Err(_) => panic!("npm install {PACKAGE} took more than 180 s"),
    };
    assert!(
        output.status.success(),
        "npm install {PACKAGE} failed ({}); set PGIPLOCK_SKIP_NODE=1 to skip this test offline\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    modules
}

/// A Node holder process on `opts.channel` in `opts.schema`.
fn node_command(modules: &Path, opts: &WorkerOpts) -> tokio::process::Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("node/holder.js");
    let mut command = tokio::process::Command::new("node");
    command
        .arg(script)
        .env("PGIPLOCK_NODE_MODULES", modules)
        .env("DATABASE_URL", &opts.database_url)
        .env("CHANNEL", &opts.channel)
        .env("PG_PUBSUB_SCHEMA_NAME", opts.schema.as_deref().unwrap_or("pgip_lock"))
        // Standbys wake on the release notification only: no periodic attempt interferes.
        .env("ACQUIRE_INTERVAL_MS", "60000")
        // The package exits this long after SIGTERM (its release is done well before).
        .env("PG_PUBSUB_SHUTDOWN_TIMEOUT", "300");
    command
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Rust,
    Node,
}

fn summary(latencies: &[f64]) -> String {
    let mut sorted = latencies.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    format!(
        "median {:.1} ms [{:.1}–{:.1}] over {}",
        at(0.5),
        sorted[0],
        sorted[sorted.len() - 1],
        sorted.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_fleet_of_node_and_rust_classic_processes_hands_over_both_ways() {
    if let Some(why) = node_missing().await {
        println!("skipping the Node interoperability test: {why}");
        return;
    }
    let _heavy = heavy_guard().await;
    let modules = install_package().await;
    let schema = TestSchema::new();
    let opts = worker_opts(&schema, Protocol::Classic).acquire_interval(Duration::from_secs(60));
    let mut fleet = Fleet::new(opts.clone());
    let publisher = Publisher::connect(&database_url()).await;

    // A Rust worker first: it creates the schema exactly as the package would.
    let mut holder = (fleet.spawn(), Kind::Rust);
    fleet.wait_ready(holder.0, STARTUP).await;
    fleet
        .wait_event(holder.0, 0, "acquired", STARTUP, |k| {
            matches!(k, EventKind::Acquired { .. })
        })
        .await;

    let mut latencies: Vec<(Kind, Kind, f64)> = Vec::new();
    let mut node_workers: Vec<usize> = Vec::new();
    let mut published = 0u64;
    for round in 0..2 * HANDOVERS_EACH_WAY {
        // One standby of the other kind.
        let standby_kind = match holder.1 {
            Kind::Rust => Kind::Node,
            Kind::Node => Kind::Rust,
        };
        let standby = match standby_kind {
            Kind::Rust => fleet.spawn(),
            Kind::Node => fleet.spawn_command(node_command(&modules.dir, &opts)),
        };
        if standby_kind == Kind::Node {
            node_workers.push(standby);
        }
        // Ready means listening for releases: a Node standby prints it after its lock's setup and
        // first attempt, a Rust worker after `init`.
        fleet.wait_ready(standby, STARTUP).await;

        // The holder works: three messages, each delivered by it alone.
        for _ in 0..3 {
            deliver_by(&fleet, &publisher, &opts.channel, &mut published, holder.0, round).await;
        }

        let t_stop = now_us();
        fleet.worker(holder.0).terminate();
        let (next, t_acquired, _) = fleet.wait_acquired_after(t_stop, &[holder.0], HANDOVER).await;
        assert_eq!(next, standby, "round {round}: the standby takes over");
        latencies.push((holder.1, standby_kind, ms(t_stop, t_acquired)));
        fleet.wait_exit(holder.0, HANDOVER).await;
        holder = (standby, standby_kind);

        // One working holder: the next message reaches the new holder.
        deliver_by(&fleet, &publisher, &opts.channel, &mut published, holder.0, round).await;
    }
    // A last message after the last handover, then a quiet moment for any late duplicate.
    tokio::time::sleep(Duration::from_millis(300)).await;

    for (from, to) in [(Kind::Rust, Kind::Node), (Kind::Node, Kind::Rust)] {
        let these: Vec<f64> = latencies
            .iter()
            .filter(|(f, t, _)| (*f, *t) == (from, to))
            .map(|(_, _, l)| *l)
            .collect();
        assert_eq!(these.len(), HANDOVERS_EACH_WAY);
        println!("handover {from:?} -> {to:?} (SIGTERM -> acquired): {}", summary(&these));
    }
    let delivered = fleet.deliveries();
    assert_eq!(
        delivered.len() as u64,
        published,
        "every message delivered\n{}",
        fleet.timeline().dump()
    );
    fleet.assert_well_formed();
    fleet.assert_no_duplicates();
    assert_overlaps_only_as_node_reports_them(&fleet, &node_workers);
    fleet.shutdown(Duration::from_secs(10)).await;
    drop(modules);
}

/// Publishes the next numbered message and checks that worker `holder` alone delivers it.
async fn deliver_by(
    fleet: &Fleet,
    publisher: &Publisher,
    channel: &str,
    published: &mut u64,
    holder: usize,
    round: usize,
) {
    let payload = format!("\"m{published}\"");
    *published += 1;
    publisher.publish(channel, &payload).await;
    let by = fleet.wait_delivered(&payload, HANDOVER).await;
    assert_eq!(
        by,
        holder,
        "round {round}: {payload} delivered by w{by}\n{}",
        fleet.timeline().dump()
    );
}

/// A Node holder has no drain marker: it can only report the end of its tenure once its
/// release's `DELETE` has returned, while a Rust standby woken by that very commit may already
/// have acquired. So a Node tenure may seem to outlast the next holder's start by about one
/// round trip; anything else is a real overlap. Either way no message may be delivered by the
/// earlier holder after the next one began.
fn assert_overlaps_only_as_node_reports_them(fleet: &Fleet, node_workers: &[usize]) {
    const REPORTING_SLACK_US: i64 = 50_000;
    let intervals = fleet.intervals();
    let events = fleet.events();
    for a in &intervals {
        for b in &intervals {
            if a.worker == b.worker || a.start_us >= b.start_us {
                continue;
            }
            let a_end = a.end_us.unwrap_or(i64::MAX);
            if a_end <= b.start_us {
                continue;
            }
            assert!(
                node_workers.contains(&a.worker) && a_end - b.start_us <= REPORTING_SLACK_US,
                "holding intervals overlap beyond a Node holder's reporting delay:\n  {a:?}\n  {b:?}\n{}",
                fleet.timeline().dump()
            );
            let late = events.iter().any(|e| {
                e.worker == a.worker
                    && e.t_us > b.start_us
                    && e.t_us <= a_end
                    && matches!(e.kind, EventKind::Message { .. })
            });
            assert!(
                !late,
                "w{} delivered after w{} acquired\n{}",
                a.worker,
                b.worker,
                fleet.timeline().dump()
            );
        }
    }
}
