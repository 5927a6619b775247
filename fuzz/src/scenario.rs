//! The whole-scenario target: a fleet, the simulator's database model and network, faults, and
//! every checker of the simulator after every event.

use std::time::Duration;

use pgiplock_core::Protocol;
use pgiplock_sim::explore::{run_checked, swarm_scenario, ExploreError};
use pgiplock_sim::{Action, ActionSpec, FaultRates, FaultTarget, SimError};

use crate::bytes::Reader;

/// Decodes a scenario from `data` and runs it; panics when a checker of the simulator fails
/// (S1, S2 under Lease within the drift bound, S3, S4, phase bounds, liveness, limits), printing
/// a command that reproduces the run.
///
/// Byte format (missing bytes read as zero, so every input runs):
/// `seed (8 bytes LE)` chooses a swarm scenario; then one byte each for the protocol (bit 0:
/// Classic), the fleet size (`2 + b % 5`), the virtual duration (`1 + b % 4` minutes), the acquire
/// interval, the lease ttl, and the rates of stops, crashes, silent cuts, server-side
/// terminations, server restarts, hanging connection handshakes, blips while connecting, lost
/// setup replies, schema drops and read-only windows (`(b % 8) × 60` per hour, a quarter of that
/// for the server-wide ones: faults come often in a short run); then up to four stand-downs, a
/// byte each (`0` for none: a process `b % 8 % fleet` stands down at second `5 + b / 4`, and
/// competes again 20 s later).
///
/// ```
/// pgiplock_fuzz::scenario(&[7, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 0]);
/// ```
pub fn scenario(data: &[u8]) {
    let mut r = Reader::new(data);
    let seed = r.u64();
    let mut s = swarm_scenario(seed);
    s.protocol = if r.byte() & 1 == 1 {
        Protocol::Classic
    } else {
        Protocol::Lease
    };
    s.processes = 2 + usize::from(r.byte() % 5);
    s.duration = Duration::from_secs(60 * (1 + u64::from(r.byte() % 4)));
    s.warmup = Duration::from_secs(5);
    s.acquire_interval = Duration::from_millis([200, 1_000, 5_000, 30_000][usize::from(r.byte() % 4)]);
    s.lease_ttl = Duration::from_millis([500, 2_000, 10_000][usize::from(r.byte() % 3)]);
    let mut rate = || f64::from(r.byte() % 8) * 60.0;
    s.fault_rates = FaultRates {
        stop: rate(),
        crash: rate(),
        cut: rate(),
        terminate: rate(),
        server_restart: rate() / 4.0,
        connect_hang: rate(),
        connect_blip: rate(),
        setup_reply_loss: rate(),
        schema_drop: rate() / 4.0,
        read_only: rate() / 4.0,
        // Forged markers draw no byte, so that the corpus keeps its meaning.
        forge: 0.0,
    };
    // Stand-downs draw the bytes after the rates, so that older corpus entries (shorter) keep
    // their meaning: a missing byte is zero, no stand-down.
    for _ in 0..4 {
        let b = r.byte();
        if b == 0 {
            continue;
        }
        let process = Some(usize::from(b % 8) % s.processes);
        let at = Duration::from_secs(5 + u64::from(b / 4));
        s.actions.push(ActionSpec {
            at,
            action: Action::StandDown,
            process,
        });
        s.actions.push(ActionSpec {
            at: at + Duration::from_secs(20),
            action: Action::Compete,
            process,
        });
    }
    s.fault_target = FaultTarget::Any;
    s.cut_duration = s.cut_duration.min(Duration::from_secs(30));
    s.max_steps = 2_000_000;
    // Keep the drift within what the fence margin covers, so that S2 is checked under Lease.
    let bound = s.drift_bound().min(0.1);
    s.drift = s.drift.min(bound / 2.0);
    match run_checked(&s, seed, false) {
        Ok(_) => {}
        // A scenario the decoder made unusable is not a finding.
        Err(ExploreError::Run {
            error: SimError::Scenario(_),
            ..
        }) => {}
        Err(e) => panic!(
            "{e}\nreproduce with: pgiplock-sim run --seed {seed} {}",
            s.to_cli_args()
        ),
    }
}
