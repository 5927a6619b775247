//! Anyone who can connect can `NOTIFY` a lock channel. Markers that claim a newer term while a
//! Lease holder holds are reported, not believed: the holder keeps holding and delivering, and
//! only its own renewals (the table) could end its term.

use std::time::Duration;

use pgiplock::{LockMessage, LockOptions, Session, Warning};
use pgiplock_tests::{connect, database_url, next_message, unique_channel, TestSchema};

#[tokio::test]
async fn forged_newer_term_markers_do_not_make_a_lease_holder_step_down() {
    let url = database_url();
    let schema = TestSchema::on(&url);
    let channel = unique_channel();
    let options = LockOptions::new()
        .schema(schema.name())
        .lease_ttl(Duration::from_secs(3))
        .acquire_interval(Duration::from_secs(1));
    let session = Session::connect(url.parse().expect("database URL"))
        .await
        .expect("connect");
    let lock = session.lock(&channel, options).expect("lock");
    let mut sub = lock.subscribe();
    lock.init().await.expect("init");
    next_message(&mut sub, "acquired", Duration::from_secs(10), |m| {
        matches!(m, LockMessage::Acquired { .. })
    })
    .await;
    let token = lock.token().expect("a Lease token");

    let forger = connect(&url).await;
    let lock_channel = format!("__PgIpLock__:{channel}");
    let newer = token.0 + 1000;
    for payload in [
        format!("acquired:{newer}"),
        format!("released:{newer}"),
        format!("draining:{newer}"),
    ] {
        forger
            .execute("SELECT pg_notify($1, $2)", &[&lock_channel, &payload])
            .await
            .expect("notify");
    }
    next_message(&mut sub, "an unconfirmed-marker warning", Duration::from_secs(5), |m| {
        matches!(m, LockMessage::Warning(Warning::UnconfirmedMarker { .. }))
    })
    .await;
    // Still the holder, and still delivering: a message published after the forgeries arrives.
    forger
        .execute("SELECT pg_notify($1, 'after')", &[&channel])
        .await
        .expect("notify");
    let message = next_message(
        &mut sub,
        "the message after the forgeries",
        Duration::from_secs(5),
        |m| matches!(m, LockMessage::Message { .. } | LockMessage::Lost { .. }),
    )
    .await;
    assert_eq!(
        message,
        LockMessage::Message {
            payload: "after".into(),
            replay: false,
        }
    );
    assert!(lock.is_acquired());
    assert_eq!(lock.token(), Some(token));
    session.close().await;
}
