//! Actions: the scenario's scheduled steps on one process, for tests that need an input at a
//! chosen moment: a graceful release or an attempt through the process's core session (as an
//! application's `release()` or `try_acquire()` would), a cut that lasts until a heal, a heal, a
//! start, a stand-down and competing again (`stand_down()` and `compete()`). They run in the same event loop as everything else and are not counted as faults.

use pgiplock_core::LockCall;

use crate::scenario::Action;
use crate::world::World;

impl World {
    pub(crate) fn action(&mut self, index: usize) {
        let spec = self.scenario.actions[index].clone();
        let target = spec.process.or_else(|| self.holder());
        self.trace
            .hash(&[400, spec.action as u64, target.map_or(u64::MAX, |p| p as u64)]);
        self.trace.line(|| format!("  action {} on {target:?}", spec.action));
        let Some(p) = target else { return };
        // The liveness bound counts from here, as from a fault.
        self.checkers.last_disturbance = self.engine.now;
        match spec.action {
            Action::Release => self.call_every_lock(p, LockCall::Release),
            Action::Acquire => self.call_every_lock(p, LockCall::Acquire),
            Action::Cut => self.cut(p, None),
            Action::Heal => {
                let epoch = self.links[p].epoch();
                self.heal(p, epoch);
            }
            Action::Start => self.start_process(p),
            Action::StandDown => {
                self.procs[p].stood_down = true;
                self.call_every_lock(p, LockCall::StandDown);
            }
            Action::Compete => {
                self.procs[p].stood_down = false;
                self.call_every_lock(p, LockCall::Init);
            }
        }
    }

    fn call_every_lock(&mut self, p: usize, request: LockCall) {
        for li in 0..self.channels.len() {
            self.call(p, li, request);
        }
    }
}
