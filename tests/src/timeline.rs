//! The merged timeline of every worker's JSON events, with bounded waits on it.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

/// Microseconds since the Unix epoch on this host's wall clock: the time base of the workers'
/// `t_us`, so that our own marks (a cut, a kill) compare with their events.
#[allow(clippy::disallowed_methods)] // tests compare with the workers' wall-clock `t_us`
pub fn now_us() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
}

/// What a worker reported (or what we observed about its process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// Connected; `app` is the session's `application_name`.
    Ready {
        /// Holder identity of the session.
        app: String,
        /// The worker's OS pid.
        pid: i64,
    },
    /// Holds the lock and receives the channel's notifications.
    Acquired {
        /// Fencing token (`Lease`), `None` under `Classic`.
        token: Option<u64>,
    },
    /// Stopped holding involuntarily.
    Lost {
        /// `LostReason::as_str`.
        reason: String,
    },
    /// A voluntary release reached its drain marker: the tenure ends here.
    Drained,
    /// The server confirmed the release (after `Drained`).
    Released,
    /// The release (after `Drained`) was not confirmed.
    ReleaseFailed {
        /// `LostReason::as_str`.
        reason: String,
    },
    /// Handed a notification to the application.
    Message {
        /// Its payload.
        payload: String,
        /// Replayed at a takeover (the previous holder may have delivered it too).
        replay: bool,
    },
    /// A takeover's replay was incomplete: up to `missing` messages never delivered.
    Gap {
        /// How many were dropped.
        missing: u64,
    },
    /// A warning (`Warning::as_str`), which changes nothing by itself.
    Warning {
        /// Its kind.
        kind: String,
    },
    /// The process exited (observed by the test, time of observation).
    Exited {
        /// Exit code, if it exited normally.
        code: Option<i32>,
        /// Signal number, if a signal ended it.
        signal: Option<i32>,
    },
    /// A stdout line that is not one of the documented events.
    Unparsed {
        /// The line.
        line: String,
    },
}

/// One event of one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Index of the worker in its fleet.
    pub worker: usize,
    /// Microseconds since the Unix epoch.
    pub t_us: i64,
    /// What happened.
    pub kind: EventKind,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>16} w{:<2} {:?}", self.t_us, self.worker, self.kind)
    }
}

/// The worker's stdout format (one JSON object per line).
#[derive(Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Wire {
    Ready {
        app: String,
        pid: i64,
        t_us: i64,
    },
    Acquired {
        token: Option<u64>,
        t_us: i64,
    },
    Lost {
        reason: String,
        t_us: i64,
    },
    Drained {
        t_us: i64,
    },
    Released {
        t_us: i64,
    },
    ReleaseFailed {
        reason: String,
        t_us: i64,
    },
    Message {
        payload: String,
        #[serde(default)]
        replay: bool,
        t_us: i64,
    },
    Gap {
        missing: u64,
        t_us: i64,
    },
    Warning {
        kind: String,
        t_us: i64,
    },
}

/// Parses one stdout line of a worker into an event.
pub(crate) fn parse_line(worker: usize, line: &str) -> Event {
    match serde_json::from_str::<Wire>(line) {
        Ok(wire) => {
            let (t_us, kind) = match wire {
                Wire::Ready { app, pid, t_us } => (t_us, EventKind::Ready { app, pid }),
                Wire::Acquired { token, t_us } => (t_us, EventKind::Acquired { token }),
                Wire::Lost { reason, t_us } => (t_us, EventKind::Lost { reason }),
                Wire::Drained { t_us } => (t_us, EventKind::Drained),
                Wire::Released { t_us } => (t_us, EventKind::Released),
                Wire::ReleaseFailed { reason, t_us } => (t_us, EventKind::ReleaseFailed { reason }),
                Wire::Message { payload, replay, t_us } => (t_us, EventKind::Message { payload, replay }),
                Wire::Gap { missing, t_us } => (t_us, EventKind::Gap { missing }),
                Wire::Warning { kind, t_us } => (t_us, EventKind::Warning { kind }),
            };
            Event { worker, t_us, kind }
        }
        Err(_) => Event {
            worker,
            t_us: crate::now_us(),
            kind: EventKind::Unparsed { line: line.to_owned() },
        },
    }
}

/// Events of many workers in arrival order, and a way to wait for a condition on them.
pub struct Timeline {
    events: Mutex<Vec<Event>>,
    version: watch::Sender<u64>,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline {
            events: Mutex::new(Vec::new()),
            version: watch::Sender::new(0),
        }
    }
}

impl Timeline {
    /// An empty timeline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an event and wakes every waiter.
    pub fn push(&self, event: Event) {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).push(event);
        self.version.send_modify(|v| *v += 1);
    }

    /// A copy of every event so far, in arrival order.
    pub fn snapshot(&self) -> Vec<Event> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Evaluates `pred` on the events so far.
    pub fn check<T>(&self, pred: impl FnOnce(&[Event]) -> Option<T>) -> Option<T> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        pred(&events)
    }

    /// Waits until `pred` returns `Some`, at most `timeout`; `None` on timeout.
    pub async fn try_wait_for<T>(&self, timeout: Duration, mut pred: impl FnMut(&[Event]) -> Option<T>) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.version.subscribe();
        loop {
            // Mark the current version seen before evaluating, so no push is missed between.
            changes.borrow_and_update();
            if let Some(found) = self.check(&mut pred) {
                return Some(found);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `self`, so it cannot be gone; treat it like a timeout.
                Ok(Err(_)) | Err(_) => return self.check(&mut pred),
            }
        }
    }

    /// Waits until `pred` returns `Some`; panics after `timeout`, naming `what` and printing
    /// the timeline.
    pub async fn wait_for<T>(&self, what: &str, timeout: Duration, pred: impl FnMut(&[Event]) -> Option<T>) -> T {
        match self.try_wait_for(timeout, pred).await {
            Some(found) => found,
            None => panic!("timed out after {timeout:?} waiting for {what}\n{}", self.dump()),
        }
    }

    /// The timeline as readable lines.
    pub fn dump(&self) -> String {
        let events = self.snapshot();
        let first = events.iter().map(|e| e.t_us).min().unwrap_or(0);
        let mut out = String::from("timeline (ms since first event):\n");
        for e in &events {
            out.push_str(&format!(
                "  {:>10.1} w{:<2} {:?}\n",
                (e.t_us - first) as f64 / 1000.0,
                e.worker,
                e.kind
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_events() {
        let e = parse_line(3, r#"{"event":"acquired","channel":"c","token":7,"t_us":12}"#);
        assert_eq!(e.worker, 3);
        assert_eq!(e.t_us, 12);
        assert_eq!(e.kind, EventKind::Acquired { token: Some(7) });
        let e = parse_line(0, r#"{"event":"acquired","channel":"c","token":null,"t_us":1}"#);
        assert_eq!(e.kind, EventKind::Acquired { token: None });
        let e = parse_line(0, r#"{"event":"ready","app":"a-1","pid":42,"t_us":1}"#);
        assert_eq!(
            e.kind,
            EventKind::Ready {
                app: "a-1".into(),
                pid: 42
            }
        );
        let e = parse_line(0, r#"{"event":"lost","channel":"c","reason":"lease_expired","t_us":1}"#);
        assert_eq!(
            e.kind,
            EventKind::Lost {
                reason: "lease_expired".into()
            }
        );
        let e = parse_line(0, r#"{"event":"message","channel":"c","payload":"m1","t_us":1}"#);
        assert_eq!(
            e.kind,
            EventKind::Message {
                payload: "m1".into(),
                replay: false
            }
        );
        let e = parse_line(0, "not json");
        assert!(matches!(e.kind, EventKind::Unparsed { .. }));
    }

    #[tokio::test]
    async fn wait_for_wakes_on_push_and_times_out() {
        let timeline = std::sync::Arc::new(Timeline::new());
        let pusher = timeline.clone();
        let task = tokio::spawn(async move {
            tokio::task::yield_now().await;
            pusher.push(parse_line(1, r#"{"event":"released","channel":"c","t_us":5}"#));
        });
        let found = timeline
            .wait_for("released", Duration::from_secs(5), |events| {
                events.iter().find(|e| e.kind == EventKind::Released).map(|e| e.worker)
            })
            .await;
        assert_eq!(found, 1);
        task.await.expect("pusher");
        let none = timeline
            .try_wait_for(Duration::from_millis(20), |events| {
                events
                    .iter()
                    .find(|e| {
                        e.kind
                            == EventKind::Ready {
                                app: String::new(),
                                pid: 0,
                            }
                    })
                    .cloned()
            })
            .await;
        assert!(none.is_none());
    }
}
