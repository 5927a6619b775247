//! The named successor (`Lease`): a release names the live standby that waited longest, by its
//! backend pid in the release marker; that standby attempts at once, the others a wake jitter
//! later. Waiters whose session is gone are forgotten, and a named successor that does not
//! attempt stalls nobody.
//!
//! The leases here are long (30 s) and the crash watch is off, so that no retry and no watch can
//! take over within the tests' waits: a takeover can only come from the release marker.

mod common;

use std::time::Duration;

use common::*;
use pgiplock::{LockOptions, PgIpLock, Protocol, Session};
use pgiplock_core::{quote_ident, ChannelName, Marker};
use tokio_postgres::Client;

fn handoff_options(schema: &str) -> LockOptions {
    options(Protocol::Lease, schema)
        .acquire_interval(Duration::from_secs(60))
        .lease_ttl(Duration::from_secs(30))
        .crash_watch(false)
}

/// A session whose lock on `channel` holds.
async fn holder(schema: &str, channel: &str) -> (Session, PgIpLock) {
    holder_with(handoff_options(schema), channel).await
}

async fn holder_with(options: LockOptions, channel: &str) -> (Session, PgIpLock) {
    let s = session().await;
    let l = s.lock(channel, options).unwrap();
    l.init().await.unwrap();
    wait_acquired(&l).await;
    (s, l)
}

/// A session whose lock on `channel` was refused once by its holder, and so waits.
async fn refused_standby(schema: &str, channel: &str) -> (Session, PgIpLock) {
    refused_standby_with(handoff_options(schema), channel).await
}

async fn refused_standby_with(options: LockOptions, channel: &str) -> (Session, PgIpLock) {
    let s = session().await;
    let l = s.lock(channel, options).unwrap();
    l.init().await.unwrap();
    assert!(!l.acquire().await.unwrap(), "refused by the holder");
    (s, l)
}

/// A connection listening on `channel`'s lock channel.
async fn lock_channel_listener(channel: &str) -> RawClient {
    let listener = raw_client(&unique("listener")).await;
    let lock_channel = ChannelName::new(channel).unwrap().lock_channel().to_owned();
    listener
        .client
        .batch_execute(&format!("LISTEN {}", quote_ident(&lock_channel)))
        .await
        .expect("listen");
    listener
}

/// The next release marker the listener hears.
async fn release_marker(listener: &mut RawClient) -> String {
    loop {
        let (_, payload) = listener.notification().await;
        if payload.starts_with("released:") {
            return payload;
        }
    }
}

async fn add_waiter(admin: &Client, schema: &str, channel: &str, app: &str, pid: i32) {
    let sql = format!(
        "INSERT INTO {}.lease_waiter (channel, app, pid, since) VALUES ($1, $2, $3, now() - INTERVAL '1 hour')",
        quote_ident(schema)
    );
    admin
        .execute(&sql, &[&channel, &app, &pid])
        .await
        .expect("add a waiter");
}

async fn waiters(admin: &Client, schema: &str, channel: &str) -> Vec<String> {
    let sql = format!(
        "SELECT app FROM {}.lease_waiter WHERE channel = $1 ORDER BY since, app COLLATE \"C\"",
        quote_ident(schema)
    );
    admin
        .query(&sql, &[&channel])
        .await
        .expect("waiters")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Two refused standbys and the row of a waiter whose session is gone (registered first): the
/// release forgets the dead one and names the standby refused first, which takes over; the
/// other stays a standby.
#[tokio::test]
async fn a_release_names_the_longest_waiting_live_standby_and_it_takes_over() {
    let schema = unique("t_handoff");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let admin = admin().await;
    let (s1, l1) = holder(&schema, &channel).await;
    let (s2, l2) = refused_standby(&schema, &channel).await;
    let (s3, l3) = refused_standby(&schema, &channel).await;
    let gone = unique("gone");
    add_waiter(&admin.client, &schema, &channel, &gone, i32::MAX).await;
    assert_eq!(
        waiters(&admin.client, &schema, &channel).await,
        vec![gone.clone(), s2.app_name(), s3.app_name()]
    );

    let mut listener = lock_channel_listener(&channel).await;
    l1.release().await.unwrap();
    let marker = release_marker(&mut listener).await;
    assert_eq!(Marker::successor(&marker), s2.backend_pid(), "{marker}");
    wait_acquired(&l2).await;
    assert!(!l3.is_acquired());
    // The winner left the waiters, and the dead one was forgotten.
    assert_eq!(waiters(&admin.client, &schema, &channel).await, vec![s3.app_name()]);
    for s in [s1, s2, s3] {
        s.close().await;
    }
}

/// A standby that removes its lock while its session stays open stops waiting: its `UNLISTEN`
/// batch deletes its waiter row, so the release names the standby that still listens. With no
/// listening waiter left, the release names nobody.
#[tokio::test]
async fn a_standby_that_removes_its_lock_is_named_no_more() {
    let schema = unique("t_handoff");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let admin = admin().await;
    let (s1, l1) = holder(&schema, &channel).await;
    let (s2, l2) = refused_standby(&schema, &channel).await;
    let (s3, l3) = refused_standby(&schema, &channel).await;
    assert_eq!(
        waiters(&admin.client, &schema, &channel).await,
        vec![s2.app_name(), s3.app_name()]
    );

    // The longest waiter leaves. Its connection runs statements in order, so once another lock
    // of its session is set up (its `LISTEN` answered), the `UNLISTEN` batch has committed.
    l2.destroy().await.unwrap();
    let other = s2.lock(&unique("other"), handoff_options(&schema)).unwrap();
    other.init().await.unwrap();
    assert_eq!(waiters(&admin.client, &schema, &channel).await, vec![s3.app_name()]);

    let mut listener = lock_channel_listener(&channel).await;
    l1.release().await.unwrap();
    let marker = release_marker(&mut listener).await;
    assert_eq!(Marker::successor(&marker), s3.backend_pid(), "{marker}");
    wait_acquired(&l3).await;

    // The old holder waits again and leaves too: the next release has nobody to name.
    assert!(!l1.acquire().await.unwrap(), "refused by the new holder");
    assert_eq!(waiters(&admin.client, &schema, &channel).await, vec![s1.app_name()]);
    l1.destroy().await.unwrap();
    let other1 = s1.lock(&unique("other"), handoff_options(&schema)).unwrap();
    other1.init().await.unwrap();
    assert!(waiters(&admin.client, &schema, &channel).await.is_empty());
    l3.release().await.unwrap();
    let marker = release_marker(&mut listener).await;
    assert_eq!(Marker::successor(&marker), None, "{marker}");
    for s in [s1, s2, s3] {
        s.close().await;
    }
}

/// A named successor that never attempts (a live session registered as the longest waiter):
/// the other standby takes over a wake jitter later, long before its retry would.
#[tokio::test]
async fn a_named_successor_that_does_not_attempt_stalls_nobody() {
    let schema = unique("t_handoff");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let admin = admin().await;
    let (s1, l1) = holder(&schema, &channel).await;
    let (s2, l2) = refused_standby(&schema, &channel).await;
    let idle = raw_client(&unique("idle")).await;
    add_waiter(&admin.client, &schema, &channel, &idle.app, idle.pid).await;

    let mut listener = lock_channel_listener(&channel).await;
    l1.release().await.unwrap();
    let marker = release_marker(&mut listener).await;
    assert_eq!(Marker::successor(&marker), Some(idle.pid), "{marker}");
    wait_acquired(&l2).await;
    for s in [s1, s2] {
        s.close().await;
    }
}

/// A session closed after its release named a successor keeps its connection until that
/// successor's `acquired` marker arrives. The linger here is far beyond the test's wait, so
/// `close` returns in time only because the marker came (and by then the successor's row is
/// committed); the successor's own close, whose release names nobody, does not wait at all.
#[tokio::test]
async fn close_waits_for_the_named_successor_and_for_nobody_else() {
    let schema = unique("t_handoff");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let admin = admin().await;
    let lingering = || {
        pgiplock::Session::connect_with(
            config(),
            tokio_postgres::NoTls,
            pgiplock::SessionOptions::new().handover_linger(Duration::from_secs(3600)),
        )
    };
    let s1 = lingering().await.expect("connect");
    let l1 = s1.lock(&channel, handoff_options(&schema)).unwrap();
    l1.init().await.unwrap();
    wait_acquired(&l1).await;
    let s2 = lingering().await.expect("connect");
    let l2 = s2.lock(&channel, handoff_options(&schema)).unwrap();
    l2.init().await.unwrap();
    assert!(!l2.acquire().await.unwrap(), "refused by the holder");

    tokio::time::timeout(WAIT, s1.close())
        .await
        .expect("the close waits for the successor's marker, not for the linger");
    let holder: Option<String> = admin
        .client
        .query_one(
            &format!("SELECT holder FROM {}.lease WHERE channel = $1", quote_ident(&schema)),
            &[&channel],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(holder, Some(s2.app_name()));
    wait_acquired(&l2).await;
    tokio::time::timeout(WAIT, s2.close())
        .await
        .expect("a release that named nobody closes at once");
}

/// The release is the holder's drain point by default: the lock channel hears its release
/// marker, then its `drained:<token>` word, and no drain marker of its own; the successor takes
/// over. With `drain_in_release(false)` the drain marker comes first and no `drained` word.
#[tokio::test]
async fn the_release_is_the_drain_point_unless_turned_off() {
    for in_release in [true, false] {
        let schema = unique("t_handoff");
        let _cleanup = SchemaGuard::new(&schema);
        let channel = unique("jobs");
        let opts = handoff_options(&schema).drain_in_release(in_release);
        let (s1, l1) = holder_with(opts.clone(), &channel).await;
        let (s2, l2) = refused_standby_with(opts, &channel).await;
        let mut listener = lock_channel_listener(&channel).await;
        l1.release().await.unwrap();
        wait_acquired(&l2).await;
        let mut heard: Vec<String> = Vec::new();
        let done = |heard: &[String]| {
            heard.iter().any(|p| p.starts_with("acquired:"))
                && (!in_release || heard.iter().any(|p| p.starts_with("drained:")))
        };
        while !done(&heard) {
            let (_, payload) = listener.notification().await;
            if !payload.starts_with("progress:") {
                heard.push(payload);
            }
        }
        let kinds: Vec<&str> = heard.iter().map(|p| p.split(':').next().unwrap_or("")).collect();
        let at = |kind: &str| kinds.iter().position(|k| *k == kind);
        if in_release {
            assert_eq!(at("draining"), None, "{heard:?}");
            let (released, drained) = (at("released").unwrap(), at("drained").unwrap());
            assert!(released < drained, "{heard:?}");
            let token = |p: &str| p.split(':').nth(1).map(str::to_owned);
            assert_eq!(token(&heard[released]), token(&heard[drained]), "{heard:?}");
        } else {
            assert_eq!(kinds[..2], ["draining", "released"], "{heard:?}");
            assert_eq!(at("drained"), None, "{heard:?}");
        }
        for s in [s1, s2] {
            s.close().await;
        }
    }
}
