//! Server restarts and outages on a throwaway cluster: the session reports the loss,
//! reconnects with backoff, bootstraps again and re-acquires.

mod common;

use std::time::Duration;

use common::{is_acquired, next_matching, WAIT};
use pgiplock::{LockMessage, LockOptions, LostReason, Protocol, Session};
use pgiplock_testkit::cluster::TempCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_restart_and_outage() {
    let cluster = tokio::task::spawn_blocking(TempCluster::start)
        .await
        .unwrap()
        .expect("a throwaway cluster");
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let session = Session::connect(cluster.config()).await.unwrap();
        let lock = session
            .lock(
                &format!("jobs-{}", protocol.as_str()),
                LockOptions::new()
                    .protocol(protocol)
                    .acquire_interval(Duration::from_secs(1))
                    .lease_ttl(Duration::from_secs(2)),
            )
            .unwrap();
        let mut sub = lock.subscribe();
        lock.init().await.unwrap();
        let first = next_matching(&mut sub, "acquired", is_acquired).await;
        let pid = session.backend_pid();

        // Fast restart: the loss is reported and the lock comes back on a new backend.
        let c = &cluster;
        tokio::task::block_in_place(|| c.restart()).unwrap();
        let lost = next_matching(&mut sub, "lost", |m| matches!(m, LockMessage::Lost { .. })).await;
        assert_eq!(
            lost,
            LockMessage::Lost {
                reason: LostReason::SessionLost
            }
        );
        let again = next_matching(&mut sub, "re-acquired", is_acquired).await;
        assert_ne!(session.backend_pid(), pid);
        if let (LockMessage::Acquired { token: Some(a) }, LockMessage::Acquired { token: Some(b) }) = (&first, &again) {
            assert!(b > a, "tokens survive restarts and keep rising");
        }

        // An outage longer than a few backoff steps: reconnection keeps trying.
        tokio::task::block_in_place(|| c.stop()).unwrap();
        next_matching(&mut sub, "lost", |m| matches!(m, LockMessage::Lost { .. })).await;
        assert!(!lock.is_acquired());
        assert_eq!(session.backend_pid(), None);
        tokio::task::block_in_place(|| c.start_again()).unwrap();
        next_matching(&mut sub, "acquired after the outage", is_acquired).await;
        assert!(lock.is_acquired());
        tokio::time::timeout(WAIT, session.close()).await.unwrap();
    }
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}
