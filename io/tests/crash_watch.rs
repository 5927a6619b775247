//! The crash watch against a real server: a standby waits on its holder's session over a second
//! connection and takes over as soon as that session ends, before the lease expires; without
//! the watch (turned off, its connection killed, a holder without the advisory lock, a silent
//! holder) the lease's expiry bounds the takeover as before.

mod common;

use std::time::Duration;

use common::*;
use pgiplock::{LockOptions, Protocol, Session};
use tokio_postgres::Client;

/// Lease 3 s, retries only at the lease's end (the default interval of 30 s is longer): an
/// attempt before the old lease's expiry can only come from the watch.
fn watch_options(schema: &str) -> LockOptions {
    LockOptions::new()
        .schema(schema)
        .lease_ttl(Duration::from_secs(3))
        .shutdown_timeout(Duration::from_secs(2))
}

/// The watch backend of `session` once its wait runs: its pid and the wait's start.
async fn wait_watching(admin: &Client, session: &Session) -> (i32, String) {
    wait_watch_state(admin, session, "active").await
}

async fn wait_watch_state(admin: &Client, session: &Session, state: &str) -> (i32, String) {
    let app = format!("{}/watch", session.app_name());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let row = admin
            .query_opt(
                "SELECT pid, query_start::text FROM pg_stat_activity WHERE application_name = $1 \
                 AND state = $2 AND query LIKE '%await_holder%'",
                &[&app, &state],
            )
            .await
            .expect("pg_stat_activity");
        if let Some(row) = row {
            return (row.get(0), row.get(1));
        }
        assert!(tokio::time::Instant::now() < deadline, "no {state} wait of {app}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The channel's row: holder, `acquired_at` and `expires_at` as text comparable by the server.
async fn lease_row(admin: &Client, schema: &str, channel: &str) -> (Option<String>, String, String) {
    let sql = format!(
        "SELECT holder, acquired_at::text, expires_at::text FROM {}.lease WHERE channel = $1",
        pgiplock_core::quote_ident(schema)
    );
    let row = admin.query_one(&sql, &[&channel]).await.expect("lease row");
    (row.get(0), row.get(1), row.get(2))
}

/// Kills the holder `dead` (its session task aborted, as at a SIGKILL), waits until its backend
/// left and `successor` holds; the old lease's expiry, then the new row's holder and acquisition.
async fn kill_and_take_over(
    admin: &Client,
    schema: &str,
    channel: &str,
    dead: Session,
    successor: &pgiplock::PgIpLock,
) -> (String, Option<String>, String) {
    let dead_app = dead.app_name();
    dead.abort_task();
    wait_backend_gone(admin, &dead_app).await;
    let (_, _, old_expiry) = lease_row(admin, schema, channel).await;
    wait_acquired(successor).await;
    let (holder, acquired_at, _) = lease_row(admin, schema, channel).await;
    (old_expiry, holder, acquired_at)
}

async fn before(admin: &Client, a: &str, b: &str) -> bool {
    admin
        .query_one("SELECT $1::text::timestamptz < $2::text::timestamptz", &[&a, &b])
        .await
        .expect("compare")
        .get(0)
}

/// A holder whose process dies (its session task aborted: the connection drops, as at a
/// SIGKILL) is replaced as soon as the server ends its session, before its lease expires.
#[tokio::test]
async fn a_dead_holder_is_replaced_before_its_lease_expires() {
    let schema = unique("t_watch");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let admin = admin().await;
    let s1 = session().await;
    let l1 = s1.lock(&channel, watch_options(&schema)).unwrap();
    l1.init().await.unwrap();
    wait_acquired(&l1).await;
    let s2 = session().await;
    let l2 = s2.lock(&channel, watch_options(&schema)).unwrap();
    l2.init().await.unwrap();
    wait_watching(&admin.client, &s2).await;
    let (_, _, old_expiry) = lease_row(&admin.client, &schema, &channel).await;
    s1.abort_task();
    wait_acquired(&l2).await;
    let (holder, acquired_at, _) = lease_row(&admin.client, &schema, &channel).await;
    assert_eq!(holder.as_deref(), Some(s2.app_name().as_str()));
    assert!(
        before(&admin.client, &acquired_at, &old_expiry).await,
        "taken over at {acquired_at}, not before the dead holder's lease expired at {old_expiry}"
    );
    s2.close().await;
}

/// `crash_watch(false)`: no second connection, and the takeover waits for the lease's expiry.
#[tokio::test]
async fn without_the_watch_the_takeover_waits_for_the_lease() {
    let schema = unique("t_watch");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let admin = admin().await;
    let s1 = session().await;
    let l1 = s1.lock(&channel, watch_options(&schema)).unwrap();
    l1.init().await.unwrap();
    wait_acquired(&l1).await;
    let s2 = session().await;
    let l2 = s2.lock(&channel, watch_options(&schema).crash_watch(false)).unwrap();
    l2.init().await.unwrap();
    assert!(!l2.acquire().await.unwrap(), "refused by the holder");
    let (old_expiry, _, acquired_at) = kill_and_take_over(&admin.client, &schema, &channel, s1, &l2).await;
    assert!(!before(&admin.client, &acquired_at, &old_expiry).await);
    let watches: i64 = admin
        .client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("{}/watch", s2.app_name())],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(watches, 0, "no watch connection with crash_watch(false)");
    s2.close().await;
}

/// The watch connection killed: the watch connects again after the acquire interval and works.
#[tokio::test]
async fn a_killed_watch_connection_comes_back() {
    let schema = unique("t_watch");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let admin = admin().await;
    let options = || watch_options(&schema).acquire_interval(Duration::from_secs(1));
    let s1 = session().await;
    let l1 = s1.lock(&channel, options()).unwrap();
    l1.init().await.unwrap();
    wait_acquired(&l1).await;
    let s2 = session().await;
    let l2 = s2.lock(&channel, options()).unwrap();
    l2.init().await.unwrap();
    let (first, _) = wait_watching(&admin.client, &s2).await;
    admin
        .client
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let second = loop {
        let (pid, _) = wait_watching(&admin.client, &s2).await;
        if pid != first {
            break pid;
        }
        assert!(tokio::time::Instant::now() < deadline, "the watch did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(second, first);
    assert!(!l2.is_acquired());
    let (_, _, old_expiry) = lease_row(&admin.client, &schema, &channel).await;
    s1.abort_task();
    wait_acquired(&l2).await;
    let (_, acquired_at, _) = lease_row(&admin.client, &schema, &channel).await;
    assert!(before(&admin.client, &acquired_at, &old_expiry).await);
    s2.close().await;
}

/// A short refresh: the wait returns and is issued again while the holder lives.
#[tokio::test]
async fn the_wait_is_issued_again_at_each_refresh() {
    let schema = unique("t_watch");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let admin = admin().await;
    let s1 = session().await;
    let l1 = s1.lock(&channel, watch_options(&schema)).unwrap();
    l1.init().await.unwrap();
    wait_acquired(&l1).await;
    let s2 = session().await;
    let options = watch_options(&schema).crash_watch_refresh(Duration::from_millis(300));
    let l2 = s2.lock(&channel, options).unwrap();
    l2.init().await.unwrap();
    let (pid, start) = wait_watching(&admin.client, &s2).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (again_pid, again) = wait_watching(&admin.client, &s2).await;
        if again != start {
            assert_eq!(again_pid, pid, "the same watch connection");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the wait was not issued again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(l1.is_acquired() && !l2.is_acquired());
    s1.close().await;
    s2.close().await;
}

/// A raw holder: `acquire_v2` on a connection of its own, optionally holding the advisory lock
/// every `Lease` session takes, never renewing (silent).
async fn raw_holder(schema: &str, channel: &str, advisory: bool) -> RawClient {
    let holder = raw_client(&unique("raw")).await;
    if advisory {
        let key = pgiplock::testkit::holder_key(&pgiplock_core::SchemaName::new(schema).unwrap());
        holder
            .client
            .execute("SELECT pg_advisory_lock($1, pg_backend_pid())", &[&key])
            .await
            .unwrap();
    }
    let sql = format!(
        "SELECT acquired FROM {}.acquire_v2($1, $2, $3, 3000000)",
        pgiplock_core::quote_ident(schema)
    );
    let lock_channel = format!("{}{channel}", pgiplock_core::LOCK_CHANNEL_PREFIX);
    let acquired: bool = holder
        .client
        .query_one(&sql, &[&channel, &lock_channel, &holder.app])
        .await
        .unwrap()
        .get(0);
    assert!(acquired);
    holder
}

async fn bootstrapped_session(schema: &str) -> Session {
    let s = session().await;
    let boot = s.lock(&unique("boot"), watch_options(schema)).unwrap();
    boot.init().await.unwrap();
    boot.destroy().await.unwrap();
    s
}

/// A holder without the advisory lock (an older version): the wait answers `unwatched` and
/// the standby takes over at the lease's expiry, as before.
#[tokio::test]
async fn a_holder_without_the_advisory_lock_is_unwatched() {
    let schema = unique("t_watch");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let admin = admin().await;
    let s2 = bootstrapped_session(&schema).await;
    let _holder = raw_holder(&schema, &channel, false).await;
    let l2 = s2.lock(&channel, watch_options(&schema)).unwrap();
    l2.init().await.unwrap();
    wait_watch_state(&admin.client, &s2, "idle").await;
    let (_, _, old_expiry) = lease_row(&admin.client, &schema, &channel).await;
    wait_acquired(&l2).await;
    let (_, acquired_at, _) = lease_row(&admin.client, &schema, &channel).await;
    assert!(!before(&admin.client, &acquired_at, &old_expiry).await);
    s2.close().await;
}

/// A silent holder (its session alive, its lease not renewed): the wait answers `expired` at
/// the lease's end and the standby takes over then (terminating the stale session, as
/// before); the ttl still bounds it.
#[tokio::test]
async fn a_silent_holder_is_still_bounded_by_its_lease() {
    let schema = unique("t_watch");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let admin = admin().await;
    let s2 = bootstrapped_session(&schema).await;
    let _holder = raw_holder(&schema, &channel, true).await;
    let l2 = s2.lock(&channel, watch_options(&schema)).unwrap();
    l2.init().await.unwrap();
    wait_watching(&admin.client, &s2).await;
    let (_, _, old_expiry) = lease_row(&admin.client, &schema, &channel).await;
    wait_acquired(&l2).await;
    let (_, acquired_at, _) = lease_row(&admin.client, &schema, &channel).await;
    assert!(!before(&admin.client, &acquired_at, &old_expiry).await);
    s2.close().await;
}

/// The wait procedure itself, on connections of the test's own: `timeout` at its bound while the
/// holder lives, `gone` when its session ends, and only once `pg_stat_activity` no longer shows
/// it (a dying backend drops its advisory locks first), so that an attempt right after sees the
/// holder gone; `gone` at once when its session ended before the wait began (the crash raced the
/// wait's start); `unwatched` for a live session holding no advisory lock.
#[tokio::test]
async fn the_wait_answers_each_outcome_and_gone_only_once_the_backend_left() {
    use pgiplock_core::{AwaitOutcome, SchemaName};
    let schema = unique("t_watch");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let admin = admin().await;
    let s = bootstrapped_session(&schema).await;
    let name = SchemaName::new(&schema).unwrap();
    let holder = raw_holder(&schema, &channel, true).await;
    let waiter = raw_client(&unique("waiter")).await;
    let max = Duration::from_millis(50);
    let outcome = pgiplock::testkit::await_holder(&waiter.client, &name, holder.pid, max)
        .await
        .unwrap();
    assert_eq!(outcome, AwaitOutcome::Timeout);
    let outcome = pgiplock::testkit::await_holder(&waiter.client, &name, waiter.pid, max)
        .await
        .unwrap();
    assert_eq!(outcome, AwaitOutcome::Unwatched);
    let wait = pgiplock::testkit::await_holder(&waiter.client, &name, holder.pid, WAIT);
    let kill = async {
        wait_watch_query(&admin.client, waiter.pid).await;
        admin
            .client
            .execute("SELECT pg_terminate_backend($1)", &[&holder.pid])
            .await
            .unwrap();
    };
    let (outcome, ()) = tokio::join!(wait, kill);
    assert_eq!(outcome.unwrap(), AwaitOutcome::Gone);
    let listed: i64 = admin
        .client
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", &[&holder.pid])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        listed, 0,
        "gone answered while the holder was still in pg_stat_activity"
    );
    // A holder whose session ended before the wait looked (a crash racing the wait's start).
    let outcome = pgiplock::testkit::await_holder(&waiter.client, &name, holder.pid, max)
        .await
        .unwrap();
    assert_eq!(outcome, AwaitOutcome::Gone);
    s.close().await;
}

/// Until backend `pid` runs the wait.
async fn wait_watch_query(admin: &Client, pid: i32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active' AND query LIKE '%await_holder%'",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the wait did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A role at its connection limit (`CONNECTION LIMIT 1`): the standby's listening connection
/// takes the role's one slot, the crash watch's connection is refused for the limit (SQLSTATE
/// 53300), and the standby falls back to the lease: a dead holder is taken over once its lease
/// expired, not before, and the role never had a second connection.
#[tokio::test]
async fn at_the_connection_limit_the_standby_falls_back_to_the_lease() {
    let schema = unique("t_watch");
    let _cleanup = SchemaGuard::new(&schema);
    let role = unique("pgiplock_limited");
    let _role_cleanup = RoleGuard(role.clone());
    let channel = unique("jobs");
    let admin = admin().await;
    let s1 = session().await;
    let l1 = s1.lock(&channel, watch_options(&schema)).unwrap();
    l1.init().await.unwrap();
    wait_acquired(&l1).await;
    let qr = pgiplock_core::quote_ident(&role);
    admin
        .client
        .batch_execute(&format!(
            "CREATE ROLE {qr} LOGIN CONNECTION LIMIT 1; {}",
            grants(Protocol::Lease, &schema, &role)
        ))
        .await
        .expect("create the role and grant");
    let mut as_role = config();
    as_role.user(&role);
    let s2 = Session::connect(as_role).await.expect("connect as the role");
    let l2 = s2.lock(&channel, watch_options(&schema)).unwrap();
    l2.init().await.unwrap();
    assert!(!l2.acquire().await.unwrap(), "refused by the holder");
    let (old_expiry, holder, acquired_at) = kill_and_take_over(&admin.client, &schema, &channel, s1, &l2).await;
    assert_eq!(holder.as_deref(), Some(s2.app_name().as_str()));
    assert!(
        !before(&admin.client, &acquired_at, &old_expiry).await,
        "taken over at {acquired_at}, before the lease's expiry at {old_expiry}: no watch could run"
    );
    let connections: i64 = admin
        .client
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", &[&role])
        .await
        .unwrap()
        .get(0);
    assert_eq!(connections, 1, "the role's one slot, its listening connection");
    s2.close().await;
}
