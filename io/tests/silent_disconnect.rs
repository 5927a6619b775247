//! A holder whose network silently goes dark: it fences itself, and a standby takes over once
//! the lease has expired on the database clock, terminating the stale backend.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pgiplock::{LockMessage, LockOptions, LostReason, Protocol, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy to the test server that can black-hole every connection it carries: bytes are
/// swallowed, nothing is closed, as when a network path silently dies. A cut connection stays
/// dead; connections opened after `heal` work again.
struct Blackhole {
    port: u16,
    /// Connections opened before this epoch are cut.
    cut_epoch: Arc<AtomicU64>,
    epoch: Arc<AtomicU64>,
}

impl Blackhole {
    async fn start(upstream: String) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut_epoch = Arc::new(AtomicU64::new(0));
        let epoch = Arc::new(AtomicU64::new(1));
        let (cut, ep) = (cut_epoch.clone(), epoch.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let born = ep.load(Ordering::SeqCst);
                let cut = cut.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let dead = move || cut.load(Ordering::SeqCst) >= born;
                    let d2 = dead.clone();
                    tokio::join!(pipe(cr, sw, dead), pipe(sr, cw, d2));
                });
            }
        });
        Blackhole { port, cut_epoch, epoch }
    }

    /// Silently cuts every connection open now.
    fn cut(&self) {
        let now = self.epoch.fetch_add(1, Ordering::SeqCst);
        self.cut_epoch.store(now, Ordering::SeqCst);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dead: impl Fn() -> bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                if dead() {
                    // A dead path does not deliver the close either.
                    std::future::pending::<()>().await;
                }
                return;
            }
            Ok(n) => n,
        };
        if dead() {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn silently_cut_holder_fences_itself_and_is_taken_over() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("pgiplock=trace")
        .with_test_writer()
        .try_init();
    let schema = unique("t_silent");
    let channel = unique("jobs");
    let direct = config();
    let host = match direct.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = direct.get_ports().first().copied().unwrap_or(5432);
    let proxy = Blackhole::start(format!("{host}:{port}")).await;
    // `Config::host` appends, so build the proxied configuration from scratch.
    let mut via_proxy = tokio_postgres::Config::new();
    via_proxy.host("127.0.0.1").port(proxy.port);
    if let Some(user) = direct.get_user() {
        via_proxy.user(user);
    }
    if let Some(db) = direct.get_dbname() {
        via_proxy.dbname(db);
    }
    if let Some(password) = direct.get_password() {
        via_proxy.password(password);
    }

    let options = LockOptions::new()
        .protocol(Protocol::Lease)
        .schema(&schema)
        .lease_ttl(Duration::from_secs(2))
        .acquire_interval(Duration::from_secs(1));
    let s1 = Session::connect(via_proxy).await.unwrap();
    let l1 = s1.lock(&channel, options.clone()).unwrap();
    let mut sub1 = l1.subscribe();
    l1.init().await.unwrap();
    let first = next_matching(&mut sub1, "acquired", |m| matches!(m, LockMessage::Acquired { .. })).await;
    let LockMessage::Acquired {
        token: Some(first_token),
    } = first
    else {
        panic!("{first:?}")
    };
    let stale_app = s1.app_name();

    let s2 = Session::connect(direct).await.unwrap();
    let l2 = s2.lock(&channel, options).unwrap();
    let mut sub2 = l2.subscribe();
    l2.init().await.unwrap();
    assert!(!l2.is_acquired());

    proxy.cut();
    let lost = next_matching(&mut sub1, "lost", |m| matches!(m, LockMessage::Lost { .. })).await;
    assert!(
        matches!(
            lost,
            LockMessage::Lost {
                reason: LostReason::LeaseExpired | LostReason::RequestTimeout
            }
        ),
        "{lost:?}"
    );
    let taken = next_matching(&mut sub2, "takeover", |m| matches!(m, LockMessage::Acquired { .. })).await;
    // The cut holder stepped down before the standby could take over.
    assert!(!l1.is_acquired());
    let LockMessage::Acquired { token: Some(token) } = taken else {
        panic!("{taken:?}")
    };
    assert!(token > first_token);
    // The stale backend (alive on the server, unreachable) was terminated by the new holder.
    let admin = admin().await;
    wait_backend_gone(&admin.client, &stale_app).await;

    s1.close().await;
    s2.close().await;
    drop_schema(&schema).await;
}
