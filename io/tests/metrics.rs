//! The metrics, seen through a recorder of the test's own (a test binary of its own: the
//! recorder is process-wide, installed once for every test; each test reads its own channel's
//! series): a handover counts a term started on each side, a term ended as `released`, a
//! handover and a failover latency, connections and request latencies; a takeover (of a holder
//! whose session ended, of a lease that expired under a live session) counts a failover latency
//! and no handover.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use pgiplock::{LockOptions, Protocol, Session};
use pgiplock_core::{ChannelName, DbOp, Reply, SchemaName};
use pgiplock_testkit::sql::{self, Target};

/// Every counter's value and every histogram's sample count and samples, by name and labels.
#[derive(Default)]
struct Store {
    values: Mutex<BTreeMap<String, u64>>,
    samples: Mutex<BTreeMap<String, Vec<f64>>>,
}

impl Store {
    fn value(&self, key: &str) -> u64 {
        self.values.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    fn samples(&self, key: &str) -> Vec<f64> {
        self.samples.lock().unwrap().get(key).cloned().unwrap_or_default()
    }
}

/// The process's recorder, installed by the first test that asks.
fn store() -> Arc<Store> {
    static STORE: OnceLock<Arc<Store>> = OnceLock::new();
    STORE
        .get_or_init(|| {
            let store = Arc::new(Store::default());
            metrics::set_global_recorder(TestRecorder(store.clone())).expect("the only recorder");
            store
        })
        .clone()
}

struct Handle {
    key: String,
    store: Arc<Store>,
}

impl Handle {
    fn add(&self, n: u64) {
        *self.store.values.lock().unwrap().entry(self.key.clone()).or_default() += n;
    }
}

impl CounterFn for Handle {
    fn increment(&self, value: u64) {
        self.add(value);
    }
    fn absolute(&self, value: u64) {
        self.store.values.lock().unwrap().insert(self.key.clone(), value);
    }
}

impl GaugeFn for Handle {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, _: f64) {}
}

impl HistogramFn for Handle {
    fn record(&self, value: f64) {
        self.add(1);
        self.store
            .samples
            .lock()
            .unwrap()
            .entry(self.key.clone())
            .or_default()
            .push(value);
    }
}

struct TestRecorder(Arc<Store>);

impl TestRecorder {
    fn handle(&self, key: &Key) -> Arc<Handle> {
        let mut labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        labels.sort();
        Arc::new(Handle {
            key: format!("{}{{{}}}", key.name(), labels.join(",")),
            store: self.0.clone(),
        })
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.handle(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.handle(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.handle(key))
    }
}

fn lease_options(schema: &str) -> LockOptions {
    LockOptions::new()
        .protocol(Protocol::Lease)
        .schema(schema)
        .acquire_interval(Duration::from_secs(2))
        .lease_ttl(Duration::from_secs(3))
        .wake_jitter(Duration::from_millis(20))
}

/// The longest a failover sample can be under `options`, whatever the machine's speed: the
/// winner attempts within the wake jitter (plus the core's 1 ms) of hearing the release or of
/// the lease's reported end, and a reply comes within the request timeout or not at all.
fn failover_bound(options: &LockOptions) -> f64 {
    let config = options.to_config().unwrap();
    (config.wake_jitter + Duration::from_millis(1) + config.request_timeout).as_secs_f64()
}

#[tokio::test]
async fn a_handover_is_counted() {
    let store = store();
    let value = |key: &str| store.value(key);

    let schema = unique("t_metrics");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("Jobs");
    let options = || lease_options(&schema);
    let s1 = Session::connect(config()).await.unwrap();
    let s2 = Session::connect(config()).await.unwrap();
    let l1 = s1.lock(&channel, options()).unwrap();
    let l2 = s2.lock(&channel, options()).unwrap();
    l1.init().await.unwrap();
    let first = tokio::time::timeout(WAIT, l1.next_term())
        .await
        .expect("no term")
        .unwrap();
    l2.init().await.unwrap();
    let admin = admin().await;
    publish(&admin.client, &channel, "m1").await;
    let mut sub = l1.subscribe();
    publish(&admin.client, &channel, "m2").await;
    next_matching(&mut sub, "m2", |m| matches!(m, pgiplock::LockMessage::Message { .. })).await;
    l1.release().await.unwrap();
    assert!(first.is_over());
    tokio::time::timeout(WAIT, l2.next_term())
        .await
        .expect("no takeover")
        .unwrap();

    let ch = format!("channel={channel}");
    assert_eq!(value(&format!("pgiplock_terms_started_total{{{ch}}}")), 2);
    assert_eq!(value(&format!("pgiplock_terms_ended_total{{{ch},reason=released}}")), 1);
    assert_eq!(value(&format!("pgiplock_term_seconds{{{ch}}}")), 1);
    assert!(value(&format!("pgiplock_messages_delivered_total{{{ch},replay=false}}")) >= 1);
    assert_eq!(value(&format!("pgiplock_handover_seconds{{{ch}}}")), 1);
    let failovers = store.samples(&format!("pgiplock_failover_seconds{{{ch}}}"));
    assert_eq!(failovers.len(), 1, "one failover sample: {failovers:?}");
    let bound = failover_bound(&options());
    assert!(
        failovers[0] > 0.0 && failovers[0] < bound,
        "failover {} s, not in (0, {bound}) s",
        failovers[0]
    );
    assert!(value("pgiplock_connections_total{}") >= 2);
    assert!(value("pgiplock_request_seconds{op=acquire}") >= 2);
    assert!(value("pgiplock_request_seconds{op=release}") >= 1);
    s1.close().await;
    s2.close().await;
}

/// The one failover sample of `channel`, checked against the bound of `options`; and no
/// handover, since no release was heard.
fn assert_one_takeover(store: &Store, channel: &str, options: &LockOptions) {
    let ch = format!("channel={channel}");
    assert_eq!(store.value(&format!("pgiplock_handover_seconds{{{ch}}}")), 0);
    let failovers = store.samples(&format!("pgiplock_failover_seconds{{{ch}}}"));
    assert_eq!(failovers.len(), 1, "one failover sample: {failovers:?}");
    let bound = failover_bound(options);
    assert!(
        failovers[0] > 0.0 && failovers[0] < bound,
        "failover {} s, not in (0, {bound}) s",
        failovers[0]
    );
}

/// A holder that stalls with its session alive: a plain connection takes a lease of 1 s and
/// never renews. The standby learns the lease's end from its refused attempt, retries then and
/// takes over (terminating the stale backend); the failover counts from the lease's end.
#[tokio::test]
async fn a_takeover_of_an_expired_lease_counts_a_failover() {
    let store = store();
    let schema = unique("t_metrics");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("Jobs");
    let stalled = raw_client(&unique("pgiplock-stalled")).await;
    let schema_name = SchemaName::new(&schema).unwrap();
    sql::bootstrap(&stalled.client, Protocol::Lease, &schema_name)
        .await
        .unwrap();
    let target = Target {
        protocol: Protocol::Lease,
        schema: schema_name,
        channel: ChannelName::new(&channel).unwrap(),
        app: stalled.app.clone(),
        lease_ttl: Duration::from_secs(1),
    };
    match sql::execute(&stalled.client, &target, &DbOp::Acquire).await {
        Ok(Reply::Acquire(reply)) => assert!(reply.acquired, "{reply:?}"),
        other => panic!("acquire: {other:?}"),
    }
    let standby = Session::connect(config()).await.unwrap();
    let lock = standby.lock(&channel, lease_options(&schema)).unwrap();
    lock.init().await.unwrap();
    tokio::time::timeout(WAIT, lock.next_term())
        .await
        .expect("no takeover")
        .unwrap();
    assert_one_takeover(&store, &channel, &lease_options(&schema));
    standby.close().await;
}

/// A holder whose session ends without a release: the standby takes over at its next attempt.
#[tokio::test]
async fn a_takeover_of_an_ended_session_counts_a_failover() {
    let store = store();
    let schema = unique("t_metrics");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("Jobs");
    let s1 = Session::connect(config()).await.unwrap();
    let s2 = Session::connect(config()).await.unwrap();
    let l1 = s1.lock(&channel, lease_options(&schema)).unwrap();
    let l2 = s2.lock(&channel, lease_options(&schema)).unwrap();
    l1.init().await.unwrap();
    let first = tokio::time::timeout(WAIT, l1.next_term())
        .await
        .expect("no term")
        .unwrap();
    l2.init().await.unwrap();
    // The holder's session ends without a release: its connection closes with the task.
    s1.abort_task();
    tokio::time::timeout(WAIT, first.cancellation().cancelled())
        .await
        .expect("the term did not end");
    tokio::time::timeout(WAIT, l2.next_term())
        .await
        .expect("no takeover")
        .unwrap();
    assert_one_takeover(&store, &channel, &lease_options(&schema));
    s2.close().await;
}
