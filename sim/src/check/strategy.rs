//! The ranges of a [`Spec`] as a `proptest` strategy: proptest draws each value from its
//! range and, on a failure, shrinks every one of them towards the start of its range (fewer
//! processes, a shorter run, lower fault rates, ...) and the seed towards zero.

use std::ops::RangeInclusive;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::{Case, Counterexample, Draw, Spec, SpecError};
use crate::scenario::{Action, ActionSpec};

fn durations(range: &RangeInclusive<Duration>) -> BoxedStrategy<Duration> {
    let (lo, hi) = (range.start().as_micros() as u64, range.end().as_micros() as u64);
    if lo % 1000 == 0 && hi % 1000 == 0 {
        (lo / 1000..=hi / 1000).prop_map(Duration::from_millis).boxed()
    } else {
        (lo..=hi).prop_map(Duration::from_micros).boxed()
    }
}

fn reals(range: &RangeInclusive<f64>, per: f64) -> BoxedStrategy<f64> {
    let (lo, hi) = (*range.start(), *range.end());
    if lo == hi {
        return Just(lo).boxed();
    }
    (lo..=hi)
        .prop_map(move |x| ((x * per).round() / per).clamp(lo, hi))
        .boxed()
}

fn optional(range: &Option<RangeInclusive<Duration>>) -> BoxedStrategy<Option<Duration>> {
    match range {
        Some(r) => durations(r).prop_map(Some).boxed(),
        None => Just(None).boxed(),
    }
}

impl Spec {
    /// The ranges as a `proptest` strategy of cases (each with its own seed); check each with
    /// [`Case::check`], whose error converts into a `TestCaseError` (`case.check()?`).
    pub fn strategy(&self) -> Result<impl Strategy<Value = Case>, SpecError> {
        self.validate()?;
        let spec = self.clone();
        let protocols = self.protocols.clone();
        let kinds: Vec<_> = self.fault_rates.keys().copied().collect();
        let rates: Vec<BoxedStrategy<f64>> = self
            .fault_rates
            .values()
            .map(|r| {
                // One time in four at the low end: cases with fewer kinds of fault.
                let low = *r.start();
                prop_oneof![1 => Just(low), 3 => reals(r, 100.0)].boxed()
            })
            .collect();
        let fleet = (
            0..protocols.len(),
            self.processes.clone(),
            self.channels.clone(),
            durations(&self.duration),
        );
        let timings = (
            durations(&self.acquire_interval),
            durations(&self.lease_ttl),
            optional(&self.renew_interval),
            optional(&self.fence_margin),
            durations(&self.request_timeout),
        );
        let world = (
            reals(&self.publish_rate, 100.0),
            durations(&self.net_delay),
            reals(&self.drift, 1e6),
            durations(&self.cut_duration),
        );
        // Each stand-down: where in the run after the warmup (a fraction), which process (a
        // fraction of the fleet) and the pause before it competes again; fewer on shrinking.
        let stand_downs = proptest::collection::vec(
            (0.0..=1.0f64, 0.0..1.0f64, durations(&self.stand_down_pause)),
            self.stand_downs.clone(),
        );
        let warmup = self.base.warmup;
        Ok((fleet, timings, world, rates, stand_downs, any::<u64>()).prop_map(
            move |(
                (protocol, processes, channels, duration),
                (acquire_interval, lease_ttl, renew_interval, fence_margin, request_timeout),
                (publish_rate, net_delay, drift, cut_duration),
                rates,
                stand_downs,
                seed,
            )| {
                let from = warmup.min(duration);
                let actions = stand_downs
                    .into_iter()
                    .flat_map(|(when, who, pause)| {
                        let at = from + (duration - from).mul_f64(when);
                        let process = Some(((who * processes as f64) as usize).min(processes.saturating_sub(1)));
                        [
                            ActionSpec {
                                at,
                                action: Action::StandDown,
                                process,
                            },
                            ActionSpec {
                                at: at + pause,
                                action: Action::Compete,
                                process,
                            },
                        ]
                    })
                    .collect();
                let draw = Draw {
                    protocol: protocols[protocol],
                    processes,
                    channels,
                    duration,
                    acquire_interval,
                    lease_ttl,
                    renew_interval,
                    fence_margin,
                    request_timeout,
                    publish_rate,
                    net_delay,
                    drift,
                    cut_duration,
                    fault_rates: kinds.iter().copied().zip(rates).collect(),
                    actions,
                };
                Case {
                    seed,
                    scenario: spec.scenario(&draw),
                }
            },
        ))
    }
}

impl From<Box<Counterexample>> for TestCaseError {
    fn from(c: Box<Counterexample>) -> TestCaseError {
        TestCaseError::fail(c.to_string())
    }
}
