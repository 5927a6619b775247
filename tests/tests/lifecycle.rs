//! The session's lifecycle rules against a real server: every wait is bounded (a silent server,
//! a network blip during a reconnect), a dropped schema is set up again, a read-only server is a
//! clear error, a panicking callback cannot take the session down, a session task that ends is
//! reported by every handle, and dropping a lock's last handle releases it.
//!
//! Each test prints what it measured (`cargo test -p pgiplock-tests --test lifecycle --
//! --nocapture`).

use std::time::Duration;

use tokio::time::Instant;

use pgiplock::{Error, LockMessage, LockOptions, PgIpLock, Protocol, Session, SessionOptions, Subscription, Warning};
use pgiplock_tests::{connect, database_url, now_us, unique_channel, BlackholeProxy, Fleet, TestSchema, WorkerOpts};
use tokio_postgres::Config;

const WAIT: Duration = Duration::from_secs(30);

fn config() -> Config {
    database_url().parse().expect("database URL")
}

async fn next_matching(sub: &mut Subscription, what: &str, within: Duration, pred: impl Fn(&LockMessage) -> bool) {
    pgiplock_tests::next_message(sub, what, within, pred).await;
}

async fn drop_schema(name: &str) {
    let admin = connect(&database_url()).await;
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            pgiplock_core::quote_ident(name)
        ))
        .await
        .expect("drop schema");
}

/// A TCP listener that accepts connections and never says a word.
async fn silent_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (addr, task)
}

/// Connection settings that point at `addr`.
fn silent_config(addr: std::net::SocketAddr) -> Config {
    let mut config = Config::new();
    config
        .host("127.0.0.1")
        .port(addr.port())
        .user("postgres")
        .dbname("test");
    config
}

#[tokio::test]
async fn connect_to_a_silent_server_fails_within_its_connect_timeout() {
    let (addr, server) = silent_server().await;
    let config = silent_config(addr);
    let timeout = Duration::from_millis(800);
    let started = Instant::now();
    let result = Session::connect_with(
        config,
        tokio_postgres::NoTls,
        SessionOptions::new().connect_timeout(timeout),
    )
    .await;
    let took = started.elapsed();
    println!("connect to a silent server: failed after {took:?} (connect timeout {timeout:?})");
    match result {
        Err(Error::ConnectTimeout { timeout: t }) => assert_eq!(t, timeout),
        other => panic!("expected a connect timeout, got {other:?}"),
    }
    assert!(took >= timeout && took < timeout + Duration::from_secs(2), "{took:?}");

    // With a retry window it keeps trying, then fails, still bounded.
    let config = silent_config(addr);
    let started = Instant::now();
    let result = Session::connect_with(
        config,
        tokio_postgres::NoTls,
        SessionOptions::new()
            .connect_timeout(Duration::from_millis(300))
            .wait_for_server(Duration::from_secs(1)),
    )
    .await;
    let took = started.elapsed();
    println!("with wait_for_server(1s): failed after {took:?}");
    assert!(matches!(result, Err(Error::ConnectTimeout { .. })), "{result:?}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(8),
        "{took:?}"
    );
    server.abort();
}

#[tokio::test]
async fn a_worker_pointed_at_a_silent_server_exits_with_an_error() {
    let (addr, server) = silent_server().await;
    let url = format!("postgres://postgres@127.0.0.1:{}/test", addr.port());
    let opts = WorkerOpts::new(&url, &unique_channel(), None, Protocol::Lease);
    let mut fleet = Fleet::new(opts);
    let started = now_us();
    let w = fleet.spawn();
    let (code, _) = fleet.wait_exit(w, Duration::from_secs(20)).await;
    let took = Duration::from_micros((now_us() - started).max(0) as u64);
    println!("worker against a silent server: exit code {code:?} after {took:?}");
    assert_eq!(code, Some(1), "{}", fleet.stderr_all());
    assert!(fleet.stderr_all().contains("connect timeout"), "{}", fleet.stderr_all());
    server.abort();
}

/// A worker behind a proxy that goes dark for `cut`: it holds again soon after the heal.
async fn blip(cut: Duration) {
    let url = database_url();
    let schema = TestSchema::on(&url);
    let proxy = BlackholeProxy::for_url(&url).await.expect("proxy");
    let opts = WorkerOpts::new(
        &proxy.url(&url),
        &unique_channel(),
        Some(schema.name()),
        Protocol::Lease,
    )
    .lease_ttl(Duration::from_secs(3))
    .acquire_interval(Duration::from_secs(1));
    let mut fleet = Fleet::new(opts);
    fleet.spawn();
    fleet.wait_holder(WAIT).await;
    let cut_at = now_us();
    proxy.cut();
    // The fault lasts `cut`: this sleep is the fault's duration, not a synchronisation.
    tokio::time::sleep(cut).await;
    proxy.heal();
    let healed_at = now_us();
    let (_, acquired_at, _) = fleet.wait_acquired_after(healed_at, &[], WAIT).await;
    let after_heal = Duration::from_micros((acquired_at - healed_at).max(0) as u64);
    let after_cut = Duration::from_micros((acquired_at - cut_at).max(0) as u64);
    println!("blip of {cut:?}: holding again {after_heal:?} after the heal ({after_cut:?} after the cut)");
    // An attempt in flight at the heal is abandoned at the connect timeout (5 s), then the
    // next comes within the largest backoff (5 s).
    assert!(
        after_heal <= Duration::from_secs(12),
        "{after_heal:?}\n{}",
        fleet.stderr_all()
    );
    fleet.assert_invariants();
    fleet.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_five_second_blip_costs_about_the_backoff_after_the_heal() {
    blip(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_fifteen_second_blip_costs_about_the_backoff_after_the_heal() {
    blip(Duration::from_secs(15)).await;
}

/// Three sessions compete; the schema is dropped under them; one holder again soon.
async fn schema_dropped_under_a_running_fleet(protocol: Protocol) {
    let schema = TestSchema::on(&database_url());
    let channel = unique_channel();
    let options = LockOptions::new()
        .protocol(protocol)
        .schema(schema.name())
        .acquire_interval(Duration::from_secs(1))
        .lease_ttl(Duration::from_secs(3))
        .renew_interval(Duration::from_millis(500));
    let mut sessions = Vec::new();
    let mut locks: Vec<PgIpLock> = Vec::new();
    for _ in 0..3 {
        let s = Session::connect(config()).await.expect("connect");
        let lock = s.lock(&channel, options.clone()).expect("lock");
        lock.init().await.expect("init");
        sessions.push(s);
        locks.push(lock);
    }
    let holders = |locks: &[PgIpLock]| locks.iter().filter(|l| l.is_acquired()).count();
    let deadline = Instant::now() + WAIT;
    while holders(&locks) != 1 {
        assert!(Instant::now() < deadline, "no single holder at the start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut subs: Vec<Subscription> = locks.iter().map(PgIpLock::subscribe).collect();
    let dropped = Instant::now();
    drop_schema(schema.name()).await;
    // Some lock acquires anew (the table is new: under Lease tokens start again at 1).
    let (acquired_tx, mut acquired_rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, mut sub) in subs.drain(..).enumerate() {
        let tx = acquired_tx.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if matches!(m, LockMessage::Acquired { .. }) {
                    let _ = tx.send((i, Instant::now()));
                }
            }
        });
    }
    let (winner, at) = tokio::time::timeout(WAIT, acquired_rx.recv())
        .await
        .expect("no acquisition after the drop")
        .expect("channel");
    let to_acquired = at.duration_since(dropped);
    // Then exactly one holder: a holder whose table vanished learns it at its next renewal.
    let deadline = Instant::now() + WAIT;
    while holders(&locks) != 1 {
        assert!(Instant::now() < deadline, "not a single holder after the drop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let to_single = dropped.elapsed();
    println!(
        "{protocol}: schema dropped; lock {winner} acquired after {to_acquired:?}, one holder after {to_single:?}"
    );
    // Within the standby retry bound (the interval, 1 s, with jitter) plus the repair.
    assert!(to_acquired <= Duration::from_secs(3), "{to_acquired:?}");
    for s in &sessions {
        s.close().await;
    }
}

#[tokio::test]
async fn a_dropped_schema_under_a_lease_fleet_is_set_up_again() {
    schema_dropped_under_a_running_fleet(Protocol::Lease).await;
}

#[tokio::test]
async fn a_dropped_schema_under_a_classic_fleet_is_set_up_again() {
    schema_dropped_under_a_running_fleet(Protocol::Classic).await;
}

#[tokio::test]
async fn a_read_only_server_is_a_clear_error() {
    let schema = TestSchema::on(&database_url());
    let channel = unique_channel();
    let options = LockOptions::new().schema(schema.name());
    // The schema exists (set up by a writable session), the second session is read-only.
    let writer = Session::connect(config()).await.expect("connect");
    let setup = writer.lock(&unique_channel(), options.clone()).expect("lock");
    setup.init().await.expect("init");
    let mut read_only = config();
    read_only.options("-c default_transaction_read_only=on");
    let session = Session::connect(read_only.clone()).await.expect("connect");
    let lock = session.lock(&channel, options.clone()).expect("lock");
    let mut sub = lock.subscribe();
    lock.init().await.expect("init on an existing schema needs no write");
    let started = Instant::now();
    match lock.acquire().await {
        Err(Error::ReadOnly) => {}
        other => panic!("expected a read-only error, got {other:?}"),
    }
    next_matching(&mut sub, "a read-only warning", Duration::from_secs(5), |m| {
        matches!(m, LockMessage::Warning(Warning::ServerReadOnly))
    })
    .await;
    println!(
        "read-only server: acquire failed with ReadOnly after {:?}",
        started.elapsed()
    );
    assert!(!lock.is_acquired());
    // On a fresh schema the setup itself says so.
    let fresh = TestSchema::on(&database_url());
    let other = session
        .lock(&unique_channel(), LockOptions::new().schema(fresh.name()))
        .expect("lock");
    match other.init().await {
        Err(e @ Error::Bootstrap { .. }) => {
            let text = e.to_string();
            assert!(text.contains("25006"), "{text}");
            println!("read-only server, fresh schema: {text}");
        }
        other => panic!("expected a bootstrap error, got {other:?}"),
    }
    session.close().await;
    writer.close().await;
}

/// One session holding `channel`, another standing by on it.
struct Pair {
    holder_session: Session,
    holder: PgIpLock,
    standby_session: Session,
    standby: PgIpLock,
    standby_sub: Subscription,
}

async fn holder_and_standby(channel: &str, options: LockOptions) -> Pair {
    let holder_session = Session::connect(config()).await.expect("connect");
    let holder = holder_session.lock(channel, options.clone()).expect("lock");
    assert!(holder.acquire().await.expect("acquire"));
    let standby_session = Session::connect(config()).await.expect("connect");
    let standby = standby_session.lock(channel, options).expect("lock");
    let standby_sub = standby.subscribe();
    standby.init().await.expect("init");
    assert!(!standby.is_acquired());
    Pair {
        holder_session,
        holder,
        standby_session,
        standby,
        standby_sub,
    }
}

fn acquired(m: &LockMessage) -> bool {
    matches!(m, LockMessage::Acquired { .. })
}

#[tokio::test]
async fn a_panicking_release_handler_does_not_take_the_session_down() {
    let schema = TestSchema::on(&database_url());
    // Standbys retry only every minute: only the release notification can wake them in time.
    let options = LockOptions::new()
        .schema(schema.name())
        .acquire_interval(Duration::from_secs(60));
    let mut pair = holder_and_standby(&unique_channel(), options).await;
    pair.standby
        .on_release(|channel| panic!("a handler for {channel} panics"));
    let released = Instant::now();
    pair.holder.release().await.expect("release");
    // The handler panics when the release notification arrives; the standby still takes over,
    // woken by that same notification.
    next_matching(&mut pair.standby_sub, "acquired", Duration::from_secs(1), acquired).await;
    println!(
        "after a panicking on_release handler: acquired {:?} after the release",
        released.elapsed()
    );
    assert!(pair.standby.is_acquired());
    assert!(pair.standby.acquire().await.expect("the session still answers"));
    pair.holder_session.close().await;
    pair.standby_session.close().await;
}

#[tokio::test]
async fn a_session_task_that_ends_is_reported_by_every_handle() {
    let schema = TestSchema::on(&database_url());
    let options = LockOptions::new()
        .schema(schema.name())
        .acquire_interval(Duration::from_secs(1))
        .lease_ttl(Duration::from_secs(3));
    let mut pair = holder_and_standby(&unique_channel(), options).await;
    let mut sub = pair.holder.subscribe();

    let ended = Instant::now();
    pair.holder_session.abort_task();
    next_matching(&mut sub, "lost", Duration::from_secs(1), |m| {
        matches!(m, LockMessage::Lost { .. })
    })
    .await;
    next_matching(&mut sub, "stopped", Duration::from_secs(1), |m| {
        *m == LockMessage::Stopped
    })
    .await;
    assert!(tokio::time::timeout(Duration::from_secs(1), sub.next())
        .await
        .expect("ends")
        .is_none());
    let reported = ended.elapsed();
    assert!(!pair.holder.is_acquired());
    assert_eq!(pair.holder.token(), None);
    match pair.holder.acquire().await {
        Err(Error::SessionEnded { cause }) => assert!(cause.contains("cancelled"), "{cause}"),
        other => panic!("expected SessionEnded, got {other:?}"),
    }
    // Its connection closed with the task: the other session takes over.
    next_matching(&mut pair.standby_sub, "acquired", Duration::from_secs(5), acquired).await;
    println!(
        "session task ended: handles reported after {reported:?}, another session acquired after {:?}",
        ended.elapsed()
    );
    pair.standby_session.close().await;
}

#[tokio::test]
async fn dropping_every_handle_of_a_holding_lock_releases_it() {
    let schema = TestSchema::on(&database_url());
    let channel = unique_channel();
    let shutdown_timeout = Duration::from_secs(1);
    // Standbys retry only every minute: only the release notification can wake them in time.
    let options = LockOptions::new()
        .schema(schema.name())
        .acquire_interval(Duration::from_secs(60))
        .shutdown_timeout(shutdown_timeout);
    let Pair {
        holder_session,
        holder,
        standby_session,
        standby,
        mut standby_sub,
    } = holder_and_standby(&channel, options.clone()).await;

    let dropped = Instant::now();
    let clone = holder.clone();
    drop(holder);
    drop(clone);
    next_matching(&mut standby_sub, "acquired", shutdown_timeout, acquired).await;
    println!(
        "last lock handle dropped: another session acquired after {:?}",
        dropped.elapsed()
    );

    // Dropping a whole session (every Session clone and lock) releases too.
    let third = Session::connect(config()).await.expect("connect");
    let third_lock = third.lock(&channel, options).expect("lock");
    let mut third_sub = third_lock.subscribe();
    third_lock.init().await.expect("init");
    let dropped = Instant::now();
    drop(standby);
    drop(standby_sub);
    drop(standby_session);
    next_matching(&mut third_sub, "acquired", shutdown_timeout, acquired).await;
    println!(
        "last session handle dropped: another session acquired after {:?}",
        dropped.elapsed()
    );
    third.close().await;
    holder_session.close().await;
}
