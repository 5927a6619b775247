//! Helpers shared by the io crate's tests: the server, unique names, raw clients that receive
//! notifications, and bounded waits.
#![allow(dead_code)]

use std::time::Duration;

use futures::future::poll_fn;
use pgiplock::{LockMessage, LockOptions, Protocol, Session, Subscription};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

/// Upper bound of every wait in these tests (generous: CI machines are slow).
pub const WAIT: Duration = Duration::from_secs(20);

/// The test server.
pub fn config() -> Config {
    let url = std::env::var("PGIPLOCK_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    url.parse()
        .expect("PGIPLOCK_TEST_DATABASE_URL is not a valid connection string")
}

/// A name unique to this test run: `<prefix>_<12 hex>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A plain connection with its own application name, whose notifications and end are
/// forwarded to `notifications` / `closed`.
pub struct RawClient {
    pub client: Client,
    pub app: String,
    pub pid: i32,
    pub notifications: mpsc::UnboundedReceiver<(String, String)>,
    pub closed: tokio::sync::watch::Receiver<bool>,
}

pub async fn raw_client(app: &str) -> RawClient {
    let mut config = config();
    config.application_name(app);
    let (client, mut connection) = config.connect(NoTls).await.expect("connect to the test server");
    let (tx, notifications) = mpsc::unbounded_channel();
    let (closed_tx, closed) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
        let _ = closed_tx.send(true);
    });
    let pid = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("backend pid")
        .get(0);
    RawClient {
        client,
        app: app.to_owned(),
        pid,
        notifications,
        closed,
    }
}

impl RawClient {
    /// The next notification, within [`WAIT`].
    pub async fn notification(&mut self) -> (String, String) {
        tokio::time::timeout(WAIT, self.notifications.recv())
            .await
            .expect("timed out waiting for a notification")
            .expect("connection ended")
    }

    /// Waits until the connection has ended, within [`WAIT`].
    pub async fn wait_closed(&mut self) {
        tokio::time::timeout(WAIT, self.closed.wait_for(|c| *c))
            .await
            .expect("timed out waiting for the connection to end")
            .expect("watch closed");
    }
}

/// An administrative connection (for publishing, inspecting and cleaning up).
pub async fn admin() -> RawClient {
    raw_client(&unique("admin")).await
}

/// Drops `schema` and everything in it.
pub async fn drop_schema(schema: &str) {
    let admin = admin().await;
    admin
        .client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            pgiplock_core::quote_ident(schema)
        ))
        .await
        .expect("drop schema");
}

/// Waits until no backend has `application_name = app` any more.
pub async fn wait_backend_gone(admin: &Client, app: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if n == 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "backend {app} still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `payload` on `channel` from `admin`.
pub async fn publish(admin: &Client, channel: &str, payload: &str) {
    admin
        .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await
        .expect("pg_notify");
}

/// The next message of `sub` matching `pred`, skipping others, within [`WAIT`].
pub async fn next_matching(sub: &mut Subscription, what: &str, pred: impl Fn(&LockMessage) -> bool) -> LockMessage {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(m)) if pred(&m) => return m,
            Ok(Some(_)) => {}
            Ok(None) => panic!("subscription ended while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Everything queued on `sub` right now.
pub fn queued(sub: &mut Subscription) -> Vec<LockMessage> {
    std::iter::from_fn(|| sub.try_next()).collect()
}

/// Drops a schema when the test ends, passed or panicked (the explicit `drop_schema` at the end
/// of a test reports errors; this guard makes sure a failed test leaves nothing behind either).
pub struct SchemaGuard(String);

impl SchemaGuard {
    pub fn new(schema: &str) -> SchemaGuard {
        SchemaGuard(schema.to_owned())
    }
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        cleanup(format!(
            "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {} CASCADE",
            pgiplock_core::quote_ident(&self.0)
        ));
    }
}

/// Runs a guard's cleanup `sql` on the test server, and waits for it. A guard may drop inside
/// the test's runtime, where blocking on a future is not allowed: the statement runs on a thread
/// with a runtime of its own. Best effort: a failure leaves what it would have removed.
fn cleanup(sql: String) {
    let cfg = config();
    let worker = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        runtime.block_on(async move {
            let (client, connection) = cfg.connect(tokio_postgres::NoTls).await.ok()?;
            let driver = tokio::spawn(connection);
            let result = client.batch_execute(&sql).await;
            drop(client);
            let _ = driver.await;
            result.ok()
        })
    });
    let _ = worker.join();
}

/// The tests' lock timings: short retries and lease, a bounded shutdown.
pub fn options(protocol: Protocol, schema: &str) -> LockOptions {
    LockOptions::new()
        .protocol(protocol)
        .schema(schema)
        .acquire_interval(Duration::from_secs(2))
        .lease_ttl(Duration::from_secs(3))
        .shutdown_timeout(Duration::from_secs(2))
}

/// Waits until `lock` holds, at most [`WAIT`] (on its state watch, not by polling).
pub async fn wait_acquired(lock: &pgiplock::PgIpLock) {
    let mut state = lock.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| s.is_holding()))
        .await
        .expect("the lock was not acquired in time")
        .expect("the lock stopped before it was acquired");
}

/// A session on the test server.
pub async fn session() -> Session {
    Session::connect(config()).await.expect("connect")
}

/// Whether `m` reports an acquisition.
pub fn is_acquired(m: &LockMessage) -> bool {
    matches!(m, LockMessage::Acquired { .. })
}

/// Drops the role (and revokes what it was granted) even when the test fails.
pub struct RoleGuard(pub String);

impl Drop for RoleGuard {
    fn drop(&mut self) {
        let qr = pgiplock_core::quote_ident(&self.0);
        cleanup(format!("DROP OWNED BY {qr}; DROP ROLE IF EXISTS {qr};"));
    }
}

/// The README's grants for `role` on `schema`.
pub fn grants(protocol: Protocol, schema: &str, role: &str) -> String {
    let qs = pgiplock_core::quote_ident(schema);
    let qr = pgiplock_core::quote_ident(role);
    match protocol {
        Protocol::Lease => format!(
            "GRANT USAGE ON SCHEMA {qs} TO {qr};
             GRANT SELECT, INSERT, UPDATE ON {qs}.lease TO {qr};
             GRANT SELECT, INSERT, UPDATE, DELETE ON {qs}.lease_waiter TO {qr};
             GRANT EXECUTE ON FUNCTION {qs}.acquire_v2, {qs}.renew_v2, {qs}.release_v2, {qs}.terminate_stale, \
               {qs}.renew_many, {qs}.acquire_many, {qs}.timeline, {qs}.next_token, {qs}.older_timeline, \
               {qs}.old_timeline_free_at TO {qr};
             GRANT EXECUTE ON PROCEDURE {qs}.await_holder TO {qr};"
        ),
        _ => format!(
            "GRANT USAGE ON SCHEMA {qs} TO {qr};
             GRANT SELECT, INSERT, UPDATE, DELETE ON {qs}.lock TO {qr};
             GRANT EXECUTE ON FUNCTION {qs}.deadlock_check, {qs}.notify_lock TO {qr};"
        ),
    }
}
