//! The metrics, seen through a recorder of the test's own (a test binary of its own: the
//! recorder is process-wide): a handover counts a term started on each side, a term ended as
//! `released`, a handover latency, connections and request latencies.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use pgiplock::{LockOptions, Protocol, Session};

/// Every counter's value and every histogram's sample count, by name and labels.
#[derive(Default)]
struct Store {
    values: Mutex<BTreeMap<String, u64>>,
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
    fn record(&self, _: f64) {
        self.add(1);
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

#[tokio::test]
async fn a_handover_is_counted() {
    let store = Arc::new(Store::default());
    metrics::set_global_recorder(TestRecorder(store.clone())).expect("the only recorder");
    let value = |key: &str| store.values.lock().unwrap().get(key).copied().unwrap_or(0);

    let schema = unique("t_metrics");
    let _cleanup = SchemaGuard::new(&schema);
    let channel = unique("Jobs");
    let options = || {
        LockOptions::new()
            .protocol(Protocol::Lease)
            .schema(&schema)
            .acquire_interval(Duration::from_secs(2))
            .lease_ttl(Duration::from_secs(3))
    };
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
    assert!(value("pgiplock_connections_total{}") >= 2);
    assert!(value("pgiplock_request_seconds{op=acquire}") >= 2);
    assert!(value("pgiplock_request_seconds{op=release}") >= 1);
    s1.close().await;
    s2.close().await;
}
