//! The public API end to end against a real server: two sessions competing, handover,
//! exclusive subscriptions, lost sessions, odd names and typed errors.

mod common;

use std::time::Duration;

use common::*;
use pgiplock::{Error, LockMessage, LockOptions, LostReason, PgIpLock, Protocol, Session};

/// Waits until exactly one of `locks` holds; returns its index.
async fn wait_single_holder(locks: &[&PgIpLock]) -> usize {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let holders: Vec<usize> = (0..locks.len()).filter(|i| locks[*i].is_acquired()).collect();
        assert!(holders.len() <= 1, "two holders at once");
        if holders.len() == 1 {
            return holders[0];
        }
        assert!(tokio::time::Instant::now() < deadline, "nobody acquired the lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn two_sessions_hand_over(protocol: Protocol) {
    let schema = unique("t_api");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("Jobs");
    let s1 = session().await;
    let s2 = session().await;
    assert_ne!(s1.app_name(), s2.app_name());
    let l1 = s1.lock(&channel, options(protocol, &schema)).unwrap();
    let l2 = s2.lock(&channel, options(protocol, &schema)).unwrap();
    let mut sub1 = l1.subscribe();
    let mut sub2 = l2.subscribe();
    l1.init().await.unwrap();
    l2.init().await.unwrap();
    let first = wait_single_holder(&[&l1, &l2]).await;
    let (holder, standby, hsub, ssub) = if first == 0 {
        (&l1, &l2, &mut sub1, &mut sub2)
    } else {
        (&l2, &l1, &mut sub2, &mut sub1)
    };
    let acquired = next_matching(hsub, "acquired", is_acquired).await;
    if protocol == Protocol::Lease {
        assert!(matches!(acquired, LockMessage::Acquired { token: Some(_) }));
        assert_eq!(holder.token().map(|t| t.0 > 0), Some(true));
    } else {
        assert_eq!(acquired, LockMessage::Acquired { token: None });
    }
    assert!(!standby.acquire().await.unwrap(), "a second holder");
    assert!(holder.acquire().await.unwrap());

    // Messages reach the holder only.
    let admin = admin().await;
    publish(&admin.client, &channel, "m1").await;
    let m = next_matching(hsub, "m1", |m| matches!(m, LockMessage::Message { .. })).await;
    assert_eq!(
        m,
        LockMessage::Message {
            payload: "m1".into(),
            replay: false
        }
    );

    // Release hands over to the standby, which then receives the messages.
    let released_token = holder.token();
    holder.release().await.unwrap();
    assert!(!holder.is_acquired());
    next_matching(hsub, "released", |m| *m == LockMessage::Released).await;
    let acquired = next_matching(ssub, "standby acquired", is_acquired).await;
    if let (LockMessage::Acquired { token: Some(new) }, Some(old)) = (acquired, released_token) {
        assert!(new > old, "tokens must increase across a handover");
    }
    assert!(standby.is_acquired());
    assert!(!holder.is_acquired());
    publish(&admin.client, &channel, "m2").await;
    let m = next_matching(ssub, "m2", |m| matches!(m, LockMessage::Message { .. })).await;
    assert_eq!(
        m,
        LockMessage::Message {
            payload: "m2".into(),
            replay: false
        }
    );
    // The old holder delivered nothing after its release.
    assert!(queued(hsub).iter().all(|m| !matches!(m, LockMessage::Message { .. })));
    assert!(queued(ssub)
        .iter()
        .all(|m| !matches!(m, LockMessage::Message { payload, .. } if payload == "m1")));

    // Destroy releases and stops; the former holder takes over again.
    standby.destroy().await.unwrap();
    next_matching(ssub, "stopped", |m| *m == LockMessage::Stopped).await;
    next_matching(hsub, "re-acquired", is_acquired).await;
    assert!(holder.is_acquired());
    s1.close().await;
    s2.close().await;
    assert!(!holder.is_acquired());
    drop_schema(&schema).await;
}

#[tokio::test]
async fn two_sessions_hand_over_lease() {
    two_sessions_hand_over(Protocol::Lease).await;
}

#[tokio::test]
async fn two_sessions_hand_over_classic() {
    two_sessions_hand_over(Protocol::Classic).await;
}

async fn terminated_backend_is_lost_and_reconnects(protocol: Protocol) {
    let schema = unique("t_term");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let s = session().await;
    let lock = s.lock(&channel, options(protocol, &schema)).unwrap();
    let mut sub = lock.subscribe();
    lock.init().await.unwrap();
    next_matching(&mut sub, "acquired", is_acquired).await;
    let old_pid = s.backend_pid().expect("connected");
    let old_app = s.app_name();
    let admin = admin().await;
    let terminated: bool = admin
        .client
        .query_one("SELECT pg_terminate_backend($1)", &[&old_pid])
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    let lost = next_matching(&mut sub, "lost", |m| matches!(m, LockMessage::Lost { .. })).await;
    assert_eq!(
        lost,
        LockMessage::Lost {
            reason: LostReason::SessionLost
        }
    );
    // Reconnects under a new identity and acquires again (the old holder's session is gone).
    next_matching(&mut sub, "re-acquired", is_acquired).await;
    assert!(lock.is_acquired());
    assert_ne!(s.backend_pid(), Some(old_pid));
    assert_ne!(s.app_name(), old_app);
    publish(&admin.client, &channel, "after").await;
    let m = next_matching(&mut sub, "message", |m| matches!(m, LockMessage::Message { .. })).await;
    assert_eq!(
        m,
        LockMessage::Message {
            payload: "after".into(),
            replay: false,
        }
    );
    lock.destroy().await.unwrap();
    s.close().await;
    drop_schema(&schema).await;
}

#[tokio::test]
async fn terminated_backend_is_lost_and_reconnects_lease() {
    terminated_backend_is_lost_and_reconnects(Protocol::Lease).await;
}

#[tokio::test]
async fn terminated_backend_is_lost_and_reconnects_classic() {
    terminated_backend_is_lost_and_reconnects(Protocol::Classic).await;
}

#[tokio::test]
async fn odd_channel_names_work_end_to_end() {
    let schema = unique("t_odd");
    let _cleanup = SchemaGuard::new(&schema);
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let fifty = format!("{tag}{}", "x".repeat(50 - tag.len()));
    assert_eq!(fifty.len(), 50);
    let names = [
        format!("{tag} with \"quotes\" and 'single'"),
        format!("{tag} spaces  and UPPER Case"),
        format!("{tag} ünïcødé ✓"),
        format!("{tag};DROP TABLE x;--"),
        fifty,
    ];
    let admin = admin().await;
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let s = session().await;
        for name in &names {
            let lock = s.lock(name, options(protocol, &schema)).unwrap();
            let mut sub = lock.subscribe();
            lock.init().await.unwrap();
            next_matching(&mut sub, "acquired", is_acquired).await;
            publish(&admin.client, name, "payload ✓").await;
            let m = next_matching(&mut sub, "message", |m| matches!(m, LockMessage::Message { .. })).await;
            assert_eq!(
                m,
                LockMessage::Message {
                    payload: "payload ✓".into(),
                    replay: false,
                }
            );
            lock.destroy().await.unwrap();
            next_matching(&mut sub, "stopped", |m| *m == LockMessage::Stopped).await;
        }
        s.close().await;
    }
    drop_schema(&schema).await;
}

#[tokio::test]
async fn bad_names_and_options_are_typed_errors() {
    let s = session().await;
    let bad_channels = [
        String::new(),
        "x".repeat(51),
        "✓".repeat(17),
        "nul\0byte".to_owned(),
        "__PgIpLock__:x".to_owned(),
    ];
    for channel in &bad_channels {
        assert!(
            matches!(s.lock(channel, LockOptions::new()), Err(Error::InvalidName(_))),
            "{channel:?}"
        );
    }
    for schema in [String::new(), "s".repeat(64), "a\0b".to_owned()] {
        assert!(matches!(
            s.lock("ok", LockOptions::new().schema(&schema)),
            Err(Error::InvalidName(_))
        ));
    }
    let bad_options = [
        LockOptions::new().lease_ttl(Duration::ZERO),
        LockOptions::new().acquire_interval(Duration::ZERO),
        LockOptions::new().shutdown_timeout(Duration::ZERO),
        LockOptions::new()
            .lease_ttl(Duration::from_secs(1))
            .renew_interval(Duration::from_secs(1)),
        LockOptions::new().acquire_interval(Duration::from_secs(100 * 24 * 3600)),
        // Below the floors of `LockConfig::validate`.
        LockOptions::new().lease_ttl(Duration::from_millis(50)),
        LockOptions::new().acquire_interval(Duration::from_millis(5)),
        LockOptions::new().shutdown_timeout(Duration::from_millis(1)),
    ];
    for o in bad_options {
        assert!(
            matches!(s.lock("ok", o.clone()), Err(Error::InvalidOptions(_))),
            "{o:?}"
        );
    }
    let channel = unique("dup");
    let lock = s.lock(&channel, LockOptions::new().schema(&unique("t_dup"))).unwrap();
    assert!(matches!(
        s.lock(&channel, LockOptions::new()),
        Err(Error::DuplicateLock { .. })
    ));
    lock.destroy().await.unwrap();
    // Destroyed: the channel is free again in this session.
    let again = s.lock(&channel, LockOptions::new()).unwrap();
    again.destroy().await.unwrap();
    s.close().await;
    assert!(matches!(s.lock("after-close", LockOptions::new()), Err(Error::Closed)));
}

#[tokio::test]
async fn bootstrap_without_privileges_is_a_typed_error() {
    let role = unique("r_noprivs");
    let admin = admin().await;
    admin
        .client
        .batch_execute(&format!("CREATE ROLE {} LOGIN", pgiplock_core::quote_ident(&role)))
        .await
        .unwrap();
    let mut config = config();
    config.user(&role);
    let s = Session::connect(config).await.unwrap();
    let lock = s.lock("jobs", LockOptions::new().schema(&unique("t_noprivs"))).unwrap();
    let error = lock.init().await.expect_err("a role without CREATE cannot bootstrap");
    assert!(matches!(error, Error::Bootstrap { .. }), "{error:?}");
    assert!(error.is_permission_denied(), "{error:?}");
    s.close().await;
    wait_backend_gone(&admin.client, &s.app_name()).await;
    admin
        .client
        .batch_execute(&format!("DROP ROLE {}", pgiplock_core::quote_ident(&role)))
        .await
        .unwrap();
}

#[tokio::test]
async fn acquire_without_init_and_on_release_handler() {
    let schema = unique("t_manual");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let s1 = session().await;
    let s2 = session().await;
    // No init: manual attempts only, as with acquire() in @imqueue/pg-pubsub.
    let l1 = s1.lock(&channel, options(Protocol::Lease, &schema)).unwrap();
    let l2 = s2.lock(&channel, options(Protocol::Lease, &schema)).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    l2.on_release(move |c| {
        let _ = tx.send(c.to_owned());
    });
    let mut sub2 = l2.subscribe();
    assert!(l1.acquire().await.unwrap());
    assert!(l1.is_acquired());
    assert!(!l2.acquire().await.unwrap());
    l1.release().await.unwrap();
    let released = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(released, channel);
    // l2 was never started: it does not compete on its own, but can acquire now.
    assert!(queued(&mut sub2).iter().all(|m| !is_acquired(m)));
    assert!(l2.acquire().await.unwrap());
    assert!(!l1.acquire().await.unwrap());
    s1.close().await;
    s2.close().await;
    drop_schema(&schema).await;
}

#[tokio::test]
async fn twenty_sessions_start_at_once_on_a_fresh_schema() {
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let schema = unique("t_twenty");
        let _cleanup = SchemaGuard::new(&schema);
        let channel = unique("jobs");
        let sessions = futures::future::try_join_all((0..20).map(|_| Session::connect(config())))
            .await
            .unwrap();
        let locks: Vec<PgIpLock> = sessions
            .iter()
            .map(|s| s.lock(&channel, options(protocol, &schema)).unwrap())
            .collect();
        let inits = futures::future::join_all(locks.iter().map(PgIpLock::init)).await;
        assert!(inits.iter().all(Result::is_ok), "{inits:?}");
        let refs: Vec<&PgIpLock> = locks.iter().collect();
        let holder = wait_single_holder(&refs).await;
        // Everyone else's manual attempt fails.
        let attempts = futures::future::join_all(locks.iter().map(PgIpLock::acquire)).await;
        for (i, attempt) in attempts.into_iter().enumerate() {
            assert_eq!(attempt.unwrap(), i == holder, "lock {i}");
        }
        futures::future::join_all(sessions.iter().map(Session::close)).await;
        drop_schema(&schema).await;
    }
}

/// Graceful handover under a steady stream of messages: every message is delivered exactly
/// once, by the old holder up to its release marker and by the new holder after it.
async fn handover_is_lossless(protocol: Protocol) {
    const TOTAL: usize = 400;
    let schema = unique("t_lossless");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("stream");
    let s1 = session().await;
    let s2 = session().await;
    let l1 = s1.lock(&channel, options(protocol, &schema)).unwrap();
    let mut sub1 = l1.subscribe();
    l1.init().await.unwrap();
    next_matching(&mut sub1, "first holder", is_acquired).await;
    let l2 = s2.lock(&channel, options(protocol, &schema)).unwrap();
    let sub2 = l2.subscribe();
    l2.init().await.unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
    let collect =
        |mut sub: pgiplock::Subscription, who: usize, tx: tokio::sync::mpsc::UnboundedSender<(usize, String)>| {
            tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    if let LockMessage::Message { payload, .. } = m {
                        let _ = tx.send((who, payload));
                    }
                }
            })
        };
    let c1 = collect(sub1, 1, tx.clone());
    let c2 = collect(sub2, 2, tx);
    let admin = admin().await;
    let publisher = {
        let channel = channel.clone();
        tokio::spawn(async move {
            for i in 0..TOTAL {
                publish(&admin.client, &channel, &i.to_string()).await;
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    // Release once the stream is flowing through the first holder.
    let mut received: Vec<(usize, String)> = Vec::new();
    while received.len() < 50 {
        received.push(tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap());
    }
    l1.release().await.unwrap();
    tokio::time::timeout(WAIT, publisher).await.unwrap().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while received.len() < TOTAL {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(m)) => received.push(m),
            _ => break,
        }
    }
    s1.close().await;
    s2.close().await;
    c1.await.unwrap();
    c2.await.unwrap();
    while let Ok(m) = rx.try_recv() {
        received.push(m);
    }
    let mut numbers: Vec<usize> = received.iter().map(|(_, p)| p.parse().unwrap()).collect();
    let by_first = received.iter().filter(|(w, _)| *w == 1).count();
    numbers.sort_unstable();
    let unique_count = {
        let mut n = numbers.clone();
        n.dedup();
        n.len()
    };
    assert_eq!(unique_count, numbers.len(), "duplicates delivered");
    assert_eq!(numbers, (0..TOTAL).collect::<Vec<_>>(), "lost messages");
    assert!(
        (50..TOTAL).contains(&by_first),
        "both holders delivered ({by_first} by the first)"
    );
    // Tenures do not interleave: the first holder's messages all precede the second's.
    let last_first = received
        .iter()
        .filter(|(w, _)| *w == 1)
        .map(|(_, p)| p.parse::<usize>().unwrap())
        .max();
    let first_second = received
        .iter()
        .filter(|(w, _)| *w == 2)
        .map(|(_, p)| p.parse::<usize>().unwrap())
        .min();
    assert!(last_first < first_second, "{last_first:?} vs {first_second:?}");
    drop_schema(&schema).await;
}

#[tokio::test]
async fn handover_is_lossless_lease() {
    handover_is_lossless(Protocol::Lease).await;
}

#[tokio::test]
async fn handover_is_lossless_classic() {
    handover_is_lossless(Protocol::Classic).await;
}

/// A peer speaking `@imqueue/pg-pubsub`'s SQL (as a Node process would) shares a Classic lock
/// with us: it is refused while we hold, we are refused while it holds, and its release (the
/// trigger's `'1'`) wakes us at once.
#[tokio::test]
async fn classic_interoperates_with_a_pg_pubsub_peer() {
    let schema = unique("t_node");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let qs = pgiplock_core::quote_ident(&schema);
    let node = raw_client(&uuid::Uuid::new_v4().to_string()).await;
    let lock_channel = format!("__PgIpLock__:{channel}");
    let node_acquire = format!(
        "INSERT INTO {qs}.lock (channel, app) VALUES ($1, $2) \
         ON CONFLICT (channel) DO UPDATE SET app = {qs}.deadlock_check({qs}.lock.app, $2)"
    );
    let s = session().await;
    let lock = s
        .lock(
            &channel,
            options(Protocol::Classic, &schema).acquire_interval(Duration::from_secs(600)),
        )
        .unwrap();
    let mut sub = lock.subscribe();
    lock.init().await.unwrap();
    next_matching(&mut sub, "acquired", is_acquired).await;
    let refused = node
        .client
        .execute(&node_acquire, &[&lock_channel, &node.app])
        .await
        .expect_err("the node peer must be refused while we hold");
    let db = refused.as_db_error().expect("a server error");
    assert_eq!(db.detail(), Some("LOCKED"));

    lock.release().await.unwrap();
    // Our own release must not wake us for a full interval (10 minutes here), so the node
    // peer wins.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if node
            .client
            .execute(&node_acquire, &[&lock_channel, &node.app])
            .await
            .is_ok()
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the node peer never acquired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!lock.acquire().await.unwrap(), "refused while the node peer holds");
    // The node peer releases as pg-pubsub does; the trigger's '1' wakes our standby at once
    // (its retry interval is ten minutes, so only the notification can explain it).
    let deleted = node
        .client
        .execute(
            &format!("DELETE FROM {qs}.lock WHERE channel = $1 AND app = $2"),
            &[&lock_channel, &node.app],
        )
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    next_matching(&mut sub, "acquired after the node release", is_acquired).await;
    s.close().await;
    drop_schema(&schema).await;
}

/// Once the schema exists, a role without CREATE privileges can use it: the bootstrap only
/// reads the catalogs.
#[tokio::test]
async fn existing_schema_needs_no_create_privilege() {
    let schema = unique("t_shared");
    let _cleanup = SchemaGuard::new(&schema);
    let role = unique("r_user");
    let (qs, qr) = (pgiplock_core::quote_ident(&schema), pgiplock_core::quote_ident(&role));
    let admin = admin().await;
    pgiplock_testkit::sql::bootstrap(
        &admin.client,
        Protocol::Lease,
        &pgiplock_core::SchemaName::new(&schema).unwrap(),
    )
    .await
    .unwrap();
    admin
        .client
        .batch_execute(&format!(
            "CREATE ROLE {qr} LOGIN; GRANT USAGE ON SCHEMA {qs} TO {qr}; \
             GRANT SELECT, INSERT, UPDATE ON {qs}.lease TO {qr};"
        ))
        .await
        .unwrap();
    let mut config = config();
    config.user(&role);
    let s = Session::connect(config).await.unwrap();
    let lock = s.lock(&unique("jobs"), options(Protocol::Lease, &schema)).unwrap();
    let mut sub = lock.subscribe();
    lock.init().await.unwrap();
    next_matching(&mut sub, "acquired", is_acquired).await;
    lock.release().await.unwrap();
    s.close().await;
    wait_backend_gone(&admin.client, &s.app_name()).await;
    drop_schema(&schema).await;
    admin.client.batch_execute(&format!("DROP ROLE {qr}")).await.unwrap();
}

#[tokio::test]
async fn unreachable_server_is_a_connect_error() {
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(1).user("postgres").dbname("test");
    let error = Session::connect(config).await.expect_err("nothing listens on port 1");
    assert!(matches!(error, Error::Connect(_)), "{error:?}");
}
