//! The SQL of both protocols against a real server: bootstrap, and every operation of `DbOp`.

mod common;

use std::time::Duration;

use common::*;
use pgiplock_core::{
    AcquireReply, ChannelName, DbOp, FenceToken, Marker, Protocol, Reply, SchemaName, StaleHolder, TerminateOutcome,
};
use pgiplock_testkit::sql::{self, Target};

fn target(protocol: Protocol, schema: &str, channel: &str, app: &str, ttl: Duration) -> Target {
    Target {
        protocol,
        schema: SchemaName::new(schema).unwrap(),
        channel: ChannelName::new(channel).unwrap(),
        app: app.to_owned(),
        lease_ttl: ttl,
    }
}

async fn acquire(c: &RawClient, t: &Target) -> AcquireReply {
    match sql::execute(&c.client, t, &DbOp::Acquire).await {
        Ok(Reply::Acquire(reply)) => reply,
        other => panic!("acquire: {other:?}"),
    }
}

async fn renew(c: &RawClient, t: &Target, token: Option<FenceToken>) -> bool {
    match sql::execute(&c.client, t, &DbOp::Renew { token, progress: None }).await {
        Ok(Reply::Renew { owned }) => owned,
        other => panic!("renew: {other:?}"),
    }
}

async fn release(c: &RawClient, t: &Target, token: Option<FenceToken>) -> bool {
    match sql::execute(&c.client, t, &DbOp::Release { token }).await {
        Ok(Reply::Release { released }) => released,
        other => panic!("release: {other:?}"),
    }
}

/// Name, row version and `SET` clauses of every function in `schema`.
async fn catalog_versions(client: &tokio_postgres::Client, schema: &str) -> Vec<(String, String, Option<Vec<String>>)> {
    let rows = client
        .query(
            "SELECT p.proname::text, p.xmin::text, p.proconfig FROM pg_proc p \
             JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1 ORDER BY 1",
            &[&schema],
        )
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
}

async fn bootstrap_many(protocol: Protocol) {
    let schema = unique("t_boot");
    let _cleanup = SchemaGuard::new(&schema);
    let name = SchemaName::new(&schema).unwrap();
    let names: Vec<String> = (0..20).map(|i| format!("boot-{i}")).collect();
    let clients = futures::future::join_all(names.iter().map(|n| raw_client(n))).await;
    let results = futures::future::join_all(clients.iter().map(|c| sql::bootstrap(&c.client, protocol, &name))).await;
    for r in &results {
        assert!(r.is_ok(), "concurrent bootstrap failed: {r:?}");
    }
    // Idempotent: again, sequentially and concurrently, and without rewriting the catalog.
    let before = catalog_versions(&clients[0].client, &schema).await;
    sql::bootstrap(&clients[0].client, protocol, &name).await.unwrap();
    let again = futures::future::join_all(clients.iter().map(|c| sql::bootstrap(&c.client, protocol, &name))).await;
    assert!(again.iter().all(Result::is_ok), "{again:?}");
    assert_eq!(
        catalog_versions(&clients[0].client, &schema).await,
        before,
        "a bootstrap rewrote existing functions"
    );
    if protocol == Protocol::Lease {
        let acquire = before.iter().find(|(n, _, _)| n == "acquire_v2").expect("acquire_v2()");
        assert_eq!(acquire.2, Some(vec!["lock_timeout=2s".to_owned()]));
    }
    let admin = admin().await;
    let table = match protocol {
        Protocol::Classic => "lock",
        Protocol::Lease => "lease",
    };
    let qualified = format!("{}.{}", pgiplock_core::quote_ident(&schema), table);
    let exists: bool = admin
        .client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified])
        .await
        .unwrap()
        .get(0);
    assert!(exists);
    let functions: i64 = admin
        .client
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    // Classic: deadlock_check, notify_lock; Lease: acquire_v2, renew_v2, release_v2,
    // terminate_stale, the batched renew_many and acquire_many, the token helpers timeline,
    // next_token, older_timeline and old_timeline_free_at, fair share's balance_v1, and the
    // crash watch's procedure await_holder.
    assert_eq!(functions, if protocol == Protocol::Classic { 2 } else { 12 });
    if protocol == Protocol::Classic {
        let triggers: i64 = admin
            .client
            .query_one(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = 'notify_release_lock_trigger'",
                &[&qualified],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(triggers, 1);
    }
    drop_schema(&schema).await;
}

#[tokio::test]
async fn bootstrap_is_idempotent_and_concurrent_classic() {
    bootstrap_many(Protocol::Classic).await;
}

#[tokio::test]
async fn bootstrap_is_idempotent_and_concurrent_lease() {
    bootstrap_many(Protocol::Lease).await;
}

/// Both protocols bootstrapping one fresh schema at once (a mixed fleet given one schema name)
/// must not race on `CREATE SCHEMA`.
#[tokio::test]
async fn bootstrap_of_both_protocols_in_one_schema_at_once() {
    for round in 0..5 {
        let schema = unique(&format!("t_mixed{round}"));
        let _cleanup = SchemaGuard::new(&schema);
        let name = SchemaName::new(&schema).unwrap();
        let names: Vec<String> = (0..10).map(|i| format!("mixed-{i}")).collect();
        let clients = futures::future::join_all(names.iter().map(|n| raw_client(n))).await;
        let results = futures::future::join_all(clients.iter().enumerate().map(|(i, c)| {
            let protocol = if i % 2 == 0 { Protocol::Classic } else { Protocol::Lease };
            sql::bootstrap(&c.client, protocol, &name)
        }))
        .await;
        drop_schema(&schema).await;
        for r in &results {
            assert!(r.is_ok(), "mixed concurrent bootstrap failed: {r:?}");
        }
    }
}

#[tokio::test]
async fn bootstrap_survives_hostile_schema_names() {
    for schema in [
        format!("{} \"q\" 'x' $fn$ $pgiplock_bootstrap$", unique("T")),
        format!("Ünï {}", unique("c")),
    ] {
        let name = SchemaName::new(&schema).unwrap();
        let c = raw_client("boot-hostile").await;
        for protocol in [Protocol::Classic, Protocol::Lease] {
            sql::bootstrap(&c.client, protocol, &name).await.unwrap();
            sql::bootstrap(&c.client, protocol, &name).await.unwrap();
            let t = target(protocol, &schema, "odd", &c.app, Duration::from_secs(5));
            assert!(acquire(&c, &t).await.acquired);
        }
        drop_schema(&schema).await;
    }
}

#[tokio::test]
async fn classic_acquire_lock_takeover_and_release() {
    let schema = unique("t_classic");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let name = SchemaName::new(&schema).unwrap();
    let a = raw_client(&unique("app-a")).await;
    let mut b = raw_client(&unique("app-b")).await;
    sql::bootstrap(&a.client, Protocol::Classic, &name).await.unwrap();
    let ttl = Duration::from_secs(5);
    let ta = target(Protocol::Classic, &schema, &channel, &a.app, ttl);
    let tb = target(Protocol::Classic, &schema, &channel, &b.app, ttl);
    let lock_channel = ta.channel.lock_channel().to_owned();
    let drain_channel = ta.channel.drain_channel().to_owned();
    b.client
        .batch_execute(&format!(
            "LISTEN {}; LISTEN {}",
            pgiplock_core::quote_ident(&lock_channel),
            pgiplock_core::quote_ident(&drain_channel)
        ))
        .await
        .unwrap();

    let first = acquire(&a, &ta).await;
    assert!(first.acquired && first.token.is_none());
    assert_eq!(acquire(&b, &tb).await, AcquireReply::locked());
    assert!(
        acquire(&a, &ta).await.acquired,
        "a row naming this session counts as acquired"
    );
    assert!(renew(&a, &ta, None).await);
    assert!(!renew(&b, &tb, None).await);
    assert!(!release(&b, &tb, None).await, "b cannot release a's row");

    // The row is keyed by the lock channel, as @imqueue/pg-pubsub keys it.
    let status = pgiplock::lock_status(config(), Protocol::Classic, Some(&schema))
        .await
        .unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].channel, channel);
    assert_eq!(status[0].holder.as_deref(), Some(a.app.as_str()));
    assert!(status[0].holder_alive);

    // Release deletes the row; the deferred trigger notifies '1' on the lock channel.
    assert!(release(&a, &ta, None).await);
    assert_eq!(b.notification().await, (lock_channel.clone(), "1".to_owned()));
    assert!(!release(&a, &ta, None).await);

    // Drain marker: on the drain channel, never on the lock channel, where a Node standby
    // would read it as a release. The trigger's '1' after it shows nothing else came between.
    assert_eq!(
        sql::execute(&a.client, &ta, &DbOp::Drain { token: None }).await,
        Ok(Reply::Drained)
    );
    assert_eq!(
        b.notification().await,
        (drain_channel.clone(), Marker::Draining(None).payload())
    );
    assert!(acquire(&a, &ta).await.acquired);
    assert!(release(&a, &ta, None).await);
    assert_eq!(b.notification().await, (lock_channel.clone(), "1".to_owned()));

    // Takeover once the holder's session is gone from pg_stat_activity.
    assert!(acquire(&a, &ta).await.acquired);
    assert!(!acquire(&b, &tb).await.acquired);
    let a_app = a.app.clone();
    drop(a);
    let admin = admin().await;
    wait_backend_gone(&admin.client, &a_app).await;
    assert!(acquire(&b, &tb).await.acquired);
    assert!(renew(&b, &tb, None).await);
    drop_schema(&schema).await;
}

#[tokio::test]
async fn lease_tokens_fencing_expiry_and_stale_holders() {
    let schema = unique("t_lease");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let name = SchemaName::new(&schema).unwrap();
    let a = raw_client(&unique("app-a")).await;
    let mut b = raw_client(&unique("app-b")).await;
    sql::bootstrap(&a.client, Protocol::Lease, &name).await.unwrap();
    let long = Duration::from_secs(30);
    let ta = target(Protocol::Lease, &schema, &channel, &a.app, long);
    let tb = target(Protocol::Lease, &schema, &channel, &b.app, long);
    let lock_channel = ta.channel.lock_channel().to_owned();
    b.client
        .batch_execute(&format!("LISTEN {}", pgiplock_core::quote_ident(&lock_channel)))
        .await
        .unwrap();
    let mut tokens = Vec::new();

    // A new row starts at token 1 and announces it.
    let r = acquire(&a, &ta).await;
    assert!(r.acquired);
    assert_eq!(r.token, Some(FenceToken(1)));
    assert_eq!(r.stale_holder, None);
    tokens.push(r.token.unwrap());
    assert_eq!(b.notification().await, (lock_channel.clone(), "acquired:1".to_owned()));

    // A loser learns the remaining lease and writes nothing.
    let r = acquire(&b, &tb).await;
    assert!(!r.acquired && r.token.is_none());
    let remaining = r.lease_remaining.expect("remaining lease");
    assert!(
        remaining > Duration::from_secs(20) && remaining <= long,
        "{remaining:?}"
    );

    // Renew only with the current token and owner.
    assert!(renew(&a, &ta, Some(FenceToken(1))).await);
    assert!(!renew(&a, &ta, Some(FenceToken(2))).await);
    assert!(!renew(&b, &tb, Some(FenceToken(1))).await);

    // Release with the right token notifies, naming the refused standby as the successor; the
    // row stays and tokens go on.
    assert!(!release(&b, &tb, Some(FenceToken(1))).await);
    assert!(release(&a, &ta, Some(FenceToken(1))).await);
    assert_eq!(
        b.notification().await,
        (lock_channel.clone(), format!("released:1:{}", b.pid))
    );
    let r = acquire(&b, &tb).await;
    assert!(r.acquired);
    tokens.push(r.token.unwrap());
    // Old terms change nothing.
    assert!(!renew(&a, &ta, Some(FenceToken(1))).await);
    assert!(!release(&a, &ta, Some(FenceToken(1))).await);
    assert!(renew(&b, &tb, tokens.last().copied()).await);

    // An expired lease of a live holder is taken over and the holder reported as stale.
    let short = Duration::from_millis(200);
    let tb_short = target(Protocol::Lease, &schema, &channel, &b.app, short);
    assert!(renew(&b, &tb_short, tokens.last().copied()).await);
    let deadline = tokio::time::Instant::now() + WAIT;
    let r = loop {
        let r = acquire(&a, &ta).await;
        if r.acquired {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "lease never expired");
        // The server said when the lease ends: wait that long, not a guess.
        tokio::time::sleep(r.lease_remaining.unwrap_or_default() + Duration::from_millis(5)).await;
    };
    tokens.push(r.token.unwrap());
    assert_eq!(
        r.stale_holder,
        Some(StaleHolder {
            pid: b.pid,
            app: b.app.clone()
        })
    );
    assert!(!renew(&b, &tb, Some(tokens[1])).await, "a superseded term cannot renew");
    let outcome = sql::execute(
        &a.client,
        &ta,
        &DbOp::TerminateStale {
            pid: b.pid,
            app: b.app.clone(),
        },
    )
    .await;
    assert_eq!(outcome, Ok(Reply::Terminate(TerminateOutcome::Terminated)));
    b.wait_closed().await;
    let admin = admin().await;
    wait_backend_gone(&admin.client, &b.app).await;
    let outcome = sql::execute(
        &a.client,
        &ta,
        &DbOp::TerminateStale {
            pid: b.pid,
            app: b.app.clone(),
        },
    )
    .await;
    assert_eq!(outcome, Ok(Reply::Terminate(TerminateOutcome::Gone)));

    // A holder whose session ended is taken over at once, before its lease expires.
    let c = raw_client(&unique("app-c")).await;
    let tc = target(Protocol::Lease, &schema, &channel, &c.app, long);
    assert!(!acquire(&c, &tc).await.acquired);
    let a_app = a.app.clone();
    drop(a);
    wait_backend_gone(&admin.client, &a_app).await;
    let r = acquire(&c, &tc).await;
    assert!(r.acquired);
    assert_eq!(r.stale_holder, None);
    tokens.push(r.token.unwrap());
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens must strictly increase: {tokens:?}"
    );

    let status = pgiplock::lock_status(config(), Protocol::Lease, Some(&schema))
        .await
        .unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].channel, channel);
    assert_eq!(status[0].holder.as_deref(), Some(c.app.as_str()));
    assert_eq!(status[0].holder_pid, Some(c.pid));
    assert!(status[0].holder_alive);
    assert_eq!(status[0].token, tokens.last().copied());
    assert!(status[0].lease_remaining.is_some_and(|d| d > Duration::from_secs(20)));
    drop_schema(&schema).await;
    assert!(pgiplock::lock_status(config(), Protocol::Lease, Some(&schema))
        .await
        .unwrap()
        .is_empty());
}

/// The token rule of `next_token`, on whatever timeline the test server writes: the counter
/// goes on within a timeline, a token issued on this timeline starts above every token of the
/// earlier ones, and a token never goes down (even one claiming a later timeline). The
/// promotion itself is in `tests/tests/replication.rs`.
#[tokio::test]
async fn lease_tokens_carry_the_timeline_in_their_high_bits() {
    let schema = unique("t_epoch");
    let _cleanup = SchemaGuard::new(&schema);
    let c = raw_client("epoch").await;
    sql::bootstrap(&c.client, Protocol::Lease, &SchemaName::new(&schema).unwrap())
        .await
        .unwrap();
    let qs = pgiplock_core::quote_ident(&schema);
    let row = c
        .client
        .query_one(
            &format!(
                "SELECT {qs}.timeline(), ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint"
            ),
            &[],
        )
        .await
        .unwrap();
    let (timeline, from_wal): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(timeline, from_wal);
    let base = (timeline - 1) << pgiplock_core::TOKEN_COUNTER_BITS;
    let next = |prev: i64| {
        let sql = format!("SELECT {qs}.next_token($1)");
        let client = &c.client;
        async move { client.query_one(&sql, &[&prev]).await.unwrap().get::<_, i64>(0) }
    };
    let older = |token: i64| {
        let sql = format!("SELECT {qs}.older_timeline($1)");
        let client = &c.client;
        async move { client.query_one(&sql, &[&token]).await.unwrap().get::<_, bool>(0) }
    };
    assert_eq!(next(0).await, base + 1, "a new row's first token");
    assert_eq!(
        next(base + 41).await,
        base + 42,
        "the counter goes on within a timeline"
    );
    let later = (timeline << pgiplock_core::TOKEN_COUNTER_BITS) + 5;
    assert_eq!(next(later).await, later + 1, "never below the previous token");
    assert!(!older(base + 3).await);
    assert!(!older(later).await);
    if timeline > 1 {
        assert!(older(1).await, "a timeline-1 token is older here");
        assert_eq!(next(7).await, base + 8, "above every token of timeline 1");
    }
    // A row's tokens come from it: on a single server (timeline 1) 1, 2, 3 as ever.
    let t = target(Protocol::Lease, &schema, "epoch", &c.app, Duration::from_secs(5));
    let first = acquire(&c, &t).await;
    assert_eq!(first.token.map(|t| t.0), Some(u64::try_from(base + 1).unwrap()));
    assert_eq!(
        FenceToken(u64::try_from(base + 1).unwrap()).timeline(),
        u64::try_from(timeline).unwrap()
    );
    drop_schema(&schema).await;
}

/// A held row of an older timeline whose holder's session is not on this server is taken over
/// at its replicated expiry, but no later than one ttl (the attempting process's) after the
/// first attempt on this server saw it; `'expiry'` waits for the replicated expiry alone,
/// `'session_gone'` takes it at once. The promotion is faked by redefining the schema's
/// `timeline()` one above the server's (a real one is in `tests/tests/replication.rs`).
#[tokio::test]
async fn lease_an_older_timeline_row_is_taken_over_one_ttl_after_it_was_first_seen() {
    let schema = unique("t_oldtl");
    let _cleanup = SchemaGuard::new(&schema);
    let qs = pgiplock_core::quote_ident(&schema);
    let admin = admin().await;
    sql::bootstrap(&admin.client, Protocol::Lease, &SchemaName::new(&schema).unwrap())
        .await
        .unwrap();
    let timeline: i64 = admin
        .client
        .query_one(&format!("SELECT {qs}.timeline()"), &[])
        .await
        .unwrap()
        .get(0);
    let cap = Duration::from_millis(400);
    // The old primary's holder: a lease of an hour, as a long ttl or a clock far ahead would give.
    let old = raw_client(&unique("old")).await;
    let old_app = old.app.clone();
    let held = acquire(
        &old,
        &target(Protocol::Lease, &schema, "oldtl", &old.app, Duration::from_secs(3600)),
    )
    .await;
    assert!(held.acquired);
    let old_token = held.token.unwrap();
    drop(old);
    wait_backend_gone(&admin.client, &old_app).await;
    admin
        .client
        .batch_execute(&format!(
            "CREATE OR REPLACE FUNCTION {qs}.timeline() RETURNS bigint LANGUAGE sql AS 'SELECT {}::bigint'",
            timeline + 1
        ))
        .await
        .unwrap();

    let new = raw_client(&unique("new")).await;
    let t_new = target(Protocol::Lease, &schema, "oldtl", &new.app, cap);
    let first = acquire(&new, &t_new).await;
    assert!(!first.acquired, "refused at its first sighting");
    assert_eq!(first.holder_token, Some(old_token));
    let left = first.lease_remaining.expect("the time left until the cap");
    assert!(left <= cap && left > Duration::ZERO, "{left:?} left, at most one ttl");
    let seen: (Option<i64>, bool) = {
        let row = admin
            .client
            .query_one(
                &format!("SELECT seen_token, seen_at IS NOT NULL FROM {qs}.lease WHERE channel = 'oldtl'"),
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        seen,
        (Some(i64::try_from(old_token.0).unwrap()), true),
        "the sighting is recorded"
    );
    let again = acquire(&new, &t_new).await;
    assert!(!again.acquired && again.lease_remaining.is_some_and(|l| l <= left));

    // Waiting for the replicated expiry alone: an hour.
    let patient = raw_client(&unique("patient")).await;
    patient
        .client
        .batch_execute("SET pgiplock.old_timeline_takeover = 'expiry'")
        .await
        .unwrap();
    let t_patient = target(Protocol::Lease, &schema, "oldtl", &patient.app, cap);
    let waits = acquire(&patient, &t_patient).await;
    assert!(!waits.acquired && waits.lease_remaining.is_some_and(|l| l > Duration::from_secs(3000)));

    // The server's clock passes the cap (a real wait: the cap is what is tested).
    admin
        .client
        .batch_execute(&format!(
            "SELECT pg_sleep(GREATEST(0, EXTRACT(EPOCH FROM (seen_at + INTERVAL '{} milliseconds' - clock_timestamp())))) \
             FROM {qs}.lease WHERE channel = 'oldtl'",
            cap.as_millis()
        ))
        .await
        .unwrap();
    assert!(!acquire(&patient, &t_patient).await.acquired, "'expiry' still waits");
    let won = acquire(&new, &t_new).await;
    assert!(won.acquired, "taken over one ttl after the sighting");
    let token = won.token.unwrap();
    assert_eq!(token.timeline(), u64::try_from(timeline + 1).unwrap());
    assert!(token > old_token);
    assert_eq!(won.previous.map(|p| p.token), Some(old_token));
    let waited_us: i64 = admin
        .client
        .query_one(
            &format!("SELECT (EXTRACT(EPOCH FROM (acquired_at - seen_at)) * 1000000)::bigint FROM {qs}.lease WHERE channel = 'oldtl'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        waited_us >= i64::try_from(cap.as_micros()).unwrap(),
        "taken over {waited_us} us after the sighting, before one ttl"
    );

    // 'session_gone': an older timeline's row is free at once when its session is not here.
    let quick_app = unique("quick");
    let quick = raw_client(&quick_app).await;
    let t_quick = target(
        Protocol::Lease,
        &schema,
        "oldtl2",
        &quick.app,
        Duration::from_secs(3600),
    );
    assert!(acquire(&quick, &t_quick).await.acquired);
    drop(quick);
    wait_backend_gone(&admin.client, &quick_app).await;
    admin
        .client
        .batch_execute(&format!(
            "CREATE OR REPLACE FUNCTION {qs}.timeline() RETURNS bigint LANGUAGE sql AS 'SELECT {}::bigint'",
            timeline + 2
        ))
        .await
        .unwrap();
    patient
        .client
        .batch_execute("SET pgiplock.old_timeline_takeover = 'session_gone'")
        .await
        .unwrap();
    let t_at_once = target(Protocol::Lease, &schema, "oldtl2", &patient.app, cap);
    assert!(
        acquire(&patient, &t_at_once).await.acquired,
        "'session_gone' takes it at once"
    );
    drop_schema(&schema).await;
}

/// A lease table of an earlier version (without the sighting columns) gets them at the next
/// bootstrap, rows and tokens kept, and works with the new functions.
#[tokio::test]
async fn lease_bootstrap_adds_the_sighting_columns_to_an_earlier_table() {
    let schema = unique("t_upgrade");
    let _cleanup = SchemaGuard::new(&schema);
    let qs = pgiplock_core::quote_ident(&schema);
    let admin = admin().await;
    admin
        .client
        .batch_execute(&format!(
            "CREATE SCHEMA {qs}; CREATE TABLE {qs}.lease (channel text PRIMARY KEY, holder text, holder_pid integer, \
             token bigint NOT NULL, expires_at timestamptz, acquired_at timestamptz); \
             INSERT INTO {qs}.lease (channel, token) VALUES ('up', 41)"
        ))
        .await
        .unwrap();
    sql::bootstrap(&admin.client, Protocol::Lease, &SchemaName::new(&schema).unwrap())
        .await
        .unwrap();
    let columns: i64 = admin
        .client
        .query_one(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'lease' \
             AND column_name IN ('seen_token', 'seen_at')",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(columns, 2);
    let c = raw_client(&unique("up")).await;
    let won = acquire(
        &c,
        &target(Protocol::Lease, &schema, "up", &c.app, Duration::from_secs(5)),
    )
    .await;
    assert!(won.acquired);
    assert_eq!(won.token.map(|t| t.counter()), Some(42), "the row's counter goes on");
    drop_schema(&schema).await;
}

#[tokio::test]
async fn lease_a_release_commits_without_waiting_for_its_wal_flush_and_nothing_else_does() {
    let schema = unique("t_lease_async");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("jobs");
    let name = SchemaName::new(&schema).unwrap();
    let a = raw_client(&unique("app-a")).await;
    sql::bootstrap(&a.client, Protocol::Lease, &name).await.unwrap();
    let ta = target(Protocol::Lease, &schema, &channel, &a.app, Duration::from_secs(30));
    let setting = || async {
        let rows = a.client.query_one("SHOW synchronous_commit", &[]).await.unwrap();
        rows.get::<_, String>(0)
    };
    let before = setting().await;
    if before == "off" {
        eprintln!("synchronous_commit is off on this server: nothing to tell apart");
        return;
    }
    // The acquisition waits for its flush (its token must survive a crash).
    a.client.batch_execute("BEGIN").await.unwrap();
    let token = acquire(&a, &ta).await.token;
    assert_eq!(setting().await, before);
    a.client.batch_execute("COMMIT").await.unwrap();
    // A release that releases nothing changes nothing; one that releases commits asynchronously,
    // for its own transaction only.
    a.client.batch_execute("BEGIN").await.unwrap();
    assert!(!release(&a, &ta, Some(FenceToken(999))).await);
    assert_eq!(setting().await, before);
    assert!(release(&a, &ta, token).await);
    assert_eq!(setting().await, "off");
    a.client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(setting().await, before);
}

#[tokio::test]
async fn lease_the_bootstrap_warm_up_leaves_no_row_and_no_notification() {
    let schema = unique("t_lease_warm");
    let _cleanup = SchemaGuard::new(&schema);
    let name = SchemaName::new(&schema).unwrap();
    let mut listener = raw_client(&unique("listener")).await;
    listener
        .client
        .batch_execute("LISTEN \"__pgiplock_warm_up__\"")
        .await
        .unwrap();
    let a = raw_client(&unique("app-a")).await;
    // The bootstrap runs the warm-up: a win, a refusal, batched calls, a release and both
    // takeovers (of a gone session, of an expired lease), all rolled back.
    sql::bootstrap(&a.client, Protocol::Lease, &name).await.unwrap();
    let count = |table: &str| format!("SELECT count(*) FROM {}.{table}", pgiplock_core::quote_ident(&schema));
    for table in ["lease", "lease_waiter"] {
        let n: i64 = a.client.query_one(&count(table), &[]).await.unwrap().get(0);
        assert_eq!(n, 0, "{table}");
    }
    // Every path runs without an error (the bootstrap ignores one), and again leaves nothing.
    sql::warm_up(&a.client, &name).await.expect("the warm-up runs");
    for table in ["lease", "lease_waiter"] {
        let n: i64 = a.client.query_one(&count(table), &[]).await.unwrap().get(0);
        assert_eq!(n, 0, "{table}");
    }
    // Notifications arrive in commit order: the first one is the sentinel sent after it.
    a.client
        .batch_execute("NOTIFY \"__pgiplock_warm_up__\", 'sentinel'")
        .await
        .unwrap();
    assert_eq!(
        listener.notification().await,
        ("__pgiplock_warm_up__".to_owned(), "sentinel".to_owned())
    );
}

/// A Lease lock's `UNLISTEN` batch deletes this backend's waiter row of the channel and no
/// other, under schema and channel names that hold the batch's own dollar-quote tag; with the
/// waiter table gone it still unlistens without an error.
#[tokio::test]
async fn lease_the_unlisten_batch_forgets_only_this_backends_waiter_row() {
    let schema = format!("{}$pgiplock_unlisten$\"'", unique("t_unlisten"));
    let _cleanup = SchemaGuard::new(&schema);
    let name = SchemaName::new(&schema).unwrap();
    let channel = format!("c'$pgiplock_unlisten$\\{}", unique("x"));
    let ch = ChannelName::new(&channel).unwrap();
    let ttl = Duration::from_secs(30);
    let holder = raw_client(&unique("holder")).await;
    sql::bootstrap(&holder.client, Protocol::Lease, &name).await.unwrap();
    let won = acquire(&holder, &target(Protocol::Lease, &schema, &channel, &holder.app, ttl)).await;
    assert!(won.acquired);
    let a = raw_client(&unique("app-a")).await;
    let b = raw_client(&unique("app-b")).await;
    for c in [&a, &b] {
        let refused = acquire(c, &target(Protocol::Lease, &schema, &channel, &c.app, ttl)).await;
        assert!(!refused.acquired);
    }
    let qs = pgiplock_core::quote_ident(&schema);
    let waiters = || async {
        let sql = format!("SELECT app FROM {qs}.lease_waiter WHERE channel = $1 ORDER BY app");
        let rows = holder.client.query(&sql, &[&channel]).await.unwrap();
        rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
    };
    let mut both = vec![a.app.clone(), b.app.clone()];
    both.sort();
    assert_eq!(waiters().await, both);
    sql::unlisten(&a.client, &ch, Protocol::Lease, &name).await.unwrap();
    assert_eq!(waiters().await, vec![b.app.clone()]);
    holder
        .client
        .batch_execute(&format!("DROP TABLE {qs}.lease_waiter"))
        .await
        .unwrap();
    sql::unlisten(&b.client, &ch, Protocol::Lease, &name)
        .await
        .expect("unlistens without the table");
}
