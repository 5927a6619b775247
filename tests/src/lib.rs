//! Shared helpers of the integration tests: real PostgreSQL, real `pgiplock worker` processes.
//!
//! - [`TestSchema`] and [`unique_channel`] isolate every test by unique names.
//! - [`Worker`] and [`Fleet`] run worker processes and collect their JSON events into one
//!   [`Timeline`]; the fleet's checkers (holding intervals, overlap, duplicates, tenure) read it.
//! - [`Publisher`] publishes numbered messages on a channel.
//! - [`BlackholeProxy`] forwards TCP and can silently stop forwarding (a network cut).
//!
//! Every wait is bounded and waits for an observable event; nothing sleeps in place of
//! synchronisation.

use std::sync::OnceLock;
use std::time::Duration;

mod db;
mod fleet;
mod timeline;
mod worker;

pub use db::{backends_of_app, connect, terminate_app, Listener, MessageStream, Publisher, TestSchema};
pub use fleet::{coverage, holding_intervals, EndKind, Fleet, Interval};
pub use pgiplock_testkit::proxy::BlackholeProxy;
pub use timeline::{now_us, Event, EventKind, Timeline};
pub use worker::{worker_binary, Worker, WorkerOpts};

pub use pgiplock_core::Protocol;

/// Both protocols, for tests that run a scenario under each.
pub const PROTOCOLS: [Protocol; 2] = [Protocol::Classic, Protocol::Lease];

/// The next message of `subscription` that `pred` accepts, within `within`; panics naming
/// `what` if the subscription ends or nothing matches in time (a bounded wait on an observable
/// event, never a sleep).
pub async fn next_message(
    subscription: &mut pgiplock::Subscription,
    what: &str,
    within: Duration,
    pred: impl Fn(&pgiplock::LockMessage) -> bool,
) -> pgiplock::LockMessage {
    tokio::time::timeout(within, async {
        loop {
            match subscription.next().await {
                Some(m) if pred(&m) => return m,
                Some(_) => {}
                None => panic!("subscription ended while waiting for {what}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} within {within:?}"))
}

/// The server the tests use: env `PGIPLOCK_TEST_DATABASE_URL`, else the local test database.
pub fn database_url() -> String {
    std::env::var("PGIPLOCK_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Worker settings for a fresh channel in `schema` on [`database_url`], under `protocol`.
pub fn worker_opts(schema: &TestSchema, protocol: Protocol) -> WorkerOpts {
    WorkerOpts::new(&database_url(), &unique_channel(), Some(schema.name()), protocol)
}

/// A short random hex string for unique names.
pub fn unique_hex() -> String {
    let simple = uuid::Uuid::new_v4().simple().to_string();
    simple[..16].to_owned()
}

/// A unique channel name (`c_<hex>`).
pub fn unique_channel() -> String {
    format!("c_{}", unique_hex())
}

/// A process-wide mutex for the heavy scenarios (many workers, many handovers, server
/// restarts): on a two-core machine they would otherwise starve each other and their timing
/// bounds would measure the scheduler, not the lock.
pub async fn heavy_guard() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    HEAVY.get_or_init(|| tokio::sync::Mutex::new(())).lock().await
}

/// Milliseconds between two `t_us` values, for printing.
pub fn ms(from_us: i64, to_us: i64) -> f64 {
    (to_us - from_us) as f64 / 1000.0
}

/// A `Duration` in microseconds, as `t_us` arithmetic wants it.
pub fn us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// The `n`-th forged Lease lock-channel payload of a rotating mix, given the channel's current
/// token: `draining`, `released`, `acquired` and `progress` of the current term, then `draining`
/// and `acquired` of a far newer one (what a role that can connect could send).
pub fn forged_lease_marker(n: u64, token: i64) -> String {
    let newer = token + 1000;
    match n % 6 {
        0 => format!("draining:{token}"),
        1 => format!("released:{token}"),
        2 => format!("acquired:{token}"),
        3 => format!("progress:{token}:999:999"),
        4 => format!("draining:{newer}"),
        _ => format!("acquired:{newer}"),
    }
}
