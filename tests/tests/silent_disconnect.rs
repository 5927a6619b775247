//! A holder silently loses its network (a blackholing proxy between it and PostgreSQL: no FIN,
//! no RST, nothing arrives). Under `Lease` it fences itself and a standby takes over within
//! ttl + retry; under `Classic` nobody can take over while its backend lives, and once the
//! backend is gone the old holder still believes it holds: split brain.

use std::time::Duration;

use pgiplock_tests::*;

const STARTUP: Duration = Duration::from_secs(20);

/// Polls `pg_stat_activity` until no backend has `application_name = app`; returns whether
/// that happened within `timeout`.
async fn wait_backend_gone(admin: &tokio_postgres::Client, app: &str, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if backends_of_app(admin, app).await.is_empty() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The holder (worker 0) connects through a proxy; two standbys connect directly.
async fn fleet_with_proxied_holder(
    schema: &TestSchema,
    protocol: Protocol,
    ttl: Option<Duration>,
    interval: Duration,
) -> (BlackholeProxy, Fleet, String) {
    let url = database_url();
    let proxy = BlackholeProxy::for_url(&url).await.expect("proxy");
    let mut base = worker_opts(schema, protocol).acquire_interval(interval);
    base.lease_ttl = ttl;
    let mut fleet = Fleet::new(base.clone());
    let mut proxied = base;
    proxied.database_url = proxy.url(&url);
    let holder = fleet.spawn_with(proxied);
    let (first, _, _) = fleet.wait_holder(STARTUP).await;
    assert_eq!(first, holder);
    let app = fleet.wait_ready(holder, STARTUP).await;
    fleet.spawn_many(2);
    fleet.wait_all_ready(STARTUP).await;
    (proxy, fleet, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_silent_disconnect_fences_holder_and_fails_over() {
    let ttl = Duration::from_secs(3);
    let interval = Duration::from_secs(1);
    let schema = TestSchema::new();
    let (proxy, fleet, app) = fleet_with_proxied_holder(&schema, Protocol::Lease, Some(ttl), interval).await;
    let cut_worker = 0;
    let channel = fleet.base().channel.clone();
    let admin = connect(&database_url()).await;

    let stream = Publisher::stream(&database_url(), &channel, Duration::from_millis(20)).await;
    fleet
        .wait_event(cut_worker, 0, "a delivered message", STARTUP, |k| {
            matches!(k, EventKind::Message { .. })
        })
        .await;

    let t_cut = now_us();
    proxy.cut();
    assert!(
        !backends_of_app(&admin, &app).await.is_empty(),
        "the cut holder's backend is alive at the server"
    );

    let lost = fleet
        .wait_event(cut_worker, t_cut, "lost", ttl + Duration::from_secs(5), |k| {
            matches!(k, EventKind::Lost { .. })
        })
        .await;
    // Its last confirmed renewal was sent before the cut, so it must have stepped down within
    // ttl of the cut (it aims for ttl - margin); the slack covers process scheduling.
    let lost_after = ms(t_cut, lost.t_us);
    assert!(
        lost.t_us - t_cut <= us(ttl + Duration::from_millis(500)),
        "the cut holder reported lost {lost_after} ms after the cut; ttl is {ttl:?}"
    );
    let bound = ttl + interval + Duration::from_secs(3);
    let (next, t_acquired, new_token) = fleet.wait_acquired_after(t_cut, &[cut_worker], bound).await;
    assert!(
        t_acquired > lost.t_us,
        "a standby acquired before the cut holder stepped down"
    );
    let old_token = fleet
        .intervals()
        .iter()
        .find(|i| i.worker == cut_worker)
        .and_then(|i| i.token);
    assert!(
        new_token > old_token,
        "the takeover's token {new_token:?} > {old_token:?}"
    );

    // The takeover terminated the stale backend so it stops listening.
    let t_acq_seen = now_us();
    assert!(
        wait_backend_gone(&admin, &app, Duration::from_secs(5)).await,
        "the cut holder's backend {app:?} is still in pg_stat_activity after the takeover"
    );
    let t_gone = now_us();

    // Stay cut for another lease term: the old worker's requests time out and it tries to
    // reconnect through the blackhole; it must not claim anything meanwhile.
    let during_cut = fleet
        .timeline()
        .try_wait_for(ttl, |events| {
            events
                .iter()
                .find(|e| e.worker == cut_worker && e.t_us > lost.t_us && !matches!(e.kind, EventKind::Ready { .. }))
                .cloned()
        })
        .await;
    assert!(during_cut.is_none(), "the cut worker reported {during_cut:?} while cut");

    // Heal: the old worker learns its session is gone and must not hold again without a fresh
    // acquisition carrying a higher token.
    let t_heal = now_us();
    proxy.heal();
    let published_before_heal = stream.count() as u64;
    fleet
        .timeline()
        .wait_for(
            "the new holder delivers after the heal",
            Duration::from_secs(10),
            |events| {
                events
                    .iter()
                    .any(|e| {
                        e.worker == next
                            && matches!(&e.kind, EventKind::Message { payload, .. }
                            if payload.trim_start_matches('m').parse::<u64>().unwrap_or(0) > published_before_heal)
                    })
                    .then_some(())
            },
        )
        .await;
    // Watch a full lease term after the heal for a stale holder coming back.
    let relapse = fleet
        .timeline()
        .try_wait_for(ttl, |events| {
            events
                .iter()
                .find(|e| {
                    e.worker == cut_worker
                        && e.t_us > lost.t_us
                        && match e.kind {
                            EventKind::Acquired { token } => token <= new_token,
                            EventKind::Message { .. } => true,
                            _ => false,
                        }
                })
                .cloned()
        })
        .await;
    let relapse_holds = fleet
        .intervals()
        .iter()
        .any(|i| i.worker == cut_worker && i.start_us > lost.t_us && i.token <= new_token);
    assert!(
        relapse.is_none() && !relapse_holds,
        "the healed worker held or delivered without a fresh, higher token: {relapse:?}\n{}",
        fleet.timeline().dump()
    );

    let published = stream.stop().await;
    if let Some((last, _)) = published.last() {
        fleet.wait_delivered(last, Duration::from_secs(10)).await;
    }
    let lost_messages = fleet.lost_messages(&published);
    let (no_holder, split_brain) = fleet.coverage(t_cut, now_us());
    assert_eq!(split_brain, 0, "two workers held at once under Lease");
    eprintln!(
        "[lease] since the cut: no holder for {:.1} ms, split brain {:.1} ms (from the workers' events)",
        no_holder as f64 / 1000.0,
        split_brain as f64 / 1000.0
    );
    eprintln!(
        "[lease] silent disconnect (ttl {ttl:?}, retry {interval:?}): holder lost ({:?}) {lost_after:.1} ms after the cut; \
         w{next} acquired {:.1} ms after the cut (failover), {:.1} ms after the old holder stepped down (no holder); \
         split brain 0 ms; stale backend gone {:.1} ms after the acquisition was seen; \
         {} published, {} lost during the outage, {} duplicated",
        lost.kind,
        ms(t_cut, t_acquired),
        ms(lost.t_us, t_acquired),
        ms(t_acq_seen, t_gone),
        published.len(),
        lost_messages.len(),
        fleet.duplicates().len()
    );
    fleet.assert_invariants();

    // The healed worker is a working standby again: once the others stop, it acquires, with a
    // token above every earlier one.
    let t_others_stop = now_us();
    for w in fleet.workers().iter().filter(|w| w.index != cut_worker) {
        w.terminate();
    }
    let (again, t_again, again_token) = fleet
        .wait_acquired_after(t_others_stop, &[], Duration::from_secs(15))
        .await;
    assert_eq!(again, cut_worker);
    assert!(again_token > new_token, "fresh token {again_token:?} > {new_token:?}");
    eprintln!(
        "[lease] healed worker re-acquired with token {again_token:?} {:.1} ms after the others stopped (heal at +{:.1} ms)",
        ms(t_others_stop, t_again),
        ms(t_cut, t_heal)
    );
    fleet.shutdown(Duration::from_secs(10)).await;
    fleet.assert_invariants();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_silent_disconnect_has_an_outage_then_split_brain() {
    let interval = Duration::from_secs(1);
    let schema = TestSchema::new();
    let (proxy, fleet, app) = fleet_with_proxied_holder(&schema, Protocol::Classic, None, interval).await;
    let cut_worker = 0;
    let channel = fleet.base().channel.clone();
    let admin = connect(&database_url()).await;
    let stream = Publisher::stream(&database_url(), &channel, Duration::from_millis(20)).await;
    fleet
        .wait_event(cut_worker, 0, "a delivered message", STARTUP, |k| {
            matches!(k, EventKind::Message { .. })
        })
        .await;

    let t_cut = now_us();
    proxy.cut();

    // The outage: the cut holder's backend stays in pg_stat_activity, so no standby can take
    // over however often it retries. Watch several retry intervals.
    let window = 4 * interval;
    let takeover = fleet
        .timeline()
        .try_wait_for(window, |events| {
            events
                .iter()
                .find(|e| e.t_us > t_cut && e.worker != cut_worker && matches!(e.kind, EventKind::Acquired { .. }))
                .cloned()
        })
        .await;
    assert!(
        takeover.is_none(),
        "a standby took over while the cut holder's backend was alive: {takeover:?}"
    );
    assert!(
        !backends_of_app(&admin, &app).await.is_empty(),
        "the cut holder's backend is still in pg_stat_activity"
    );
    assert_eq!(
        fleet.holders(),
        vec![cut_worker],
        "the cut holder still reports holding"
    );

    // Whatever ends the backend at last (the server's TCP timeout after minutes or hours, or an
    // operator), a standby takes over while the cut holder still believes it holds.
    let t_term = now_us();
    assert_eq!(terminate_app(&admin, &app).await, 1);
    let (next, t_acquired, _) = fleet
        .wait_acquired_after(t_term, &[cut_worker], interval + Duration::from_secs(3))
        .await;
    let believers = fleet.holders();
    assert!(
        believers.contains(&cut_worker) && believers.contains(&next),
        "split brain: both the cut holder and w{next} report holding, got {believers:?}\n{}",
        fleet.timeline().dump()
    );

    // Watch the split brain for a while: the cut holder cannot learn anything until the heal.
    let noticed = fleet
        .timeline()
        .try_wait_for(Duration::from_secs(1), |events| {
            events
                .iter()
                .find(|e| e.worker == cut_worker && e.t_us > t_cut && matches!(e.kind, EventKind::Lost { .. }))
                .cloned()
        })
        .await;
    assert!(
        noticed.is_none(),
        "the cut holder noticed its loss while cut: {noticed:?}"
    );

    let t_heal = now_us();
    proxy.heal();
    let lost = fleet
        .wait_event(cut_worker, t_cut, "lost after the heal", Duration::from_secs(10), |k| {
            matches!(k, EventKind::Lost { .. })
        })
        .await;
    let published = stream.stop().await;
    if let Some((last, _)) = published.last() {
        fleet.wait_delivered(last, Duration::from_secs(10)).await;
    }
    let lost_messages = fleet.lost_messages(&published);
    // Notifications that reached the cut holder's dead backend before it was terminated sat in
    // the network; after the heal the stale holder processes them while another worker holds.
    let stale_deliveries = fleet
        .events()
        .iter()
        .filter(|e| e.worker == cut_worker && e.t_us > t_acquired && matches!(e.kind, EventKind::Message { .. }))
        .count();
    eprintln!(
        "[classic] the stale holder delivered {stale_deliveries} messages during the split brain, after w{next} took over"
    );
    eprintln!(
        "[classic] silent disconnect (retry {interval:?}): no takeover during {window:?} of cut (the outage lasts as long as the \
         dead backend, up to the server's TCP timeout); after the backend was terminated at +{:.1} ms, w{next} acquired \
         {:.1} ms later; outage {:.1} ms; split brain {:.1} ms (ended by the heal at +{:.1} ms, {:?} {:.1} ms after it); \
         {} published, {} lost, {} duplicated",
        ms(t_cut, t_term),
        ms(t_term, t_acquired),
        ms(t_cut, t_acquired),
        ms(t_acquired, lost.t_us),
        ms(t_cut, t_heal),
        lost.kind,
        ms(t_heal, lost.t_us),
        published.len(),
        lost_messages.len(),
        fleet.duplicates().len()
    );
    let (no_holder, split_brain) = fleet.coverage(t_cut, now_us());
    eprintln!(
        "[classic] since the cut: no holder for {:.1} ms (the cut holder is counted as holding), \
         split brain {:.1} ms (from the workers' events)",
        no_holder as f64 / 1000.0,
        split_brain as f64 / 1000.0
    );
    assert!(split_brain > 0);
    // What the baseline suffers, asserted: two workers' holding intervals overlap.
    let intervals = fleet.intervals();
    let old = intervals
        .iter()
        .find(|i| i.worker == cut_worker)
        .expect("the cut holder's tenure");
    let new = intervals
        .iter()
        .find(|i| i.worker == next && i.start_us == t_acquired)
        .expect("the new holder's tenure");
    assert!(old.overlaps(new), "the tenures overlap (split brain): {old:?} {new:?}");
    fleet.assert_well_formed();
    fleet.shutdown(Duration::from_secs(10)).await;
}
