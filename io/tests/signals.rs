//! The shutdown on a signal, in a test binary of its own (the signal is raised in this
//! process): SIGTERM cancels the service's token, ends the term, releases the lock on the
//! server and closes the session, within the shutdown timeout, and names the signal.

mod common;

use std::time::Duration;

use common::*;
use pgiplock::{LockOptions, Protocol, Session, Shutdown, SignalKind};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn sigterm_cancels_the_service_releases_and_closes() {
    let schema = unique("t_signal");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("Jobs");
    let shutdown_timeout = Duration::from_secs(2);
    let session = Session::connect(config()).await.expect("connect");
    let app = session.app_name();
    let lock = session
        .lock(
            &channel,
            LockOptions::new()
                .protocol(Protocol::Lease)
                .schema(&schema)
                .lease_ttl(Duration::from_secs(30))
                .shutdown_timeout(shutdown_timeout),
        )
        .unwrap();
    lock.init().await.unwrap();
    let term = tokio::time::timeout(WAIT, lock.next_term())
        .await
        .expect("no term")
        .unwrap();

    let service = CancellationToken::new();
    // Installed before the signal is raised, so the signal cannot kill the test process.
    let shutdown = Shutdown::install(service.clone()).expect("signal handlers");
    let waiting = tokio::spawn(shutdown.wait());
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).expect("raise SIGTERM");
    let signal = tokio::time::timeout(shutdown_timeout + Duration::from_secs(2), waiting)
        .await
        .expect("the shutdown took longer than its timeout")
        .unwrap();
    assert_eq!(signal, Some(SignalKind::Terminate));
    assert!(service.is_cancelled(), "the service's token was not cancelled");
    assert!(term.is_over(), "the term did not end");
    assert!(!lock.is_acquired());
    assert!(!pgiplock::has_instances());
    assert!(matches!(lock.acquire().await, Err(pgiplock::Error::Closed)));

    // Released on the server (no holder, no lease), and the session's backend is gone.
    let rows = pgiplock::lock_status(config(), Protocol::Lease, Some(&schema))
        .await
        .unwrap();
    let row = rows.iter().find(|r| r.channel == channel).expect("the lease row");
    assert_eq!(row.holder, None, "the lease was not released");
    let admin = admin().await;
    wait_backend_gone(&admin.client, &app).await;
}
