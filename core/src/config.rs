//! Protocol choice and timings.

use std::time::Duration;

/// Which lock protocol a lock speaks. Both are described operation by operation in
/// [`DbOp`](crate::DbOp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Protocol {
    /// The `@imqueue/pg-pubsub` protocol: a row per channel in `pgip_lock.lock`, taken over only
    /// when the holder's session is gone from `pg_stat_activity`. Compatible with Node processes.
    Classic,
    /// Leases on the database clock with fencing tokens and self-fencing (the default).
    #[default]
    Lease,
}

impl Protocol {
    /// `"classic"` or `"lease"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Classic => "classic",
            Protocol::Lease => "lease",
        }
    }
}

impl Protocol {
    /// The default schema of the lock table: `pgip_lock` (shared with `@imqueue/pg-pubsub`) for
    /// `Classic`, `pgiplock_lease` for `Lease`.
    pub fn default_schema(self) -> &'static str {
        match self {
            Protocol::Classic => "pgip_lock",
            Protocol::Lease => "pgiplock_lease",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s.to_ascii_lowercase().as_str() {
            "classic" => Ok(Protocol::Classic),
            "lease" => Ok(Protocol::Lease),
            _ => Err(ConfigError::UnknownProtocol(s.to_owned())),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An invalid setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// A duration below the shortest the lock can run with (see [`LockConfig`]'s floors).
    #[error("{name} of {value:?} is below the minimum of {min:?}")]
    TooSmall {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: Duration,
        /// The minimum allowed.
        min: Duration,
    },
    /// A duration beyond any sensible value.
    #[error("{name} of {value:?} exceeds the maximum of {max:?}")]
    TooLarge {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: Duration,
        /// The maximum allowed.
        max: Duration,
    },
    /// Lease timings that cannot keep a lease alive.
    #[error("lease timings are inconsistent: {0}")]
    Inconsistent(&'static str),
    /// A protocol name that is neither `classic` nor `lease`.
    #[error("unknown protocol {0:?} (expected \"classic\" or \"lease\")")]
    UnknownProtocol(String),
    /// The handover buffer must hold at least one message.
    #[error("handover buffer must hold at least one message")]
    EmptyBuffer,
    /// Fair share needs the `Lease` protocol: `Classic` speaks exactly what `@imqueue/pg-pubsub`
    /// speaks, which has no member table and no counts.
    #[error("balance needs the lease protocol (classic speaks only what @imqueue/pg-pubsub speaks)")]
    BalanceNeedsLease,
    /// A balance group name that is empty, longer than 63 bytes or not printable ASCII.
    #[error("balance group {0:?} must be 1 to 63 bytes of printable ASCII")]
    BadBalanceGroup(String),
}

/// Longest accepted duration for any setting: one day.
pub const MAX_SETTING: Duration = Duration::from_secs(24 * 3600);

/// Shortest accepted `acquire_interval`, `renew_interval`, `request_timeout` and
/// `shutdown_timeout`: 10 ms. A shorter timer fires before a round trip to the server can end,
/// so the lock would only spin (a busy loop of statements or timeouts), never work faster.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// Shortest accepted `lease_ttl` under [`Protocol::Lease`]: 100 ms. The lease must outlive a
/// renewal round trip plus the fence margin, and the renew interval (itself at least
/// [`MIN_INTERVAL`]) must fit within `lease_ttl - fence_margin`.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(100);

/// Timings and limits of one lock. Build with [`LockConfig::new`] and adjust fields; check with
/// [`LockConfig::validate`].
///
/// Defaults (justified in the README's "Choosing timings") and the range
/// [`validate`](LockConfig::validate) accepts:
///
/// | setting | Lease | Classic | accepted |
/// |---|---|---|---|
/// | `acquire_interval` (standby retry bound) | 30 s | 30 s | 10 ms ..= 24 h |
/// | `lease_ttl` | 10 s | unused | 100 ms ..= 24 h (Lease) |
/// | `renew_interval` (holder renew / ownership check) | 2 s | 30 s | 10 ms ..= 24 h, and under Lease below `lease_ttl - fence_margin` |
/// | `fence_margin` | 1 s | unused | 0 ..= 24 h, and under Lease below `lease_ttl` |
/// | `request_timeout` | 5 s | 5 s | 10 ms ..= 24 h |
/// | `wake_jitter` (spread of standbys woken by a release) | 20 ms | 0 | 0 ..= 24 h |
/// | `shutdown_timeout` | 1 s | 1 s | 10 ms ..= 24 h |
/// | `marker_wait` | 500 ms | 500 ms | above 0, up to 24 h |
/// | `drain_in_release` | on | unused | on or off |
/// | `handover_buffer` (messages) | 10 000 | 10 000 | at least 1 |
/// | `replay_limit` (messages) / `replay_bytes` | 65 536 / 64 MiB | unused | any (0 turns replay off) |
///
/// The floors are [`MIN_INTERVAL`] and [`MIN_LEASE_TTL`]. [`Lock::new`](crate::Lock::new) does
/// not refuse: it clamps every duration to at least a microsecond (so property tests and fuzzing
/// can feed it anything), which is why drivers check user input with `validate` first.
///
/// ```
/// use pgiplock_core::{LockConfig, Protocol};
/// use std::time::Duration;
/// let mut c = LockConfig::new(Protocol::Lease);
/// c.lease_ttl = Duration::from_secs(4);
/// c.renew_interval = Duration::from_secs(1);
/// c.fence_margin = Duration::from_millis(400);
/// assert!(c.validate().is_ok());
/// c.renew_interval = Duration::from_secs(4);
/// assert!(c.validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LockConfig {
    /// The protocol.
    pub protocol: Protocol,
    /// Longest time a standby waits between acquisition attempts. Under `Lease` a standby also
    /// retries as soon as the current lease would expire, so the effective retry bound is
    /// `min(acquire_interval, lease_ttl)` plus jitter.
    pub acquire_interval: Duration,
    /// Fraction of `acquire_interval` drawn as jitter below it (0.0..=0.9): retries fall uniformly
    /// in `[interval * (1 - retry_jitter), interval]`.
    pub retry_jitter: f64,
    /// Lease length on the database clock (`Lease` only).
    pub lease_ttl: Duration,
    /// How often the holder renews its lease (`Lease`) or confirms it still owns its row
    /// (`Classic`).
    pub renew_interval: Duration,
    /// Safety margin of self-fencing: the holder steps down at `sent + lease_ttl - fence_margin`
    /// of its last confirmed renewal. Covers clock-rate drift and delivery of the last messages.
    pub fence_margin: Duration,
    /// A database request without a reply after this long makes the lock ask for a new session.
    pub request_timeout: Duration,
    /// Standbys woken by a release notification attempt after a uniform delay in
    /// `[0, wake_jitter]`, so that one of them wins before the others write (`Lease`: the
    /// winner's acquisition marker cancels the rest). A `Lease` release that names a successor
    /// (the longest-waiting live standby) wakes that one at once and the others after
    /// `wake_jitter` plus their jitter. Zero under `Classic`, which has no such
    /// marker, so every woken standby attempts anyway, and whose Node standbys attempt at once:
    /// a delay would only make ours lose every race to them.
    pub wake_jitter: Duration,
    /// How long a stop (destroy or signal) waits for the release to be confirmed.
    pub shutdown_timeout: Duration,
    /// How long a releasing holder keeps delivering while it waits for its own release
    /// notification, the marker that ends its tenure in the message stream. Under `Lease` with
    /// [`drain_in_release`](LockConfig::drain_in_release), also how long a successor waits for
    /// its predecessor's `drained` marker before it reports the term and replays instead.
    pub marker_wait: Duration,
    /// `Lease` only (on by default, ignored under `Classic`): the release transaction is the
    /// drain point. A stopping holder sends its release at once and delivers up to its own
    /// release marker, then says so with a `drained:<token>` marker; a standby that wins the
    /// released term reports `Acquired` once that marker arrives (or after `marker_wait`, when
    /// it replays from the holder's newest acknowledged progress marker instead, at least
    /// once). One round trip less per handover than a drain marker of its own; off, the holder
    /// commits `draining:<token>` first and releases once it has seen it, as earlier versions
    /// do. Successors understand both, whatever their own setting. With replay off
    /// (`replay_limit` 0) the holder drains first anyway: a successor without a replay log
    /// could not make up for a holder that stopped waiting for its release marker.
    pub drain_in_release: bool,
    /// Most messages a standby buffers after a release notification for a lossless handover.
    pub handover_buffer: usize,
    /// Most messages a `Lease` standby keeps for replay: what followed the holder's newest
    /// acknowledged progress marker, delivered first if it wins a takeover after a crash, a
    /// silent disconnect or an expiry. Zero turns replay off (at most once on such a
    /// takeover). Beyond the limit the oldest are dropped, counted, and reported as a
    /// [`LockEvent::Gap`](crate::LockEvent::Gap) if they were needed.
    pub replay_limit: usize,
    /// Most payload bytes a `Lease` standby keeps for replay (beside `replay_limit`).
    pub replay_bytes: usize,
    /// Fair share (`Lease` only): the balance group this lock competes in, or `None` (the
    /// default) to compete for it alone. The sessions of a group converge to holding about
    /// `channels / sessions` of its channels each (see [`BalanceCounts`](crate::BalanceCounts)).
    pub balance: Option<String>,
    /// Crash failover without polling (`Lease` only; on by default, ignored under `Classic`):
    /// a standby whose holder is another process waits on that holder's session advisory lock
    /// over a second, dedicated connection of its session, and attempts as soon as the
    /// holder's session ends instead of at the lease's expiry; while it waits it sends no
    /// periodic attempt. Costs one more connection per process; turn it off behind
    /// transaction-mode poolers (PgBouncer), where session advisory locks do not work.
    pub crash_watch: bool,
    /// How long one wait of the crash watch lasts at most before it is issued again (default
    /// 60 s): a waiting statement holds its backend's snapshot (`backend_xmin`), and so holds
    /// back vacuum, for at most this long.
    pub crash_watch_refresh: Duration,
}

impl LockConfig {
    /// The defaults of `protocol`.
    pub fn new(protocol: Protocol) -> Self {
        let (renew_interval, wake_jitter) = match protocol {
            Protocol::Lease => (Duration::from_secs(2), Duration::from_millis(20)),
            Protocol::Classic => (Duration::from_secs(30), Duration::ZERO),
        };
        LockConfig {
            protocol,
            acquire_interval: Duration::from_secs(30),
            retry_jitter: 0.2,
            lease_ttl: Duration::from_secs(10),
            renew_interval,
            fence_margin: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            wake_jitter,
            shutdown_timeout: Duration::from_secs(1),
            marker_wait: Duration::from_millis(500),
            drain_in_release: true,
            handover_buffer: 10_000,
            replay_limit: 65_536,
            replay_bytes: 64 << 20,
            balance: None,
            crash_watch: protocol == Protocol::Lease,
            crash_watch_refresh: Duration::from_secs(60),
        }
    }

    /// Whether this lock takes part in the crash watch (`Lease` and `crash_watch`).
    pub fn watches_crashes(&self) -> bool {
        self.protocol == Protocol::Lease && self.crash_watch
    }

    /// Sets the lease length and the timings derived from it, the one place these derivations
    /// live (the `pgiplock` crate's options and the simulator's scenarios both use it): renew
    /// interval `ttl / 5` (four lost renewals before the holder fences itself), fence margin
    /// `ttl / 10`, and the request timeout capped at the ttl (a request stuck for longer than
    /// the lease is worth a new session). Set other values after it to override them.
    ///
    /// ```
    /// use pgiplock_core::{LockConfig, Protocol};
    /// use std::time::Duration;
    /// let c = LockConfig::new(Protocol::Lease).with_lease_ttl(Duration::from_secs(3));
    /// assert_eq!(c.renew_interval, Duration::from_millis(600));
    /// assert_eq!(c.fence_margin, Duration::from_millis(300));
    /// assert_eq!(c.request_timeout, Duration::from_secs(3));
    /// ```
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self.renew_interval = ttl / 5;
        self.fence_margin = ttl / 10;
        self.request_timeout = self.request_timeout.min(ttl);
        self
    }

    /// Checks every setting; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // `lease_ttl` first: other settings may be derived from it, and the error should name the
        // setting the user gave.
        let positive = [
            ("lease_ttl", self.lease_ttl),
            ("acquire_interval", self.acquire_interval),
            ("renew_interval", self.renew_interval),
            ("request_timeout", self.request_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
            ("marker_wait", self.marker_wait),
            ("crash_watch_refresh", self.crash_watch_refresh),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(ConfigError::Zero(name));
            }
        }
        let bounded = positive
            .into_iter()
            .chain([("wake_jitter", self.wake_jitter), ("fence_margin", self.fence_margin)]);
        for (name, value) in bounded {
            if value > MAX_SETTING {
                return Err(ConfigError::TooLarge {
                    name,
                    value,
                    max: MAX_SETTING,
                });
            }
        }
        let lease_floor = (self.protocol == Protocol::Lease).then_some(("lease_ttl", self.lease_ttl, MIN_LEASE_TTL));
        let floors = lease_floor.into_iter().chain([
            ("acquire_interval", self.acquire_interval, MIN_INTERVAL),
            ("renew_interval", self.renew_interval, MIN_INTERVAL),
            ("request_timeout", self.request_timeout, MIN_INTERVAL),
            ("shutdown_timeout", self.shutdown_timeout, MIN_INTERVAL),
            ("crash_watch_refresh", self.crash_watch_refresh, MIN_INTERVAL),
        ]);
        for (name, value, min) in floors {
            if value < min {
                return Err(ConfigError::TooSmall { name, value, min });
            }
        }
        if !(0.0..=0.9).contains(&self.retry_jitter) {
            return Err(ConfigError::Inconsistent("retry_jitter must be within 0.0..=0.9"));
        }
        if self.handover_buffer == 0 {
            return Err(ConfigError::EmptyBuffer);
        }
        if let Some(group) = &self.balance {
            if self.protocol != Protocol::Lease {
                return Err(ConfigError::BalanceNeedsLease);
            }
            let printable = group.bytes().all(|b| (0x20..0x7f).contains(&b));
            if group.is_empty() || group.len() > 63 || !printable {
                return Err(ConfigError::BadBalanceGroup(group.clone()));
            }
        }
        if self.protocol == Protocol::Lease {
            if self.fence_margin >= self.lease_ttl {
                return Err(ConfigError::Inconsistent("fence_margin must be shorter than lease_ttl"));
            }
            if self.renew_interval >= self.lease_ttl - self.fence_margin {
                return Err(ConfigError::Inconsistent(
                    "renew_interval must be shorter than lease_ttl - fence_margin, or the holder fences itself between renewals",
                ));
            }
        }
        Ok(())
    }
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig::new(Protocol::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn timings_below_their_floor_are_refused_by_name() {
        type Set = fn(&mut LockConfig, Duration);
        let settings: [(&str, Set, Duration); 5] = [
            ("lease_ttl", |c, d| c.lease_ttl = d, MIN_LEASE_TTL),
            ("acquire_interval", |c, d| c.acquire_interval = d, MIN_INTERVAL),
            ("renew_interval", |c, d| c.renew_interval = d, MIN_INTERVAL),
            ("request_timeout", |c, d| c.request_timeout = d, MIN_INTERVAL),
            ("shutdown_timeout", |c, d| c.shutdown_timeout = d, MIN_INTERVAL),
        ];
        for (name, set, min) in settings {
            let mut c = LockConfig::new(Protocol::Lease);
            if name == "lease_ttl" {
                // Keep the lease's other timings consistent with a short ttl.
                c.renew_interval = ms(20);
                c.fence_margin = ms(10);
            }
            set(&mut c, min);
            assert_eq!(c.validate(), Ok(()), "{name} at its floor");
            let below = min - Duration::from_micros(1);
            set(&mut c, below);
            assert_eq!(
                c.validate(),
                Err(ConfigError::TooSmall {
                    name,
                    value: below,
                    min
                }),
                "{name} below its floor"
            );
            // Zero keeps its own, plainer error.
            set(&mut c, Duration::ZERO);
            assert_eq!(c.validate(), Err(ConfigError::Zero(name)));
        }
    }

    #[test]
    fn classic_ignores_the_lease_floor() {
        let mut c = LockConfig::new(Protocol::Classic);
        c.lease_ttl = ms(1);
        c.fence_margin = Duration::ZERO;
        assert_eq!(c.validate(), Ok(()));
        c.renew_interval = ms(5);
        assert_eq!(
            c.validate(),
            Err(ConfigError::TooSmall {
                name: "renew_interval",
                value: ms(5),
                min: MIN_INTERVAL
            })
        );
    }

    #[test]
    fn too_small_names_the_setting_and_the_floor() {
        let mut c = LockConfig::new(Protocol::Lease);
        c.lease_ttl = ms(50);
        c.renew_interval = ms(10);
        c.fence_margin = ms(5);
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "lease_ttl of 50ms is below the minimum of 100ms"
        );
    }
}
