//! The library API (not the worker binary) under a silent disconnect: a holder whose network goes
//! dark fences itself, and a standby takes over once the lease has expired on the database clock,
//! terminating the stale backend.

use std::time::Duration;

use pgiplock::{LockMessage, LockOptions, LostReason, Protocol, Session, Subscription};
use pgiplock_tests::{backends_of_app, connect, database_url, unique_channel, BlackholeProxy, TestSchema};

const WAIT: Duration = Duration::from_secs(20);

async fn next_matching(sub: &mut Subscription, what: &str, pred: impl Fn(&LockMessage) -> bool) -> LockMessage {
    pgiplock_tests::next_message(sub, what, WAIT, pred).await
}

#[tokio::test]
async fn silently_cut_holder_fences_itself_and_is_taken_over() {
    let url = database_url();
    let schema = TestSchema::on(&url);
    let channel = unique_channel();
    let proxy = BlackholeProxy::for_url(&url).await.expect("proxy");
    let via_proxy: tokio_postgres::Config = proxy.url(&url).parse().expect("proxied URL");
    let direct: tokio_postgres::Config = url.parse().expect("database URL");

    let options = LockOptions::new()
        .protocol(Protocol::Lease)
        .schema(schema.name())
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
    let admin = connect(&url).await;
    let gone = tokio::time::timeout(WAIT, async {
        while !backends_of_app(&admin, &stale_app).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        gone.is_ok(),
        "the stale backend of {stale_app} is still in pg_stat_activity"
    );

    s1.close().await;
    s2.close().await;
}
