//! The metrics of DESIGN.md section 6, accumulated during a run, and the report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use pgiplock_core::{Protocol, Timestamp};
use serde::Serialize;

use crate::scenario::{format_duration, FaultKind, Scenario};

/// Accumulates one run's measurements; times before the warmup do not count.
#[derive(Debug, Clone)]
pub struct Metrics {
    warmup: Timestamp,
    end: Timestamp,
    unavailable_us: u64,
    outage_run_us: u64,
    longest_outage_us: u64,
    split_brain_us: u64,
    split_brain_gap_us: u64,
    published: Vec<bool>,
    deliveries: Vec<u8>,
    /// Per message: its commit time, its deliveries flagged `replay`, and the others.
    committed_at: Vec<Timestamp>,
    /// Per message: the schema generation it was committed in.
    committed_generation: Vec<u64>,
    replays: Vec<u8>,
    unflagged: Vec<u8>,
    /// Of the unflagged, those by a holder the server had not ended unknown to it (D1).
    unflagged_informed: Vec<u8>,
    /// Global times the data channel's lock was acquired (term starts), in order.
    term_starts: Vec<Timestamp>,
    /// Every fault: when, what, and whether it hit the process serving the data channel.
    fault_log: Vec<(Timestamp, FaultKind, bool)>,
    statements_total: u64,
    statements_per_process: Vec<u64>,
    failovers: BTreeMap<FaultKind, Vec<Duration>>,
    faults: BTreeMap<FaultKind, u64>,
    lost_reasons: BTreeMap<&'static str, u64>,
    session_events: BTreeMap<&'static str, u64>,
    /// Acquisitions of the data channel's lock.
    pub acquisitions: u64,
    /// Sessions the server dropped through its dead-peer detection.
    pub dead_peer_drops: u64,
    /// Stale holders terminated by a taking-over standby.
    pub stale_terminations: u64,
    /// Deliveries by a lock that had not reported `Acquired` (S3).
    pub s3_violations: u64,
    /// Fencing-token regressions (S4).
    pub s4_violations: Vec<String>,
    /// A message delivered twice without a replay flag (D1, Lease).
    pub d1_violation: Option<String>,
    /// A replay by a term whose predecessor was released gracefully, or under Classic (D2).
    pub d2_violation: Option<String>,
    /// Lock-channel markers the locks ignored (not sent by their term's holder backend).
    pub ignored_markers: u64,
    /// Notifications a forging foreign session sent on the lock channel.
    pub forged_notifications: u64,
    /// `Gap` events of the data channel's lock, and the messages they said may be missing.
    pub gap_events: u64,
    /// The sum of their `missing`.
    pub gap_missing: u64,
}

impl Metrics {
    /// Empty metrics for `processes` processes, counting over `[warmup, end]`.
    pub fn new(processes: usize, warmup: Timestamp, end: Timestamp) -> Self {
        Metrics {
            warmup,
            end,
            unavailable_us: 0,
            outage_run_us: 0,
            longest_outage_us: 0,
            split_brain_us: 0,
            split_brain_gap_us: 0,
            published: Vec::new(),
            deliveries: Vec::new(),
            committed_at: Vec::new(),
            committed_generation: Vec::new(),
            replays: Vec::new(),
            unflagged: Vec::new(),
            unflagged_informed: Vec::new(),
            term_starts: Vec::new(),
            fault_log: Vec::new(),
            statements_total: 0,
            statements_per_process: vec![0; processes],
            failovers: BTreeMap::new(),
            faults: BTreeMap::new(),
            lost_reasons: BTreeMap::new(),
            session_events: BTreeMap::new(),
            acquisitions: 0,
            dead_peer_drops: 0,
            stale_terminations: 0,
            s3_violations: 0,
            s4_violations: Vec::new(),
            d1_violation: None,
            d2_violation: None,
            ignored_markers: 0,
            forged_notifications: 0,
            gap_events: 0,
            gap_missing: 0,
        }
    }

    /// The state held from `from` to `to`: whether someone served the channel, how many believed.
    /// `gap`: the second believer's session had ended at the server without it knowing.
    pub fn advance(&mut self, from: Timestamp, to: Timestamp, available: bool, believers: usize, gap: bool) {
        let from = from.max(self.warmup);
        let to = to.min(self.end);
        if to <= from {
            return;
        }
        let dt = to.as_micros() - from.as_micros();
        if available {
            self.longest_outage_us = self.longest_outage_us.max(self.outage_run_us);
            self.outage_run_us = 0;
        } else {
            self.unavailable_us += dt;
            self.outage_run_us += dt;
        }
        if believers >= 2 {
            self.split_brain_us += dt;
            if gap {
                self.split_brain_gap_us += dt;
            }
        }
    }

    /// Time with two or more believers so far, microseconds.
    pub(crate) fn split_brain_us(&self) -> u64 {
        self.split_brain_us
    }

    /// Statements executed for process `p` at `at`.
    pub fn statements(&mut self, p: usize, n: u64, at: Timestamp) {
        if at >= self.warmup {
            self.statements_total += n;
            if let Some(c) = self.statements_per_process.get_mut(p) {
                *c += n;
            }
        }
    }

    /// Message `id` was committed by the publisher.
    pub fn published(&mut self, id: u64, at: Timestamp, generation: u64) {
        let i = id as usize;
        if self.published.len() <= i {
            self.published.resize(i + 1, false);
            self.deliveries.resize(i + 1, 0);
            self.committed_at.resize(i + 1, Timestamp::ZERO);
            self.committed_generation.resize(i + 1, 0);
            self.replays.resize(i + 1, 0);
            self.unflagged.resize(i + 1, 0);
            self.unflagged_informed.resize(i + 1, 0);
        }
        self.published[i] = true;
        self.committed_at[i] = at;
        self.committed_generation[i] = generation;
    }

    /// The schema generation message `id` was committed in.
    pub fn generation_of(&self, id: u64) -> u64 {
        self.committed_generation.get(id as usize).copied().unwrap_or(0)
    }

    /// Message `id` was handed to the application of a process, flagged `replay` or not;
    /// `uninformed`: by a holder whose term the server had already ended without telling it
    /// (its session ended, or its row went with a dropped schema), which S2 exempts too.
    /// Returns whether that made it delivered twice unflagged by informed holders (D1; the
    /// first time).
    pub fn delivered(&mut self, id: u64, _p: usize, replay: bool, uninformed: bool) -> bool {
        let i = id as usize;
        let Some(d) = self.deliveries.get_mut(i) else {
            return false;
        };
        *d = d.saturating_add(1);
        if replay {
            self.replays[i] = self.replays[i].saturating_add(1);
            return false;
        }
        self.unflagged[i] = self.unflagged[i].saturating_add(1);
        if uninformed {
            return false;
        }
        self.unflagged_informed[i] = self.unflagged_informed[i].saturating_add(1);
        self.unflagged_informed[i] == 2
    }

    /// The data channel's lock was acquired at global time `at`: a term begins.
    pub fn term_started(&mut self, at: Timestamp) {
        self.term_starts.push(at);
    }

    /// A fault happened at `at`; `hit_holder`: it hit the process serving the data channel (or
    /// the whole server while someone served).
    pub fn fault(&mut self, kind: FaultKind, at: Timestamp, hit_holder: bool) {
        *self.faults.entry(kind).or_insert(0) += 1;
        self.fault_log.push((at, kind, hit_holder));
    }

    /// The fault a message committed at `at` is attributed to: the term it was committed in
    /// runs from the last acquisition before it to the next one after it, and the first fault
    /// in that span that hit the serving holder ended it (else the first fault of any kind in
    /// the span; else none: a term that ended without a fault, or has not ended).
    fn cause(&self, at: Timestamp) -> Option<FaultKind> {
        let i = self.term_starts.partition_point(|t| *t <= at);
        let from = i.checked_sub(1).map_or(Timestamp::ZERO, |i| self.term_starts[i]);
        let to = self.term_starts.get(i).copied();
        let first = self.fault_log.partition_point(|(t, _, _)| *t < from);
        let span = self.fault_log[first..]
            .iter()
            .take_while(|(t, _, _)| to.map_or(true, |to| *t < to));
        let mut any = None;
        for &(_, kind, hit) in span {
            if hit {
                return Some(kind);
            }
            any = any.or(Some(kind));
        }
        any
    }

    /// Published, lost, duplicated and replayed messages per fault kind (see `cause`).
    fn messages_by_fault(&self) -> BTreeMap<String, MessageCounts> {
        let mut out: BTreeMap<String, MessageCounts> = BTreeMap::new();
        for i in 0..self.published.len() {
            if !self.published[i] {
                continue;
            }
            let kind = self.cause(self.committed_at[i]).map_or("none", FaultKind::as_str);
            out.entry(kind.to_owned())
                .or_default()
                .count(self.deliveries[i], self.replays[i], self.unflagged[i]);
        }
        out
    }

    /// A holder lost the lock involuntarily.
    pub fn lost(&mut self, reason: &'static str) {
        *self.lost_reasons.entry(reason).or_insert(0) += 1;
    }

    /// A process's session reported `name` (a connection ended, an attempt failed, ...) at `at`.
    pub fn session_event(&mut self, name: &'static str, at: Timestamp) {
        if at >= self.warmup {
            *self.session_events.entry(name).or_insert(0) += 1;
        }
    }

    /// A failover after a fault of `kind` completed in `latency`.
    pub fn failover(&mut self, kind: FaultKind, latency: Duration) {
        self.failovers.entry(kind).or_default().push(latency);
    }

    /// The final report.
    pub fn report(&self, scenario: &Scenario, seed: u64, events: u64, unresolved: usize, trace_hash: u64) -> Report {
        let window_s = (self.end.as_micros().saturating_sub(self.warmup.as_micros())) as f64 / 1e6;
        let per_s = |n: u64| if window_s > 0.0 { n as f64 / window_s } else { 0.0 };
        let processes = self.statements_per_process.len().max(1);
        let max_proc = self.statements_per_process.iter().copied().max().unwrap_or(0);
        let published = self.published.iter().filter(|p| **p).count() as u64;
        let lost = self
            .published
            .iter()
            .zip(&self.deliveries)
            .filter(|(p, d)| **p && **d == 0)
            .count() as u64;
        let duplicates = self.deliveries.iter().filter(|d| **d >= 2).count() as u64;
        let messages_by_fault = self.messages_by_fault();
        let total = messages_by_fault
            .values()
            .fold(MessageCounts::default(), |a, b| a.plus(b));
        let c = scenario.lock_config();
        Report {
            seed,
            protocol: scenario.protocol.as_str().to_owned(),
            processes: scenario.processes,
            acquire_interval: format_duration(scenario.acquire_interval),
            lease_ttl: match scenario.protocol {
                Protocol::Lease => format_duration(c.lease_ttl),
                Protocol::Classic => "-".to_owned(),
            },
            virtual_time_s: window_s,
            events,
            failover: self
                .failovers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), LatencyStats::of(v)))
                .collect(),
            unresolved_failovers: unresolved,
            loss_window_s: round3(self.unavailable_us as f64 / 1e6),
            loss_window_pct: round3(if window_s > 0.0 {
                100.0 * self.unavailable_us as f64 / 1e6 / window_s
            } else {
                0.0
            }),
            longest_outage_s: round3(self.longest_outage_us.max(self.outage_run_us) as f64 / 1e6),
            published,
            lost_messages: lost,
            duplicates,
            replayed: total.replayed,
            flagged_duplicates: total.flagged_duplicates,
            unflagged_duplicates: total.unflagged_duplicates,
            messages_by_fault,
            ignored_markers: self.ignored_markers,
            forged_notifications: self.forged_notifications,
            gap_events: self.gap_events,
            gap_missing: self.gap_missing,
            split_brain_s: round3(self.split_brain_us as f64 / 1e6),
            replication: Vec::new(),
            split_brain_session_ended_s: round3(self.split_brain_gap_us as f64 / 1e6),
            statements_per_s: round3(per_s(self.statements_total)),
            statements_per_s_per_process_mean: round3(per_s(self.statements_total) / processes as f64),
            statements_per_s_per_process_max: round3(per_s(max_proc)),
            faults: self.faults.iter().map(|(k, v)| (k.as_str().to_owned(), *v)).collect(),
            lost_reasons: self.lost_reasons.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            session_events: self.session_events.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            acquisitions: self.acquisitions,
            dead_peer_drops: self.dead_peer_drops,
            stale_terminations: self.stale_terminations,
            trace_hash: format!("{trace_hash:016x}"),
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A latency distribution summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencyStats {
    /// Samples.
    pub count: usize,
    /// Median, seconds.
    pub p50_s: f64,
    /// 90th percentile, seconds.
    pub p90_s: f64,
    /// Maximum, seconds.
    pub max_s: f64,
}

impl LatencyStats {
    /// Nearest-rank percentiles of `samples`.
    pub fn of(samples: &[Duration]) -> Self {
        let mut s = samples.to_vec();
        s.sort();
        let pick = |q: f64| {
            if s.is_empty() {
                return 0.0;
            }
            let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
            round3(s[rank - 1].as_secs_f64())
        };
        LatencyStats {
            count: s.len(),
            p50_s: pick(0.5),
            p90_s: pick(0.9),
            max_s: pick(1.0),
        }
    }
}

/// What became of the messages attributed to one fault kind (see [`Report::messages_by_fault`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MessageCounts {
    /// Messages the publisher committed.
    pub published: u64,
    /// Delivered by nobody.
    pub lost: u64,
    /// Delivered two or more times.
    pub duplicated: u64,
    /// Delivered at least once flagged `replay` (at a takeover).
    pub replayed: u64,
    /// Duplicated, with every delivery but one flagged `replay` (the application can tell).
    pub flagged_duplicates: u64,
    /// Duplicated with two or more unflagged deliveries (a protocol bug under Lease).
    pub unflagged_duplicates: u64,
}

impl MessageCounts {
    fn count(&mut self, deliveries: u8, replays: u8, unflagged: u8) {
        self.published += 1;
        self.lost += u64::from(deliveries == 0);
        self.duplicated += u64::from(deliveries >= 2);
        self.replayed += u64::from(replays > 0);
        self.flagged_duplicates += u64::from(deliveries >= 2 && unflagged <= 1);
        self.unflagged_duplicates += u64::from(unflagged >= 2);
    }

    fn plus(self, o: &MessageCounts) -> MessageCounts {
        MessageCounts {
            published: self.published + o.published,
            lost: self.lost + o.lost,
            duplicated: self.duplicated + o.duplicated,
            replayed: self.replayed + o.replayed,
            flagged_duplicates: self.flagged_duplicates + o.flagged_duplicates,
            unflagged_duplicates: self.unflagged_duplicates + o.unflagged_duplicates,
        }
    }
}

/// The outcome of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// `classic` or `lease`.
    pub protocol: String,
    /// Fleet size.
    pub processes: usize,
    /// Standby retry bound.
    pub acquire_interval: String,
    /// Lease ttl (`-` under Classic).
    pub lease_ttl: String,
    /// Measured virtual time (after the warmup), seconds.
    pub virtual_time_s: f64,
    /// Events processed.
    pub events: u64,
    /// Failover latency per fault kind.
    pub failover: BTreeMap<String, LatencyStats>,
    /// Failovers still waiting at the end.
    pub unresolved_failovers: usize,
    /// Time with no process that both holds and can receive, seconds.
    pub loss_window_s: f64,
    /// The same, as a percentage of the measured time.
    pub loss_window_pct: f64,
    /// Longest single outage, seconds.
    pub longest_outage_s: f64,
    /// Messages the publisher committed.
    pub published: u64,
    /// Published messages no holder delivered.
    pub lost_messages: u64,
    /// Messages delivered two or more times.
    pub duplicates: u64,
    /// Messages delivered at least once flagged `replay`.
    pub replayed: u64,
    /// Duplicated messages all of whose deliveries but one were flagged `replay`.
    pub flagged_duplicates: u64,
    /// Messages delivered twice or more without the flag (under Lease a protocol bug, which
    /// the D1 checker fails).
    pub unflagged_duplicates: u64,
    /// The messages per fault kind they are attributed to: a message belongs to the term it was
    /// committed in (from the last acquisition before it to the next one), and that term to the
    /// first fault within it that hit the serving holder (else the first fault of any kind in
    /// it; `none` when no fault fell in it). The rows add up to the totals.
    pub messages_by_fault: BTreeMap<String, MessageCounts>,
    /// Lock-channel markers the locks ignored because their term's holder backend did not send
    /// them (`LockState::ignored_markers`, summed over every lock of every incarnation).
    pub ignored_markers: u64,
    /// Forged notifications a foreign session sent on the lock channel.
    pub forged_notifications: u64,
    /// `Gap` events of the data channel's lock (a winner's replay buffer had overflowed).
    pub gap_events: u64,
    /// The messages those `Gap` events said may be missing.
    pub gap_missing: u64,
    /// Time with two or more processes believing they hold, seconds.
    pub split_brain_s: f64,
    /// Per failover of a replicated server (empty without replication).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replication: Vec<crate::replication::FailoverReport>,
    /// Of which: an old holder's session had ended at the server without it knowing (it was
    /// partitioned when its backend was terminated or dropped as a dead peer).
    pub split_brain_session_ended_s: f64,
    /// Lock statements per second at the server (publisher excluded).
    pub statements_per_s: f64,
    /// Per process, mean.
    pub statements_per_s_per_process_mean: f64,
    /// Per process, the busiest.
    pub statements_per_s_per_process_max: f64,
    /// Faults injected per kind.
    pub faults: BTreeMap<String, u64>,
    /// Involuntary losses per reason.
    pub lost_reasons: BTreeMap<String, u64>,
    /// What the processes' sessions reported: connections ended per reason (`closed`,
    /// `request_timeout`, `setup_timeout`, `read_only`, `shutdown`), failed attempts
    /// (`connect_timeout`, `connect_failed`), `read_only_refused`, `schema_missing`,
    /// `bootstrap_failed`.
    pub session_events: BTreeMap<String, u64>,
    /// Acquisitions of the data channel.
    pub acquisitions: u64,
    /// Sessions dropped by the server's dead-peer detection.
    pub dead_peer_drops: u64,
    /// Stale holders terminated on takeover.
    pub stale_terminations: u64,
    /// Hash of the event trace (determinism check).
    pub trace_hash: String,
}

impl Report {
    /// A readable multi-line table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "protocol {}  processes {}  acquire_interval {}  lease_ttl {}  measured {:.0} s  events {}",
            self.protocol, self.processes, self.acquire_interval, self.lease_ttl, self.virtual_time_s, self.events
        );
        let _ = writeln!(
            out,
            "{:<16} {:>6} {:>10} {:>10} {:>10}",
            "failover", "count", "p50 s", "p90 s", "max s"
        );
        for (kind, s) in &self.failover {
            let _ = writeln!(
                out,
                "{:<16} {:>6} {:>10.3} {:>10.3} {:>10.3}",
                kind, s.count, s.p50_s, s.p90_s, s.max_s
            );
        }
        let _ = writeln!(out, "unresolved failovers   {}", self.unresolved_failovers);
        let _ = writeln!(
            out,
            "loss window            {:.3} s ({:.3} %), longest outage {:.3} s",
            self.loss_window_s, self.loss_window_pct, self.longest_outage_s
        );
        let _ = writeln!(
            out,
            "messages               published {}, lost {}, duplicated {}",
            self.published, self.lost_messages, self.duplicates
        );
        let _ = writeln!(
            out,
            "replays                replayed {}, duplicated flagged {}, unflagged {}; gaps {} (missing {})",
            self.replayed, self.flagged_duplicates, self.unflagged_duplicates, self.gap_events, self.gap_missing
        );
        out.push_str(&self.messages_table());
        let _ = writeln!(
            out,
            "markers                ignored {}, forged sent {}",
            self.ignored_markers, self.forged_notifications
        );
        let _ = writeln!(
            out,
            "split-brain time       {:.3} s (of which old holder's session ended unknown to it: {:.3} s)",
            self.split_brain_s, self.split_brain_session_ended_s
        );
        for (i, f) in self.replication.iter().enumerate() {
            let or_none = |x: Option<f64>| x.map_or_else(|| "none".to_owned(), |s| format!("{s:.3} s"));
            let _ = writeln!(
                out,
                "failover {i:<13} crash {:.3} s, promoted {:.3} s (timeline {}); tokens before max {}, replica had {} ({} acquisitions lost), first after {}; new holder {} after the promotion; split brain {:.3} s",
                f.crash_s,
                f.promoted_s,
                f.timeline,
                f.max_token_before,
                f.replicated_token,
                f.lost_acquisitions,
                f.first_token_after.map_or_else(|| "none".to_owned(), |t| t.to_string()),
                or_none(f.new_holder_after_promote_s),
                f.split_brain_s
            );
        }
        let _ = writeln!(
            out,
            "statements/s           total {:.3}, per process mean {:.3}, max {:.3}",
            self.statements_per_s, self.statements_per_s_per_process_mean, self.statements_per_s_per_process_max
        );
        let faults: Vec<String> = self.faults.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        let lost: Vec<String> = self.lost_reasons.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        let _ = writeln!(out, "faults                 {}", faults.join(" "));
        let _ = writeln!(out, "holder losses          {}", lost.join(" "));
        let sessions: Vec<String> = self.session_events.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        let _ = writeln!(out, "session events         {}", sessions.join(" "));
        let _ = writeln!(
            out,
            "acquisitions {}, dead-peer drops {}, stale terminations {}, trace {}",
            self.acquisitions, self.dead_peer_drops, self.stale_terminations, self.trace_hash
        );
        out
    }

    /// The messages per fault kind, one row each (`published lost dup flagged unflagged
    /// replayed`).
    pub fn messages_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:>9} {:>6} {:>6} {:>8} {:>9} {:>8}",
            "messages after", "published", "lost", "dup", "flagged", "unflagged", "replayed"
        );
        for (kind, m) in &self.messages_by_fault {
            let _ = writeln!(
                out,
                "{:<16} {:>9} {:>6} {:>6} {:>8} {:>9} {:>8}",
                kind, m.published, m.lost, m.duplicated, m.flagged_duplicates, m.unflagged_duplicates, m.replayed
            );
        }
        out
    }
}
