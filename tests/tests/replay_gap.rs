//! A standby's replay buffer is bounded (`replay_limit`): when a takeover needs more than it
//! kept, the winner reports `Gap` with the count of what it dropped, then replays the rest.

use std::time::Duration;

use pgiplock::{LockMessage, LockOptions, Session};
use pgiplock_tests::{connect, database_url, next_message, unique_channel, Publisher, TestSchema};

#[tokio::test]
async fn replay_overflow_is_reported_as_a_gap_with_the_right_count() {
    const PUBLISHED: u64 = 50;
    const LIMIT: usize = 10;
    let url = database_url();
    let schema = TestSchema::on(&url);
    let channel = unique_channel();
    // A long renew interval: no progress marker acknowledges anything the standby heard
    // before the holder goes, so the standby must keep all of it.
    let options = LockOptions::new()
        .schema(schema.name())
        .lease_ttl(Duration::from_secs(30))
        .renew_interval(Duration::from_secs(20))
        .acquire_interval(Duration::from_millis(300));
    let holder_session = Session::connect(url.parse().expect("database URL"))
        .await
        .expect("connect");
    let holder = holder_session.lock(&channel, options.clone()).expect("lock");
    let mut holder_sub = holder.subscribe();
    holder.init().await.expect("init");
    next_message(&mut holder_sub, "acquired", Duration::from_secs(10), |m| {
        matches!(m, LockMessage::Acquired { .. })
    })
    .await;

    let standby_session = Session::connect(url.parse().expect("database URL"))
        .await
        .expect("connect");
    let standby = standby_session
        .lock(&channel, options.replay_limit(LIMIT))
        .expect("lock");
    let mut sub = standby.subscribe();
    standby.init().await.expect("init");
    assert!(!standby.is_acquired());

    let publisher = Publisher::connect(&url).await;
    publisher.publish_numbered(&channel, 0..PUBLISHED).await;
    // The holder has them all; its backend then ends server-side and its process goes.
    let last = format!("m{}", PUBLISHED - 1);
    next_message(
        &mut holder_sub,
        "the holder's last message",
        Duration::from_secs(10),
        |m| matches!(m, LockMessage::Message { payload, .. } if *payload == last),
    )
    .await;
    let pid = holder_session.backend_pid().expect("the holder's backend pid");
    holder_session.abort_task();
    let admin = connect(&url).await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");

    next_message(&mut sub, "acquired", Duration::from_secs(10), |m| {
        matches!(m, LockMessage::Acquired { .. })
    })
    .await;
    let gap = next_message(&mut sub, "the gap", Duration::from_secs(5), |m| {
        matches!(m, LockMessage::Gap { .. } | LockMessage::Message { .. })
    })
    .await;
    assert_eq!(
        gap,
        LockMessage::Gap {
            missing: PUBLISHED - LIMIT as u64
        }
    );
    for i in PUBLISHED - LIMIT as u64..PUBLISHED {
        let m = next_message(&mut sub, "a replayed message", Duration::from_secs(5), |m| {
            matches!(m, LockMessage::Message { .. })
        })
        .await;
        assert_eq!(
            m,
            LockMessage::Message {
                payload: format!("m{i}"),
                replay: true
            }
        );
    }
    standby_session.close().await;
}
