//! The process-wide registry (`has_instances`, `destroy_all`) and the opt-in signal handler.
//! A test binary of its own: the registry is global to the process.

mod common;

use std::time::Duration;

use common::*;
use pgiplock::{LockMessage, LockOptions, Protocol, Session};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn destroy_all_and_signal_handler_release_every_lock() {
    let schema = unique("t_registry");
    let _cleanup = SchemaGuard::new(&schema);
    let options = || {
        LockOptions::new()
            .protocol(Protocol::Lease)
            .schema(&schema)
            .shutdown_timeout(Duration::from_secs(2))
    };
    assert!(!pgiplock::has_instances());
    let s = Session::connect(config()).await.unwrap();
    let a = s.lock(&unique("a"), options()).unwrap();
    let b = s.lock(&unique("b"), options()).unwrap();
    assert!(pgiplock::has_instances());
    let mut sub_a = a.subscribe();
    let mut sub_b = b.subscribe();
    a.init().await.unwrap();
    b.init().await.unwrap();
    // Both must hold before the "signal", or there is nothing of b's to release.
    next_matching(&mut sub_a, "acquired", |m| matches!(m, LockMessage::Acquired { .. })).await;
    next_matching(&mut sub_b, "acquired", |m| matches!(m, LockMessage::Acquired { .. })).await;

    // Cancellation stands in for a signal: the handler destroys every lock, then completes.
    let cancel = CancellationToken::new();
    let handler = pgiplock::spawn_signal_handler(cancel.clone());
    cancel.cancel();
    tokio::time::timeout(WAIT, handler).await.unwrap().unwrap();
    assert!(!pgiplock::has_instances());
    assert!(!a.is_acquired() && !b.is_acquired());
    next_matching(&mut sub_a, "released", |m| *m == LockMessage::Released).await;
    next_matching(&mut sub_a, "stopped", |m| *m == LockMessage::Stopped).await;
    assert_eq!(sub_a.next().await, None, "the stream ends after Stopped");
    next_matching(&mut sub_b, "released", |m| *m == LockMessage::Released).await;
    assert!(b.subscribe().next().await.is_none());
    // The rows were released, not left to expire.
    let status = pgiplock::lock_status(config(), Protocol::Lease, Some(&schema))
        .await
        .unwrap();
    assert_eq!(status.len(), 2);
    assert!(status.iter().all(|row| row.holder.is_none()), "{status:?}");

    // destroy_all does the same without a handler.
    let c = s.lock(&unique("c"), options()).unwrap();
    c.init().await.unwrap();
    assert!(pgiplock::has_instances());
    pgiplock::destroy_all().await;
    assert!(!pgiplock::has_instances());
    assert!(matches!(c.acquire().await, Err(pgiplock::Error::Closed)));
    s.close().await;
    drop_schema(&schema).await;
}
