//! A fleet of workers on one channel and the checkers over their merged timeline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::timeline::{Event, EventKind, Timeline};
use crate::worker::{Worker, WorkerOpts};

/// How a holding interval ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndKind {
    /// The worker released voluntarily (its tenure ended at `drained`).
    Released,
    /// The worker reported `lost` with this reason.
    Lost(String),
    /// The process exited while holding (e.g. SIGKILL); the end is when the test saw the exit.
    Exited,
    /// Still holding at the end of the timeline.
    Open,
}

/// One worker's tenure: from its `acquired` to its `released`, `lost` or exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    /// The worker.
    pub worker: usize,
    /// `t_us` of `acquired`.
    pub start_us: i64,
    /// `t_us` of the end, `None` while open.
    pub end_us: Option<i64>,
    /// The token of the `acquired` event.
    pub token: Option<u64>,
    /// How it ended.
    pub end: EndKind,
}

impl Interval {
    fn end_or_max(&self) -> i64 {
        self.end_us.unwrap_or(i64::MAX)
    }

    /// Whether two intervals share an instant.
    pub fn overlaps(&self, other: &Interval) -> bool {
        self.start_us < other.end_or_max() && other.start_us < self.end_or_max()
    }
}

/// Holding intervals of every worker, and protocol anomalies (events that a worker must never
/// print in its current state: `acquired` while holding, `message` while not holding, ...).
pub fn holding_intervals(events: &[Event]) -> (Vec<Interval>, Vec<String>) {
    let mut open: BTreeMap<usize, Interval> = BTreeMap::new();
    let mut drained: std::collections::BTreeSet<usize> = std::collections::BTreeSet::new();
    let mut done = Vec::new();
    let mut anomalies = Vec::new();
    for e in events {
        match &e.kind {
            EventKind::Acquired { token } => {
                if let Some(prev) = open.get(&e.worker) {
                    anomalies.push(format!("{e}: acquired while already holding since {}", prev.start_us));
                } else {
                    open.insert(
                        e.worker,
                        Interval {
                            worker: e.worker,
                            start_us: e.t_us,
                            end_us: None,
                            token: *token,
                            end: EndKind::Open,
                        },
                    );
                }
            }
            EventKind::Released | EventKind::ReleaseFailed { .. } => {
                // The outcome of a release whose tenure ended at `drained`.
                let after_drain = drained.remove(&e.worker);
                if !after_drain {
                    anomalies.push(format!("{e}: a release outcome without a drained tenure"));
                }
            }
            EventKind::Drained | EventKind::Lost { .. } | EventKind::Exited { .. } => {
                if e.kind == EventKind::Drained {
                    drained.insert(e.worker);
                }
                let end = match &e.kind {
                    EventKind::Drained => EndKind::Released,
                    EventKind::Lost { reason } => EndKind::Lost(reason.clone()),
                    _ => EndKind::Exited,
                };
                match open.remove(&e.worker) {
                    Some(mut interval) => {
                        interval.end_us = Some(e.t_us);
                        interval.end = end;
                        done.push(interval);
                    }
                    None if end != EndKind::Exited => {
                        anomalies.push(format!("{e}: reported while not holding"));
                    }
                    None => {}
                }
            }
            EventKind::Message { .. } if !open.contains_key(&e.worker) => {
                anomalies.push(format!("{e}: delivered while not holding"));
            }
            EventKind::Unparsed { .. } => anomalies.push(format!("{e}: not a documented event")),
            _ => {}
        }
    }
    done.extend(open.into_values());
    done.sort_by_key(|i| (i.start_us, i.worker));
    (done, anomalies)
}

/// Pairs of intervals of different workers that overlap.
pub fn overlapping_pairs(intervals: &[Interval]) -> Vec<(Interval, Interval)> {
    let mut pairs = Vec::new();
    for (i, a) in intervals.iter().enumerate() {
        for b in &intervals[i + 1..] {
            if a.worker != b.worker && a.overlaps(b) {
                pairs.push((a.clone(), b.clone()));
            }
        }
    }
    pairs
}

/// The overlapping tenures of `events` that
/// [`Fleet::assert_no_overlap_but_late_session_loss`] does not excuse.
pub fn overlaps_but_late_session_loss(events: &[Event]) -> Vec<(Interval, Interval)> {
    overlapping_pairs(&holding_intervals(events).0)
        .into_iter()
        .filter(|(a, b)| {
            let (first, second) = if a.start_us <= b.start_us { (a, b) } else { (b, a) };
            let late_loss = first.end == EndKind::Lost("session_lost".into());
            let delivered_after = events.iter().any(|e| {
                e.worker == first.worker
                    && matches!(e.kind, EventKind::Message { .. })
                    && e.t_us >= second.start_us
                    && e.t_us <= first.end_or_max()
            });
            !late_loss || delivered_after
        })
        .collect()
}

/// Time, within `[from_us, to_us]`, during which no worker held (`.0`, the loss window when
/// messages flow) and during which two or more held (`.1`, split brain), in microseconds.
/// Open intervals count as held until `to_us`.
pub fn coverage(intervals: &[Interval], from_us: i64, to_us: i64) -> (i64, i64) {
    // Sweep over +1/-1 edges of the clipped intervals.
    let mut edges: Vec<(i64, i32)> = Vec::new();
    for i in intervals {
        let start = i.start_us.max(from_us);
        let end = i.end_us.unwrap_or(to_us).min(to_us);
        if start < end {
            edges.push((start, 1));
            edges.push((end, -1));
        }
    }
    edges.sort();
    let (mut none, mut many, mut depth, mut at) = (0i64, 0i64, 0i32, from_us);
    for (t, delta) in edges {
        match depth {
            0 => none += t - at,
            1 => {}
            _ => many += t - at,
        }
        depth += delta;
        at = t;
    }
    if depth == 0 {
        none += to_us - at;
    }
    (none, many)
}

/// Several workers on one channel, their merged [`Timeline`] and its checkers.
pub struct Fleet {
    timeline: Arc<Timeline>,
    workers: Vec<Worker>,
    base: WorkerOpts,
}

impl Fleet {
    /// An empty fleet whose workers default to `base`.
    pub fn new(base: WorkerOpts) -> Fleet {
        Fleet {
            timeline: Arc::new(Timeline::new()),
            workers: Vec::new(),
            base,
        }
    }

    /// The default settings of new workers.
    pub fn base(&self) -> &WorkerOpts {
        &self.base
    }

    /// Starts a worker with the base settings; returns its index.
    pub fn spawn(&mut self) -> usize {
        self.spawn_with(self.base.clone())
    }

    /// Starts a worker with `opts`; returns its index.
    pub fn spawn_with(&mut self, opts: WorkerOpts) -> usize {
        let index = self.workers.len();
        self.workers.push(Worker::spawn(index, opts, self.timeline.clone()));
        index
    }

    /// Starts `command` (see [`Worker::spawn_command`]) as the next worker; returns its index.
    pub fn spawn_command(&mut self, command: tokio::process::Command) -> usize {
        let index = self.workers.len();
        let opts = self.base.clone();
        self.workers
            .push(Worker::spawn_command(index, command, opts, self.timeline.clone()));
        index
    }

    /// Starts `n` workers with the base settings.
    pub fn spawn_many(&mut self, n: usize) -> Vec<usize> {
        (0..n).map(|_| self.spawn()).collect()
    }

    /// Worker `index`.
    pub fn worker(&self, index: usize) -> &Worker {
        &self.workers[index]
    }

    /// Every worker started so far.
    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    /// The merged timeline.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// A copy of the events so far.
    pub fn events(&self) -> Vec<Event> {
        self.timeline.snapshot()
    }

    /// Holding intervals so far (see [`holding_intervals`]).
    pub fn intervals(&self) -> Vec<Interval> {
        holding_intervals(&self.events()).0
    }

    /// Workers holding right now, by their events.
    pub fn holders(&self) -> Vec<usize> {
        self.intervals()
            .into_iter()
            .filter(|i| i.end == EndKind::Open)
            .map(|i| i.worker)
            .collect()
    }

    /// `(no holder, split brain)` in microseconds within `[from_us, to_us]`, see [`coverage`].
    pub fn coverage(&self, from_us: i64, to_us: i64) -> (i64, i64) {
        coverage(&self.intervals(), from_us, to_us)
    }

    /// Waits until worker `index` reported `ready`; returns its latest application name.
    pub async fn wait_ready(&self, index: usize, timeout: Duration) -> String {
        self.timeline
            .wait_for(&format!("w{index} ready"), timeout, |events| {
                events.iter().rev().find_map(|e| match &e.kind {
                    EventKind::Ready { app, .. } if e.worker == index => Some(app.clone()),
                    _ => None,
                })
            })
            .await
    }

    /// Waits until every worker started so far reported `ready`.
    pub async fn wait_all_ready(&self, timeout: Duration) {
        let n = self.workers.len();
        self.timeline
            .wait_for(&format!("all {n} workers ready"), timeout, |events| {
                let ready: std::collections::BTreeSet<usize> = events
                    .iter()
                    .filter(|e| matches!(e.kind, EventKind::Ready { .. }))
                    .map(|e| e.worker)
                    .collect();
                (ready.len() == n).then_some(())
            })
            .await
    }

    /// Waits for an `acquired` event after `after_us`, by any worker not in `exclude`; returns
    /// `(worker, t_us, token)`.
    pub async fn wait_acquired_after(
        &self,
        after_us: i64,
        exclude: &[usize],
        timeout: Duration,
    ) -> (usize, i64, Option<u64>) {
        self.timeline
            .wait_for(
                &format!("an acquisition after t_us {after_us} by a worker other than {exclude:?}"),
                timeout,
                |events| {
                    events.iter().find_map(|e| match e.kind {
                        EventKind::Acquired { token } if e.t_us > after_us && !exclude.contains(&e.worker) => {
                            Some((e.worker, e.t_us, token))
                        }
                        _ => None,
                    })
                },
            )
            .await
    }

    /// Waits until some worker holds (its latest tenure is open); returns `(worker, t_us,
    /// token)` of that tenure's `acquired`.
    pub async fn wait_holder(&self, timeout: Duration) -> (usize, i64, Option<u64>) {
        self.timeline
            .wait_for("a holder", timeout, |events| {
                let (intervals, _) = holding_intervals(events);
                intervals
                    .into_iter()
                    .find(|i| i.end == EndKind::Open)
                    .map(|i| (i.worker, i.start_us, i.token))
            })
            .await
    }

    /// Waits for the first event of worker `index` after `after_us` that `pred` accepts.
    pub async fn wait_event(
        &self,
        index: usize,
        after_us: i64,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&EventKind) -> bool,
    ) -> Event {
        self.timeline
            .wait_for(&format!("w{index}: {what}"), timeout, |events| {
                events
                    .iter()
                    .find(|e| e.worker == index && e.t_us > after_us && pred(&e.kind))
                    .cloned()
            })
            .await
    }

    /// Waits until worker `index` exited; returns `(code, signal)`.
    pub async fn wait_exit(&self, index: usize, timeout: Duration) -> (Option<i32>, Option<i32>) {
        self.timeline
            .wait_for(&format!("w{index} to exit"), timeout, |events| {
                events.iter().find_map(|e| match e.kind {
                    EventKind::Exited { code, signal } if e.worker == index => Some((code, signal)),
                    _ => None,
                })
            })
            .await
    }

    /// Waits until `payload` was delivered by some worker; returns that worker.
    pub async fn wait_delivered(&self, payload: &str, timeout: Duration) -> usize {
        self.timeline
            .wait_for(&format!("delivery of {payload:?}"), timeout, |events| {
                events.iter().find_map(|e| match &e.kind {
                    EventKind::Message { payload: p, .. } if p == payload => Some(e.worker),
                    _ => None,
                })
            })
            .await
    }

    /// Every delivered payload and the workers that delivered it (one entry per delivery).
    pub fn deliveries(&self) -> BTreeMap<String, Vec<usize>> {
        let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for e in self.events() {
            if let EventKind::Message { payload, .. } = e.kind {
                out.entry(payload).or_default().push(e.worker);
            }
        }
        out
    }

    /// How many messages each worker delivered.
    pub fn deliveries_per_worker(&self) -> BTreeMap<usize, usize> {
        let mut out = BTreeMap::new();
        for e in self.events() {
            if matches!(e.kind, EventKind::Message { .. }) {
                *out.entry(e.worker).or_default() += 1;
            }
        }
        out
    }

    /// Payloads delivered more than once.
    pub fn duplicates(&self) -> Vec<(String, Vec<usize>)> {
        self.deliveries().into_iter().filter(|(_, w)| w.len() > 1).collect()
    }

    /// Of `published`, the payloads no worker delivered.
    pub fn lost_messages(&self, published: &[(String, i64)]) -> Vec<String> {
        let delivered = self.deliveries();
        published
            .iter()
            .filter(|(p, _)| !delivered.contains_key(p))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// S2: holding intervals of different workers never overlap. Panics listing the offenders.
    pub fn assert_no_overlap(&self) {
        self.panic_on_overlaps(overlapping_pairs(&self.intervals()));
    }

    /// S2 in a run that ends holders' sessions from the server (`pg_terminate_backend`): such a
    /// holder learns it only when it reads the server's message, so its printed tenure may end
    /// after the next holder's `acquired` although its backend was gone by then (a standby takes
    /// a live holder's row only at its expiry). An overlap is excused only where the earlier
    /// tenure ended `lost` with `session_lost` and delivered nothing after the later one began;
    /// every other overlap panics as in [`assert_no_overlap`](Self::assert_no_overlap).
    pub fn assert_no_overlap_but_late_session_loss(&self) {
        self.panic_on_overlaps(overlaps_but_late_session_loss(&self.events()));
    }

    fn panic_on_overlaps(&self, pairs: Vec<(Interval, Interval)>) {
        if !pairs.is_empty() {
            let mut msg = String::from("holding intervals of different workers overlap:\n");
            for (a, b) in &pairs {
                msg.push_str(&format!("  {a:?}\n  {b:?}\n\n"));
            }
            panic!("{msg}{}", self.timeline.dump());
        }
    }

    /// No message was delivered by two workers (or twice).
    pub fn assert_no_duplicates(&self) {
        let dups = self.duplicates();
        assert!(
            dups.is_empty(),
            "messages delivered more than once: {dups:?}\n{}",
            self.timeline.dump()
        );
    }

    /// Every event is documented and fits the worker's state (S3: messages only in tenure).
    pub fn assert_well_formed(&self) {
        let (_, anomalies) = holding_intervals(&self.events());
        assert!(
            anomalies.is_empty(),
            "anomalies in the workers' events:\n  {}\n{}",
            anomalies.join("\n  "),
            self.timeline.dump()
        );
    }

    /// Repeated deliveries that were not flagged as replays (a takeover's replay may repeat
    /// what the previous holder delivered after its last acknowledged marker; nothing else may).
    pub fn unflagged_duplicates(&self) -> Vec<(String, usize)> {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for e in self.events() {
            if let EventKind::Message { payload, replay } = e.kind {
                if !seen.insert(payload.clone()) && !replay {
                    out.push((payload, e.worker));
                }
            }
        }
        out
    }

    /// No message was delivered twice unless flagged as a replay.
    pub fn assert_no_unflagged_duplicates(&self) {
        let dups = self.unflagged_duplicates();
        assert!(
            dups.is_empty(),
            "messages delivered again without the replay flag: {dups:?}\n{}",
            self.timeline.dump()
        );
    }

    /// All of the fleet's invariants: well-formed events, no overlap, no duplicate that is not
    /// a flagged replay (tests of graceful handovers also call
    /// [`assert_no_duplicates`](Fleet::assert_no_duplicates)).
    pub fn assert_invariants(&self) {
        self.assert_well_formed();
        self.assert_no_overlap();
        self.assert_no_unflagged_duplicates();
    }

    /// Every worker's stderr, labelled.
    pub fn stderr_all(&self) -> String {
        let mut out = String::new();
        for w in &self.workers {
            out.push_str(&format!("--- w{} stderr ---\n{}", w.index, w.stderr()));
        }
        out
    }

    /// SIGTERM to every running worker, then waits (bounded) until all exited; returns the
    /// exit codes of those that exited normally.
    pub async fn shutdown(&self, timeout: Duration) {
        for w in &self.workers {
            w.terminate();
        }
        let n = self.workers.len();
        self.timeline
            .wait_for(&format!("all {n} workers to exit"), timeout, |events| {
                let exited = events
                    .iter()
                    .filter(|e| matches!(e.kind, EventKind::Exited { .. }))
                    .count();
                (exited == n).then_some(())
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(worker: usize, t_us: i64, kind: EventKind) -> Event {
        Event { worker, t_us, kind }
    }

    #[test]
    fn intervals_and_overlaps() {
        let events = vec![
            ev(0, 10, EventKind::Acquired { token: Some(1) }),
            ev(
                0,
                15,
                EventKind::Message {
                    payload: "a".into(),
                    replay: false,
                },
            ),
            ev(0, 20, EventKind::Drained),
            ev(0, 21, EventKind::Released),
            ev(1, 25, EventKind::Acquired { token: Some(2) }),
            ev(
                1,
                30,
                EventKind::Exited {
                    code: None,
                    signal: Some(9),
                },
            ),
            ev(2, 29, EventKind::Acquired { token: Some(3) }),
            ev(
                0,
                40,
                EventKind::Message {
                    payload: "b".into(),
                    replay: false,
                },
            ),
        ];
        let (intervals, anomalies) = holding_intervals(&events);
        assert_eq!(intervals.len(), 3);
        assert_eq!(intervals[0].end, EndKind::Released);
        assert_eq!(intervals[1].end, EndKind::Exited);
        assert_eq!(intervals[2].end, EndKind::Open);
        assert_eq!(anomalies.len(), 1, "{anomalies:?}");
        let pairs = overlapping_pairs(&intervals);
        assert_eq!(pairs.len(), 1);
        assert_eq!((pairs[0].0.worker, pairs[0].1.worker), (1, 2));
    }

    #[test]
    fn coverage_counts_gaps_and_overlaps() {
        let events = vec![
            ev(0, 10, EventKind::Acquired { token: None }),
            ev(0, 20, EventKind::Drained),
            ev(1, 25, EventKind::Acquired { token: None }),
            ev(2, 28, EventKind::Acquired { token: None }),
            ev(1, 30, EventKind::Lost { reason: "x".into() }),
        ];
        let (intervals, _) = holding_intervals(&events);
        // Gaps: 0..10 and 20..25; two holders: 28..30; w2 open until 40.
        assert_eq!(coverage(&intervals, 0, 40), (15, 2));
        assert_eq!(coverage(&intervals, 12, 26), (5, 0));
        assert_eq!(coverage(&[], 0, 7), (7, 0));
    }

    #[test]
    fn a_late_session_loss_is_excused_only_without_deliveries_after_the_next_start() {
        let message = |worker, t| {
            ev(
                worker,
                t,
                EventKind::Message {
                    payload: format!("m{t}"),
                    replay: false,
                },
            )
        };
        let lost = |worker, t, reason: &str| ev(worker, t, EventKind::Lost { reason: reason.into() });
        let base = vec![
            ev(0, 10, EventKind::Acquired { token: Some(1) }),
            message(0, 15),
            ev(1, 20, EventKind::Acquired { token: Some(2) }),
        ];
        // Learned late, delivered nothing since: excused.
        let mut events = base.clone();
        events.push(lost(0, 23, "session_lost"));
        assert_eq!(overlapping_pairs(&holding_intervals(&events).0).len(), 1);
        assert!(overlaps_but_late_session_loss(&events).is_empty());
        // Delivered after the next holder began: not excused.
        let mut events = base.clone();
        events.push(message(0, 21));
        events.push(lost(0, 23, "session_lost"));
        assert_eq!(overlaps_but_late_session_loss(&events).len(), 1);
        // Any other end: not excused.
        let mut events = base;
        events.push(lost(0, 23, "lease_expired"));
        assert_eq!(overlaps_but_late_session_loss(&events).len(), 1);
    }

    #[test]
    fn touching_intervals_do_not_overlap() {
        let events = vec![
            ev(0, 10, EventKind::Acquired { token: None }),
            ev(0, 20, EventKind::Lost { reason: "x".into() }),
            ev(1, 20, EventKind::Acquired { token: None }),
        ];
        let (intervals, anomalies) = holding_intervals(&events);
        assert!(anomalies.is_empty());
        assert!(overlapping_pairs(&intervals).is_empty());
    }
}
